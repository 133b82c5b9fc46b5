//! The reverse pass of a step program and the helpers every method's lowering shares: a second
//! forward pass on the step's input, the weight behind an adapted parameter, value sizes.
//!
//! Only what the reverse pass reads stays alive past its forward use: the planner references a
//! forward tensor from a backward dispatch exactly when that op's backward reads it, and the
//! program's lifetime analysis does the rest. Nodes upstream of the first adapted layer get no
//! reverse pass at all, and frozen weights get no gradient buffers.

use std::collections::{HashMap, HashSet};

use super::bn::{self, BnHook};
use crate::gpu::GpuContext;
use crate::ir::Graph;
use crate::ops::{BackwardLowering, BufRef, GradInput, OpReason, Stage, flops};
use crate::plan::{Forward, GraphOutput, Item, PlanError, Program, WeightInit, lower_forward};

/// One adapted normalization layer: its scale and bias initializers.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptedLayer {
    /// The BatchNormalization node, whose reverse pass the adaptation hook lowers; `None` for a
    /// LayerNormalization, GroupNormalization or InstanceNormalization layer
    /// ([`crate::ir::AffineNormInfo`]), whose parameters are initializers the nodes of its
    /// expansion read: their gradients come from those nodes' backward.
    pub bn_node: Option<usize>,
    pub scale: String,
    pub bias: Option<String>,
}

impl AdaptedLayer {
    /// The layer's parameter names, scale then bias.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.scale).chain(self.bias.as_ref())
    }
}

/// The names of the adapted parameters of the layers other than BatchNormalization.
pub(crate) fn affine_names(adapted: &[AdaptedLayer]) -> HashSet<String> {
    adapted.iter().filter(|a| a.bn_node.is_none()).flat_map(|a| a.names().cloned()).collect()
}

/// Bytes of an f32 tensor of `shape` (at least one value, so that no buffer is empty).
pub fn bytes_of(shape: &[usize]) -> u64 {
    (shape.iter().product::<usize>() as u64 * 4).max(4)
}

pub(crate) fn err(msg: impl Into<String>) -> PlanError {
    PlanError::Program(msg.into())
}

