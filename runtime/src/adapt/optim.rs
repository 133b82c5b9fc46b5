//! PyTorch-exact SGD and Adam on the GPU (`shaders/optim.wgsl`).
//!
//! One [`step`] dispatch per parameter tensor updates the parameter and its moment buffers in
//! place; a final [`commit`] advances the step counter. The counter, a gate and the guard's flag
//! live on the GPU in the optimizer state buffer, `[step_count, gate, non_finite]` as three `f32`
//! ([`initial_state`]):
//!
//! - `step_count` is the number of steps taken. Kernels use `t = step_count + 1`, the step being
//!   taken, for Adam's bias corrections and for SGD's first-step rule (the momentum buffer starts
//!   as a clone of the gradient). An `f32` holds it exactly up to 2^24 steps; past that it stops
//!   advancing, when Adam's bias corrections have long been 1 and SGD ignores it.
//! - `gate == 0` turns every update and the commit into no-ops, so a step with nothing selected
//!   (EATA) changes nothing at all, momentum included, as the reference code, which skips
//!   `optimizer.step()` entirely. Kernels that select samples write the gate on the GPU, so no
//!   readback decides it.
//! - `non_finite` is the parameter guard's flag: [`check`] computes every update's candidate
//!   values before anything is written, and one NaN or infinity among them closes the gate and
//!   raises the flag, so the whole step is skipped (parameters, moments, step counter and the
//!   RBN statistics committed by [`commit_stats`]). [`guard_begin`] opens the gate and clears the
//!   flag at the start of every step; the host reads the flag back with the logits and counts
//!   the skipped step.
//!
//! Update rules (`torch.optim`, single-tensor code path, `maximize=False`, `amsgrad=False`):
//! - SGD: g ← g + wd·θ; with momentum μ ≠ 0: buf ← g on the first step, else
//!   buf ← μ·buf + (1−dampening)·g; g ← nesterov ? g + μ·buf : buf; θ ← θ − lr·g.
//! - Adam: g ← g + wd·θ; m ← lerp(m, g, 1−β1); v ← β2·v + (1−β2)·g²;
//!   θ ← θ − (lr/(1−β1^t))·m / (√v/√(1−β2^t) + ε).
//!
//! PyTorch forms the scalars (1−β, 1−dampening, the bias corrections) in double precision; so do
//! we, except the bias corrections, which depend on the GPU-resident `t`: the kernel computes
//! 1−β^t = −expm1(t·ln β) from ln β formed in double precision, which is within a few ulp of the
//! double-precision value at every t. (A running product of `f32(β)` would be off by 1.3e-5
//! relative at t = 1 for β2 = 0.999, because `f32(0.999)` is.)

use crate::gpu::{KernelKey, Params, Shader, grid_1d};
use crate::ops::{BufRef, Dispatch};
use crate::tensor::Tensor;

use super::config::{OptimizerConfig, OptimizerKind};

/// Length of the optimizer state buffer in `f32`s.
pub const STATE_LEN: usize = 3;
/// Index of the step count in the state buffer.
pub const STATE_STEP: usize = 0;
/// Index of the gate in the state buffer (0: skip the step).
pub const STATE_GATE: usize = 1;
/// Index of the guard's flag in the state buffer (1: the step met a non-finite value and was
/// skipped).
pub const STATE_NON_FINITE: usize = 2;

/// A configured optimizer, as the kernels need it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerSpec {
    Sgd { lr: f64, momentum: f64, dampening: f64, nesterov: bool, weight_decay: f64 },
    Adam { lr: f64, betas: (f64, f64), eps: f64, weight_decay: f64 },
}

impl OptimizerSpec {
    /// The spec of a (validated) `[optimizer]` section.
    pub fn from_config(c: &OptimizerConfig) -> OptimizerSpec {
        match c.kind {
            OptimizerKind::Sgd => OptimizerSpec::Sgd {
                lr: c.lr,
                momentum: c.momentum,
                dampening: c.dampening,
                nesterov: c.nesterov,
                weight_decay: c.weight_decay,
            },
            OptimizerKind::Adam => OptimizerSpec::Adam {
                lr: c.lr,
                betas: (c.betas[0], c.betas[1]),
                eps: c.eps,
                weight_decay: c.weight_decay,
            },
        }
    }

    pub fn lr(&self) -> f64 {
        match *self {
            OptimizerSpec::Sgd { lr, .. } | OptimizerSpec::Adam { lr, .. } => lr,
        }
    }

