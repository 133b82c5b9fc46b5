//! Execution plans: a specialised graph lowered to dispatches, with buffers assigned.
//!
//! A plan is built once per set of input shapes and cached by the [`crate::Engine`]. Building it:
//! 1. `specialize` fixes every shape and folds constant subgraphs;
//! 2. [`lower_forward`] lowers each remaining node to dispatches of its op family, into a
//!    [`Program`] (values, weights, items). Where the hook allows it ([`LowerHook::fusable`]: the
//!    engine's inference plans, forward-only adaptation programs without an output stage), a
//!    Conv whose output only a BatchNormalization (left to the inference kernel, constant
//!    parameters) reads, and whose result only a Relu or Clip with constant bounds reads, takes
//!    them into its write-out ([`crate::ops::conv::Tail`]): one pass over the tensor instead of
//!    three, and the BatchNormalization's parameters still read from their buffers on every run;
//!    the intermediate tensors then have no buffer;
//! 3. [`Compiled::compile`] assigns buffers by lifetime (aliases share storage; a buffer returns to
//!    a pool after its last reader) and creates the parameter buffer and bind groups up front.
//!
//! Running it is then: write the inputs, record every dispatch into one compute pass of one
//! command encoder, copy the outputs to staging buffers, submit once, read back.

pub mod profile;
pub mod program;
pub mod specialize;
pub mod standalone;

use std::collections::HashMap;
use std::sync::Arc;

use thiserror::Error;

use crate::gpu::{GpuContext, GpuError};
use crate::ir::Graph;
use crate::ops::conv::{Tail, TailAct};
use crate::ops::elementwise::Unary;
use crate::ops::flops::FlopCount;
use crate::ops::{BufRef, Lowering, Op, OpError, OpReason, OpResult, Operand, Stage};
use crate::tensor::Tensor;
pub use program::{Compiled, Item, Program, WeightDecl, WeightInit, WeightStore};
pub use specialize::{Specialized, specialize};

/// Errors raised while building or running a plan.
#[derive(Debug, Error)]
pub enum PlanError {
    /// An op failed at one node while specialising or lowering the graph.
    #[error(transparent)]
    Node(Box<OpError>),
    #[error("the model takes {expected} input(s), {got} given")]
    InputCount { expected: usize, got: usize },
    #[error("input '{name}' should have shape {expected}, got {got:?}")]
    InputShape { name: String, expected: String, got: Vec<usize> },
    #[error("input '{name}' is {dtype}; the model takes float32")]
    InputDType { name: String, dtype: crate::tensor::DType },
    #[error(
        "input '{name}' of shape {shape:?} contains {count} NaN or infinite value(s) (first at flat index {first}); \
         refused: non-finite inputs run only when asked for (Engine::set_non_finite_inputs(NonFinite::Propagate), \
         `acclimate run --non-finite propagate`), with ONNX Runtime's NaN semantics"
    )]
    NonFiniteInput { name: String, shape: Vec<usize>, count: usize, first: usize },
    #[error("input '{name}': {len} values do not fill shape {shape:?}")]
    InputData { name: String, shape: Vec<usize>, len: usize },
    #[error("plan: {0}")]
    Program(String),
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

/// A node lowered into the forward part of a program.
#[derive(Clone, Debug)]
pub struct LoweredNode {
    pub node: usize,
    /// Index of the node's item in the program (`None` for views, which have none).
    pub item: Option<usize>,
    pub inputs: Vec<Option<Operand>>,
    pub outputs: Vec<Operand>,
}

/// The forward part of a program.
#[derive(Clone, Debug)]
pub struct Forward {
    pub spec: Specialized,
    /// Value id of every run-time tensor, by name.
    pub value_of: HashMap<String, usize>,
    pub nodes: Vec<LoweredNode>,
    pub inputs: Vec<(String, usize, Vec<usize>)>,
    /// Graph outputs by name.
    pub outputs: Vec<(String, GraphOutput)>,
}

/// Where a graph output is.
#[derive(Clone, Debug)]
pub enum GraphOutput {
    /// Computed on the GPU into value `id`.
    Value { id: usize, shape: Vec<usize> },
    /// Folded to a constant at plan time.
    Const(Arc<Tensor>),
}

