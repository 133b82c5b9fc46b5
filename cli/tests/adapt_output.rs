//! The output stages (LAME, label-shift corrections; `runtime/src/adapt/output.rs`,
//! `shaders/output.wgsl`): each kernel against an f64 host implementation written here, the
//! `[lame]` / `[label_shift]` config sections, and the session-level behaviour (errors naming
//! what is wrong, the running estimate's reset, gating and saved state). Whole scenarios against
//! PyTorch are in `tta_reference.rs`.

mod common;

use common::{assert_close, f64s};

use acclimate::adapt::config::{AdaptConfig, Affinity, LabelShiftMode, SourcePrior};
use acclimate::adapt::output::{self, Features, LameSpec, WeightLayout};
use acclimate::adapt::{Method, Session};
use acclimate::ops::BufRef;
use acclimate::plan::standalone::run_dispatches;
use acclimate::{GpuContext, Model, Tensor};
use acclimate_test_macros::gpu_test;

fn softmax_rows(z: &[f64], c: usize) -> Vec<f64> {
    z.chunks(c)
        .flat_map(|r| {
            let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = r.iter().map(|v| (v - m).exp()).sum();
            r.iter().map(move |v| (v - m).exp() / s).collect::<Vec<_>>()
        })
        .collect()
}

/// Random probabilities [n, c] from logits of the given spread.
fn probabilities(n: usize, c: usize, seed: u64, spread: f32) -> Vec<f32> {
    let z = f64s(&common::random_f32(n * c, seed, -spread, spread));
    softmax_rows(&z, c).iter().map(|&v| v as f32).collect()
}

// ---- f64 host implementations -----------------------------------------------------------------

/// LAME's affinity on L2-normalised features, with the runtime's documented rules: kNN in
/// (distance, index) order excluding self, k clamped to N − 1; rbf σ from the k-th smallest
/// distance counting self, k clamped to N, σ = 0 → 1 where d = 0 and 0 elsewhere.
fn affinity_host(h: &[f64], n: usize, d: usize, kind: Affinity, knn: usize) -> Vec<f64> {
    let z: Vec<f64> = h
        .chunks(d)
        .flat_map(|r| {
            let norm = r.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
            r.iter().map(move |v| v / norm).collect::<Vec<_>>()
        })
        .collect();
    let dist = |i: usize, j: usize| (0..d).map(|k| (z[j * d + k] - z[i * d + k]).powi(2)).sum::<f64>().sqrt();
    let mut w = vec![0.0; n * n];
    match kind {
        Affinity::Linear => {
            for i in 0..n {
                for j in 0..n {
                    w[i * n + j] = (0..d).map(|k| z[i * d + k] * z[j * d + k]).sum();
                }
            }
        }
        Affinity::Knn => {
            let k = knn.min(n - 1);
            for i in 0..n {
                let mut others: Vec<(f64, usize)> = (0..n).filter(|&j| j != i).map(|j| (dist(i, j), j)).collect();
                others.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                for &(_, j) in others.iter().take(k) {
                    w[i * n + j] = 1.0;
                }
            }
        }
        Affinity::Rbf => {
            let k = knn.min(n);
            let sigma = (0..n)
                .map(|i| {
                    let mut row: Vec<f64> = (0..n).map(|j| dist(i, j)).collect();
                    row.sort_by(f64::total_cmp);
                    row[k - 1]
                })
                .sum::<f64>()
                / n as f64;
            for i in 0..n {
                for j in 0..n {
                    let dij = dist(i, j);
                    w[i * n + j] = if sigma == 0.0 {
                        if dij == 0.0 { 1.0 } else { 0.0 }
                    } else {
                        (-dij * dij / (2.0 * sigma * sigma)).exp()
                    };
                }
            }
        }
    }
    w
}

/// LAME's fixed point, iterated in f64 until Y stops changing (the GPU's f32 run stops when the
/// energy repeats exactly, i.e. at its own fixed point).
fn lame_fixed_point(p: &[f64], w: &[f64], n: usize, c: usize, lambda: f64) -> Vec<f64> {
    let lp: Vec<f64> = p.iter().map(|v| (v + 1e-10).ln()).collect();
    let mut y = softmax_rows(&lp, c);
    for _ in 0..10_000 {
        let mut e = vec![0.0; n * c];
        for i in 0..n {
            for k in 0..c {
                let pair: f64 = (0..n).map(|j| w[i * n + j] * y[j * c + k]).sum();
                e[i * c + k] = lp[i * c + k] + lambda * pair;
            }
        }
        let next = softmax_rows(&e, c);
        let change = next.iter().zip(&y).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        y = next;
        if change < 1e-13 {
            break;
        }
    }
    y
}

