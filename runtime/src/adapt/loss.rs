//! Loss kernels over logits `z` [B, C] (row-major): the scalar loss (a 1-element buffer) and
//! dL/dz [B, C], on the GPU (`shaders/loss.wgsl`).
//!
//! Every reduction runs in a fixed order (no atomics), so a step is bit-reproducible on a given
//! device. Each builder returns its dispatches and appends the byte sizes of the temporaries it
//! needs to `scratch` (bound as [`BufRef::Scratch`] indices into that list, as in
//! [`crate::plan::Item`]). With `accumulate` set, a term adds into the loss and gradient buffers
//! instead of overwriting them, so objectives compose: EATA is a weighted entropy plus
//! [`ewc_penalty`], WoC a weighted entropy plus [`diversity_loss`].
//!
//! Per-sample weights come from a coefficient buffer `coeff` \[B\], so they can be computed on
//! the GPU without a readback: mean entropy is c_i = 1/B ([`fill`]), EATA's is
//! c_i = w_i/|S| for selected samples and 0 otherwise.
//!
//! Entropies use log-softmax, never log(softmax + ε) (tta-methods.md §0.1).

use crate::gpu::{KernelKey, Params, Shader, grid_1d};
use crate::ops::layout::gather;
use crate::ops::{BufRef, Dispatch};

fn scratch_buf(scratch: &mut Vec<u64>, floats: usize) -> BufRef {
    scratch.push((floats as u64 * 4).max(4));
    BufRef::Scratch(scratch.len() - 1)
}

/// One workgroup per row.
fn rows(b: usize) -> [u32; 3] {
    grid_1d(b, 1)
}

fn row_params(b: usize, c: usize, accumulate: bool, scale: f32) -> Params {
    Params::new().u32(b as u32).u32(c as u32).u32(accumulate as u32).f32(scale).f32(f32::NAN)
}

fn row_dispatch(entry: &'static str, params: Params, buffers: Vec<BufRef>, b: usize) -> Dispatch {
    Dispatch { key: KernelKey::new(Shader::Loss, entry), params, buffers, workgroups: rows(b) }
}

/// `loss ← scale·Σ terms[0..n]` (or `+=` with `accumulate`), in one workgroup.
pub(crate) fn sum_terms(terms: BufRef, n: usize, scale: f32, loss: BufRef, accumulate: bool) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Loss, "sum_terms"),
        params: Params::new().u32(n as u32).u32(accumulate as u32).f32(scale),
        buffers: vec![terms, loss],
        workgroups: [1, 1, 1],
    }
}

/// Softmax probabilities `probs` [B, C] and entropies `entropy` \[B\] of `z` (no gradient): the
/// inputs of sample filters (entropy thresholds, EATA's redundancy cosine, WoC confidences).
pub fn softmax_stats(z: BufRef, b: usize, c: usize, probs: BufRef, entropy: BufRef) -> Vec<Dispatch> {
    vec![row_dispatch("softmax_stats", row_params(b, c, false, 1.0), vec![z, probs, entropy], b)]
}

/// L = Σ_i c_i·H(p_i); dL/dz_ij = c_i·(−p_ij·(log p_ij + H_i)).
#[allow(clippy::too_many_arguments)]
pub fn entropy_loss(
    z: BufRef,
    coeff: BufRef,
    b: usize,
    c: usize,
    loss: BufRef,
    dz: BufRef,
    accumulate: bool,
    scratch: &mut Vec<u64>,
) -> Vec<Dispatch> {
    let terms = scratch_buf(scratch, b);
    vec![
        row_dispatch("entropy_rows", row_params(b, c, accumulate, 1.0), vec![z, coeff, terms, dz], b),
        sum_terms(terms, b, 1.0, loss, accumulate),
    ]
}

