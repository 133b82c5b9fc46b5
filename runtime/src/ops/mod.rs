//! Operators: one module per op family, each next to its WGSL file in `shaders/`.
//!
//! A family module owns, for its ops: attribute parsing (at load time, so an unsupported attribute
//! is a load error), shape inference, CPU evaluation where the op can appear in a constant
//! subgraph (shape arithmetic exported by PyTorch), and lowering to GPU dispatches.
//!
//! | family | ops | shader |
//! |---|---|---|
//! | [`elementwise`] | Relu, LeakyRelu, PRelu, Clip, Sigmoid, HardSigmoid, HardSwish, Log, Exp, Tanh, Neg, Abs, Sqrt, Erf, Gelu, Softplus, Softsign, Elu, Selu, Reciprocal, Mish, Add, Sub, Mul, Div, Pow | `elementwise.wgsl` |
//! | [`conv`] | Conv (implicit GEMM, 1×1 via matmul, direct depthwise) | `conv.wgsl` |
//! | [`matmul`] | Gemm, MatMul | `matmul.wgsl` |
//! | [`norm`] | BatchNormalization | `norm.wgsl` |
//! | [`pool`] | MaxPool, AveragePool, GlobalAveragePool | `pool.wgsl` |
//! | [`reduce`] | ReduceMean, ReduceSum, ReduceMax, ReduceMin, GlobalMaxPool | `reduce.wgsl` |
//! | [`resize`] | Resize, Upsample (interpolation matrices for the IR's MatMuls: `ir/resize.rs`) | none |
//! | [`softmax`] | Softmax, LogSoftmax | `softmax.wgsl` |
//! | [`layout`] | Reshape, Flatten, Squeeze, Unsqueeze, Identity, Dropout (aliases); Transpose, Concat, Split, Slice, Pad | `layout.wgsl` |
//! | [`shape`] | Constant, Shape, Gather, ConstantOfShape, Cast, Range (folded on the CPU, never run on the GPU) | none |

pub mod attrs;
pub mod conv;
pub mod elementwise;
pub mod flops;
pub mod layout;
pub mod matmul;
pub mod norm;
pub mod pool;
pub mod reduce;
pub mod resize;
pub mod shape;
pub mod softmax;

use std::sync::Arc;

use thiserror::Error;

use crate::gpu::{KernelKey, Params};
use crate::onnx::RawNode;
use crate::tensor::{DType, Tensor};
pub use attrs::Attrs;

/// Why an op could not be parsed, inferred, evaluated or lowered. An op does not know its node:
/// the ir and plan layers wrap the reason into an [`OpError`] naming op, node, opset and shapes.
pub type OpResult<T> = Result<T, OpReason>;

