//! Conv, Gemm and MatMul on the GPU against plain nested-loop f64 references.
//!
//! Every case builds a one-node ONNX graph, runs it through the engine and compares with
//! |gpu - ref| <= 1e-4 * max|ref| + 1e-5. The cases cover each kernel route of `ops::conv`
//! (implicit GEMM, depthwise, 1x1 through the matmul kernel) and the matmul kernel's strides:
//! transposes, broadcast bias and batch dims, and sizes that are not multiples of its 64x64x16
//! tile as well as sizes spanning several tiles in every dimension.

mod common;

use std::collections::BTreeMap;

use acclimate::gpu::Shader;
use acclimate::ir::Graph;
use acclimate::onnx::{Attr, DimSpec, RawGraph, RawModel, RawNode, ValueInfo};
use acclimate::{DType, Engine, GpuContext, Model, Tensor};
use acclimate_test_macros::gpu_test;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// One node input: a runtime graph input or a frozen initializer.
struct Feed {
    t: Tensor,
    runtime: bool,
}

fn runtime(shape: &[usize], seed: u64) -> Feed {
    let n = shape.iter().product();
    Feed { t: Tensor::f32(shape.to_vec(), common::random_f32(n, seed, -1.0, 1.0)), runtime: true }
}

fn weight(shape: &[usize], seed: u64) -> Feed {
    Feed { runtime: false, ..runtime(shape, seed) }
}

/// Runs one `op_type` node on the GPU; `None` entries are omitted optional inputs.
fn run_node(
    ctx: &GpuContext,
    op_type: &str,
    attrs: &[(&str, Attr)],
    feeds: &[Option<&Feed>],
) -> Result<Tensor, String> {
    let mut graph = RawGraph {
        name: "test".into(),
        nodes: Vec::new(),
        initializers: Vec::new(),
        inputs: Vec::new(),
        outputs: vec![ValueInfo { name: "y".into(), dtype: Some(DType::F32), shape: None }],
    };
    let mut names = Vec::new();
    let mut data = Vec::new();
    for (i, f) in feeds.iter().enumerate() {
        let Some(f) = f else {
            names.push(String::new());
            continue;
        };
        let name = format!("in{i}");
        if f.runtime {
            graph.inputs.push(ValueInfo {
                name: name.clone(),
                dtype: Some(DType::F32),
                shape: Some(f.t.shape.iter().map(|&d| DimSpec::Fixed(d as u64)).collect()),
            });
            data.push(f.t.clone());
        } else {
            graph.initializers.push((name.clone(), f.t.clone()));
        }
        names.push(name);
    }
    graph.nodes.push(RawNode {
        name: format!("{op_type}_0"),
        op_type: op_type.into(),
        domain: String::new(),
        inputs: names,
        outputs: vec!["y".into()],
        attrs: attrs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<BTreeMap<_, _>>(),
    });
    let raw = RawModel { ir_version: 8, opset: 17, producer: "ops_conv".into(), graph };
    let graph = Graph::from_raw(raw).map_err(|e| e.to_string())?;
    let mut engine = Engine::new(ctx, Model::from_graph(graph));
    let mut out = engine.run(&data).map_err(|e| e.to_string())?;
    out.pop().ok_or_else(|| "no output".into())
}

/// Compares `got` with the reference (shape and values) under the suite's tolerance.
fn check(case: &str, got: &Tensor, want_shape: &[usize], want: &[f64]) {
    assert_eq!(got.shape, want_shape, "{case}: output shape");
    let g = got.to_f32_vec();
    assert_eq!(g.len(), want.len(), "{case}: element count");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let tol = 1e-4 * scale + 1e-5;
    for (i, (&a, &b)) in g.iter().zip(want).enumerate() {
        assert!((a as f64 - b).abs() <= tol, "{case}: element {i} is {a}, reference {b} (tolerance {tol:.3e})");
    }
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_f32_vec().into_iter().map(f64::from).collect()
}

fn ints(v: &[i64]) -> Attr {
    Attr::Ints(v.to_vec())
}

// ---------------------------------------------------------------------------------------------
// References
// ---------------------------------------------------------------------------------------------

/// Convolution geometry for the reference, per spatial dim.
struct ConvSpec {
    group: usize,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    /// (begin, end) per spatial dim.
    pads: Vec<(usize, usize)>,
}

