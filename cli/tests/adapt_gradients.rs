//! The whole reverse pass of an adaptation step — entropy loss, every op's backward, and
//! BatchNormalization's backward through its statistics in each mode — against central finite
//! differences of the forward pass.
//!
//! One TENT step with plain SGD (lr 1, no momentum) leaves θ − ∂L/∂θ in the parameters, so the
//! gradient the GPU computed is the parameter change. The reference is (L(θ+h) − L(θ−h)) / 2h with
//! L the mean entropy of the logits of a forward-only session in the same statistics mode,
//! evaluated in f64 on the CPU from the GPU's f32 logits. The same net with LayerNormalization and
//! an Erf GELU before its classifier (`tools/layer_norm_fixture.py`) checks the gradients the step
//! passes back through those to the BatchNorm layers.

mod common;

use std::sync::Arc;

use acclimate::GpuContext;
use acclimate::adapt::{AdaptConfig, Session};
use acclimate::ir::Graph;
use acclimate::{Model, Tensor};
use acclimate_test_macros::gpu_test;

/// The reference tiny net (conv, grouped strided conv, depthwise conv, residual Add,
/// GlobalAveragePool, Gemm) with its Relu and Clip turned into Sigmoid: finite differences need a
/// smooth function (a step of h across a ReLU kink is not a derivative). The kinks themselves are
/// covered exactly by the PyTorch trajectories (tta_reference.rs) and the op tests.
fn tiny() -> Graph {
    tiny_from("model.onnx")
}

fn tiny_from(file: &str) -> Graph {
    let g = smooth(Graph::load(&common::repo_root().join("tests/fixtures/tta/tiny_tent_sgd").join(file)).unwrap());
    assert!(g.nodes.iter().filter(|n| n.op_type == "Sigmoid").count() == 3);
    g
}

/// `g` with its Relu and Clip nodes turned into Sigmoid.
fn smooth(mut g: Graph) -> Graph {
    for n in &mut g.nodes {
        if n.op_type == "Relu" || n.op_type == "Clip" {
            n.op = acclimate::ops::Op::Unary(acclimate::ops::elementwise::Unary::Sigmoid);
            n.op_type = "Sigmoid".into();
            n.inputs.truncate(1);
        }
    }
    g
}

fn entropy(logits: &Tensor) -> f64 {
    let c = logits.shape[1];
    let v = logits.to_f32_vec();
    let rows: Vec<f64> = v
        .chunks(c)
        .map(|z| {
            let m = z.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
            let lse = m + z.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            -z.iter().map(|&x| ((x as f64 - lse).exp()) * (x as f64 - lse)).sum::<f64>()
        })
        .collect();
    rows.iter().sum::<f64>() / rows.len() as f64
}

fn config(method: &str, norm: &str) -> AdaptConfig {
    AdaptConfig::from_toml_str(&format!(
        "[adapt]\nmethod = \"{method}\"\nnorm = \"{norm}\"\n[optimizer]\nkind = \"sgd\"\nlr = 1.0\nmomentum = 0.0\n"
    ))
    .unwrap()
}

/// Loss of a forward pass in `norm` mode with parameter `name[idx]` shifted by `delta`.
fn loss_at(ctx: &acclimate::GpuContext, norm: &str, name: &str, idx: usize, delta: f32, x: &Tensor) -> f64 {
    loss_of(ctx, tiny(), norm, name, idx, delta, x)
}

fn loss_of(
    ctx: &acclimate::GpuContext,
    mut g: Graph,
    norm: &str,
    name: &str,
    idx: usize,
    delta: f32,
    x: &Tensor,
) -> f64 {
    let mut t = (*g.initializers[name]).clone();
    if let acclimate::tensor::Data::F32(v) = &mut t.data {
        v[idx] += delta;
    }
    g.initializers.insert(name.to_string(), Arc::new(t));
    // A model without BatchNormalization has no statistics: the source model is its forward.
    let (method, norm) = if g.batch_norms().is_empty() { ("source", "source") } else { ("", norm) };
    let method = if !method.is_empty() {
        method
    } else if norm == "source" {
        "source"
    } else if norm == "ema" {
        "rbn"
    } else {
        "norm"
    };
    let mut s = Session::new(ctx, Model::from_graph(g), config(method, norm)).unwrap();
    entropy(&s.step(x).unwrap().logits)
}