fn correct_host(p: &[f64], q: &[f64], ps: &[f64], c: usize) -> Vec<f64> {
    p.chunks(c)
        .flat_map(|r| {
            let s: f64 = r.iter().zip(q).zip(ps).map(|((p, q), s)| p * q / s).sum();
            r.iter()
                .zip(q)
                .zip(ps)
                .map(move |((p, q), ps)| if s > 0.0 { p * q / ps / s } else { *p })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn em_host(p: &[f64], ps: &[f64], n: usize, c: usize) -> (Vec<f64>, usize) {
    let mut q: Vec<f64> = (0..c).map(|k| (0..n).map(|i| p[i * c + k]).sum::<f64>() / n as f64).collect();
    for it in 0..output::EM_MAX_ITERATIONS as usize {
        let r = correct_host(p, &q, ps, c);
        let next: Vec<f64> = (0..c).map(|k| (0..n).map(|i| r[i * c + k]).sum::<f64>() / n as f64).collect();
        let diff: f64 = next.iter().zip(&q).map(|(a, b)| (a - b).abs()).sum();
        q = next;
        if diff < output::EM_TOLERANCE as f64 {
            return (q, it + 1);
        }
    }
    (q, output::EM_MAX_ITERATIONS as usize)
}

// ---- kernels ------------------------------------------------------------------------------------

struct LameRun {
    y: Vec<f32>,
    iterations: usize,
}

fn run_lame(ctx: &GpuContext, h: &[f32], p: &[f32], n: usize, c: usize, d: usize, spec: &LameSpec) -> LameRun {
    // values: h, p, y, work (read back for the iteration count); scratch: z, dmat, w.
    let mut values = vec![h.to_vec(), p.to_vec(), vec![0.0; n * c], vec![0.0; output::lame_work_len(n, c)]];
    let scratch = [(n * d * 4) as u64, (n * n * 4) as u64, (n * n * 4) as u64];
    let temps = [BufRef::Scratch(0), BufRef::Scratch(1), BufRef::Scratch(2), BufRef::Value(3)];
    let ds = output::lame(spec, BufRef::Value(0), BufRef::Value(1), n, c, d, temps, BufRef::Value(2));
    run_dispatches(ctx, &mut values, &[], &scratch, &ds).expect("LAME dispatches run");
    LameRun { y: values[2].clone(), iterations: values[3][2 * n * c] as usize }
}

fn spec(affinity: Affinity, knn: usize, lambda: f32, max_steps: u32) -> LameSpec {
    LameSpec { affinity, knn, lambda, max_steps, features: Features::Auto }
}

/// Clustered features (three clusters, one pair of duplicated rows so kNN meets exact ties) and
/// probabilities that disagree within clusters: LAME has something to smooth.
fn lame_case(n: usize, d: usize, c: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let centres = common::random_f32(3 * d, seed, -1.0, 1.0);
    let noise = common::random_f32(n * d, seed + 1, -0.25, 0.25);
    let mut h: Vec<f32> = (0..n * d).map(|idx| centres[(idx / d % 3) * d + idx % d] + noise[idx]).collect();
    let (a, b) = (n - 1, n - 4);
    for k in 0..d {
        h[a * d + k] = h[b * d + k];
    }
    (h, probabilities(n, c, seed + 2, 2.0))
}

#[gpu_test]
fn lame_matches_the_f64_fixed_point_for_every_affinity(ctx: GpuContext) {
    let (n, d, c) = (13, 7, 4);
    let (h, p) = lame_case(n, d, c, 40);
    for (affinity, knn, lambda) in
        [(Affinity::Rbf, 5, 1.0), (Affinity::Knn, 3, 1.0), (Affinity::Knn, 5, 0.7), (Affinity::Linear, 5, 0.5)]
    {
        let run = run_lame(&ctx, &h, &p, n, c, d, &spec(affinity, knn, lambda, 100));
        let w = affinity_host(&f64s(&h), n, d, affinity, knn);
        let want = lame_fixed_point(&f64s(&p), &w, n, c, lambda as f64);
        let what = format!("{affinity} k={knn} λ={lambda}");
        assert!(run.iterations > 3 && run.iterations < 100, "{what}: stopped after {} iterations", run.iterations);
        assert_close(&what, &run.y, &want, 1e-4, 1e-6);
        // LAME changes the prediction (else the comparison above would prove little).
        let moved = run.y.iter().zip(&p).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(moved > 0.05, "{what}: LAME moved the probabilities by only {moved}");
        for row in run.y.chunks(c) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{what}: a row sums to {}", row.iter().sum::<f32>());
        }
    }
}

#[test]
fn knn_ties_go_to_the_lower_index() {
    // Row 4 is row 0's nearest neighbour; rows 1, 2 and 3 (orthogonal unit vectors) tie for the
    // second place at exactly √2, so k = 2 must add row 1. Another tie rule adds 2 or 3 and
    // gives row 0 a different result.
    let Some(ctx) = common::gpu() else { return };
    let (n, d, c) = (5, 4, 3);
    let h: Vec<f32> = vec![
        1.0, 0.0, 0.0, 0.0, //
        0.0, 1.0, 0.0, 0.0, //
        0.0, 0.0, 1.0, 0.0, //
        0.0, 0.0, 0.0, 1.0, //
        0.6, 0.8, 0.0, 0.0,
    ];
    let p = vec![
        0.6, 0.3, 0.1, //
        0.1, 0.8, 0.1, //
        0.2, 0.2, 0.6, //
        0.05, 0.05, 0.9, //
        0.3, 0.4, 0.3,
    ];
    let w = affinity_host(&f64s(&h), n, d, Affinity::Knn, 2);
    assert_eq!(&w[0..5], &[0.0, 1.0, 0.0, 0.0, 1.0]);
    let run = run_lame(&ctx, &h, &p, n, c, d, &spec(Affinity::Knn, 2, 1.0, 100));
    assert_close("kNN with ties", &run.y, &lame_fixed_point(&f64s(&p), &w, n, c, 1.0), 1e-4, 1e-6);
    let mut other = w.clone();
    other[1] = 0.0;
    other[3] = 1.0;
    let wrong = lame_fixed_point(&f64s(&p), &other, n, c, 1.0);
    assert!((run.y[0] as f64 - wrong[0]).abs() > 1e-3, "the tie rule is not observable in this case");
}

#[gpu_test]
fn lame_stop_rule_and_step_cap(ctx: GpuContext) {
    let (n, d, c) = (6, 3, 4);
    let (h, p) = lame_case(n, d, c, 7);
    // λ = 0: every iteration gives the same Y and E, so only the "i > 1" clause delays the stop.
    let run = run_lame(&ctx, &h, &p, n, c, d, &spec(Affinity::Rbf, 5, 0.0, 100));
    assert_eq!(run.iterations, 3, "the earliest stop is after the third iteration");
    let lp: Vec<f64> = p.iter().map(|&v| (v as f64 + 1e-10).ln()).collect();
    assert_close("λ = 0 returns softmax(log(P + 1e-10))", &run.y, &softmax_rows(&lp, c), 1e-5, 1e-7);
    // A cap below the earliest stop.
    let run = run_lame(&ctx, &h, &p, n, c, d, &spec(Affinity::Rbf, 5, 1.0, 2));
    assert_eq!(run.iterations, 2);
}

#[gpu_test]
fn lame_clamps_k_and_handles_a_single_sample(ctx: GpuContext) {
    let (n, d, c) = (4, 5, 3);
    let (h, p) = lame_case(n, d, c, 21);
    // k ≥ N: kNN takes every other sample, rbf's σ uses the farthest point (k clamped to N).
    for affinity in [Affinity::Knn, Affinity::Rbf] {
        let run = run_lame(&ctx, &h, &p, n, c, d, &spec(affinity, 9, 1.0, 100));
        let w = affinity_host(&f64s(&h), n, d, affinity, 9);
        assert_close(
            &format!("{affinity} with k = 9 > N"),
            &run.y,
            &lame_fixed_point(&f64s(&p), &w, n, c, 1.0),
            1e-4,
            1e-6,
        );
    }
    // One sample: kNN has no neighbour (W = 0); rbf's σ = 0 gives W = [[1]] (the limit σ → 0+).
    let (h1, p1) = (&h[..d], &p[..c]);
    for affinity in [Affinity::Knn, Affinity::Rbf, Affinity::Linear] {
        let run = run_lame(&ctx, h1, p1, 1, c, d, &spec(affinity, 5, 1.0, 100));
        let w = affinity_host(&f64s(h1), 1, d, affinity, 5);
        assert!(run.y.iter().all(|v| v.is_finite()), "{affinity} on one sample: {:?}", run.y);
        assert_close(
            &format!("{affinity} on one sample"),
            &run.y,
            &lame_fixed_point(&f64s(p1), &w, 1, c, 1.0),
            1e-4,
            1e-6,
        );
    }
}

#[gpu_test]
fn em_and_bbse_match_f64(ctx: GpuContext) {
    let (n, c) = (16, 4);
    // Every class is some samples' favourite, so the likelihood's maximum is inside the simplex
    // and EM converges geometrically (at the boundary it creeps, and f32 and f64 part ways in
    // when they stop).
    let noise = common::random_f32(n * c, 3, -1.0, 1.0);
    let z: Vec<f64> =
        (0..n * c).map(|idx| noise[idx] as f64 + if idx % c == (idx / c) % c { 2.0 } else { 0.0 }).collect();
    let p: Vec<f32> = softmax_rows(&z, c).iter().map(|&v| v as f32).collect();
    let ps = vec![0.4f32, 0.3, 0.2, 0.1];
    // EM: values p, ps, q, [z (n), iterations, last change].
    let mut values = vec![p.clone(), ps.clone(), vec![0.0; c], vec![0.0; n + 2]];
    let ds = [output::em(BufRef::Value(0), BufRef::Value(1), BufRef::Value(2), BufRef::Value(3), n, c)];
    run_dispatches(&ctx, &mut values, &[], &[], &ds).expect("EM runs");
    let (q, iterations) = em_host(&f64s(&p), &f64s(&ps), n, c);
    assert!(iterations > 2 && iterations < output::EM_MAX_ITERATIONS as usize, "host EM took {iterations} iterations");
    let gpu_iterations = values[3][n] as usize;
    assert!(
        gpu_iterations.abs_diff(iterations) <= 3,
        "EM: {gpu_iterations} iterations on the GPU, {iterations} in f64"
    );
    assert!(values[3][n + 1] < output::EM_TOLERANCE, "EM stopped with a change of {}", values[3][n + 1]);
    assert_close("EM estimate", &values[2], &q, 1e-4, 1e-6);
    assert!((values[2].iter().sum::<f32>() - 1.0).abs() < 1e-5);
    // BBSE: a confusion matrix (counts, row = predicted, column = true) with off-diagonal mass.
    let conf: Vec<f32> = vec![
        30.0, 4.0, 2.0, 1.0, //
        5.0, 25.0, 3.0, 2.0, //
        1.0, 3.0, 20.0, 6.0, //
        2.0, 1.0, 4.0, 15.0,
    ];
    let m = output::bbse_matrix(&conf, c).expect("invertible");
    let mut values = vec![p.clone(), m.clone(), ps.clone(), vec![0.0; c], vec![0.0; n + 2 * c + c * c]];
    let ds =
        output::bbse(BufRef::Value(0), BufRef::Value(1), BufRef::Value(2), BufRef::Value(3), BufRef::Value(4), n, c);
    run_dispatches(&ctx, &mut values, &[], &[], &ds).expect("BBSE runs");
    // Host: solve (CᵀC + 1e-8 I) w = Cᵀ μ by normal equations in f64 (independent of the
    // runtime's explicit inverse), clip, reweight.
    let total: f64 = conf.iter().map(|&v| v as f64).sum();
    let cm: Vec<f64> = conf.iter().map(|&v| v as f64 / total).collect();
    let mut mu = vec![0.0f64; c];
    for row in p.chunks(c) {
        let arg = (0..c).fold(0, |b, k| if row[k] > row[b] { k } else { b });
        mu[arg] += 1.0 / n as f64;
    }
    let w = solve_normal_equations(&cm, &mu, c);
    let wp: Vec<f64> = w.iter().zip(&ps).map(|(w, &s)| w.max(0.0) * s as f64).collect();
    let s: f64 = wp.iter().sum();
    let want: Vec<f64> = wp.iter().map(|v| v / s).collect();
    assert!(w.iter().any(|&v| v < 0.0) || w.iter().any(|&v| v > 1.5), "weights {w:?} do not exercise BBSE");
    assert_close("BBSE estimate", &values[3], &want, 1e-4, 1e-6);
    // Clipping everything (μ̂ outside the confusion matrix's cone) falls back to p_s.
    let diag = vec![1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0];
    let neg: Vec<f32> = output::bbse_matrix(&diag, c).unwrap().iter().map(|v| -v).collect();
    let mut values = vec![p.clone(), neg, ps.clone(), vec![0.0; c], vec![0.0; n + 2 * c + c * c]];
    run_dispatches(&ctx, &mut values, &[], &[], &ds).expect("BBSE runs");
    assert_eq!(values[3], ps, "every weight clipped: the estimate is p_s");
}

/// Solves (CᵀC + 1e-8·I)·w = Cᵀ·μ by Cholesky in f64.
fn solve_normal_equations(cm: &[f64], mu: &[f64], c: usize) -> Vec<f64> {
    let mut a = vec![0.0; c * c];
    let mut rhs = vec![0.0; c];
    for i in 0..c {
        for j in 0..c {
            a[i * c + j] = (0..c).map(|k| cm[k * c + i] * cm[k * c + j]).sum::<f64>();
        }
        a[i * c + i] += 1e-8;
        rhs[i] = (0..c).map(|k| cm[k * c + i] * mu[k]).sum();
    }
    let mut l = vec![0.0; c * c];
    for i in 0..c {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i * c + k] * l[j * c + k]).sum();
            l[i * c + j] = if i == j { (a[i * c + i] - s).sqrt() } else { (a[i * c + j] - s) / l[j * c + j] };
        }
    }
    let mut y = vec![0.0; c];
    for i in 0..c {
        y[i] = (rhs[i] - (0..i).map(|k| l[i * c + k] * y[k]).sum::<f64>()) / l[i * c + i];
    }
    let mut x = vec![0.0; c];
    for i in (0..c).rev() {
        x[i] = (y[i] - (i + 1..c).map(|k| l[k * c + i] * x[k]).sum::<f64>()) / l[i * c + i];
    }
    x
}