    /// How many moment values per parameter value the optimizer keeps: 0 for plain SGD, 1 for SGD
    /// with momentum (the momentum buffer, `m`), 2 for Adam (`m` and `v`, both in the one buffer
    /// `m` as [m (n), v (n)], since downlevel limits allow 4 storage buffers per kernel).
    pub fn moment_buffers(&self) -> usize {
        match *self {
            OptimizerSpec::Sgd { momentum: 0.0, .. } => 0,
            OptimizerSpec::Sgd { .. } => 1,
            OptimizerSpec::Adam { .. } => 2,
        }
    }
}

/// The state buffer's value before the first step: step count 0, gate open, flag clear.
pub fn initial_state() -> Tensor {
    let mut s = vec![0.0; STATE_LEN];
    s[STATE_GATE] = 1.0;
    Tensor::f32(vec![STATE_LEN], s)
}

/// The update of one parameter tensor of `n` values. `m` is the moment buffer
/// ([`OptimizerSpec::moment_buffers`] times `n` values, zero before the first step), bound only
/// when there are moments; `v` is not bound (kept for callers that name both). `grad` is read, never cleared: the reverse
/// pass overwrites it every step.
pub fn step(
    spec: &OptimizerSpec,
    param: BufRef,
    grad: BufRef,
    m: BufRef,
    v: BufRef,
    state: BufRef,
    n: usize,
) -> Vec<Dispatch> {
    let workgroups = grid_1d(n, 256);
    match *spec {
        OptimizerSpec::Sgd { lr, momentum, dampening, nesterov, weight_decay } => {
            let params = Params::new()
                .u32(n as u32)
                .u32(nesterov as u32)
                .f32(lr as f32)
                .f32(momentum as f32)
                .f32((1.0 - dampening) as f32)
                .f32(weight_decay as f32);
            let (entry, buffers) = if momentum == 0.0 {
                ("sgd_step", vec![state, param, grad])
            } else {
                ("sgd_momentum_step", vec![state, param, grad, m])
            };
            vec![Dispatch { key: KernelKey::new(Shader::Optim, entry), params, buffers, workgroups }]
        }
        OptimizerSpec::Adam { lr, betas: (b1, b2), eps, weight_decay } => {
            let w1 = 1.0 - b1;
            // β = 0 makes β^t = 0 for every t ≥ 1; ln β = −100 gives e^(−100 t) ≈ 0 in f32 too.
            let ln = |b: f64| if b > 0.0 { b.ln().max(-100.0) } else { -100.0 };
            let params = Params::new()
                .u32(n as u32)
                .u32((w1.abs() >= 0.5) as u32)
                .f32(lr as f32)
                .f32(b2 as f32)
                .f32(w1 as f32)
                .f32((1.0 - b2) as f32)
                .f32(ln(b1) as f32)
                .f32(ln(b2) as f32)
                .f32(eps as f32)
                .f32(weight_decay as f32);
            // `m` holds both moments, [m (n), v (n)]: downlevel limits allow 4 storage buffers.
            let _ = v;
            vec![Dispatch {
                key: KernelKey::new(Shader::Optim, "adam_step"),
                params,
                buffers: vec![state, param, grad, m],
                workgroups,
            }]
        }
    }
}

/// The guard's check of one parameter tensor's update: the candidate values [`step`] would
/// write (the same WGSL functions), scanned for NaN and infinity before anything is written.
/// Record every check before the first [`step`] of the program.
pub fn check(
    spec: &OptimizerSpec,
    param: BufRef,
    grad: BufRef,
    m: BufRef,
    v: BufRef,
    state: BufRef,
    n: usize,
) -> Vec<Dispatch> {
    step(spec, param, grad, m, v, state, n)
        .into_iter()
        .map(|mut d| {
            let entry = match d.key.entry {
                "sgd_step" => "sgd_check",
                "sgd_momentum_step" => "sgd_momentum_check",
                _ => "adam_check",
            };
            d.key = KernelKey::new(Shader::Optim, entry);
            d
        })
        .collect()
}

/// Opens the gate and clears the guard's flag: the first dispatch of every program that changes
/// persistent state (before any selection kernel writes the gate).
pub fn guard_begin(state: BufRef) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Optim, "guard_begin"),
        params: Params::new().f32(0.0).f32(1.0),
        buffers: vec![state],
        workgroups: [1, 1, 1],
    }
}

/// Raises the guard's flag (and closes the gate) if any of `n` values of `buf` from `offset` on is
/// NaN or infinite.
pub fn guard_check(state: BufRef, buf: BufRef, offset: usize, n: usize) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Optim, "guard_check"),
        params: Params::new().u32(n as u32).u32(offset as u32),
        buffers: vec![state, buf],
        workgroups: grid_1d(n, 256),
    }
}

