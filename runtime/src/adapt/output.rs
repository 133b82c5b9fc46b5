//! Output stages of an adaptation step: LAME and the label-shift corrections, on the GPU in the
//! step's command buffer, right after the forward pass (kernels in `shaders/output.wgsl`;
//! semantics in tta-methods.md §5, §6, §6b).
//!
//! The stages act on the probabilities a method returns (softmax of its pre-update logits):
//!
//! 1. **Label-shift adapter** (`label_shift.mode = "adapter"`): the adapter network (folded into
//!    the step program) maps the current estimate q̂ to (γ, β, ΔW, Δb), and the final layer is
//!    recomputed as logits' = (W + ΔW)(γ ⊙ h + β) + (b + Δb) from its input h; probabilities are
//!    softmax(logits'). The method's loss still sees the unmodulated logits: the adapter only
//!    changes what is returned.
//! 2. **LAME** (method `lame`): Laplacian smoothing of the probabilities over the batch's
//!    L2-normalised features (fixed point Y ← softmax(log(P + 1e-10) + λ·W·Y)).
//! 3. **Prior correction** (`ema`, `em`, `bbse`): p(y|x) ∝ p(y|x)·q̂(y)/p_s(y) with q̂ the EMA
//!    of the batch-mean predictions (each batch corrected with the estimate of the batches
//!    before it, then the estimate moves), the EM (MLLS) estimate of the batch itself, or the
//!    BBSE estimate of the batch itself from a source confusion matrix.
//!
//! The EMA estimate (modes `ema` and `adapter`) is fed the probabilities entering stage 3: the
//! method's own (LAME's for `lame`) for `ema`, the unmodulated softmax(logits) for `adapter`. It
//! lives in the weight buffer [`PRIOR_BUFFER`], starts at p_s, survives between batches (and in
//! saved states), and [`super::Session::reset`] returns it to p_s.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use super::config::{AdaptConfig, Affinity, LabelShiftMode, Method, SourcePrior};
use super::loss;
use crate::gpu::{GpuContext, KernelKey, Params, Shader, grid_1d};
use crate::ir::{Dim, Graph};
use crate::ops::{BufRef, Dispatch, Op, Operand};
use crate::plan::{Forward, GraphOutput, Item, NoHook, Program, WeightInit, lower_forward};
use crate::tensor::Tensor;

/// The weight buffer holding the running label-distribution estimate q̂ [C].
pub const PRIOR_BUFFER: &str = "ls:prior";
/// A one-value weight buffer: 1 lets the EMA estimate move, 0 holds it (later steps on the
/// same batch, whose outputs are not returned).
pub const GATE_BUFFER: &str = "ls:gate";
/// Ridge of BBSE's normal equations (tta-methods.md §6b.2).
pub const BBSE_RIDGE: f64 = 1e-8;
/// EM stops when Σ|q' − q| falls below this (tta-methods.md §6b.1).
pub const EM_TOLERANCE: f32 = 1e-6;
/// Most EM iterations per batch. The reference code allows 10 000; EM on a batch of tens of
/// samples converges in far fewer, and this bounds the single-workgroup kernel's run time
/// when the likelihood is flat (a class whose estimate creeps towards 0).
pub const EM_MAX_ITERATIONS: u32 = 1000;
/// The prefix of the adapter's tensor names inside the step program, so that its weights never
/// share a name (and so a buffer) with the model's.
const ADAPTER_PREFIX: &str = "ls_adapter/";
const ADAPTER_OUTPUTS: [&str; 4] = ["gamma", "beta", "delta_w", "delta_b"];

/// Why an output stage cannot be set up.
#[derive(Debug, Error)]
pub enum OutputError {
    #[error("lame.features: {0}")]
    Features(String),
    #[error("label_shift.adapter {}: {reason}", path.display())]
    Adapter { path: PathBuf, reason: String },
    #[error("label_shift.confusion {}: {reason}", path.display())]
    Confusion { path: PathBuf, reason: String },
    #[error("label_shift.source_prior: {0}")]
    SourcePrior(String),
    #[error("output stage: {0}")]
    Plan(String),
}

