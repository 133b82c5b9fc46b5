//! Output stages of an adaptation step: LAME and the label-shift corrections, on the GPU in the
//! step's command buffer, right after the forward pass (kernels in `shaders/output.wgsl`;
//! semantics in tta-methods.md §5, §6, §6b). This module is the chain's driver; each stage is
//! a [`Stage`] in its method's file ([`methods::adapter`], [`methods::lame`],
//! [`methods::label_shift`]).
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

use std::sync::Arc;

use super::config::AdaptConfig;
use super::loss;
use super::methods::{self, Stage, StageCx};
use crate::gpu::GpuContext;
use crate::ir::Graph;
use crate::ops::BufRef;
use crate::plan::{Forward, Item, Program};

pub use super::error::OutputError;
pub use super::methods::adapter::{Adapter, WeightLayout, adapter_logits, adapter_pack_len};
pub use super::methods::label_shift::{
    BBSE_RIDGE, Correction, EM_MAX_ITERATIONS, EM_TOLERANCE, GATE_BUFFER, PRIOR_BUFFER, bbse, bbse_matrix, correct, em,
    prior_ema,
};
pub use super::methods::lame::{Features, LameSpec, lame, lame_work_len};

/// Everything the output stage of a step does.
#[derive(Clone, Debug)]
pub struct OutputSpec {
    /// The stages in order: the label-shift adapter, the method's own (LAME), the prior
    /// correction.
    pub stages: Vec<Arc<dyn Stage>>,
    /// p_s, normalised; `None`: uniform over the model's classes.
    pub source_prior: Option<Vec<f32>>,
}

impl OutputSpec {
    /// The output stage a config asks for (`None` when it asks for none), checked against the
    /// model's graph as far as that is possible before input shapes are known; files (adapter,
    /// confusion matrix, source prior) are read here.
    pub fn from_config(config: &AdaptConfig, graph: &Graph) -> Result<Option<OutputSpec>, OutputError> {
        let own = config.adapt.method.def().output_stage(config, graph)?;
        if own.is_none() && config.label_shift.mode == methods::label_shift::LabelShiftMode::None {
            return Ok(None);
        }
        let source_prior = methods::label_shift::source_prior(config)?;
        let correction = methods::label_shift::correction(config)?;
        let adapter = methods::adapter::stage(config, graph)?;
        let stages = adapter.into_iter().chain(own).chain(correction).collect();
        Ok(Some(OutputSpec { stages, source_prior }))
    }

    /// p_s for a model with `classes` outputs.
    pub fn source_prior_for(&self, classes: usize) -> Vec<f32> {
        match &self.source_prior {
            Some(p) => p.clone(),
            None => vec![1.0 / classes as f32; classes],
        }
    }
}

/// The values the output stage writes.
#[derive(Clone, Debug)]
pub struct OutputStage {
    /// The output probabilities [B, C].
    pub probs: usize,
    /// The prior q̂ the batch was corrected with \[C\] (every mode but `none`).
    pub prior: Option<usize>,
    /// The gate of the EMA estimate (weight id), when the stage keeps one.
    pub gate: Option<usize>,
    /// The estimate's next value, committed by the parameter guard at the end of the program:
    /// (value, offset, the estimate's weight id, classes).
    pub deferred: Option<(usize, usize, usize, usize)>,
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
    let probs0 = program.value(bc);
    let ent = program.value(b as u64 * 4);
    let dispatches = loss::softmax_stats(BufRef::Value(logits), b, c, BufRef::Value(probs0), BufRef::Value(ent));
    let mut cx = StageCx {
        ctx,
        graph,
        fwd,
        program,
        logits,
        probs0,
        b,
        c,
        source_prior: &ps,
        dispatches,
        scratch: Vec::new(),
        current: BufRef::Value(probs0),
        prior: None,
        gate: None,
        deferred: None,
    };
    for stage in &spec.stages {
        stage.lower(&mut cx)?;
    }
    let StageCx { program, dispatches, scratch, current, prior, gate, deferred, .. } = cx;
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
