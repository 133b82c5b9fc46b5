//! Convolutions with their BatchNormalization and activation fused into the write-out
//! (`ops::conv::Tail`, `shaders/activation.wgsl`) against the same graphs lowered one pass per
//! node (`plan::Unfused`, itself checked against ONNX Runtime and f64 references elsewhere).
//!
//! The fused kernels evaluate the same expressions in the same order. The two plans agree bit
//! for bit on lavapipe in most cases, but not in all: a fused pipeline is compiled on its own,
//! and the shader compiler may contract a multiply and an add into one fused multiply-add in one
//! pipeline and not in the other (lavapipe: 1–2 ulp on some outputs of the 8-channel 1x1
//! convolution with a bias). So values agree to 2e-6 of the output's largest magnitude (a wrong
//! channel, parameter or formula is off by far more), and NaN and infinities at exactly the same
//! places. Each case also checks that the fusion happened (fewer dispatches) or, where it must
//! not, that it did not. The BatchNorm parameters are rewritten between runs, as adaptation does,
//! to show they are read every run and never folded into the weights.

mod common;

use std::collections::BTreeMap;

use acclimate::adapt::bn::StatsMode;
use acclimate::adapt::config::OptimizerConfig;
use acclimate::adapt::optim::OptimizerSpec;
use acclimate::adapt::train::{Diagnose, StepPlan, StepSpec};
use acclimate::ir::Graph;
use acclimate::onnx::{Attr, DimSpec, RawGraph, RawModel, RawNode, ValueInfo};
use acclimate::plan::{NoHook, Plan, Unfused, WeightStore};
use acclimate::{DType, GpuContext, Tensor};
use acclimate_test_macros::gpu_test;

/// A small graph: one input `x`, initializers, nodes in order, outputs by name.
struct Net {
    x: Vec<usize>,
    inits: Vec<(String, Tensor)>,
    nodes: Vec<RawNode>,
    outputs: Vec<String>,
    seed: u64,
}

impl Net {
    fn new(x: &[usize]) -> Net {
        Net { x: x.to_vec(), inits: Vec::new(), nodes: Vec::new(), outputs: Vec::new(), seed: 7 }
    }

    fn init(&mut self, name: &str, shape: &[usize], lo: f32, hi: f32) -> String {
        self.seed += 1;
        let n = shape.iter().product();
        self.inits.push((name.into(), Tensor::f32(shape.to_vec(), common::random_f32(n, self.seed, lo, hi))));
        name.into()
    }

    fn node(&mut self, op: &str, inputs: &[&str], out: &str, attrs: &[(&str, Attr)]) -> String {
        self.nodes.push(RawNode {
            name: format!("{op}_{out}"),
            op_type: op.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![out.into()],
            attrs: attrs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<BTreeMap<_, _>>(),
        });
        out.into()
    }

    /// Conv (bias when `bias`) over `input` with `cout` outputs.
    fn conv(&mut self, input: &str, out: &str, w: &[usize], bias: bool, attrs: &[(&str, Attr)]) -> String {
        let wn = self.init(&format!("{out}.w"), w, -0.5, 0.5);
        let mut ins = vec![input.to_string(), wn];
        if bias {
            ins.push(self.init(&format!("{out}.b"), &[w[0]], -0.5, 0.5));
        }
        let ins: Vec<&str> = ins.iter().map(|s| s.as_str()).collect();
        self.node("Conv", &ins, out, attrs)
    }

    fn bn(&mut self, input: &str, out: &str, c: usize) -> String {
        let s = self.init(&format!("{out}.scale"), &[c], 0.5, 1.5);
        let b = self.init(&format!("{out}.bias"), &[c], -0.5, 0.5);
        let m = self.init(&format!("{out}.mean"), &[c], -0.3, 0.3);
        let v = self.init(&format!("{out}.var"), &[c], 0.2, 2.0);
        self.node("BatchNormalization", &[input, &s, &b, &m, &v], out, &[("epsilon", Attr::Float(1e-3))])
    }

    fn clip(&mut self, input: &str, out: &str, lo: f32, hi: f32) -> String {
        self.inits.push((format!("{out}.lo"), Tensor::f32(vec![], vec![lo])));
        self.inits.push((format!("{out}.hi"), Tensor::f32(vec![], vec![hi])));
        self.node("Clip", &[input, &format!("{out}.lo"), &format!("{out}.hi")], out, &[])
    }