/// What an op found wrong. Variants with a `String` hold a sentence naming the attribute, input,
/// shape or value at fault; their variant says which kind of fault it is.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum OpReason {
    /// The op type is not one Acclimate implements.
    #[error("unsupported op type {0}")]
    UnknownOp(String),
    #[error("op {op} from domain '{domain}' is not supported")]
    Domain { op: String, domain: String },
    /// An attribute of another ONNX type than the op's definition gives it.
    #[error("attribute '{name}' should be {expected}, found {found}")]
    AttributeType { name: String, expected: &'static str, found: &'static str },
    /// An attribute the op's definition has but Acclimate does not implement, or one it lacks.
    #[error("attribute '{0}' is not supported")]
    UnknownAttribute(String),
    /// A required attribute is absent.
    #[error("{op} needs the '{name}' attribute")]
    MissingAttribute { op: &'static str, name: &'static str },
    /// An attribute value outside what ONNX or Acclimate accepts.
    #[error("{0}")]
    Attribute(String),
    /// A required input is absent (`what` names its role, as the ONNX definition does).
    #[error("missing input {index} ({what})")]
    MissingInput { index: usize, what: String },
    #[error("missing output {0}")]
    MissingOutput(usize),
    /// An input name that no earlier node, graph input or initializer defines.
    #[error("input '{0}' is not defined")]
    UndefinedInput(String),
    /// An attribute-like input (shape, axes, pads, ...) that depends on the model input.
    #[error("{what} must be a constant (an initializer or computable from shapes)")]
    NotConstant { what: String },
    #[error("axis {axis} is out of range for rank {rank}")]
    Axis { axis: i64, rank: usize },
    #[error("shapes {a:?} and {b:?} do not broadcast")]
    Broadcast { a: Vec<usize>, b: Vec<usize> },
    #[error("rank {0} exceeds the supported maximum of {MAX_RANK}")]
    Rank(usize),
    /// Input shapes (or ranks) the op's definition does not accept.
    #[error("{0}")]
    Shape(String),
    /// An element type the op does not accept, or that cannot run where it would.
    #[error("{0}")]
    DType(String),
    /// Valid ONNX outside what Acclimate implements (a mode, an optional output, training mode).
    #[error("{0}")]
    Unsupported(String),
    /// A size beyond the kernels' 32-bit indexing, the rank they handle, or the folding limit.
    #[error("{0}")]
    TooLarge(String),
    /// A value of a constant subgraph the op cannot compute with (division by zero, index out of
    /// range, an empty Range).
    #[error("{0}")]
    Value(String),
    /// The planner and the op disagree (a gradient buffer of the wrong shape, a shape op left
    /// unfolded): a bug in Acclimate, not in the model.
    #[error("{0}")]
    Internal(String),
}

/// Where in the pipeline an op failed; it chooses the message's wording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Parsing the node at load time ([`Op::parse`]): the op is not supported as written.
    Parse,
    /// Shape inference, constant folding and specialisation to concrete input shapes.
    Infer,
    /// Lowering the forward pass to dispatches.
    Lower,
    /// Lowering the reverse pass of an adaptation step.
    Backward,
}

/// An op's failure at one node of a graph.
#[derive(Clone, Debug, PartialEq, Error)]
#[error("{}", self.describe())]
pub struct OpError {
    /// The ONNX op type (`Conv`, `Reshape`, ...).
    pub op: String,
    /// The node's name.
    pub node: String,
    /// The model's default-domain opset.
    pub opset: i64,
    /// The shapes of the node's inputs (an empty shape for an absent or unknown input); `None`
    /// at [`Stage::Parse`], before any shape is known.
    pub shapes: Option<Vec<Vec<usize>>>,
    pub stage: Stage,
    pub reason: OpReason,
}

impl OpError {
    fn describe(&self) -> String {
        let OpError { op, node, opset, shapes, stage, reason } = self;
        match (stage, shapes) {
            (Stage::Parse, _) | (_, None) => format!("unsupported op {op} (node '{node}', opset {opset}): {reason}"),
            (Stage::Backward, Some(shapes)) => {
                format!("node '{node}' ({op}) with input shapes {shapes:?}: reverse pass: {reason}")
            }
            (_, Some(shapes)) => format!("node '{node}' ({op}) with input shapes {shapes:?}: {reason}"),
        }
    }

    /// Whether the failure is Acclimate's own (planner and op disagree) rather than the model's.
    pub fn is_internal(&self) -> bool {
        matches!(self.reason, OpReason::Internal(_))
    }
}

/// A parsed operator with validated attributes.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Unary(elementwise::Unary),
    /// Clip from opset 11 on, where min and max are optional constant inputs.
    ClipInputs,
    Binary(elementwise::BinaryKind),
    Conv(conv::ConvAttrs),
    Gemm(matmul::GemmAttrs),
    MatMul,
    BatchNorm(norm::BatchNormAttrs),
    Pool(pool::PoolAttrs),
    GlobalAveragePool,
    ReduceMean(reduce::ReduceMeanAttrs),
    Softmax(softmax::SoftmaxAttrs),
    Layout(layout::LayoutOp),
    Shape(shape::ShapeOp),
    /// ScatterND (reduction none) on run-time data with constant positions
    /// ([`shape::ShapeOp::ScatterPositions`]): the IR's expansion of ScatterND.
    Scatter,
}