/// Which tensor LAME reads its features from.
#[derive(Clone, Debug, PartialEq)]
pub enum Features {
    /// The input of the graph's final Gemm/MatMul (the penultimate features).
    Auto,
    /// A computed tensor, by name (flattened per sample).
    Named(String),
}

/// LAME's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct LameSpec {
    pub affinity: Affinity,
    pub knn: usize,
    pub lambda: f32,
    pub max_steps: u32,
    pub features: Features,
}

/// The label-shift correction, resolved.
#[derive(Clone, Debug)]
pub enum LabelShift {
    None,
    Ema {
        momentum: f64,
    },
    Em,
    /// `matrix` = (CᵀC + 1e-8·I)⁻¹Cᵀ [C, C] row-major, from the normalised confusion matrix.
    Bbse {
        matrix: Vec<f32>,
        classes: usize,
    },
    /// The adapter graph (its tensor names prefixed) and the EMA momentum of its input.
    Adapter {
        momentum: f64,
        graph: Arc<Graph>,
        path: PathBuf,
    },
}

/// Everything the output stage of a step does.
#[derive(Clone, Debug)]
pub struct OutputSpec {
    pub lame: Option<LameSpec>,
    pub label_shift: LabelShift,
    /// p_s, normalised; `None`: uniform over the model's classes.
    pub source_prior: Option<Vec<f32>>,
}

impl OutputSpec {
    /// The output stage a config asks for (`None` when it asks for none), checked against the
    /// model's graph as far as that is possible before input shapes are known; files (adapter,
    /// confusion matrix, source prior) are read here.
    pub fn from_config(config: &AdaptConfig, graph: &Graph) -> Result<Option<OutputSpec>, OutputError> {
        let lame = (config.adapt.method == Method::Lame).then(|| {
            let l = &config.lame;
            let features = if l.features == "auto" { Features::Auto } else { Features::Named(l.features.clone()) };
            LameSpec { affinity: l.affinity, knn: l.knn, lambda: l.lambda, max_steps: l.max_steps, features }
        });
        let ls = &config.label_shift;
        if lame.is_none() && ls.mode == LabelShiftMode::None {
            return Ok(None);
        }
        if let Some(l) = &lame {
            check_features(graph, &l.features)?;
        }
        let source_prior = match &ls.source_prior {
            None => None,
            Some(SourcePrior::Values(v)) => Some(normalised_prior(v).map_err(OutputError::SourcePrior)?),
            Some(SourcePrior::File(path)) => {
                let in_file = |reason: String| OutputError::SourcePrior(format!("{}: {reason}", path.display()));
                let t = crate::npy::read_f32(path).map_err(|e| in_file(e.to_string()))?;
                if t.shape.len() != 1 {
                    return Err(in_file(format!("expected a vector of C values, got shape {:?}", t.shape)));
                }
                Some(normalised_prior(&t.to_f32_vec()).map_err(in_file)?)
            }
        };
        let missing = |what: &str| OutputError::Plan(format!("label_shift.{what} is required by mode {}", ls.mode));
        let label_shift = match ls.mode {
            LabelShiftMode::None => LabelShift::None,
            LabelShiftMode::Ema => LabelShift::Ema { momentum: ls.momentum },
            LabelShiftMode::Em => LabelShift::Em,
            LabelShiftMode::Bbse => {
                let path = ls.confusion.as_ref().ok_or_else(|| missing("confusion"))?;
                let (matrix, classes) = bbse_matrix_from_file(path)?;
                LabelShift::Bbse { matrix, classes }
            }
            LabelShiftMode::Adapter => {
                let path = ls.adapter.as_ref().ok_or_else(|| missing("adapter"))?;
                LabelShift::Adapter { momentum: ls.momentum, graph: Arc::new(load_adapter(path)?), path: path.clone() }
            }
        };
        if matches!(label_shift, LabelShift::Adapter { .. }) {
            final_layer_node(graph).map_err(OutputError::Plan)?;
        }
        Ok(Some(OutputSpec { lame, label_shift, source_prior }))
    }

