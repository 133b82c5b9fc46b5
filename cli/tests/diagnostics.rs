//! `batch_stats` (`shaders/diagnostics.wgsl`): method auto's batch statistics computed on the GPU
//! (top-1 histogram and classes, mean prediction, its entropy, mean row entropy, agreement with
//! a reference, top share), against the host's f64 reference `BatchStats::of_rows` over the
//! host's softmax and prior correction: random batches wider and longer than a workgroup, one
//! class, ties, and rows holding NaN, +inf and -inf.

mod common;

use acclimate::GpuContext;
use acclimate::adapt::methods::auto::{self, BatchStats, Rows, stats_dispatch, stats_len};
use acclimate::ops::BufRef;
use acclimate::plan::standalone::run_dispatches;
use acclimate_test_macros::gpu_test;
use common::random_f32;

/// Runs `batch_stats` over `rows` ([b, c]) with `weights` and `reference` (written when
/// `compare` is false); returns the statistics and the reference buffer after the run.
fn gpu_stats(
    ctx: &GpuContext,
    rows: &[f32],
    weights: &[f32],
    reference: &[f32],
    (b, c): (usize, usize),
    kind: Rows,
    compare: bool,
) -> (BatchStats, Vec<f32>) {
    let mut values = vec![rows.to_vec(), weights.to_vec(), reference.to_vec(), vec![f32::NAN; stats_len(b, c)]];
    let (r, w, f, o) = (BufRef::Value(0), BufRef::Value(1), BufRef::Value(2), BufRef::Value(3));
    let d = stats_dispatch(r, w, f, o, b, c, kind, compare);
    run_dispatches(ctx, &mut values, &[], &[], &[d]).expect("batch_stats runs");
    (BatchStats::from_block(&values[3], b, c).expect("a whole block"), values[2].clone())
}

fn same(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= 2e-6 * b.abs().max(1.0)
}

fn check(what: &str, got: &BatchStats, want: &BatchStats) {
    assert_eq!(got.rows, want.rows, "{what}: rows");
    assert_eq!(got.top1, want.top1, "{what}: top-1 classes");
    assert_eq!(got.hist, want.hist, "{what}: histogram");
    // Shares are divided in f32 (as the diagnostics report them).
    assert_eq!(got.agreement as f32, want.agreement as f32, "{what}: agreement");
    assert_eq!(got.top_share as f32, want.top_share as f32, "{what}: top share");
    for (k, (g, w)) in got.mean.iter().zip(&want.mean).enumerate() {
        assert!(same(*g, *w), "{what}: mean of class {k}: {g} vs {w}");
    }
    assert!(same(got.mean_entropy, want.mean_entropy), "{what}: H(mean) {} vs {}", got.mean_entropy, want.mean_entropy);
    assert!(same(got.row_entropy, want.row_entropy), "{what}: row entropy {} vs {}", got.row_entropy, want.row_entropy);
}

/// Every mode on one batch: the source pass (logits, writing the reference), an output stage's
/// probabilities and the prior-corrected predictions, each compared with the reference.
fn check_batch(ctx: &GpuContext, what: &str, logits: &[f32], b: usize, c: usize, prior: &[f32]) {
    let host_rows = auto::softmax(logits, c);
    let want = BatchStats::of_rows(&host_rows, None);
    let (got, reference) = gpu_stats(ctx, logits, logits, &vec![-1.0; b], (b, c), Rows::Logits, false);
    check(&format!("{what}, logits"), &got, &want);
    let written: Vec<usize> = reference.iter().map(|&k| k as usize).collect();
    assert_eq!(written, want.top1, "{what}: the reference written");
    // Probabilities as an output stage leaves them: other rows, compared with the reference.
    let probs: Vec<f32> = auto::softmax(&logits.iter().rev().copied().collect::<Vec<_>>(), c)
        .iter()
        .flatten()
        .map(|&v| v as f32)
        .collect();
    let rows: Vec<Vec<f64>> = probs.chunks(c).map(|r| r.iter().map(|&v| v as f64).collect()).collect();
    let (got, _) = gpu_stats(ctx, &probs, &probs, &reference, (b, c), Rows::Probs, true);
    check(&format!("{what}, probabilities"), &got, &BatchStats::of_rows(&rows, Some(&want.top1)));
    let q: Vec<f64> = prior.iter().map(|&v| v as f64).collect();
    let corrected = auto::correct_prior(&host_rows, &q);
    let (got, _) = gpu_stats(ctx, logits, prior, &reference, (b, c), Rows::Corrected, true);
    check(&format!("{what}, corrected"), &got, &BatchStats::of_rows(&corrected, Some(&want.top1)));
}

