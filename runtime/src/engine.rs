//! The inference facade: a model loaded once, weights uploaded once, one cached plan per set of
//! input shapes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Error;
use crate::gpu::GpuContext;
use crate::ir::Graph;
use crate::plan::{Plan, PlanError, WeightStore};
use crate::tensor::{DType, Tensor};

/// A loaded, validated ONNX model.
#[derive(Clone, Debug)]
pub struct Model {
    pub graph: Arc<Graph>,
    pub path: Option<PathBuf>,
}

impl Model {
    /// Loads an ONNX file. Malformed protobuf, unsupported ops (named with node and opset) and
    /// dangling tensor references are errors here, before anything runs.
    pub fn load(path: &Path) -> Result<Model, Error> {
        let graph = Graph::load(path)?;
        Ok(Model { graph: Arc::new(graph), path: Some(path.to_path_buf()) })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Model, Error> {
        Ok(Model { graph: Arc::new(Graph::from_bytes(bytes)?), path: None })
    }

    pub fn from_graph(graph: Graph) -> Model {
        Model { graph: Arc::new(graph), path: None }
    }
}

/// What [`Engine::run`] does with an input that holds NaN or infinite values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NonFinite {
    /// Refuse the run with [`PlanError::NonFiniteInput`], which names the input, the count and the
    /// first flat index (the default). Images, frames and normalised pixels are always finite, so
    /// a NaN or inf in an input is a bug upstream; run anyway, it would come back as NaN logits,
    /// or as finite logits an argmax happily turns into a class.
    #[default]
    Refuse,
    /// Run, and let NaN and infinities propagate through every op as ONNX Runtime 1.31 (CPU) does
    /// (README, "NaN semantics"; `tests/nan_semantics.rs` checks each op family against it).
    Propagate,
}

/// The first non-finite value of `data`: `Err` naming `name`, the count and the first flat index.
pub fn check_finite(name: &str, shape: &[usize], data: &[f32]) -> Result<(), PlanError> {
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(first) => Err(PlanError::NonFiniteInput {
            name: name.to_string(),
            shape: shape.to_vec(),
            count: data[first..].iter().filter(|v| !v.is_finite()).count(),
            first,
        }),
    }
}

/// Runs a model on the GPU.
pub struct Engine {
    ctx: GpuContext,
    model: Model,
    weights: WeightStore,
    plans: HashMap<Vec<Vec<usize>>, Plan>,
    non_finite: NonFinite,
}

impl Engine {
    pub fn new(ctx: &GpuContext, model: Model) -> Engine {
        Engine {
            ctx: ctx.clone(),
            model,
            weights: WeightStore::default(),
            plans: HashMap::new(),
            non_finite: NonFinite::default(),
        }
    }

    /// Chooses what [`Engine::run`] does with NaN or infinite input values (default: refuse).
    pub fn set_non_finite_inputs(&mut self, policy: NonFinite) {
        self.non_finite = policy;
    }

    pub fn non_finite_inputs(&self) -> NonFinite {
        self.non_finite
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// The plan for these input shapes, built on first use.
    pub fn plan(&mut self, shapes: &[Vec<usize>]) -> Result<&Plan, Error> {
        if !self.plans.contains_key(shapes) {
            let plan = Plan::build(&self.ctx, &self.model.graph, &mut self.weights, shapes)?;
            self.plans.insert(shapes.to_vec(), plan);
        }
        Ok(&self.plans[shapes])
    }

    /// Runs the model; one tensor per graph input, in order; returns every graph output.
    ///
    /// An input holding NaN or ±inf is refused ([`PlanError::NonFiniteInput`]) unless
    /// [`Engine::set_non_finite_inputs`] chose [`NonFinite::Propagate`]; then NaN and infinities,
    /// like those a weight or an overflow inside the network produces, reach the outputs exactly
    /// where ONNX Runtime's do.
    pub fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, Error> {
        let graph = self.model.graph.clone();
        for (t, info) in inputs.iter().zip(&graph.inputs) {
            let Some(data) = t.as_f32().filter(|_| t.dtype == DType::F32) else {
                return Err(PlanError::InputDType { name: info.name.clone(), dtype: t.dtype }.into());
            };
            if self.non_finite == NonFinite::Refuse {
                check_finite(&info.name, &t.shape, data)?;
            }
        }
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape.clone()).collect();
        let data: Vec<&[f32]> = inputs.iter().map(|t| t.as_f32().unwrap_or(&[])).collect();
        let ctx = self.ctx.clone();
        let plan = self.plan(&shapes)?;
        Ok(plan.run(&ctx, &data)?)
    }
}
