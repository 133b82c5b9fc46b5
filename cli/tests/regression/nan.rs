// Regression tests of the nan area (spliced into tests/regression.rs's `regression` module).
//
// The expected values are ONNX Runtime 1.31's (tests/nan_semantics.rs compares every op family
// against it, and the SVHN cases live); these pin the findings of issue #11 one by one.

/// A one-node model: input "x" of `shape`, constant inputs `inits`, output "y".
fn nan_one_node(
    op: &str,
    opset: i64,
    shape: &[usize],
    inits: Vec<(&str, acclimate::Tensor)>,
    attrs: Vec<(&str, acclimate::onnx::Attr)>,
) -> acclimate::Model {
    use acclimate::onnx::{DimSpec, RawGraph, RawModel, RawNode, ValueInfo};
    let value = |name: &str, shape: Option<&[usize]>| ValueInfo {
        name: name.into(),
        dtype: Some(acclimate::DType::F32),
        shape: shape.map(|s| s.iter().map(|&d| DimSpec::Fixed(d as u64)).collect()),
    };
    let mut inputs = vec!["x".to_string()];
    inputs.extend(inits.iter().map(|(n, _)| n.to_string()));
    let node = RawNode {
        name: format!("{op}_0"),
        op_type: op.into(),
        domain: String::new(),
        inputs,
        outputs: vec!["y".into()],
        attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    };
    let raw = RawModel {
        ir_version: 8,
        opset,
        producer: "regression::nan".into(),
        graph: RawGraph {
            name: "g".into(),
            nodes: vec![node],
            initializers: inits.into_iter().map(|(n, t)| (n.to_string(), t)).collect(),
            inputs: vec![value("x", Some(shape))],
            outputs: vec![value("y", None)],
        },
    };
    acclimate::Model::from_graph(acclimate::ir::Graph::from_raw(raw).expect("model loads"))
}

/// Runs `model` on `x` on the GPU with non-finite inputs allowed; the first output's values.
fn nan_run(ctx: &acclimate::GpuContext, model: acclimate::Model, x: acclimate::Tensor) -> Vec<f32> {
    let mut engine = acclimate::Engine::new(ctx, model);
    engine.set_non_finite_inputs(acclimate::NonFinite::Propagate);
    engine.run(std::slice::from_ref(&x)).expect("model runs").remove(0).to_f32_vec()
}

/// svhn.onnx with element `i` of initializer `name` set to `v`.
fn nan_svhn_with(name: &str, i: usize, v: f32) -> acclimate::Model {
    use acclimate::onnx::proto;
    use prost::Message;
    let bytes = std::fs::read(common::asset("svhn.onnx")).expect("read svhn.onnx");
    let mut m = proto::ModelProto::decode(bytes.as_slice()).expect("svhn.onnx decodes");
    let inits = &mut m.graph.as_mut().expect("graph").initializer;
    let t = inits.iter_mut().find(|t| t.name.as_deref() == Some(name)).expect("initializer");
    match t.raw_data.as_mut() {
        Some(raw) => raw[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
        None => t.float_data[i] = v,
    }
    acclimate::Model::from_bytes(&m.encode_to_vec()).expect("edited model loads")
}

fn nan_svhn_input(seed: u64) -> acclimate::Tensor {
    acclimate::Tensor::f32(vec![2, 3, 32, 32], common::random_f32(2 * 3 * 32 * 32, seed, -2.0, 2.0))
}

/// WGSL max(NaN, 0) returned 0 on lavapipe: Relu hid NaN. ONNX Runtime: NaN, inf, 0 for -inf.
#[gpu_test]
fn relu_propagates_nan(ctx: acclimate::GpuContext) {
    let x = acclimate::Tensor::f32(vec![4], vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1.0]);
    let y = nan_run(&ctx, nan_one_node("Relu", 14, &[4], vec![], vec![]), x);
    assert!(y[0].is_nan(), "Relu(NaN) = {}", y[0]);
    assert_eq!(&y[1..], &[f32::INFINITY, 0.0, 0.0]);
}

