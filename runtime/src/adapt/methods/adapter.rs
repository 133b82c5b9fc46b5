//! `label_shift.mode = "adapter"`: the learned label-shift adapter (Park et al. 2023), folded
//! into the step program. The adapter network maps the current estimate q̂ (the EMA of the
//! unmodulated predictions of the batches before this one, as mode `ema` keeps it) to (γ, β,
//! ΔW, Δb), and the final layer is recomputed as logits' = (W + ΔW)(γ ⊙ h + β) + (b + Δb) from
//! its input h; the probabilities are softmax(logits'). The first stage of the output chain:
//! the method's loss still sees the unmodulated logits.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::label_shift::{GATE_BUFFER, LabelShiftMode, PRIOR_BUFFER, missing, prior_ema};
use super::{Stage, StageCx, output_dispatch, output_params, value_operand};
use crate::adapt::config::AdaptConfig;
use crate::adapt::error::OutputError;
use crate::adapt::loss;
use crate::gpu::grid_1d;
use crate::ir::{Dim, Graph};
use crate::ops::layout::gather;
use crate::ops::{BufRef, Dispatch, Op, Operand};
use crate::plan::{Forward, GraphOutput, Item, NoHook, WeightInit, lower_forward};
use crate::tensor::Tensor;

/// The prefix of the adapter's tensor names inside the step program, so that its weights never
/// share a name (and so a buffer) with the model's.
const ADAPTER_PREFIX: &str = "ls_adapter/";
const ADAPTER_OUTPUTS: [&str; 4] = ["gamma", "beta", "delta_w", "delta_b"];

/// The adapter stage: the adapter graph (its tensor names prefixed) and the EMA momentum of its
/// input.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub momentum: f64,
    pub graph: Arc<Graph>,
    pub path: PathBuf,
}

/// The adapter a config asks for (mode `adapter`), loaded and checked against `graph`.
pub(crate) fn stage(config: &AdaptConfig, graph: &Graph) -> Result<Option<Arc<dyn Stage>>, OutputError> {
    let ls = &config.label_shift;
    if ls.mode != LabelShiftMode::Adapter {
        return Ok(None);
    }
    let path = ls.adapter.as_ref().ok_or_else(|| missing(ls.mode, "adapter"))?;
    let adapter = Adapter { momentum: ls.momentum, graph: Arc::new(load_adapter(path)?), path: path.clone() };
    final_layer_node(graph).map_err(OutputError::Plan)?;
    Ok(Some(Arc::new(adapter)))
}