/// Direct convolution in f64: X [N, C, spatial...], W [M, C/group, kernel...], 1 to 3 spatial
/// dims (handled as 3 with leading unit dims).
fn conv_ref(x: &Tensor, w: &Tensor, b: Option<&Tensor>, s: &ConvSpec) -> (Vec<usize>, Vec<f64>) {
    let k = x.shape.len() - 2;
    let lift = |v: &[usize], fill: usize| -> [usize; 3] {
        let mut o = [fill; 3];
        o[3 - k..].copy_from_slice(v);
        o
    };
    let (n, c) = (x.shape[0], x.shape[1]);
    let m = w.shape[0];
    let cg = w.shape[1];
    let mg = m / s.group;
    let ins = lift(&x.shape[2..], 1);
    let ks = lift(&w.shape[2..], 1);
    let st = lift(&s.strides, 1);
    let dl = lift(&s.dilations, 1);
    let pb = lift(&s.pads.iter().map(|p| p.0).collect::<Vec<_>>(), 0);
    let pe = lift(&s.pads.iter().map(|p| p.1).collect::<Vec<_>>(), 0);
    let outs: [usize; 3] = std::array::from_fn(|d| (ins[d] + pb[d] + pe[d] - ((ks[d] - 1) * dl[d] + 1)) / st[d] + 1);
    let (xv, wv) = (f64s(x), f64s(w));
    let bv = b.map(f64s);
    let mut out = Vec::new();
    for img in 0..n {
        for oc in 0..m {
            let g = oc / mg;
            for od in 0..outs[0] {
                for oh in 0..outs[1] {
                    for ow in 0..outs[2] {
                        let mut acc = bv.as_ref().map_or(0.0, |b| b[oc]);
                        for ci in 0..cg {
                            let ic = g * cg + ci;
                            for kd in 0..ks[0] {
                                for kh in 0..ks[1] {
                                    for kw in 0..ks[2] {
                                        let pos = [
                                            (od * st[0] + kd * dl[0]) as isize - pb[0] as isize,
                                            (oh * st[1] + kh * dl[1]) as isize - pb[1] as isize,
                                            (ow * st[2] + kw * dl[2]) as isize - pb[2] as isize,
                                        ];
                                        if (0..3).any(|d| pos[d] < 0 || pos[d] >= ins[d] as isize) {
                                            continue;
                                        }
                                        let xi = (((img * c + ic) * ins[0] + pos[0] as usize) * ins[1]
                                            + pos[1] as usize)
                                            * ins[2]
                                            + pos[2] as usize;
                                        let wi = (((oc * cg + ci) * ks[0] + kd) * ks[1] + kh) * ks[2] + kw;
                                        acc += xv[xi] * wv[wi];
                                    }
                                }
                            }
                        }
                        out.push(acc);
                    }
                }
            }
        }
    }
    let mut shape = vec![n, m];
    shape.extend_from_slice(&outs[3 - k..]);
    (shape, out)
}

/// numpy.matmul in f64, with 1-D promotion and batch broadcasting.
fn matmul_ref(a: &Tensor, b: &Tensor) -> (Vec<usize>, Vec<f64>) {
    let (sa, sb) = (&a.shape, &b.shape);
    let (ab, m, k) = if sa.len() == 1 {
        (vec![], 1, sa[0])
    } else {
        (sa[..sa.len() - 2].to_vec(), sa[sa.len() - 2], sa[sa.len() - 1])
    };
    let (bb, n) = if sb.len() == 1 { (vec![], 1) } else { (sb[..sb.len() - 2].to_vec(), sb[sb.len() - 1]) };
    let rank = ab.len().max(bb.len());
    let dim = |v: &[usize], i: usize| if i + v.len() >= rank { v[i + v.len() - rank] } else { 1 };
    let batch: Vec<usize> = (0..rank).map(|i| dim(&ab, i).max(dim(&bb, i))).collect();
    let (av, bv) = (f64s(a), f64s(b));
    let nb: usize = batch.iter().product();
    let mut out = Vec::new();
    for flat in 0..nb {
        // Index into each operand's own batch dims, broadcasting unit dims.
        let mut rem = flat;
        let (mut ia, mut ib, mut stride_a, mut stride_b) = (0, 0, 1, 1);
        for i in (0..rank).rev() {
            let idx = rem % batch[i];
            rem /= batch[i];
            let (da, db) = (dim(&ab, i), dim(&bb, i));
            ia += if da == 1 { 0 } else { idx * stride_a };
            ib += if db == 1 { 0 } else { idx * stride_b };
            stride_a *= da;
            stride_b *= db;
        }
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for kk in 0..k {
                    acc += av[ia * m * k + i * k + kk] * bv[ib * k * n + kk * n + j];
                }
                out.push(acc);
            }
        }
    }
    let mut shape = batch;
    if sa.len() > 1 {
        shape.push(m);
    }
    if sb.len() > 1 {
        shape.push(n);
    }
    (shape, out)
}

