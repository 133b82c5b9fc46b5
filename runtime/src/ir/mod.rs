//! The intermediate representation: a validated, topologically ordered graph of parsed ops.
//!
//! Shapes stay symbolic here (a dynamic batch dimension, or dynamic H and W as in OCR models);
//! [`crate::plan`] specialises the graph to concrete input shapes, folds every constant subgraph
//! and lowers the rest to GPU dispatches. BatchNormalization stays a node of its own with its four
//! parameter tensors, because adaptation updates them.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;

use crate::onnx::{self, DimSpec, OnnxError, RawModel};
use crate::ops::elementwise::BinaryKind;
use crate::ops::layout::LayoutOp;
use crate::ops::shape::ShapeOp;
use crate::ops::{Op, OpError, OpReason, Stage};
use crate::tensor::{DType, Tensor};

mod einsum;
mod layer_norm;
mod resize;
mod scatter;
pub mod split_weights;

/// A parsed node: one op, or the nodes of an op defined as a function of others.
enum Expansion {
    Op(Op),
    Nodes(Vec<Node>),
}

fn is_default_domain(n: &onnx::RawNode) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

/// Parses one node as the graph builder does (ops defined as functions, LayerNormalization,
/// included): why it is not supported, or nothing. For `acclimate info`, which lists every
/// unsupported node at once.
pub fn check_node(n: &onnx::RawNode, opset: i64) -> Result<(), OpReason> {
    parse_node(n, opset, &mut HashMap::new()).map(|_| ())
}

/// One node as an op, or as the nodes of its function body (LayerNormalization,
/// InstanceNormalization, GroupNormalization, Sum, Max, Min).
fn parse_node(n: &onnx::RawNode, opset: i64, inits: &mut HashMap<String, Arc<Tensor>>) -> Result<Expansion, OpReason> {
    if is_default_domain(n) {
        match n.op_type.as_str() {
            "LayerNormalization" => return layer_norm::expand(n, opset, inits).map(Expansion::Nodes),
            "Sum" => return layer_norm::expand_variadic(n, BinaryKind::Add).map(Expansion::Nodes),
            "Max" => return layer_norm::expand_variadic(n, BinaryKind::Max).map(Expansion::Nodes),
            "Min" => return layer_norm::expand_variadic(n, BinaryKind::Min).map(Expansion::Nodes),
            "InstanceNormalization" => {
                return layer_norm::expand_instance_norm(n, inits).map(Expansion::Nodes);
            }
            "GroupNormalization" => return layer_norm::expand_group_norm(n, opset, inits).map(Expansion::Nodes),
            "ReduceL2" | "ReduceSumSquare" => return layer_norm::expand_reduce_squares(n, opset).map(Expansion::Nodes),
            "Einsum" => return einsum::expand(n).map(Expansion::Nodes),
            "LRN" => return layer_norm::expand_lrn(n, inits).map(Expansion::Nodes),
            "Resize" | "Upsample" => return resize::expand(n, opset).map(Expansion::Nodes),
            // Other reductions (and bad attributes) go to the CPU-only op, which names them.
            "ScatterND" if crate::ops::Attrs::new(&n.attrs).string("reduction", "none").is_ok_and(|r| r == "none") => {
                crate::ops::Attrs::new(&n.attrs).only(&["reduction"])?;
                return scatter::expand_scatter_nd(n).map(Expansion::Nodes);
            }
            _ => {}
        }
    }
    Op::parse(n, opset).map(Expansion::Op)
}

/// Errors raised while building the IR from a decoded model.
#[derive(Debug, Error)]
pub enum IrError {
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// A node whose op, domain or attributes Acclimate does not support (at [`Stage::Parse`]).
    #[error(transparent)]
    UnsupportedOp(Box<OpError>),
    #[error("node '{node}' ({op}) reads '{input}', which no earlier node, graph input or initializer produces")]
    UndefinedInput { node: String, op: String, input: String },
    #[error("tensor '{name}' is produced twice (by node '{node}')")]
    DuplicateOutput { name: String, node: String },
    #[error("graph output '{0}' is never produced")]
    UndefinedOutput(String),
    #[error(
        "opset {0} is not supported (Acclimate reads opsets 7 to 25; opsets 22 to 25 only added element types to the supported ops)"
    )]
    Opset(i64),
    #[error("graph input '{name}' has element type {dtype}; only float32 inputs are supported")]
    InputDType { name: String, dtype: DType },
    #[error("graph input '{0}' has no tensor type or shape")]
    InputShape(String),
    #[error("the graph has no outputs")]
    NoOutputs,
}