impl Stage for Adapter {
    fn lower(&self, cx: &mut StageCx<'_>) -> Result<(), OutputError> {
        let Adapter { momentum, graph: adapter, path } = self;
        let (b, c) = (cx.b, cx.c);
        let bc = (b * c * 4) as u64;
        let err = OutputError::Plan;
        let (ctx, graph, fwd, logits, probs0) = (cx.ctx, cx.graph, cx.fwd, cx.logits, cx.probs0);
        let ps = cx.source_prior.to_vec();
        let bad = |reason: String| OutputError::Adapter { path: path.clone(), reason };
        // q̂ of the batches before this one feeds the adapter; then the estimate moves with
        // this batch's unmodulated predictions.
        let snap = cx.program.value(2 * c as u64 * 4);
        let q = cx.program.weight(PRIOR_BUFFER, || WeightInit::Tensor(Arc::new(Tensor::f32(vec![c], ps))), true);
        let g = cx.program.weight(GATE_BUFFER, || WeightInit::Tensor(Arc::new(Tensor::f32(vec![1], vec![1.0]))), true);
        cx.dispatches.push(prior_ema(
            BufRef::Value(probs0),
            BufRef::Weight(q),
            BufRef::Value(snap),
            BufRef::Weight(g),
            b,
            c,
            *momentum,
        ));
        cx.program.items.push(Item {
            label: "label-shift estimate".into(),
            dispatches: std::mem::take(&mut cx.dispatches),
            scratch: vec![],
        });
        cx.prior = Some(snap);
        cx.gate = Some(g);
        cx.deferred = Some((snap, c, q, c));
        let program = &mut *cx.program;
        if let Some(dims) = adapter.inputs[0].dims.as_ref()
            && (dims.len() != 2 || dims.iter().zip([1, c]).any(|(d, want)| matches!(d, Dim::Fixed(n) if *n != want)))
        {
            let shown: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
            return Err(bad(format!("its input 'prior' is [{}], the model has {c} classes", shown.join(", "))));
        }
        let layer = final_layer(graph, fwd, logits, c).map_err(err)?;
        let d = layer.d;
        let afwd = lower_forward(ctx, adapter, &[vec![1, c]], program, &mut NoHook).map_err(|e| bad(e.to_string()))?;
        let input = afwd.inputs[0].1;
        program.pinned_start.retain(|&v| v != input);
        program.values[input].alias_of = Some(snap);
        let mut outs = Vec::new();
        for (name, want) in ADAPTER_OUTPUTS.iter().zip([vec![1, d], vec![1, d], vec![c, d], vec![1, c]]) {
            let full = format!("{ADAPTER_PREFIX}{name}");
            let (_, out) =
                afwd.outputs.iter().find(|(n, _)| *n == full).ok_or_else(|| bad(format!("no output '{name}'")))?;
            let (buf, shape) = match out {
                GraphOutput::Value { id, shape } => {
                    program.pinned_end.retain(|v| v != id);
                    (BufRef::Value(*id), shape.clone())
                }
                GraphOutput::Const(t) => {
                    let t = t.clone();
                    let shape = t.shape.clone();
                    (BufRef::Weight(program.weight(&format!("{full}:const"), || WeightInit::Tensor(t), false)), shape)
                }
            };
            let ok = if *name == "delta_w" {
                shape == want
            } else {
                shape.iter().product::<usize>() == want.iter().product::<usize>()
            };
            if !ok {
                return Err(bad(format!(
                    "output '{name}' has shape {shape:?}; this model (C = {c} classes, D = {d} features into its final layer) needs {want:?}"
                )));
            }
            outs.push(buf);
        }
        let modulated = program.value(bc);
        let probs1 = program.value(bc);
        let ent1 = program.value(b as u64 * 4);
        let packed = cx.temp((adapter_pack_len(c, d, layer.bias) * 4) as u64);
        cx.dispatches.extend(adapter_logits(
            BufRef::Value(layer.h),
            layer.w,
            layer.layout,
            layer.alpha,
            layer.bias,
            layer.beta,
            [outs[0], outs[1], outs[2], outs[3]],
            packed,
            BufRef::Value(modulated),
            b,
            c,
            d,
        ));
        cx.dispatches.extend(loss::softmax_stats(
            BufRef::Value(modulated),
            b,
            c,
            BufRef::Value(probs1),
            BufRef::Value(ent1),
        ));
        cx.current = BufRef::Value(probs1);
        Ok(())
    }
}

/// Loads the adapter and checks its interface; tensor names are prefixed (see [`ADAPTER_PREFIX`]).
fn load_adapter(path: &Path) -> Result<Graph, OutputError> {
    let bad = |reason: String| OutputError::Adapter { path: path.to_path_buf(), reason };
    let g = Graph::load(path).map_err(|e| bad(e.to_string()))?;
    let inputs: Vec<&str> = g.inputs.iter().map(|i| i.name.as_str()).collect();
    if inputs != ["prior"] {
        return Err(bad(format!("expected one input named \"prior\" [1, C], found {inputs:?}")));
    }
    for name in ADAPTER_OUTPUTS {
        if !g.outputs.iter().any(|o| o.name == name) {
            let found: Vec<&str> = g.outputs.iter().map(|o| o.name.as_str()).collect();
            return Err(bad(format!(
                "no output named \"{name}\" (expected gamma [1, D], beta [1, D], delta_w [C, D], delta_b [1, C]; found {found:?})"
            )));
        }
    }
    Ok(prefixed(g, ADAPTER_PREFIX))
}

/// `g` with every tensor and node name prefixed.
fn prefixed(mut g: Graph, prefix: &str) -> Graph {
    let p = |s: &String| if s.is_empty() { String::new() } else { format!("{prefix}{s}") };
    for n in &mut g.nodes {
        n.name = format!("{prefix}{}", n.name);
        n.inputs = n.inputs.iter().map(p).collect();
        n.outputs = n.outputs.iter().map(p).collect();
    }
    g.initializers = g.initializers.iter().map(|(k, v)| (p(k), v.clone())).collect();
    for i in g.inputs.iter_mut().chain(g.outputs.iter_mut()) {
        i.name = p(&i.name);
    }
    g
}

