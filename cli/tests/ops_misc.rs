//! BatchNormalization, pooling, ReduceMean and Softmax against naive CPU references, on shapes
//! the ONNX node tests do not reach: odd channel counts, pads + ceil_mode + dilations together,
//! a GlobalAveragePool plane large enough to loop many times before the tree reduction, softmax
//! along a non-last axis, multi-axis means. Also the load-time rejections of training-mode BN
//! and MaxPool's Indices output.

mod common;

use std::collections::BTreeMap;

use acclimate::ir::Graph;
use acclimate::onnx::{Attr, DimSpec, RawGraph, RawModel, RawNode, ValueInfo};
use acclimate::{DType, Engine, GpuContext, Model, Tensor};
use acclimate_test_macros::gpu_test;

fn value(name: &str, shape: Option<&[usize]>) -> ValueInfo {
    ValueInfo {
        name: name.into(),
        dtype: Some(DType::F32),
        shape: shape.map(|s| s.iter().map(|&d| DimSpec::Fixed(d as u64)).collect()),
    }
}

/// A one-node model: input "x" of `shape`, the other node inputs from `inits`, output(s) `outputs`.
fn one_node(
    opset: i64,
    op: &str,
    shape: &[usize],
    inits: Vec<(&str, Tensor)>,
    attrs: Vec<(&str, Attr)>,
    outputs: &[&str],
) -> RawModel {
    let mut inputs = vec!["x".to_string()];
    inputs.extend(inits.iter().map(|(n, _)| n.to_string()));
    let node = RawNode {
        name: format!("{op}_0"),
        op_type: op.into(),
        domain: String::new(),
        inputs,
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<BTreeMap<_, _>>(),
    };
    RawModel {
        ir_version: 8,
        opset,
        producer: "ops_misc".into(),
        graph: RawGraph {
            name: "g".into(),
            nodes: vec![node],
            initializers: inits.into_iter().map(|(n, t)| (n.to_string(), t)).collect(),
            inputs: vec![value("x", Some(shape))],
            outputs: outputs.iter().map(|o| value(o, None)).collect(),
        },
    }
}

fn run(ctx: &GpuContext, raw: RawModel, x: &Tensor) -> Tensor {
    let graph = Graph::from_raw(raw).expect("model loads");
    let mut engine = Engine::new(ctx, Model::from_graph(graph));
    let mut outs = engine.run(std::slice::from_ref(x)).expect("model runs");
    outs.remove(0)
}

fn assert_close(what: &str, got: &Tensor, shape: &[usize], want: &[f32], tol: f32) {
    assert_eq!(got.shape, shape, "{what}: output shape");
    let g = got.to_f32_vec();
    assert_eq!(g.len(), want.len(), "{what}: element count");
    for (i, (a, b)) in g.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what}: element {i}: got {a}, expected {b}");
    }
}

fn ints(v: &[i64]) -> Attr {
    Attr::Ints(v.to_vec())
}

// ---------------------------------------------------------------------------------------------
// BatchNormalization

fn bn_reference(x: &[f32], shape: &[usize], p: [&[f32]; 4], eps: f32) -> Vec<f32> {
    let c = shape[1];
    let plane: usize = shape[2..].iter().product();
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let ch = (i / plane) % c;
            let (scale, bias, mean, var) = (p[0][ch] as f64, p[1][ch] as f64, p[2][ch] as f64, p[3][ch] as f64);
            ((v as f64 - mean) / (var + eps as f64).sqrt() * scale + bias) as f32
        })
        .collect()
}

fn check_bn(ctx: &GpuContext, shape: &[usize], seed: u64) {
    let c = shape[1];
    let n: usize = shape.iter().product();
    let x = common::random_f32(n, seed, -3.0, 3.0);
    let scale = common::random_f32(c, seed + 1, 0.5, 2.0);
    let bias = common::random_f32(c, seed + 2, -1.0, 1.0);
    let mean = common::random_f32(c, seed + 3, -0.5, 0.5);
    let var = common::random_f32(c, seed + 4, 0.1, 3.0);
    let eps = 1e-3;
    let want = bn_reference(&x, shape, [&scale, &bias, &mean, &var], eps);
    let inits = vec![
        ("scale", Tensor::f32(vec![c], scale)),
        ("bias", Tensor::f32(vec![c], bias)),
        ("mean", Tensor::f32(vec![c], mean)),
        ("var", Tensor::f32(vec![c], var)),
    ];
    for opset in [9, 15] {
        let raw =
            one_node(opset, "BatchNormalization", shape, inits.clone(), vec![("epsilon", Attr::Float(eps))], &["y"]);
        let got = run(ctx, raw, &Tensor::f32(shape.to_vec(), x.clone()));
        assert_close(&format!("BN {shape:?} opset {opset}"), &got, shape, &want, 1e-5);
    }
}

