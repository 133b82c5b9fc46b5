//! ROID (Marsden, Döbler, Yang, WACV 2024) on the GPU: certainty and diversity weights with the
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
//! the whole step through the parameter guard ([`super::optim`]).

use std::sync::Arc;

use crate::gpu::{KernelKey, Params, Shader, grid_1d};
use crate::ops::{BufRef, Dispatch};
use crate::plan::{Program, WeightInit};
use crate::tensor::Tensor;

use super::loss;
use super::optim::{self, OptimizerSpec};

/// The class-probability EMA ē [C] (uniform after a reset).
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
    pub fn from_config(c: &super::config::RoidSection) -> RoidSpec {
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

/// The weights over `probs` [B, C] and `entropy` [B] (from [`loss::softmax_stats`]) with ē in
/// `ema` [C]: writes `coeff` [B] (w_i, 0 for dropped samples), `sel` [kept flags (B), w (B),
/// ē' (C), d̂ (B), ĉ (B)] and closes the gate in `opt_state` when the weights are undefined.
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
) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Roid, "roid_weights"),
        params: params(b, c, spec.weighting, spec.temperature as f32, spec.momentum_probs),
        buffers: vec![probs, entropy, ema, coeff, sel, opt_state],
        workgroups: [1, 1, 1],
    }
}

/// Floats of the `sel` buffer of [`weights`].
pub fn sel_len(b: usize, c: usize) -> usize {
    4 * b + c
}

/// The per-sample SLR terms `terms` [B] (c_i·SLR_i) and dL/dz into `dz` [B, C] for
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

/// The prior correction: `out` [B, C] = z ⊙ π̃ and `prior` [C] = π̃, from `z` and its softmax
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

/// The guard's check of one tensor's update followed by the ensembling: the optimizer's candidate
/// (the parameter itself when the gate is closed), ensembled, must be finite. Record it with the
/// optimizer's checks ([`optim::check`]), before any update.
#[allow(clippy::too_many_arguments)]
pub fn ensemble_check(
    spec: &OptimizerSpec,
    param: BufRef,
    grad: BufRef,
    m: BufRef,
    v: BufRef,
    state: BufRef,
    src: BufRef,
    coef: BufRef,
    n: usize,
) -> Vec<Dispatch> {
    optim::step(spec, param, grad, m, v, state, n)
        .into_iter()
        .map(|mut d| {
            let entry = match d.key.entry {
                "sgd_step" => "roid_sgd_ensemble_check",
                "sgd_momentum_step" => "roid_sgd_momentum_ensemble_check",
                _ => "roid_adam_ensemble_check",
            };
            d.key = KernelKey::new(Shader::Roid, entry);
            d.buffers.extend([src, coef]);
            d
        })
        .collect()
}

/// What [`lower_objective`] adds to a step program.
pub struct Lowered {
    /// The loss's dispatches: the weights, the guard's check of ē', the SLR loss and its gradient.
    pub dispatches: Vec<Dispatch>,
    /// The `sel` value of [`weights`] (its first 2B floats are read back as the selection).
    pub sel: usize,
    /// ē' (value, offset, ē's weight, C): committed at the end of the step under the guard.
    pub deferred: (usize, usize, usize, usize),
}

/// The loss of a ROID step over `logits` [B, C] (with its `probs` and `entropy` from
/// [`loss::softmax_stats`]) into `loss_v` and `dlogits`; scratch sizes go to `scratch` (the
/// item's list).
#[allow(clippy::too_many_arguments)]
pub fn lower_objective(
    program: &mut Program,
    spec: &RoidSpec,
    logits: usize,
    probs: usize,
    entropy: usize,
    b: usize,
    c: usize,
    state: usize,
    loss_v: usize,
    dlogits: usize,
    scratch: &mut Vec<u64>,
) -> Lowered {
    let (coeff, sel) = (program.value(b as u64 * 4), program.value(sel_len(b, c) as u64 * 4));
    let ema = program.weight(
        CLASS_PROBS,
        || WeightInit::Tensor(Arc::new(Tensor::f32(vec![c], vec![1.0 / c as f32; c]))),
        true,
    );
    let scale = (1.0 / spec.batch_size.unwrap_or(b).max(1) as f64) as f32;
    let mut dispatches = vec![weights(
        spec,
        BufRef::Value(probs),
        BufRef::Value(entropy),
        BufRef::Weight(ema),
        BufRef::Value(coeff),
        BufRef::Value(sel),
        BufRef::Weight(state),
        b,
        c,
    )];
    dispatches.push(optim::guard_check(BufRef::Weight(state), BufRef::Value(sel), 2 * b, c));
    dispatches.extend(slr_loss(
        BufRef::Value(logits),
        BufRef::Value(coeff),
        b,
        c,
        scale,
        BufRef::Value(loss_v),
        BufRef::Value(dlogits),
        false,
        scratch,
    ));
    program.pinned_end.push(sel);
    Lowered { dispatches, sel, deferred: (sel, 2 * b, ema, c) }
}

