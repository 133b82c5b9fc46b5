//! Phone-GPU portability: every method, the output stages and a stream run on a device opened
//! with exactly `wgpu::Limits::downlevel_defaults()` (4 storage buffers per shader stage, 16,352 B
//! of workgroup storage, 128 MiB per storage binding), as many Android GPUs offer. Each run is
//! compared with the same run on the default (adapter) limits, which may pick other kernel
//! variants, within the PyTorch-reference tolerance of `tta_reference.rs` (1e-4 relative), and
//! with the committed PyTorch reference logits of `tests/fixtures/tta/`.
//!
//! Every entry point fits the budget (`gpu::tests::every_entry_point_fits_downlevel_limits`
//! checks each with naga), so every scenario runs here.

mod common;

use std::path::{Path, PathBuf};

use acclimate::adapt::config::AdaptConfig;
use acclimate::adapt::replay::replay;
use acclimate::adapt::session::Session;
use acclimate::stream::frame::Frame;
use acclimate::stream::policy::{StreamOptions, StreamSession};
use acclimate::stream::preprocess::PreprocessSpec;
use acclimate::{ErrorKind, GpuContext, LimitsProfile, Model};
use acclimate_test_macros::gpu_test;
use serde_json::Value;

/// One scenario per method and output stage (tiny fixture models: the whole file stays short on
/// lavapipe).
const SCENARIOS: &[&str] = &[
    "tiny_source_b8",
    "tiny_norm_b8",
    "tiny_alpha_b1",
    "tiny_rbn_b8",
    "tiny_tent_sgd",
    "tiny_tent_ema_b8",
    "tiny_sar",
    "tiny_ls_ema_tent",
    "tiny_tent_adam",
    "tiny_eta",
    "tiny_eata",
    "tiny_eata_woc",
    "tiny_woc",
    "tiny_ls_em_source",
    "tiny_ls_bbse_tent",
    "tiny_lame_rbf",
    "tiny_lame_knn",
    "tiny_lame_linear",
    "tiny_lame_rbf_ls_ema",
    "tiny_ls_adapter",
    "tiny_ls_adapter_nt_lame",
    "tiny_roid_switches",
    "tiny_roid_adam",
    "tiny_roid_sgd_nesterov",
];

/// The downlevel context (ACCLIMATE_ALLOW_NO_GPU=1 skips, as `#[gpu_test]` does).
fn downlevel() -> Option<GpuContext> {
    match GpuContext::with_limits(LimitsProfile::Downlevel) {
        Ok(ctx) => Some(ctx),
        Err(e) if std::env::var("ACCLIMATE_ALLOW_NO_GPU").as_deref() == Ok("1") => {
            eprintln!("SKIPPED (ACCLIMATE_ALLOW_NO_GPU=1): {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn fixture(name: &str) -> PathBuf {
    common::repo_root().join("tests/fixtures/tta").join(name)
}

fn session(ctx: &GpuContext, dir: &Path) -> acclimate::Result<Session> {
    let cfg = AdaptConfig::from_file(&dir.join("config.toml")).expect("config");
    let model = Model::load(&dir.join("model.onnx")).expect("model");
    Session::new(ctx, model, cfg)
}

fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap()],
        Value::Null => vec![f64::NAN],
        other => panic!("unexpected JSON {other}"),
    }
}

/// max |a − b| ≤ 1e-4 · max(max |b|, 1e-2), or ≤ 1e-6: the tolerance of `tta_reference.rs`.
fn close(what: &str, got: &[f64], want: &[f64], errors: &mut Vec<String>) {
    if got.len() != want.len() {
        errors.push(format!("{what}: {} values, expected {}", got.len(), want.len()));
        return;
    }
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-2);
    let err =
        got.iter().zip(want).fold(0.0f64, |m, (a, b)| if a.is_nan() && b.is_nan() { m } else { m.max((a - b).abs()) });
    if !(err / scale <= 1e-4 || err <= 1e-6) {
        errors.push(format!("{what}: max error {err:.3e} = {:.3e} relative (> 1e-4)", err / scale));
    }
}

fn is_numeric_array(v: &Value) -> bool {
    matches!(v, Value::Array(a) if a.iter().all(|x| x.is_number() || x.is_null() || is_numeric_array(x)))
        && !matches!(v, Value::Array(a) if a.is_empty())
}