#[gpu_test]
fn batchnorm_2d_4d_odd_channels(ctx: GpuContext) {
    check_bn(&ctx, &[5, 7], 10);
    check_bn(&ctx, &[2, 5, 3, 7], 20);
    check_bn(&ctx, &[1, 3, 2, 3, 5], 30);
}

#[test]
fn batchnorm_training_outputs_fail_at_load() {
    let c = 3;
    let inits = || {
        ["scale", "bias", "mean", "var"]
            .map(|n| (n, Tensor::f32(vec![c], vec![1.0; c])))
            .into_iter()
            .collect::<Vec<_>>()
    };
    let raw = one_node(
        15,
        "BatchNormalization",
        &[1, c, 2, 2],
        inits(),
        vec![("training_mode", Attr::Int(1))],
        &["y", "running_mean", "running_var"],
    );
    let err = Graph::from_raw(raw).expect_err("training-mode BN must not load").to_string();
    assert!(err.contains("training_mode=1"), "unclear error: {err}");
    // Opset 9 marks training mode by the extra statistics outputs alone.
    let raw = one_node(9, "BatchNormalization", &[1, c, 2, 2], inits(), vec![], &["y", "m", "v", "sm", "sv"]);
    let err = Graph::from_raw(raw).expect_err("BN with statistics outputs must not load").to_string();
    assert!(err.contains("training mode"), "unclear error: {err}");
    let raw = one_node(7, "BatchNormalization", &[1, c, 2, 2], inits(), vec![("spatial", Attr::Int(0))], &["y"]);
    let err = Graph::from_raw(raw).expect_err("non-spatial BN must not load").to_string();
    assert!(err.contains("spatial=0"), "unclear error: {err}");
}

// ---------------------------------------------------------------------------------------------
// Pooling

struct PoolCase {
    max: bool,
    kernel: Vec<usize>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    /// Begin pads then end pads.
    pads: Vec<usize>,
    ceil_mode: bool,
    count_include_pad: bool,
}

/// The ONNX definition written out directly: output size by floor/ceil with the rule that the
/// last window must start inside the input or its left padding, max over in-bounds taps, mean
/// over in-bounds taps or over taps inside the padded extent.
fn pool_reference(x: &[f32], shape: &[usize], c: &PoolCase) -> (Vec<usize>, Vec<f32>) {
    let k = c.kernel.len();
    let spatial = &shape[2..];
    let mut out_sp = Vec::new();
    for (d, &inp) in spatial.iter().enumerate() {
        let (inp, pb, pe, s) = (inp as i64, c.pads[d] as i64, c.pads[d + k] as i64, c.strides[d] as i64);
        let extent = (c.kernel[d] as i64 - 1) * c.dilations[d] as i64 + 1;
        let span = inp + pb + pe - extent;
        let mut o = if c.ceil_mode { (span + s - 1) / s + 1 } else { span / s + 1 };
        if c.ceil_mode && (o - 1) * s >= inp + pb {
            o -= 1;
        }
        out_sp.push(o as usize);
    }
    let mut out_shape = shape[..2].to_vec();
    out_shape.extend(&out_sp);
    let planes = shape[0] * shape[1];
    let in_plane: usize = spatial.iter().product();
    let out_plane: usize = out_sp.iter().product();
    let mut y = Vec::with_capacity(planes * out_plane);
    for p in 0..planes {
        for o in 0..out_plane {
            // Output coordinates, row major.
            let mut oc = vec![0; k];
            let mut rem = o;
            for d in (0..k).rev() {
                oc[d] = rem % out_sp[d];
                rem /= out_sp[d];
            }
            let taps: usize = c.kernel.iter().product();
            let (mut mx, mut sum, mut inside, mut padded) = (f32::MIN, 0.0f64, 0usize, 0usize);
            for t in 0..taps {
                let mut kc = vec![0; k];
                let mut rem = t;
                for d in (0..k).rev() {
                    kc[d] = rem % c.kernel[d];
                    rem /= c.kernel[d];
                }
                let mut off = 0usize;
                let (mut valid, mut in_pad_extent) = (true, true);
                for d in 0..k {
                    let pos = (oc[d] * c.strides[d]) as i64 - c.pads[d] as i64 + (kc[d] * c.dilations[d]) as i64;
                    if pos < 0 || pos >= spatial[d] as i64 {
                        valid = false;
                    }
                    if pos >= (spatial[d] + c.pads[d + k]) as i64 {
                        in_pad_extent = false;
                    }
                    off = off * spatial[d] + pos.max(0) as usize;
                }
                if in_pad_extent {
                    padded += 1;
                }
                if valid {
                    let v = x[p * in_plane + off];
                    mx = mx.max(v);
                    sum += v as f64;
                    inside += 1;
                }
            }
            y.push(if c.max {
                mx
            } else {
                let div = if c.count_include_pad { padded } else { inside };
                (sum / div as f64) as f32
            });
        }
    }
    (out_shape, y)
}

