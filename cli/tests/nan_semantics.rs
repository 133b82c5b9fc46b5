//! NaN and infinities through every op family, against ONNX Runtime 1.31 (CPU).
//!
//! The single-node cases are `tests/fixtures/nan/*.onnx` with ONNX Runtime's outputs in
//! `cases.json`, written by `tools/nan_reference.py`: NaN, +inf and -inf at chosen positions of
//! the inputs and of the weights. The GPU runs each model with `NonFinite::Propagate`; NaN-ness
//! and infinities (with their sign) must match element for element, finite values within
//! |gpu − ort| ≤ 1e-4·|ort| + 1e-5 (the sign of a zero is not compared). `fixtures_are_current`
//! re-runs ONNX Runtime on the same files, so a stale fixture fails.
//!
//! ONNX Runtime runs with its graph optimisations off (`OrtOptions::unoptimized`): the model as
//! written, each node by ONNX Runtime's own kernel. Its rewrites change non-finite arithmetic
//! (Conv+BN fusion keeps 3e38 finite that overflows unfused; the NCHWc convolution skips padded
//! taps that meet a NaN weight), and the runtime fuses nothing.
//!
//! The documented differences are MaxPool, ReduceMax, ReduceMin and GlobalMaxPool: ONNX Runtime's
//! CPU kernels have no rule for a window holding a NaN or only -inf (see `shaders/pool.wgsl`) and
//! skip a NaN that is not first in a reduction; the runtime returns NaN for a NaN (numpy's rule)
//! and -inf for -inf only. The fixture lists those outputs (`documented`) where ONNX Runtime answered
//! otherwise, and the GPU must give the documented value there.
//!
//! The whole-model cases edit the SVHN network (a NaN in a conv weight, a BN scale, a classifier
//! weight) or feed it values of 3e38 that overflow inside it, and compare the logits against ONNX
//! Runtime run live (unoptimized) on the same model file.

mod common;

use std::path::{Path, PathBuf};

use acclimate::onnx::proto;
use acclimate::{Engine, Model, NonFinite, Tensor};
use acclimate_cli::reference::{OrtOptions, OrtSession};
use prost::Message;
use serde_json::Value;

const REL: f32 = 1e-4;
const ABS: f32 = 1e-5;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nan")
}

struct Case {
    name: String,
    model: PathBuf,
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
    /// (flat index into output 0, the runtime's value) where it deliberately differs.
    documented: Vec<(usize, f32)>,
}

fn value_f32(v: &Value) -> f32 {
    match v {
        Value::Number(n) => n.as_f64().expect("a finite JSON number") as f32,
        Value::String(s) if s == "nan" => f32::NAN,
        Value::String(s) if s == "inf" => f32::INFINITY,
        Value::String(s) if s == "-inf" => f32::NEG_INFINITY,
        other => panic!("not a fixture value: {other}"),
    }
}