    /// p_s for a model with `classes` outputs.
    pub fn source_prior_for(&self, classes: usize) -> Vec<f32> {
        match &self.source_prior {
            Some(p) => p.clone(),
            None => vec![1.0 / classes as f32; classes],
        }
    }
}

fn normalised_prior(v: &[f32]) -> Result<Vec<f32>, String> {
    if v.is_empty() || v.iter().any(|p| !(p.is_finite() && *p > 0.0)) {
        return Err(format!("every class needs a finite probability > 0, got {v:?}"));
    }
    let s: f64 = v.iter().map(|&p| p as f64).sum();
    Ok(v.iter().map(|&p| (p as f64 / s) as f32).collect())
}

/// BBSE's matrix from a confusion matrix file (counts or joint probabilities, row = predicted
/// class, column = true class).
fn bbse_matrix_from_file(path: &Path) -> Result<(Vec<f32>, usize), OutputError> {
    let bad = |reason: String| OutputError::Confusion { path: path.to_path_buf(), reason };
    let t = crate::npy::read_f32(path).map_err(|e| bad(e.to_string()))?;
    if t.shape.len() != 2 || t.shape[0] != t.shape[1] || t.shape[0] == 0 {
        return Err(bad(format!("expected a square [C, C] matrix, got shape {:?}", t.shape)));
    }
    let c = t.shape[0];
    let m = bbse_matrix(&t.to_f32_vec(), c).map_err(bad)?;
    Ok((m, c))
}

/// (CᵀC + 1e-8·I)⁻¹Cᵀ in f64 for the confusion matrix `confusion` [C, C] (row = predicted,
/// column = true class), normalised to sum 1 first, so counts and joint probabilities give the
/// same matrix. Computed once on the host: the GPU only multiplies it by μ̂.
pub fn bbse_matrix(confusion: &[f32], c: usize) -> Result<Vec<f32>, String> {
    if confusion.len() != c * c {
        return Err(format!("{} values do not make a [{c}, {c}] matrix", confusion.len()));
    }
    if let Some(v) = confusion.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
        return Err(format!("entries must be finite and >= 0, found {v}"));
    }
    let total: f64 = confusion.iter().map(|&v| v as f64).sum();
    if total <= 0.0 {
        return Err("the matrix is all zeros".into());
    }
    let cm: Vec<f64> = confusion.iter().map(|&v| v as f64 / total).collect();
    // A = CᵀC + ridge·I, then solve A·X = Cᵀ by Gauss–Jordan with partial pivoting.
    let mut a = vec![0.0f64; c * c];
    for i in 0..c {
        for j in 0..c {
            a[i * c + j] = (0..c).map(|k| cm[k * c + i] * cm[k * c + j]).sum::<f64>();
        }
        a[i * c + i] += BBSE_RIDGE;
    }
    let mut x: Vec<f64> = (0..c * c).map(|idx| cm[(idx % c) * c + idx / c]).collect();
    for col in 0..c {
        let piv = (col..c).max_by(|&p, &q| a[p * c + col].abs().total_cmp(&a[q * c + col].abs())).unwrap_or(col);
        if a[piv * c + col].abs() < 1e-300 {
            return Err("CᵀC + 1e-8·I is singular".into());
        }
        if piv != col {
            for k in 0..c {
                a.swap(col * c + k, piv * c + k);
                x.swap(col * c + k, piv * c + k);
            }
        }
        let d = a[col * c + col];
        for k in 0..c {
            a[col * c + k] /= d;
            x[col * c + k] /= d;
        }
        for r in 0..c {
            if r != col {
                let f = a[r * c + col];
                if f != 0.0 {
                    for k in 0..c {
                        a[r * c + k] -= f * a[col * c + k];
                        x[r * c + k] -= f * x[col * c + k];
                    }
                }
            }
        }
    }
    Ok(x.iter().map(|&v| v as f32).collect())
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