/// Gemm in f64: alpha * op(A) @ op(B) + beta * C, C broadcast to (M, N).
fn gemm_ref(
    a: &Tensor,
    b: &Tensor,
    c: Option<&Tensor>,
    alpha: f64,
    beta: f64,
    ta: bool,
    tb: bool,
) -> (Vec<usize>, Vec<f64>) {
    let (m, k) = if ta { (a.shape[1], a.shape[0]) } else { (a.shape[0], a.shape[1]) };
    let n = if tb { b.shape[0] } else { b.shape[1] };
    let (av, bv) = (f64s(a), f64s(b));
    let cv = c.map(|c| (f64s(c), c.shape.clone()));
    let mut out = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0;
            for kk in 0..k {
                let x = if ta { av[kk * m + i] } else { av[i * k + kk] };
                let y = if tb { bv[j * k + kk] } else { bv[kk * n + j] };
                acc += x * y;
            }
            let mut v = alpha * acc;
            if let Some((cv, cs)) = &cv {
                let (ci, cj) = match cs.len() {
                    0 => (0, 0),
                    1 => (0, if cs[0] == 1 { 0 } else { j }),
                    _ => (if cs[0] == 1 { 0 } else { i }, if cs[1] == 1 { 0 } else { j }),
                };
                let cols = if cs.len() == 2 { cs[1] } else { 1 };
                let idx = if cs.len() == 1 { cj } else { ci * cols + cj };
                v += beta * cv[idx];
            }
            out.push(v);
        }
    }
    (vec![m, n], out)
}

// ---------------------------------------------------------------------------------------------
// Conv
// ---------------------------------------------------------------------------------------------

struct ConvCase {
    name: &'static str,
    x: Vec<usize>,
    w: Vec<usize>,
    bias: bool,
    group: usize,
    strides: Option<Vec<usize>>,
    dilations: Option<Vec<usize>>,
    /// ONNX order: all begins, then all ends.
    pads: Option<Vec<usize>>,
    auto_pad: Option<&'static str>,
    /// Pads the reference applies when `auto_pad` is set, (begin, end) per dim.
    ref_pads: Option<Vec<(usize, usize)>>,
    w_runtime: bool,
}

impl ConvCase {
    fn new(name: &'static str, x: &[usize], w: &[usize]) -> ConvCase {
        ConvCase {
            name,
            x: x.to_vec(),
            w: w.to_vec(),
            bias: false,
            group: 1,
            strides: None,
            dilations: None,
            pads: None,
            auto_pad: None,
            ref_pads: None,
            w_runtime: false,
        }
    }
    fn bias(mut self) -> Self {
        self.bias = true;
        self
    }
    fn group(mut self, g: usize) -> Self {
        self.group = g;
        self
    }
    fn strides(mut self, s: &[usize]) -> Self {
        self.strides = Some(s.to_vec());
        self
    }
    fn dilations(mut self, d: &[usize]) -> Self {
        self.dilations = Some(d.to_vec());
        self
    }
    fn pads(mut self, p: &[usize]) -> Self {
        self.pads = Some(p.to_vec());
        self
    }
    fn auto_pad(mut self, mode: &'static str, pads: &[(usize, usize)]) -> Self {
        self.auto_pad = Some(mode);
        self.ref_pads = Some(pads.to_vec());
        self
    }
    fn w_runtime(mut self) -> Self {
        self.w_runtime = true;
        self
    }

    fn run(&self, ctx: &GpuContext, seed: u64) {
        let k = self.x.len() - 2;
        let x = runtime(&self.x, seed);
        let mut w = weight(&self.w, seed + 1);
        w.runtime = self.w_runtime;
        let b = weight(&[self.w[0]], seed + 2);
        let mut attrs = vec![("kernel_shape", ints(&self.w[2..].iter().map(|&v| v as i64).collect::<Vec<_>>()))];
        let as_i64 = |v: &[usize]| ints(&v.iter().map(|&x| x as i64).collect::<Vec<_>>());
        if self.group != 1 {
            attrs.push(("group", Attr::Int(self.group as i64)));
        }
        if let Some(s) = &self.strides {
            attrs.push(("strides", as_i64(s)));
        }
        if let Some(d) = &self.dilations {
            attrs.push(("dilations", as_i64(d)));
        }
        if let Some(p) = &self.pads {
            attrs.push(("pads", as_i64(p)));
        }
        if let Some(m) = self.auto_pad {
            attrs.push(("auto_pad", Attr::String(m.into())));
        }
        let feeds = [Some(&x), Some(&w), if self.bias { Some(&b) } else { None }];
        let got = run_node(ctx, "Conv", &attrs, &feeds).unwrap_or_else(|e| panic!("{}: {e}", self.name));
        let pads = match (&self.ref_pads, &self.pads) {
            (Some(r), _) => r.clone(),
            (None, Some(p)) => (0..k).map(|d| (p[d], p[d + k])).collect(),
            (None, None) => vec![(0, 0); k],
        };
        let spec = ConvSpec {
            group: self.group,
            strides: self.strides.clone().unwrap_or(vec![1; k]),
            dilations: self.dilations.clone().unwrap_or(vec![1; k]),
            pads,
        };
        let (shape, want) = conv_ref(&x.t, &w.t, self.bias.then_some(&b.t), &spec);
        check(self.name, &got, &shape, &want);
    }
}

