//! `roid`: ROID (Marsden, Döbler, Yang, WACV 2024) on the GPU: certainty and diversity weights with the
//! class-probability EMA, the soft likelihood ratio loss, weight ensembling toward the source
//! after each step, and prior correction of the returned logits (kernels in `shaders/roid.wgsl`;
//! semantics in `shared/docs/tta-universal.md` §1, reference in `tools/roid_reference.py`).
//!
//! The augmentation-consistency term is not here: it needs GPU augmentation kernels (colour
//! jitter, reflect padding, affine warps) and a second forward over the kept subset. ROID runs
//! with the authors' own `USE_CONSISTENCY=False` switch (tta-universal.md §6), for which no
//! published number is known.
//!
//! The guards ROID lacks: when the diversity or the certainty scores of a batch are all equal
//! (always at B = 1) the min-max normalisation is 0/0 and the authors' parameters become NaN for
//! good; here the weights are then undefined, every sample is dropped and the optimizer's gate
//! closes (no gradient step, its moments untouched), while ē, the ensembling and the prior
//! correction, which do not depend on the weights, still run. Any non-finite value the step
//! would write (a parameter after the update and the ensembling, an optimizer moment, ē) refuses
//! the whole step through the parameter guard ([`crate::adapt::optim`]).
//!
//! In the step program ([`RoidObjective`]): the probabilities and the prior-corrected logits
//! right after the forward ([`Objective::after_forward`]), the weights and ē' ahead of the loss
//! ([`Objective::select`]), the SLR loss ([`Objective::loss`]), and the ensembling's checks and
//! writes around the optimizer's update ([`Objective::after_update`]). ē is a persistent buffer
//! ([`CLASS_PROBS`]): saved and loaded with the state, uniform again after a reset.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{AdaptMethod, AfterForward, Objective, Section, StepCx, Updated};
use crate::adapt::config::{AdaptConfig, Invalid, NormMode, gpu_f32};
use crate::adapt::error::AdaptError;
use crate::adapt::loss;
use crate::adapt::optim::{self, OptimizerSpec};
use crate::adapt::reverse::{bytes_of, err};
use crate::gpu::{KernelKey, Params, Shader, grid_1d};
use crate::ir::Graph;
use crate::ops::layout::gather;
use crate::ops::{BufRef, Dispatch};
use crate::plan::{Item, PlanError, Program, WeightInit};
use crate::tensor::Tensor;

/// The class-probability EMA ē \[C\] (uniform after a reset).
pub const CLASS_PROBS: &str = "roid:class_probs";
/// The ensembling's [α_s, 1 − α_s].
pub const ENSEMBLE: &str = "roid:ensemble";

/// The frozen source copy θ_src of adapted parameter `name`.
pub fn source_name(name: &str) -> String {
    format!("roid:source:{name}")
}

/// ROID's settings (`[roid]`), resolved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoidSpec {
    /// T of w = exp(d̂·ĉ/T) (1/3).
    pub temperature: f64,
    /// m_p of ē ← m_p·ē + (1 − m_p)·p̄ (0.9).
    pub momentum_probs: f64,
    /// α_s of θ ← α_s·θ + (1 − α_s)·θ_src (0.99); ≥ 1 turns the ensembling off.
    pub momentum_src: f64,
    /// Certainty and diversity weights (and ē); off: plain SLR over the batch.
    pub weighting: bool,
    /// Return z ⊙ π̃ instead of z.
    pub prior_correction: bool,
    /// B_cfg, the loss's divisor; `None`: the batch's own size (the reference divides by the
    /// configured batch size even for a smaller last batch).
    pub batch_size: Option<usize>,
}

impl Default for RoidSpec {
    fn default() -> RoidSpec {
        RoidSpec {
            temperature: 1.0 / 3.0,
            momentum_probs: 0.9,
            momentum_src: 0.99,
            weighting: true,
            prior_correction: true,
            batch_size: None,
        }
    }
}

