//! `sar` (Niu et al. 2023; tta-methods.md §3): an entropy filter, a sharpness-aware step in the
//! same command buffer (global gradient norm, ascent θ + ρ·g/(‖g‖ + 1e-12), a second forward
//! re-filtered within the first selection, the gradient there, restore, the base optimizer's
//! step), the EMA (0.9) of the second-pass loss, and a reset to the source when it falls below
//! the threshold.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{AdaptMethod, AfterBatch, BatchEnd, Objective, Section, StepCx, entropy_margin, ones};
use crate::adapt::bn::BnHook;
use crate::adapt::config::{AdaptConfig, Invalid, NormMode};
use crate::adapt::error::AdaptError;
use crate::adapt::loss;
use crate::adapt::reverse::{bytes_of, forward_on_same_input, parameter, reverse_pass};
use crate::gpu::{KernelKey, Params, Shader};
use crate::ir::Graph;
use crate::ops::{BufRef, Dispatch};
use crate::plan::{Item, PlanError};

/// The `[sar]` section.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SarSection {
    /// E0 of both entropy filters (absolute); `None`: 0.4·ln C.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e_margin: Option<f32>,
    /// ρ of the sharpness-aware perturbation.
    pub rho: f32,
    /// Reset to the source when the EMA of the second-pass loss falls below this.
    pub reset_threshold: f32,
    /// Whether a reset also clears the EMA. The authors' code does not (the model keeps
    /// resetting until the EMA recovers); the mariodoebler harness does.
    pub reset_clears_ema: bool,
}

impl Default for SarSection {
    fn default() -> Self {
        SarSection { e_margin: None, rho: 0.05, reset_threshold: 0.2, reset_clears_ema: false }
    }
}

impl Section for SarSection {
    fn validate(&self) -> Result<(), Invalid> {
        if !(self.rho.is_finite() && self.rho >= 0.0) {
            return Err(Invalid::new("sar.rho", self.rho, "must be a finite number >= 0"));
        }
        if let Some(e) = self.e_margin
            && !(e.is_finite() && e > 0.0)
        {
            return Err(Invalid::new("sar.e_margin", e, "must be a finite number > 0"));
        }
        if !self.reset_threshold.is_finite() {
            return Err(Invalid::new("sar.reset_threshold", self.reset_threshold, "must be finite"));
        }
        Ok(())
    }
}

pub(crate) struct Sar;

pub(crate) static SAR: Sar = Sar;

impl AdaptMethod for Sar {
    fn default_norm(&self) -> NormMode {
        NormMode::Batch
    }

    fn updates_parameters(&self) -> bool {
        true
    }

    fn objective(&self, config: &AdaptConfig, graph: &Graph) -> Result<Option<Arc<dyn Objective>>, AdaptError> {
        let e_margin = entropy_margin(config.sar.e_margin, graph)?;
        Ok(Some(Arc::new(SarObjective { e_margin, rho: config.sar.rho })))
    }

    fn after_batch(&self, config: &AdaptConfig) -> Option<Box<dyn AfterBatch>> {
        Some(Box::new(Recovery {
            ema: None,
            threshold: config.sar.reset_threshold,
            clears_ema: config.sar.reset_clears_ema,
        }))
    }
}

/// SAR's recovery: the EMA of the second-pass loss, and the reset below the threshold.
struct Recovery {
    ema: Option<f32>,
    threshold: f32,
    clears_ema: bool,
}

impl AfterBatch for Recovery {
    fn after_batch(&mut self, second: Option<(f32, usize)>) -> BatchEnd {
        let Some((loss2, kept)) = second else { return BatchEnd::default() };
        // The EMA moves only when the second pass kept a sample (the reference's loss is NaN
        // otherwise); below the threshold, reset.
        if kept > 0 && loss2.is_finite() {
            self.ema = Some(match self.ema {
                None => loss2,
                Some(e) => 0.9 * e + 0.1 * loss2,
            });
        }
        let reset = self.ema.is_some_and(|e| e < self.threshold);
        if reset && self.clears_ema {
            self.ema = None;
        }
        BatchEnd { ema: self.ema, reset }
    }
}

/// Entropy filter, sharpness-aware minimisation of the mean entropy over the kept samples.
#[derive(Debug)]
pub struct SarObjective {
    pub e_margin: f32,
    pub rho: f32,
}