/// The node whose output is the graph's first output, through views (Flatten, Reshape, ...).
fn final_layer_node(graph: &Graph) -> Result<usize, String> {
    let mut name = graph.outputs.first().map(|o| o.name.clone()).ok_or("the model has no output")?;
    loop {
        let idx = graph
            .nodes
            .iter()
            .position(|n| n.outputs.first() == Some(&name))
            .ok_or_else(|| format!("no node computes the output '{name}'"))?;
        let n = &graph.nodes[idx];
        if n.op.is_alias() {
            name = n.inputs[0].clone();
            continue;
        }
        return match n.op {
            Op::Gemm(_) | Op::MatMul | Op::Binary(crate::ops::elementwise::BinaryKind::Add) => Ok(idx),
            _ => Err(format!(
                "the label-shift adapter modulates the final layer, but the output comes from {} node '{}', not from a Gemm or MatMul (+ Add bias)",
                n.op_type, n.name
            )),
        };
    }
}

/// Where the final layer's weight is, as the adapter kernel reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// W[c, d] at c·D + d (Gemm with transB = 1).
    ClassMajor = 0,
    /// W[c, d] at d·C + c (Gemm with transB = 0, MatMul h·W).
    FeatureMajor = 1,
}

/// The final layer as the step program holds it.
struct FinalLayer {
    h: usize,
    d: usize,
    w: BufRef,
    layout: WeightLayout,
    alpha: f32,
    bias: Option<(BufRef, bool)>,
    beta: f32,
}

fn constant_operand(o: &Option<Operand>) -> Option<&Operand> {
    o.as_ref().filter(|o| o.value.is_some() && matches!(o.buf, BufRef::Weight(_)))
}

/// The node of `fwd` that writes value `v`, looking through views.
fn producer(graph: &Graph, fwd: &Forward, mut v: usize) -> Option<usize> {
    loop {
        let k = fwd.nodes.iter().position(|ln| ln.outputs.first().is_some_and(|o| o.buf == BufRef::Value(v)))?;
        let ln = &fwd.nodes[k];
        if graph.nodes[ln.node].op.is_alias() {
            v = value_operand(&ln.inputs[0])?.0;
            continue;
        }
        return Some(k);
    }
}