/// Ops that exist only for their dropped output or are pure metadata still need a name in errors.
impl Op {
    /// Parses a node. Unknown op types and unsupported attribute values are errors here, at load time.
    pub fn parse(node: &RawNode, opset: i64) -> OpResult<Op> {
        let a = Attrs::new(&node.attrs);
        // Omitted optional outputs are written as "": they do not count as declared.
        let outputs = node.outputs.iter().filter(|o| !o.is_empty()).count();
        let op = match node.op_type.as_str() {
            "Relu" | "LeakyRelu" | "Sigmoid" | "HardSigmoid" | "HardSwish" | "Log" | "Exp" | "Tanh" | "Neg" | "Abs"
            | "Sqrt" | "Erf" | "Gelu" | "Softplus" | "Softsign" | "Elu" | "Selu" | "Reciprocal" | "Mish" => {
                Op::Unary(elementwise::Unary::parse(&node.op_type, &a)?)
            }
            "Clip" if opset < 11 => Op::Unary(elementwise::Unary::parse("Clip", &a)?),
            "Clip" => Op::ClipInputs,
            "Add" | "Sub" | "Mul" | "Div" | "Pow" | "PRelu" => {
                Op::Binary(elementwise::BinaryKind::parse(&node.op_type)?)
            }
            "Conv" => Op::Conv(conv::ConvAttrs::parse(&a)?),
            "Gemm" => Op::Gemm(matmul::GemmAttrs::parse(&a)?),
            "MatMul" => Op::MatMul,
            // Training mode on constant data (BiT's weight standardisation) folds on the CPU.
            "BatchNormalization" if opset >= 14 && a.int("training_mode", 0)? == 1 => {
                a.only(&["epsilon", "momentum", "training_mode"])?;
                let (epsilon, momentum) = (a.float("epsilon", 1e-5)?, a.float("momentum", 0.9)?);
                if !(epsilon.is_finite() && epsilon >= 0.0 && momentum.is_finite()) {
                    return Err(OpReason::Attribute(format!(
                        "BatchNormalization epsilon {epsilon}, momentum {momentum}: must be finite, epsilon >= 0"
                    )));
                }
                Op::Shape(shape::ShapeOp::BatchNormTraining { epsilon, momentum })
            }
            "BatchNormalization" => Op::BatchNorm(norm::BatchNormAttrs::parse(&a, outputs)?),
            "MaxPool" | "AveragePool" => Op::Pool(pool::PoolAttrs::parse(&node.op_type, &a, outputs)?),
            "GlobalAveragePool" => Op::GlobalAveragePool,
            "ReduceMean" => Op::ReduceMean(reduce::ReduceMeanAttrs::parse(&a, opset)?),
            "ReduceSum" => Op::ReduceMean(reduce::ReduceMeanAttrs::parse_sum(&a, opset >= 13)?),
            "ReduceMax" => Op::ReduceMean(reduce::ReduceMeanAttrs::parse_extreme(&a, opset, reduce::Extreme::Max)?),
            "ReduceMin" => Op::ReduceMean(reduce::ReduceMeanAttrs::parse_extreme(&a, opset, reduce::Extreme::Min)?),
            "GlobalMaxPool" => {
                a.only(&[])?;
                Op::ReduceMean(reduce::ReduceMeanAttrs::global_max())
            }
            "Softmax" | "LogSoftmax" => Op::Softmax(softmax::SoftmaxAttrs::parse(&node.op_type, &a, opset)?),
            "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" | "Identity" | "Dropout" | "Transpose" | "Concat"
            | "Split" | "Slice" | "Pad" | "Expand" | "Tile" => {
                Op::Layout(layout::LayoutOp::parse(&node.op_type, &a, opset, node)?)
            }
            "Constant" | "Shape" | "Gather" | "ConstantOfShape" | "Cast" | "Range" | "Equal" | "Where" | "Mod"
            | "Not" | "ScatterND" | "Sin" | "Cos" | "Floor" | "Ceil" | "Round" | "CumSum" => {
                match shape::ShapeOp::parse(&node.op_type, &a, opset)? {
                    // A cast to float32 is the identity on the GPU's float32 tensors (`x.float()`
                    // in a model's forward), and a real conversion when folded on the CPU.
                    shape::ShapeOp::Cast { to: DType::F32 } => Op::Layout(layout::LayoutOp::CastToFloat),
                    s => Op::Shape(s),
                }
            }
            other => return Err(OpReason::UnknownOp(other.to_owned())),
        };
        if !(node.domain.is_empty() || node.domain == "ai.onnx") {
            return Err(OpReason::Domain { op: node.op_type.clone(), domain: node.domain.clone() });
        }
        Ok(op)
    }