fn check_pool(ctx: &GpuContext, shape: &[usize], c: &PoolCase, seed: u64) {
    let n: usize = shape.iter().product();
    let x = common::random_f32(n, seed, -4.0, 4.0);
    let (out_shape, want) = pool_reference(&x, shape, c);
    let to_i = |v: &[usize]| ints(&v.iter().map(|&a| a as i64).collect::<Vec<_>>());
    let mut attrs = vec![
        ("kernel_shape", to_i(&c.kernel)),
        ("strides", to_i(&c.strides)),
        ("dilations", to_i(&c.dilations)),
        ("pads", to_i(&c.pads)),
        ("ceil_mode", Attr::Int(c.ceil_mode as i64)),
    ];
    let op = if c.max { "MaxPool" } else { "AveragePool" };
    if !c.max {
        attrs.push(("count_include_pad", Attr::Int(c.count_include_pad as i64)));
    }
    let raw = one_node(19, op, shape, vec![], attrs, &["y"]);
    let got = run(ctx, raw, &Tensor::f32(shape.to_vec(), x));
    let what = format!(
        "{op} {shape:?} k{:?} s{:?} d{:?} p{:?} ceil {}",
        c.kernel, c.strides, c.dilations, c.pads, c.ceil_mode
    );
    assert_close(&what, &got, &out_shape, &want, 1e-5);
}

#[gpu_test]
fn pools_with_pads_ceil_mode_and_dilations(ctx: GpuContext) {
    for max in [true, false] {
        for count_include_pad in [false, true] {
            if max && count_include_pad {
                continue;
            }
            // 2-D, odd sizes; with ceil_mode the last row window hangs past the end padding.
            let c = PoolCase {
                max,
                kernel: vec![3, 2],
                strides: vec![2, 3],
                dilations: vec![2, 1],
                pads: vec![1, 0, 1, 1],
                ceil_mode: true,
                count_include_pad,
            };
            check_pool(&ctx, &[2, 3, 9, 11], &c, 1);
            let c = PoolCase { ceil_mode: false, ..c };
            check_pool(&ctx, &[2, 3, 9, 11], &c, 2);
            // Ceil mode where the dropped window would start in the right padding.
            let c = PoolCase {
                max,
                kernel: vec![2, 2],
                strides: vec![2, 2],
                dilations: vec![1, 1],
                pads: vec![1, 1, 1, 1],
                ceil_mode: true,
                count_include_pad,
            };
            check_pool(&ctx, &[1, 3, 5, 7], &c, 3);
            // 1-D and 3-D.
            let c = PoolCase {
                max,
                kernel: vec![4],
                strides: vec![3],
                dilations: vec![2],
                pads: vec![2, 1],
                ceil_mode: true,
                count_include_pad,
            };
            check_pool(&ctx, &[2, 5, 13], &c, 4);
            let c = PoolCase {
                max,
                kernel: vec![2, 3, 2],
                strides: vec![2, 2, 1],
                dilations: vec![1, 2, 2],
                pads: vec![1, 1, 0, 0, 2, 1],
                ceil_mode: true,
                count_include_pad,
            };
            check_pool(&ctx, &[1, 3, 5, 7, 6], &c, 5);
        }
    }
}

#[test]
fn maxpool_indices_output_fails_at_load() {
    let raw = one_node(12, "MaxPool", &[1, 1, 4, 4], vec![], vec![("kernel_shape", ints(&[2, 2]))], &["y", "indices"]);
    let err = Graph::from_raw(raw).expect_err("MaxPool with Indices must not load").to_string();
    assert!(err.contains("Indices"), "unclear error: {err}");
}