fn run_conv_cases(cases: &[ConvCase]) {
    let Some(ctx) = common::gpu() else { return };
    for (i, c) in cases.iter().enumerate() {
        c.run(&ctx, 100 + 10 * i as u64);
    }
}

#[test]
fn conv_grouped() {
    run_conv_cases(&[
        ConvCase::new("group 2, pad 1, bias", &[2, 8, 9, 10], &[6, 4, 3, 3]).group(2).pads(&[1, 1, 1, 1]).bias(),
        ConvCase::new("group 4, stride 2", &[1, 8, 7, 7], &[8, 2, 3, 3]).group(4).strides(&[2, 2]),
        ConvCase::new("group 2, 1x1 via matmul, bias", &[2, 6, 5, 4], &[4, 3, 1, 1]).group(2).bias(),
    ]);
}

#[test]
fn conv_depthwise() {
    run_conv_cases(&[
        ConvCase::new("depthwise 3x3 stride 1 pad 1, bias", &[2, 6, 9, 9], &[6, 1, 3, 3])
            .group(6)
            .pads(&[1, 1, 1, 1])
            .bias(),
        ConvCase::new("depthwise 3x3 stride 2 pad 1", &[1, 5, 10, 11], &[5, 1, 3, 3])
            .group(5)
            .strides(&[2, 2])
            .pads(&[1, 1, 1, 1]),
        ConvCase::new("depthwise multiplier 2, bias", &[1, 3, 6, 7], &[6, 1, 3, 3]).group(3).pads(&[1, 1, 1, 1]).bias(),
        ConvCase::new("depthwise 5x5 dilated", &[1, 4, 12, 12], &[4, 1, 5, 5])
            .group(4)
            .dilations(&[2, 2])
            .pads(&[4, 4, 4, 4]),
    ]);
}

#[test]
fn conv_strides_dilations_pads() {
    run_conv_cases(&[
        ConvCase::new("dilated, pad 2", &[1, 3, 11, 12], &[4, 3, 3, 3]).dilations(&[2, 3]).pads(&[2, 2, 2, 2]).bias(),
        ConvCase::new("strided 2x3", &[2, 3, 11, 13], &[5, 3, 3, 3]).strides(&[2, 3]),
        ConvCase::new("asymmetric pads", &[1, 2, 7, 8], &[3, 2, 3, 2]).pads(&[0, 1, 2, 1]).bias(),
        ConvCase::new("strided with asymmetric pads", &[1, 3, 9, 9], &[4, 3, 4, 3])
            .strides(&[3, 2])
            .pads(&[1, 0, 2, 1]),
        ConvCase::new("no padding", &[1, 1, 5, 5], &[1, 1, 3, 3]),
    ]);
}

#[test]
fn conv_auto_pad() {
    run_conv_cases(&[
        // in 7, stride 2: out 4, total pad (3 * 2 + 3 - 7) = 2 -> 1/1; in 8: out 4, total 1.
        ConvCase::new("SAME_UPPER stride 2", &[1, 2, 7, 8], &[3, 2, 3, 3])
            .strides(&[2, 2])
            .auto_pad("SAME_UPPER", &[(1, 1), (0, 1)]),
        ConvCase::new("SAME_LOWER stride 2", &[1, 2, 7, 8], &[3, 2, 3, 3])
            .strides(&[2, 2])
            .auto_pad("SAME_LOWER", &[(1, 1), (1, 0)]),
        ConvCase::new("SAME_UPPER even kernel", &[1, 2, 5, 6], &[2, 2, 2, 2]).auto_pad("SAME_UPPER", &[(0, 1), (0, 1)]),
        ConvCase::new("VALID stride 2", &[1, 2, 8, 9], &[3, 2, 3, 3])
            .strides(&[2, 2])
            .auto_pad("VALID", &[(0, 0), (0, 0)]),
    ]);
}