/// Two replay logs: numeric arrays within the tolerance, everything else (selections, resets,
/// outcomes) identical.
fn compare(path: &str, a: &Value, b: &Value, errors: &mut Vec<String>) {
    match (a, b) {
        (Value::Number(_), Value::Number(_)) => close(path, &floats(a), &floats(b), errors),
        _ if is_numeric_array(a) && is_numeric_array(b) => close(path, &floats(a), &floats(b), errors),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                compare(&format!("{path}[{i}]"), p, q, errors);
            }
        }
        (Value::Object(x), Value::Object(y)) if x.keys().eq(y.keys()) => {
            for (k, p) in x {
                compare(&format!("{path}.{k}"), p, &y[k], errors);
            }
        }
        _ if a == b => {}
        _ => errors.push(format!("{path}: {a} vs {b}")),
    }
}

#[gpu_test]
fn the_downlevel_context_has_exactly_the_downlevel_limits(ctx: GpuContext) {
    let Some(dl) = downlevel() else { return };
    let want = acclimate::wgpu::Limits::downlevel_defaults();
    let got = dl.limits();
    assert_eq!(got.max_storage_buffers_per_shader_stage, 4);
    assert_eq!(got.max_compute_workgroup_storage_size, want.max_compute_workgroup_storage_size);
    assert_eq!(got.max_compute_invocations_per_workgroup, want.max_compute_invocations_per_workgroup);
    // Where the adapter offers more, the request is downlevel's value exactly.
    let adapter = ctx.limits();
    for (name, g, w, a) in [
        (
            "max_storage_buffer_binding_size",
            got.max_storage_buffer_binding_size,
            want.max_storage_buffer_binding_size,
            adapter.max_storage_buffer_binding_size,
        ),
        ("max_buffer_size", got.max_buffer_size, want.max_buffer_size, adapter.max_buffer_size),
    ] {
        assert_eq!(g, w.min(a), "{name}");
    }
    assert_eq!(LimitsProfile::Downlevel.limits(&adapter), got);
}

#[test]
fn a_bad_limits_profile_is_refused_by_name() {
    let err = "phone".parse::<LimitsProfile>().expect_err("not a profile");
    assert!(err.to_string().contains("ACCLIMATE_LIMITS=\"phone\"") && err.to_string().contains("downlevel"), "{err}");
    assert_eq!("Downlevel".parse::<LimitsProfile>().unwrap(), LimitsProfile::Downlevel);
    assert_eq!("adapter".parse::<LimitsProfile>().unwrap(), LimitsProfile::Adapter);
}

/// Every method: the replay on downlevel limits matches the replay on the
/// default limits, and its logits match the PyTorch reference.
#[gpu_test]
fn every_method_matches_the_default_limits_and_the_reference(ctx: GpuContext) {
    let Some(dl) = downlevel() else { return };
    let mut errors = Vec::new();
    for name in SCENARIOS {
        let dir = fixture(name);
        let mut on_dl = match session(&dl, &dir) {
            Ok(s) => s,
            Err(e) => {
                errors.push(format!("{name}: does not open under downlevel limits: {e}"));
                continue;
            }
        };
        let mut on_default = session(&ctx, &dir).expect("session on the default limits");
        let a = serde_json::to_value(replay(&mut on_dl, &dir.join("batches")).expect("replay")).unwrap();
        let b = serde_json::to_value(replay(&mut on_default, &dir.join("batches")).expect("replay")).unwrap();
        let mut errs = Vec::new();
        compare("log", &a, &b, &mut errs);
        let want: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let (ours, theirs) = (a["steps"].as_array().unwrap(), want["steps"].as_array().unwrap());
        assert_eq!(ours.len(), theirs.len(), "{name}: steps");
        for (i, (s, w)) in ours.iter().zip(theirs).enumerate() {
            close(&format!("step {i} logits vs PyTorch"), &floats(&s["logits"]), &floats(&w["logits"]), &mut errs);
        }
        errors.extend(errs.into_iter().map(|e| format!("{name}: {e}")));
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

const SPEC: &str = "size=8,channels=3,mean=0.5/0.5/0.5,std=0.25/0.25/0.25";

fn frames(n: usize) -> Vec<Frame> {
    (0..n)
        .map(|i| {
            let (w, h) = (11 + (i % 3) as u32, 9 + (i % 2) as u32);
            let px = common::random_f32((w * h * 3) as usize, 300 + i as u64, 0.0, 255.0);
            Frame::rgb8(w, h, px.iter().map(|v| *v as u8).collect()).with_timestamp(1000 * i as i64)
        })
        .collect()
}

/// One frame's result: index, whether a step ran, top-k, the source model's top-1.
type Row = (u64, bool, Vec<(usize, f32)>, Option<(usize, f32)>);

fn run_stream(ctx: &GpuContext, extra: &str, n: usize) -> Vec<Row> {
    let cfg = AdaptConfig::from_toml_str(&format!(
        "[adapt]\nmethod = \"tent\"\n[optimizer]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n{extra}"
    ))
    .expect("config");
    let model = Model::load(&fixture("tiny_tent_sgd").join("model.onnx")).expect("model");
    let spec: PreprocessSpec = SPEC.parse().unwrap();
    let options = StreamOptions { top_k: 3, source_prediction: true };
    let mut stream = StreamSession::new(ctx, model, cfg, spec, options).expect("stream");
    let mut out = Vec::new();
    for f in frames(n) {
        out.extend(stream.push(&f).expect("push"));
    }
    out.extend(stream.finish().expect("finish"));
    out.into_iter().map(|r| (r.index, r.adapted, r.top_k, r.source_top)).collect()
}

fn compare_streams(mode: &str, extra: &str, ctx: &GpuContext, dl: &GpuContext) {
    let (a, b) = (run_stream(dl, extra, 7), run_stream(ctx, extra, 7));
    assert_eq!(a.len(), 7, "{mode}: one result per frame");
    assert_eq!(a.len(), b.len());
    assert!(a.iter().any(|r| r.1), "{mode}: no step ran");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.0, x.1), (y.0, y.1), "{mode}: frame index and step");
        assert_eq!(
            x.2.iter().map(|p| p.0).collect::<Vec<_>>(),
            y.2.iter().map(|p| p.0).collect::<Vec<_>>(),
            "{mode}: classes"
        );
        for (p, q) in x.2.iter().zip(&y.2).chain(x.3.iter().zip(&y.3)) {
            assert!((p.1 - q.1).abs() <= 1e-4, "{mode}: frame {} probability {} vs {}", x.0, p.1, q.1);
        }
    }
}