#[gpu_test]
fn batch_statistics_match_the_host_reference(ctx: GpuContext) {
    // (rows, classes): small, wider than a workgroup, longer than a workgroup, one class.
    for (i, &(b, c)) in [(20, 10), (3, 300), (300, 7), (5, 1)].iter().enumerate() {
        let logits = random_f32(b * c, 40 + i as u64, -5.0, 5.0);
        let mut prior: Vec<f32> = random_f32(c, 50 + i as u64, 0.0, 1.0);
        prior[0] = 0.0;
        check_batch(&ctx, &format!("random {b}x{c}"), &logits, b, c, &prior);
    }
    // Ties (the first maximum wins), NaN, +inf, only -inf, some -inf, a row the prior zeroes.
    let (inf, nan) = (f32::INFINITY, f32::NAN);
    let rows: [[f32; 5]; 7] = [
        [0.5, 2.0, 2.0, -1.0, 2.0],
        [1.0, nan, 3.0, 0.0, 0.0],
        [1.0, 2.0, inf, 0.0, 0.0],
        [-inf; 5],
        [-inf, 1.0, -inf, 3.0, 2.0],
        [-3.0, -3.0, 9.0, -3.0, -3.0],
        [0.0, 1.0, 0.0, 0.0, 0.0],
    ];
    let logits: Vec<f32> = rows.iter().flatten().copied().collect();
    // Classes 2 and 4 weigh nothing: row 5 keeps only its small classes, row 6 nothing but
    // class 1.
    check_batch(&ctx, "special rows", &logits, 7, 5, &[0.3, 0.2, 0.0, 0.5, 0.0]);
    // An infinite weight: Σ p·q is infinite (or NaN where p is 0), so the rows stay as they were.
    check_batch(&ctx, "infinite prior", &logits, 7, 5, &[inf, 1.0, 1.0, 1.0, 1.0]);
    // A prior that zeroes every class leaves every row as it was.
    check_batch(&ctx, "zero prior", &logits[..5], 1, 5, &[0.0; 5]);
}

/// The rows' top-1 against the reference: all agree, none agree, and the share in between.
#[gpu_test]
fn agreement_counts_rows_whose_top_class_is_the_reference(ctx: GpuContext) {
    let (b, c) = (6, 3);
    let logits: Vec<f32> = (0..b).flat_map(|i| (0..c).map(move |k| if k == i % c { 2.0 } else { 0.0 })).collect();
    for (reference, share) in [
        (vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0], 1.0),
        (vec![1.0, 2.0, 0.0, 1.0, 2.0, 0.0], 0.0),
        (vec![0.0; 6], 2.0 / 6.0),
    ] {
        let (got, after) = gpu_stats(&ctx, &logits, &logits, &reference, (b, c), Rows::Logits, true);
        assert_eq!(got.agreement as f32, share as f32, "reference {reference:?}");
        assert_eq!(after, reference, "a comparing pass leaves the reference as it was");
        assert_eq!((got.hist.clone(), got.top_share as f32), (vec![2.0, 2.0, 2.0], 2.0 / 6.0));
    }
}