#[gpu_test]
fn global_average_pool_large_plane_is_exact_and_deterministic(ctx: GpuContext) {
    let shape = [1, 3, 67, 71];
    let plane = 67 * 71;
    // An offset keeps the sum far from zero, so a dropped or doubled element would show.
    let x = common::random_f32(3 * plane, 7, 0.0, 2.0);
    let want: Vec<f32> =
        x.chunks(plane).map(|p| (p.iter().map(|&v| v as f64).sum::<f64>() / plane as f64) as f32).collect();
    let graph = Graph::from_raw(one_node(13, "GlobalAveragePool", &shape, vec![], vec![], &["y"])).unwrap();
    let mut engine = Engine::new(&ctx, Model::from_graph(graph));
    let input = Tensor::f32(shape.to_vec(), x);
    let a = engine.run(std::slice::from_ref(&input)).unwrap().remove(0);
    let b = engine.run(std::slice::from_ref(&input)).unwrap().remove(0);
    assert_close("GlobalAveragePool", &a, &[1, 3, 1, 1], &want, 1e-5);
    let bits = |t: &Tensor| t.to_f32_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b), "two runs of GlobalAveragePool differ");

    // 1-D and 3-D spatial inputs, several planes.
    for shape in [vec![2, 5, 300], vec![2, 3, 4, 5, 6]] {
        let n: usize = shape.iter().product();
        let plane: usize = shape[2..].iter().product();
        let x = common::random_f32(n, 8, -1.0, 3.0);
        let want: Vec<f32> =
            x.chunks(plane).map(|p| (p.iter().map(|&v| v as f64).sum::<f64>() / plane as f64) as f32).collect();
        let got = run(
            &ctx,
            one_node(13, "GlobalAveragePool", &shape, vec![], vec![], &["y"]),
            &Tensor::f32(shape.clone(), x),
        );
        let mut out = shape[..2].to_vec();
        out.extend(vec![1; shape.len() - 2]);
        assert_close(&format!("GlobalAveragePool {shape:?}"), &got, &out, &want, 1e-5);
    }
}

/// `global_avg_lanes` (CPU adapters: a plane per invocation, the tree in a private array) gives
/// exactly what `global_avg_main` (a workgroup per plane) gives: planes longer than a workgroup,
/// of one value, and more planes than one grid row of lanes workgroups holds (2-D grid).
#[gpu_test]
fn global_average_pool_kernel_variants_agree_bit_for_bit(ctx: GpuContext) {
    for shape in [vec![2, 3, 67, 71], vec![1, 5, 7, 7], vec![1, 600_000, 1, 1], vec![3, 11, 1]] {
        let n: usize = shape.iter().product();
        let x = Tensor::f32(shape.clone(), common::random_f32(n, 31, -1.0, 3.0));
        let mut out = Vec::new();
        for cpu in [false, true] {
            ctx.set_cpu_kernels(Some(cpu));
            out.push(run(&ctx, one_node(13, "GlobalAveragePool", &shape, vec![], vec![], &["y"]), &x).to_f32_vec());
        }
        ctx.set_cpu_kernels(None);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out[0]), bits(&out[1]), "{shape:?}");
        assert!(out[0].iter().all(|v| v.is_finite()), "{shape:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax / LogSoftmax

/// Softmax along `axis` of a row-major tensor, in f64.
fn softmax_reference(x: &[f32], shape: &[usize], axis: usize, log: bool) -> Vec<f32> {
    let len = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let outer: usize = shape[..axis].iter().product();
    let mut y = vec![0.0; x.len()];
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| o * len * inner + j * inner + i;
            let m = (0..len).map(|j| x[at(j)] as f64).fold(f64::MIN, f64::max);
            let s: f64 = (0..len).map(|j| (x[at(j)] as f64 - m).exp()).sum();
            for j in 0..len {
                let v = x[at(j)] as f64 - m;
                y[at(j)] = if log { v - s.ln() } else { v.exp() / s } as f32;
            }
        }
    }
    y
}

#[gpu_test]
fn softmax_along_a_non_last_axis(ctx: GpuContext) {
    // Channel counts on both sides of the thread-per-row / workgroup-per-row switch.
    for shape in [vec![2, 5, 3, 4], vec![2, 70, 3, 3]] {
        let n: usize = shape.iter().product();
        // Large offsets: without subtracting the maximum, exp would overflow.
        let x = common::random_f32(n, 11, 80.0, 100.0);
        for (op, log) in [("Softmax", false), ("LogSoftmax", true)] {
            let want = softmax_reference(&x, &shape, 1, log);
            let raw = one_node(13, op, &shape, vec![], vec![("axis", Attr::Int(1))], &["y"]);
            let got = run(&ctx, raw, &Tensor::f32(shape.clone(), x.clone()));
            assert_close(&format!("{op} axis 1 of {shape:?}"), &got, &shape, &want, 1e-5);
        }
    }
}