#[gpu_test]
fn prior_ema_and_correction_match_f64(ctx: GpuContext) {
    let (n, c) = (9, 5);
    let p = probabilities(n, c, 11, 2.0);
    let q0 = vec![0.1f32, 0.2, 0.3, 0.25, 0.15];
    let ps = vec![0.3f32, 0.1, 0.2, 0.2, 0.2];
    let m = 0.8;
    for gate in [1.0f32, 0.0] {
        // values: p, q, snap, gate, ps, out
        let mut values = vec![p.clone(), q0.clone(), vec![0.0; 2 * c], vec![gate], ps.clone(), vec![0.0; n * c]];
        let ds = [
            output::prior_ema(BufRef::Value(0), BufRef::Value(1), BufRef::Value(2), BufRef::Value(3), n, c, m),
            output::correct(BufRef::Value(0), BufRef::Value(2), BufRef::Value(4), BufRef::Value(5), n, c),
        ];
        run_dispatches(&ctx, &mut values, &[], &[], &ds).expect("EMA runs");
        assert_eq!(values[2][..c], q0, "the batch is corrected with the estimate before its update");
        // The next estimate goes to snap[C..2C); the parameter guard commits it into q later.
        assert_eq!(values[1], q0, "the kernel itself leaves the estimate");
        let moved: Vec<f64> = (0..c)
            .map(|k| m * q0[k] as f64 + (1.0 - m) * (0..n).map(|i| p[i * c + k] as f64).sum::<f64>() / n as f64)
            .collect();
        if gate != 0.0 {
            assert_close("EMA update", &values[2][c..], &moved, 1e-6, 1e-7);
        } else {
            assert_eq!(values[2][c..], q0, "a closed gate holds the estimate");
        }
        assert_close("prior correction", &values[5], &correct_host(&f64s(&p), &f64s(&q0), &f64s(&ps), c), 1e-5, 1e-7);
    }
    // Probabilities holding NaN (a batch that overflowed) leave the next estimate at q, whole.
    let mut bad = p.clone();
    bad[3 * c + 2] = f32::NAN;
    let mut values = vec![bad, q0.clone(), vec![0.0; 2 * c], vec![1.0]];
    let ds = [output::prior_ema(BufRef::Value(0), BufRef::Value(1), BufRef::Value(2), BufRef::Value(3), n, c, m)];
    run_dispatches(&ctx, &mut values, &[], &[], &ds).expect("EMA runs");
    assert_eq!(values[2][c..], q0, "a non-finite batch moved the estimate");
    // A row with all its mass on classes of estimate 0 keeps its probabilities.
    let mut values = vec![vec![0.0, 1.0, 0.0, 0.5, 0.5, 0.0], vec![1.0, 0.0, 0.0], vec![1.0 / 3.0; 3], vec![0.0; 6]];
    let ds = [output::correct(BufRef::Value(0), BufRef::Value(1), BufRef::Value(2), BufRef::Value(3), 2, 3)];
    run_dispatches(&ctx, &mut values, &[], &[], &ds).expect("correction runs");
    assert_eq!(values[3], vec![0.0, 1.0, 0.0, 1.0, 0.0, 0.0]);
}