/// One node of the graph.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    pub op: Op,
    /// Input tensor names; empty string for an omitted optional input.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// For the nodes an ONNX function op expands into (LayerNormalization), the part this one
    /// computes ("mean", ..., "y" last); `None` for a node of the model itself.
    pub part: Option<&'static str>,
}

/// A dimension of a graph input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    /// Symbolic or unknown; fixed when a plan is built for concrete input shapes.
    Dynamic(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Dynamic(s) if s.is_empty() => f.write_str("?"),
            Dim::Dynamic(s) => f.write_str(s),
        }
    }
}

/// A graph input or output with its declared shape.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Option<DType>,
    pub dims: Option<Vec<Dim>>,
}

impl TensorInfo {
    pub fn shape_string(&self) -> String {
        match &self.dims {
            Some(d) => format!("[{}]", d.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")),
            None => "[unknown]".into(),
        }
    }
}

/// A loaded model: nodes in execution order, constants, inputs and outputs.
#[derive(Clone, Debug)]
pub struct Graph {
    pub opset: i64,
    pub producer: String,
    pub nodes: Vec<Node>,
    pub initializers: HashMap<String, Arc<Tensor>>,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
}

/// One BatchNormalization layer and the names of its parameter tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormInfo {
    pub node: String,
    pub scale: String,
    pub bias: String,
    pub mean: String,
    pub var: String,
    pub channels: usize,
    pub epsilon: f32,
}

/// A LayerNormalization, GroupNormalization or InstanceNormalization layer whose scale (and
/// bias) are float32 initializers: the affine parameters gradient methods adapt besides
/// BatchNorm's (the harness's `collect_params`; SAR's LN/GN setting, tta-methods.md §1, §3).
#[derive(Clone, Debug, PartialEq)]
pub struct AffineNormInfo {
    /// The layer's node name in the model.
    pub node: String,
    /// Its op type; "GroupNormalization" also for the InstanceNormalization on a grouped view
    /// that `torch.onnx.export` writes for GroupNorm before opset 18.
    pub op_type: String,
    pub scale: String,
    pub bias: Option<String>,
}

/// BatchNormalization in training mode folds on the CPU ([`ShapeOp::BatchNormTraining`]): its X
/// must be a constant (an initializer, or computed from constants and shapes alone). On run-time
/// data it would normalise with batch statistics: refused when the model loads, naming the node.
fn check_training_batch_norms(
    nodes: &[Node],
    initializers: &HashMap<String, Arc<Tensor>>,
    opset: i64,
) -> Result<(), IrError> {
    let mut constant: HashSet<&str> = initializers.keys().map(String::as_str).collect();
    for n in nodes {
        let from_constants = n.inputs.iter().all(|i| i.is_empty() || constant.contains(i.as_str()));
        if matches!(n.op, Op::Shape(ShapeOp::BatchNormTraining { .. })) && !from_constants {
            let x = n.inputs.first().cloned().unwrap_or_default();
            return Err(IrError::UnsupportedOp(Box::new(OpError {
                op: n.op_type.clone(),
                node: n.name.clone(),
                opset,
                shapes: None,
                stage: Stage::Parse,
                reason: OpReason::Unsupported(format!(
                    "BatchNormalization with training_mode=1 normalises with batch statistics; it is supported only \
                     on constant inputs (weight standardisation, folded when the model loads), and '{x}' depends on \
                     the model input: export the model in inference mode"
                )),
            })));
        }
        if from_constants || matches!(n.op, Op::Shape(ShapeOp::Shape { .. })) {
            constant.extend(n.outputs.iter().map(String::as_str));
        }
    }
    Ok(())
}