#[gpu_test]
fn a_stream_in_frame_and_batch_mode_matches_the_default_limits(ctx: GpuContext) {
    let Some(dl) = downlevel() else { return };
    compare_streams("frame", "[stream]\nmode = \"frame\"\nwindow = 3\nadapt_every = 2\n", &ctx, &dl);
    compare_streams("batch", "[stream]\nmode = \"batch\"\nbatch = 3\n", &ctx, &dl);
}

/// The start-up self-test passes on this GPU under both limits, and stops at the stage whose
/// reference is moved (so it can fail), naming the stage and the error.
#[gpu_test]
fn the_self_test_passes_and_names_a_wrong_stage(ctx: GpuContext) {
    let report = ctx.self_test().expect("self-test on the default limits");
    let names: Vec<&str> = report.stages.iter().map(|s| s.0.as_str()).collect();
    for stage in ["conv", "batchnorm", "relu", "global pool", "gemm", "softmax", "tent loss", "tent step bn.weight"] {
        assert!(names.contains(&stage), "{stage} not checked: {names:?}");
    }
    assert!(report.stages.iter().all(|s| s.1 <= report.tolerance), "{report:?}");
    let Some(dl) = downlevel() else { return };
    dl.self_test().expect("self-test on the downlevel limits");
    for stage in ["gemm", "tent step bn.bias"] {
        let err = ctx.self_test_perturbed(stage).expect_err("a wrong stage fails");
        assert_eq!(err.kind(), ErrorKind::Gpu);
        let msg = err.to_string();
        assert!(msg.contains(&format!("self-test failed at {stage}:")) && msg.contains("max error"), "{msg}");
    }
}

/// `[gpu] self_test = true` runs the self-test before a session opens; an unknown key in the
/// section is refused by name.
#[gpu_test]
fn the_config_opts_into_the_self_test(ctx: GpuContext) {
    let dir = fixture("tiny_tent_sgd");
    let mut cfg = AdaptConfig::from_file(&dir.join("config.toml")).expect("config");
    assert!(!cfg.gpu.self_test);
    let with = AdaptConfig::from_toml_str("[adapt]\nmethod = \"tent\"\n[gpu]\nself_test = true\n").expect("config");
    assert!(with.gpu.self_test);
    cfg.gpu.self_test = true;
    let model = Model::load(&dir.join("model.onnx")).expect("model");
    Session::new(&ctx, model, cfg).expect("a session after a passing self-test");
    let err = AdaptConfig::from_toml_str("[gpu]\nselftest = true\n").expect_err("unknown key");
    assert!(err.to_string().contains("selftest"), "{err}");
}