#[gpu_test]
fn adapter_logits_match_f64_in_both_layouts(ctx: GpuContext) {
    let (n, c, d) = (3, 4, 5);
    let h = common::random_f32(n * d, 1, -1.0, 2.0);
    let w_cd = common::random_f32(c * d, 2, -1.0, 1.0);
    let bias = common::random_f32(c, 3, -0.5, 0.5);
    let gamma = common::random_f32(d, 4, 0.5, 1.5);
    let beta = common::random_f32(d, 5, -0.3, 0.3);
    let dw = common::random_f32(c * d, 6, -0.2, 0.2);
    let db = common::random_f32(c, 7, -0.2, 0.2);
    let (alpha, beta_c) = (0.5f32, 2.0f32);
    // The bias: None, one per class (`bias`) or one scalar.
    let want = |b: Option<Option<f64>>| -> Vec<f64> {
        let mut out = vec![0.0; n * c];
        for i in 0..n {
            for k in 0..c {
                let s: f64 = (0..d)
                    .map(|j| {
                        (alpha as f64 * w_cd[k * d + j] as f64 + dw[k * d + j] as f64)
                            * (gamma[j] as f64 * h[i * d + j] as f64 + beta[j] as f64)
                    })
                    .sum();
                let b = b.map_or(0.0, |b| b.unwrap_or(bias[k] as f64));
                out[i * c + k] = s + beta_c as f64 * b + db[k] as f64;
            }
        }
        out
    };
    let w_dc: Vec<f32> = (0..c * d).map(|idx| w_cd[(idx % c) * d + idx / c]).collect();
    for (layout, w, b, scalar) in [
        (WeightLayout::ClassMajor, &w_cd, Some(bias.clone()), false),
        (WeightLayout::FeatureMajor, &w_dc, Some(bias.clone()), false),
        (WeightLayout::FeatureMajor, &w_dc, Some(vec![0.25]), true),
        (WeightLayout::ClassMajor, &w_cd, None, false),
    ] {
        let mut values = vec![
            h.clone(),
            w.clone(),
            b.clone().unwrap_or_else(|| vec![0.0]),
            gamma.clone(),
            beta.clone(),
            dw.clone(),
            db.clone(),
            vec![0.0; n * c],
        ];
        let v = BufRef::Value;
        let bias_ref = b.as_ref().map(|_| (v(2), scalar));
        let packed = (output::adapter_pack_len(c, d, bias_ref) * 4) as u64;
        let ds = output::adapter_logits(
            v(0),
            v(1),
            layout,
            alpha,
            bias_ref,
            beta_c,
            [v(3), v(4), v(5), v(6)],
            BufRef::Scratch(0),
            v(7),
            n,
            c,
            d,
        );
        run_dispatches(&ctx, &mut values, &[], &[packed], &ds).expect("adapter logits run");
        assert_close(
            &format!("{layout:?} bias {} scalar {scalar}", b.is_some()),
            &values[7],
            &want(b.map(|_| scalar.then_some(0.25))),
            1e-5,
            1e-6,
        );
    }
}