fn dims_of(shape: &Option<Vec<DimSpec>>) -> Option<Vec<Dim>> {
    shape.as_ref().map(|d| {
        d.iter()
            .map(|x| match x {
                DimSpec::Fixed(n) => Dim::Fixed(*n as usize),
                DimSpec::Sym(s) => Dim::Dynamic(s.clone()),
                DimSpec::Unknown => Dim::Dynamic(String::new()),
            })
            .collect()
    })
}

impl Graph {
    /// `reason` as the failure of node `idx` at `stage`, with its input shapes.
    pub fn op_error(&self, idx: usize, stage: Stage, shapes: Vec<Vec<usize>>, reason: OpReason) -> OpError {
        let n = &self.nodes[idx];
        OpError { op: n.op_type.clone(), node: n.name.clone(), opset: self.opset, shapes: Some(shapes), stage, reason }
    }

    /// Reads, decodes and validates an ONNX file (external data resolved next to it).
    pub fn load(path: &Path) -> Result<Graph, IrError> {
        Graph::from_raw(onnx::load_model(path)?)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Graph, IrError> {
        Graph::from_raw(onnx::load_model_bytes(bytes, None)?)
    }

    /// Parses every node (an unsupported op fails here, naming op, node and opset) and checks that
    /// the graph is well formed.
    pub fn from_raw(raw: RawModel) -> Result<Graph, IrError> {
        let opset = raw.opset;
        if !(7..=25).contains(&opset) {
            return Err(IrError::Opset(opset));
        }
        let g = raw.graph;
        let mut initializers: HashMap<String, Arc<Tensor>> =
            g.initializers.into_iter().map(|(n, t)| (n, Arc::new(t))).collect();
        let mut defined: HashSet<String> = initializers.keys().cloned().collect();
        let mut inputs = Vec::new();
        for i in &g.inputs {
            if let Some(dt) = i.dtype
                && dt != DType::F32
            {
                return Err(IrError::InputDType { name: i.name.clone(), dtype: dt });
            }
            defined.insert(i.name.clone());
            inputs.push(TensorInfo { name: i.name.clone(), dtype: i.dtype, dims: dims_of(&i.shape) });
        }
        let mut nodes = Vec::with_capacity(g.nodes.len());
        for n in &g.nodes {
            let parsed = parse_node(n, opset, &mut initializers);
            let parsed = parsed.map_err(|reason| {
                IrError::UnsupportedOp(Box::new(OpError {
                    op: n.op_type.clone(),
                    node: n.name.clone(),
                    opset,
                    shapes: None,
                    stage: Stage::Parse,
                    reason,
                }))
            })?;
            for inp in &n.inputs {
                if !inp.is_empty() && !defined.contains(inp) {
                    return Err(IrError::UndefinedInput {
                        node: n.name.clone(),
                        op: n.op_type.clone(),
                        input: inp.clone(),
                    });
                }
            }
            for out in &n.outputs {
                if out.is_empty() {
                    continue;
                }
                if !defined.insert(out.clone()) {
                    return Err(IrError::DuplicateOutput { name: out.clone(), node: n.name.clone() });
                }
            }
            let op = match parsed {
                Expansion::Op(op) => op,
                Expansion::Nodes(parts) => {
                    nodes.extend(parts);
                    continue;
                }
            };
            // A Constant node is an initializer by another name (PaddlePaddle exports keep every
            // weight, BatchNorm parameters included, in Constant nodes): make it one, so weights
            // are uploaded once and BatchNorm layers stay adaptable.
            if let Op::Shape(ShapeOp::Constant(t)) = &op
                && let Some(out) = n.outputs.first()
                && !out.is_empty()
            {
                initializers.insert(out.clone(), Arc::new(t.clone()));
                continue;
            }
            // An Identity of an initializer is a copy of it: `torch.onnx.export` deduplicates
            // initializers with equal values (every BatchNorm of a freshly initialised network:
            // scale 1, bias 0, mean 0, variance 1) and gives each layer an Identity of the one it
            // kept. Each layer gets its own initializer back, so that it adapts on its own.
            if let Op::Layout(LayoutOp::Identity) = &op
                && let (Some(src), Some(out)) = (n.inputs.first(), n.outputs.first())
                && !out.is_empty()
                && !g.outputs.iter().any(|o| &o.name == out)
                && !inputs.iter().any(|i| &i.name == src)
                && let Some(t) = initializers.get(src).cloned()
            {
                initializers.insert(out.clone(), t);
                continue;
            }
            nodes.push(Node {
                name: n.name.clone(),
                op_type: n.op_type.clone(),
                op,
                inputs: n.inputs.clone(),
                outputs: n.outputs.clone(),
                part: None,
            });
        }
        check_training_batch_norms(&nodes, &initializers, opset)?;
        // Weights over one storage binding's guaranteed size, split across several Gemms.
        let nodes = split_weights::split_large_weights(nodes, &mut initializers);
        if g.outputs.is_empty() {
            return Err(IrError::NoOutputs);
        }
        let mut outputs = Vec::new();
        for o in &g.outputs {
            if !defined.contains(&o.name) {
                return Err(IrError::UndefinedOutput(o.name.clone()));
            }
            outputs.push(TensorInfo { name: o.name.clone(), dtype: o.dtype, dims: dims_of(&o.shape) });
        }
        Ok(Graph { opset, producer: raw.producer, nodes, initializers, inputs, outputs })
    }

    /// The BatchNormalization layers whose four parameters are initializers (the adaptable ones).
    pub fn batch_norms(&self) -> Vec<BatchNormInfo> {
        let mut out = Vec::new();
        for n in &self.nodes {
            if let Op::BatchNorm(a) = &n.op {
                let get = |i: usize| n.inputs.get(i).filter(|s| self.initializers.contains_key(*s)).cloned();
                if let (Some(scale), Some(bias), Some(mean), Some(var)) = (get(1), get(2), get(3), get(4)) {
                    let channels = self.initializers[&scale].numel();
                    out.push(BatchNormInfo {
                        node: n.name.clone(),
                        scale,
                        bias,
                        mean,
                        var,
                        channels,
                        epsilon: a.epsilon,
                    });
                }
            }
        }
        out
    }

    /// The normalization layers other than BatchNormalization whose affine parameters are
    /// initializers, in model order ([`AffineNormInfo`]). LayerNormalization's are the scale and
    /// bias of its expansion's last Mul and Add; InstanceNormalization's and
    /// GroupNormalization's (opset 21) the [C] inputs its expansion views as [C, 1, …]. The
    /// GroupNorm that `torch.onnx.export` writes before opset 18 — Reshape to [N, groups, -1],
    /// InstanceNormalization with constant unit scale and zero bias, Reshape back, Mul by the
    /// weight and Add the bias — is found as one layer with the Mul's and the Add's initializers
    /// (the module's weight and bias), not the InstanceNormalization's constants.
    pub fn affine_norms(&self) -> Vec<AffineNormInfo> {
        let f32_init = |s: &str| self.initializers.get(s).is_some_and(|t| t.dtype == DType::F32);
        let only_consumer = |t: &str| {
            let mut c = self.nodes.iter().filter(|n| n.inputs.iter().any(|i| i == t));
            match (c.next(), c.next()) {
                (Some(n), None) => Some(n),
                _ => None,
            }
        };
        // The other input of a binary node with an f32 initializer on one side and `x` on the other.
        let param_of = |n: &Node, op: &str, x: &str| -> Option<String> {
            if n.op_type != op || n.part.is_some() || n.inputs.len() != 2 {
                return None;
            }
            match (n.inputs[0].as_str(), n.inputs[1].as_str()) {
                (a, p) | (p, a) if a == x && f32_init(p) => Some(p.to_string()),
                _ => None,
            }
        };
        let mut out: Vec<AffineNormInfo> = Vec::new();
        for n in &self.nodes {
            let Some(part) = n.part else { continue };
            let op_type = n.op_type.as_str();
            if !matches!(op_type, "LayerNormalization" | "InstanceNormalization" | "GroupNormalization") {
                continue;
            }
            let layer = n.name.strip_suffix(&format!("/{part}")).unwrap_or(&n.name).to_string();
            let param = match (op_type, part, n.inputs.as_slice()) {
                ("LayerNormalization", "scaled", [_, p]) => Some((true, p)),
                ("LayerNormalization", "y", [_, p]) => Some((matches!(n.op, Op::Binary(BinaryKind::Mul)), p)),
                (_, "scale", [p, _]) => Some((true, p)),
                (_, "bias", [p, _]) => Some((false, p)),
                _ => None,
            };
            let Some((is_scale, p)) = param.filter(|(_, p)| f32_init(p)) else { continue };
            let i = match out.iter().position(|a| a.node == layer) {
                Some(i) => i,
                None => {
                    out.push(AffineNormInfo {
                        node: layer,
                        op_type: op_type.to_string(),
                        scale: String::new(),
                        bias: None,
                    });
                    out.len() - 1
                }
            };
            if is_scale {
                out[i].scale = p.clone();
            } else {
                out[i].bias = Some(p.clone());
            }
        }
        out.retain(|a| !a.scale.is_empty());
        // torch's GroupNorm before opset 18: the module's parameters follow the Reshape back.
        for a in &mut out {
            if a.op_type != "InstanceNormalization" {
                continue;
            }
            let y = self.nodes.iter().find(|n| n.part == Some("y") && n.name == format!("{}/y", a.node));
            let x = self.nodes.iter().find(|n| n.part == Some("mean") && n.name == format!("{}/mean", a.node));
            let grouped = x.and_then(|m| self.nodes.iter().find(|n| n.outputs.first() == m.inputs.first()));
            if grouped.is_none_or(|g| g.op_type != "Reshape") {
                continue;
            }
            let found = y.and_then(|y| {
                let back = only_consumer(&y.outputs[0]).filter(|n| n.op_type == "Reshape" && n.part.is_none())?;
                let mul = only_consumer(&back.outputs[0])?;
                let w = param_of(mul, "Mul", &back.outputs[0])?;
                let add = only_consumer(&mul.outputs[0])?;
                let b = param_of(add, "Add", &mul.outputs[0])?;
                Some((w, b))
            });
            if let Some((w, b)) = found {
                a.op_type = "GroupNormalization".into();
                a.scale = w;
                a.bias = Some(b);
            }
        }
        out
    }

    /// The Softmax (not LogSoftmax) whose output is the graph's first output, through Identity
    /// and Dropout nodes, and the name of its input: a classifier that puts out probabilities
    /// ([`crate::ops::softmax::SoftmaxAttrs::normalises_rows`] says whether it normalises each
    /// sample's classes, given the input's shape).
    pub fn softmax_head(&self) -> Option<(&Node, &str)> {
        let mut name = self.outputs.first()?.name.as_str();
        for _ in 0..self.nodes.len() {
            let node = self.nodes.iter().find(|n| n.outputs.first().map(String::as_str) == Some(name))?;
            match (&node.op, node.op_type.as_str()) {
                (Op::Softmax(a), _) if !a.log => return node.inputs.first().map(|i| (node, i.as_str())),
                (_, "Identity" | "Dropout") => name = node.inputs.first()?.as_str(),
                _ => return None,
            }
        }
        None
    }

    /// Histogram of op types, in order of first appearance.
    pub fn op_histogram(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = Vec::new();
        // An expanded op counts once, by its last part.
        for n in self.nodes.iter().filter(|n| n.part.is_none_or(|p| p == "y")) {
            match out.iter_mut().find(|(k, _)| *k == n.op_type) {
                Some((_, c)) => *c += 1,
                None => out.push((n.op_type.clone(), 1)),
            }
        }
        out
    }

    /// Number of parameters (weights) held as initializers.
    pub fn parameter_count(&self) -> usize {
        self.initializers.values().map(|t| t.numel()).sum()
    }
}