fn tensor(v: &Value) -> Tensor {
    let shape: Vec<usize> =
        v["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().expect("dim") as usize).collect();
    let data: Vec<f32> = v["data"].as_array().expect("data").iter().map(value_f32).collect();
    assert_eq!(shape.iter().product::<usize>(), data.len(), "fixture tensor {shape:?}");
    Tensor::f32(shape, data)
}

fn cases() -> Vec<Case> {
    let path = fixtures().join("cases.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run .venv/bin/python tools/nan_reference.py)", path.display()));
    let doc: Value = serde_json::from_str(&text).expect("cases.json parses");
    doc["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().expect("name").to_string(),
            model: fixtures().join(c["model"].as_str().expect("model")),
            inputs: c["inputs"].as_array().expect("inputs").iter().map(tensor).collect(),
            outputs: c["outputs"].as_array().expect("outputs").iter().map(tensor).collect(),
            documented: c
                .get("documented")
                .map(|d| {
                    d.as_array()
                        .expect("documented")
                        .iter()
                        .map(|e| (e[0].as_u64().expect("index") as usize, value_f32(&e[1])))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

/// One element: `None` when `got` is what ONNX Runtime's `want` allows.
fn element(got: f32, want: f32) -> Option<String> {
    if want.is_nan() {
        return (!got.is_nan()).then(|| format!("got {got}, expected NaN"));
    }
    if want.is_infinite() || got.is_nan() || got.is_infinite() {
        return (got != want).then(|| format!("got {got}, expected {want}"));
    }
    let bound = REL * want.abs() + ABS;
    ((got - want).abs() > bound)
        .then(|| format!("got {got}, expected {want} (|diff| {:.3e} > {bound:.3e})", got - want))
}

/// Every mismatch of `got` against `want` (at most a few per output), labelled.
fn compare(label: &str, got: &[Tensor], want: &[Tensor]) -> Vec<String> {
    if got.len() != want.len() {
        return vec![format!("{label}: {} outputs, expected {}", got.len(), want.len())];
    }
    let mut failures = Vec::new();
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        if g.shape != w.shape {
            failures.push(format!("{label} output {k}: shape {:?}, expected {:?}", g.shape, w.shape));
            continue;
        }
        let (gv, wv) = (g.to_f32_vec(), w.to_f32_vec());
        let bad: Vec<String> = gv
            .iter()
            .zip(&wv)
            .enumerate()
            .filter_map(|(i, (&a, &b))| element(a, b).map(|e| format!("{label} output {k} [{i}]: {e}")))
            .collect();
        if !bad.is_empty() {
            failures.push(format!(
                "{} of {} elements differ; first: {}",
                bad.len(),
                gv.len(),
                bad[..bad.len().min(4)].join("; ")
            ));
        }
    }
    failures
}

fn gpu_run(ctx: &acclimate::GpuContext, model: &Path, inputs: &[Tensor]) -> Vec<Tensor> {
    let m = Model::load(model).unwrap_or_else(|e| panic!("{}: {e}", model.display()));
    let mut engine = Engine::new(ctx, m);
    engine.set_non_finite_inputs(NonFinite::Propagate);
    engine.run(inputs).unwrap_or_else(|e| panic!("{}: GPU: {e}", model.display()))
}

/// Runs every fixture case whose name starts with one of `prefixes` on the GPU.
fn family(prefixes: &[&str]) {
    let Some(ctx) = common::gpu() else { return };
    let selected: Vec<Case> = cases().into_iter().filter(|c| prefixes.iter().any(|p| c.name.starts_with(p))).collect();
    assert!(!selected.is_empty(), "no fixture case starts with {prefixes:?}");
    let mut failures = Vec::new();
    for c in &selected {
        let got = gpu_run(&ctx, &c.model, &c.inputs);
        let want = overridden(&c.outputs, &c.documented, |_, v| v);
        failures.extend(compare(&c.name, &got, &want));
    }
    println!("{} case(s): {}", selected.len(), selected.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(" "));
    assert!(failures.is_empty(), "GPU and ONNX Runtime disagree on NaN/inf:\n{}", failures.join("\n"));
}

#[test]
fn unary_activations() {
    family(&["unary_"]);
}

#[test]
fn clip_attributes_and_inputs() {
    family(&["clip"]);
}

#[test]
fn binary_broadcasting_and_prelu() {
    family(&["binary_", "prelu_"]);
}

#[test]
fn conv() {
    family(&["conv_"]);
}

#[test]
fn gemm_and_matmul() {
    family(&["gemm", "matmul_"]);
}

#[test]
fn batchnorm() {
    family(&["batchnorm"]);
}

#[test]
fn maxpool() {
    family(&["maxpool_"]);
}

#[test]
fn average_pools() {
    family(&["avgpool_", "global_avgpool"]);
}

#[test]
fn reducemean() {
    family(&["reducemean_"]);
}

/// ReduceMax, ReduceMin and GlobalMaxPool: NaN propagates (numpy's rule, the ONNX reference's);
/// where ONNX Runtime skips it, the fixture documents NaN.
#[test]
fn reducemax_reducemin_and_global_maxpool() {
    family(&["reducemax_", "reducemin_", "global_maxpool_"]);
}

#[test]
fn softmax_and_logsoftmax() {
    family(&["softmax_", "logsoftmax_"]);
}

#[test]
fn layout() {
    family(&["transpose", "concat", "slice", "pad_", "split", "reshape_"]);
}

#[test]
fn folded_on_the_cpu() {
    family(&["folded_"]);
}

/// Every case belongs to one of the families above, so a new case cannot go unchecked.
#[test]
fn every_case_has_a_family() {
    let families = [
        "unary_",
        "clip",
        "binary_",
        "prelu_",
        "conv_",
        "gemm",
        "matmul_",
        "batchnorm",
        "maxpool_",
        "avgpool_",
        "global_avgpool",
        "reducemean_",
        "reducemax_",
        "reducemin_",
        "global_maxpool_",
        "softmax_",
        "logsoftmax_",
        "transpose",
        "concat",
        "slice",
        "pad_",
        "split",
        "reshape_",
        "folded_",
    ];
    let all = cases();
    assert!(all.len() >= 60, "only {} fixture cases", all.len());
    for c in &all {
        assert!(families.iter().any(|f| c.name.starts_with(f)), "case {} is in no tested family", c.name);
    }
}

/// `outputs` with the documented elements of output 0 replaced by `f(index, documented value)`.
fn overridden(outputs: &[Tensor], documented: &[(usize, f32)], f: impl Fn(usize, f32) -> f32) -> Vec<Tensor> {
    let mut out = outputs.to_vec();
    if let Some(first) = out.first_mut() {
        let mut v = first.to_f32_vec();
        for &(i, d) in documented {
            v[i] = f(i, d);
        }
        *first = Tensor::f32(first.shape.clone(), v);
    }
    out
}

fn ort_unoptimized(path: &Path) -> OrtSession {
    assert!(
        std::env::var_os("ORT_DYLIB_PATH").is_some(),
        "ORT_DYLIB_PATH is not set: point it at libonnxruntime.so.1.31.1 from the pip wheel onnxruntime==1.31.1 \
         (source tools/env.sh)"
    );
    let options = OrtOptions { unoptimized: true, ..Default::default() };
    OrtSession::with_options(path, options).unwrap_or_else(|e| panic!("{e}"))
}

/// The committed outputs are still what ONNX Runtime computes from the committed models (the
/// documented MaxPool windows aside: ONNX Runtime's answer there depends on the CPU's kernel).
#[test]
fn fixtures_are_current() {
    let mut failures = Vec::new();
    for c in cases() {
        let got = ort_unoptimized(&c.model).run(&c.inputs).unwrap_or_else(|e| panic!("{}: ONNX Runtime: {e}", c.name));
        let live = got[0].to_f32_vec();
        let want = overridden(&c.outputs, &c.documented, |i, _| live[i]);
        failures.extend(compare(&c.name, &got, &want));
    }
    assert!(
        failures.is_empty(),
        "fixtures differ from ONNX Runtime (rerun tools/nan_reference.py):\n{}",
        failures.join("\n")
    );
}

/// The comparison itself must be able to fail, on each kind of mismatch.
#[test]
fn the_comparison_can_fail() {
    let want = Tensor::f32(vec![4], vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0]);
    let check = |v: Vec<f32>| compare("t", &[Tensor::f32(vec![4], v)], std::slice::from_ref(&want));
    assert!(check(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0]).is_empty());
    assert!(!check(vec![0.0, f32::INFINITY, f32::NEG_INFINITY, 1.0]).is_empty(), "NaN became 0");
    assert!(!check(vec![f32::NAN, f32::MAX, f32::NEG_INFINITY, 1.0]).is_empty(), "inf became FLT_MAX");
    assert!(!check(vec![f32::NAN, f32::INFINITY, f32::INFINITY, 1.0]).is_empty(), "wrong sign of inf");
    assert!(!check(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::NAN]).is_empty(), "spurious NaN");
    assert!(!check(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.001]).is_empty(), "finite value off");
    let documented = overridden(std::slice::from_ref(&want), &[(3, f32::NAN)], |_, v| v);
    assert!(!compare("t", std::slice::from_ref(&want), &documented).is_empty(), "a documented NaN must be NaN");
}

