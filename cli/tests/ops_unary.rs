//! The math functions of the elementwise family (Log, Exp, Tanh, Neg, Abs, Sqrt, Erf, Gelu) against
//! f64 (erf and erfc from the `libm` crate),
//! where the ONNX node tests (rtol 1e-3 on random normals) would not notice a problem: log near
//! 1 and over the whole float range, tanh at tiny and saturating arguments, values outside a
//! function's domain (C's results: log 0 = -inf, NaN below, sqrt of a negative NaN), and the CPU
//! constant folding of integer Neg/Abs (shape arithmetic).

mod common;

use acclimate::GpuContext;
use acclimate::ops::elementwise::{self, Unary};
use acclimate::ops::{BufRef, Lowering, Operand};
use acclimate::plan::standalone::run_dispatches;
use acclimate::tensor::{Data, Tensor};
use acclimate_test_macros::gpu_test;

/// The op's GPU forward on `x`.
fn gpu_unary(ctx: &GpuContext, u: Unary, x: &[f32]) -> Vec<f32> {
    let shape = vec![x.len()];
    let mut l = Lowering {
        node: format!("{u:?}"),
        inputs: vec![Some(Operand { buf: BufRef::Value(0), shape: shape.clone(), value: None })],
        outputs: vec![Operand { buf: BufRef::Value(1), shape, value: None }],
        dispatches: Vec::new(),
        scratch: Vec::new(),
        max_workgroup_storage: 16384,
        max_invocations: 256,
        cpu_kernels: false,
    };
    elementwise::lower_unary(&u, &mut l).expect("lowers");
    let mut values = vec![x.to_vec(), vec![f32::NAN; x.len()]];
    run_dispatches(ctx, &mut values, &[], &l.scratch, &l.dispatches).expect("runs");
    values.swap_remove(1)
}

/// Every element within `rel` of the f64 value, relative to that value (exact where it is 0).
fn assert_rel(what: &str, x: &[f32], got: &[f32], f: impl Fn(f64) -> f64, rel: f64) {
    let mut worst = (0.0f64, 0);
    for (i, (&xv, &g)) in x.iter().zip(got).enumerate() {
        let want = f(xv as f64);
        let e = if want == 0.0 { (g as f64).abs() } else { ((g as f64 - want) / want).abs() };
        assert!(e <= rel, "{what}({xv:e}) = {g:e}, f64 gives {want:e} (relative error {e:.2e}, allowed {rel:.1e})");
        if e > worst.0 {
            worst = (e, i);
        }
    }
    eprintln!("{what}: worst relative error {:.2e} at x = {:e}", worst.0, x[worst.1]);
}

/// `n` points log-spaced over [lo, hi] (both > 0).
fn logspace(lo: f64, hi: f64, n: usize) -> Vec<f32> {
    (0..n).map(|i| (lo.ln() + (hi.ln() - lo.ln()) * i as f64 / (n - 1) as f64).exp() as f32).collect()
}

fn same_bits_or_nan(what: &str, got: &[f32], want: &[f32]) {
    for (g, w) in got.iter().zip(want) {
        let ok = if w.is_nan() { g.is_nan() } else { g == w };
        assert!(ok, "{what}: got {got:?}, want {want:?}");
    }
}