impl RoidSpec {
    /// The spec of a (validated) `[roid]` section.
    pub fn from_config(c: &RoidSection) -> RoidSpec {
        RoidSpec {
            temperature: c.temperature,
            momentum_probs: c.momentum_probs,
            momentum_src: c.momentum_src,
            weighting: c.weighting,
            prior_correction: c.prior_correction,
            batch_size: c.batch_size,
        }
    }

    /// Whether parameters are pulled toward the source after each step.
    pub fn ensembles(&self) -> bool {
        self.momentum_src < 1.0
    }
}

fn params(b: usize, c: usize, flag: bool, x: f32, momentum: f64) -> Params {
    Params::new().u32(b as u32).u32(c as u32).u32(flag as u32).f32(x).f32(momentum as f32).f32((1.0 - momentum) as f32)
}

/// The weights over `probs` [B, C] and `entropy` \[B\] (from [`loss::softmax_stats`]) with ē in
/// `ema` \[C\]: writes `coeff` \[B\] (w_i, 0 for dropped samples), `sel` [kept flags (B), w (B),
/// ē' (C), d̂ (B), ĉ (B), then the copies of `entropy` and `ema` the kernel reads] and closes the
/// gate in `opt_state` when the weights are undefined. `entropy` and `ema` are copied into `sel`
/// first (a word copy: the kernel binds 4 storage buffers, as downlevel limits allow).
#[allow(clippy::too_many_arguments)]
pub fn weights(
    spec: &RoidSpec,
    probs: BufRef,
    entropy: BufRef,
    ema: BufRef,
    coeff: BufRef,
    sel: BufRef,
    opt_state: BufRef,
    b: usize,
    c: usize,
) -> Vec<Dispatch> {
    vec![
        gather(&[(entropy, b), (ema, c)], sel, 4 * b + c),
        Dispatch {
            key: KernelKey::new(Shader::Roid, "roid_weights"),
            params: params(b, c, spec.weighting, spec.temperature as f32, spec.momentum_probs),
            buffers: vec![probs, coeff, sel, opt_state],
            workgroups: [1, 1, 1],
        },
    ]
}

/// Floats of the `sel` buffer of [`weights`].
pub fn sel_len(b: usize, c: usize) -> usize {
    5 * b + 2 * c
}

/// The per-sample SLR terms `terms` \[B\] (c_i·SLR_i) and dL/dz into `dz` [B, C] for
/// L = `scale`·Σ_i c_i·SLR_i; with `accumulate` both add instead of overwriting.
#[allow(clippy::too_many_arguments)]
pub fn slr_rows(
    z: BufRef,
    coeff: BufRef,
    terms: BufRef,
    dz: BufRef,
    b: usize,
    c: usize,
    scale: f32,
    accumulate: bool,
) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Roid, "roid_slr_rows"),
        params: params(b, c, accumulate, scale, 0.0),
        buffers: vec![z, coeff, terms, dz],
        workgroups: grid_1d(b, 1),
    }
}

/// The weighted soft likelihood ratio loss L = `scale`·Σ_i c_i·SLR_i into `loss` and its
/// gradient into `dz` (c_i = 0 drops sample i).
#[allow(clippy::too_many_arguments)]
pub fn slr_loss(
    z: BufRef,
    coeff: BufRef,
    b: usize,
    c: usize,
    scale: f32,
    loss_buf: BufRef,
    dz: BufRef,
    accumulate: bool,
    scratch: &mut Vec<u64>,
) -> Vec<Dispatch> {
    scratch.push((b as u64 * 4).max(4));
    let terms = BufRef::Scratch(scratch.len() - 1);
    vec![slr_rows(z, coeff, terms, dz, b, c, scale, accumulate), loss::sum_terms(terms, b, scale, loss_buf, accumulate)]
}