    fn graph(&self) -> Graph {
        let graph = RawGraph {
            name: "fusion".into(),
            nodes: self.nodes.clone(),
            initializers: self.inits.clone(),
            inputs: vec![ValueInfo {
                name: "x".into(),
                dtype: Some(DType::F32),
                shape: Some(self.x.iter().map(|&d| DimSpec::Fixed(d as u64)).collect()),
            }],
            outputs: self
                .outputs
                .iter()
                .map(|n| ValueInfo { name: n.clone(), dtype: Some(DType::F32), shape: None })
                .collect(),
        };
        Graph::from_raw(RawModel { ir_version: 8, opset: 17, producer: "fusion".into(), graph }).expect("valid graph")
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_f32_vec().into_iter().map(|v| if v.is_nan() { 0x7fc0_0000 } else { v.to_bits() }).collect()
}

/// Same shape; NaN and infinities at the same places; finite values within 2e-6 of the largest
/// finite magnitude of `want` (the module's header says why not bit for bit).
fn agree(case: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape, want.shape, "{case}: shapes");
    let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
    let scale = w.iter().filter(|v| v.is_finite()).fold(0.0f32, |m, v| m.max(v.abs()));
    let tol = 2e-6 * scale;
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        let ok = if a.is_finite() && b.is_finite() { (a - b).abs() <= tol } else { a.is_nan() && b.is_nan() || a == b };
        assert!(ok, "{case}: element {i} is {a} fused, {b} unfused (tolerance {tol:.2e})");
    }
}

/// Runs `net` fused and unfused on an input with NaN, ±inf and ±0 among random values; checks
/// the outputs agree bit for bit (every NaN counted as one) and the dispatch counts: the fused
/// plan has `saved` fewer. Then rewrites every BatchNorm parameter in the shared store, as an
/// adaptation step would, and checks both plans again, and that the output moved.
fn check(ctx: &GpuContext, case: &str, net: &Net, saved: usize) {
    // The kernels real GPUs run, then lavapipe's own variants (`GpuContext::variant`).
    for cpu in [false, true] {
        ctx.set_cpu_kernels(Some(cpu));
        check_on(ctx, &format!("{case} (CPU variants: {cpu})"), net, saved);
    }
}

fn check_on(ctx: &GpuContext, case: &str, net: &Net, saved: usize) {
    let graph = net.graph();
    let shapes = vec![net.x.clone()];
    let mut store = WeightStore::default();
    let fused = Plan::build_with(ctx, &graph, &mut store, &shapes, &mut NoHook).expect("fused plan");
    let unfused = Plan::build_with(ctx, &graph, &mut store, &shapes, &mut Unfused).expect("unfused plan");
    assert_eq!(
        unfused.dispatch_count - fused.dispatch_count,
        saved,
        "{case}: dispatches fused {} vs unfused {}",
        fused.dispatch_count,
        unfused.dispatch_count
    );
    let n: usize = net.x.iter().product();
    let mut x = common::random_f32(n, 99, -2.0, 2.0);
    for (i, v) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0].into_iter().enumerate() {
        x[(i * 37 + 5) % n] = v;
    }
    let run = |plan: &Plan| plan.run(ctx, &[&x]).expect("runs");
    let before = run(&fused);
    for (a, b) in before.iter().zip(&run(&unfused)) {
        agree(case, a, b);
    }
    assert!(before[0].to_f32_vec().iter().any(|v| v.is_nan()), "{case}: the NaN input reaches the output");
    // Adaptation rewrites the parameters on the GPU between runs.
    let mut rewritten = 0;
    for (name, t) in &net.inits {
        let Some(kind) = ["scale", "bias", "mean", "var"].iter().position(|k| name.ends_with(&format!(".{k}"))) else {
            continue;
        };
        let v: Vec<f32> = t.to_f32_vec().iter().map(|&v| if kind == 3 { v * 1.7 } else { v * -1.3 + 0.1 }).collect();
        let buf = store.get(name).unwrap_or_else(|| panic!("{case}: '{name}' is a shared weight"));
        ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(&v));
        rewritten += 1;
    }
    let after = run(&fused);
    for (a, b) in after.iter().zip(&run(&unfused)) {
        agree(&format!("{case}, new parameters"), a, b);
    }
    if rewritten > 0 {
        assert_ne!(bits(&before[0]), bits(&after[0]), "{case}: the fused plan read the new parameters");
    }
}

fn ints(v: &[i64]) -> Attr {
    Attr::Ints(v.to_vec())
}

#[gpu_test]
fn implicit_gemm_conv_with_bias_batchnorm_and_relu(ctx: GpuContext) {
    let mut net = Net::new(&[2, 3, 9, 9]);
    let c = net.conv("x", "c", &[20, 3, 3, 3], true, &[("strides", ints(&[2, 2])), ("pads", ints(&[1, 1, 1, 1]))]);
    let b = net.bn(&c, "b", 20);
    let r = net.node("Relu", &[&b], "y", &[]);
    net.outputs.push(r);
    // BatchNorm's two packing gathers and its pass, and the Relu, become two gathers.
    check(&ctx, "3x3 stride 2 + bias -> BN -> Relu", &net, 2);
}

