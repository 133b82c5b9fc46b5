//! The adaptation building blocks on the GPU: loss kernels (`adapt::loss`) and optimizers
//! (`adapt::optim`).
//!
//! Losses are checked against naive f64 references written here, whose analytic gradients are
//! themselves checked against central finite differences of the f64 loss; each kernel runs both
//! overwriting buffers pre-filled with NaN (so a forgotten element shows) and accumulating into
//! random values. Optimizers are checked step by step against an f64 re-implementation of
//! `torch.optim`'s SGD and Adam rules, including the first-step momentum rule, dampening,
//! Nesterov, weight decay, the gate and reset; and against the PyTorch fixtures in
//! `tests/fixtures/tta/` (written by `tools/tta_reference.py`).

mod common;

use common::{assert_close, f64s};

use acclimate::GpuContext;
use acclimate::adapt::loss;
use acclimate::adapt::optim::{self, OptimizerSpec};
use acclimate::ops::{BufRef, Dispatch};
use acclimate::plan::standalone::run_dispatches;
use acclimate_test_macros::gpu_test;
use common::random_f32;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

fn run(ctx: &GpuContext, values: &mut [Vec<f32>], scratch: &[u64], dispatches: &[Dispatch]) {
    run_dispatches(ctx, values, &[], scratch, dispatches).expect("dispatches run");
}

fn assert_close64(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1.0f64, |m, w| m.max(w.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * scale, "{what}[{i}]: {g} vs {w}");
    }
}

// ---------------------------------------------------------------------------------------------
// f64 references
// ---------------------------------------------------------------------------------------------

fn log_softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    z.iter().map(|x| x - lse).collect()
}

fn softmax(z: &[f64]) -> Vec<f64> {
    log_softmax(z).iter().map(|x| x.exp()).collect()
}

fn entropy(z: &[f64]) -> f64 {
    let ls = log_softmax(z);
    -ls.iter().map(|l| l.exp() * l).sum::<f64>()
}

/// Σ c_i H_i and its analytic gradient.
fn entropy_ref(z: &[f64], coeff: &[f64], c: usize) -> (f64, Vec<f64>) {
    let mut l = 0.0;
    let mut g = Vec::new();
    for (row, ci) in z.chunks(c).zip(coeff) {
        let h = entropy(row);
        l += ci * h;
        g.extend(log_softmax(row).iter().map(|ls| ci * (-ls.exp() * (ls + h))));
    }
    (l, g)
}

fn cross_entropy_ref(z: &[f64], labels: &[usize], coeff: &[f64], c: usize) -> (f64, Vec<f64>) {
    let mut l = 0.0;
    let mut g = Vec::new();
    for ((row, &y), ci) in z.chunks(c).zip(labels).zip(coeff) {
        let ls = log_softmax(row);
        l += -ci * ls[y];
        g.extend(ls.iter().enumerate().map(|(j, lsj)| ci * (lsj.exp() - if j == y { 1.0 } else { 0.0 })));
    }
    (l, g)
}

/// −λ·H(p̄) only (the gradient comes from the formula under test and from finite differences).
fn diversity_value(z: &[f64], lambda: f64, b: usize, c: usize) -> f64 {
    let mut pbar = vec![0.0; c];
    for row in z.chunks(c) {
        for (acc, p) in pbar.iter_mut().zip(softmax(row)) {
            *acc += p / b as f64;
        }
    }
    lambda * pbar.iter().map(|p| if *p > 0.0 { p * p.ln() } else { 0.0 }).sum::<f64>()
}

fn diversity_grad(z: &[f64], lambda: f64, b: usize, c: usize) -> Vec<f64> {
    let probs: Vec<Vec<f64>> = z.chunks(c).map(softmax).collect();
    let mut pbar = vec![0.0; c];
    for p in &probs {
        for (acc, x) in pbar.iter_mut().zip(p) {
            *acc += x / b as f64;
        }
    }
    let lg: Vec<f64> = pbar.iter().map(|p| p.ln()).collect();
    let mut g = Vec::new();
    for p in &probs {
        let dot: f64 = p.iter().zip(&lg).map(|(a, b)| a * b).sum();
        g.extend(p.iter().zip(&lg).map(|(pk, lk)| lambda / b as f64 * pk * (lk - dot)));
    }
    g
}

