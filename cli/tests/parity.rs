//! The GPU engine against ONNX Runtime on the real models: MobileNetV2 and EfficientNet-Lite0
//! (ImageNet; the latter with TensorFlow's asymmetric "SAME" padding and BN eps 1e-3), the SVHN digit
//! network and RapidOCR's text-direction classifier (a Paddle export, dynamic H and W), at batch
//! sizes 1 and 8, on fixed-seed inputs in [-2, 2) (the range of normalised image values).
//!
//! Criterion per output: max|gpu − ort| ≤ 1e-4·max|ort| + 1e-5, and the same top-1 class for every
//! sample. The relative term allows float32 reassociation across thousands of accumulations
//! (ONNX Runtime also fuses BatchNormalization into Conv; we do not); the absolute term covers
//! outputs near zero. Needs `ORT_DYLIB_PATH` (tools/test.sh sets it); without it the test fails.

mod common;

use acclimate::{Engine, Model, Tensor};
use acclimate_cli::reference::{OrtOptions, OrtSession};

const REL: f32 = 1e-4;
const ABS: f32 = 1e-5;

fn ort_session(path: &std::path::Path) -> OrtSession {
    assert!(
        std::env::var_os("ORT_DYLIB_PATH").is_some(),
        "ORT_DYLIB_PATH is not set: point it at libonnxruntime.so.1.31.1 from the pip wheel onnxruntime==1.31.1, \
         e.g. .venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 (tools/test.sh sets it)"
    );
    OrtSession::new(path).unwrap_or_else(|e| panic!("{e}"))
}

/// Index of the largest value of each row (the last axis after the batch).
fn top1(t: &Tensor) -> Vec<usize> {
    let v = t.to_f32_vec();
    let rows = t.shape.first().copied().unwrap_or(1).max(1);
    let cols = v.len() / rows;
    v.chunks(cols.max(1))
        .map(|r| r.iter().enumerate().fold(0, |best, (i, &x)| if x > r[best] { i } else { best }))
        .collect()
}

/// Compares one case; returns a failure description, and prints the measured error and bound.
fn compare(label: &str, gpu: &[Tensor], ort: &[Tensor]) -> Option<String> {
    if gpu.len() != ort.len() {
        return Some(format!("{label}: {} GPU outputs, {} ONNX Runtime outputs", gpu.len(), ort.len()));
    }
    let mut failures = Vec::new();
    for (k, (g, o)) in gpu.iter().zip(ort).enumerate() {
        if g.shape != o.shape {
            failures.push(format!("{label} output {k}: shape {:?} vs {:?}", g.shape, o.shape));
            continue;
        }
        let (gv, ov) = (g.to_f32_vec(), o.to_f32_vec());
        let max_ref = ov.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err =
            gv.iter().zip(&ov).fold(0f32, |m, (a, b)| if (a - b).abs() > m || a.is_nan() { (a - b).abs() } else { m });
        let bound = REL * max_ref + ABS;
        let (tg, to) = (top1(g), top1(o));
        let same = tg.iter().zip(&to).filter(|(a, b)| a == b).count();
        println!(
            "parity {label} output {k}: max|gpu-ort| = {err:.3e}, bound = {bound:.3e} (max|ort| = {max_ref:.4}), \
             top-1 identical {same}/{}",
            to.len()
        );
        if err.is_nan() || err > bound {
            failures.push(format!("{label} output {k}: max|gpu-ort| = {err:.3e} > bound {bound:.3e}"));
        }
        if tg != to {
            failures.push(format!("{label} output {k}: top-1 differs: gpu {tg:?}, ort {to:?}"));
        }
    }
    (!failures.is_empty()).then(|| failures.join("\n"))
}

fn parity(model: &str, chw: [usize; 3], seed: u64) {
    parity_at(&common::asset(model), chw, seed);
}

fn parity_at(path: &std::path::Path, chw: [usize; 3], seed: u64) {
    let ort = ort_session(path);
    parity_with(path, chw, seed, ort);
}