#[gpu_test]
fn pointwise_convs_on_both_matmul_kernels(ctx: GpuContext) {
    // 24 output channels: 64x64 tiles (matmul_main); Clip's bounds are inputs (opset 17).
    let mut net = Net::new(&[2, 16, 7, 7]);
    let c = net.conv("x", "c", &[24, 16, 1, 1], false, &[]);
    let b = net.bn(&c, "b", 24);
    let y = net.clip(&b, "y", 0.0, 6.0);
    net.outputs.push(y);
    check(&ctx, "1x1, 24 channels -> BN -> Clip(0, 6)", &net, 2);

    // 8 output channels: matmul_rows; a bias; no activation.
    let mut net = Net::new(&[1, 16, 5, 6]);
    let c = net.conv("x", "c", &[8, 16, 1, 1], true, &[]);
    let b = net.bn(&c, "y", 8);
    net.outputs.push(b);
    check(&ctx, "1x1, 8 channels + bias -> BN", &net, 1);
}

#[gpu_test]
fn depthwise_convs_carry_their_weights_in_the_block(ctx: GpuContext) {
    let mut net = Net::new(&[2, 12, 8, 8]);
    let c = net.conv("x", "c", &[12, 1, 3, 3], false, &[("group", Attr::Int(12)), ("pads", ints(&[1, 1, 1, 1]))]);
    let b = net.bn(&c, "b", 12);
    let y = net.clip(&b, "y", 0.0, 6.0);
    net.outputs.push(y);
    check(&ctx, "depthwise 3x3 -> BN -> Clip(0, 6)", &net, 2);

    // A channel multiplier of 2, a bias and a stride; Relu alone (no BatchNorm): the tail's block
    // is its constants, so no gather runs and the Relu's pass is the one saved.
    let mut net = Net::new(&[1, 6, 9, 7]);
    let c = net.conv("x", "c", &[12, 1, 3, 3], true, &[("group", Attr::Int(6)), ("strides", ints(&[2, 1]))]);
    let y = net.node("Relu", &[&c], "y", &[]);
    net.outputs.push(y);
    check(&ctx, "depthwise x2 + bias -> Relu", &net, 1);
}

#[gpu_test]
fn chains_that_must_not_fuse_keep_their_passes(ctx: GpuContext) {
    // A grouped 1x1 convolution: its matrix rows are not the output channels.
    let mut net = Net::new(&[1, 8, 5, 5]);
    let c = net.conv("x", "c", &[8, 4, 1, 1], false, &[("group", Attr::Int(2))]);
    let b = net.bn(&c, "b", 8);
    let y = net.node("Relu", &[&b], "y", &[]);
    net.outputs.push(y);
    check(&ctx, "grouped 1x1 -> BN -> Relu", &net, 0);

    // The BatchNorm's output is read twice (a graph output too): the BatchNorm fuses, the Relu
    // stays a pass of its own.
    let mut net = Net::new(&[1, 3, 6, 6]);
    let c = net.conv("x", "c", &[5, 3, 3, 3], false, &[]);
    let b = net.bn(&c, "b", 5);
    let y = net.node("Relu", &[&b], "y", &[]);
    net.outputs.extend([b, y]);
    check(&ctx, "conv -> BN (an output) -> Relu", &net, 1);

    // The convolution's output is read by two nodes: nothing fuses.
    let mut net = Net::new(&[1, 3, 6, 6]);
    let c = net.conv("x", "c", &[5, 3, 3, 3], false, &[]);
    let b = net.bn(&c, "b", 5);
    let y = net.node("Add", &[&b, &c], "y", &[]);
    net.outputs.push(y);
    check(&ctx, "conv read twice -> BN", &net, 0);
}

/// A forward-only adaptation program with statistics `mode`, fused or one pass per node.
fn forward_spec(mode: StatsMode, fuse: bool) -> StepSpec {
    StepSpec {
        mode,
        adapted: Vec::new(),
        optimizer: OptimizerSpec::from_config(&OptimizerConfig::default()),
        objective: None,
        output: None,
        source_affine: false,
        z_piece: 0,
        top_k: 0,
        shift_score: false,
        diagnostics: Diagnose::Off,
        fuse,
    }
}