/// Central differences of `f` at `x`.
fn finite_diff(f: &dyn Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    (0..x.len())
        .map(|i| {
            let mut a = x.to_vec();
            let mut b = x.to_vec();
            a[i] += h;
            b[i] -= h;
            (f(&a) - f(&b)) / (2.0 * h)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Loss kernels
// ---------------------------------------------------------------------------------------------

fn logits(b: usize, c: usize, seed: u64, spread: f32) -> Vec<f32> {
    random_f32(b * c, seed, -spread, spread)
}

#[gpu_test]
fn softmax_stats_match_f64(ctx: GpuContext) {
    // C = 1000 exercises the strided per-thread loop, the spread of ±60 the max subtraction.
    for (b, c, spread) in [(5, 7, 3.0), (3, 1000, 4.0), (4, 10, 60.0), (2, 1, 1.0)] {
        let z = logits(b, c, 11 + c as u64, spread);
        let mut values = vec![z.clone(), vec![f32::NAN; b * c], vec![f32::NAN; b]];
        let d = loss::softmax_stats(BufRef::Value(0), b, c, BufRef::Value(1), BufRef::Value(2));
        run(&ctx, &mut values, &[], &d);
        let z64 = f64s(&z);
        let probs: Vec<f64> = z64.chunks(c).flat_map(softmax).collect();
        let h: Vec<f64> = z64.chunks(c).map(entropy).collect();
        assert_close(&format!("probs {b}x{c}"), &values[1], &probs, 1e-6, 1e-7);
        assert_close(&format!("entropy {b}x{c}"), &values[2], &h, 1e-5, 1e-6);
    }
}

/// Builds a loss's dispatches given (loss, dz, accumulate, scratch).
type BuildLoss<'a> = &'a dyn Fn(BufRef, BufRef, bool, &mut Vec<u64>) -> Vec<Dispatch>;

/// Runs a loss builder twice: overwriting NaN-filled loss and dz, and accumulating into random
/// values; returns (loss, dz) of the overwrite run after checking the accumulate run against it.
fn run_loss(ctx: &GpuContext, inputs: Vec<Vec<f32>>, dz_len: usize, build: BuildLoss<'_>) -> (f32, Vec<f32>) {
    let n_in = inputs.len();
    let (loss_ref, dz_ref) = (BufRef::Value(n_in), BufRef::Value(n_in + 1));
    let mut out = None;
    for accumulate in [false, true] {
        let (l0, dz0) =
            if accumulate { (0.75f32, random_f32(dz_len, 99, -1.0, 1.0)) } else { (f32::NAN, vec![f32::NAN; dz_len]) };
        let mut values = inputs.clone();
        values.push(vec![l0]);
        values.push(dz0.clone());
        let mut scratch = Vec::new();
        let d = build(loss_ref, dz_ref, accumulate, &mut scratch);
        run(ctx, &mut values, &scratch, &d);
        let (l, dz) = (values[n_in][0], values[n_in + 1].clone());
        match &out {
            None => out = Some((l, dz)),
            Some((l1, dz1)) => {
                assert!((l - (l0 + l1)).abs() <= 1e-5 * (1.0 + l1.abs()), "accumulated loss {l} vs {l0} + {l1}");
                for (i, ((a, b), c)) in dz.iter().zip(dz1).zip(&dz0).enumerate() {
                    assert!((a - (b + c)).abs() <= 1e-6 * (1.0 + c.abs()), "accumulated dz[{i}]: {a} vs {c} + {b}");
                }
            }
        }
    }
    out.expect("ran")
}

#[gpu_test]
fn entropy_loss_matches_f64_and_finite_differences(ctx: GpuContext) {
    for (b, c) in [(4, 10), (3, 300), (1, 5), (300, 3)] {
        let z = logits(b, c, 21 + b as u64, 3.0);
        // Weights like EATA's: some samples excluded (0), the rest positive.
        let mut coeff = random_f32(b, 5, 0.0, 2.0);
        coeff[0] = 0.0;
        let (l, dz) = run_loss(&ctx, vec![z.clone(), coeff.clone()], b * c, &|loss, dz, acc, s| {
            loss::entropy_loss(BufRef::Value(0), BufRef::Value(1), b, c, loss, dz, acc, s)
        });
        let (z64, c64) = (f64s(&z), f64s(&coeff));
        let (want_l, want_g) = entropy_ref(&z64, &c64, c);
        if b * c <= 200 {
            let fd = finite_diff(&|x| entropy_ref(x, &c64, c).0, &z64, 1e-5);
            assert_close64("entropy analytic vs finite differences", &want_g, &fd, 1e-8);
        }
        assert_close(&format!("entropy loss {b}x{c}"), &[l], &[want_l], 1e-5, 1e-6);
        assert_close(&format!("entropy dz {b}x{c}"), &dz, &want_g, 1e-5, 1e-7);
        assert!(dz[..c].iter().all(|g| *g == 0.0), "a zero coefficient gives a zero gradient row");
    }
}

#[gpu_test]
fn mean_entropy_coefficients(ctx: GpuContext) {
    let (b, c) = (6, 4);
    let z = logits(b, c, 3, 2.0);
    let mut values = vec![z.clone(), vec![f32::NAN; b], vec![f32::NAN], vec![f32::NAN; b * c]];
    let mut scratch = Vec::new();
    let mut d = vec![loss::fill_mean_coefficients(BufRef::Value(1), b)];
    d.extend(loss::entropy_loss(
        BufRef::Value(0),
        BufRef::Value(1),
        b,
        c,
        BufRef::Value(2),
        BufRef::Value(3),
        false,
        &mut scratch,
    ));
    run(&ctx, &mut values, &scratch, &d);
    assert!(values[1].iter().all(|&x| x == 1.0 / 6.0));
    let z64 = f64s(&z);
    let mean_h = z64.chunks(c).map(entropy).sum::<f64>() / b as f64;
    assert_close("mean entropy", &values[2], &[mean_h], 1e-6, 1e-7);
}

#[gpu_test]
fn cross_entropy_loss_matches_f64_and_finite_differences(ctx: GpuContext) {
    for (b, c) in [(5, 7), (2, 600)] {
        let z = logits(b, c, 31 + c as u64, 3.0);
        let labels: Vec<usize> = (0..b).map(|i| (i * 7 + 3) % c).collect();
        let coeff = random_f32(b, 8, 0.1, 1.0);
        let lab_f: Vec<f32> = labels.iter().map(|&y| y as f32).collect();
        let (l, dz) = run_loss(&ctx, vec![z.clone(), lab_f, coeff.clone()], b * c, &|loss, dz, acc, s| {
            loss::cross_entropy_loss(BufRef::Value(0), BufRef::Value(1), BufRef::Value(2), b, c, loss, dz, acc, s)
        });
        let (z64, c64) = (f64s(&z), f64s(&coeff));
        let (want_l, want_g) = cross_entropy_ref(&z64, &labels, &c64, c);
        if b * c <= 200 {
            let fd = finite_diff(&|x| cross_entropy_ref(x, &labels, &c64, c).0, &z64, 1e-5);
            assert_close64("cross-entropy analytic vs finite differences", &want_g, &fd, 1e-8);
        }
        assert_close("cross-entropy loss", &[l], &[want_l], 1e-5, 1e-6);
        assert_close("cross-entropy dz", &dz, &want_g, 1e-5, 1e-7);
    }
}

#[gpu_test]
fn cross_entropy_invalid_label_is_nan_not_garbage(ctx: GpuContext) {
    let (b, c) = (3, 4);
    let z = logits(b, c, 41, 2.0);
    for bad in [4.0f32, -1.0, 1.5] {
        let mut values = vec![z.clone(), vec![0.0, bad, 2.0], vec![1.0; b], vec![0.0], vec![0.0; b * c]];
        let mut scratch = Vec::new();
        let d = loss::cross_entropy_loss(
            BufRef::Value(0),
            BufRef::Value(1),
            BufRef::Value(2),
            b,
            c,
            BufRef::Value(3),
            BufRef::Value(4),
            false,
            &mut scratch,
        );
        run(&ctx, &mut values, &scratch, &d);
        assert!(values[3][0].is_nan(), "label {bad}: loss {}", values[3][0]);
        assert!(values[4][c..2 * c].iter().all(|g| g.is_nan()), "label {bad}: its row");
        assert!(values[4][..c].iter().chain(&values[4][2 * c..]).all(|g| g.is_finite()), "label {bad}: other rows");
    }
}

#[gpu_test]
fn diversity_loss_matches_f64_and_finite_differences(ctx: GpuContext) {
    for (b, c, lambda) in [(4, 5, 0.5f32), (3, 400, 1.0), (260, 3, 0.2)] {
        let z = logits(b, c, 51 + c as u64, 3.0);
        let (l, dz) = run_loss(&ctx, vec![z.clone()], b * c, &|loss, dz, acc, s| {
            loss::diversity_loss(BufRef::Value(0), lambda, b, c, loss, dz, acc, s)
        });
        let z64 = f64s(&z);
        let lam = lambda as f64;
        let want_g = diversity_grad(&z64, lam, b, c);
        if b * c <= 200 {
            let fd = finite_diff(&|x| diversity_value(x, lam, b, c), &z64, 1e-5);
            assert_close64("diversity analytic vs finite differences", &want_g, &fd, 1e-8);
        }
        assert_close(&format!("diversity loss {b}x{c}"), &[l], &[diversity_value(&z64, lam, b, c)], 1e-5, 1e-6);
        assert_close(&format!("diversity dz {b}x{c}"), &dz, &want_g, 1e-5, 1e-8);
    }
}

#[gpu_test]
fn diversity_with_an_underflowing_class_stays_finite(ctx: GpuContext) {
    // Class 2 has probability e^-200 in every row: 0 in f32. Its term and gradient are the limit 0.
    let (b, c) = (2, 3);
    let z = vec![1.0, 0.5, -200.0, 0.2, 0.9, -200.0];
    let (l, dz) = run_loss(&ctx, vec![z.clone()], b * c, &|loss, dz, acc, s| {
        loss::diversity_loss(BufRef::Value(0), 1.0, b, c, loss, dz, acc, s)
    });
    let z64 = f64s(&z);
    assert!(l.is_finite() && dz.iter().all(|g| g.is_finite()), "{l} {dz:?}");
    assert_close("loss", &[l], &[diversity_value(&z64, 1.0, b, c)], 1e-5, 1e-6);
    let mut want = diversity_grad(&z64, 1.0, b, c);
    for w in want.iter_mut() {
        if !w.is_finite() {
            *w = 0.0;
        }
    }
    assert_close("dz", &dz, &want, 1e-5, 1e-8);
}

#[gpu_test]
fn losses_compose_by_accumulating(ctx: GpuContext) {
    // WoC / UniEnt: weighted entropy, then − λ·H(p̄) added on top.
    let (b, c) = (4, 6);
    let z = logits(b, c, 61, 2.0);
    let coeff = vec![0.25f32, 0.0, 0.25, 0.25];
    let mut values = vec![z.clone(), coeff.clone(), vec![f32::NAN], vec![f32::NAN; b * c]];
    let mut scratch = Vec::new();
    let mut d = loss::entropy_loss(
        BufRef::Value(0),
        BufRef::Value(1),
        b,
        c,
        BufRef::Value(2),
        BufRef::Value(3),
        false,
        &mut scratch,
    );
    d.extend(loss::diversity_loss(BufRef::Value(0), 0.5, b, c, BufRef::Value(2), BufRef::Value(3), true, &mut scratch));
    run(&ctx, &mut values, &scratch, &d);
    let z64 = f64s(&z);
    let (le, ge) = entropy_ref(&z64, &f64s(&coeff), c);
    let gd = diversity_grad(&z64, 0.5, b, c);
    let want_g: Vec<f64> = ge.iter().zip(&gd).map(|(a, b)| a + b).collect();
    assert_close("composed loss", &values[2], &[le + diversity_value(&z64, 0.5, b, c)], 1e-5, 1e-6);
    assert_close("composed dz", &values[3], &want_g, 1e-5, 1e-7);
}

#[gpu_test]
fn ewc_penalty_matches_f64(ctx: GpuContext) {
    // n = 700 spans three workgroups and the strided sum.
    for n in [5usize, 700] {
        let theta = random_f32(n, 71, -1.0, 1.0);
        let star = random_f32(n, 72, -1.0, 1.0);
        let fisher = random_f32(n, 73, 0.0, 3.0);
        let lambda = 2000.0f32;
        let lam = lambda as f64;
        let (t, s, f) = (f64s(&theta), f64s(&star), f64s(&fisher));
        let penalty = |x: &[f64]| (0..n).map(|i| lam * f[i] * (x[i] - s[i]).powi(2)).sum::<f64>();
        let want_l = penalty(&t);
        let want_g: Vec<f64> = (0..n).map(|i| 2.0 * lam * f[i] * (t[i] - s[i])).collect();
        assert_close64("ewc analytic vs finite differences", &want_g, &finite_diff(&penalty, &t, 1e-4), 1e-7);
        // The gradient always adds to the reverse pass's; the loss overwrites or adds.
        for accumulate in [false, true] {
            let g0 = random_f32(n, 74, -1.0, 1.0);
            let l0 = if accumulate { 0.5f32 } else { f32::NAN };
            let mut values = vec![theta.clone(), star.clone(), fisher.clone(), vec![l0], g0.clone()];
            let mut scratch = Vec::new();
            let d = loss::ewc_penalty(
                BufRef::Value(0),
                BufRef::Value(1),
                BufRef::Value(2),
                lambda,
                n,
                BufRef::Value(3),
                BufRef::Value(4),
                accumulate,
                &mut scratch,
            );
            run(&ctx, &mut values, &scratch, &d);
            let base = if accumulate { l0 as f64 } else { 0.0 };
            assert_close(&format!("ewc loss n={n} acc={accumulate}"), &values[3], &[base + want_l], 1e-5, 1e-6);
            let want: Vec<f64> = g0.iter().zip(&want_g).map(|(a, b)| *a as f64 + b).collect();
            assert_close(&format!("ewc grad n={n}"), &values[4], &want, 1e-6, 1e-6);
        }
    }
}

#[gpu_test]
fn loss_kernels_are_deterministic(ctx: GpuContext) {
    let (b, c) = (33, 517);
    let z = logits(b, c, 81, 5.0);
    let coeff = random_f32(b, 82, 0.0, 1.0);
    let mut first: Option<Vec<Vec<f32>>> = None;
    for _ in 0..3 {
        let mut values = vec![z.clone(), coeff.clone(), vec![0.0], vec![0.0; b * c]];
        let mut scratch = Vec::new();
        let mut d = loss::entropy_loss(
            BufRef::Value(0),
            BufRef::Value(1),
            b,
            c,
            BufRef::Value(2),
            BufRef::Value(3),
            false,
            &mut scratch,
        );
        d.extend(loss::diversity_loss(
            BufRef::Value(0),
            0.3,
            b,
            c,
            BufRef::Value(2),
            BufRef::Value(3),
            true,
            &mut scratch,
        ));
        run(&ctx, &mut values, &scratch, &d);
        let bits: Vec<Vec<f32>> = values[2..].to_vec();
        match &first {
            None => first = Some(bits),
            Some(f) => {
                for (a, b) in f.iter().zip(&bits) {
                    assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "results differ between runs");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Optimizers
// ---------------------------------------------------------------------------------------------

/// `torch.optim` in f64: one parameter tensor's state.
#[derive(Clone, Debug)]
struct RefOpt {
    spec: OptimizerSpec,
    t: u64,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl RefOpt {
    fn new(spec: OptimizerSpec, n: usize) -> RefOpt {
        RefOpt { spec, t: 0, m: vec![0.0; n], v: vec![0.0; n] }
    }

    fn step(&mut self, p: &mut [f64], grad: &[f64]) {
        match self.spec {
            OptimizerSpec::Sgd { lr, momentum, dampening, nesterov, weight_decay } => {
                for i in 0..p.len() {
                    let mut g = grad[i] + weight_decay * p[i];
                    if momentum != 0.0 {
                        self.m[i] = if self.t == 0 { g } else { momentum * self.m[i] + (1.0 - dampening) * g };
                        g = if nesterov { g + momentum * self.m[i] } else { self.m[i] };
                    }
                    p[i] -= lr * g;
                }
            }
            OptimizerSpec::Adam { lr, betas: (b1, b2), eps, weight_decay } => {
                let t = (self.t + 1) as i32;
                let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
                for i in 0..p.len() {
                    let g = grad[i] + weight_decay * p[i];
                    self.m[i] += (1.0 - b1) * (g - self.m[i]);
                    self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
                    let denom = self.v[i].sqrt() / bc2.sqrt() + eps;
                    p[i] -= lr / bc1 * self.m[i] / denom;
                }
            }
        }
        self.t += 1;
    }
}

/// GPU buffers of one parameter: values [state, param, grad, moments, unused]; Adam's moments
/// are [m (n), v (n)] in one buffer.
struct GpuOpt {
    spec: OptimizerSpec,
    values: Vec<Vec<f32>>,
}

const S: BufRef = BufRef::Value(0);
const P: BufRef = BufRef::Value(1);
const G: BufRef = BufRef::Value(2);
const M: BufRef = BufRef::Value(3);
const V: BufRef = BufRef::Value(4);

impl GpuOpt {
    fn new(spec: OptimizerSpec, p0: &[f32]) -> GpuOpt {
        let n = p0.len();
        GpuOpt {
            spec,
            values: vec![
                optim::initial_state().to_f32_vec(),
                p0.to_vec(),
                vec![0.0; n],
                vec![0.0; n * spec.moment_buffers().max(1)],
                vec![0.0; n],
            ],
        }
    }

    fn n(&self) -> usize {
        self.values[1].len()
    }

    fn step(&mut self, ctx: &GpuContext, grad: &[f32]) {
        self.values[2] = grad.to_vec();
        let mut d = optim::step(&self.spec, P, G, M, V, S, self.n());
        d.extend(optim::commit(S));
        run(ctx, &mut self.values, &[], &d);
    }

    /// A step as the step program records it: guard_begin, the guard's check, the update,
    /// the counter.
    fn guarded_step(&mut self, ctx: &GpuContext, grad: &[f32]) {
        self.values[2] = grad.to_vec();
        let mut d = vec![optim::guard_begin(S)];
        d.extend(optim::check(&self.spec, P, G, M, V, S, self.n()));
        d.extend(optim::step(&self.spec, P, G, M, V, S, self.n()));
        d.extend(optim::commit(S));
        run(ctx, &mut self.values, &[], &d);
    }

    fn reset(&mut self, ctx: &GpuContext) {
        let mut d = optim::reset_moments(&self.spec, M, V, self.n());
        d.extend(optim::reset_state(S));
        run(ctx, &mut self.values, &[], &d);
    }
}

fn sgd(lr: f64, momentum: f64, dampening: f64, nesterov: bool, weight_decay: f64) -> OptimizerSpec {
    OptimizerSpec::Sgd { lr, momentum, dampening, nesterov, weight_decay }
}

fn adam(lr: f64, b1: f64, b2: f64, eps: f64, weight_decay: f64) -> OptimizerSpec {
    OptimizerSpec::Adam { lr, betas: (b1, b2), eps, weight_decay }
}

fn optimizer_cases() -> Vec<OptimizerSpec> {
    vec![
        sgd(0.1, 0.0, 0.0, false, 0.0),
        sgd(0.05, 0.0, 0.0, false, 0.01),
        sgd(0.1, 0.9, 0.0, false, 0.0),
        sgd(0.1, 0.9, 0.0, true, 0.0),
        sgd(0.1, 0.9, 0.5, false, 0.0),
        sgd(0.02, 0.5, 0.1, false, 0.05),
        sgd(0.02, 0.8, 0.0, true, 0.05),
        adam(1e-3, 0.9, 0.999, 1e-8, 0.0),
        adam(1e-2, 0.9, 0.999, 1e-8, 0.1),
        // 1 − β1 ≥ 0.5 takes torch.lerp's other branch.
        adam(1e-2, 0.3, 0.99, 1e-6, 0.0),
        adam(1e-2, 0.0, 0.0, 1e-8, 0.0),
    ]
}

#[gpu_test]
fn optimizers_match_torch_rules_over_several_steps(ctx: GpuContext) {
    // 600 values: three workgroups.
    let n = 600;
    for spec in optimizer_cases() {
        let p0 = random_f32(n, 91, -1.0, 1.0);
        let mut gpu = GpuOpt::new(spec, &p0);
        let mut reference = RefOpt::new(spec, n);
        let mut p = f64s(&p0);
        for k in 0..5 {
            let g = random_f32(n, 100 + k, -1.0, 1.0);
            gpu.step(&ctx, &g);
            reference.step(&mut p, &f64s(&g));
            assert_close(&format!("{spec:?} step {k} param"), &gpu.values[1], &p, 1e-6, 1e-6);
            if spec.moment_buffers() >= 1 {
                assert_close(&format!("{spec:?} step {k} m"), &gpu.values[3][..n], &reference.m, 1e-6, 1e-7);
            }
            if spec.moment_buffers() == 2 {
                assert_close(&format!("{spec:?} step {k} v"), &gpu.values[3][n..], &reference.v, 1e-6, 1e-9);
            }
            assert_eq!(gpu.values[0], vec![(k + 1) as f32, 1.0, 0.0], "{spec:?}: state after step {k}");
        }
    }
}

#[gpu_test]
fn sgd_first_step_clones_the_gradient_without_dampening(ctx: GpuContext) {
    let g = random_f32(10, 7, -1.0, 1.0);
    let mut gpu = GpuOpt::new(sgd(0.1, 0.9, 0.5, false, 0.0), &[0.0; 10]);
    gpu.step(&ctx, &g);
    assert_eq!(gpu.values[3], g, "momentum buffer after the first step");
    // Second step: buf = 0.9·g + 0.5·g2.
    let g2 = random_f32(10, 8, -1.0, 1.0);
    gpu.step(&ctx, &g2);
    for i in 0..10 {
        let want = 0.9 * g[i] as f64 + 0.5 * g2[i] as f64;
        assert!((gpu.values[3][i] as f64 - want).abs() < 1e-6, "buf[{i}]");
    }
}

#[gpu_test]
fn closed_gate_changes_nothing(ctx: GpuContext) {
    let n = 300;
    for spec in optimizer_cases() {
        let mut gpu = GpuOpt::new(spec, &random_f32(n, 1, -1.0, 1.0));
        let mut reference = RefOpt::new(spec, n);
        let mut p = f64s(&gpu.values[1]);
        for k in 0..4u64 {
            let g = random_f32(n, 200 + k, -1.0, 1.0);
            let open = k != 1 && k != 2;
            if !open {
                let d = optim::set_state(S, gpu.values[0][0] as u32, false);
                run(&ctx, &mut gpu.values, &[], &d);
                let before = gpu.values.clone();
                gpu.step(&ctx, &g);
                for (i, (a, b)) in before.iter().zip(&gpu.values).enumerate().filter(|(i, _)| *i != 2) {
                    assert!(
                        a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{spec:?}: buffer {i} changed with the gate closed"
                    );
                }
                let d = optim::set_state(S, gpu.values[0][0] as u32, true);
                run(&ctx, &mut gpu.values, &[], &d);
                continue;
            }
            gpu.step(&ctx, &g);
            reference.step(&mut p, &f64s(&g));
            assert_close(&format!("{spec:?} step {k}"), &gpu.values[1], &p, 1e-6, 1e-6);
        }
        // Steps 1 and 2 were skipped entirely: two steps counted.
        assert_eq!(gpu.values[0], vec![2.0, 1.0, 0.0], "{spec:?}");
    }
}

/// The parameter guard at the kernel level: a gradient holding NaN or an infinity, or one whose
/// update overflows float32 (Adam's g² at 1e30, SGD's lr·g at lr 1e38), changes no parameter, no
/// moment and no step count, and raises the flag; the next finite step proceeds exactly as the
/// torch rule from the untouched state.
#[gpu_test]
fn guard_refuses_non_finite_updates(ctx: GpuContext) {
    let n = 300;
    let mut cases = optimizer_cases();
    cases.push(sgd(1e38, 0.0, 0.0, false, 0.0));
    for spec in cases {
        let mut gpu = GpuOpt::new(spec, &random_f32(n, 5, -1.0, 1.0));
        let mut reference = RefOpt::new(spec, n);
        let mut p = f64s(&gpu.values[1]);
        let finite = random_f32(n, 500, -1.0, 1.0);
        let huge_lr = spec.lr() > 1.0;
        if !huge_lr {
            gpu.guarded_step(&ctx, &finite);
            reference.step(&mut p, &f64s(&finite));
        }
        let steps = gpu.values[0][0];
        let mut bad_grads = Vec::new();
        for (at, v) in [(0, f32::NAN), (299, f32::INFINITY), (150, f32::NEG_INFINITY), (7, 1e30)] {
            let mut g = finite.clone();
            g[at] = v;
            bad_grads.push(g);
        }
        if huge_lr {
            bad_grads = vec![finite.iter().map(|x| x * 100.0).collect()];
        }
        for g in bad_grads {
            let before = gpu.values.clone();
            gpu.guarded_step(&ctx, &g);
            if matches!(spec, OptimizerSpec::Sgd { .. }) && !huge_lr && g.iter().all(|x| x.is_finite()) {
                // SGD's update with a finite 1e30 gradient is finite: a legitimate step (the last
                // case of the list). Adam's v = g² overflows and is refused.
                continue;
            }
            for (i, (a, b)) in before.iter().zip(&gpu.values).enumerate().filter(|(i, _)| *i != 0 && *i != 2) {
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{spec:?}: buffer {i} changed by a refused step"
                );
            }
            assert_eq!(gpu.values[0], vec![steps, 0.0, 1.0], "{spec:?}: state after a refused step");
        }
        if huge_lr {
            continue;
        }
        // After refusals, one more finite step follows the torch rule from the untouched state
        // (a fresh optimizer: the 1e30 case above was a real step for SGD).
        let mut gpu2 = GpuOpt::new(spec, &random_f32(n, 5, -1.0, 1.0));
        gpu2.guarded_step(&ctx, &finite);
        for case in bad_grads_for(&finite) {
            gpu2.guarded_step(&ctx, &case);
        }
        let g = random_f32(n, 501, -1.0, 1.0);
        gpu2.guarded_step(&ctx, &g);
        reference.step(&mut p, &f64s(&g));
        assert_close(&format!("{spec:?} step after refusals"), &gpu2.values[1], &p, 1e-6, 1e-6);
        assert_eq!(gpu2.values[0], vec![steps + 1.0, 1.0, 0.0], "{spec:?}: state after the next step");
    }
}

/// Gradients that every optimizer case refuses (NaN and infinities).
fn bad_grads_for(finite: &[f32]) -> Vec<Vec<f32>> {
    [(0, f32::NAN), (299, f32::INFINITY), (150, f32::NEG_INFINITY)]
        .into_iter()
        .map(|(at, v)| {
            let mut g = finite.to_vec();
            g[at] = v;
            g
        })
        .collect()
}

#[gpu_test]
fn reset_restarts_from_a_first_step(ctx: GpuContext) {
    let n = 20;
    for spec in [sgd(0.1, 0.9, 0.0, true, 0.0), sgd(0.1, 0.9, 0.3, false, 0.0), adam(1e-2, 0.9, 0.999, 1e-8, 0.0)] {
        let mut gpu = GpuOpt::new(spec, &random_f32(n, 3, -1.0, 1.0));
        for k in 0..3 {
            gpu.step(&ctx, &random_f32(n, 300 + k, -1.0, 1.0));
        }
        gpu.reset(&ctx);
        assert_eq!(gpu.values[0], vec![0.0, 1.0, 0.0]);
        assert!(gpu.values[3].iter().chain(&gpu.values[4]).all(|&x| x == 0.0), "{spec:?}: moments zeroed");
        // From here the optimizer behaves as a fresh one started at the current parameters.
        let mut p = f64s(&gpu.values[1]);
        let mut reference = RefOpt::new(spec, n);
        for k in 0..2 {
            let g = random_f32(n, 400 + k, -1.0, 1.0);
            gpu.step(&ctx, &g);
            reference.step(&mut p, &f64s(&g));
            assert_close(&format!("{spec:?} after reset, step {k}"), &gpu.values[1], &p, 1e-6, 1e-6);
        }
    }
}

#[gpu_test]
fn several_tensors_share_one_step_counter(ctx: GpuContext) {
    let spec = adam(1e-2, 0.9, 0.999, 1e-8, 0.01);
    let (na, nb) = (7, 300);
    // values: [state, pa, ga, [ma, va], unused, pb, gb, [mb, vb], unused]
    let mut values = vec![
        optim::initial_state().to_f32_vec(),
        random_f32(na, 1, -1.0, 1.0),
        vec![0.0; na],
        vec![0.0; 2 * na],
        vec![0.0; na],
        random_f32(nb, 2, -1.0, 1.0),
        vec![0.0; nb],
        vec![0.0; 2 * nb],
        vec![0.0; nb],
    ];
    let (mut ra, mut rb) = (RefOpt::new(spec, na), RefOpt::new(spec, nb));
    let (mut pa, mut pb) = (f64s(&values[1]), f64s(&values[5]));
    let v = BufRef::Value;
    for k in 0..3 {
        values[2] = random_f32(na, 10 + k, -1.0, 1.0);
        values[6] = random_f32(nb, 20 + k, -1.0, 1.0);
        let mut d = optim::step(&spec, v(1), v(2), v(3), v(4), v(0), na);
        d.extend(optim::step(&spec, v(5), v(6), v(7), v(8), v(0), nb));
        d.extend(optim::commit(v(0)));
        run(&ctx, &mut values, &[], &d);
        ra.step(&mut pa, &f64s(&values[2]));
        rb.step(&mut pb, &f64s(&values[6]));
        assert_close("tensor a", &values[1], &pa, 1e-6, 1e-6);
        assert_close("tensor b", &values[5], &pb, 1e-6, 1e-6);
        assert_eq!(values[0][0], (k + 1) as f32);
    }
}

#[gpu_test]
fn adam_bias_corrections_are_accurate_at_any_step(ctx: GpuContext) {
    // θ = 0 and lr = 1 expose the update itself, so its relative accuracy is measured, not
    // hidden under θ's rounding. Nonzero moments make the update depend on both corrections
    // (from zero moments they cancel at t = 1).
    let n = 16;
    let m0 = random_f32(n, 5, -1.0, 1.0);
    let v0 = random_f32(n, 6, 0.01, 1.0);
    let g = random_f32(n, 7, -1.0, 1.0);
    for (b1, b2) in [(0.9, 0.999), (0.99, 0.9999), (0.5, 0.9)] {
        for t0 in [0u32, 1, 9, 999, 99_999] {
            let spec = adam(1.0, b1, b2, 1e-8, 0.0);
            let mut gpu = GpuOpt::new(spec, &vec![0.0; n]);
            gpu.values[3] = [m0.clone(), v0.clone()].concat();
            run(&ctx, &mut gpu.values, &[], &optim::set_state(S, t0, true));
            gpu.step(&ctx, &g);
            let mut reference = RefOpt { spec, t: t0 as u64, m: f64s(&m0), v: f64s(&v0) };
            let mut p = vec![0.0; n];
            reference.step(&mut p, &f64s(&g));
            for (i, (&got, &want)) in gpu.values[1].iter().zip(&p).enumerate() {
                let got = got as f64;
                assert!(
                    (got - want).abs() <= 2e-6 * want.abs() + 1e-9,
                    "betas ({b1}, {b2}), t = {}: update[{i}] {got} vs {want} ({:.2e} relative)",
                    t0 + 1,
                    (got - want).abs() / want.abs()
                );
            }
            assert_eq!(gpu.values[0][0], (t0 + 1) as f32);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PyTorch fixtures
// ---------------------------------------------------------------------------------------------

fn fixture(name: &str) -> serde_json::Value {
    let p = common::repo_root().join("tests/fixtures/tta").join(name);
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (generated by tools/tta_reference.py with PyTorch)", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    match v {
        serde_json::Value::Array(a) => a.iter().flat_map(floats).collect(),
        serde_json::Value::Number(n) => vec![n.as_f64().expect("a number")],
        other => panic!("expected numbers, got {other}"),
    }
}

#[gpu_test]
fn optimizers_match_pytorch_fixture(ctx: GpuContext) {
    let doc = fixture("optim.json");
    let cases = doc.get("cases").unwrap_or(&doc).as_array().expect("a list of cases");
    assert!(!cases.is_empty());
    let mut worst = 0.0f64;
    for (ci, case) in cases.iter().enumerate() {
        let num = |k: &str, default: f64| case.get(k).and_then(|v| v.as_f64()).unwrap_or(default);
        let kind = case["kind"].as_str().expect("kind");
        let spec = match kind {
            "sgd" => sgd(
                num("lr", f64::NAN),
                num("momentum", 0.0),
                num("dampening", 0.0),
                case.get("nesterov").and_then(|v| v.as_bool()).unwrap_or(false),
                num("weight_decay", 0.0),
            ),
            "adam" => {
                let betas = case.get("betas").map(floats).unwrap_or_else(|| vec![0.9, 0.999]);
                adam(num("lr", f64::NAN), betas[0], betas[1], num("eps", 1e-8), num("weight_decay", 0.0))
            }
            other => panic!("case {ci}: unknown optimizer kind {other}"),
        };
        let p0: Vec<f32> = floats(&case["param0"]).iter().map(|&x| x as f32).collect();
        let grads = case["grads"].as_array().expect("grads");
        let params = case["params"].as_array().expect("params");
        assert_eq!(grads.len(), params.len(), "case {ci}");
        let mut gpu = GpuOpt::new(spec, &p0);
        for (k, (g, want)) in grads.iter().zip(params).enumerate() {
            let g: Vec<f32> = floats(g).iter().map(|&x| x as f32).collect();
            gpu.step(&ctx, &g);
            let want = floats(want);
            for (i, (a, b)) in gpu.values[1].iter().zip(&want).enumerate() {
                let err = (*a as f64 - b).abs();
                worst = worst.max(err / (1.0 + b.abs()));
                assert!(
                    err <= 1e-6 * (1.0 + b.abs()),
                    "case {ci} ({spec:?}) step {k} [{i}]: {a} vs torch {b} ({err:.2e})"
                );
            }
        }
    }
    eprintln!("{} torch.optim trajectories: worst |ours - torch| / (1 + |torch|) = {worst:.2e}", cases.len());
}

/// Every loss kernel against PyTorch's autograd (`tests/fixtures/tta/losses.json`, written by
/// `tools/tta_losses.py`): values and gradients, including a row whose softmax underflows.
#[gpu_test]
fn losses_match_pytorch_fixture(ctx: GpuContext) {
    let doc = fixture("losses.json");
    let f32s = |v: &serde_json::Value| -> Vec<f32> { floats(v).iter().map(|&x| x as f32).collect() };
    let rows = doc["logits"].as_array().expect("logits");
    let (b, c) = (rows.len(), rows[0].as_array().expect("a row").len());
    let z = f32s(&doc["logits"]);
    let coeff = f32s(&doc["c"]);
    let labels = f32s(&doc["labels"]);
    let check = |what: &str, (l, dz): (f32, Vec<f32>), want: &serde_json::Value| {
        assert_close(&format!("{what} value"), &[l], &floats(&want["value"]), 1e-5, 1e-6);
        assert_close(&format!("{what} grad"), &dz, &floats(&want["grad"]), 1e-5, 1e-6);
    };
    let mean = vec![1.0 / b as f32; b];
    check(
        "mean entropy",
        run_loss(&ctx, vec![z.clone(), mean], b * c, &|loss, dz, acc, s| {
            loss::entropy_loss(BufRef::Value(0), BufRef::Value(1), b, c, loss, dz, acc, s)
        }),
        &doc["entropy_mean"],
    );
    check(
        "weighted entropy",
        run_loss(&ctx, vec![z.clone(), coeff.clone()], b * c, &|loss, dz, acc, s| {
            loss::entropy_loss(BufRef::Value(0), BufRef::Value(1), b, c, loss, dz, acc, s)
        }),
        &doc["entropy_weighted"],
    );
    check(
        "weighted cross-entropy",
        run_loss(&ctx, vec![z.clone(), labels, coeff], b * c, &|loss, dz, acc, s| {
            loss::cross_entropy_loss(BufRef::Value(0), BufRef::Value(1), BufRef::Value(2), b, c, loss, dz, acc, s)
        }),
        &doc["ce_weighted"],
    );
    let lambda = doc["diversity"]["lambda"].as_f64().expect("lambda") as f32;
    check(
        "diversity",
        run_loss(&ctx, vec![z], b * c, &|loss, dz, acc, s| {
            loss::diversity_loss(BufRef::Value(0), lambda, b, c, loss, dz, acc, s)
        }),
        &doc["diversity"],
    );
    let e = &doc["ewc"];
    let (theta, star, fisher) = (f32s(&e["theta"]), f32s(&e["theta_star"]), f32s(&e["fisher"]));
    let n = theta.len();
    let mut values = vec![theta, star, fisher, vec![f32::NAN], vec![0.0; n]];
    let mut scratch = Vec::new();
    let lam = e["lambda"].as_f64().expect("lambda") as f32;
    let d = loss::ewc_penalty(
        BufRef::Value(0),
        BufRef::Value(1),
        BufRef::Value(2),
        lam,
        n,
        BufRef::Value(3),
        BufRef::Value(4),
        false,
        &mut scratch,
    );
    run(&ctx, &mut values, &scratch, &d);
    assert_close("ewc value", &values[3], &floats(&e["value"]), 1e-5, 1e-6);
    assert_close("ewc grad", &values[4], &floats(&e["grad"]), 1e-5, 1e-6);
}
