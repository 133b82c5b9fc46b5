//! `[label_shift]`: corrections of any method's output probabilities for a shift of the label
//! distribution (tta-methods.md §6, §6b), p(y|x) ∝ p(y|x)·q̂(y)/p_s(y) with q̂ the EMA of the
//! batch-mean predictions (`ema`: each batch corrected with the estimate of the batches before
//! it, then the estimate moves), the EM (MLLS) estimate of the batch itself (`em`), or the BBSE
//! estimate of the batch itself from a source confusion matrix (`bbse`). Mode `adapter` feeds
//! the EMA estimate to the learned adapter ([`super::adapter`]) instead.
//!
//! The EMA estimate lives in the weight buffer [`PRIOR_BUFFER`], starts at p_s, survives between
//! batches (and in saved states), and returns to p_s when the session resets.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Section, Stage, StageCx, output_dispatch, output_params};
use crate::adapt::config::{AdaptConfig, Invalid, gpu_f32, unit_interval};
use crate::adapt::error::OutputError;
use crate::ops::{BufRef, Dispatch};
use crate::plan::WeightInit;
use crate::tensor::Tensor;

/// The weight buffer holding the running label-distribution estimate q̂ \[C\].
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

/// How the output probabilities are corrected for a shift of the label distribution
/// (tta-methods.md §6, §6b).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
#[repr(u32)]
pub enum LabelShiftMode {
    /// No correction.
    #[default]
    None = 0,
    /// Online: an EMA of the batch-mean predictions, each batch corrected with the estimate
    /// of the batches before it.
    Ema = 1,
    /// MLLS / EM (Saerens et al. 2002) on each batch.
    Em = 2,
    /// Black-box shift estimation (Lipton et al. 2018) on each batch, from a source confusion matrix.
    Bbse = 3,
    /// The learned label-shift adapter (Park et al. 2023) fed the EMA estimate.
    Adapter = 4,
}

crate::adapt::config::named_enum!(LabelShiftMode, "label-shift mode");

impl LabelShiftMode {
    pub const ALL: [LabelShiftMode; 5] =
        [LabelShiftMode::None, LabelShiftMode::Ema, LabelShiftMode::Em, LabelShiftMode::Bbse, LabelShiftMode::Adapter];

    pub fn name(self) -> &'static str {
        match self {
            LabelShiftMode::None => "none",
            LabelShiftMode::Ema => "ema",
            LabelShiftMode::Em => "em",
            LabelShiftMode::Bbse => "bbse",
            LabelShiftMode::Adapter => "adapter",
        }
    }
}

/// The source label distribution p_s: inline values or a float32 `.npy` file of C values.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum SourcePrior {
    Values(Vec<f32>),
    File(PathBuf),
}

/// The `[label_shift]` section: a correction of any method's output probabilities.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LabelShiftSection {
    pub mode: LabelShiftMode,
    /// m of the estimate's EMA q̂ ← m·q̂ + (1 − m)·mean prediction (`ema`, `adapter`); f64 as
    /// the optimizer's hyperparameters, so that 1 − m is formed in double precision.
    pub momentum: f64,
    /// `adapter`: the adapter network (ONNX; input `prior` [1, C]; outputs `gamma` [1, D],
    /// `beta` [1, D], `delta_w` [C, D], `delta_b` [1, C]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
    /// `bbse`: the source confusion matrix, a float32 `.npy` [C, C], entry (i, j) the count or
    /// probability of predicting i for a source sample of class j.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confusion: Option<PathBuf>,
    /// p_s; uniform when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_prior: Option<SourcePrior>,
}

impl Default for LabelShiftSection {
    fn default() -> Self {
        LabelShiftSection {
            mode: LabelShiftMode::None,
            momentum: 0.9,
            adapter: None,
            confusion: None,
            source_prior: None,
        }
    }
}