/// `bn_apply_rows` (CPU adapters: a plane row per workgroup) over more rows (N·C) than one grid
/// dimension holds (65,535): rows go on y and z. Every value as the parallel `bn_apply` writes it.
#[gpu_test]
fn batchnorm_rows_beyond_one_grid_dimension(ctx: GpuContext) {
    let channels = 40_000;
    let mut net = Net::new(&[2, channels]);
    let b = net.bn("x", "b", channels);
    net.outputs.push(b);
    let graph = net.graph();
    let spec = forward_spec(StatsMode::Batch, true);
    let x = common::random_f32(2 * channels, 5, -2.0, 2.0);
    let mut out = Vec::new();
    for cpu in [false, true] {
        ctx.set_cpu_kernels(Some(cpu));
        let plan = StepPlan::build(&ctx, &graph, &mut WeightStore::default(), &net.x, &spec).expect("program");
        out.push(plan.run(&ctx, &x).expect("runs").logits.to_f32_vec());
    }
    ctx.set_cpu_kernels(None);
    // Two samples per channel: each normalised value is ±1 (times the scale, plus the bias).
    assert!(out[0].iter().all(|v| v.is_finite()) && out[0].iter().filter(|&&v| v == 0.0).count() < 10);
    assert!(out[0] == out[1], "bn_apply_rows differs from bn_apply");
}

/// Adaptation's BatchNormalization layers (batch, RBN, BN-α and frame statistics, lowered by
/// `adapt::bn::BnHook`) apply the Relu or Clip that only their output feeds in `bn_apply` in
/// forward-only programs (`StepSpec::fuse`), against the same programs one pass per node. Each
/// mode runs three batches on stores of their own (RBN and frame statistics move between runs;
/// the last batch holds NaN and ±inf), on both kernel variants.
#[gpu_test]
fn adapted_batchnorm_with_its_activation(ctx: GpuContext) {
    // conv -> BN -> Relu; conv -> BN -> Clip(0, 6); BN -> Add (not an activation); BN -> Relu
    // whose BN output is also read by the Add (must not fuse); Clip with a NaN bound.
    let mut net = Net::new(&[1, 3, 10, 10]);
    let pad = [("pads", ints(&[1, 1, 1, 1]))];
    let c1 = net.conv("x", "c1", &[6, 3, 3, 3], true, &pad);
    let b1 = net.bn(&c1, "b1", 6);
    let r1 = net.node("Relu", &[&b1], "r1", &[]);
    let c2 = net.conv(&r1, "c2", &[6, 6, 3, 3], false, &pad);
    let b2 = net.bn(&c2, "b2", 6);
    let r2 = net.clip(&b2, "r2", 0.0, 6.0);
    let c3 = net.conv(&r2, "c3", &[6, 6, 1, 1], false, &[]);
    let b3 = net.bn(&c3, "b3", 6);
    let r3 = net.node("Relu", &[&b3], "r3", &[]);
    let a = net.node("Add", &[&b3, &r3], "a", &[]);
    let b4 = net.bn(&a, "b4", 6);
    let y = net.clip(&b4, "y", f32::NAN, 1.5);
    net.outputs.push(y);
    let graph = net.graph();
    let modes = [
        StatsMode::Batch,
        StatsMode::Ema { momentum: 0.1 },
        StatsMode::Alpha { alpha: 0.3 },
        acclimate::stream::policy::frame_stats(4),
    ];
    for mode in modes {
        for cpu in [false, true] {
            ctx.set_cpu_kernels(Some(cpu));
            let case = format!("{mode:?} (CPU variants: {cpu})");
            let spec = |fuse| forward_spec(mode, fuse);
            let (mut sf, mut su) = (WeightStore::default(), WeightStore::default());
            let fused = StepPlan::build(&ctx, &graph, &mut sf, &net.x, &spec(true)).expect("fused program");
            let unfused = StepPlan::build(&ctx, &graph, &mut su, &net.x, &spec(false)).expect("unfused program");
            // b1 + r1, b2 + r2, b4 + y; b3's output is read twice.
            assert_eq!(unfused.dispatch_count - fused.dispatch_count, 3, "{case}");
            let n: usize = net.x.iter().product();
            for run in 0..3u64 {
                let mut x = common::random_f32(n, 200 + run, -2.0, 2.0);
                if run == 2 {
                    for (i, v) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0].into_iter().enumerate() {
                        x[(i * 37 + 5) % n] = v;
                    }
                }
                let (a, b) = (fused.run(&ctx, &x).expect("fused"), unfused.run(&ctx, &x).expect("unfused"));
                agree(&format!("{case}, batch {run}"), &a.logits, &b.logits);
                assert_eq!(a.skipped, b.skipped, "{case}, batch {run}: the guard decides alike");
            }
        }
    }
    ctx.set_cpu_kernels(None);
}