// ---- config ---------------------------------------------------------------------------------------

fn config_err(src: &str) -> String {
    AdaptConfig::from_toml_str(src).expect_err("config should be rejected").to_string()
}

#[test]
fn config_sections_parse_with_their_defaults() {
    let c = AdaptConfig::from_toml_str("[adapt]\nmethod = \"lame\"\n").unwrap();
    assert_eq!(c.adapt.method, Method::Lame);
    assert_eq!(c.adapt.norm_mode(), acclimate::adapt::NormMode::Source);
    assert!(!c.adapt.method.updates_parameters());
    assert_eq!((c.lame.affinity, c.lame.knn, c.lame.lambda, c.lame.max_steps), (Affinity::Rbf, 5, 1.0, 100));
    assert_eq!(c.lame.features, "auto");
    assert_eq!((c.label_shift.mode, c.label_shift.momentum), (LabelShiftMode::None, 0.9));
    let c = AdaptConfig::from_toml_str(
        "[lame]\naffinity = \"knn\"\nknn = 3\nlambda = 0.5\nmax_steps = 20\nfeatures = \"f\"\n\
         [label_shift]\nmode = \"bbse\"\nconfusion = \"c.npy\"\nsource_prior = [1, 2.5]\nmomentum = 0.5\n",
    )
    .unwrap();
    assert_eq!((c.lame.affinity, c.lame.knn, c.lame.max_steps), (Affinity::Knn, 3, 20));
    assert_eq!(c.label_shift.source_prior, Some(SourcePrior::Values(vec![1.0, 2.5])));
    let c = AdaptConfig::from_toml_str("[label_shift]\nmode = \"em\"\nsource_prior = \"p.npy\"\n").unwrap();
    assert_eq!(c.label_shift.source_prior, Some(SourcePrior::File("p.npy".into())));
    let back = AdaptConfig::from_toml_str(&c.to_toml_string()).unwrap();
    assert_eq!(back, c);
    for m in LabelShiftMode::ALL {
        assert_eq!(m.name().parse::<LabelShiftMode>().unwrap(), m);
    }
}