/// Builds the reverse pass into `program`; returns each adapted parameter's gradient value.
#[allow(clippy::too_many_arguments)]
pub(crate) fn reverse_pass(
    ctx: &GpuContext,
    graph: &Graph,
    fwd: &Forward,
    hook: &BnHook,
    adapted_layers: &[AdaptedLayer],
    logits: usize,
    dlogits: usize,
    program: &mut Program,
) -> Result<Vec<(String, usize)>, PlanError> {
    let limits = ctx.limits();
    let adapted: HashMap<usize, &AdaptedLayer> =
        adapted_layers.iter().filter_map(|a| a.bn_node.map(|n| (n, a))).collect();
    let affine = affine_names(adapted_layers);
    let value_id = |o: &Option<crate::ops::Operand>| match o {
        Some(crate::ops::Operand { buf: BufRef::Value(v), .. }) => Some(*v),
        _ => None,
    };
    // An input that is an adapted parameter outside BatchNormalization: its name.
    let affine_input = |o: &Option<crate::ops::Operand>, program: &Program| match o {
        Some(crate::ops::Operand { buf: BufRef::Weight(w), .. }) => {
            Some(program.weights[*w].name.clone()).filter(|n| affine.contains(n))
        }
        _ => None,
    };
    // Values that depend on an adapted parameter: only they carry gradients.
    let mut requires: HashSet<usize> = HashSet::new();
    for ln in &fwd.nodes {
        let depends = adapted.contains_key(&ln.node)
            || ln.inputs.iter().any(|i| value_id(i).is_some_and(|v| requires.contains(&v)))
            || ln.inputs.iter().any(|i| affine_input(i, program).is_some());
        if depends {
            for o in &ln.outputs {
                if let BufRef::Value(v) = o.buf {
                    requires.insert(v);
                }
            }
        }
    }
    if !requires.contains(&logits) {
        return Err(err("no adapted parameter influences the model's output"));
    }
    let mut grads: HashMap<usize, usize> = HashMap::from([(logits, dlogits)]);
    let mut param_grads = Vec::new();
    // The gradients of the adapted parameters outside BatchNormalization, by name.
    let mut affine_grads: HashMap<String, usize> = HashMap::new();
    for ln in fwd.nodes.iter().rev() {
        let node = &graph.nodes[ln.node];
        let out_grads: Vec<Option<usize>> = ln
            .outputs
            .iter()
            .map(|o| if let BufRef::Value(v) = o.buf { grads.get(&v).copied() } else { None })
            .collect();
        if out_grads.iter().all(|g| g.is_none()) {
            continue;
        }
        let node_err = |reason: OpReason| {
            let shapes = ln.inputs.iter().map(|i| i.as_ref().map(|o| o.shape.clone()).unwrap_or_default()).collect();
            PlanError::Node(Box::new(graph.op_error(ln.node, Stage::Backward, shapes, reason)))
        };
        if let Some(saved) = hook.saved.get(&ln.node) {
            let dy = out_grads[0].ok_or_else(|| node_err(OpReason::Internal("no gradient for Y".into())))?;
            let mut scratch = Vec::new();
            let dparams = adapted.get(&ln.node).map(|a| {
                let n = saved.channels as u64 * 4;
                let (ds, db) = (program.value(n), program.value(n));
                param_grads.push((a.scale.clone(), ds));
                param_grads.extend(a.bias.clone().map(|b| (b, db)));
                (ds, db)
            });
            let dx = value_id(&ln.inputs[0])
                .filter(|v| requires.contains(v))
                .map(|v| grad_for(&mut grads, v, program, bytes_of(&saved.x.shape)));
            let elems = (saved.batch * saved.channels * saved.plane) as u64;
            program.flops.norm += elems
                * (if dparams.is_some() { flops::BN_BACKWARD_PARAMS } else { 0 }
                    + if dx.is_some() { flops::BN_BACKWARD_DX } else { 0 });
            let dispatches = bn::backward(saved, dy, dparams, dx, &mut scratch, ctx.cpu_kernels()).map_err(node_err)?;
            program.items.push(Item { label: format!("{} backward", node.name), dispatches, scratch });
            continue;
        }
        if matches!(node.op, crate::ops::Op::BatchNorm(_)) {
            return Err(node_err(OpReason::Internal(
                "BatchNormalization with source statistics on the gradient path must be lowered by the adaptation hook"
                    .into(),
            )));
        }
        // A view passes its gradient through unchanged: share the buffer when it is the first
        // contribution to the input's gradient.
        if node.op.is_alias()
            && let Some(v) = value_id(&ln.inputs[0]).filter(|v| requires.contains(v))
            && !grads.contains_key(&v)
            && let Some(g) = out_grads[0]
        {
            let a = program.alias(g);
            grads.insert(v, a);
            continue;
        }
        let mut grad_inputs = Vec::new();
        for inp in &ln.inputs {
            let shape = || inp.as_ref().map(|o| o.shape.clone()).unwrap_or_default();
            grad_inputs.push(match (value_id(inp).filter(|v| requires.contains(v)), affine_input(inp, program)) {
                (Some(v), _) => {
                    let shape = shape();
                    let (g, accumulate) = grad_for(&mut grads, v, program, bytes_of(&shape));
                    Some(GradInput { buf: BufRef::Value(g), shape, accumulate })
                }
                (None, Some(name)) => {
                    let shape = shape();
                    let (g, accumulate) = match affine_grads.get(&name) {
                        Some(&g) => (g, true),
                        None => {
                            let g = program.value(bytes_of(&shape));
                            affine_grads.insert(name, g);
                            (g, false)
                        }
                    };
                    Some(GradInput { buf: BufRef::Value(g), shape, accumulate })
                }
                (None, None) => None,
            });
        }
        let mut b = BackwardLowering {
            node: node.name.clone(),
            inputs: ln.inputs.clone(),
            outputs: ln.outputs.clone(),
            grad_outputs: ln
                .outputs
                .iter()
                .zip(&out_grads)
                .map(|(o, g)| {
                    g.map(|g| crate::ops::Operand { buf: BufRef::Value(g), shape: o.shape.clone(), value: None })
                })
                .collect(),
            grad_inputs,
            dispatches: Vec::new(),
            scratch: Vec::new(),
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            cpu_kernels: ctx.cpu_kernels(),
        };
        let in_shapes: Vec<Option<&[usize]>> =
            ln.inputs.iter().map(|i| i.as_ref().map(|o| o.shape.as_slice())).collect();
        let out_shapes: Vec<&[usize]> = ln.outputs.iter().map(|o| o.shape.as_slice()).collect();
        let wanted: Vec<Option<bool>> = b.grad_inputs.iter().map(|g| g.as_ref().map(|g| g.accumulate)).collect();
        program.flops += node.op.backward_flops(&in_shapes, &out_shapes, &wanted);
        node.op.lower_backward(&mut b).map_err(node_err)?;
        program.items.push(Item {
            label: format!("{} backward", node.name),
            dispatches: b.dispatches,
            scratch: b.scratch,
        });
    }
    for name in adapted_layers.iter().filter(|a| a.bn_node.is_none()).flat_map(|a| a.names()) {
        if let Some(&g) = affine_grads.get(name) {
            param_grads.push((name.clone(), g));
        }
    }
    Ok(param_grads)
}

/// The gradient buffer of value `v`: `(buffer, accumulate)`. The first contribution overwrites a
/// fresh buffer; later ones (a fanned-out tensor) add into it.
fn grad_for(grads: &mut HashMap<usize, usize>, v: usize, program: &mut Program, bytes: u64) -> (usize, bool) {
    match grads.get(&v) {
        Some(&g) => (g, true),
        None => {
            let g = program.value(bytes);
            grads.insert(v, g);
            (g, false)
        }
    }
}

/// Lowers one more forward pass of `graph` into `program` reading the first pass's input buffer
/// (WoC's original model, SAR's pass at the perturbed point); returns it and its logits value.
pub(crate) fn forward_on_same_input(
    ctx: &GpuContext,
    graph: &Graph,
    first: &Forward,
    shape: &[usize],
    program: &mut Program,
    hook: &mut BnHook,
) -> Result<(Forward, usize), PlanError> {
    let fwd = lower_forward(ctx, graph, &[shape.to_vec()], program, hook)?;
    let input = fwd.inputs[0].1;
    program.pinned_start.retain(|&v| v != input);
    program.values[input].alias_of = Some(first.inputs[0].1);
    let logits = match fwd.outputs.first() {
        Some((_, GraphOutput::Value { id, .. })) => *id,
        _ => return Err(err("the model's output is a constant")),
    };
    Ok((fwd, logits))
}

/// The weight id and element count of adapted parameter `name`.
pub(crate) fn parameter(program: &Program, name: &str) -> Result<(usize, usize), PlanError> {
    let p = program
        .weights
        .iter()
        .position(|w| w.name == name)
        .ok_or_else(|| err(format!("parameter {name} has no buffer")))?;
    let n = match &program.weights[p].init {
        WeightInit::Tensor(t) => t.numel(),
        WeightInit::Zeros(n) => *n,
    };
    Ok((p, n))
}
