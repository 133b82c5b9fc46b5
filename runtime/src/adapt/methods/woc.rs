//! `woc`: wisdom of crowds (Lee et al. 2023, as in UniEnt's OSTTA; tta-methods.md §4). The
//! original model (source scale and bias, the batch's statistics) runs in the same command
//! buffer without gradients; a sample is kept iff the adapted model's probability of the
//! original model's class did not fall below the original's (ties kept). Loss: mean entropy over
//! the kept samples − λ·H(mean prediction of the whole batch); no step when nothing is kept.
//! `eata+woc` reuses the filter (`original_logits`, [`woc_select`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{AdaptMethod, Objective, Section, StepCx};
use crate::adapt::bn::{BnHook, StatsMode};
use crate::adapt::config::{AdaptConfig, Invalid, NormMode};
use crate::adapt::error::AdaptError;
use crate::adapt::loss;
use crate::adapt::reverse::{bytes_of, forward_on_same_input};
use crate::gpu::{KernelKey, Params, Shader};
use crate::ir::Graph;
use crate::ops::layout::scatter;
use crate::ops::{BufRef, Dispatch};
use crate::plan::PlanError;

/// The `[woc]` section.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WocSection {
    /// λ of the diversity term −λ·H(mean prediction).
    pub lambda: f32,
}

impl Default for WocSection {
    fn default() -> Self {
        WocSection { lambda: 0.5 }
    }
}

impl Section for WocSection {
    fn validate(&self) -> Result<(), Invalid> {
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(Invalid::new("woc.lambda", self.lambda, "must be a finite number >= 0"));
        }
        Ok(())
    }
}

pub(crate) struct Woc;

pub(crate) static WOC: Woc = Woc;

impl AdaptMethod for Woc {
    fn default_norm(&self) -> NormMode {
        NormMode::Batch
    }

    fn updates_parameters(&self) -> bool {
        true
    }

    fn objective(&self, config: &AdaptConfig, _graph: &Graph) -> Result<Option<Arc<dyn Objective>>, AdaptError> {
        Ok(Some(Arc::new(WocObjective { lambda: config.woc.lambda })))
    }
}

/// Mean entropy over the kept samples − λ·H(p̄) over the whole batch.
#[derive(Debug)]
pub struct WocObjective {
    pub lambda: f32,
}

impl Objective for WocObjective {
    fn select(&self, cx: &mut StepCx<'_>, dispatches: &mut Vec<Dispatch>) -> Result<BufRef, PlanError> {
        let logits0 = original_logits(cx)?;
        let (b, c) = (cx.b, cx.c);
        let p = &mut *cx.program;
        let (probs, probs0, ent, ent0, coeff, sel) = (
            p.value(bytes_of(cx.logits_shape)),
            p.value(bytes_of(cx.logits_shape)),
            p.value(b as u64 * 4),
            p.value(b as u64 * 4),
            p.value(b as u64 * 4),
            p.value(3 * b as u64 * 4),
        );
        dispatches.extend(loss::softmax_stats(
            BufRef::Value(cx.logits),
            b,
            c,
            BufRef::Value(probs),
            BufRef::Value(ent),
        ));
        dispatches.extend(loss::softmax_stats(
            BufRef::Value(logits0),
            b,
            c,
            BufRef::Value(probs0),
            BufRef::Value(ent0),
        ));
        dispatches.extend(woc_select(
            BufRef::Value(probs),
            BufRef::Value(probs0),
            BufRef::Value(coeff),
            BufRef::Value(sel),
            BufRef::Weight(cx.state),
            b,
            c,
        ));
        cx.program.pinned_end.push(sel);
        cx.selection = Some(sel);
        Ok(BufRef::Value(coeff))
    }

    fn loss(
        &self,
        cx: &mut StepCx<'_>,
        coeff: BufRef,
        dispatches: &mut Vec<Dispatch>,
        scratch: &mut Vec<u64>,
    ) -> Result<(), PlanError> {
        let (logits, loss_v, dlogits, b, c) = (cx.logits, cx.loss, cx.dlogits, cx.b, cx.c);
        dispatches.extend(loss::entropy_loss(
            BufRef::Value(logits),
            coeff,
            b,
            c,
            BufRef::Value(loss_v),
            BufRef::Value(dlogits),
            false,
            scratch,
        ));
        // − λ·H(p̄) over the whole batch (the diversity term), into the same loss and dz.
        dispatches.extend(loss::diversity_loss(
            BufRef::Value(logits),
            self.lambda,
            b,
            c,
            BufRef::Value(loss_v),
            BufRef::Value(dlogits),
            true,
            scratch,
        ));
        Ok(())
    }
}

/// The original model's logits: the same graph in batch-statistics mode with the source affine
/// parameters, reading the step's input buffer, without gradients.
pub(crate) fn original_logits(cx: &mut StepCx<'_>) -> Result<usize, PlanError> {
    let mut hook0 = BnHook::new(StatsMode::Batch, false);
    hook0.source_affine = true;
    hook0.source_params = crate::adapt::bn::affine_norm_params(cx.graph);
    let (_, logits0) = forward_on_same_input(cx.ctx, cx.graph, cx.fwd, cx.shape, cx.program, &mut hook0)?;
    Ok(logits0)
}

/// WoC selection: keep sample i iff `probs`[i, c0] ≥ `probs0`[i, c0] with c0 the original model's
/// argmax; writes `coeff` (1/|S| for kept samples), `sel` [flags (B), ones (B), coefficients (B)]
/// and the gate. The coefficients go through `sel` and are copied out after: downlevel limits
/// allow 4 storage buffers per kernel.
#[allow(clippy::too_many_arguments)]
pub fn woc_select(
    probs: BufRef,
    probs0: BufRef,
    coeff: BufRef,
    sel: BufRef,
    opt_state: BufRef,
    b: usize,
    c: usize,
) -> Vec<Dispatch> {
    vec![
        Dispatch {
            key: KernelKey::new(Shader::Select, "woc_select"),
            params: Params::new().u32(b as u32).u32(c as u32).f32(0.0).f32(0.0),
            buffers: vec![probs, probs0, sel, opt_state],
            workgroups: [1, 1, 1],
        },
        scatter(sel, (coeff, 2 * b, b), (coeff, 0, 0)),
    ]
}