#[test]
fn config_errors_name_the_key() {
    for (src, key) in [
        ("[lame]\naffinity = \"gauss\"", "lame.affinity"),
        ("[lame]\nknn = 0", "lame.knn"),
        ("[lame]\nlambda = nan", "lame.lambda"),
        ("[lame]\nlambda = -1.0", "lame.lambda"),
        ("[lame]\nmax_steps = 0", "lame.max_steps"),
        ("[lame]\nfeatures = \"\"", "lame.features"),
        ("[lame]\nsigma = 1.0", "lame.sigma"),
        ("[label_shift]\nmode = \"mlls\"", "label_shift.mode"),
        ("[label_shift]\nmomentum = 1.5", "label_shift.momentum"),
        ("[label_shift]\nmode = \"adapter\"", "label_shift.adapter"),
        ("[label_shift]\nmode = \"bbse\"", "label_shift.confusion"),
        ("[label_shift]\nmode = \"em\"\nsource_prior = [0.5, 0.0]", "label_shift.source_prior"),
        ("[label_shift]\nmode = \"em\"\nsource_prior = [0.5, inf]", "label_shift.source_prior"),
    ] {
        let e = config_err(src);
        assert!(e.contains(&format!("`{key}`")), "{src}: {e}");
    }
    assert!(config_err("[lame]\naffinity = \"gauss\"").contains("rbf"));
}

// ---- sessions -------------------------------------------------------------------------------------

fn fixture(name: &str) -> std::path::PathBuf {
    common::repo_root().join("tests/fixtures/tta").join(name)
}

fn batch(name: &str, i: usize) -> Tensor {
    acclimate::npy::read_f32(&fixture(name).join(format!("batches/{i:03}.npy"))).expect("fixture batch")
}