#[gpu_test]
fn log_is_accurate_near_one_and_over_the_float_range(ctx: GpuContext) {
    // Around 1 the result is small and a log2·ln 2 builtin loses its relative precision.
    let mut x: Vec<f32> = (-40..=40).map(|k| 1.0 + k as f32 * 2.5e-5).collect();
    x.extend(logspace(1e-37, 3e38, 200));
    x.extend(common::random_f32(200, 1, 0.5, 2.0));
    let got = gpu_unary(&ctx, Unary::Log, &x);
    // A few ulps of the result: 4 roundings in the series and the exponent term.
    assert_rel("log", &x, &got, f64::ln, 5e-7);
    let special = [0.0, -0.0, -1.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
    let got = gpu_unary(&ctx, Unary::Log, &special);
    same_bits_or_nan("log at the domain's edges", &got, &special.map(f32::ln));
}

#[gpu_test]
fn tanh_is_accurate_at_tiny_and_saturating_arguments(ctx: GpuContext) {
    let mut x = logspace(1e-30, 20.0, 300);
    x.extend(x.clone().iter().map(|v| -v).collect::<Vec<_>>());
    x.extend(common::random_f32(200, 2, -4.0, 4.0));
    let got = gpu_unary(&ctx, Unary::Tanh, &x);
    // Above |x| = 0.625 the result goes through exp(2|x|), whose own error (a few ulps) is not
    // amplified: d tanh / tanh ≤ 2|x|·(1 − tanh) stays below 1 there.
    assert_rel("tanh", &x, &got, f64::tanh, 1e-6);
    // From 9.02 on, f32 tanh is ±1 exactly.
    let special = [0.0, 9.2, 9.5, -30.0, 1e30, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
    let got = gpu_unary(&ctx, Unary::Tanh, &special);
    same_bits_or_nan("tanh at the edges", &got, &[0.0, 1.0, 1.0, -1.0, 1.0, 1.0, -1.0, f32::NAN]);
}

#[gpu_test]
fn exp_sqrt_neg_abs_match_f64(ctx: GpuContext) {
    let x = common::random_f32(500, 3, -80.0, 80.0);
    let got = gpu_unary(&ctx, Unary::Exp, &x);
    // exp's condition number is |x|: rounding 2^(x·log2 e)'s argument alone costs |x|·2^-24.
    for (i, (&xv, &g)) in x.iter().zip(&got).enumerate() {
        let want = (xv as f64).exp();
        let e = ((g as f64 - want) / want).abs();
        let allowed = 2e-7 * (xv.abs() as f64).max(1.0);
        assert!(e <= allowed, "exp({xv}) [{i}] = {g:e}, f64 gives {want:e} (relative {e:.2e} > {allowed:.1e})");
    }
    let x = logspace(1e-30, 1e30, 300);
    assert_rel("sqrt", &x, &gpu_unary(&ctx, Unary::Sqrt, &x), f64::sqrt, 2e-7);
    let special = [0.0, -1.0, f32::INFINITY, f32::NAN];
    same_bits_or_nan("sqrt at the edges", &gpu_unary(&ctx, Unary::Sqrt, &special), &special.map(f32::sqrt));
    let x = [0.0, -0.0, 1.5, -2.25, f32::INFINITY, f32::NEG_INFINITY, 3e38];
    same_bits_or_nan("neg", &gpu_unary(&ctx, Unary::Neg, &x), &x.map(|v| -v));
    same_bits_or_nan("abs", &gpu_unary(&ctx, Unary::Abs, &x), &x.map(f32::abs));
}

/// Φ(x) in f64 from libm's erfc (accurate in both tails).
fn phi(x: f64) -> f64 {
    0.5 * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

/// Erf near 0 (its series: full relative precision), across the switch to the erfc tail at 1, in
/// the tail and where it rounds to ±1; the edges as ONNX Runtime gives them. The CPU twin used by
/// constant folding agrees with the kernel.
#[gpu_test]
fn erf_is_accurate_near_zero_and_in_the_tails(ctx: GpuContext) {
    let mut x = logspace(1e-30, 6.0, 400);
    x.extend((-20..=20).map(|k| 1.0 + k as f32 * 1e-6));
    x.extend(x.clone().iter().map(|v| -v).collect::<Vec<_>>());
    x.extend(common::random_f32(300, 4, -4.0, 4.0));
    let got = gpu_unary(&ctx, Unary::Erf, &x);
    assert_rel("erf", &x, &got, libm::erf, 4e-7);
    let cpu: Vec<f32> = x.iter().map(|&v| Unary::Erf.apply(v)).collect();
    assert_rel("erf (CPU folding)", &x, &cpu, libm::erf, 4e-7);
    let special = [0.0, -0.0, 4.0, -10.0, 1e30, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
    let got = gpu_unary(&ctx, Unary::Erf, &special);
    same_bits_or_nan("erf at the edges", &got, &[0.0, -0.0, 1.0, -1.0, 1.0, 1.0, -1.0, f32::NAN]);
}

/// Gelu, exact and tanh: x·Φ(x) keeps its relative precision in the left tail (where
/// 0.5·x·(1 + erf) cancels) down to x = -13, where it leaves f32's normal range.
#[gpu_test]
fn gelu_is_accurate_in_both_tails(ctx: GpuContext) {
    let mut x = logspace(1e-20, 13.0, 400);
    x.extend(x.clone().iter().map(|v| -v).collect::<Vec<_>>());
    x.extend(common::random_f32(300, 5, -6.0, 6.0));
    let exact = Unary::Gelu { tanh: false };
    let got = gpu_unary(&ctx, exact, &x);
    // The tail's exponent −x²/2 is computed from x (split so that its square is exact): the
    // rounding of z = x/√2, which x² would amplify there, reaches only t and the fitted polynomial.
    for (i, (&xv, &g)) in x.iter().zip(&got).enumerate() {
        let want = xv as f64 * phi(xv as f64);
        let e = if want == 0.0 { (g as f64).abs() } else { ((g as f64 - want) / want).abs() };
        // The series, t and P: 4e-7; the exp builtin (as in the Exp test: its condition number is
        // its argument's size) on x²/2.
        let allowed = 4e-7 + 2e-7 * (xv as f64).powi(2) / 2.0;
        assert!(e <= allowed, "gelu({xv:e}) [{i}] = {g:e}, f64 gives {want:e} (relative {e:.2e} > {allowed:.1e})");
    }
    let tanh = Unary::Gelu { tanh: true };
    let x = common::random_f32(500, 6, -8.0, 8.0);
    let got = gpu_unary(&ctx, tanh, &x);
    for (&xv, &g) in x.iter().zip(&got) {
        let want = gelu_tanh(xv as f64);
        let e = (g as f64 - want).abs();
        assert!(e <= 1e-6 * want.abs().max(1e-3), "gelu tanh({xv:e}) = {g:e}, f64 gives {want:e}");
    }
    for u in [exact, tanh] {
        let special = [0.0, 40.0, -40.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
        let got = gpu_unary(&ctx, u, &special);
        same_bits_or_nan(&format!("{u:?} at the edges"), &got, &[0.0, 40.0, -0.0, f32::INFINITY, f32::NAN, f32::NAN]);
    }
}

/// Softplus through both tails and zero: ln(1 + e^−|x|) keeps its relative precision where it is
/// e^x-small (x = −87) and where 1 + e^−|x| rounds to 1; no overflow at +88.5. Mish's left tail
/// (x·tanh(softplus x) ≈ x·eˣ) rides on it. Bound: the Exp test's 2e-7·max(1, |x|) (ln(1 + u)
/// passes u's relative error on at most once: its condition number u/((1 + u)·ln(1 + u)) is
/// below 1), plus 5e-7 for the series' roundings.
#[gpu_test]
fn softplus_and_mish_keep_their_tails(ctx: GpuContext) {
    // Down to −87: e⁻⁸⁸ is below f32's smallest normal, which devices may flush to 0.
    let mut x = logspace(1e-20, 87.0, 300);
    x.extend(x.clone().iter().map(|v| -v).collect::<Vec<_>>());
    x.push(88.5);
    let softplus = |v: f64| v.max(0.0) + (-v.abs()).exp().ln_1p();
    for (u, f) in [(Unary::Softplus, &softplus as &dyn Fn(f64) -> f64), (Unary::Mish, &|v: f64| v * softplus(v).tanh())]
    {
        let got = gpu_unary(&ctx, u, &x);
        for (&xv, &g) in x.iter().zip(&got) {
            let want = f(xv as f64);
            let e = if want == 0.0 { (g as f64).abs() } else { ((g as f64 - want) / want).abs() };
            let allowed = 5e-7 + 2e-7 * (xv as f64).abs().max(1.0);
            assert!(e <= allowed, "{u:?}({xv:e}) = {g:e}, f64 gives {want:e} (relative {e:.2e} > {allowed:.1e})");
        }
    }
}

#[test]
fn integer_neg_and_abs_fold_to_integers() {
    let x = Tensor::i64(vec![4], vec![3, -7, 0, i64::MIN]);
    for (u, want) in [(Unary::Neg, vec![-3, 7, 0, i64::MIN]), (Unary::Abs, vec![3, 7, 0, i64::MIN])] {
        let out = elementwise::eval_unary(&u, &[Some(&x)]).expect("folds");
        assert_eq!(out[0].dtype, x.dtype, "{u:?}");
        assert_eq!(out[0].data, Data::I64(want), "{u:?}");
    }
    let f = Tensor::f32(vec![3], vec![0.25, 1.0, 4.0]);
    let out = elementwise::eval_unary(&Unary::Sqrt, &[Some(&f)]).expect("folds");
    assert_eq!(out[0].to_f32_vec(), vec![0.5, 1.0, 2.0]);
}