#[test]
fn conv_pointwise() {
    run_conv_cases(&[
        // Routed to the matmul kernel: M = 37, N = 42, K = 19 (no dim a multiple of the tile).
        ConvCase::new("1x1 via matmul, bias", &[2, 19, 6, 7], &[37, 19, 1, 1]).bias(),
        ConvCase::new("1x1 via matmul, no bias", &[1, 5, 3, 3], &[2, 5, 1, 1]),
        // Stride 2 (and padding) rule out the matmul route: implicit GEMM.
        ConvCase::new("1x1 stride 2", &[2, 8, 7, 7], &[5, 8, 1, 1]).strides(&[2, 2]).bias(),
        ConvCase::new("1x1 pad 1", &[1, 4, 3, 3], &[3, 4, 1, 1]).pads(&[1, 1, 1, 1]),
    ]);
}

#[test]
fn conv_1d_3d_and_runtime_weights() {
    run_conv_cases(&[
        ConvCase::new("1-D", &[2, 3, 20], &[4, 3, 5]).strides(&[2]).dilations(&[2]).pads(&[2, 1]).bias(),
        ConvCase::new("1-D depthwise", &[1, 4, 9], &[4, 1, 3]).group(4).pads(&[1, 1]),
        ConvCase::new("3-D", &[1, 2, 5, 6, 7], &[3, 2, 3, 2, 3]).pads(&[1, 0, 1, 1, 1, 0]).strides(&[1, 2, 1]).bias(),
        ConvCase::new("3-D depthwise", &[1, 3, 4, 5, 5], &[3, 1, 3, 3, 3]).group(3).pads(&[1, 1, 1, 1, 1, 1]),
        ConvCase::new("W as a runtime input", &[1, 3, 6, 6], &[4, 3, 3, 3]).pads(&[1, 1, 1, 1]).w_runtime().bias(),
        ConvCase::new("1x1 W as a runtime input", &[1, 3, 4, 4], &[5, 3, 1, 1]).w_runtime(),
    ]);
}

#[test]
fn conv_larger_than_a_tile() {
    run_conv_cases(&[
        // M = 70 > 64, N = 10 * 10 = 100 > 64, K = 8 * 9 = 72 > 16, two images.
        ConvCase::new("implicit GEMM over several tiles", &[2, 8, 10, 10], &[70, 8, 3, 3]).pads(&[1, 1, 1, 1]).bias(),
        // Matmul route: M = 70, N = 81, K = 40.
        ConvCase::new("1x1 over several tiles", &[1, 40, 9, 9], &[70, 40, 1, 1]).bias(),
    ]);
}