fn parity_with(path: &std::path::Path, chw: [usize; 3], seed: u64, mut ort: OrtSession) {
    let Some(ctx) = common::gpu() else { return };
    let model = path.file_name().unwrap().to_string_lossy().into_owned();
    let path = path.to_path_buf();
    let mut engine = Engine::new(&ctx, Model::load(&path).unwrap_or_else(|e| panic!("{model}: {e}")));
    let mut failures = Vec::new();
    for batch in [1usize, 8] {
        let shape = vec![batch, chw[0], chw[1], chw[2]];
        let n = shape.iter().product();
        let x = Tensor::f32(shape.clone(), common::random_f32(n, seed + batch as u64, -2.0, 2.0));
        let label = format!("{model} {shape:?}");
        let o = ort.run(std::slice::from_ref(&x)).unwrap_or_else(|e| panic!("{label}: ONNX Runtime: {e}"));
        let g = engine.run(std::slice::from_ref(&x)).unwrap_or_else(|e| panic!("{label}: GPU: {e}"));
        failures.extend(compare(&label, &g, &o));
    }
    assert!(failures.is_empty(), "GPU and ONNX Runtime disagree:\n{}", failures.join("\n"));
}

#[test]
fn mobilenetv2_matches_onnxruntime() {
    parity("mobilenetv2.onnx", [3, 224, 224], 100);
}

#[test]
fn efficientnet_lite0_matches_onnxruntime() {
    parity("efficientnet_lite0.onnx", [3, 224, 224], 400);
}

/// LayerNormalization (opset 17) and an Erf GELU before a classifier
/// (`tools/layer_norm_fixture.py`).
#[test]
fn layer_norm_and_erf_gelu_match_onnxruntime() {
    parity_at(&common::repo_root().join("tests/fixtures/tta/tiny_tent_sgd/model_ln_gelu.onnx"), [3, 8, 8], 500);
}

/// A one-block vision transformer with `torch.onnx.export`'s node patterns (`tools/vit_fixture.py`):
/// the class token's Expand behind Equal/Where shape arithmetic, LayerNormalization, attention,
/// Gather of run-time data, Erf GELU.
#[test]
fn vision_transformer_matches_onnxruntime() {
    parity_at(&common::repo_root().join("tests/fixtures/vit_tiny.onnx"), [3, 8, 8], 600);
}

/// GroupNorm as `torch.onnx.export` writes it before opset 18 (InstanceNormalization on a
/// [N, groups, -1] view, the affine part as Mul and Add; `tools/vit_fixture.py`).
#[test]
fn group_norm_as_exported_matches_onnxruntime() {
    parity_at(&common::repo_root().join("tests/fixtures/gn_tiny.onnx"), [3, 8, 8], 700);
}

/// A ConvNeXt block at opset 20 with GoogLeNet's input transform (`tools/vit_fixture.py`): Gather
/// of input channels, channels-first LayerNorm through Transposes, a 7×7 depthwise convolution,
/// the Gelu op, layer scale, ReduceMean with axes as an input.
#[test]
fn convnext_block_matches_onnxruntime() {
    parity_at(&common::repo_root().join("tests/fixtures/convnext_tiny.onnx"), [3, 8, 8], 800);
}

/// torchvision's own `VisionTransformer` and `SwinTransformer`, shrunk and exported by torch
/// (`tools/torchvision_fixtures.py`): `nn.MultiheadAttention`'s export (head sizes by Mod), Swin's
/// shifted windows (paddings by Mod, attention masks by ScatterND, Not, Where), relative position
/// bias Gathers, patch merging, many LayerNorms.
#[test]
fn torchvision_transformers_match_onnxruntime() {
    parity_at(&common::repo_root().join("tests/fixtures/tv_vit_tiny.onnx"), [3, 16, 16], 1000);
    parity_at(&common::repo_root().join("tests/fixtures/tv_swin_tiny.onnx"), [3, 16, 16], 1100);
}

