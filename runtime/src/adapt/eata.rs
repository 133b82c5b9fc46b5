//! ETA / EATA (Niu et al., ICML 2022) on the GPU: reliable and non-redundant sample selection,
//! entropy weights, and the Fisher anchor (tta-methods.md §2; kernels in `shaders/select.wgsl`).
//!
//! Everything the reference does on the host happens here without a readback: the selection
//! writes the per-sample loss coefficients w_i/|S| (0 for rejected samples) used by the entropy
//! loss, updates the moving average m of selected probabilities, and closes the optimizer's gate
//! when nothing is selected, so that no step is taken at all (not even momentum).

use crate::gpu::{KernelKey, Params, Shader};
use crate::ops::{BufRef, Dispatch};

/// ETA/EATA settings resolved for a model with `classes` outputs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EataSpec {
    /// E0 (default 0.4·ln C).
    pub e_margin: f32,
    /// ε of the redundancy filter.
    pub d_margin: f32,
    /// β of the Fisher penalty; 0 for ETA.
    pub fisher_alpha: f32,
    /// eata+woc: the wisdom-of-crowds filter is ANDed into the selection.
    pub woc: bool,
}

/// Selection over `probs` [B, C] and `entropy` [B] among the samples whose `mask` [B] is nonzero:
/// writes `coeff` [B], `sel` [2B] (flags, then weights), updates `mstate` [C + 1] (m, then a
/// validity flag) from the selected samples, and sets the optimizer gate.
#[allow(clippy::too_many_arguments)]
pub fn select(
    spec: &EataSpec,
    probs: BufRef,
    entropy: BufRef,
    mstate: BufRef,
    coeff: BufRef,
    sel: BufRef,
    opt_state: BufRef,
    mask: BufRef,
    b: usize,
    c: usize,
) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Select, "eata_select"),
        params: Params::new().u32(b as u32).u32(c as u32).f32(spec.e_margin).f32(spec.d_margin),
        buffers: vec![probs, entropy, mstate, coeff, sel, opt_state, mask],
        workgroups: [1, 1, 1],
    }
}

/// Pseudo-labels: the first argmax of each row of `logits` [B, C], as f32 class indices.
pub fn argmax_rows(logits: BufRef, labels: BufRef, b: usize, c: usize) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Select, "argmax_rows"),
        params: Params::new().u32(b as u32).u32(c as u32).f32(0.0).f32(0.0),
        buffers: vec![logits, labels],
        workgroups: [b.div_ceil(64) as u32, 1, 1],
    }
}

/// `fisher += grad²` over `n` values.
pub fn fisher_accumulate(grad: BufRef, fisher: BufRef, n: usize) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Select, "fisher_accumulate"),
        params: Params::new().u32(n as u32).f32(1.0),
        buffers: vec![grad, fisher],
        workgroups: [n.div_ceil(64) as u32, 1, 1],
    }
}

/// WoC selection: keep sample i iff `probs`[i, c0] ≥ `probs0`[i, c0] with c0 the original model's
/// argmax; writes `coeff` (1/|S| for kept samples), `sel` [flags (B), ones (B)] and the gate.
#[allow(clippy::too_many_arguments)]
pub fn woc_select(
    probs: BufRef,
    probs0: BufRef,
    coeff: BufRef,
    sel: BufRef,
    opt_state: BufRef,
    b: usize,
    c: usize,
) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Select, "woc_select"),
        params: Params::new().u32(b as u32).u32(c as u32).f32(0.0).f32(0.0),
        buffers: vec![probs, probs0, coeff, sel, opt_state],
        workgroups: [1, 1, 1],
    }
}

/// SAR's entropy filter: keep i iff `mask`[i] ≠ 0 and `entropy`[i] < E0; writes `coeff` (1/|S|
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