/// Constant subgraphs are folded on the CPU, where f32::max dropped the NaN of Relu(NaN).
#[test]
fn folded_relu_and_clip_keep_nan() {
    use acclimate::ops::elementwise::Unary;
    assert!(Unary::Relu.apply(f32::NAN).is_nan());
    assert!(Unary::Clip { min: -1.0, max: 1.0 }.apply(f32::NAN).is_nan());
    // A NaN bound bounds nothing, as in ONNX Runtime (Clip(inf, NaN, 2) = 2, Clip(-inf, NaN, 2) = -inf).
    assert_eq!(Unary::Clip { min: f32::NAN, max: 2.0 }.apply(f32::NEG_INFINITY), f32::NEG_INFINITY);
    assert_eq!(Unary::Clip { min: f32::NAN, max: 2.0 }.apply(f32::INFINITY), 2.0);
}

/// WGSL clamp(NaN, lo, hi) returned lo: Clip hid NaN. Without bounds ONNX Runtime clamps to
/// ±FLT_MAX; a NaN bound is no bound.
#[gpu_test]
fn clip_propagates_nan(ctx: acclimate::GpuContext) {
    let x = || acclimate::Tensor::f32(vec![4], vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.5]);
    let scalar = |v: f32| acclimate::Tensor::f32(vec![], vec![v]);
    let bounded = nan_one_node("Clip", 13, &[4], vec![("lo", scalar(0.0)), ("hi", scalar(6.0))], vec![]);
    let y = nan_run(&ctx, bounded, x());
    assert!(y[0].is_nan(), "Clip(NaN, 0, 6) = {}", y[0]);
    assert_eq!(&y[1..], &[6.0, 0.0, 0.5]);
    let y = nan_run(&ctx, nan_one_node("Clip", 13, &[4], vec![], vec![]), x());
    assert!(y[0].is_nan(), "Clip(NaN) = {}", y[0]);
    assert_eq!(&y[1..], &[f32::MAX, f32::MIN, 0.5]);
    let nan_min = nan_one_node("Clip", 13, &[4], vec![("lo", scalar(f32::NAN)), ("hi", scalar(2.0))], vec![]);
    let y = nan_run(&ctx, nan_min, x());
    assert!(y[0].is_nan());
    assert_eq!(&y[1..], &[2.0, f32::NEG_INFINITY, 0.5]);
}

/// WGSL max dropped NaN in MaxPool. ONNX Runtime (MLAS 2-D kernel) answers [NaN, 2, inf, -inf]
/// for the 1x2 windows of this row; the runtime returns NaN for every window holding a NaN (the
/// documented difference: MLAS drops a NaN that comes first in a row), and -inf for -inf only.
#[test]
fn maxpool_nan_as_ort() {
    use acclimate::onnx::Attr;
    let Some(ctx) = common::gpu() else { return };
    let row = vec![2.0, f32::NAN, f32::NAN, 2.0, f32::INFINITY, 1.0, f32::NEG_INFINITY, f32::NEG_INFINITY];
    let x = acclimate::Tensor::f32(vec![1, 1, 1, 8], row);
    let attrs = vec![("kernel_shape", Attr::Ints(vec![1, 2])), ("strides", Attr::Ints(vec![1, 2]))];
    let y = nan_run(&ctx, nan_one_node("MaxPool", 12, &[1, 1, 1, 8], vec![], attrs), x);
    assert!(y[0].is_nan(), "max(2, NaN) = {}, ONNX Runtime: NaN", y[0]);
    assert!(y[1].is_nan(), "max(NaN, 2) = {}", y[1]);
    assert_eq!(&y[2..], &[f32::INFINITY, f32::NEG_INFINITY]);
}

/// A NaN BN scale: the GPU's Relu turned the NaN channel into zeros and the logits came out finite
/// and confident. ONNX Runtime gives NaN for every logit of both images.
#[gpu_test]
fn nan_weight_reaches_logits(ctx: acclimate::GpuContext) {
    let y = nan_run(&ctx, nan_svhn_with("features.1.4.weight", 9, f32::NAN), nan_svhn_input(11));
    assert_eq!(y.len(), 20);
    assert!(y.iter().all(|v| v.is_nan()), "logits {y:?}");
}