/// Lets a caller lower some nodes itself (adaptation lowers BatchNormalization with batch or
/// running statistics). Returning `None` falls back to the op family's inference lowering.
pub trait LowerHook {
    fn lower(&mut self, graph: &Graph, node: usize, l: &mut Lowering, program: &mut Program) -> Option<OpResult<()>>;

    /// Whether `node` may run fused into the convolution before it (or be that convolution):
    /// the hook does not lower it itself, and nothing but the forward's outputs is read from the
    /// program (a reverse pass needs every node's own values). No fusion by default.
    fn fusable(&self, _graph: &Graph, _node: usize) -> bool {
        false
    }

    /// Whether the hook's own lowering of `node` may also apply the Relu or Clip that only the
    /// node's output feeds ([`LowerHook::lower_with_activation`] then lowers both): nothing but
    /// the forward's outputs is read from the program. No fusion by default.
    fn fuses_activation(&self, _graph: &Graph, _node: usize) -> bool {
        false
    }

    /// Lowers `node` with `act` applied to its output (only for nodes
    /// [`LowerHook::fuses_activation`] accepted).
    fn lower_with_activation(
        &mut self,
        graph: &Graph,
        node: usize,
        _l: &mut Lowering,
        _program: &mut Program,
        _act: TailAct,
    ) -> OpResult<()> {
        Err(OpReason::Internal(format!("node '{}' cannot take a fused activation", graph.nodes[node].name)))
    }

    /// The buffer the nodes it does not lower itself read for initializer `name` (views of it
    /// included), when not the initializer's own: the source copy of an adapted parameter in a
    /// program that runs the unadapted model. `None` by default.
    fn weight_name(&self, _name: &str) -> Option<String> {
        None
    }
}

/// The default: every node lowered by its op family, convolutions with their tails fused.
pub struct NoHook;

impl LowerHook for NoHook {
    fn lower(&mut self, _: &Graph, _: usize, _: &mut Lowering, _: &mut Program) -> Option<OpResult<()>> {
        None
    }

    fn fusable(&self, _: &Graph, _: usize) -> bool {
        true
    }
}

/// Every node lowered by its op family and nothing fused (what [`NoHook`] lowers, one pass per
/// node: the reference the fused plans are tested against).
pub struct Unfused;

impl LowerHook for Unfused {
    fn lower(&mut self, _: &Graph, _: usize, _: &mut Lowering, _: &mut Program) -> Option<OpResult<()>> {
        None
    }
}

/// A convolution whose BatchNormalization with fixed statistics and activation run in its
/// write-out ([`crate::ops::conv::Tail`]).
struct Fusion {
    /// The BatchNormalization's epsilon when it is absorbed (its buffers are attached when
    /// lowering), and the activation.
    bn_eps: Option<f32>,
    act: TailAct,
    /// The block's constants ([`crate::ops::conv::tail_constants`]).
    consts: Vec<f32>,
    /// Steps lowered with the convolution.
    absorbed: Vec<usize>,
    /// The tensor the chain ends with (the convolution writes it).
    out: String,
}