/// A deferred write of method state: `dst`[0..n) ← `src`[offset..offset + n), unless the
/// guard's flag is up (EATA's moving average m, which its selection kernel computes ahead).
pub fn commit_copy(state: BufRef, src: BufRef, offset: usize, dst: BufRef, n: usize) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Optim, "guard_commit_copy"),
        params: Params::new().u32(n as u32).u32(offset as u32),
        buffers: vec![state, src, dst],
        workgroups: grid_1d(n, 256),
    }
}

/// RBN's deferred write-back of one layer: running mean and variance ← the used statistics
/// (`stats` = [mean_B, var_B, mean_u, var_u], `channels` each), unless the guard's flag is up.
pub fn commit_stats(state: BufRef, stats: BufRef, mean: BufRef, var: BufRef, channels: usize) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Optim, "guard_commit_stats"),
        params: Params::new().u32(channels as u32).u32(2 * channels as u32),
        buffers: vec![state, stats, mean, var],
        workgroups: grid_1d(channels, 256),
    }
}

/// Ends a step: advances the step count unless the gate is closed. Record it after every
/// parameter's [`step`].
pub fn commit(state: BufRef) -> Vec<Dispatch> {
    vec![Dispatch {
        key: KernelKey::new(Shader::Optim, "commit"),
        params: Params::new().f32(1.0),
        buffers: vec![state],
        workgroups: [1, 1, 1],
    }]
}

/// Writes the state buffer: `step_count` steps taken, gate open when `gate`.
pub fn set_state(state: BufRef, step_count: u32, gate: bool) -> Vec<Dispatch> {
    vec![Dispatch {
        key: KernelKey::new(Shader::Optim, "set_state"),
        params: Params::new().f32(step_count as f32).f32(if gate { 1.0 } else { 0.0 }),
        buffers: vec![state],
        workgroups: [1, 1, 1],
    }]
}

/// Back to the state before the first step: count 0, gate open.
pub fn reset_state(state: BufRef) -> Vec<Dispatch> {
    set_state(state, 0, true)
}

/// Zeroes one parameter's moments (the buffer `m`, [`OptimizerSpec::moment_buffers`] times `n`
/// values; `v` is not used).
pub fn reset_moments(spec: &OptimizerSpec, m: BufRef, _v: BufRef, n: usize) -> Vec<Dispatch> {
    match spec.moment_buffers() {
        0 => Vec::new(),
        k => vec![fill(m, k * n, 0.0)],
    }
}

/// Sets `n` values of `buf` to `value`.
pub fn fill(buf: BufRef, n: usize, value: f32) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Optim, "fill"),
        params: Params::new().u32(n as u32).f32(value),
        buffers: vec![buf],
        workgroups: grid_1d(n, 256),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_from_config() {
        let mut c = OptimizerConfig::default();
        assert_eq!(
            OptimizerSpec::from_config(&c),
            OptimizerSpec::Sgd { lr: 0.00025, momentum: 0.9, dampening: 0.0, nesterov: false, weight_decay: 0.0 }
        );
        assert_eq!(OptimizerSpec::from_config(&c).moment_buffers(), 1);
        c.momentum = 0.0;
        assert_eq!(OptimizerSpec::from_config(&c).moment_buffers(), 0);
        c.kind = OptimizerKind::Adam;
        let s = OptimizerSpec::from_config(&c);
        assert_eq!(s, OptimizerSpec::Adam { lr: 0.00025, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.0 });
        assert_eq!(s.moment_buffers(), 2);
        assert_eq!(s.lr(), 0.00025);
    }

    #[test]
    fn plain_sgd_binds_no_moment_buffer() {
        let s = OptimizerSpec::Sgd { lr: 0.1, momentum: 0.0, dampening: 0.0, nesterov: false, weight_decay: 0.0 };
        let d = step(&s, BufRef::Value(0), BufRef::Value(1), BufRef::Value(2), BufRef::Value(3), BufRef::Value(4), 10);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].buffers, vec![BufRef::Value(4), BufRef::Value(0), BufRef::Value(1)]);
        assert!(reset_moments(&s, BufRef::Value(2), BufRef::Value(3), 10).is_empty());
    }

    #[test]
    fn initial_state_is_count_zero_gate_open_flag_clear() {
        assert_eq!(initial_state().to_f32_vec(), vec![0.0, 1.0, 0.0]);
    }
}