impl Objective for SarObjective {
    fn select(&self, cx: &mut StepCx<'_>, dispatches: &mut Vec<Dispatch>) -> Result<BufRef, PlanError> {
        let (b, c) = (cx.b, cx.c);
        let (probs, ent, coeff, sel) = (
            cx.program.value(bytes_of(cx.logits_shape)),
            cx.program.value(b as u64 * 4),
            cx.program.value(b as u64 * 4),
            cx.program.value((b as u64 + 1) * 4),
        );
        let all = ones(cx.program, b);
        dispatches.extend(loss::softmax_stats(
            BufRef::Value(cx.logits),
            b,
            c,
            BufRef::Value(probs),
            BufRef::Value(ent),
        ));
        dispatches.push(entropy_filter(
            self.e_margin,
            BufRef::Value(ent),
            all,
            BufRef::Value(coeff),
            BufRef::Value(sel),
            b,
        ));
        cx.carried = Some(sel);
        Ok(BufRef::Value(coeff))
    }

    fn gradients(&self, cx: &mut StepCx<'_>, grads: Vec<(String, usize)>) -> Result<Vec<(String, usize)>, PlanError> {
        let Some(sel1) = cx.carried else { return Ok(grads) };
        let (g2, loss2, sel2) = self.second_pass(cx, &grads, sel1)?;
        cx.second = Some((loss2, sel2));
        Ok(g2)
    }
}

/// The gradients at SAR's perturbed point (by parameter name), the second loss and selection.
type SecondPass = (Vec<(String, usize)>, usize, usize);

impl SarObjective {
    /// SAR's sharpness-aware half of the step: global gradient norm, ascent to θ + ρ·g/‖g‖, a
    /// second forward (same statistics mode) and re-filter within the first selection, the
    /// entropy over it, the reverse pass there, and the restore of θ. Returns the gradients at
    /// the perturbed point (for the base optimizer), the second loss and the second selection.
    fn second_pass(
        &self,
        cx: &mut StepCx<'_>,
        grads: &[(String, usize)],
        sel1: usize,
    ) -> Result<SecondPass, PlanError> {
        let (b, c) = (cx.b, cx.c);
        let program = &mut *cx.program;
        let mut params = Vec::new();
        for (name, g) in grads {
            let (p, n) = parameter(program, name)?;
            params.push((p, *g, n));
        }
        let norms = program.value(params.len() as u64 * 4);
        let olds: Vec<usize> = params.iter().map(|&(_, _, n)| program.value(n as u64 * 4)).collect();
        let mut dispatches = Vec::new();
        for (slot, &(_, g, n)) in params.iter().enumerate() {
            dispatches.push(sumsq(BufRef::Value(g), BufRef::Value(norms), n, slot));
        }
        for (&(p, g, n), &old) in params.iter().zip(&olds) {
            dispatches.push(sam_perturb(
                BufRef::Weight(p),
                BufRef::Value(g),
                BufRef::Value(old),
                BufRef::Value(norms),
                n,
                params.len(),
                self.rho,
            ));
        }
        program.items.push(Item { label: "sam ascent".into(), dispatches, scratch: vec![] });
        // The second forward reads the same input buffer, at the perturbed parameters.
        let mut hook2 = BnHook::new(cx.mode, true);
        let (fwd2, logits2) = forward_on_same_input(cx.ctx, cx.graph, cx.fwd, cx.shape, program, &mut hook2)?;
        let (probs, ent, coeff, sel2, loss2, dlogits2) = (
            program.value(bytes_of(cx.logits_shape)),
            program.value(b as u64 * 4),
            program.value(b as u64 * 4),
            program.value((b as u64 + 1) * 4),
            program.value(4),
            program.value(bytes_of(cx.logits_shape)),
        );
        let mut scratch = Vec::new();
        let mut dispatches =
            loss::softmax_stats(BufRef::Value(logits2), b, c, BufRef::Value(probs), BufRef::Value(ent));
        dispatches.push(entropy_filter(
            self.e_margin,
            BufRef::Value(ent),
            BufRef::Value(sel1),
            BufRef::Value(coeff),
            BufRef::Value(sel2),
            b,
        ));
        dispatches.extend(loss::entropy_loss(
            BufRef::Value(logits2),
            BufRef::Value(coeff),
            b,
            c,
            BufRef::Value(loss2),
            BufRef::Value(dlogits2),
            false,
            &mut scratch,
        ));
        program.items.push(Item { label: "sam second loss".into(), dispatches, scratch });
        let grads2 = reverse_pass(cx.ctx, cx.graph, &fwd2, &hook2, cx.adapted, logits2, dlogits2, program)?;
        let dispatches = params
            .iter()
            .zip(&olds)
            .map(|(&(p, _, n), &old)| sam_restore(BufRef::Weight(p), BufRef::Value(old), n))
            .collect();
        program.items.push(Item { label: "sam restore".into(), dispatches, scratch: vec![] });
        program.pinned_end.push(loss2);
        program.pinned_end.push(sel2);
        Ok((grads2, loss2, sel2))
    }
}

