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

/// A loaded, validated ONNX model: decoded once, checked op by op (an unsupported op or attribute
/// is an error here, naming the op, node and opset), shared cheaply (`clone` shares the weights).
///
/// ```no_run
/// let model = acclimate::Model::load("mobilenetv2.onnx".as_ref())?;
/// assert_eq!(model.input_shape(), vec![None, Some(3), Some(224), Some(224)]); // batch is symbolic
/// assert_eq!(model.num_classes(), Some(1000));
/// println!("{} BatchNorm layers to adapt", model.batch_norms().len());
/// # Ok::<(), acclimate::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Model {
    #[doc(hidden)]
    pub graph: Arc<Graph>,
    #[doc(hidden)]
    pub path: Option<PathBuf>,
}

impl Model {
    /// Loads an ONNX file. Malformed protobuf, unsupported ops (named with node and opset) and
    /// dangling tensor references are errors here, before anything runs.
    pub fn load(path: &Path) -> Result<Model, Error> {
        let graph = Graph::load(path)?;
        Ok(Model { graph: Arc::new(graph), path: Some(path.to_path_buf()) })
    }

    /// Decodes a model held in memory (an app asset). External tensor data cannot be resolved
    /// without a folder: such a model must be loaded from its file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Model, Error> {
        Ok(Model { graph: Arc::new(Graph::from_bytes(bytes)?), path: None })
    }

    #[doc(hidden)]
    pub fn from_graph(graph: Graph) -> Model {
        Model { graph: Arc::new(graph), path: None }
    }

    /// The file the model was loaded from (`None` from [`Model::from_bytes`]).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The name of the model's first input (the image).
    pub fn input_name(&self) -> &str {
        self.graph.inputs.first().map(|i| i.name.as_str()).unwrap_or("")
    }

    /// The first input's declared shape, one entry per dimension: `Some(n)` when fixed, `None`
    /// when symbolic (usually the batch). Empty when the model declares no shape.
    pub fn input_shape(&self) -> Vec<Option<usize>> {
        declared(self.graph.inputs.first().and_then(|i| i.dims.as_deref()))
    }

    /// The first output's declared shape, as [`Model::input_shape`].
    pub fn output_shape(&self) -> Vec<Option<usize>> {
        declared(self.graph.outputs.first().and_then(|o| o.dims.as_deref()))
    }

    /// The class count: the last dimension of the first output, when the model fixes it (the
    /// second of an `[N, C, 1, …, 1]` output, which everything here reads as `[N, C]`).
    pub fn num_classes(&self) -> Option<usize> {
        let shape = self.output_shape();
        match &shape[..] {
            [_, c, rest @ ..] if !rest.is_empty() && rest.iter().all(|&d| d == Some(1)) => *c,
            _ => shape.last().copied().flatten(),
        }
    }

    /// The BatchNormalization layers whose parameters are initializers, in graph order: the
    /// layers test-time adaptation normalises and trains (a model without any can still use the
    /// output stages, LAME and label-shift correction).
    pub fn batch_norms(&self) -> Vec<crate::ir::BatchNormInfo> {
        self.graph.batch_norms()
    }

    /// The LayerNorm, GroupNorm and InstanceNorm layers whose affine parameters are
    /// initializers, in graph order: what the gradient methods train besides BatchNorm.
    pub fn affine_norms(&self) -> Vec<crate::ir::AffineNormInfo> {
        self.graph.affine_norms()
    }
}

fn declared(dims: Option<&[crate::ir::Dim]>) -> Vec<Option<usize>> {
    dims.unwrap_or(&[])
        .iter()
        .map(|d| match d {
            crate::ir::Dim::Fixed(n) => Some(*n),
            crate::ir::Dim::Dynamic(_) => None,
        })
        .collect()
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

/// Runs a model on the GPU: weights uploaded once, one compiled plan per set of input shapes
/// (any batch size), one command buffer per run. No adaptation: see [`crate::Session`].
///
/// ```no_run
/// use acclimate::{Engine, GpuContext, Model, Tensor};
/// let ctx = GpuContext::new()?;
/// let mut engine = Engine::new(&ctx, Model::load("svhn.onnx".as_ref())?);
/// let batch = Tensor::f32(vec![16, 3, 32, 32], vec![0.0; 16 * 3 * 32 * 32]);
/// let logits = engine.run(&[batch])?.remove(0); // [16, 10]
/// # Ok::<(), acclimate::Error>(())
/// ```
pub struct Engine {
    ctx: GpuContext,
    model: Model,
    weights: WeightStore,
    plans: HashMap<Vec<Vec<usize>>, Plan>,
    non_finite: NonFinite,
}

impl Engine {
    /// An engine for `model` on `ctx`'s device (nothing is compiled or uploaded before the first
    /// run).
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

    /// What [`Engine::run`] does with NaN or infinite input values.
    pub fn non_finite_inputs(&self) -> NonFinite {
        self.non_finite
    }

    /// The model this engine runs.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The GPU context this engine runs on.
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Bytes of the persistent buffers this engine uploaded (weights and folded constants),
    /// shared by all its plans.
    pub fn resident_bytes(&self) -> u64 {
        self.weights.buffers.values().map(|b| b.size()).sum()
    }

    /// The plan for these input shapes, built on first use.
    #[doc(hidden)]
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