fn session(ctx: &GpuContext, model: &std::path::Path, toml: &str) -> acclimate::Result<Session> {
    let cfg = AdaptConfig::from_toml_str(toml).expect("config");
    Session::new(ctx, Model::load(model).expect("model"), cfg)
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("acclimate-output-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[gpu_test]
fn setup_errors_name_what_is_wrong(ctx: GpuContext) {
    let tiny = fixture("tiny_ls_adapter").join("model.onnx");
    let adapter = fixture("tiny_ls_adapter").join("adapter.onnx");
    let err_on = |model: &std::path::Path, toml: &str, x: &Tensor| match session(&ctx, model, toml) {
        Ok(mut s) => s.step(x).err().map(|e| e.to_string()).unwrap_or_default(),
        Err(e) => e.to_string(),
    };
    let x = batch("tiny_ls_adapter", 0);
    let err = |model: &std::path::Path, toml: &str| err_on(model, toml, &x);
    let e = err(&tiny, "[adapt]\nmethod = \"lame\"\n[lame]\nfeatures = \"nope\"");
    assert!(e.contains("lame.features") && e.contains("nope"), "{e}");
    let e = err(&tiny, "[adapt]\nmethod = \"lame\"\n[lame]\nfeatures = \"fc.weight\"");
    assert!(e.contains("constant"), "{e}");
    let relu = common::asset("onnx-node/test_relu/model.onnx");
    let e = err(&relu, "[adapt]\nmethod = \"lame\"");
    assert!(e.contains("Gemm/MatMul") && e.contains("features"), "{e}");
    // The tiny adapter is for C = 5 classes and D = 6 features; the SVHN net has 10 classes.
    let svhn = common::asset("svhn.onnx");
    let digits = Tensor::f32(vec![2, 3, 32, 32], vec![0.0; 2 * 3 * 32 * 32]);
    let e = err_on(
        &svhn,
        &format!("[adapt]\nmethod = \"source\"\n[label_shift]\nmode = \"adapter\"\nadapter = {adapter:?}"),
        &digits,
    );
    assert!(e.contains("adapter") && e.contains("10 classes"), "{e}");
    let e = err(&relu, &format!("[adapt]\nmethod = \"source\"\n[label_shift]\nmode = \"adapter\"\nadapter = {relu:?}"));
    assert!(e.contains("\"prior\""), "{e}");
    let dir = tmp("errors");
    let save = |name: &str, shape: Vec<usize>, v: Vec<f32>| {
        let p = dir.join(name);
        acclimate::npy::write_f32(&p, &Tensor::f32(shape, v)).unwrap();
        p
    };
    let small = save("c3.npy", vec![3, 3], vec![1.0; 9]);
    let e = err(&tiny, &format!("[adapt]\nmethod = \"source\"\n[label_shift]\nmode = \"bbse\"\nconfusion = {small:?}"));
    assert!(e.contains("confusion") && e.contains("5 classes"), "{e}");
    let negative = save("neg.npy", vec![2, 2], vec![1.0, -1.0, 0.0, 1.0]);
    let e =
        err(&tiny, &format!("[adapt]\nmethod = \"source\"\n[label_shift]\nmode = \"bbse\"\nconfusion = {negative:?}"));
    assert!(e.contains("neg.npy") && e.contains(">= 0"), "{e}");
    let nan_prior = save("nan.npy", vec![5], vec![0.2, f32::NAN, 0.2, 0.2, 0.2]);
    let e = err(
        &tiny,
        &format!("[adapt]\nmethod = \"source\"\n[label_shift]\nmode = \"em\"\nsource_prior = {nan_prior:?}"),
    );
    assert!(e.contains("source_prior") && e.contains("nan.npy"), "{e}");
    let e = err(&tiny, "[adapt]\nmethod = \"source\"\n[label_shift]\nmode = \"ema\"\nsource_prior = [0.5, 0.5]");
    assert!(e.contains("source_prior") && e.contains("5 classes"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[gpu_test]
fn the_estimate_moves_once_per_batch_resets_and_is_saved(ctx: GpuContext) {
    let name = "tiny_ls_ema_tent";
    let model = fixture(name).join("model.onnx");
    let cfg = |steps: u32| {
        format!(
            "[adapt]\nmethod = \"tent\"\nsteps = {steps}\n[optimizer]\nlr = 0.05\n\
             [label_shift]\nmode = \"ema\"\nmomentum = 0.7\nsource_prior = [0.1, 0.3, 0.2, 0.25, 0.15]\n"
        )
    };
    let mut one = session(&ctx, &model, &cfg(1)).unwrap();
    let mut three = session(&ctx, &model, &cfg(3)).unwrap();
    let a0 = one.step(&batch(name, 0)).unwrap();
    let b0 = three.step(&batch(name, 0)).unwrap();
    let ps = a0.prior.clone().expect("a prior");
    assert_close("the first batch is corrected with p_s", &ps, &[0.1, 0.3, 0.2, 0.25, 0.15], 1e-7, 0.0);
    assert_eq!(a0.probs.as_ref().unwrap().to_f32_vec(), b0.probs.as_ref().unwrap().to_f32_vec());
    // Three gradient steps on batch 0 moved the estimate once, with the returned prediction.
    let a1 = one.step(&batch(name, 1)).unwrap();
    let b1 = three.step(&batch(name, 1)).unwrap();
    assert_eq!(a1.prior, b1.prior);
    assert_ne!(a1.prior.as_deref(), Some(&ps[..]));
    // Saved state carries the estimate; reset returns it to p_s.
    let dir = tmp("state");
    let file = dir.join("state.safetensors");
    one.save_state(&file).unwrap();
    let a2 = one.step(&batch(name, 2)).unwrap();
    let mut again = session(&ctx, &model, &cfg(1)).unwrap();
    again.load_state(&file).unwrap();
    let c2 = again.step(&batch(name, 2)).unwrap();
    assert_eq!(a2.prior, c2.prior, "a loaded state resumes the estimate");
    assert_eq!(a2.probs.unwrap().to_f32_vec(), c2.probs.unwrap().to_f32_vec());
    one.reset().unwrap();
    let r = one.step(&batch(name, 2)).unwrap();
    assert_eq!(r.prior.as_deref(), Some(&ps[..]), "reset returns the estimate to p_s");
    std::fs::remove_dir_all(&dir).ok();
}

#[gpu_test]
fn lame_runs_on_a_window_of_one_and_leaves_the_model_alone(ctx: GpuContext) {
    let name = "tiny_lame_rbf";
    let model = fixture(name).join("model.onnx");
    let mut s = session(&ctx, &model, "[adapt]\nmethod = \"lame\"").unwrap();
    assert!(s.adapted_parameters().is_empty());
    let x = batch(name, 0);
    let one = Tensor::f32([&[1][..], &x.shape[1..]].concat(), x.to_f32_vec()[..x.numel() / x.shape[0]].to_vec());
    let p = s.step(&one).unwrap();
    let probs = p.probs.expect("LAME returns probabilities").to_f32_vec();
    assert!(probs.iter().all(|v| v.is_finite()) && (probs.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{probs:?}");
    assert!(p.prior.is_none() && p.loss.is_none());
    // The same batch twice gives the same answer: LAME keeps no state.
    let a = s.step(&x).unwrap().probs.unwrap().to_f32_vec();
    let b = s.step(&x).unwrap().probs.unwrap().to_f32_vec();
    assert_eq!(a, b);
}

// ---- the shipped MNIST adapter (models/mnist_ls_adapter.onnx) -------------------------------------

/// A file of `tests/fixtures/ls_adapter/` (onnxruntime's outputs, see its README).
fn ls_adapter_fixture(name: &str) -> Tensor {
    let path = common::repo_root().join("tests/fixtures/ls_adapter").join(name);
    acclimate::npy::read_f32(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// max |got − want| / max |want|, for the log.
fn relative_to_max(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    got.iter().zip(want).fold(0.0f64, |m, (g, w)| m.max((*g as f64 - w).abs())) / scale
}

/// The adapter network itself through the engine, and the final layer it modulates through the
/// output-stage kernel, against onnxruntime at the fixture's skewed prior; then a session with
/// `[label_shift] mode = "adapter"` whose estimate is set to that prior through a state file.
#[gpu_test]
fn shipped_mnist_adapter_matches_onnxruntime(ctx: GpuContext) {
    let adapter = common::repo_root().join("models/mnist_ls_adapter.onnx");
    let prior = ls_adapter_fixture("prior.npy");
    assert_eq!(prior.shape, vec![1, 10]);
    let mut engine = acclimate::Engine::new(&ctx, Model::load(&adapter).expect("the adapter loads"));
    let outs = engine.run(std::slice::from_ref(&prior)).expect("the adapter runs");
    let names = ["gamma", "beta", "delta_w", "delta_b"];
    assert_eq!(outs.len(), names.len());
    for (got, name) in outs.iter().zip(names) {
        let want = ls_adapter_fixture(&format!("expected_{name}.npy"));
        assert_eq!(got.shape, want.shape, "{name}");
        let want = f64s(&want.to_f32_vec());
        eprintln!("{name}: error {:.2e} of max |expected|", relative_to_max(&got.to_f32_vec(), &want));
        assert_close(name, &got.to_f32_vec(), &want, 1e-4, 0.0);
    }

    // h = classifier.1 into the final Gemm classifier.2 (transB = 1: W is [C, D] as stored).
    let model = Model::load(&common::asset("mnist.onnx")).expect("mnist.onnx loads");
    let gemm = model.graph.nodes.iter().find(|n| n.name == "classifier.2").expect("the final Gemm");
    let acclimate::ops::Op::Gemm(attrs) = &gemm.op else { panic!("classifier.2 is {}", gemm.op_type) };
    assert!(attrs.trans_b && !attrs.trans_a, "{attrs:?}");
    let init = |name: &str| model.graph.initializers[name].to_f32_vec();
    let h = ls_adapter_fixture("features.npy");
    let (n, d) = (h.shape[0], h.shape[1]);
    let c = 10;
    let mut values = vec![h.to_f32_vec(), init("classifier.2.weight"), init("classifier.2.bias")];
    values.extend(outs.iter().map(|t| t.to_f32_vec()));
    values.push(vec![f32::NAN; n * c]);
    let v = BufRef::Value;
    let packed = (output::adapter_pack_len(c, d, Some((v(2), false))) * 4) as u64;
    let ds = output::adapter_logits(
        v(0),
        v(1),
        WeightLayout::ClassMajor,
        attrs.alpha,
        Some((v(2), false)),
        attrs.beta,
        [v(3), v(4), v(5), v(6)],
        BufRef::Scratch(0),
        v(7),
        n,
        c,
        d,
    );
    run_dispatches(&ctx, &mut values, &[], &[packed], &ds).expect("adapter logits run");
    let want_logits = f64s(&ls_adapter_fixture("expected_logits.npy").to_f32_vec());
    eprintln!("modulated logits: error {:.2e} of max |expected|", relative_to_max(&values[7], &want_logits));
    assert_close("modulated logits", &values[7], &want_logits, 1e-4, 0.0);

    // The session: q̂ (`ls:prior`, [C]) set to the fixture's prior through a state file, so the
    // first batch is modulated at that prior.
    let toml =
        format!("[adapt]\nmethod = \"source\"\n[label_shift]\nmode = \"adapter\"\nadapter = {:?}\n", adapter.display());
    let mut s = session(&ctx, &common::asset("mnist.onnx"), &toml).expect("session");
    let dir = tmp("mnist-adapter");
    let file = dir.join("prior.safetensors");
    let fingerprint = acclimate::adapt::state::fingerprint(&s.model().graph);
    let q = Tensor::f32(vec![c], prior.to_f32_vec());
    // A state records the method it belongs to; one without is refused on load.
    let meta = [("method".to_string(), "source".to_string())];
    acclimate::adapt::state::save_state(&file, &fingerprint, &[(output::PRIOR_BUFFER.to_string(), q)], &meta)
        .expect("state written");
    s.load_state(&file).expect("state loaded");
    let x = ls_adapter_fixture("input.npy");
    let p = s.step(&x).expect("a step with the adapter");
    assert_eq!(p.prior.as_deref(), Some(&prior.to_f32_vec()[..]), "the batch is modulated at the loaded estimate");
    let probs = p.probs.expect("the adapter's probabilities").to_f32_vec();
    assert!(probs.iter().all(|v| v.is_finite()), "{probs:?}");
    // The session's h is the GPU forward of input.npy, not onnxruntime's features.npy.
    let want_probs = softmax_rows(&want_logits, c);
    eprintln!("session probabilities: error {:.2e} of max |expected|", relative_to_max(&probs, &want_probs));
    assert_close("session probabilities", &probs, &want_probs, 1e-4, 0.0);
    // Next batch: q̂ moved to 0.9·prior + 0.1·mean of the unmodulated softmax of batch 0.
    let plain = softmax_rows(&f64s(&p.logits.to_f32_vec()), c);
    let moved: Vec<f64> = (0..c)
        .map(|k| 0.9 * prior.to_f32_vec()[k] as f64 + 0.1 * (0..n).map(|i| plain[i * c + k]).sum::<f64>() / n as f64)
        .collect();
    let p1 = s.step(&x).expect("a second step");
    assert_close("the estimate after one batch", p1.prior.as_deref().expect("a prior"), &moved, 1e-5, 0.0);
    assert!(p1.probs.expect("probabilities").to_f32_vec().iter().all(|v| v.is_finite()));
    std::fs::remove_dir_all(&dir).ok();
}