/// timm's ResNetV2 (BiT), shrunk and exported by torch (`tools/torch_fixtures.py`): StdConv's
/// weight standardisation as training-mode BatchNormalization on constants (folded when the model
/// loads, with the ReduceMeans that feed it), GroupNorm on grouped views, a zero ConstantPad
/// before the stem's MaxPool. Against ONNX Runtime with its graph rewrites off: its Pad fusion
/// moves the zero padding into the MaxPool's own padding, which pads with −∞
/// (`onnx_runtime_fuses_a_zero_pad_into_max_pool_padding` pins that).
#[test]
fn bit_resnet_v2_matches_onnxruntime_unoptimized() {
    let path = common::repo_root().join("tests/fixtures/bit_tiny.onnx");
    ort_session(&path);
    let options = OrtOptions { intra_threads: None, unoptimized: true };
    let ort = OrtSession::with_options(&path, options).unwrap_or_else(|e| panic!("{e}"));
    parity_with(&path, [3, 16, 16], 1300, ort);
}

/// Why the BiT parity runs ONNX Runtime unoptimized: Pad(0) → MaxPool, where a window over the
/// border holds only negative values besides the padding, is 0 by the ONNX definition (numpy
/// here) and what the runtime computes, but ONNX Runtime 1.31.1 with its default optimizations
/// returns the negative maximum. If a later ONNX Runtime fixes its Pad fusion, this test says so.
#[test]
fn onnx_runtime_fuses_a_zero_pad_into_max_pool_padding() {
    use acclimate::onnx::proto;
    use prost::Message;
    let i64s = |name: &str, v: &[i64]| proto::TensorProto {
        name: Some(name.into()),
        dims: vec![v.len() as i64],
        data_type: Some(7),
        int64_data: v.to_vec(),
        ..Default::default()
    };
    let node = |op: &str, inputs: &[&str], output: &str, attrs: Vec<proto::AttributeProto>| proto::NodeProto {
        op_type: Some(op.into()),
        name: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: attrs,
        ..Default::default()
    };
    let ints = |name: &str, v: &[i64]| proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    };
    let vi = acclimate::onnx::float_value_info;
    let bytes = proto::ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        graph: Some(proto::GraphProto {
            name: Some("pad_maxpool".into()),
            node: vec![
                node("Pad", &["x", "pads"], "p", vec![]),
                node("MaxPool", &["p"], "y", vec![ints("kernel_shape", &[3, 3]), ints("strides", &[2, 2])]),
            ],
            initializer: vec![i64s("pads", &[0, 0, 1, 1, 0, 0, 1, 1])],
            input: vec![vi("x", &[1, 1, 4, 4])],
            output: vec![vi("y", &[1, 1, 2, 2])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let dir = std::env::temp_dir().join(format!("acclimate-padpool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pad_maxpool.onnx");
    std::fs::write(&path, bytes).unwrap();
    // All negative: every window that touches the padding has 0 as its maximum.
    let x = Tensor::f32(vec![1, 1, 4, 4], (0..16).map(|i| -1.0 - i as f32).collect());
    let want = [0.0f32, 0.0, 0.0, -6.0];
    let run = |unoptimized: bool| {
        let options = OrtOptions { intra_threads: Some(1), unoptimized };
        let mut s = OrtSession::with_options(&path, options).unwrap_or_else(|e| panic!("{e}"));
        s.run(std::slice::from_ref(&x)).unwrap().remove(0).to_f32_vec()
    };
    let (plain, optimized) = (run(true), run(false));
    if let Some(ctx) = common::gpu() {
        let mut engine = Engine::new(&ctx, Model::load(&path).unwrap());
        assert_eq!(engine.run(std::slice::from_ref(&x)).unwrap()[0].to_f32_vec(), want, "the runtime");
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(plain, want, "ONNX Runtime unoptimized");
    assert_ne!(optimized, want, "ONNX Runtime's optimized Pad → MaxPool is now right: run the BiT parity optimized");
}

/// The GroupNormalization op (opset 21: scale and bias per channel).
#[test]
fn group_normalization_op_matches_onnxruntime() {
    parity_at(&common::repo_root().join("tests/fixtures/gn21_tiny.onnx"), [3, 8, 8], 900);
}

#[test]
fn svhn_matches_onnxruntime() {
    parity("svhn.onnx", [3, 32, 32], 200);
}

#[test]
fn ocr_cls_matches_onnxruntime() {
    parity("ocr_cls.onnx", [3, 48, 192], 300);
}

#[test]
fn the_criterion_can_fail() {
    let a = Tensor::f32(vec![2, 3], vec![1.0, 5.0, 2.0, 0.5, 0.1, 0.2]);
    let check =
        |label: &str, data: Vec<f32>| compare(label, &[Tensor::f32(vec![2, 3], data)], std::slice::from_ref(&a));
    assert!(check("same", vec![1.0, 5.0, 2.0, 0.5, 0.1, 0.2]).is_none());
    assert!(check("off by 1e-3", vec![1.0, 5.001, 2.0, 0.5, 0.1, 0.2]).is_some());
    assert!(check("top-1", vec![1.0, 5.0, 2.0, 0.1, 0.5, 0.2]).is_some());
    assert!(check("nan", vec![f32::NAN, 5.0, 2.0, 0.5, 0.1, 0.2]).is_some());
}

/// A Gemm whose weight (1024 × 32,775 floats, 128.0 MiB + 28 KiB) exceeds the 128 MiB one
/// storage binding is guaranteed to hold (AlexNet's and VGG's classifiers do): the IR splits it
/// across two Gemms over column slices and a Concat (`ir::split_weights`), and the result matches
/// ONNX Runtime on the whole model. B is not transposed here, so each slice is a strided copy of
/// columns, and C is sliced with them.
#[test]
fn weights_over_one_binding_are_split_and_match_onnxruntime() {
    use acclimate::onnx::proto;
    use prost::Message;
    let (k, n) = (1024usize, 32 * 1024 + 7);
    assert!(k * n * 4 > acclimate::ir::split_weights::MAX_WEIGHT_BYTES);
    let f32_tensor = |name: &str, dims: &[usize], v: Vec<f32>| proto::TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(1),
        raw_data: Some(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ..Default::default()
    };
    let value_info = |name: &str, cols: usize| acclimate::onnx::float_value_info(name, &[2, cols as i64]);
    let bytes = proto::ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto { domain: Some(String::new()), version: Some(13) }],
        producer_name: Some("acclimate-tests".into()),
        graph: Some(proto::GraphProto {
            name: Some("big_gemm".into()),
            node: vec![proto::NodeProto {
                op_type: Some("Gemm".into()),
                name: Some("fc".into()),
                input: vec!["x".into(), "w".into(), "b".into()],
                output: vec!["y".into()],
                ..Default::default()
            }],
            initializer: vec![
                f32_tensor("w", &[k, n], common::random_f32(k * n, 1200, -0.05, 0.05)),
                f32_tensor("b", &[n], common::random_f32(n, 1201, -1.0, 1.0)),
            ],
            input: vec![value_info("x", k)],
            output: vec![value_info("y", n)],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let dir = std::env::temp_dir().join(format!("acclimate-parity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("big_gemm.onnx");
    std::fs::write(&path, &bytes).unwrap();
    drop(bytes);
    let model = Model::load(&path).unwrap();
    let pieces = model.graph.nodes.iter().filter(|n| n.op_type == "Gemm" && n.part == Some("columns")).count();
    assert_eq!(pieces, 2, "the weight is split in two");
    let Some(ctx) = common::gpu() else { return };
    let mut ort = ort_session(&path);
    let mut engine = Engine::new(&ctx, model);
    let x = Tensor::f32(vec![2, k], common::random_f32(2 * k, 1202, -2.0, 2.0));
    let o = ort.run(std::slice::from_ref(&x)).unwrap();
    let g = engine.run(std::slice::from_ref(&x)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(f) = compare("big_gemm [2, 1024]", &g, &o) {
        panic!("GPU and ONNX Runtime disagree:\n{f}");
    }
}

/// Einsum as a batched MatMul (`ir::einsum`): attention as MaxViT's export writes it, MViTv2's
/// relative positions (several free labels per operand, broadcast by the MatMul), plain and
/// transposed matrix products, an inner product and an outer product, on random inputs against
/// ONNX Runtime; diagonals, three operands and ellipses are load errors naming the node.
#[test]
fn einsum_matches_onnxruntime() {
    use acclimate::onnx::proto;
    use prost::Message;
    let size = |c: char| match c.to_ascii_lowercase() {
        'b' => 2,
        'g' | 'h' => 3,
        'i' => 4,
        'j' => 5,
        _ => 6,
    };
    let dims =
        |term: &str| term.chars().filter(|c| c.is_ascii_alphabetic()).map(|c| size(c) as i64).collect::<Vec<_>>();
    let model = |eq: &str, n_in: usize| {
        let lhs = eq.split("->").next().unwrap();
        let terms: Vec<&str> = lhs.split(',').collect();
        let out = eq.split("->").nth(1).unwrap_or("");
        let names = ["a", "b", "c"];
        proto::ModelProto {
            ir_version: Some(8),
            opset_import: vec![proto::OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
            graph: Some(proto::GraphProto {
                name: Some("einsum".into()),
                node: vec![proto::NodeProto {
                    op_type: Some("Einsum".into()),
                    name: Some("my_einsum".into()),
                    input: names[..n_in].iter().map(|s| s.to_string()).collect(),
                    output: vec!["y".into()],
                    attribute: vec![proto::AttributeProto {
                        name: Some("equation".into()),
                        r#type: Some(proto::attribute_proto::AttributeType::String as i32),
                        s: Some(eq.as_bytes().to_vec()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                input: (0..n_in).map(|k| acclimate::onnx::float_value_info(names[k], &dims(terms[k]))).collect(),
                output: vec![acclimate::onnx::float_value_info("y", &dims(out))],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let dir = std::env::temp_dir().join(format!("acclimate-einsum-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ctx = common::gpu();
    let mut failures = Vec::new();
    for (k, eq) in
        // MViTv2's relative positions (several free labels in one operand), and in both.
        [
            "B G H I D, B G H J D -> B G H I J",
            "bghij,bghjd->bghid",
            "ij,jk->ik",
            "ij,kj->ki",
            "i,i->",
            "bi,bj->bji",
            "byhwc,hkc->byhwk",
            "abc,cde->eabd",
            "bhwc,hkc->bhwk",
        ]
        .into_iter()
        .enumerate()
    {
        let path = dir.join(format!("einsum{k}.onnx"));
        std::fs::write(&path, model(eq, 2)).unwrap();
        let lhs = eq.split("->").next().unwrap();
        let xs: Vec<Tensor> = lhs
            .split(',')
            .enumerate()
            .map(|(t, term)| {
                let shape: Vec<usize> = dims(term).iter().map(|&d| d as usize).collect();
                let n = shape.iter().product();
                Tensor::f32(shape, common::random_f32(n, 1400 + 10 * k as u64 + t as u64, -2.0, 2.0))
            })
            .collect();
        let o = ort_session(&path).run(&xs).unwrap_or_else(|e| panic!("{eq}: ONNX Runtime: {e}"));
        let model = Model::load(&path).unwrap_or_else(|e| panic!("{eq}: {e}"));
        if let Some(ctx) = &ctx {
            let g = Engine::new(ctx, model).run(&xs).unwrap_or_else(|e| panic!("{eq}: GPU: {e}"));
            failures.extend(compare(eq, &g, &o));
        }
    }
    for (eq, n_in, why) in [
        ("ii->i", 1, "1 terms"),
        ("ij,jk,kl->il", 3, "3 terms"),
        ("...ij,...jk->...ik", 2, "ellipsis"),
        ("ij,jj->i", 2, "repeats"),
        ("ij,k->i", 2, "summed away"),
        ("ijk,jkl->il", 2, "more than one contracted"),
    ] {
        let e = match Model::from_bytes(&model(eq, n_in)) {
            Ok(_) => panic!("{eq} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("my_einsum") && e.contains(why), "{eq}: {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "GPU and ONNX Runtime disagree:\n{}", failures.join("\n"));
}

/// Resize as `torch.onnx.export` writes `F.interpolate` and `nn.Upsample` (`tools/torch_fixtures.py`:
/// HRNet's two-resolution fusion): nearest by a scale factor (asymmetric, floor), bilinear to the
/// size of another tensor (sizes from Shape, Slice and Concat), bicubic with align_corners, a
/// bilinear shrink by 0.75; each two MatMuls with interpolation matrices in the runtime.
#[test]
fn resize_as_torch_exports_it_matches_onnxruntime() {
    parity_at(&common::repo_root().join("tests/fixtures/interp_tiny.onnx"), [3, 12, 12], 1400);
}
