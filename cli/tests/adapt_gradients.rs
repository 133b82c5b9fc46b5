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