/// Finds Conv → BatchNormalization → Relu/Clip chains (either of the last two may be missing)
/// whose intermediate tensors nothing else reads, keyed by the convolution's step.
fn find_fusions(graph: &Graph, spec: &Specialized, hook: &dyn LowerHook) -> HashMap<usize, Fusion> {
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, step) in spec.steps.iter().enumerate() {
        for name in step.inputs.iter().filter(|n| !n.is_empty()) {
            readers.entry(name.as_str()).or_default().push(i);
        }
    }
    let konst = |name: &String| spec.values.get(name).and_then(|v| v.konst.clone());
    // The one step that reads `name`, as its first input and nowhere else, if nothing else does.
    let sole_reader = |name: &str| -> Option<usize> {
        if spec.output_names.iter().any(|o| o == name) {
            return None;
        }
        match readers.get(name).map(|r| r.as_slice()) {
            Some(&[j]) if spec.steps[j].inputs[0] == name => Some(j),
            _ => None,
        }
    };
    // The Relu or Clip (constant bounds) that step `j` is, if it is one.
    let activation = |j: usize| -> Option<TailAct> {
        let s = &spec.steps[j];
        let bound = |k: usize| s.inputs.get(k).filter(|n| !n.is_empty()).map(|n| konst(n).ok_or(()));
        let found = match &graph.nodes[s.node].op {
            Op::Unary(Unary::Relu) => Some(TailAct::Relu),
            Op::Unary(Unary::Clip { min, max }) => Some(TailAct::Clip { min: *min, max: *max }),
            Op::ClipInputs => match (bound(1).transpose(), bound(2).transpose()) {
                (Ok(lo), Ok(hi)) => match crate::ops::elementwise::clip_bounds(lo.as_deref(), hi.as_deref()) {
                    Ok(Unary::Clip { min, max }) => Some(TailAct::Clip { min, max }),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        };
        found.filter(|_| hook.fusable(graph, s.node) || hook.fuses_activation(graph, spec.steps[j].node))
    };
    let mut fusions = HashMap::new();
    for (i, step) in spec.steps.iter().enumerate() {
        // A node the hook lowers with the activation after it (adaptation's BatchNormalization
        // with batch or frame statistics in forward-only programs).
        if hook.fuses_activation(graph, step.node)
            && step.outputs.len() == 1
            && let Some(j) = sole_reader(&step.outputs[0])
            && let Some(act) = activation(j).filter(|_| spec.steps[j].outputs.len() == 1)
        {
            let out = spec.steps[j].outputs[0].clone();
            fusions.insert(i, Fusion { bn_eps: None, act, consts: Vec::new(), absorbed: vec![j], out });
            continue;
        }
        let Op::Conv(attrs) = &graph.nodes[step.node].op else { continue };
        if !hook.fusable(graph, step.node) || step.inputs.len() < 2 || step.outputs.len() != 1 {
            continue;
        }
        let (mut bn_eps, mut act) = (None, TailAct::None);
        let mut absorbed = Vec::new();
        let mut out = step.outputs[0].clone();
        if let Some(j) = sole_reader(&out) {
            let s = &spec.steps[j];
            if let Op::BatchNorm(a) = &graph.nodes[s.node].op
                && hook.fusable(graph, s.node)
                && s.inputs.len() == 5
                && s.inputs[1..].iter().all(|n| konst(n).is_some())
            {
                bn_eps = Some(a.epsilon);
                absorbed.push(j);
                out = s.outputs[0].clone();
            }
        }
        if let Some(j) = sole_reader(&out) {
            let s = &spec.steps[j];
            if let Some(found) = activation(j).filter(|_| hook.fusable(graph, s.node) && s.outputs.len() == 1) {
                act = found;
                absorbed.push(j);
                out = s.outputs[0].clone();
            }
        }
        if absorbed.is_empty() {
            continue;
        }
        let shape = |n: &String| spec.values.get(n).map(|v| v.shape.clone()).unwrap_or_default();
        let w = &step.inputs[1];
        let bias = step.inputs.get(2).filter(|n| !n.is_empty()).map(konst);
        let consts = crate::ops::conv::tail_constants(
            attrs,
            &shape(&step.inputs[0]),
            &shape(w),
            konst(w).as_deref(),
            bias.as_ref().map(|b| b.as_deref()),
            bn_eps,
            act,
        );
        if let Some(consts) = consts {
            fusions.insert(i, Fusion { bn_eps, act, consts, absorbed, out });
        }
    }
    fusions
}

/// Bytes of a float32 tensor of `shape`, saturating (an absurd shape then fails the limit check
/// instead of overflowing).
fn bytes_of(shape: &[usize]) -> u64 {
    shape.iter().fold(4u64, |a, &d| a.saturating_mul(d as u64)).max(4)
}

/// Lowers the specialised graph into `program`.
pub fn lower_forward(
    ctx: &GpuContext,
    graph: &Graph,
    shapes: &[Vec<usize>],
    program: &mut Program,
    hook: &mut dyn LowerHook,
) -> Result<Forward, PlanError> {
    let spec = specialize(graph, shapes)?;
    let limits = ctx.limits();
    let mut value_of: HashMap<String, usize> = HashMap::new();
    let mut inputs = Vec::new();
    for (name, shape) in spec.input_names.iter().zip(shapes) {
        ctx.check_buffer(|| format!("input '{name}' of shape {shape:?}"), bytes_of(shape), true)?;
        let v = program.value(bytes_of(shape));
        program.pinned_start.push(v);
        value_of.insert(name.clone(), v);
        inputs.push((name.clone(), v, shape.clone()));
    }
    let mut fusions = find_fusions(graph, &spec, hook);
    let absorbed: std::collections::HashSet<usize> = fusions.values().flat_map(|f| f.absorbed.clone()).collect();
    let mut nodes = Vec::new();
    for (si, step) in spec.steps.iter().enumerate() {
        let node = &graph.nodes[step.node];
        if absorbed.contains(&si) {
            // Lowered with its convolution, which wrote the chain's output; its arithmetic still
            // counts.
            let shape = |n: &String| spec.values.get(n).map(|v| v.shape.as_slice());
            let ins: Vec<Option<&[usize]>> =
                step.inputs.iter().map(|n| if n.is_empty() { None } else { shape(n) }).collect();
            let outs: Vec<&[usize]> = step.outputs.iter().map(|n| shape(n).unwrap_or(&[])).collect();
            program.flops += node.op.flops(&ins, &outs);
            continue;
        }
        let fusion = fusions.remove(&si);
        let node_err = |reason: OpReason| {
            let shapes =
                step.inputs.iter().map(|n| spec.values.get(n).map(|v| v.shape.clone()).unwrap_or_default()).collect();
            PlanError::Node(Box::new(graph.op_error(step.node, Stage::Lower, shapes, reason)))
        };
        let mut ins = Vec::new();
        for name in &step.inputs {
            if name.is_empty() {
                ins.push(None);
                continue;
            }
            let info = &spec.values[name];
            if let Some(k) = &info.konst {
                // A view of an initializer reads the initializer's buffer (the same values).
                let (root, init, shared) = match info.view_of.as_ref().and_then(|r| graph.initializers.get_key_value(r))
                {
                    Some((r, t)) => (r.as_str(), t.clone(), true),
                    None => (name.as_str(), k.clone(), !info.shape_dependent),
                };
                let root = hook.weight_name(root).unwrap_or_else(|| root.to_string());
                let w = program.weight(&root, || WeightInit::Tensor(init), shared);
                ins.push(Some(Operand { buf: BufRef::Weight(w), shape: info.shape.clone(), value: Some(k.clone()) }));
            } else {
                let v = *value_of
                    .get(name)
                    .ok_or_else(|| node_err(OpReason::Internal(format!("input '{name}' has no buffer"))))?;
                ins.push(Some(Operand { buf: BufRef::Value(v), shape: info.shape.clone(), value: None }));
            }
        }
        let alias = node.op.is_alias();
        let mut outs = Vec::new();
        for (oi, name) in step.outputs.iter().enumerate() {
            let shape = spec.values.get(name).map(|v| v.shape.clone()).unwrap_or_default();
            // A fused convolution writes the end of its chain (same shape) under that name.
            let name = fusion.as_ref().map_or(name, |f| &f.out);
            let v = match (alias, oi, ins.first()) {
                (true, 0, Some(Some(Operand { buf: BufRef::Value(src), .. }))) => program.alias(*src),
                (true, 0, _) => {
                    return Err(node_err(OpReason::Internal("a view of a constant should have been folded".into())));
                }
                _ => {
                    let what =
                        || format!("output '{name}' of node '{}' ({}), shape {shape:?},", node.name, node.op_type);
                    ctx.check_buffer(what, bytes_of(&shape), true)?;
                    program.value(bytes_of(&shape))
                }
            };
            if !name.is_empty() {
                value_of.insert(name.clone(), v);
            }
            outs.push(Operand { buf: BufRef::Value(v), shape, value: None });
        }
        let mut item_idx = None;
        if !alias {
            let mut l = Lowering {
                node: node.name.clone(),
                inputs: ins.clone(),
                outputs: outs.clone(),
                dispatches: Vec::new(),
                scratch: Vec::new(),
                max_workgroup_storage: limits.max_compute_workgroup_storage_size,
                max_invocations: limits.max_compute_invocations_per_workgroup,
                cpu_kernels: ctx.cpu_kernels(),
            };
            let mut label = node.name.clone();
            match (&fusion, &node.op) {
                (Some(f), Op::Conv(attrs)) => {
                    let mut tail = Tail { bn: None, act: f.act };
                    if let Some(eps) = f.bn_eps {
                        // The BatchNormalization's parameters: the weights its lowering would read.
                        let bn = &spec.steps[f.absorbed[0]];
                        let mut bufs = [BufRef::Weight(0); 4];
                        for (b, name) in bufs.iter_mut().zip(&bn.inputs[1..]) {
                            let k = spec.values[name].konst.clone().ok_or_else(|| {
                                node_err(OpReason::Internal(format!("fused '{name}' is not a constant")))
                            })?;
                            let shared = !spec.values[name].shape_dependent;
                            *b = BufRef::Weight(program.weight(name, || WeightInit::Tensor(k), shared));
                        }
                        tail.bn = Some((bufs, eps));
                    }
                    let consts = Arc::new(Tensor::f32(vec![f.consts.len()], f.consts.clone()));
                    let c = program.weight(&format!("fused:{}", node.name), || WeightInit::Tensor(consts), false);
                    crate::ops::conv::lower_with_tail(attrs, &mut l, Some((&tail, BufRef::Weight(c))))
                        .map_err(node_err)?;
                    for &j in &f.absorbed {
                        label = format!("{label} + {}", graph.nodes[spec.steps[j].node].name);
                    }
                }
                (Some(f), _) => {
                    hook.lower_with_activation(graph, step.node, &mut l, program, f.act).map_err(node_err)?;
                    for &j in &f.absorbed {
                        label = format!("{label} + {}", graph.nodes[spec.steps[j].node].name);
                    }
                }
                _ => match hook.lower(graph, step.node, &mut l, program) {
                    Some(r) => r.map_err(node_err)?,
                    None => node.op.lower(&mut l).map_err(node_err)?,
                },
            }
            program.items.push(Item { label, dispatches: l.dispatches, scratch: l.scratch });
            item_idx = Some(program.items.len() - 1);
            program.flops += step_flops(&node.op, &ins, &outs);
        }
        nodes.push(LoweredNode { node: step.node, item: item_idx, inputs: ins, outputs: outs });
    }
    let mut outputs = Vec::new();
    for name in &spec.output_names {
        if let Some(&v) = value_of.get(name) {
            program.pinned_end.push(v);
            outputs.push((name.clone(), GraphOutput::Value { id: v, shape: spec.values[name].shape.clone() }));
        } else if let Some(k) = spec.values.get(name).and_then(|v| v.konst.clone()) {
            outputs.push((name.clone(), GraphOutput::Const(k)));
        } else {
            return Err(PlanError::Program(format!("graph output '{name}' was not computed")));
        }
    }
    Ok(Forward { spec, value_of, nodes, inputs, outputs })
}

fn step_flops(op: &crate::ops::Op, ins: &[Option<Operand>], outs: &[Operand]) -> FlopCount {
    let ins: Vec<Option<&[usize]>> = ins.iter().map(|i| i.as_ref().map(|o| o.shape.as_slice())).collect();
    let outs: Vec<&[usize]> = outs.iter().map(|o| o.shape.as_slice()).collect();
    op.flops(&ins, &outs)
}

/// FLOPs of the inference forward pass for `shapes`, as [`Plan::build`] counts them, without a
/// GPU (shapes come from `specialize`; constant subgraphs fold away and count nothing).
pub fn forward_flops(graph: &Graph, shapes: &[Vec<usize>]) -> Result<FlopCount, PlanError> {
    let spec = specialize(graph, shapes)?;
    let mut total = FlopCount::default();
    for step in &spec.steps {
        let shape = |n: &String| spec.values.get(n).map(|v| v.shape.as_slice());
        let ins: Vec<Option<&[usize]>> =
            step.inputs.iter().map(|n| if n.is_empty() { None } else { shape(n) }).collect();
        let outs: Vec<&[usize]> = step.outputs.iter().map(|n| shape(n).unwrap_or(&[])).collect();
        total += graph.nodes[step.node].op.flops(&ins, &outs);
    }
    Ok(total)
}

/// Where a graph output comes from when a plan runs.
enum OutputSource {
    Const(Arc<Tensor>),
    Gpu { value: usize, shape: Vec<usize>, staging: wgpu::Buffer },
}

/// A forward plan for one set of input shapes.
pub struct Plan {
    pub input_shapes: Vec<Vec<usize>>,
    compiled: Compiled,
    inputs: Vec<(String, usize)>,
    outputs: Vec<(String, OutputSource)>,
    /// Bytes of activation buffers after lifetime-based reuse.
    pub activation_bytes: u64,
    /// Bytes the same activations would take with one buffer each.
    pub activation_bytes_unshared: u64,
    pub dispatch_count: usize,
    pub node_count: usize,
    /// FLOPs of one run ([`crate::ops::flops`] has the convention).
    pub flops: FlopCount,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("input_shapes", &self.input_shapes)
            .field("dispatches", &self.dispatch_count)
            .field("activation_bytes", &self.activation_bytes)
            .finish()
    }
}