#[gpu_test]
fn softmax_before_opset_13_coerces_to_2d(ctx: GpuContext) {
    let shape = vec![2, 3, 4, 5];
    let x = common::random_f32(120, 12, -5.0, 5.0);
    for (op, log) in [("Softmax", false), ("LogSoftmax", true)] {
        // Axis 1 (the default) flattens [3, 4, 5] into one row of 60.
        let want = softmax_reference(&x, &[2, 60], 1, log);
        let got = run(&ctx, one_node(11, op, &shape, vec![], vec![], &["y"]), &Tensor::f32(shape.clone(), x.clone()));
        assert_close(&format!("{op} opset 11"), &got, &shape, &want, 1e-5);
        // Default axis -1 from opset 13 on.
        let want = softmax_reference(&x, &shape, 3, log);
        let got = run(&ctx, one_node(13, op, &shape, vec![], vec![], &["y"]), &Tensor::f32(shape.clone(), x.clone()));
        assert_close(&format!("{op} opset 13"), &got, &shape, &want, 1e-5);
    }
}

// ---------------------------------------------------------------------------------------------
// ReduceMean

fn reduce_mean_reference(x: &[f32], shape: &[usize], axes: &[usize], keepdims: bool) -> (Vec<usize>, Vec<f32>) {
    let kept_shape: Vec<usize> = (0..shape.len()).map(|d| if axes.contains(&d) { 1 } else { shape[d] }).collect();
    let n_out: usize = kept_shape.iter().product();
    let mut sums = vec![0.0f64; n_out];
    let mut counts = vec![0usize; n_out];
    for (i, &v) in x.iter().enumerate() {
        let mut rem = i;
        let mut o = 0;
        let mut scale = 1;
        for d in (0..shape.len()).rev() {
            let idx = rem % shape[d];
            rem /= shape[d];
            if !axes.contains(&d) {
                o += idx * scale;
                scale *= shape[d];
            }
        }
        sums[o] += v as f64;
        counts[o] += 1;
    }
    let out_shape =
        if keepdims { kept_shape } else { (0..shape.len()).filter(|d| !axes.contains(d)).map(|d| shape[d]).collect() };
    (out_shape, sums.iter().zip(&counts).map(|(s, &c)| (s / c as f64) as f32).collect())
}

#[gpu_test]
fn reduce_mean_over_several_axes(ctx: GpuContext) {
    // (shape, axes as written, normalised axes); the last case is long enough for the
    // workgroup-per-output kernel.
    let cases: Vec<(Vec<usize>, Vec<i64>, Vec<usize>)> = vec![
        (vec![2, 3, 4, 5], vec![1, 3], vec![1, 3]),
        (vec![2, 3, 4, 5], vec![-1, 0, 2], vec![0, 2, 3]),
        (vec![3, 7, 5], vec![], vec![0, 1, 2]),
        (vec![3, 40, 9, 2], vec![1, 2], vec![1, 2]),
    ];
    for (shape, axes, norm) in cases {
        let n: usize = shape.iter().product();
        let x = common::random_f32(n, 13, -2.0, 4.0);
        for keepdims in [true, false] {
            let (out_shape, want) = reduce_mean_reference(&x, &shape, &norm, keepdims);
            let what = format!("ReduceMean {shape:?} axes {axes:?} keepdims {keepdims}");
            // Opset 13: axes as an attribute (absent means all).
            let mut attrs = vec![("keepdims", Attr::Int(keepdims as i64))];
            if !axes.is_empty() {
                attrs.push(("axes", ints(&axes)));
            }
            let got = run(
                &ctx,
                one_node(13, "ReduceMean", &shape, vec![], attrs, &["y"]),
                &Tensor::f32(shape.clone(), x.clone()),
            );
            assert_close(&format!("{what} opset 13"), &got, &out_shape, &want, 1e-5);
            // Opset 18: axes as a constant input (an empty one means all).
            let inits = vec![("axes", Tensor::i64(vec![axes.len()], axes.clone()))];
            let raw = one_node(18, "ReduceMean", &shape, inits, vec![("keepdims", Attr::Int(keepdims as i64))], &["y"]);
            let got = run(&ctx, raw, &Tensor::f32(shape.clone(), x.clone()));
            assert_close(&format!("{what} opset 18"), &got, &out_shape, &want, 1e-5);
        }
    }
    // noop_with_empty_axes: no axes means the identity.
    let x = common::random_f32(24, 14, -1.0, 1.0);
    let raw = one_node(18, "ReduceMean", &[2, 3, 4], vec![], vec![("noop_with_empty_axes", Attr::Int(1))], &["y"]);
    let got = run(&ctx, raw, &Tensor::f32(vec![2, 3, 4], x.clone()));
    assert_close("ReduceMean noop_with_empty_axes", &got, &[2, 3, 4], &x, 0.0);
}