// ------------------------------------------------------------------------------------------------
// The SVHN network

/// svhn.onnx with `f(initializers)` applied, written next to the test's other temporary files.
fn svhn_variant(tag: &str, edit: impl FnOnce(&mut [proto::TensorProto])) -> PathBuf {
    let bytes = std::fs::read(common::asset("svhn.onnx")).expect("read svhn.onnx");
    let mut m = proto::ModelProto::decode(bytes.as_slice()).expect("svhn.onnx decodes");
    edit(&mut m.graph.as_mut().expect("graph").initializer);
    let dir = std::env::temp_dir().join(format!("acclimate-nan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("svhn_{tag}.onnx"));
    std::fs::write(&path, m.encode_to_vec()).expect("write model");
    path
}

/// Sets element `i` of the float initializer `name` (raw or float_data storage) to `v`.
fn set_weight(inits: &mut [proto::TensorProto], name: &str, i: usize, v: f32) {
    let t = inits.iter_mut().find(|t| t.name.as_deref() == Some(name)).unwrap_or_else(|| panic!("no {name}"));
    match t.raw_data.as_mut() {
        Some(raw) => raw[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
        None => t.float_data[i] = v,
    }
}

/// The logits of the GPU and of ONNX Runtime for `path` on `x`: non-finite exactly where ONNX
/// Runtime's are; finite values within parity's criterion relative to the largest finite logit
/// (overflowing inputs make logits of 1e37, whose sums reassociate).
fn svhn_compare(path: &Path, x: &Tensor) -> Vec<f32> {
    let Some(ctx) = common::gpu() else { return Vec::new() };
    let want = ort_unoptimized(path).run(std::slice::from_ref(x)).unwrap_or_else(|e| panic!("ONNX Runtime: {e}"));
    let got = gpu_run(&ctx, path, std::slice::from_ref(x));
    let (g, w) = (got[0].to_f32_vec(), want[0].to_f32_vec());
    assert_eq!(got[0].shape, want[0].shape);
    let scale = w.iter().filter(|v| v.is_finite()).fold(0f32, |m, v| m.max(v.abs()));
    let mut bad = Vec::new();
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        let ok = if b.is_nan() {
            a.is_nan()
        } else if b.is_infinite() {
            a == b
        } else {
            a.is_finite() && (a - b).abs() <= REL * scale + ABS
        };
        if !ok {
            bad.push(format!("logit {i}: gpu {a}, ort {b}"));
        }
    }
    println!("{}: gpu {g:?}\n  ort {w:?}", path.display());
    assert!(bad.is_empty(), "{}: {} logits differ: {}", path.display(), bad.len(), bad.join("; "));
    g
}

fn svhn_input(seed: u64) -> Tensor {
    Tensor::f32(vec![2, 3, 32, 32], common::random_f32(2 * 3 * 32 * 32, seed, -2.0, 2.0))
}

#[test]
fn svhn_nan_conv_weight() {
    let path = svhn_variant("conv_nan", |w| set_weight(w, "features.0.0.weight", 0, f32::NAN));
    let g = svhn_compare(&path, &svhn_input(1));
    assert!(g.iter().all(|v| v.is_nan()), "a NaN first-layer weight reaches every logit");
}

#[test]
fn svhn_nan_bn_scale() {
    let path = svhn_variant("bn_nan", |w| set_weight(w, "features.1.4.weight", 9, f32::NAN));
    svhn_compare(&path, &svhn_input(2));
}

#[test]
fn svhn_nan_and_inf_classifier_weights() {
    // Row 3 of the last layer is NaN at one tap, row 6 +inf: only those logits are non-finite.
    let path = svhn_variant("fc_nan", |w| {
        set_weight(w, "classifier.4.weight", 3 * 256 + 7, f32::NAN);
        set_weight(w, "classifier.4.weight", 6 * 256 + 100, f32::INFINITY);
    });
    let g = svhn_compare(&path, &svhn_input(3));
    assert!(g.iter().any(|v| v.is_finite()), "the other logits stay finite");
}

#[test]
fn svhn_overflowing_input() {
    // A whole image of 3e38 overflows inside the network (inf - inf in a later sum), and so does
    // a single pixel of 3e38 in the other image: the first conv keeps it finite (~1e38) and BN's
    // scaling overflows it. ONNX Runtime's fused graph (Conv+BN) gives finite logits near -6e37
    // for the second image instead: the reason these tests run it unoptimized.
    let mut x = svhn_input(4);
    let n = 3 * 32 * 32;
    if let acclimate::tensor::Data::F32(v) = &mut x.data {
        v[..n].iter_mut().for_each(|e| *e = 3e38);
        v[n + 5 * 32 + 5] = 3e38;
    }
    let g = svhn_compare(&svhn_variant("plain_overflow", |_| {}), &x);
    assert!(g[..10].iter().all(|v| !v.is_finite()), "the overflowing image has no finite logit");
}

#[test]
fn svhn_nan_and_inf_pixels() {
    let mut x = svhn_input(5);
    if let acclimate::tensor::Data::F32(v) = &mut x.data {
        v[3 * 32 + 3] = f32::NAN;
        v[3 * 32 * 32 + 2 * 1024 + 10 * 32 + 10] = f32::INFINITY;
    }
    svhn_compare(&svhn_variant("plain_pixels", |_| {}), &x);
}