pub(crate) fn staging(ctx: &GpuContext, bytes: u64) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size: bytes.max(4).div_ceil(4) * 4,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

impl Plan {
    /// Builds the inference plan for `shapes` (one per graph input).
    pub fn build(
        ctx: &GpuContext,
        graph: &Graph,
        weights: &mut WeightStore,
        shapes: &[Vec<usize>],
    ) -> Result<Plan, PlanError> {
        Plan::build_with(ctx, graph, weights, shapes, &mut NoHook)
    }

    /// Builds a forward plan with some nodes lowered by `hook`.
    pub fn build_with(
        ctx: &GpuContext,
        graph: &Graph,
        weights: &mut WeightStore,
        shapes: &[Vec<usize>],
        hook: &mut dyn LowerHook,
    ) -> Result<Plan, PlanError> {
        let mut program = Program::default();
        let fwd = lower_forward(ctx, graph, shapes, &mut program, hook)?;
        let compiled = Compiled::compile(ctx, &program, weights)?;
        let outputs = fwd
            .outputs
            .into_iter()
            .map(|(name, src)| {
                let s = match src {
                    GraphOutput::Value { id, shape } => {
                        OutputSource::Gpu { value: id, staging: staging(ctx, bytes_of(&shape)), shape }
                    }
                    GraphOutput::Const(k) => OutputSource::Const(k),
                };
                (name, s)
            })
            .collect();
        Ok(Plan {
            input_shapes: shapes.to_vec(),
            inputs: fwd.inputs.iter().map(|(n, v, _)| (n.clone(), *v)).collect(),
            outputs,
            activation_bytes: compiled.transient_bytes,
            activation_bytes_unshared: compiled.transient_bytes_unshared,
            dispatch_count: compiled.dispatch_count(),
            node_count: fwd.spec.steps.len(),
            flops: program.flops,
            compiled,
        })
    }