impl Section for LabelShiftSection {
    fn validate(&self) -> Result<(), Invalid> {
        unit_interval("label_shift.momentum", self.momentum, true)?;
        gpu_f32("label_shift.momentum", self.momentum)?;
        if self.mode == LabelShiftMode::Adapter && self.adapter.is_none() {
            return Err(Invalid::new(
                "label_shift.adapter",
                "(missing)",
                "mode \"adapter\" needs the adapter's ONNX file",
            ));
        }
        if self.mode == LabelShiftMode::Bbse && self.confusion.is_none() {
            return Err(Invalid::new(
                "label_shift.confusion",
                "(missing)",
                "mode \"bbse\" needs the source confusion matrix (a [C, C] float32 .npy)",
            ));
        }
        if let Some(SourcePrior::Values(v)) = &self.source_prior
            && (v.is_empty() || v.iter().any(|p| !(p.is_finite() && *p > 0.0)))
        {
            return Err(Invalid::new(
                "label_shift.source_prior",
                format!("{v:?}"),
                "every class needs a finite probability > 0",
            ));
        }
        Ok(())
    }

    fn paths(&mut self) -> Vec<&mut PathBuf> {
        let prior_file = match &mut self.source_prior {
            Some(SourcePrior::File(f)) => Some(f),
            _ => None,
        };
        [&mut self.adapter, &mut self.confusion].into_iter().flatten().chain(prior_file).collect()
    }
}