/// The prior correction: `out` [B, C] = z ⊙ π̃ and `prior` \[C\] = π̃, from `z` and its softmax
/// `probs`.
pub fn prior(z: BufRef, probs: BufRef, out: BufRef, prior: BufRef, b: usize, c: usize) -> Dispatch {
    let smooth = (1.0 / b.max(1) as f64).max(1.0 / c.max(1) as f64);
    Dispatch {
        key: KernelKey::new(Shader::Roid, "roid_prior"),
        params: params(b, c, false, smooth as f32, 0.0),
        buffers: vec![z, probs, out, prior],
        workgroups: [1, 1, 1],
    }
}

/// [α, 1 − α] as torch multiplies a float32 tensor by Python floats (1 − α formed in double).
pub fn ensemble_coefficients(alpha: f64) -> Tensor {
    Tensor::f32(vec![2], vec![alpha as f32, (1.0 - alpha) as f32])
}

/// θ ← α·θ + (1 − α)·θ_src over `n` values (`coef` = [α, 1 − α]), unless the guard's flag in
/// `state` is up. Record it after the optimizer's update of `param`.
pub fn ensemble(state: BufRef, param: BufRef, src: BufRef, coef: BufRef, n: usize) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Roid, "roid_ensemble"),
        params: Params::new().u32(n as u32),
        buffers: vec![state, param, src, coef],
        workgroups: grid_1d(n, 256),
    }
}

/// [grad (n), θ_src (n), α, 1 − α] into `out` (2n + 2 floats), the gradient binding of
/// [`ensemble_check`]: downlevel limits allow 4 storage buffers per kernel, and Adam's check
/// already binds 4 (state, parameter, gradient, moments).
pub fn pack(grad: BufRef, src: BufRef, coef: BufRef, out: BufRef, n: usize) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Roid, "roid_pack"),
        params: Params::new().u32(n as u32),
        buffers: vec![grad, src, coef, out],
        workgroups: grid_1d(n.max(2), 256),
    }
}

/// The guard's check of one tensor's update followed by the ensembling: the optimizer's candidate
/// (the parameter itself when the gate is closed), ensembled, must be finite. `packed` is what
/// [`pack`] wrote ([grad, θ_src, α, 1 − α]); it stands where the optimizer's check binds the
/// gradient. Record it with the optimizer's checks ([`optim::check`]), after [`pack`] and before
/// any update.
pub fn ensemble_check(
    spec: &OptimizerSpec,
    param: BufRef,
    packed: BufRef,
    m: BufRef,
    v: BufRef,
    state: BufRef,
    n: usize,
) -> Vec<Dispatch> {
    optim::step(spec, param, packed, m, v, state, n)
        .into_iter()
        .map(|mut d| {
            let entry = match d.key.entry {
                "sgd_step" => "roid_sgd_ensemble_check",
                "sgd_momentum_step" => "roid_sgd_momentum_ensemble_check",
                _ => "roid_adam_ensemble_check",
            };
            d.key = KernelKey::new(Shader::Roid, entry);
            d
        })
        .collect()
}

/// The `[roid]` section (defaults: the authors' `conf.py`, tta-universal.md §1.1).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoidSection {
    /// T of the weights exp(d̂·ĉ/T).
    pub temperature: f64,
    /// m_p of the class-probability EMA.
    pub momentum_probs: f64,
    /// α_s of the ensembling θ ← α_s·θ + (1 − α_s)·θ_src; 1 turns it off.
    pub momentum_src: f64,
    /// The certainty and diversity weights; off: plain SLR over the batch.
    pub weighting: bool,
    /// Multiply the returned logits by the smoothed batch prior.
    pub prior_correction: bool,
    /// The augmentation-consistency term: needs GPU augmentation kernels the runtime does not
    /// have; only `false` (the authors' `USE_CONSISTENCY=False`) is accepted.
    pub consistency: bool,
    /// The loss's divisor B_cfg (the reference's `TEST.BATCH_SIZE`); absent: each batch's size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
}