    /// Records the forward pass into `encoder` (after the inputs have been written).
    pub fn record(&self, encoder: &mut wgpu::CommandEncoder) {
        self.compiled.record(encoder, "forward");
    }

    /// Writes the inputs (one per graph input, matching the plan's shapes).
    pub fn write_inputs(&self, ctx: &GpuContext, inputs: &[&[f32]]) -> Result<(), PlanError> {
        if inputs.len() != self.inputs.len() {
            return Err(PlanError::InputCount { expected: self.inputs.len(), got: inputs.len() });
        }
        for ((name, v), (data, shape)) in self.inputs.iter().zip(inputs.iter().zip(&self.input_shapes)) {
            if data.len() != shape.iter().product::<usize>() {
                return Err(PlanError::InputData { name: name.clone(), shape: shape.clone(), len: data.len() });
            }
            ctx.queue.write_buffer(self.compiled.value_buffer(*v), 0, bytemuck::cast_slice(data));
        }
        Ok(())
    }

    /// Writes `inputs`, then times each dispatch of the plan alone `runs` times and keeps each
    /// one's median, on `clock` (`None`: the best the device has; [`profile`]).
    pub fn profile(
        &self,
        ctx: &GpuContext,
        inputs: &[&[f32]],
        runs: usize,
        clock: Option<profile::Clock>,
    ) -> Result<profile::Profile, PlanError> {
        self.write_inputs(ctx, inputs)?;
        Ok(self.compiled.profile(ctx, runs, clock)?)
    }