fn final_layer(graph: &Graph, fwd: &Forward, logits: usize, c: usize) -> Result<FinalLayer, String> {
    let k = producer(graph, fwd, logits).ok_or("the logits are not computed by any node")?;
    let ln = &fwd.nodes[k];
    let node = &graph.nodes[ln.node];
    let bias_of = |o: &Operand| -> Result<(BufRef, bool), String> {
        match o.numel() {
            1 => Ok((o.buf, true)),
            n if n == c && o.shape.iter().rev().skip(1).all(|&d| d == 1) => Ok((o.buf, false)),
            _ => Err(format!("the final layer's bias has shape {:?}; expected [{c}] or one value", o.shape)),
        }
    };
    let matmul_weight = |ln: &crate::plan::LoweredNode| -> Result<(usize, usize, BufRef), String> {
        let (h, hs) = value_operand(&ln.inputs[0]).ok_or("the final MatMul's first input is not computed")?;
        let w = constant_operand(&ln.inputs[1]).ok_or("the final MatMul's weight is not a constant")?;
        if hs.len() != 2 || w.shape.len() != 2 || w.shape[1] != c || hs[1] != w.shape[0] {
            return Err(format!("the final MatMul multiplies {:?} by {:?}; expected [N, D] by [D, {c}]", hs, w.shape));
        }
        Ok((h, hs[1], w.buf))
    };
    let layer = match &node.op {
        Op::Gemm(a) => {
            if a.trans_a {
                return Err(format!(
                    "the final Gemm '{}' has transA = 1, so its input is not [batch, features]",
                    node.name
                ));
            }
            let (h, hs) = value_operand(&ln.inputs[0]).ok_or("the final Gemm's input A is not computed")?;
            let w = constant_operand(&ln.inputs[1]).ok_or("the final Gemm's weight B is not a constant")?;
            let (layout, wc, wd) = if a.trans_b {
                (WeightLayout::ClassMajor, w.shape.first().copied(), w.shape.get(1).copied())
            } else {
                (WeightLayout::FeatureMajor, w.shape.get(1).copied(), w.shape.first().copied())
            };
            if hs.len() != 2 || w.shape.len() != 2 || wc != Some(c) || wd != Some(hs[1]) {
                return Err(format!("the final Gemm takes {hs:?} and a weight {:?} to {c} classes", w.shape));
            }
            let bias = match ln.inputs.get(2).and_then(|o| o.as_ref()) {
                Some(o) if a.beta != 0.0 => {
                    if constant_operand(&Some(o.clone())).is_none() {
                        return Err("the final Gemm's bias is not a constant".into());
                    }
                    Some(bias_of(o)?)
                }
                _ => None,
            };
            FinalLayer { h, d: hs[1], w: w.buf, layout, alpha: a.alpha, bias, beta: a.beta }
        }
        Op::MatMul => {
            let (h, d, w) = matmul_weight(ln)?;
            FinalLayer { h, d, w, layout: WeightLayout::FeatureMajor, alpha: 1.0, bias: None, beta: 1.0 }
        }
        Op::Binary(crate::ops::elementwise::BinaryKind::Add) => {
            let (konst, other) = match (constant_operand(&ln.inputs[0]), constant_operand(&ln.inputs[1])) {
                (Some(k), None) => (k, &ln.inputs[1]),
                (None, Some(k)) => (k, &ln.inputs[0]),
                _ => return Err("the final Add is not MatMul(h, W) + a constant bias".into()),
            };
            let (v, _) = value_operand(other).ok_or("the final Add is not MatMul(h, W) + a constant bias")?;
            let mk = producer(graph, fwd, v).ok_or("the final Add's input is not computed")?;
            let mm = &fwd.nodes[mk];
            if !matches!(graph.nodes[mm.node].op, Op::MatMul) {
                return Err(format!(
                    "the final Add adds a constant to the output of {} node '{}', not of a MatMul",
                    graph.nodes[mm.node].op_type, graph.nodes[mm.node].name
                ));
            }
            let (h, d, w) = matmul_weight(mm)?;
            FinalLayer {
                h,
                d,
                w,
                layout: WeightLayout::FeatureMajor,
                alpha: 1.0,
                bias: Some(bias_of(konst)?),
                beta: 1.0,
            }
        }
        _ => {
            return Err(format!(
                "the output comes from {} node '{}', not from a Gemm or MatMul (+ Add bias)",
                node.op_type, node.name
            ));
        }
    };
    Ok(layer)
}

/// Words of [`adapter_logits`]' packed buffer: [γ (D) | β (D) | ΔW (C·D) | Δb (C) | b (C, 1 or
/// none)].
pub fn adapter_pack_len(c: usize, d: usize, bias: Option<(BufRef, bool)>) -> usize {
    2 * d + c * d + c + bias_len(c, bias)
}

fn bias_len(c: usize, bias: Option<(BufRef, bool)>) -> usize {
    match bias {
        None => 0,
        Some((_, false)) => c,
        Some((_, true)) => 1,
    }
}

/// The adapter's final layer: `out` [N, C] = (α·W + ΔW)(γ ⊙ h + β) + β_C·b + Δb. `packed`
/// ([`adapter_pack_len`] words) is a temporary: γ, β, ΔW, Δb and b are copied into it (two
/// `gather3` word copies, so results stay bit-identical) because downlevel (phone) limits allow
/// the kernel 4 storage buffers.
#[allow(clippy::too_many_arguments)]
pub fn adapter_logits(
    h: BufRef,
    w: BufRef,
    layout: WeightLayout,
    alpha: f32,
    bias: Option<(BufRef, bool)>,
    beta_c: f32,
    adapter: [BufRef; 4],
    packed: BufRef,
    out: BufRef,
    n: usize,
    c: usize,
    d: usize,
) -> Vec<Dispatch> {
    let [gamma, beta, dw, db] = adapter;
    let flag = match bias {
        None => 0,
        Some((_, false)) => 1,
        Some((_, true)) => 2,
    };
    let mut tail = vec![(db, c)];
    if let Some((b, _)) = bias {
        tail.push((b, bias_len(c, bias)));
    }
    vec![
        gather(&[(gamma, d), (beta, d), (dw, c * d)], packed, 0),
        gather(&tail, packed, 2 * d + c * d),
        output_dispatch(
            "adapter_logits",
            output_params(n, c, d, layout as usize, flag, alpha, beta_c),
            vec![h, w, packed, out],
            grid_1d(n * c, 64),
        ),
    ]
}