#[gpu_test]
fn step_gradients_match_finite_differences_in_every_statistics_mode(ctx: GpuContext) {
    let x = Tensor::f32(vec![4, 3, 8, 8], common::random_f32(4 * 3 * 64, 11, -2.0, 2.0));
    let h = 1e-2f32;
    let mut failures = Vec::new();
    for norm in ["batch", "alpha", "ema", "source"] {
        let mut s = Session::new(&ctx, Model::from_graph(tiny()), config("tent", norm)).unwrap();
        let before = s.parameters().unwrap();
        s.step(&x).unwrap();
        let after = s.parameters().unwrap();
        for ((name, b), (_, a)) in before.iter().zip(&after) {
            let g: Vec<f64> = b.to_f32_vec().iter().zip(a.to_f32_vec()).map(|(b, a)| (*b - a) as f64).collect();
            let scale = g.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
            for idx in [0, g.len() - 1] {
                let fd =
                    (loss_at(&ctx, norm, name, idx, h, &x) - loss_at(&ctx, norm, name, idx, -h, &x)) / (2.0 * h as f64);
                let err = (fd - g[idx]).abs();
                eprintln!("{norm:6} {name:12}[{idx}] gpu {:+.6e} fd {:+.6e}", g[idx], fd);
                if err > 2e-3 * scale + 1e-5 {
                    failures.push(format!("{norm} {name}[{idx}]: gpu {:.6e} vs fd {:.6e}", g[idx], fd));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// LayerNormalization (expanded into ReduceMean, Sub, Mul, Add, Sqrt, Div in the IR) and GELU as
/// exported before opset 20 (Div, Erf, Add, Mul) between the pooled features and the classifier:
/// every BatchNorm parameter's gradient, which flows back through both, against finite
/// differences.
#[gpu_test]
fn step_gradients_pass_back_through_layer_norm_and_erf_gelu(ctx: GpuContext) {
    let g = tiny_from("model_ln_gelu.onnx");
    assert_eq!(g.op_histogram().iter().find(|(op, _)| op == "LayerNormalization").map(|p| p.1), Some(1));
    gradients_match(&ctx, &|| tiny_from("model_ln_gelu.onnx"), [4, 3, 8, 8], 12);
}

/// A one-block vision transformer as `torch.onnx.export` writes it (`tools/vit_fixture.py`):
/// the stem's BatchNorm gradients flow back through the class token's Gather, three
/// LayerNormalizations, the MLP's Erf GELU, attention (MatMul, Softmax, the Gather of Q, K and V
/// from one tensor, Transposes and Reshapes) and the class token's Concat.
#[gpu_test]
fn step_gradients_pass_back_through_a_vision_transformer(ctx: GpuContext) {
    let load = || Graph::load(&common::repo_root().join("tests/fixtures/vit_tiny.onnx")).unwrap();
    gradients_match(&ctx, &load, [4, 3, 8, 8], 13);
}

/// LayerNorm, GroupNorm and InstanceNorm affine parameters are adapted too (the harness's
/// `collect_params`, SAR's LN/GN models): a ConvNeXt block with only LayerNorms (channels-first
/// through Transposes), GroupNorm as exported before opset 18 (its module weight and bias are
/// the Mul and Add after the InstanceNormalization on a grouped view, whose unit scale and zero
/// bias are constants, not parameters) and GroupNormalization at opset 21 (its [C] scale and
/// bias viewed as [C, 1, 1]: the view reads the parameter's own buffer). Each parameter's
/// gradient against finite differences.
#[gpu_test]
fn step_gradients_reach_layer_norm_and_group_norm_parameters(ctx: GpuContext) {
    let cases: [(&str, &[&str]); 3] = [
        (
            "convnext_tiny.onnx",
            &["stem_ln.weight", "stem_ln.bias", "block_ln.weight", "block_ln.bias", "head_ln.weight", "head_ln.bias"],
        ),
        ("gn_tiny.onnx", &["gn.weight", "gn.bias"]),
        ("gn21_tiny.onnx", &["gn.weight", "gn.bias"]),
    ];
    for (i, (file, names)) in cases.into_iter().enumerate() {
        let path = common::repo_root().join("tests/fixtures").join(file);
        let load = || Graph::load(&path).unwrap();
        assert!(load().batch_norms().is_empty(), "{file} has no BatchNormalization");
        let s = Session::new(&ctx, Model::from_graph(load()), config("tent", "batch")).unwrap();
        assert_eq!(s.adapted_parameters(), names, "{file}");
        gradients_match(&ctx, &load, [4, 3, 8, 8], 20 + i as u64);
    }
}

/// torchvision's own ViT and Swin and timm's BiT ResNetV2 (`tools/torch_fixtures.py`, exported by
/// torch): TENT finds every LayerNorm (3 and 9 layers) and GroupNorm (7, each a
/// grouped-view InstanceNormalization followed by the module's Mul and Add), and each
/// parameter's gradient — through attention with `nn.MultiheadAttention`'s and Swin's window
/// patterns, through weight-standardised convolutions — matches finite differences.
#[gpu_test]
fn step_gradients_reach_the_norms_of_torchvision_and_timm_models(ctx: GpuContext) {
    let cases = [("tv_vit_tiny.onnx", 3), ("tv_swin_tiny.onnx", 9), ("bit_tiny.onnx", 7)];
    for (i, (file, layers)) in cases.into_iter().enumerate() {
        let path = common::repo_root().join("tests/fixtures").join(file);
        // BiT's Relus as Sigmoids: finite differences need a smooth function (as `tiny`).
        let load = || smooth(Graph::load(&path).unwrap());
        let s = Session::new(&ctx, Model::from_graph(load()), config("tent", "batch")).unwrap();
        assert_eq!(s.adapted_parameters().len(), 2 * layers, "{file}");
        gradients_match(&ctx, &load, [4, 3, 16, 16], 30 + i as u64);
    }
}

/// HRNet's fusion of resolutions (`interp_tiny.onnx`, `tools/torch_fixtures.py`): the BatchNorm
/// gradients of the half-resolution branch come back through every Resize form torch exports
/// (nearest, bilinear to a computed size, bicubic with align_corners, a bilinear shrink), the
/// transposed interpolation matrices' MatMuls, and match finite differences.
#[gpu_test]
fn step_gradients_pass_back_through_resize(ctx: GpuContext) {
    let path = common::repo_root().join("tests/fixtures/interp_tiny.onnx");
    let load = || smooth(Graph::load(&path).unwrap());
    let s = Session::new(&ctx, Model::from_graph(load()), config("tent", "batch")).unwrap();
    assert_eq!(s.adapted_parameters().len(), 2 * 3);
    gradients_match(&ctx, &load, [4, 3, 12, 12], 40);
}

/// One TENT step's BatchNorm gradients (SGD, lr 1) against central differences of the loss, at
/// the first, middle and last element of every parameter.
fn gradients_match(ctx: &GpuContext, graph: &dyn Fn() -> Graph, shape: [usize; 4], seed: u64) {
    let n = shape.iter().product();
    let x = Tensor::f32(shape.to_vec(), common::random_f32(n, seed, -2.0, 2.0));
    let h = 1e-2f32;
    let mut s = Session::new(ctx, Model::from_graph(graph()), config("tent", "batch")).unwrap();
    let before = s.parameters().unwrap();
    s.step(&x).unwrap();
    let after = s.parameters().unwrap();
    assert!(!before.is_empty(), "the model has normalization parameters");
    let mut failures = Vec::new();
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        let g: Vec<f64> = b.to_f32_vec().iter().zip(a.to_f32_vec()).map(|(b, a)| (*b - a) as f64).collect();
        let scale = g.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
        for idx in [0, g.len() / 2, g.len() - 1] {
            let at = |d: f32| loss_of(ctx, graph(), "batch", name, idx, d, &x);
            let fd = (at(h) - at(-h)) / (2.0 * h as f64);
            eprintln!("{name:12}[{idx}] gpu {:+.6e} fd {:+.6e}", g[idx], fd);
            if (fd - g[idx]).abs() > 2e-3 * scale + 1e-5 {
                failures.push(format!("{name}[{idx}]: gpu {:.6e} vs fd {:.6e}", g[idx], fd));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// An opset-13 model x [N, 3, 4, 4] → Conv (3 → 6, 1×1) → BatchNormalization → LRN(size) →
/// GlobalAveragePool → Flatten → Gemm (6 → 4), with fixed-seed weights.
pub fn lrn_model(size: i64, alpha: f32, beta: f32, bias: f32) -> Vec<u8> {
    use acclimate::onnx::proto;
    use prost::Message;
    let t = |name: &str, dims: &[i64], seed: u64, lo: f32, hi: f32| proto::TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(1),
        float_data: common::random_f32(dims.iter().product::<i64>() as usize, seed, lo, hi),
        ..Default::default()
    };
    let attr_f = |name: &str, v: f32| proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    };
    let node = |op: &str, inputs: &[&str], out: &str, attribute: Vec<proto::AttributeProto>| proto::NodeProto {
        op_type: Some(op.into()),
        name: Some(format!("{op}_0")),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        attribute,
        ..Default::default()
    };
    let size_attr = proto::AttributeProto {
        name: Some("size".into()),
        r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
        i: Some(size),
        ..Default::default()
    };
    let vi = acclimate::onnx::float_value_info;
    let mut input = vi("x", &[1, 3, 4, 4]);
    if let Some(proto::type_proto::Value::TensorType(tt)) = input.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        tt.shape.as_mut().unwrap().dim[0].value =
            Some(proto::tensor_shape_proto::dimension::Value::DimParam("N".into()));
    }
    proto::ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto { domain: Some(String::new()), version: Some(13) }],
        graph: Some(proto::GraphProto {
            name: Some("lrn".into()),
            node: vec![
                node("Conv", &["x", "w"], "c", vec![]),
                node("BatchNormalization", &["c", "scale", "bias", "mean", "var"], "b", vec![]),
                node(
                    "LRN",
                    &["b"],
                    "l",
                    vec![size_attr, attr_f("alpha", alpha), attr_f("beta", beta), attr_f("bias", bias)],
                ),
                node("GlobalAveragePool", &["l"], "p", vec![]),
                node("Flatten", &["p"], "f", vec![]),
                node("Gemm", &["f", "fc"], "y", vec![]),
            ],
            initializer: vec![
                t("w", &[6, 3, 1, 1], 1, -1.0, 1.0),
                t("scale", &[6], 2, 0.5, 1.5),
                t("bias", &[6], 3, -0.5, 0.5),
                t("mean", &[6], 4, -0.2, 0.2),
                t("var", &[6], 5, 0.5, 1.5),
                t("fc", &[6, 4], 6, -1.0, 1.0),
            ],
            input: vec![input],
            output: vec![vi("y", &[1, 4])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// LRN (expanded in the IR into Mul, Reshape, AveragePool, Pow, Div): the forward against ONNX
/// Runtime for window sizes 1 to 5 (even ones are lopsided: one more channel after than before),
/// and the BatchNorm gradients through it against finite differences, with a large alpha, so
/// that the normalisation matters.
#[gpu_test]
fn lrn_matches_onnxruntime_and_passes_gradients_back(ctx: GpuContext) {
    let dir = std::env::temp_dir().join(format!("acclimate-lrn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let x = Tensor::f32(vec![2, 3, 4, 4], common::random_f32(96, 50, -2.0, 2.0));
    // ONNX Runtime refuses even sizes (its kernel asserts an odd one): odd ones against it.
    for size in [1i64, 3, 5] {
        let path = dir.join(format!("lrn{size}.onnx"));
        std::fs::write(&path, lrn_model(size, 0.5, 0.75, 1.0)).unwrap();
        let want = acclimate_cli::reference::OrtSession::new(&path)
            .unwrap_or_else(|e| panic!("ONNX Runtime (tools/test.sh sets ORT_DYLIB_PATH): {e}"))
            .run(std::slice::from_ref(&x))
            .unwrap()
            .remove(0)
            .to_f32_vec();
        let got = acclimate::Engine::new(&ctx, Model::load(&path).unwrap())
            .run(std::slice::from_ref(&x))
            .unwrap()
            .remove(0)
            .to_f32_vec();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-4 * scale + 1e-6, "LRN size {size}: max |gpu - ort| {err} (max |ort| {scale})");
    }
    let _ = std::fs::remove_dir_all(&dir);
    // Even sizes against the ONNX definition in f64: the window runs from c − ⌊(size−1)/2⌋ to
    // c + ⌈(size−1)/2⌉, zero beyond the channels.
    let (c, plane) = (6usize, 5usize);
    let v = common::random_f32(2 * c * plane, 51, -2.0, 2.0);
    for size in [2usize, 4] {
        use acclimate::onnx::proto;
        use prost::Message;
        let (alpha, beta, bias) = (0.5f64, 0.75f64, 1.0f64);
        let f = |name: &str, v: f32| proto::AttributeProto {
            name: Some(name.into()),
            r#type: Some(proto::attribute_proto::AttributeType::Float as i32),
            f: Some(v),
            ..Default::default()
        };
        let bytes = proto::ModelProto {
            ir_version: Some(8),
            opset_import: vec![proto::OperatorSetIdProto { domain: Some(String::new()), version: Some(13) }],
            graph: Some(proto::GraphProto {
                name: Some("lrn".into()),
                node: vec![proto::NodeProto {
                    op_type: Some("LRN".into()),
                    name: Some("lrn".into()),
                    input: vec!["x".into()],
                    output: vec!["y".into()],
                    attribute: vec![
                        proto::AttributeProto {
                            name: Some("size".into()),
                            r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
                            i: Some(size as i64),
                            ..Default::default()
                        },
                        f("alpha", alpha as f32),
                        f("beta", beta as f32),
                        f("bias", bias as f32),
                    ],
                    ..Default::default()
                }],
                input: vec![acclimate::onnx::float_value_info("x", &[2, c as i64, plane as i64])],
                output: vec![acclimate::onnx::float_value_info("y", &[2, c as i64, plane as i64])],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let got = acclimate::Engine::new(&ctx, Model::from_bytes(&bytes).unwrap())
            .run(&[Tensor::f32(vec![2, c, plane], v.clone())])
            .unwrap()
            .remove(0)
            .to_f32_vec();
        let (lo, hi) = ((size - 1) / 2, size - 1 - (size - 1) / 2);
        for n in 0..2 {
            for ch in 0..c {
                for p in 0..plane {
                    let at = |k: usize| v[(n * c + k) * plane + p] as f64;
                    let sum: f64 = (ch.saturating_sub(lo)..=(ch + hi).min(c - 1)).map(|k| at(k) * at(k)).sum();
                    let want = at(ch) / (bias + alpha / size as f64 * sum).powf(beta);
                    let g = got[(n * c + ch) * plane + p] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "LRN size {size} [{n}, {ch}, {p}]: {g} vs {want}"
                    );
                }
            }
        }
    }
    for (k, size) in [3i64, 4].into_iter().enumerate() {
        let bytes = lrn_model(size, 0.5, 0.75, 1.0);
        let load = || Graph::from_bytes(&bytes).unwrap();
        assert!(load().nodes.iter().any(|n| n.op_type == "LRN"));
        gradients_match(&ctx, &load, [4, 3, 4, 4], 40 + k as u64);
    }
}