    /// Output shapes and element types from the input shapes (and constant input values).
    pub fn infer(&self, inputs: &[Option<Input<'_>>]) -> OpResult<Vec<(Vec<usize>, DType)>> {
        match self {
            Op::Unary(_) | Op::ClipInputs => elementwise::infer_unary(inputs),
            Op::Binary(k) => elementwise::infer_binary(*k, inputs),
            Op::Conv(a) => conv::infer(a, inputs),
            Op::Gemm(a) => matmul::infer_gemm(a, inputs),
            Op::MatMul => matmul::infer_matmul(inputs),
            Op::BatchNorm(a) => norm::infer(a, inputs),
            Op::Pool(a) => pool::infer(a, inputs),
            Op::GlobalAveragePool => pool::infer_global(inputs),
            Op::ReduceMean(a) => reduce::infer(a, inputs),
            Op::Softmax(a) => softmax::infer(a, inputs),
            Op::Layout(l) => l.infer(inputs),
            Op::Shape(s) => s.infer(inputs),
            Op::Scatter => layout::infer_scatter(inputs),
        }
    }

    /// Evaluates the op on the CPU when all its inputs are constant. `None` means this op is only
    /// computed on the GPU (its constant inputs are uploaded instead).
    pub fn eval(&self, inputs: &[Option<&Tensor>]) -> Option<OpResult<Vec<Tensor>>> {
        match self {
            Op::Unary(u) => Some(elementwise::eval_unary(u, inputs)),
            Op::ClipInputs => Some(elementwise::eval_clip_inputs(inputs)),
            Op::Binary(k) => Some(elementwise::eval_binary(*k, inputs)),
            Op::Layout(l) => Some(l.eval(inputs)),
            Op::Shape(s) => Some(s.eval(inputs)),
            Op::ReduceMean(a) => Some(reduce::eval(a, inputs)),
            Op::Scatter => Some(layout::eval_scatter(inputs)),
            _ => None,
        }
    }

    /// Whether output 0 is a view of input 0's buffer (same bytes, new shape): no dispatch at all.
    pub fn is_alias(&self) -> bool {
        matches!(self, Op::Layout(l) if l.is_alias())
    }

    /// Whether the op can only run as part of a constant subgraph (shape arithmetic).
    pub fn cpu_only(&self) -> bool {
        matches!(self, Op::Shape(s) if !matches!(s, shape::ShapeOp::Gather { .. }))
    }

    /// Appends the GPU dispatches computing the outputs.
    pub fn lower(&self, l: &mut Lowering) -> OpResult<()> {
        match self {
            Op::Unary(u) => elementwise::lower_unary(u, l),
            Op::ClipInputs => elementwise::lower_clip_inputs(l),
            Op::Binary(k) => elementwise::lower_binary(*k, l),
            Op::Conv(a) => conv::lower(a, l),
            Op::Gemm(a) => matmul::lower_gemm(a, l),
            Op::MatMul => matmul::lower_matmul(l),
            Op::BatchNorm(a) => norm::lower(a, l),
            Op::Pool(a) => pool::lower(a, l),
            Op::GlobalAveragePool => pool::lower_global(l),
            Op::ReduceMean(a) => reduce::lower(a, l),
            Op::Softmax(a) => softmax::lower(a, l),
            Op::Layout(op) => op.lower(l),
            Op::Scatter => layout::lower_scatter(l),
            // Gather of run-time data by constant indices runs as strided copies.
            Op::Shape(shape::ShapeOp::Gather { axis }) => layout::lower_gather(*axis, l),
            Op::Shape(_) => Err(OpReason::Internal("shape ops must be folded to constants before lowering".into())),
        }
    }
}

/// An input as shape inference sees it.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub shape: &'a [usize],
    pub dtype: DType,
    /// The value, when the input is a constant (an initializer or a folded subgraph).
    pub value: Option<&'a Tensor>,
}