/// The graph-level check of `lame.features`: the named tensor is computed by a node (or is the
/// input); "auto" needs a Gemm or MatMul.
fn check_features(graph: &Graph, features: &Features) -> Result<(), OutputError> {
    match features {
        Features::Auto => {
            if !graph.nodes.iter().any(|n| matches!(n.op, Op::Gemm(_) | Op::MatMul)) {
                return Err(OutputError::Features(
                    "\"auto\" takes the input of the graph's final Gemm/MatMul, and this graph has none: name the features tensor instead".into(),
                ));
            }
        }
        Features::Named(name) => {
            if graph.initializers.contains_key(name) {
                return Err(OutputError::Features(format!(
                    "'{name}' is a constant of the model, not a computed tensor"
                )));
            }
            let computed = graph.nodes.iter().any(|n| n.outputs.iter().any(|o| o == name))
                || graph.inputs.iter().any(|i| &i.name == name);
            if !computed {
                return Err(OutputError::Features(format!("the model computes no tensor named '{name}'")));
            }
        }
    }
    Ok(())
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

fn value_operand(o: &Option<Operand>) -> Option<(usize, Vec<usize>)> {
    match o {
        Some(Operand { buf: BufRef::Value(v), shape, .. }) => Some((*v, shape.clone())),
        _ => None,
    }
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

/// LAME's features: value id and per-sample dimension.
fn lame_features(graph: &Graph, fwd: &Forward, features: &Features, b: usize) -> Result<(usize, usize), String> {
    let (v, shape, what) = match features {
        Features::Auto => {
            let ln = fwd
                .nodes
                .iter()
                .rev()
                .find(|ln| matches!(graph.nodes[ln.node].op, Op::Gemm(_) | Op::MatMul))
                .ok_or("\"auto\": the graph has no Gemm or MatMul left after constant folding")?;
            let node = &graph.nodes[ln.node];
            if let Op::Gemm(a) = &node.op
                && a.trans_a
            {
                return Err(format!(
                    "\"auto\": the final Gemm '{}' has transA = 1, so its input is not [batch, features]; name the features tensor",
                    node.name
                ));
            }
            let (v, shape) = value_operand(&ln.inputs[0])
                .ok_or_else(|| format!("\"auto\": the first input of '{}' is a constant", node.name))?;
            (v, shape, format!("the input of '{}'", node.name))
        }
        Features::Named(name) => {
            let info =
                fwd.spec.values.get(name).ok_or_else(|| format!("the model computes no tensor named '{name}'"))?;
            if info.konst.is_some() {
                return Err(format!("'{name}' is a constant for this input shape, not a per-sample tensor"));
            }
            let v = *fwd.value_of.get(name).ok_or_else(|| format!("'{name}' has no buffer in the step"))?;
            (v, info.shape.clone(), format!("'{name}'"))
        }
    };
    if shape.first() != Some(&b) || shape.iter().product::<usize>() == 0 {
        return Err(format!("{what} has shape {shape:?}; features need the batch ({b}) as their first dimension"));
    }
    Ok((v, shape.iter().skip(1).product()))
}

/// The values the output stage writes.
#[derive(Clone, Debug)]
pub struct OutputStage {
    /// The output probabilities [B, C].
    pub probs: usize,
    /// The prior q̂ the batch was corrected with [C] (every mode but `none`).
    pub prior: Option<usize>,
    /// The gate of the EMA estimate (weight id), when the stage keeps one.
    pub gate: Option<usize>,
    /// The estimate's next value, committed by the parameter guard at the end of the program:
    /// (value, offset, the estimate's weight id, classes).
    pub deferred: Option<(usize, usize, usize, usize)>,
}

fn temp(scratch: &mut Vec<u64>, bytes: u64) -> BufRef {
    scratch.push(bytes.max(4));
    BufRef::Scratch(scratch.len() - 1)
}

fn p(n: usize, c: usize, d: usize, k: usize, flag: u32, x: f32, y: f32) -> Params {
    Params::new().u32(n as u32).u32(c as u32).u32(d as u32).u32(k as u32).u32(flag).f32(x).f32(y).f32(0.0)
}

fn dispatch(entry: &'static str, params: Params, buffers: Vec<BufRef>, workgroups: [u32; 3]) -> Dispatch {
    Dispatch { key: KernelKey::new(Shader::Output, entry), params, buffers, workgroups }
}

/// LAME on `probs` [N, C] with features `h` [N, D]: writes `y` [N, C] and `info` [2]
/// (iterations run, final energy). `z` [N·D], `dmat` [N·N], `w` [N·N], `pair` and `lp` [N·C]
/// are temporaries.
#[allow(clippy::too_many_arguments)]
pub fn lame(
    spec: &LameSpec,
    h: BufRef,
    probs: BufRef,
    n: usize,
    c: usize,
    d: usize,
    temps: [BufRef; 5],
    y: BufRef,
    info: BufRef,
) -> Vec<Dispatch> {
    let [z, dmat, w, pair, lp] = temps;
    let flag = spec.affinity as u32;
    vec![
        dispatch("lame_normalize", p(n, c, d, 0, 0, 0.0, 0.0), vec![h, z], [n.div_ceil(64) as u32, 1, 1]),
        dispatch("lame_affinity", p(n, c, d, 0, flag, 0.0, 0.0), vec![z, dmat], grid_1d(n * n, 64)),
        dispatch("lame_kernel", p(n, c, d, spec.knn, flag, 0.0, 0.0), vec![dmat, w], [1, 1, 1]),
        dispatch(
            "lame_iterate",
            p(n, c, d, spec.max_steps as usize, 0, spec.lambda, 0.0),
            vec![probs, w, y, pair, lp, info],
            [1, 1, 1],
        ),
    ]
}

/// The EMA estimate: `snap`[..C] ← `q`; `snap`[C..2C] ← the next estimate: if `gate`[0] ≠ 0,
/// m·q + (1 − m)·mean of `probs` when every value is finite, else `q` (one workgroup decides for
/// all classes). The parameter guard commits it into `q` at the end of the program.
pub fn prior_ema(probs: BufRef, q: BufRef, snap: BufRef, gate: BufRef, n: usize, c: usize, momentum: f64) -> Dispatch {
    let rest = (1.0 - momentum) as f32;
    dispatch("ls_prior_ema", p(n, c, 0, 0, 0, momentum as f32, rest), vec![probs, q, snap, gate], [1, 1, 1])
}

/// `out`_i ∝ `probs`_i ⊙ `q` / `ps`.
pub fn correct(probs: BufRef, q: BufRef, ps: BufRef, out: BufRef, n: usize, c: usize) -> Dispatch {
    dispatch("ls_correct", p(n, c, 0, 0, 0, 0.0, 0.0), vec![probs, q, ps, out], [n.div_ceil(64) as u32, 1, 1])
}

/// EM (MLLS) on `probs` [N, C]: writes the estimate `q` [C] and `info` [2] (iterations, last
/// change); `z` [N] is a temporary.
pub fn em(probs: BufRef, ps: BufRef, q: BufRef, z: BufRef, info: BufRef, n: usize, c: usize) -> Dispatch {
    dispatch(
        "ls_em",
        p(n, c, 0, EM_MAX_ITERATIONS as usize, 0, EM_TOLERANCE, 0.0),
        vec![probs, ps, q, z, info],
        [1, 1, 1],
    )
}

/// BBSE on `probs` [N, C] with `matrix` = (CᵀC + 1e-8·I)⁻¹Cᵀ: writes the estimate `q` [C];
/// `tmp` [N + C] is a temporary.
pub fn bbse(probs: BufRef, matrix: BufRef, ps: BufRef, q: BufRef, tmp: BufRef, n: usize, c: usize) -> Dispatch {
    dispatch("ls_bbse", p(n, c, 0, 0, 0, 0.0, 0.0), vec![probs, matrix, ps, q, tmp], [1, 1, 1])
}

/// The adapter's final layer: `out` [N, C] = (α·W + ΔW)(γ ⊙ h + β) + β_C·b + Δb.
#[allow(clippy::too_many_arguments)]
pub fn adapter_logits(
    h: BufRef,
    w: BufRef,
    layout: WeightLayout,
    alpha: f32,
    bias: Option<(BufRef, bool)>,
    beta_c: f32,
    adapter: [BufRef; 4],
    out: BufRef,
    n: usize,
    c: usize,
    d: usize,
) -> Dispatch {
    let [gamma, beta, dw, db] = adapter;
    let (b, flag) = match bias {
        None => (w, 0),
        Some((b, false)) => (b, 1),
        Some((b, true)) => (b, 2),
    };
    dispatch(
        "adapter_logits",
        p(n, c, d, layout as usize, flag, alpha, beta_c),
        vec![h, w, b, gamma, beta, dw, db, out],
        grid_1d(n * c, 64),
    )
}

/// Appends the output stage to `program`, after the forward pass `fwd` of `graph` whose logits
/// are value `logits` [B, C].
pub fn lower(
    ctx: &GpuContext,
    graph: &Graph,
    fwd: &Forward,
    spec: &OutputSpec,
    logits: usize,
    logits_shape: &[usize],
    program: &mut Program,
) -> Result<OutputStage, OutputError> {
    let err = OutputError::Plan;
    let [b, c] = logits_shape else {
        return Err(err(format!("output stages need logits of shape [batch, classes], got {logits_shape:?}")));
    };
    let (b, c) = (*b, *c);
    let bc = (b * c * 4) as u64;
    let ps = spec.source_prior_for(c);
    if ps.len() != c {
        return Err(OutputError::SourcePrior(format!("{} values for a model with {c} classes", ps.len())));
    }
    // p_s, declared where a kernel reads it; private to the program (a constant of the config).
    let source_prior = |program: &mut Program| {
        BufRef::Weight(program.weight(
            "ls:source_prior",
            || WeightInit::Tensor(Arc::new(Tensor::f32(vec![c], ps.clone()))),
            false,
        ))
    };
    let mut dispatches = Vec::new();
    let mut scratch: Vec<u64> = Vec::new();
    let probs0 = program.value(bc);
    let ent = program.value(b as u64 * 4);
    dispatches.extend(loss::softmax_stats(BufRef::Value(logits), b, c, BufRef::Value(probs0), BufRef::Value(ent)));
    let mut prior = None;
    let mut gate = None;
    let mut deferred = None;
    let mut current = BufRef::Value(probs0);
    if let LabelShift::Adapter { momentum, graph: adapter, path } = &spec.label_shift {
        let bad = |reason: String| OutputError::Adapter { path: path.clone(), reason };
        // q̂ of the batches before this one feeds the adapter; then the estimate moves with
        // this batch's unmodulated predictions.
        let snap = program.value(2 * c as u64 * 4);
        let q = program.weight(PRIOR_BUFFER, || WeightInit::Tensor(Arc::new(Tensor::f32(vec![c], ps.clone()))), true);
        let g = program.weight(GATE_BUFFER, || WeightInit::Tensor(Arc::new(Tensor::f32(vec![1], vec![1.0]))), true);
        dispatches.push(prior_ema(
            BufRef::Value(probs0),
            BufRef::Weight(q),
            BufRef::Value(snap),
            BufRef::Weight(g),
            b,
            c,
            *momentum,
        ));
        program.items.push(Item {
            label: "label-shift estimate".into(),
            dispatches: std::mem::take(&mut dispatches),
            scratch: vec![],
        });
        prior = Some(snap);
        gate = Some(g);
        deferred = Some((snap, c, q, c));
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
        dispatches.push(adapter_logits(
            BufRef::Value(layer.h),
            layer.w,
            layer.layout,
            layer.alpha,
            layer.bias,
            layer.beta,
            [outs[0], outs[1], outs[2], outs[3]],
            BufRef::Value(modulated),
            b,
            c,
            d,
        ));
        dispatches.extend(loss::softmax_stats(
            BufRef::Value(modulated),
            b,
            c,
            BufRef::Value(probs1),
            BufRef::Value(ent1),
        ));
        current = BufRef::Value(probs1);
    }
    if let Some(l) = &spec.lame {
        let (h, d) = lame_features(graph, fwd, &l.features, b).map_err(OutputError::Features)?;
        let y = program.value(bc);
        let info = program.value(8);
        let temps = [
            temp(&mut scratch, (b * d * 4) as u64),
            temp(&mut scratch, (b * b * 4) as u64),
            temp(&mut scratch, (b * b * 4) as u64),
            temp(&mut scratch, bc),
            temp(&mut scratch, bc),
        ];
        dispatches.extend(lame(l, BufRef::Value(h), current, b, c, d, temps, BufRef::Value(y), BufRef::Value(info)));
        current = BufRef::Value(y);
    }
    let q = match &spec.label_shift {
        LabelShift::None | LabelShift::Adapter { .. } => None,
        LabelShift::Ema { momentum } => {
            let snap = program.value(2 * c as u64 * 4);
            let q =
                program.weight(PRIOR_BUFFER, || WeightInit::Tensor(Arc::new(Tensor::f32(vec![c], ps.clone()))), true);
            let g = program.weight(GATE_BUFFER, || WeightInit::Tensor(Arc::new(Tensor::f32(vec![1], vec![1.0]))), true);
            dispatches.push(prior_ema(
                current,
                BufRef::Weight(q),
                BufRef::Value(snap),
                BufRef::Weight(g),
                b,
                c,
                *momentum,
            ));
            gate = Some(g);
            deferred = Some((snap, c, q, c));
            Some(snap)
        }
        LabelShift::Em => {
            let q = program.value(c as u64 * 4);
            let info = temp(&mut scratch, 8);
            let z = temp(&mut scratch, (b * 4) as u64);
            dispatches.push(em(current, source_prior(program), BufRef::Value(q), z, info, b, c));
            Some(q)
        }
        LabelShift::Bbse { matrix, classes } => {
            if *classes != c {
                return Err(err(format!("label_shift.confusion is [{classes}, {classes}], the model has {c} classes")));
            }
            let m = program.weight(
                "ls:bbse_matrix",
                || WeightInit::Tensor(Arc::new(Tensor::f32(vec![c, c], matrix.clone()))),
                false,
            );
            let q = program.value(c as u64 * 4);
            let tmp = temp(&mut scratch, ((b + c) * 4) as u64);
            dispatches.push(bbse(current, BufRef::Weight(m), source_prior(program), BufRef::Value(q), tmp, b, c));
            Some(q)
        }
    };
    if let Some(q) = q {
        let out = program.value(bc);
        dispatches.push(correct(current, BufRef::Value(q), source_prior(program), BufRef::Value(out), b, c));
        current = BufRef::Value(out);
        prior = Some(q);
    }
    let BufRef::Value(probs) = current else {
        return Err(err("the output probabilities are not a value".into()));
    };
    program.items.push(Item { label: "output stage".into(), dispatches, scratch });
    program.pinned_end.push(probs);
    if let Some(q) = prior {
        program.pinned_end.push(q);
    }
    Ok(OutputStage { probs, prior, gate, deferred })
}