/// L = Σ_i c_i·(−log softmax(z_i)\[y_i\]); dL/dz_ij = c_i·(p_ij − [j = y_i]). `labels` \[B\] holds
/// class indices as f32 (pseudo-labels come from an argmax on the GPU); a label that is not an
/// integer in [0, C) makes the loss and that row's gradient NaN.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_loss(
    z: BufRef,
    labels: BufRef,
    coeff: BufRef,
    b: usize,
    c: usize,
    loss: BufRef,
    dz: BufRef,
    accumulate: bool,
    scratch: &mut Vec<u64>,
) -> Vec<Dispatch> {
    let terms = scratch_buf(scratch, b);
    // Labels and coefficients in one buffer: downlevel limits allow 4 storage buffers per kernel.
    let packed = scratch_buf(scratch, 2 * b);
    vec![
        gather(&[(labels, b), (coeff, b)], packed, 0),
        row_dispatch("cross_entropy_rows", row_params(b, c, accumulate, 1.0), vec![z, packed, terms, dz], b),
        sum_terms(terms, b, 1.0, loss, accumulate),
    ]
}

/// The diversity term L = −λ·H(p̄), p̄ = (1/B)·Σ_i p_i, over the whole batch (WoC / UniEnt's
/// `−α·softmax_mean_entropy`). With g_j = log p̄_j:
/// dL/dz_ik = (λ/B)·p_ik·(g_k − Σ_j p_ij·g_j). A class whose mean probability underflows to 0
/// contributes 0 (the limit of p̄ log p̄) where PyTorch's `p̄ * log(p̄)` would give NaN.
#[allow(clippy::too_many_arguments)]
pub fn diversity_loss(
    z: BufRef,
    lambda: f32,
    b: usize,
    c: usize,
    loss: BufRef,
    dz: BufRef,
    accumulate: bool,
    scratch: &mut Vec<u64>,
) -> Vec<Dispatch> {
    let probs = scratch_buf(scratch, b * c);
    let logmean = scratch_buf(scratch, c);
    let terms = scratch_buf(scratch, c);
    let grad_scale = (lambda as f64 / b.max(1) as f64) as f32;
    vec![
        row_dispatch("softmax_rows", row_params(b, c, false, 1.0), vec![z, probs], b),
        Dispatch {
            key: KernelKey::new(Shader::Loss, "diversity_mean"),
            params: row_params(b, c, false, 1.0),
            buffers: vec![probs, logmean, terms],
            workgroups: grid_1d(c, 256),
        },
        // L = −λ·H(p̄) = λ·Σ_j p̄_j log p̄_j.
        sum_terms(terms, c, lambda, loss, accumulate),
        row_dispatch("diversity_grad", row_params(b, c, accumulate, grad_scale), vec![probs, logmean, dz], b),
    ]
}

/// The EWC penalty of one parameter tensor of `n` values:
/// L = λ·Σ_k F_k·(θ_k − θ*_k)², whose gradient 2λ·F·(θ − θ*) is always **added** to `grad`
/// (the parameter's gradient from the reverse pass). The loss overwrites or adds per
/// `accumulate`, as the other terms.
#[allow(clippy::too_many_arguments)]
pub fn ewc_penalty(
    theta: BufRef,
    theta_star: BufRef,
    fisher: BufRef,
    lambda: f32,
    n: usize,
    loss: BufRef,
    grad: BufRef,
    accumulate: bool,
    scratch: &mut Vec<u64>,
) -> Vec<Dispatch> {
    let terms = scratch_buf(scratch, n);
    // θ* and F in one buffer: downlevel limits allow 4 storage buffers per kernel.
    let packed = scratch_buf(scratch, 2 * n);
    vec![
        gather(&[(theta_star, n), (fisher, n)], packed, 0),
        Dispatch {
            key: KernelKey::new(Shader::Loss, "ewc"),
            params: Params::new().u32(n as u32).f32((2.0 * lambda as f64) as f32),
            buffers: vec![theta, packed, grad, terms],
            workgroups: grid_1d(n, 256),
        },
        sum_terms(terms, n, lambda, loss, accumulate),
    ]
}

/// Sets `n` values of `buf` to `value` (e.g. mean-entropy coefficients 1/B, zeroed gradients).
pub fn fill(buf: BufRef, n: usize, value: f32) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Loss, "fill"),
        params: Params::new().u32(n as u32).f32(value),
        buffers: vec![buf],
        workgroups: grid_1d(n, 256),
    }
}

/// The coefficients of a plain mean over the batch: `n` values of 1/n.
pub fn fill_mean_coefficients(coeff: BufRef, n: usize) -> Dispatch {
    fill(coeff, n, (1.0 / n.max(1) as f64) as f32)
}