/// SAR's entropy filter: keep i iff `mask`\[i\] ≠ 0 and `entropy`\[i\] < E0; writes `coeff` (1/|S|
/// for kept samples) and `sel` [flags (B), |S|].
pub fn entropy_filter(e0: f32, entropy: BufRef, mask: BufRef, coeff: BufRef, sel: BufRef, b: usize) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Select, "entropy_filter"),
        params: Params::new().u32(b as u32).u32(0).f32(e0).f32(0.0),
        buffers: vec![entropy, mask, coeff, sel],
        workgroups: [1, 1, 1],
    }
}

fn slot_params(n: usize, slot: usize, slots: usize, rho: f32) -> Params {
    Params::new().u32(n as u32).u32(slot as u32).u32(slots as u32).f32(rho)
}

/// `norms[slot]` = Σ g² over the `n` values of one gradient tensor.
pub fn sumsq(grad: BufRef, norms: BufRef, n: usize, slot: usize) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Select, "sumsq"),
        params: slot_params(n, slot, 0, 0.0),
        buffers: vec![grad, norms],
        workgroups: [1, 1, 1],
    }
}

/// SAM's ascent: `old` ← θ, θ ← θ + ρ·g/(‖g‖₂ + 1e-12), ‖g‖ over all `slots` tensors.
pub fn sam_perturb(
    theta: BufRef,
    grad: BufRef,
    old: BufRef,
    norms: BufRef,
    n: usize,
    slots: usize,
    rho: f32,
) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Select, "sam_perturb"),
        params: slot_params(n, 0, slots, rho),
        buffers: vec![theta, grad, old, norms],
        workgroups: [n.div_ceil(64) as u32, 1, 1],
    }
}

/// θ ← `old` (undo the ascent before the base optimizer's step).
pub fn sam_restore(theta: BufRef, old: BufRef, n: usize) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Select, "sam_restore"),
        params: slot_params(n, 0, 0, 0.0),
        buffers: vec![theta, old],
        workgroups: [n.div_ceil(64) as u32, 1, 1],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recovery(threshold: f32, clears_ema: bool) -> Recovery {
        Recovery { ema: None, threshold, clears_ema }
    }

    #[test]
    fn recovery_moves_only_on_kept_finite_second_losses() {
        let mut r = recovery(0.2, false);
        // A program without a second pass reports nothing.
        assert_eq!(r.after_batch(None), BatchEnd { ema: None, reset: false });
        assert_eq!(r.after_batch(Some((0.5, 3))), BatchEnd { ema: Some(0.5), reset: false });
        // Nothing kept, or a NaN loss (the reference's mean over an empty selection): no move.
        assert_eq!(r.after_batch(Some((0.1, 0))), BatchEnd { ema: Some(0.5), reset: false });
        assert_eq!(r.after_batch(Some((f32::NAN, 2))).ema, Some(0.5));
        let e = r.after_batch(Some((0.3, 1))).ema.unwrap();
        assert!((e - (0.9 * 0.5 + 0.1 * 0.3)).abs() < 1e-7, "{e}");
    }

    #[test]
    fn recovery_resets_below_the_threshold_and_keeps_or_clears_the_ema() {
        // The authors' code keeps the EMA, so the model resets again until it recovers.
        let mut r = recovery(0.29, false);
        assert_eq!(r.after_batch(Some((0.3, 4))), BatchEnd { ema: Some(0.3), reset: false });
        let end = r.after_batch(Some((0.0, 4)));
        assert!(end.reset && (end.ema.unwrap() - 0.27).abs() < 1e-7, "{end:?}");
        assert!(r.after_batch(Some((0.3, 4))).reset, "0.9·0.27 + 0.03 = 0.273 is still below 0.29");
        // The harness clears it: the next batch starts the EMA afresh.
        let mut r = recovery(0.29, true);
        r.after_batch(Some((0.3, 4)));
        assert_eq!(r.after_batch(Some((0.0, 4))), BatchEnd { ema: None, reset: true });
        assert_eq!(r.after_batch(Some((0.3, 4))), BatchEnd { ema: Some(0.3), reset: false });
    }
}