impl<'a> Input<'a> {
    /// The constant value of an attribute-like input (Reshape's shape, Slice's starts, ...).
    pub fn constant(&self, what: &str) -> OpResult<&'a Tensor> {
        self.value.ok_or_else(|| OpReason::NotConstant { what: what.to_owned() })
    }
}

/// The `i`th input, or an error naming it when it is missing.
pub fn required<'b, 'a>(inputs: &'b [Option<Input<'a>>], i: usize, what: &str) -> OpResult<&'b Input<'a>> {
    inputs.get(i).and_then(|x| x.as_ref()).ok_or_else(|| OpReason::MissingInput { index: i, what: what.to_owned() })
}

/// A buffer a dispatch binds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BufRef {
    /// An activation, graph input or graph output (index into the plan's values).
    Value(usize),
    /// A constant uploaded once (weights, BN parameters, folded constants).
    Weight(usize),
    /// A temporary private to one node's dispatches (index into the node's scratch requests).
    Scratch(usize),
}

/// One tensor as the lowering sees it: its buffer, shape and (for constants) value.
#[derive(Clone, Debug)]
pub struct Operand {
    pub buf: BufRef,
    pub shape: Vec<usize>,
    pub value: Option<Arc<Tensor>>,
}

impl Operand {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One compute dispatch. Binding 0 is the uniform `params`; bindings 1.. are the storage buffers
/// in `buffers` order (declared `read` or `read_write` by the WGSL).
#[derive(Clone, Debug)]
pub struct Dispatch {
    pub key: KernelKey,
    pub params: Params,
    pub buffers: Vec<BufRef>,
    pub workgroups: [u32; 3],
}

/// The lowering context of one node.
#[derive(Debug)]
pub struct Lowering {
    pub node: String,
    pub inputs: Vec<Option<Operand>>,
    pub outputs: Vec<Operand>,
    pub dispatches: Vec<Dispatch>,
    /// Sizes in bytes of the node's scratch buffers ([`BufRef::Scratch`] indexes this).
    pub scratch: Vec<u64>,
    /// Device limits that select kernel variants.
    pub max_workgroup_storage: u32,
    pub max_invocations: u32,
    /// The context runs the kernels' CPU variants ([`crate::gpu::GpuContext::cpu_kernels`]):
    /// those with a grid of their own are picked here.
    pub cpu_kernels: bool,
}

impl Lowering {
    pub fn input(&self, i: usize, what: &str) -> OpResult<&Operand> {
        self.inputs
            .get(i)
            .and_then(|x| x.as_ref())
            .ok_or_else(|| OpReason::MissingInput { index: i, what: what.to_owned() })
    }

    pub fn output(&self, i: usize) -> OpResult<&Operand> {
        self.outputs.get(i).ok_or(OpReason::MissingOutput(i))
    }