impl Default for RoidSection {
    fn default() -> Self {
        RoidSection {
            temperature: 1.0 / 3.0,
            momentum_probs: 0.9,
            momentum_src: 0.99,
            weighting: true,
            prior_correction: true,
            consistency: false,
            batch_size: None,
        }
    }
}

impl Section for RoidSection {
    fn validate(&self) -> Result<(), Invalid> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Invalid::new("roid.temperature", self.temperature, "must be a finite number > 0"));
        }
        gpu_f32("roid.temperature", self.temperature)?;
        for (key, v) in [("roid.momentum_probs", self.momentum_probs), ("roid.momentum_src", self.momentum_src)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Invalid::new(key, v, "must be in [0, 1]"));
            }
        }
        if self.consistency {
            return Err(Invalid::new(
                "roid.consistency",
                true,
                "the augmentation-consistency term needs GPU augmentation kernels, which the runtime does not have; \
                 ROID runs with the authors' USE_CONSISTENCY=False",
            ));
        }
        if self.batch_size == Some(0) {
            return Err(Invalid::new("roid.batch_size", 0, "must be at least 1"));
        }
        Ok(())
    }
}

pub(crate) struct Roid;

pub(crate) static ROID: Roid = Roid;

impl AdaptMethod for Roid {
    fn default_norm(&self) -> NormMode {
        NormMode::Batch
    }

    fn updates_parameters(&self) -> bool {
        true
    }

    fn objective(&self, config: &AdaptConfig, _graph: &Graph) -> Result<Option<Arc<dyn Objective>>, AdaptError> {
        Ok(Some(Arc::new(RoidObjective(RoidSpec::from_config(&config.roid)))))
    }

    fn state_prefixes(&self) -> &'static [&'static str] {
        &[CLASS_PROBS]
    }

    fn reset_value(&self, name: &str, len: usize) -> Option<Vec<f32>> {
        // ē restarts uniform, as the authors' `reset` re-creates it.
        (name == CLASS_PROBS).then(|| vec![1.0 / len.max(1) as f32; len])
    }
}

/// ROID's step: the weighted SLR loss, the ensembling toward the source after the update, the
/// prior-corrected logits returned.
#[derive(Debug)]
pub struct RoidObjective(pub RoidSpec);

impl Objective for RoidObjective {
    fn after_forward(
        &self,
        program: &mut Program,
        logits: usize,
        logits_shape: &[usize],
    ) -> Result<AfterForward, PlanError> {
        // Another shape fails the step program with its own message.
        let &[b, c] = logits_shape else { return Ok(AfterForward::default()) };
        // The probabilities once, for the weights and for the prior correction.
        let (probs, ent) = (program.value(bytes_of(logits_shape)), program.value(b as u64 * 4));
        let mut dispatches = loss::softmax_stats(BufRef::Value(logits), b, c, BufRef::Value(probs), BufRef::Value(ent));
        let mut returned = None;
        if self.0.prior_correction {
            let (out, pi) = (program.value((b * c) as u64 * 4), program.value(c as u64 * 4));
            program.pinned_end.push(out);
            dispatches.push(prior(
                BufRef::Value(logits),
                BufRef::Value(probs),
                BufRef::Value(out),
                BufRef::Value(pi),
                b,
                c,
            ));
            returned = Some(out);
        }
        program.items.push(Item { label: "roid probabilities".into(), dispatches, scratch: vec![] });
        Ok(AfterForward { returned, values: vec![probs, ent] })
    }