#[gpu_test]
fn conv_rejects_bad_models(ctx: GpuContext) {
    let x = runtime(&[1, 3, 5, 5], 1);
    let w = weight(&[4, 3, 3, 3], 2);
    let e = run_node(&ctx, "Conv", &[("kernel_shape", ints(&[2, 2]))], &[Some(&x), Some(&w)]).unwrap_err();
    assert!(e.contains("kernel_shape"), "{e}");
    let e = run_node(&ctx, "Conv", &[("group", Attr::Int(2))], &[Some(&x), Some(&w)]).unwrap_err();
    assert!(e.contains("group"), "{e}");
    let b = weight(&[3], 3);
    let e = run_node(&ctx, "Conv", &[], &[Some(&x), Some(&w), Some(&b)]).unwrap_err();
    assert!(e.contains("bias"), "{e}");
    let e = run_node(&ctx, "Conv", &[("auto_pad", Attr::String("SAME".into()))], &[Some(&x), Some(&w)]).unwrap_err();
    assert!(e.contains("auto_pad"), "{e}");
    let x4 = runtime(&[1, 1, 2, 2, 2, 2], 1);
    let w4 = weight(&[1, 1, 1, 1, 1, 1], 2);
    let e = run_node(&ctx, "Conv", &[], &[Some(&x4), Some(&w4)]).unwrap_err();
    assert!(e.contains("spatial dims"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// MatMul and Gemm
// ---------------------------------------------------------------------------------------------

fn matmul_case(ctx: &GpuContext, name: &str, a: &[usize], b: &[usize], b_runtime: bool, seed: u64) {
    let fa = runtime(a, seed);
    let mut fb = weight(b, seed + 1);
    fb.runtime = b_runtime;
    let got = run_node(ctx, "MatMul", &[], &[Some(&fa), Some(&fb)]).unwrap_or_else(|e| panic!("{name}: {e}"));
    let (shape, want) = matmul_ref(&fa.t, &fb.t);
    check(name, &got, &shape, &want);
}

#[gpu_test]
fn matmul_shapes(ctx: GpuContext) {
    matmul_case(&ctx, "37x19 @ 19x45", &[37, 19], &[19, 45], true, 1);
    matmul_case(&ctx, "several tiles: 130x40 @ 40x70", &[130, 40], &[40, 70], false, 2);
    matmul_case(&ctx, "K = 1", &[5, 1], &[1, 6], true, 3);
    matmul_case(&ctx, "1-D @ 1-D", &[19], &[19], true, 4);
    matmul_case(&ctx, "1-D @ 3-D", &[7], &[2, 7, 3], true, 5);
    matmul_case(&ctx, "3-D @ 1-D", &[2, 3, 7], &[7], false, 6);
    matmul_case(&ctx, "2-D @ 1-D", &[37, 19], &[19], true, 7);
}

#[gpu_test]
fn matmul_broadcast_batches(ctx: GpuContext) {
    matmul_case(&ctx, "[2,1,5,7] @ [3,7,6]", &[2, 1, 5, 7], &[3, 7, 6], true, 11);
    matmul_case(&ctx, "[3,5,7] @ [7,6] (weight shared across the batch)", &[3, 5, 7], &[7, 6], false, 12);
    matmul_case(&ctx, "[5,7] @ [2,3,7,6]", &[5, 7], &[2, 3, 7, 6], true, 13);
    matmul_case(&ctx, "[2,3,4,5,3,4] @ [3,1,5,4,2] (5 batch dims)", &[2, 3, 4, 5, 3, 4], &[3, 1, 5, 4, 2], true, 14);
    matmul_case(&ctx, "[4,1,37,19] @ [1,3,19,45]", &[4, 1, 37, 19], &[1, 3, 19, 45], true, 15);
}

struct GemmCase {
    name: &'static str,
    a: Vec<usize>,
    b: Vec<usize>,
    c: Option<Vec<usize>>,
    alpha: Option<f32>,
    beta: Option<f32>,
    ta: bool,
    tb: bool,
}

fn gemm(name: &'static str, a: &[usize], b: &[usize]) -> GemmCase {
    GemmCase { name, a: a.to_vec(), b: b.to_vec(), c: None, alpha: None, beta: None, ta: false, tb: false }
}

impl GemmCase {
    fn c(mut self, c: &[usize]) -> Self {
        self.c = Some(c.to_vec());
        self
    }
    fn alpha(mut self, v: f32) -> Self {
        self.alpha = Some(v);
        self
    }
    fn beta(mut self, v: f32) -> Self {
        self.beta = Some(v);
        self
    }
    fn ta(mut self) -> Self {
        self.ta = true;
        self
    }
    fn tb(mut self) -> Self {
        self.tb = true;
        self
    }

    fn run(&self, ctx: &GpuContext, seed: u64) {
        let a = runtime(&self.a, seed);
        let b = weight(&self.b, seed + 1);
        let c = self.c.as_ref().map(|s| weight(s, seed + 2));
        let mut attrs = Vec::new();
        if let Some(v) = self.alpha {
            attrs.push(("alpha", Attr::Float(v)));
        }
        if let Some(v) = self.beta {
            attrs.push(("beta", Attr::Float(v)));
        }
        if self.ta {
            attrs.push(("transA", Attr::Int(1)));
        }
        if self.tb {
            attrs.push(("transB", Attr::Int(1)));
        }
        let got = run_node(ctx, "Gemm", &attrs, &[Some(&a), Some(&b), c.as_ref()])
            .unwrap_or_else(|e| panic!("{}: {e}", self.name));
        let (alpha, beta) = (self.alpha.unwrap_or(1.0) as f64, self.beta.unwrap_or(1.0) as f64);
        let (shape, want) = gemm_ref(&a.t, &b.t, c.as_ref().map(|c| &c.t), alpha, beta, self.ta, self.tb);
        check(self.name, &got, &shape, &want);
    }
}

/// Products of at most 16 rows run `matmul_rows` (one invocation per column), larger ones the
/// 64×64 tiles of `matmul_main`: both sides of the boundary, with every attribute the rows
/// kernel must honour (transposes, alpha, beta, broadcast C, batches).
#[gpu_test]
fn matmul_rows_kernel_and_tiles_on_both_sides_of_16_rows(ctx: GpuContext) {
    matmul_case(&ctx, "1 row: a classifier at batch 1", &[1, 300], &[300, 270], false, 31);
    matmul_case(&ctx, "16 rows", &[16, 33], &[33, 300], true, 32);
    matmul_case(&ctx, "17 rows", &[17, 33], &[33, 300], true, 33);
    matmul_case(&ctx, "batched rows", &[3, 2, 9], &[9, 260], true, 34);
    let cases = [
        gemm("1 row, transB, bias (batch-1 fully connected)", &[1, 130], &[300, 130]).tb().c(&[300]),
        gemm("16 rows, transA transB alpha beta", &[19, 16], &[45, 19]).ta().tb().alpha(0.5).beta(-2.0).c(&[16, 1]),
        gemm("17 rows, transA transB alpha beta", &[19, 17], &[45, 19]).ta().tb().alpha(0.5).beta(-2.0).c(&[17, 1]),
        gemm("3 rows, C [3, N]", &[3, 5], &[5, 7]).c(&[3, 7]).beta(0.25),
    ];
    for (i, c) in cases.iter().enumerate() {
        c.run(&ctx, 400 + 10 * i as u64);
    }
}

#[gpu_test]
fn gemm_attributes_and_bias_broadcasts(ctx: GpuContext) {
    let cases = [
        gemm("plain, no C", &[37, 19], &[19, 45]),
        gemm("transA", &[19, 37], &[19, 45]).ta().c(&[45]),
        gemm("transB", &[37, 19], &[45, 19]).tb().c(&[37, 45]),
        gemm("transA transB alpha beta", &[19, 37], &[45, 19]).ta().tb().alpha(0.5).beta(-2.0).c(&[37, 1]),
        gemm("C [1, N]", &[6, 5], &[5, 7]).c(&[1, 7]),
        gemm("C scalar", &[6, 5], &[5, 7]).c(&[]).beta(3.0),
        gemm("C [1]", &[6, 5], &[5, 7]).c(&[1]),
        gemm("beta 0 drops C", &[6, 5], &[5, 7]).c(&[6, 7]).beta(0.0).alpha(2.0),
        gemm("several tiles, transB (a fully connected layer)", &[70, 130], &[80, 130]).tb().c(&[80]),
    ];
    for (i, c) in cases.iter().enumerate() {
        c.run(&ctx, 200 + 10 * i as u64);
    }
}

/// Products of more than 16 rows run `matmul_main`'s 64×64 tiles through workgroup memory, or on
/// a CPU adapter (lavapipe, so every other test here) `matmul_direct`, the same grid without
/// workgroup memory (`GpuContext::variant`); implicit-GEMM convolutions `conv_gemm` or
/// `conv_gemm_direct` likewise, bias-free depthwise ones `conv_depthwise_plain` or
/// `conv_depthwise_rows` (picked by the lowering, `Lowering::cpu_kernels`). Both against the references: strides, transposes, alpha and
/// beta, broadcast batches and C, several tiles, 1x1 convolutions with and without a bias;
/// groups, strides, dilations, padding, 1-D and 3-D convolutions over several tiles.
#[gpu_test]
fn tiled_and_direct_gemm_kernels_agree_with_the_references(ctx: GpuContext) {
    use acclimate::gpu::KernelKey;
    for cpu in [false, true] {
        ctx.set_cpu_kernels(Some(cpu));
        let entry = ctx.variant(&KernelKey::new(Shader::Matmul, "matmul_main")).entry;
        assert_eq!(entry, if cpu { "matmul_direct" } else { "matmul_main" });
        let entry = ctx.variant(&KernelKey::new(Shader::Conv, "conv_gemm")).entry;
        assert_eq!(entry, if cpu { "conv_gemm_direct" } else { "conv_gemm" });
        let seed = if cpu { 1000 } else { 2000 };
        matmul_case(&ctx, "several tiles: 130x40 @ 40x70", &[130, 40], &[40, 70], false, seed);
        matmul_case(&ctx, "[4,1,37,19] @ [1,3,19,45]", &[4, 1, 37, 19], &[1, 3, 19, 45], true, seed + 1);
        let cases = [
            gemm("17 rows, transA transB alpha beta", &[19, 17], &[45, 19]).ta().tb().alpha(0.5).beta(-2.0).c(&[17, 1]),
            gemm("several tiles, transB", &[70, 130], &[80, 130]).tb().c(&[80]),
            gemm("C [1, N]", &[66, 5], &[5, 7]).c(&[1, 7]),
        ];
        for (i, c) in cases.iter().enumerate() {
            c.run(&ctx, seed + 10 + i as u64);
        }
        ConvCase::new("1x1 over several tiles", &[2, 40, 9, 9], &[70, 40, 1, 1]).bias().run(&ctx, seed + 20);
        ConvCase::new("1x1, M = 37", &[1, 19, 6, 7], &[37, 19, 1, 1]).run(&ctx, seed + 21);
        let convs = [
            ConvCase::new("implicit GEMM over several tiles", &[2, 8, 10, 10], &[70, 8, 3, 3])
                .pads(&[1, 1, 1, 1])
                .bias(),
            ConvCase::new("group 2, pad 1, bias", &[2, 8, 9, 10], &[6, 4, 3, 3]).group(2).pads(&[1, 1, 1, 1]).bias(),
            ConvCase::new("strided with asymmetric pads", &[1, 3, 9, 9], &[4, 3, 4, 3])
                .strides(&[3, 2])
                .pads(&[1, 0, 2, 1]),
            ConvCase::new("dilated, pad 2", &[1, 3, 11, 12], &[4, 3, 3, 3])
                .dilations(&[2, 3])
                .pads(&[2, 2, 2, 2])
                .bias(),
            ConvCase::new("1-D", &[2, 3, 20], &[4, 3, 5]).strides(&[2]).dilations(&[2]).pads(&[2, 1]).bias(),
            ConvCase::new("3-D", &[1, 2, 5, 6, 7], &[3, 2, 3, 2, 3])
                .pads(&[1, 0, 1, 1, 1, 0])
                .strides(&[1, 2, 1])
                .bias(),
            // Bias-free depthwise: conv_depthwise_plain, or conv_depthwise_rows on a CPU adapter.
            ConvCase::new("depthwise 3x3 stride 2 pad 1", &[1, 5, 10, 11], &[5, 1, 3, 3])
                .group(5)
                .strides(&[2, 2])
                .pads(&[1, 1, 1, 1]),
            ConvCase::new("depthwise 5x5 dilated", &[2, 4, 12, 13], &[4, 1, 5, 5])
                .group(4)
                .dilations(&[2, 2])
                .pads(&[4, 4, 4, 4]),
            ConvCase::new("depthwise multiplier 2", &[1, 3, 6, 7], &[6, 1, 3, 3]).group(3).pads(&[1, 1, 1, 1]),
            ConvCase::new("1-D depthwise", &[1, 4, 9], &[4, 1, 3]).group(4).pads(&[1, 1]),
            ConvCase::new("3-D depthwise", &[1, 3, 4, 5, 5], &[3, 1, 3, 3, 3]).group(3).pads(&[1, 1, 1, 1, 1, 1]),
        ];
        for (i, c) in convs.iter().enumerate() {
            c.run(&ctx, seed + 30 + i as u64);
        }
    }
}

#[gpu_test]
fn gemm_and_matmul_reject_bad_shapes(ctx: GpuContext) {
    let a = runtime(&[3, 4], 1);
    let b = weight(&[5, 6], 2);
    let e = run_node(&ctx, "MatMul", &[], &[Some(&a), Some(&b)]).unwrap_err();
    assert!(e.contains("inner dimensions"), "{e}");
    let e = run_node(&ctx, "Gemm", &[], &[Some(&a), Some(&b)]).unwrap_err();
    assert!(e.contains("inner dimensions"), "{e}");
    let b = weight(&[4, 6], 2);
    let c = weight(&[2, 6], 3);
    let e = run_node(&ctx, "Gemm", &[], &[Some(&a), Some(&b), Some(&c)]).unwrap_err();
    assert!(e.contains("does not broadcast"), "{e}");
    let a3 = runtime(&[2, 3, 4], 1);
    let e = run_node(&ctx, "Gemm", &[], &[Some(&a3), Some(&b)]).unwrap_err();
    assert!(e.contains("2-D"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Shaders (no GPU needed)
// ---------------------------------------------------------------------------------------------

/// naga parses and validates both shaders, and they stay inside the limits mobile GPUs guarantee
/// (16 KiB of workgroup memory).
#[test]
fn shaders_validate() {
    for shader in [Shader::Conv, Shader::Matmul] {
        let module = naga::front::wgsl::parse_str(shader.source())
            .unwrap_or_else(|e| panic!("{}: {}", shader.file_name(), e.emit_to_string(shader.source())));
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}: {e:?}", shader.file_name()));
        let workgroup_bytes: u32 = module
            .global_variables
            .iter()
            .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
            .map(|(_, g)| module.types[g.ty].inner.size(module.to_ctx()))
            .sum();
        assert!(workgroup_bytes <= 16 * 1024, "{}: {workgroup_bytes} bytes of workgroup memory", shader.file_name());
    }
}