    /// Runs the plan: inputs in, every graph output back. One encoder, one submit.
    pub fn run(&self, ctx: &GpuContext, inputs: &[&[f32]]) -> Result<Vec<Tensor>, PlanError> {
        ctx.scoped("running the forward plan", || -> Result<(), PlanError> {
            self.write_inputs(ctx, inputs)?;
            let mut encoder = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("run") });
            self.record(&mut encoder);
            self.copy_outputs(&mut encoder);
            ctx.queue.submit([encoder.finish()]);
            Ok(())
        })??;
        self.read_outputs(ctx)
    }

    /// Copies GPU outputs to their staging buffers (part of the caller's encoder).
    pub fn copy_outputs(&self, encoder: &mut wgpu::CommandEncoder) {
        for (_, o) in &self.outputs {
            if let OutputSource::Gpu { value, shape, staging } = o {
                encoder.copy_buffer_to_buffer(
                    self.compiled.value_buffer(*value),
                    0,
                    staging,
                    0,
                    bytes_of(shape).div_ceil(4) * 4,
                );
            }
        }
    }

    /// Reads the outputs back after [`Plan::copy_outputs`] was submitted.
    pub fn read_outputs(&self, ctx: &GpuContext) -> Result<Vec<Tensor>, PlanError> {
        let mut result = Vec::new();
        for (_, o) in &self.outputs {
            match o {
                OutputSource::Const(k) => result.push(Tensor::f32(k.shape.clone(), k.to_f32_vec())),
                OutputSource::Gpu { shape, staging, .. } => {
                    let n: usize = shape.iter().product();
                    result.push(Tensor::f32(shape.clone(), read_buffer(ctx, staging, n)?));
                }
            }
        }
        Ok(result)
    }

    /// Output names in graph order.
    pub fn output_names(&self) -> Vec<String> {
        self.outputs.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// Maps `staging` and reads `n` floats (waits for the queue).
///
/// Every result passes through here, so this is where a lost device or an error wgpu reported
/// outside an error scope since the last call becomes the caller's error
/// ([`GpuContext::check`]), before and after waiting.
pub fn read_buffer(ctx: &GpuContext, staging: &wgpu::Buffer, n: usize) -> Result<Vec<f32>, GpuError> {
    read_mapped(ctx, staging, n)
}

/// The first `n` values of type `T` of `staging` (a MAP_READ buffer a submitted copy fills),
/// after waiting for the work: [`read_buffer`] for floats, profiles' timestamps as `u64`.
pub(crate) fn read_mapped<T: bytemuck::Pod>(
    ctx: &GpuContext,
    staging: &wgpu::Buffer,
    n: usize,
) -> Result<Vec<T>, GpuError> {
    ctx.check()?;
    let slice = staging.slice(..);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    // A failure while waiting is most often the device going away: report that if it did.
    let failed = |e: String| ctx.check().err().unwrap_or(GpuError::Readback(e));
    ctx.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| failed(e.to_string()))?;
    rx.recv().map_err(|e| failed(e.to_string()))?.map_err(|e| failed(e.to_string()))?;
    let out = {
        let view = slice.get_mapped_range().map_err(|e| GpuError::Readback(e.to_string()))?;
        let mut all: Vec<T> = bytemuck::pod_collect_to_vec(&view);
        all.truncate(n);
        all
    };
    staging.unmap();
    // An error of the work that produced these values (reported to the handler while waiting).
    ctx.check()?;
    Ok(out)
}