pub(crate) fn normalised_prior(v: &[f32]) -> Result<Vec<f32>, String> {
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

/// The EMA estimate: `snap`[..C] ← `q`; `snap`[C..2C] ← the next estimate: if `gate`\[0\] ≠ 0,
/// m·q + (1 − m)·mean of `probs` when every value is finite, else `q` (one workgroup decides for
/// all classes). The parameter guard commits it into `q` at the end of the program.
pub fn prior_ema(probs: BufRef, q: BufRef, snap: BufRef, gate: BufRef, n: usize, c: usize, momentum: f64) -> Dispatch {
    let rest = (1.0 - momentum) as f32;
    output_dispatch(
        "ls_prior_ema",
        output_params(n, c, 0, 0, 0, momentum as f32, rest),
        vec![probs, q, snap, gate],
        [1, 1, 1],
    )
}

/// `out`_i ∝ `probs`_i ⊙ `q` / `ps`.
pub fn correct(probs: BufRef, q: BufRef, ps: BufRef, out: BufRef, n: usize, c: usize) -> Dispatch {
    output_dispatch(
        "ls_correct",
        output_params(n, c, 0, 0, 0, 0.0, 0.0),
        vec![probs, q, ps, out],
        [n.div_ceil(64) as u32, 1, 1],
    )
}

/// EM (MLLS) on `probs` [N, C]: writes the estimate `q` \[C\]; `z_info` [N + 2] holds the row
/// normalisers, then the iterations run and the last change (one buffer: downlevel limits allow
/// 4 storage buffers per kernel).
pub fn em(probs: BufRef, ps: BufRef, q: BufRef, z_info: BufRef, n: usize, c: usize) -> Dispatch {
    output_dispatch(
        "ls_em",
        output_params(n, c, 0, EM_MAX_ITERATIONS as usize, 0, EM_TOLERANCE, 0.0),
        vec![probs, ps, q, z_info],
        [1, 1, 1],
    )
}

/// BBSE on `probs` [N, C] with `matrix` = (CᵀC + 1e-8·I)⁻¹Cᵀ: writes the estimate `q` \[C\];
/// `tmp` [N + 2C + C·C] is a temporary, into which `matrix` and `ps` are copied first
/// (downlevel limits allow 4 storage buffers per kernel).
pub fn bbse(probs: BufRef, matrix: BufRef, ps: BufRef, q: BufRef, tmp: BufRef, n: usize, c: usize) -> Vec<Dispatch> {
    vec![
        crate::ops::layout::gather(&[(matrix, c * c), (ps, c)], tmp, n + c),
        output_dispatch("ls_bbse", output_params(n, c, 0, 0, 0, 0.0, 0.0), vec![probs, q, tmp], [1, 1, 1]),
    ]
}

/// p_s as configured (normalised), or `None` for uniform.
pub(crate) fn source_prior(config: &AdaptConfig) -> Result<Option<Vec<f32>>, OutputError> {
    Ok(match &config.label_shift.source_prior {
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
    })
}

/// The error of a mode whose file is not configured.
pub(crate) fn missing(mode: LabelShiftMode, what: &str) -> OutputError {
    OutputError::Plan(format!("label_shift.{what} is required by mode {mode}"))
}

/// The correction a config asks for (the last stage of the chain); `None` for modes `none` and
/// `adapter`. BBSE's confusion matrix is read here.
pub(crate) fn correction(config: &AdaptConfig) -> Result<Option<Arc<dyn Stage>>, OutputError> {
    let ls = &config.label_shift;
    Ok(match ls.mode {
        LabelShiftMode::None | LabelShiftMode::Adapter => None,
        LabelShiftMode::Ema => Some(Arc::new(Correction::Ema { momentum: ls.momentum })),
        LabelShiftMode::Em => Some(Arc::new(Correction::Em)),
        LabelShiftMode::Bbse => {
            let path = ls.confusion.as_ref().ok_or_else(|| missing(ls.mode, "confusion"))?;
            let (matrix, classes) = bbse_matrix_from_file(path)?;
            Some(Arc::new(Correction::Bbse { matrix, classes }))
        }
    })
}

/// The prior correction, resolved.
#[derive(Clone, Debug)]
pub enum Correction {
    /// The online EMA estimate of the batches before this one.
    Ema { momentum: f64 },
    /// MLLS on the batch itself.
    Em,
    /// BBSE on the batch itself; `matrix` = (CᵀC + 1e-8·I)⁻¹Cᵀ [C, C] row-major, from the
    /// normalised confusion matrix.
    Bbse { matrix: Vec<f32>, classes: usize },
}

impl Stage for Correction {
    fn lower(&self, cx: &mut StageCx<'_>) -> Result<(), OutputError> {
        let (b, c) = (cx.b, cx.c);
        let bc = (b * c * 4) as u64;
        let q = match self {
            Correction::Ema { momentum } => {
                let snap = cx.program.value(2 * c as u64 * 4);
                let ps = cx.source_prior.to_vec();
                let q =
                    cx.program.weight(PRIOR_BUFFER, || WeightInit::Tensor(Arc::new(Tensor::f32(vec![c], ps))), true);
                let g = cx.program.weight(
                    GATE_BUFFER,
                    || WeightInit::Tensor(Arc::new(Tensor::f32(vec![1], vec![1.0]))),
                    true,
                );
                cx.dispatches.push(prior_ema(
                    cx.current,
                    BufRef::Weight(q),
                    BufRef::Value(snap),
                    BufRef::Weight(g),
                    b,
                    c,
                    *momentum,
                ));
                cx.gate = Some(g);
                cx.deferred = Some((snap, c, q, c));
                snap
            }
            Correction::Em => {
                let q = cx.program.value(c as u64 * 4);
                let z_info = cx.temp(((b + 2) * 4) as u64);
                let ps = cx.source_prior_weight();
                cx.dispatches.push(em(cx.current, ps, BufRef::Value(q), z_info, b, c));
                q
            }
            Correction::Bbse { matrix, classes } => {
                if *classes != c {
                    return Err(OutputError::Plan(format!(
                        "label_shift.confusion is [{classes}, {classes}], the model has {c} classes"
                    )));
                }
                let m = cx.program.weight(
                    "ls:bbse_matrix",
                    || WeightInit::Tensor(Arc::new(Tensor::f32(vec![c, c], matrix.clone()))),
                    false,
                );
                let q = cx.program.value(c as u64 * 4);
                let tmp = cx.temp(((b + 2 * c + c * c) * 4) as u64);
                let ps = cx.source_prior_weight();
                cx.dispatches.extend(bbse(cx.current, BufRef::Weight(m), ps, BufRef::Value(q), tmp, b, c));
                q
            }
        };
        let out = cx.program.value(bc);
        let ps = cx.source_prior_weight();
        cx.dispatches.push(correct(cx.current, BufRef::Value(q), ps, BufRef::Value(out), b, c));
        cx.current = BufRef::Value(out);
        cx.prior = Some(q);
        Ok(())
    }
}