    /// Requests a scratch buffer of `bytes` bytes for this node's dispatches.
    pub fn scratch(&mut self, bytes: u64) -> BufRef {
        self.scratch.push(bytes.max(4));
        BufRef::Scratch(self.scratch.len() - 1)
    }

    pub fn dispatch(&mut self, key: KernelKey, params: Params, buffers: Vec<BufRef>, workgroups: [u32; 3]) {
        self.dispatches.push(Dispatch { key, params, buffers, workgroups });
    }
}

/// Numpy-style multidirectional broadcasting of two shapes.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> OpResult<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(OpReason::Broadcast { a: a.to_vec(), b: b.to_vec() }),
        };
    }
    Ok(out)
}

/// Row-major strides of `shape` as seen from an output of shape `out` (right-aligned), with
/// stride 0 on broadcast dimensions.
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; out.len()];
    let mut s = 1;
    for i in (0..shape.len()).rev() {
        let o = i + out.len() - shape.len();
        strides[o] = if shape[i] == 1 && out[o] != 1 { 0 } else { s };
        s *= shape[i];
    }
    strides
}

/// Row-major strides of a contiguous tensor.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// Normalises a possibly negative axis against `rank`.
pub fn norm_axis(axis: i64, rank: usize) -> OpResult<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) {
        return Err(OpReason::Axis { axis, rank });
    }
    Ok(a as usize)
}

/// The single f32 output of a same-shape op.
pub fn f32_out(shape: Vec<usize>) -> Vec<(Vec<usize>, DType)> {
    vec![(shape, DType::F32)]
}

/// Largest tensor rank the strided kernels handle.
pub const MAX_RANK: usize = 8;

pub fn check_rank(shape: &[usize]) -> OpResult<()> {
    if shape.len() > MAX_RANK {
        return Err(OpReason::Rank(shape.len()));
    }
    Ok(())
}

pub fn u32s(v: &[usize]) -> Vec<u32> {
    v.iter().map(|&x| x as u32).collect()
}

// ------------------------------------------------------------------------------------------------
// Reverse pass
// ------------------------------------------------------------------------------------------------

/// A gradient an op's backward must produce for one of its inputs.
#[derive(Clone, Debug)]
pub struct GradInput {
    pub buf: BufRef,
    pub shape: Vec<usize>,
    /// When set, add into the buffer (the tensor fans out and another consumer's gradient is
    /// already there); otherwise overwrite it.
    pub accumulate: bool,
}

/// The reverse-pass lowering context of one node: the forward operands (kept alive for it when
/// [`Op::backward_saves`] asks), the gradients of its outputs, and the input gradients wanted.
///
/// Frozen weights never get gradients: `grad_inputs[i]` is `None` for every input that does not
/// depend on an adapted parameter. Parameters a family adapts itself (BatchNormalization's scale
/// and bias) are handled by that family's own training lowering, not here.
#[derive(Debug)]
pub struct BackwardLowering {
    pub node: String,
    pub inputs: Vec<Option<Operand>>,
    pub outputs: Vec<Operand>,
    /// dL/dY per output; `None` when no gradient flows into that output.
    pub grad_outputs: Vec<Option<Operand>>,
    /// dL/dX to produce per input; `None` when not needed.
    pub grad_inputs: Vec<Option<GradInput>>,
    pub dispatches: Vec<Dispatch>,
    pub scratch: Vec<u64>,
    pub max_workgroup_storage: u32,
    pub max_invocations: u32,
    /// As [`Lowering::cpu_kernels`].
    pub cpu_kernels: bool,
}

impl BackwardLowering {
    pub fn input(&self, i: usize, what: &str) -> OpResult<&Operand> {
        self.inputs
            .get(i)
            .and_then(|x| x.as_ref())
            .ok_or_else(|| OpReason::MissingInput { index: i, what: what.to_owned() })
    }