/// An image of 3e38 overflows in the first convolution (inf − inf later gives NaN); the GPU's
/// Relu and MaxPool turned the NaN back into finite values. ONNX Runtime: NaN logits for that
/// image, the other image's logits unchanged.
#[gpu_test]
fn overflow_inside_net_gives_non_finite_logits(ctx: acclimate::GpuContext) {
    let model = acclimate::Model::load(&common::asset("svhn.onnx")).expect("svhn loads");
    let mut x = nan_svhn_input(12);
    if let acclimate::tensor::Data::F32(v) = &mut x.data {
        v[..3 * 32 * 32].iter_mut().for_each(|e| *e = 3e38);
    }
    let y = nan_run(&ctx, model, x);
    assert!(y[..10].iter().all(|v| v.is_nan()), "overflowing image: {:?}", &y[..10]);
    assert!(y[10..].iter().all(|v| v.is_finite()), "the other image: {:?}", &y[10..]);
}

/// `Engine::run` (and so `acclimate run`) accepted NaN and inf inputs and answered with finite
/// logits. Now it refuses them by default, naming the input, the count and the first index.
#[gpu_test]
fn run_refuses_non_finite_input(ctx: acclimate::GpuContext) {
    let model = acclimate::Model::load(&common::asset("svhn.onnx")).expect("svhn loads");
    let mut engine = acclimate::Engine::new(&ctx, model);
    let mut x = nan_svhn_input(13);
    if let acclimate::tensor::Data::F32(v) = &mut x.data {
        v[17] = f32::NAN;
        v[40] = f32::NEG_INFINITY;
    }
    let msg = engine.run(std::slice::from_ref(&x)).expect_err("a NaN input is refused").to_string();
    for part in ["input 'input'", "[2, 3, 32, 32]", "2 NaN or infinite value(s)", "first at flat index 17", "Propagate"]
    {
        assert!(msg.contains(part), "missing {part:?} in: {msg}");
    }
    // The opt-in runs it, with NaN logits for the first image as ONNX Runtime has them.
    engine.set_non_finite_inputs(acclimate::NonFinite::Propagate);
    let y = engine.run(std::slice::from_ref(&x)).expect("propagate runs").remove(0).to_f32_vec();
    assert!(y[..10].iter().all(|v| v.is_nan()) && y[10..].iter().all(|v| v.is_finite()), "{y:?}");
}

/// `acclimate run` follows the Engine's default: one line, exit status 1, no output file.
#[test]
fn cli_run_refuses_non_finite_input() {
    let dir = std::env::temp_dir().join(format!("acclimate-regression-nan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let input = dir.join("x.npy");
    let output = dir.join("y.npy");
    let mut v = common::random_f32(3 * 32 * 32, 14, -2.0, 2.0);
    v[5] = f32::INFINITY;
    acclimate::npy::write_f32(&input, &acclimate::Tensor::f32(vec![1, 3, 32, 32], v)).expect("write npy");
    let svhn = common::asset("svhn.onnx");
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_acclimate"));
        cmd.arg("run").arg(&svhn).arg("--input").arg(&input).arg("--output").arg(&output).args(extra);
        cmd.output().expect("acclimate runs")
    };
    for backend in ["gpu", "ort"] {
        let o = run(&["--backend", backend]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{backend}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{backend}: one line: {err}");
        assert!(err.contains("1 NaN or infinite value(s) (first at flat index 5)"), "{backend}: {err}");
        assert!(!output.exists(), "{backend}: no output written");
    }
    let o = run(&["--non-finite", "propagate"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let y = acclimate::npy::read_f32(&output).expect("output");
    assert!(y.to_f32_vec().iter().all(|v| v.is_nan()), "ONNX Runtime gives NaN logits: {:?}", y.to_f32_vec());
    let _ = std::fs::remove_dir_all(&dir);
}