/// The ensembling of the adapted tensors `(param weight, grad value, m, v, n)` toward their
/// source copies: (the checks, recorded with the optimizer's; the writes, after its updates).
pub fn lower_ensembling(
    program: &mut Program,
    spec: &RoidSpec,
    optimizer: &OptimizerSpec,
    state: usize,
    tensors: &[(usize, usize, usize, usize, usize)],
) -> (Vec<Dispatch>, Vec<Dispatch>) {
    if !spec.ensembles() {
        return (Vec::new(), Vec::new());
    }
    let coef =
        program.weight(ENSEMBLE, || WeightInit::Tensor(Arc::new(ensemble_coefficients(spec.momentum_src))), true);
    let (mut checks, mut writes) = (Vec::new(), Vec::new());
    for &(p, g, m, v, n) in tensors {
        let init = program.weights[p].init.clone();
        let name = source_name(&program.weights[p].name);
        let src = program.weight(&name, || init, true);
        let st = BufRef::Weight(state);
        let (pb, sb, cb) = (BufRef::Weight(p), BufRef::Weight(src), BufRef::Weight(coef));
        checks.extend(ensemble_check(
            optimizer,
            pb,
            BufRef::Value(g),
            BufRef::Weight(m),
            BufRef::Weight(v),
            st,
            sb,
            cb,
            n,
        ));
        writes.push(ensemble(st, pb, sb, cb, n));
    }
    (checks, writes)
}

/// The returned logits z ⊙ π̃ of `logits` [B, C] (and π̃), after the forward pass: returns the
/// dispatch, the corrected logits' value and π̃'s.
pub fn lower_prior(program: &mut Program, logits: usize, probs: usize, b: usize, c: usize) -> (Dispatch, usize, usize) {
    let (out, pi) = (program.value((b * c) as u64 * 4), program.value(c as u64 * 4));
    program.pinned_end.push(out);
    (prior(BufRef::Value(logits), BufRef::Value(probs), BufRef::Value(out), BufRef::Value(pi), b, c), out, pi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensemble_check_binds_the_optimizer_buffers_then_source_and_coefficients() {
        let [p, g, m, v, st, src, coef] = [0, 1, 2, 3, 4, 5, 6].map(BufRef::Value);
        let sgd = OptimizerSpec::Sgd { lr: 0.1, momentum: 0.0, dampening: 0.0, nesterov: false, weight_decay: 0.0 };
        let d = ensemble_check(&sgd, p, g, m, v, st, src, coef, 7);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].key.entry, "roid_sgd_ensemble_check");
        assert_eq!(d[0].buffers, vec![st, p, g, src, coef]);
        let adam = OptimizerSpec::Adam { lr: 0.1, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.0 };
        let d = ensemble_check(&adam, p, g, m, v, st, src, coef, 7);
        assert_eq!(d[0].key.entry, "roid_adam_ensemble_check");
        assert_eq!(d[0].buffers, vec![st, p, g, m, v, src, coef]);
    }

    #[test]
    fn coefficients_are_formed_in_double_precision() {
        let t = ensemble_coefficients(0.99).to_f32_vec();
        assert_eq!(t, vec![0.99f32, (1.0f64 - 0.99) as f32]);
        assert_ne!(t[1], 1.0 - 0.99f32);
    }
}