    pub fn output(&self, i: usize) -> OpResult<&Operand> {
        self.outputs.get(i).ok_or(OpReason::MissingOutput(i))
    }

    /// dL/dY of output `i` (an error if none flows: the planner only calls backward when one does).
    pub fn grad_output(&self, i: usize) -> OpResult<&Operand> {
        self.grad_outputs
            .get(i)
            .and_then(|x| x.as_ref())
            .ok_or_else(|| OpReason::Internal(format!("no gradient for output {i}")))
    }

    /// The gradient wanted for input `i`, if any.
    pub fn grad_input(&self, i: usize) -> Option<&GradInput> {
        self.grad_inputs.get(i).and_then(|x| x.as_ref())
    }

    pub fn scratch(&mut self, bytes: u64) -> BufRef {
        self.scratch.push(bytes.max(4));
        BufRef::Scratch(self.scratch.len() - 1)
    }

    pub fn dispatch(&mut self, key: KernelKey, params: Params, buffers: Vec<BufRef>, workgroups: [u32; 3]) {
        self.dispatches.push(Dispatch { key, params, buffers, workgroups });
    }
}

/// Which forward tensors an op's backward reads (and so must outlive the forward pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Saves {
    pub inputs: bool,
    pub outputs: bool,
}

impl Op {
    /// What the backward of this op reads from the forward pass. Keeping only these alive is what
    /// bounds the memory of an adaptation step.
    pub fn backward_saves(&self) -> Saves {
        let (inputs, outputs) = match self {
            // Activations read their input (x < 0, clamp bounds, x for hard-swish/leaky) or output.
            Op::Unary(u) => elementwise::unary_backward_saves(u),
            // Clip's gradient is read off its output (strictly inside the bounds, as hardtanh).
            Op::ClipInputs => (false, true),
            // Products and quotients need both operands; sums need neither.
            Op::Binary(k) => (elementwise::binary_backward_needs_inputs(*k), false),
            // Data gradients through frozen weights: the weights are constants, always resident.
            Op::Conv(_) | Op::Gemm(_) | Op::MatMul => (true, false),
            Op::BatchNorm(_) => (true, false),
            // MaxPool finds each window's first maximum again from X; AveragePool needs nothing.
            Op::Pool(p) => (p.max, false),
            Op::GlobalAveragePool => (false, false),
            // Max and min find their extreme again from X; a sum needs nothing.
            Op::ReduceMean(r) => (r.extreme.is_some(), false),
            Op::Softmax(_) => (false, true),
            Op::Layout(_) | Op::Scatter => (false, false),
            Op::Shape(_) => (false, false),
        };
        Saves { inputs, outputs }
    }

    /// Appends the dispatches of this op's reverse pass.
    pub fn lower_backward(&self, b: &mut BackwardLowering) -> OpResult<()> {
        match self {
            Op::Unary(u) => elementwise::backward_unary(u, b),
            Op::ClipInputs => elementwise::backward_clip_inputs(b),
            Op::Binary(k) => elementwise::backward_binary(*k, b),
            Op::Conv(a) => conv::backward(a, b),
            Op::Gemm(a) => matmul::backward_gemm(a, b),
            Op::MatMul => matmul::backward_matmul(b),
            Op::BatchNorm(_) => {
                Err(OpReason::Internal("BatchNormalization's reverse pass belongs to the training lowering".into()))
            }
            Op::Pool(a) => pool::backward(a, b),
            Op::GlobalAveragePool => pool::backward_global(b),
            Op::ReduceMean(a) => reduce::backward(a, b),
            Op::Softmax(a) => softmax::backward(a, b),
            Op::Layout(l) => l.backward(b),
            Op::Scatter => layout::backward_scatter(b),
            Op::Shape(shape::ShapeOp::Gather { axis }) => layout::backward_gather(*axis, b),
            Op::Shape(_) => Err(OpReason::Internal("shape arithmetic carries no gradient".into())),
        }
    }
}