    fn select(&self, cx: &mut StepCx<'_>, dispatches: &mut Vec<Dispatch>) -> Result<BufRef, PlanError> {
        let &[probs, ent] = cx.forwarded else {
            return Err(err("ROID needs logits of shape [batch, classes]"));
        };
        let (b, c) = (cx.b, cx.c);
        let program = &mut *cx.program;
        let (coeff, sel) = (program.value(b as u64 * 4), program.value(sel_len(b, c) as u64 * 4));
        let ema = program.weight(
            CLASS_PROBS,
            || WeightInit::Tensor(Arc::new(Tensor::f32(vec![c], vec![1.0 / c as f32; c]))),
            true,
        );
        dispatches.extend(weights(
            &self.0,
            BufRef::Value(probs),
            BufRef::Value(ent),
            BufRef::Weight(ema),
            BufRef::Value(coeff),
            BufRef::Value(sel),
            BufRef::Weight(cx.state),
            b,
            c,
        ));
        // ē' is committed at the end of the step, so the guard checks it with everything else.
        dispatches.push(optim::guard_check(BufRef::Weight(cx.state), BufRef::Value(sel), 2 * b, c));
        program.pinned_end.push(sel);
        cx.deferred.push((sel, 2 * b, ema, c));
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
        let scale = (1.0 / self.0.batch_size.unwrap_or(cx.b).max(1) as f64) as f32;
        dispatches.extend(slr_loss(
            BufRef::Value(cx.logits),
            coeff,
            cx.b,
            cx.c,
            scale,
            BufRef::Value(cx.loss),
            BufRef::Value(cx.dlogits),
            false,
            scratch,
        ));
        Ok(())
    }

    fn after_update(
        &self,
        cx: &mut StepCx<'_>,
        optimizer: &OptimizerSpec,
        updated: &[Updated],
    ) -> Result<(Vec<Dispatch>, Vec<Dispatch>), PlanError> {
        if !self.0.ensembles() {
            return Ok((Vec::new(), Vec::new()));
        }
        let program = &mut *cx.program;
        let coef =
            program.weight(ENSEMBLE, || WeightInit::Tensor(Arc::new(ensemble_coefficients(self.0.momentum_src))), true);
        let (mut checks, mut writes) = (Vec::new(), Vec::new());
        let st = BufRef::Weight(cx.state);
        for u in updated {
            // θ_src: the parameter's initial value, kept in a buffer of its own.
            let init = program.weights[u.weight].init.clone();
            let name = source_name(&program.weights[u.weight].name);
            let src = program.weight(&name, || init, true);
            let (pb, sb, cb) = (BufRef::Weight(u.weight), BufRef::Weight(src), BufRef::Weight(coef));
            let packed = BufRef::Value(program.value((2 * u.n + 2) as u64 * 4));
            checks.push(pack(BufRef::Value(u.grad), sb, cb, packed, u.n));
            checks.extend(ensemble_check(optimizer, pb, packed, BufRef::Weight(u.m), BufRef::Weight(u.v), st, u.n));
            writes.push(ensemble(st, pb, sb, cb, u.n));
        }
        Ok((checks, writes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensemble_check_binds_the_optimizer_buffers_with_the_packed_gradient() {
        let [p, packed, m, v, st] = [0, 1, 2, 3, 4].map(BufRef::Value);
        let sgd = OptimizerSpec::Sgd { lr: 0.1, momentum: 0.0, dampening: 0.0, nesterov: false, weight_decay: 0.0 };
        let d = ensemble_check(&sgd, p, packed, m, v, st, 7);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].key.entry, "roid_sgd_ensemble_check");
        assert_eq!(d[0].buffers, vec![st, p, packed]);
        let adam = OptimizerSpec::Adam { lr: 0.1, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.0 };
        let d = ensemble_check(&adam, p, packed, m, v, st, 7);
        assert_eq!(d[0].key.entry, "roid_adam_ensemble_check");
        // Adam keeps both moments in `m`; with the packed gradient that is 4 storage buffers,
        // the downlevel limit.
        assert_eq!(d[0].buffers, vec![st, p, packed, m]);
    }

    #[test]
    fn coefficients_are_formed_in_double_precision() {
        let t = ensemble_coefficients(0.99).to_f32_vec();
        assert_eq!(t, vec![0.99f32, (1.0f64 - 0.99) as f32]);
        assert_ne!(t[1], 1.0 - 0.99f32);
    }
}
