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

/// Runs a model on the GPU.
pub struct Engine {
    ctx: GpuContext,
    model: Model,
    weights: WeightStore,
    plans: HashMap<Vec<Vec<usize>>, Plan>,
}

impl Engine {
    pub fn new(ctx: &GpuContext, model: Model) -> Engine {
        Engine { ctx: ctx.clone(), model, weights: WeightStore::default(), plans: HashMap::new() }
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
    pub fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, Error> {
        let graph = self.model.graph.clone();
        for (t, info) in inputs.iter().zip(&graph.inputs) {
            if t.dtype != DType::F32 || t.as_f32().is_none() {
                return Err(PlanError::InputDType { name: info.name.clone(), dtype: t.dtype }.into());
            }
        }
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape.clone()).collect();
        let data: Vec<&[f32]> = inputs.iter().map(|t| t.as_f32().unwrap_or(&[])).collect();
        let ctx = self.ctx.clone();
        let plan = self.plan(&shapes)?;
        Ok(plan.run(&ctx, &data)?)
    }
}
