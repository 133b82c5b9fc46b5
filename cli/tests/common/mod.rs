//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use acclimate::GpuContext;

/// The repository root (tests run with the crate directory as cwd).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("runtime/ has a parent").to_path_buf()
}

/// The assets directory built by `tools/setup.sh` (override with `ACCLIMATE_ASSETS`).
pub fn assets() -> PathBuf {
    std::env::var_os("ACCLIMATE_ASSETS").map(PathBuf::from).unwrap_or_else(|| repo_root().join("assets"))
}

/// The GPU context for tests. A missing adapter FAILS the test, unless the run opted out
/// explicitly with `ACCLIMATE_ALLOW_NO_GPU=1`, in which case `None` is returned and the caller
/// returns early after printing why.
pub fn gpu() -> Option<GpuContext> {
    match GpuContext::new() {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            if std::env::var("ACCLIMATE_ALLOW_NO_GPU").as_deref() == Ok("1") {
                eprintln!("SKIPPED (ACCLIMATE_ALLOW_NO_GPU=1): {e}");
                None
            } else {
                panic!("{e}\n(set ACCLIMATE_ALLOW_NO_GPU=1 to skip GPU tests explicitly)");
            }
        }
    }
}

/// A required asset; a missing one fails with the command that builds it.
pub fn asset(rel: &str) -> PathBuf {
    let p = assets().join(rel);
    assert!(p.exists(), "missing asset {} — run `bash tools/setup.sh` first", p.display());
    p
}

/// A reference fixture's model: its own `model.onnx`, or the asset its `model.txt` names (a
/// fixture on a real network does not hold a copy).
pub fn fixture_model(dir: &std::path::Path) -> PathBuf {
    let local = dir.join("model.onnx");
    if local.exists() {
        return local;
    }
    let name = std::fs::read_to_string(dir.join("model.txt")).expect("model.onnx or model.txt");
    asset(name.trim())
}

/// Deterministic pseudo-random floats in [lo, hi) (SplitMix64), so tests need no RNG crate.
pub fn random_f32(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E3779B97F4A7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            let u = (z >> 40) as f32 / (1u64 << 24) as f32;
            lo + (hi - lo) * u
        })
        .collect()
}

/// The values as f64, for references computed in f64.
pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// max |got − want| ≤ rtol·max|want| + atol.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (*g as f64 - w).abs();
        // NaN counts as the worst error.
        if e > worst || e.is_nan() {
            worst = e;
            at = i;
        }
    }
    assert!(
        worst <= rtol * scale + atol,
        "{what}: max error {worst:.3e} at {at} (got {}, want {}), allowed {:.3e}",
        got[at],
        want[at],
        rtol * scale + atol
    );
}
