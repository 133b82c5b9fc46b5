//! Adaptation sessions end to end on the SVHN network: saving and restoring state, rejection of
//! truncated and foreign state files (leaving the session as it was), reset, NaN batches,
//! episodic mode and determinism.

mod common;

use acclimate::GpuContext;
use acclimate::adapt::bn::StatsMode;
use acclimate::adapt::{AdaptConfig, Session};
use acclimate::{Model, Tensor};
use acclimate_test_macros::gpu_test;

fn digits(from: usize, n: usize) -> Tensor {
    let all = acclimate::npy::read_f32(&common::asset("mnist32_first64.npy")).unwrap();
    let per = 3 * 32 * 32;
    Tensor::f32(vec![n, 3, 32, 32], all.to_f32_vec()[from * per..(from + n) * per].to_vec())
}

fn tent() -> AdaptConfig {
    AdaptConfig::from_toml_str("[adapt]\nmethod = \"tent\"\n[optimizer]\nkind = \"adam\"\nlr = 0.001\n").unwrap()
}

fn session(ctx: &acclimate::GpuContext, cfg: AdaptConfig) -> Session {
    Session::new(ctx, Model::load(&common::asset("svhn.onnx")).unwrap(), cfg).unwrap()
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("acclimate-session-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[gpu_test]
fn saved_state_resumes_exactly_and_bad_files_change_nothing(ctx: GpuContext) {
    let mut a = session(&ctx, tent());
    a.step(&digits(0, 8)).unwrap();
    a.step(&digits(8, 8)).unwrap();
    let path = tmp("state.safetensors");
    a.save_state(&path).unwrap();
    let next_a = a.step(&digits(16, 8)).unwrap();

    // A fresh session restored from the file continues exactly where `a` was (Adam moments and
    // step count included).
    let mut b = session(&ctx, tent());
    b.load_state(&path).unwrap();
    assert_eq!(b.steps_taken(), 2);
    let next_b = b.step(&digits(16, 8)).unwrap();
    assert_eq!(next_a.logits.to_f32_vec(), next_b.logits.to_f32_vec());
    assert_eq!(a.parameters().unwrap(), b.parameters().unwrap());

    // Truncated files are rejected and the session is untouched.
    let bytes = std::fs::read(&path).unwrap();
    let before = b.parameters().unwrap();
    let stats_before = b.statistics().unwrap();
    for cut in [0, 7, 8, 100, bytes.len() / 2, bytes.len() - 1] {
        let bad = tmp("truncated.safetensors");
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        let err = b.load_state(&bad).unwrap_err().to_string();
        assert!(!err.is_empty());
        assert_eq!(b.parameters().unwrap(), before, "cut at {cut} changed the parameters");
        assert_eq!(b.statistics().unwrap(), stats_before);
    }

    // A state saved for another model is rejected by its fingerprint.
    let usps = Model::load(&common::asset("usps.onnx")).unwrap();
    let mut other = Session::new(&ctx, usps, tent()).unwrap();
    let x = Tensor::f32(vec![4, 1, 16, 16], common::random_f32(4 * 256, 3, -1.0, 1.0));
    other.step(&x).unwrap();
    let foreign = tmp("foreign.safetensors");
    other.save_state(&foreign).unwrap();
    let err = b.load_state(&foreign).unwrap_err().to_string();
    assert!(err.to_lowercase().contains("fingerprint") || err.contains("model"), "{err}");
    assert_eq!(b.parameters().unwrap(), before);
    std::fs::remove_dir_all(path.parent().unwrap()).ok();
}

#[gpu_test]
fn reset_restores_the_source_and_steps_are_deterministic(ctx: GpuContext) {
    let mut s = session(&ctx, tent());
    let source = s.parameters().unwrap();
    let first = s.step(&digits(0, 8)).unwrap();
    assert!(first.loss.unwrap() > 0.0);
    assert_ne!(s.parameters().unwrap(), source, "a TENT step moves the BN affine parameters");
    s.step(&digits(8, 8)).unwrap();
    s.reset().unwrap();
    assert_eq!(s.parameters().unwrap(), source);
    assert_eq!(s.steps_taken(), 0);
    // After a reset the same batch gives bit-identical results (deterministic reductions,
    // optimizer state cleared).
    let again = s.step(&digits(0, 8)).unwrap();
    assert_eq!(first.logits.to_f32_vec(), again.logits.to_f32_vec());
    assert_eq!(first.loss, again.loss);
}

#[gpu_test]
fn non_finite_batches_are_rejected_without_an_update(ctx: GpuContext) {
    let mut s = session(&ctx, tent());
    let before = s.parameters().unwrap();
    let mut x = digits(0, 4).to_f32_vec();
    x[17] = f32::NAN;
    x[100] = f32::INFINITY;
    let err = s.step(&Tensor::f32(vec![4, 3, 32, 32], x)).unwrap_err().to_string();
    assert!(err.contains("NaN or infinite"), "{err}");
    assert_eq!(s.parameters().unwrap(), before);
    assert_eq!(s.steps_taken(), 0);
    // The session goes on.
    s.step(&digits(0, 4)).unwrap();
}

#[gpu_test]
fn episodic_mode_resets_before_every_batch(ctx: GpuContext) {
    let mut cfg = tent();
    cfg.adapt.episodic = true;
    let mut s = session(&ctx, cfg);
    let a = s.step(&digits(0, 8)).unwrap();
    s.step(&digits(8, 8)).unwrap();
    let b = s.step(&digits(0, 8)).unwrap();
    assert_eq!(a.logits.to_f32_vec(), b.logits.to_f32_vec(), "each batch starts from the source model");
}

#[gpu_test]
fn a_model_without_batchnorm_is_refused_plainly(ctx: GpuContext) {
    let err = Session::new(&ctx, Model::load(&common::asset("mnist.onnx")).unwrap(), tent()).err().unwrap().to_string();
    assert!(err.contains("no BatchNormalization"), "{err}");
}

/// On a CPU adapter the kernels run their CPU variants (`GpuContext::variant`,
/// `Lowering::cpu_kernels`): the BatchNorm reductions one channel per invocation with the tree
/// in a private array (`bn_stats_lanes`, `bn_backward_reduce_lanes`), the implicit GEMMs without
/// workgroup memory. The same sums in the same order, so TENT steps give bit for bit what the
/// parallel kernels give (logits, adapted parameters, statistics) on the SVHN network at batch 8.
#[gpu_test]
fn cpu_kernel_variants_step_bit_for_bit_like_the_parallel_ones(ctx: GpuContext) {
    let run = |cpu: bool| {
        ctx.set_cpu_kernels(Some(cpu));
        let mut s = session(&ctx, tent());
        let first = s.step(&digits(0, 8)).unwrap().logits.to_f32_vec();
        let second = s.step(&digits(8, 8)).unwrap().logits.to_f32_vec();
        // Three frames through the frame protocol's statistics (`bn_frame_lanes` on a CPU
        // adapter), each updating the evidence the next one normalises with.
        let mode = StatsMode::Frame { alpha_mean: 0.5, alpha_var: 0.5, window: 4, min_plane: 1 };
        let frames: Vec<Vec<f32>> =
            (16..19).map(|i| s.predict_with(&digits(i, 1), mode).unwrap().logits.to_f32_vec()).collect();
        (first, second, s.parameters().unwrap(), s.statistics().unwrap(), frames)
    };
    let (parallel, serial) = (run(false), run(true));
    assert_eq!(parallel.0, serial.0, "first step's logits");
    assert_eq!(parallel.1, serial.1, "second step's logits");
    assert!(parallel.2 == serial.2, "adapted parameters");
    assert!(parallel.3 == serial.3, "statistics");
    assert_eq!(parallel.4, serial.4, "frame-mode logits");
    assert_ne!(parallel.0, parallel.1, "the first step changed the model");
    assert_ne!(parallel.4[0], parallel.4[2], "the frame evidence changed the statistics");
}

/// A model whose only normalization is LayerNorm (the ConvNeXt fixture) adapts with the gradient
/// methods (TENT, ETA, SAR, WoC, ROID; EATA is ETA's step with a Fisher penalty): each steps, its LayerNorm parameters move and stay finite, a saved state
/// resumes them exactly in a new session, and a reset restores the source values. The methods
/// that adapt statistics only (norm, rbn) still refuse it: it has none.
#[gpu_test]
fn layer_norm_parameters_adapt_save_and_reset(ctx: GpuContext) {
    let path = common::repo_root().join("tests/fixtures/convnext_tiny.onnx");
    let model = Model::load(&path).unwrap();
    let source: Vec<Vec<f32>> = Session::new(&ctx, model.clone(), tent())
        .unwrap()
        .parameters()
        .unwrap()
        .iter()
        .map(|(_, t)| t.to_f32_vec())
        .collect();
    let x = |seed: u64| Tensor::f32(vec![8, 3, 8, 8], common::random_f32(8 * 3 * 64, seed, -2.0, 2.0));
    for method in ["tent", "eta", "sar", "woc", "roid"] {
        let cfg = AdaptConfig::from_toml_str(&format!(
            "[adapt]\nmethod = \"{method}\"\n[optimizer]\nkind = \"adam\"\nlr = 0.01\n[eata]\ne_margin = 10.0\n[sar]\ne_margin = 10.0\n"
        ))
        .unwrap_or_else(|e| panic!("{method}: {e}"));
        let mut a = Session::new(&ctx, model.clone(), cfg.clone()).unwrap_or_else(|e| panic!("{method}: {e}"));
        assert_eq!(a.adapted_parameters().len(), 6, "{method}");
        for seed in 0..2 {
            a.step(&x(seed)).unwrap();
        }
        let after: Vec<Vec<f32>> = a.parameters().unwrap().iter().map(|(_, t)| t.to_f32_vec()).collect();
        assert!(after.iter().flatten().all(|v| v.is_finite()), "{method}");
        assert_ne!(after, source, "{method}: the steps moved the LayerNorm parameters");
        let file = tmp(&format!("ln_{method}.safetensors"));
        a.save_state(&file).unwrap();
        let mut b = Session::new(&ctx, model.clone(), cfg).unwrap();
        b.load_state(&file).unwrap();
        let loaded: Vec<Vec<f32>> = b.parameters().unwrap().iter().map(|(_, t)| t.to_f32_vec()).collect();
        assert_eq!(loaded, after, "{method}: the saved state resumes");
        assert_eq!(a.step(&x(7)).unwrap().logits.to_f32_vec(), b.step(&x(7)).unwrap().logits.to_f32_vec(), "{method}");
        a.reset().unwrap();
        let reset: Vec<Vec<f32>> = a.parameters().unwrap().iter().map(|(_, t)| t.to_f32_vec()).collect();
        assert_eq!(reset, source, "{method}: reset restores the source");
        let _ = std::fs::remove_file(&file);
    }
    for method in ["norm", "rbn"] {
        let cfg = AdaptConfig::from_toml_str(&format!("[adapt]\nmethod = \"{method}\"\n")).unwrap();
        let err = Session::new(&ctx, model.clone(), cfg).err().unwrap().to_string();
        assert!(err.contains("no BatchNormalization"), "{method}: {err}");
    }
}
