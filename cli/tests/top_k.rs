//! `softmax_topk`: a stream's frame reads back only its top-k classes and their probabilities,
//! computed on the GPU. Checked against the host's f64 softmax and a stable sort (equal
//! probabilities keep class order), as `StreamSession` ranks on the host otherwise.

mod common;

use acclimate::GpuContext;
use acclimate::ops::BufRef;
use acclimate::ops::softmax::{top_k, top_k_of};
use acclimate::plan::standalone::run_dispatches;
use acclimate_test_macros::gpu_test;
use common::random_f32;

fn host_top(row: &[f32], k: usize) -> Vec<(usize, f64)> {
    let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap());
    idx.into_iter().take(k).map(|i| (i, e[i] / s)).collect()
}

#[gpu_test]
fn top_k_on_the_gpu_matches_the_host_ranking(ctx: GpuContext) {
    // Rows: random over 10 and over 1000 classes (more than a workgroup), one with ties, one
    // with a single class; k beyond the row and beyond 32 is clamped.
    let cases: Vec<(Vec<f32>, usize)> = vec![
        (random_f32(3 * 10, 7, -4.0, 4.0), 5),
        (random_f32(2 * 1000, 8, -6.0, 6.0), 5),
        (vec![1.0, 3.0, 3.0, 0.5, 3.0, -1.0], 4),
        (vec![2.5], 5),
        (random_f32(40, 9, -3.0, 3.0), 64),
    ];
    for (ci, (logits, k)) in cases.into_iter().enumerate() {
        let len = match ci {
            0 => 10,
            1 => 1000,
            2 => 6,
            3 => 1,
            _ => 40,
        };
        let rows = logits.len() / len;
        let kk = top_k_of(k, len);
        let mut values = vec![logits.clone(), vec![f32::NAN; rows * 2 * kk]];
        let d = top_k(BufRef::Value(0), BufRef::Value(1), rows, len, k);
        run_dispatches(&ctx, &mut values, &[], &[], &[d]).expect("top-k runs");
        for r in 0..rows {
            let got = &values[1][r * 2 * kk..(r + 1) * 2 * kk];
            let want = host_top(&logits[r * len..(r + 1) * len], kk);
            for (q, &(c, p)) in want.iter().enumerate() {
                assert_eq!(got[q] as usize, c, "case {ci} row {r} rank {q}: {got:?} vs {want:?}");
                assert!((got[kk + q] as f64 - p).abs() <= 1e-6, "case {ci} row {r} rank {q}: {} vs {p}", got[kk + q]);
            }
        }
    }
    assert_eq!(top_k_of(64, 40), 32);
    assert_eq!(top_k_of(0, 10), 1);
}
