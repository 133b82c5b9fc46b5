//! Reverse pass of Conv, Gemm and MatMul (data gradients through frozen weights) against f64
//! central finite differences.
//!
//! Every case builds the family's `BackwardLowering` by hand, runs its dispatches through
//! `plan::standalone::run_dispatches`, and compares each requested dL/dX_j with
//! (L(x + h e_i) - L(x - h e_i)) / 2h, where L = Σ r ⊙ f(x) is evaluated in f64 on the CPU and r is
//! the output gradient fed to the GPU. Tolerance: |gpu - fd| <= 1e-3 max|fd| + 1e-4 (f32 GPU).
//!
//! Each case runs its backward twice in one submission: once overwriting a NaN-filled gradient
//! buffer (so a position the kernel forgets to write fails) and once with `accumulate` into a
//! buffer pre-filled with known values (which must end up as prefill + gradient). The whole
//! submission is then repeated and must give bit-identical results (no atomics, fixed order),
//! and run once more with every dispatch that may be split along z recorded in pieces of one z
//! workgroup (what a paced step does), which must give the same bits.

mod common;

use common::f64s;

use std::collections::BTreeMap;
use std::sync::Arc;

use acclimate::onnx::Attr;
use acclimate::ops::conv::ConvAttrs;
use acclimate::ops::matmul::GemmAttrs;
use acclimate::ops::{Attrs, BackwardLowering, BufRef, GradInput, OpReason, Operand};
use acclimate::plan::standalone::run_dispatches;
use acclimate::{GpuContext, Tensor};
use acclimate_test_macros::gpu_test;

const H: f64 = 1e-3;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// One forward input of the op under test.
struct In {
    shape: Vec<usize>,
    data: Vec<f32>,
    /// A constant (frozen weight) is bound as a `Weight` buffer and carries its value; otherwise
    /// it is a runtime `Value`.
    constant: bool,
}

fn runtime_in(shape: &[usize], seed: u64) -> In {
    let n = shape.iter().product();
    In { shape: shape.to_vec(), data: common::random_f32(n, seed, -1.0, 1.0), constant: false }
}

fn const_in(shape: &[usize], seed: u64) -> In {
    In { constant: true, ..runtime_in(shape, seed) }
}

type Backward<'a> = dyn Fn(&mut BackwardLowering) -> acclimate::ops::OpResult<()> + 'a;

/// The reverse-pass context of one node: runtime inputs are values 0.. and constants weights 0..
/// in input order; `grads` lists (input, gradient buffer, accumulate).
fn lowering(ins: &[In], out_shape: &[usize], dy: BufRef, grads: &[(usize, BufRef, bool)]) -> BackwardLowering {
    let (mut v, mut w) = (0, 0);
    let inputs = ins
        .iter()
        .map(|i| {
            let (buf, value) = if i.constant {
                w += 1;
                (BufRef::Weight(w - 1), Some(Arc::new(Tensor::f32(i.shape.clone(), i.data.clone()))))
            } else {
                v += 1;
                (BufRef::Value(v - 1), None)
            };
            Some(Operand { buf, shape: i.shape.clone(), value })
        })
        .collect();
    let mut grad_inputs = vec![None; ins.len()];
    for &(j, buf, accumulate) in grads {
        grad_inputs[j] = Some(GradInput { buf, shape: ins[j].shape.clone(), accumulate });
    }
    BackwardLowering {
        node: "under_test".into(),
        inputs,
        // The forward output is never read by these reverse passes; an unbound buffer would fail.
        outputs: vec![Operand { buf: BufRef::Value(10_000), shape: out_shape.to_vec(), value: None }],
        grad_outputs: vec![Some(Operand { buf: dy, shape: out_shape.to_vec(), value: None })],
        grad_inputs,
        dispatches: Vec::new(),
        scratch: Vec::new(),
        max_workgroup_storage: 16384,
        max_invocations: 256,
        cpu_kernels: false,
    }
}

/// Runs `backward` for every `(input, finite differences)` of `want` (overwrite and accumulate)
/// and checks the gradients.
fn check_backward(
    ctx: &GpuContext,
    case: &str,
    ins: &[In],
    out_shape: &[usize],
    r: &[f32],
    want: &[(usize, Vec<f64>)],
    backward: &Backward<'_>,
) {
    let runtime: Vec<&In> = ins.iter().filter(|i| !i.constant).collect();
    let mut values: Vec<Vec<f32>> = runtime.iter().map(|i| i.data.clone()).collect();
    let weights: Vec<Vec<f32>> = ins.iter().filter(|i| i.constant).map(|i| i.data.clone()).collect();
    let dy = BufRef::Value(values.len());
    values.push(r.to_vec());
    let mut over = Vec::new();
    let mut accum = Vec::new();
    let mut prefills = Vec::new();
    for (n, &(j, _)) in want.iter().enumerate() {
        let len = ins[j].data.len();
        over.push((j, BufRef::Value(values.len()), false));
        values.push(vec![f32::NAN; len]);
        let pre = common::random_f32(len, 900 + n as u64, -2.0, 2.0);
        accum.push((j, BufRef::Value(values.len()), true));
        values.push(pre.clone());
        prefills.push(pre);
    }
    // The kernels the context runs: its CPU variants on lavapipe unless a test turned them off.
    let mut first = BackwardLowering { cpu_kernels: ctx.cpu_kernels(), ..lowering(ins, out_shape, dy, &over) };
    backward(&mut first).unwrap_or_else(|e| panic!("{case}: backward failed: {e}"));
    let mut second = BackwardLowering { cpu_kernels: ctx.cpu_kernels(), ..lowering(ins, out_shape, dy, &accum) };
    backward(&mut second).unwrap_or_else(|e| panic!("{case}: accumulating backward failed: {e}"));
    // Both lowerings number their scratch from 0: shift the second's past the first's.
    let shift = first.scratch.len();
    let mut dispatches = first.dispatches.clone();
    for mut d in second.dispatches.clone() {
        for b in &mut d.buffers {
            if let BufRef::Scratch(s) = b {
                *b = BufRef::Scratch(*s + shift);
            }
        }
        dispatches.push(d);
    }
    let scratch: Vec<u64> = first.scratch.iter().chain(&second.scratch).copied().collect();

    let mut results = values.clone();
    run_dispatches(ctx, &mut results, &weights, &scratch, &dispatches)
        .unwrap_or_else(|e| panic!("{case}: GPU run failed: {e}"));
    let mut again = values.clone();
    run_dispatches(ctx, &mut again, &weights, &scratch, &dispatches)
        .unwrap_or_else(|e| panic!("{case}: second GPU run failed: {e}"));

    // A paced step records the dispatches that may be split along z in pieces (one z workgroup
    // each here): they must compute bit for bit what the whole dispatches do.
    let pieces: Vec<_> = dispatches
        .iter()
        .flat_map(|d| match d.params.splits_along_z() {
            true => (0..d.workgroups[2])
                .map(|z| {
                    let mut part = d.clone();
                    part.params = d.params.z_piece(z, 1, d.workgroups[2]);
                    part.workgroups[2] = 1;
                    part
                })
                .collect(),
            false => vec![d.clone()],
        })
        .collect();
    if pieces.len() > dispatches.len() {
        let mut split = values.clone();
        run_dispatches(ctx, &mut split, &weights, &scratch, &pieces)
            .unwrap_or_else(|e| panic!("{case}: GPU run of the split dispatches failed: {e}"));
        for (i, (a, b)) in results.iter().zip(&split).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{case}: value {i} differs when the dispatches are split along z");
        }
    }

    for (n, (j, fd)) in want.iter().enumerate() {
        let scale = fd.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{case}: input {j} has an all-zero finite difference; the case tests nothing");
        let tol = 1e-3 * scale + 1e-4;
        let (o, a) = (value_index(over[n].1), value_index(accum[n].1));
        for (i, &f) in fd.iter().enumerate() {
            let got = results[o][i] as f64;
            assert!(
                (got - f).abs() <= tol,
                "{case}: dL/d input {j} element {i} is {got}, finite difference {f} (tolerance {tol:.2e})"
            );
            let got = results[a][i] as f64;
            let want = prefills[n][i] as f64 + f;
            assert!(
                (got - want).abs() <= tol + 1e-6,
                "{case}: accumulated dL/d input {j} element {i} is {got}, expected prefill + gradient {want}"
            );
        }
        for buf in [o, a] {
            let same = results[buf].iter().zip(&again[buf]).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{case}: gradient of input {j} differs between two identical runs");
        }
    }
}

fn value_index(b: BufRef) -> usize {
    match b {
        BufRef::Value(i) => i,
        other => panic!("gradient buffers are values, got {other:?}"),
    }
}

/// Central differences of `loss` with respect to `x` (all of it re-evaluated per element).
fn central_diff(x: &[f32], loss: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xs = f64s(x);
    (0..xs.len())
        .map(|i| {
            let x0 = xs[i];
            xs[i] = x0 + H;
            let up = loss(&xs);
            xs[i] = x0 - H;
            let down = loss(&xs);
            xs[i] = x0;
            (up - down) / (2.0 * H)
        })
        .collect()
}

fn dot(r: &[f32], y: &[f64]) -> f64 {
    r.iter().zip(y).map(|(&a, &b)| a as f64 * b).sum()
}

// ---------------------------------------------------------------------------------------------
// Conv
// ---------------------------------------------------------------------------------------------

/// Direct f64 convolution over 1 to 3 spatial dims (lifted to 3 with leading unit dims).
struct ConvRef {
    cin: usize,
    cout: usize,
    group: usize,
    spatial: usize,
    ins: [usize; 3],
    ks: [usize; 3],
    st: [usize; 3],
    dl: [usize; 3],
    pb: [usize; 3],
    outs: [usize; 3],
}

fn lift(v: &[usize], fill: usize) -> [usize; 3] {
    let mut o = [fill; 3];
    o[3 - v.len()..].copy_from_slice(v);
    o
}

impl ConvRef {
    fn new(x: &[usize], w: &[usize], group: usize, st: &[usize], dl: &[usize], pads: &[(usize, usize)]) -> ConvRef {
        let spatial = x.len() - 2;
        let ins = lift(&x[2..], 1);
        let ks = lift(&w[2..], 1);
        let (st, dl) = (lift(st, 1), lift(dl, 1));
        let pb = lift(&pads.iter().map(|p| p.0).collect::<Vec<_>>(), 0);
        let pe = lift(&pads.iter().map(|p| p.1).collect::<Vec<_>>(), 0);
        let outs = std::array::from_fn(|d| (ins[d] + pb[d] + pe[d] - (ks[d] - 1) * dl[d] - 1) / st[d] + 1);
        ConvRef { cin: x[1], cout: w[0], group, spatial, ins, ks, st, dl, pb, outs }
    }

    fn out_shape(&self, batch: usize) -> Vec<usize> {
        let mut s = vec![batch, self.cout];
        s.extend_from_slice(&self.outs[3 - self.spatial..]);
        s
    }

    fn y_at(&self, x: &[f64], w: &[f64], img: usize, oc: usize, o: [usize; 3]) -> f64 {
        let cg = self.cin / self.group;
        let g = oc / (self.cout / self.group);
        let mut acc = 0.0;
        for c in 0..cg {
            let ic = g * cg + c;
            for kd in 0..self.ks[0] {
                for kh in 0..self.ks[1] {
                    for kw in 0..self.ks[2] {
                        let k = [kd, kh, kw];
                        let pos: [isize; 3] = std::array::from_fn(|d| {
                            (o[d] * self.st[d] + k[d] * self.dl[d]) as isize - self.pb[d] as isize
                        });
                        if (0..3).any(|d| pos[d] < 0 || pos[d] >= self.ins[d] as isize) {
                            continue;
                        }
                        let xi = (((img * self.cin + ic) * self.ins[0] + pos[0] as usize) * self.ins[1]
                            + pos[1] as usize)
                            * self.ins[2]
                            + pos[2] as usize;
                        let wi = (((oc * cg + c) * self.ks[0] + kd) * self.ks[1] + kh) * self.ks[2] + kw;
                        acc += x[xi] * w[wi];
                    }
                }
            }
        }
        acc
    }

    /// Central differences of L = Σ r ⊙ conv(x) with respect to x. Only the outputs whose window
    /// can contain x_i are re-evaluated (the others do not change), which keeps the 70-channel
    /// case fast; the window test is a plain bounds check, independent of the GPU's phase logic.
    fn fd_dx(&self, x: &[f32], w: &[f32], r: &[f32]) -> Vec<f64> {
        let mut xs = f64s(x);
        let wv = f64s(w);
        let plane = self.ins.iter().product::<usize>();
        let cout_g = self.cout / self.group;
        let cin_g = self.cin / self.group;
        (0..xs.len())
            .map(|i| {
                let (img, ci, p) = (i / (self.cin * plane), (i / plane) % self.cin, i % plane);
                let pos = [p / (self.ins[1] * self.ins[2]), (p / self.ins[2]) % self.ins[1], p % self.ins[2]];
                let range = |d: usize| {
                    let reach = pos[d] + self.pb[d];
                    let lo = reach.saturating_sub((self.ks[d] - 1) * self.dl[d]).div_ceil(self.st[d]);
                    let hi = (reach / self.st[d] + 1).min(self.outs[d]);
                    lo..hi.max(lo)
                };
                let g = ci / cin_g;
                let x0 = xs[i];
                let mut diff = 0.0;
                for oc in g * cout_g..(g + 1) * cout_g {
                    for od in range(0) {
                        for oh in range(1) {
                            for ow in range(2) {
                                let o = [od, oh, ow];
                                xs[i] = x0 + H;
                                let up = self.y_at(&xs, &wv, img, oc, o);
                                xs[i] = x0 - H;
                                let down = self.y_at(&xs, &wv, img, oc, o);
                                xs[i] = x0;
                                let ri = ((img * self.cout + oc) * self.outs[0] + od) * self.outs[1] * self.outs[2]
                                    + oh * self.outs[2]
                                    + ow;
                                diff += r[ri] as f64 * (up - down);
                            }
                        }
                    }
                }
                diff / (2.0 * H)
            })
            .collect()
    }
}

struct ConvCase {
    name: &'static str,
    x: Vec<usize>,
    w: Vec<usize>,
    group: usize,
    strides: Option<Vec<usize>>,
    dilations: Option<Vec<usize>>,
    /// ONNX order: all begins, then all ends.
    pads: Option<Vec<usize>>,
    /// auto_pad mode and the (begin, end) pads it implies, which the reference uses.
    auto_pad: Option<(&'static str, Vec<(usize, usize)>)>,
    w_runtime: bool,
}

fn conv(name: &'static str, x: &[usize], w: &[usize]) -> ConvCase {
    ConvCase {
        name,
        x: x.to_vec(),
        w: w.to_vec(),
        group: 1,
        strides: None,
        dilations: None,
        pads: None,
        auto_pad: None,
        w_runtime: false,
    }
}

fn ints(v: &[usize]) -> Attr {
    Attr::Ints(v.iter().map(|&x| x as i64).collect())
}

impl ConvCase {
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
    fn auto_pad(mut self, mode: &'static str, implied: &[(usize, usize)]) -> Self {
        self.auto_pad = Some((mode, implied.to_vec()));
        self
    }
    fn w_runtime(mut self) -> Self {
        self.w_runtime = true;
        self
    }

    fn attrs(&self) -> ConvAttrs {
        let mut m = BTreeMap::new();
        m.insert("group".to_string(), Attr::Int(self.group as i64));
        if let Some(s) = &self.strides {
            m.insert("strides".into(), ints(s));
        }
        if let Some(d) = &self.dilations {
            m.insert("dilations".into(), ints(d));
        }
        if let Some(p) = &self.pads {
            m.insert("pads".into(), ints(p));
        }
        if let Some((mode, _)) = &self.auto_pad {
            m.insert("auto_pad".into(), Attr::String(mode.to_string()));
        }
        ConvAttrs::parse(&Attrs::new(&m)).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    fn run(&self, ctx: &GpuContext, seed: u64) {
        let k = self.x.len() - 2;
        let x = runtime_in(&self.x, seed);
        let w = In { constant: !self.w_runtime, ..runtime_in(&self.w, seed + 1) };
        let pads: Vec<(usize, usize)> = match (&self.auto_pad, &self.pads) {
            (Some((_, implied)), _) => implied.clone(),
            (None, Some(p)) => (0..k).map(|d| (p[d], p[d + k])).collect(),
            (None, None) => vec![(0, 0); k],
        };
        let reference = ConvRef::new(
            &self.x,
            &self.w,
            self.group,
            self.strides.as_deref().unwrap_or(&vec![1; k]),
            self.dilations.as_deref().unwrap_or(&vec![1; k]),
            &pads,
        );
        let out_shape = reference.out_shape(self.x[0]);
        let r = common::random_f32(out_shape.iter().product(), seed + 2, -1.0, 1.0);
        let want = reference.fd_dx(&x.data, &w.data, &r);
        let attrs = self.attrs();
        let backward = |b: &mut BackwardLowering| acclimate::ops::conv::backward(&attrs, b);
        check_backward(ctx, self.name, &[x, w], &out_shape, &r, &[(0, want)], &backward);
    }
}

fn run_conv_cases(cases: &[ConvCase]) {
    let Some(ctx) = common::gpu() else { return };
    for (i, c) in cases.iter().enumerate() {
        c.run(&ctx, 100 * i as u64 + 7);
    }
}

#[test]
fn conv_grouped_and_dilated() {
    run_conv_cases(&[
        conv("two groups, pad 1", &[2, 4, 5, 5], &[6, 2, 3, 3]).group(2).pads(&[1, 1, 1, 1]),
        conv("dilation 2, pad 2", &[1, 3, 8, 7], &[4, 3, 3, 3]).dilations(&[2, 2]).pads(&[2, 2, 2, 2]),
        // gcd(dilation, stride) = 2: odd positions receive no tap at all (their gradient is 0).
        conv("stride 2 with dilation 2", &[1, 3, 9, 9], &[2, 3, 3, 3]).strides(&[2, 2]).dilations(&[2, 2]),
        // gcd = 1 with stride 3: each of the 3 phases meets a different tap.
        conv("stride 3 with dilation 2", &[1, 2, 10, 8], &[3, 2, 3, 2])
            .strides(&[3, 2])
            .dilations(&[2, 3])
            .pads(&[1, 0, 2, 1]),
    ]);
}

#[test]
fn conv_strided_with_asymmetric_and_auto_pads() {
    run_conv_cases(&[
        conv("stride (2, 3), asymmetric pads", &[2, 3, 7, 8], &[5, 3, 3, 2]).strides(&[2, 3]).pads(&[1, 0, 2, 1]),
        conv("SAME_UPPER stride 2", &[1, 2, 6, 7], &[3, 2, 4, 3])
            .strides(&[2, 2])
            .auto_pad("SAME_UPPER", &[(1, 1), (1, 1)]),
        conv("SAME_LOWER", &[1, 2, 5, 5], &[2, 2, 2, 2]).auto_pad("SAME_LOWER", &[(1, 0), (1, 0)]),
        // Windows that never reach the last rows and columns: their gradient must be written 0.
        conv("VALID stride 2 leaves a tail", &[1, 2, 8, 8], &[2, 2, 3, 3])
            .strides(&[2, 2])
            .auto_pad("VALID", &[(0, 0), (0, 0)]),
    ]);
}

#[test]
fn conv_depthwise() {
    run_conv_cases(&[
        conv("depthwise stride 2 pad 1", &[2, 4, 7, 7], &[4, 1, 3, 3]).group(4).strides(&[2, 2]).pads(&[1, 1, 1, 1]),
        conv("depthwise multiplier 2, dilation 2", &[1, 3, 6, 6], &[6, 1, 3, 3])
            .group(3)
            .dilations(&[2, 2])
            .pads(&[2, 1, 2, 1]),
        conv("depthwise 1-D stride 3 asymmetric", &[2, 3, 11], &[3, 1, 4]).group(3).strides(&[3]).pads(&[2, 0]),
        // Stride 1 everywhere: the UNIT_STRIDE kernel (no division per tap), MobileNetV2's usual case.
        conv("depthwise stride 1 pad 1", &[2, 5, 6, 7], &[5, 1, 3, 3]).group(5).pads(&[1, 1, 1, 1]),
        conv("depthwise 3-D stride 1", &[1, 2, 4, 5, 4], &[2, 1, 3, 3, 2]).group(2).pads(&[1, 1, 0, 1, 1, 1]),
    ]);
}

#[test]
fn conv_pointwise() {
    run_conv_cases(&[
        // The matmul route: dX = Wᵀ @ dY with W transposed by strides, batched over images and groups.
        conv("1x1 through matmul", &[2, 5, 3, 4], &[7, 5, 1, 1]),
        conv("1x1 grouped through matmul", &[2, 6, 3, 3], &[4, 3, 1, 1]).group(2),
        // Strided 1x1 goes through the implicit GEMM; positions no window reads get 0.
        conv("1x1 stride 2", &[1, 4, 5, 6], &[3, 4, 1, 1]).strides(&[2, 2]),
        conv("1x1 runtime weight", &[1, 3, 2, 5], &[4, 3, 1, 1]).w_runtime(),
    ]);
}

#[test]
fn conv_1d_and_3d() {
    run_conv_cases(&[
        conv("1-D stride 2 pad 1", &[2, 3, 9], &[4, 3, 3]).strides(&[2]).pads(&[1, 1]),
        conv("3-D strided", &[1, 2, 4, 5, 5], &[3, 2, 2, 3, 3]).strides(&[1, 2, 2]).pads(&[0, 1, 1, 1, 0, 1]),
    ]);
}

#[test]
fn conv_larger_than_a_tile() {
    // Cin = 70 spans two 64-row tiles of dX, 81 positions two 64-column tiles, K = 8 * 9 = 72
    // several 16-deep steps; the strided variant does the same per stride phase.
    run_conv_cases(&[
        conv("70 channels, 9x9", &[1, 70, 9, 9], &[8, 70, 3, 3]).pads(&[1, 1, 1, 1]),
        conv("70 channels, stride 2, 17x17", &[1, 70, 17, 17], &[6, 70, 3, 3]).strides(&[2, 2]).pads(&[1, 1, 1, 1]),
    ]);
}

/// The tiled reverse kernels (`conv_gemm_dx`, `matmul_main`), which real GPUs run, and their CPU
/// variants (`conv_gemm_dx_direct`, `matmul_direct`; `GpuContext::variant`), which lavapipe runs
/// in every other case here: strides with dilations (phases without taps), groups, several
/// tiles, the matmul route, 3-D.
#[gpu_test]
fn tiled_and_direct_reverse_kernels(ctx: GpuContext) {
    let cases = [
        conv("stride 2 with dilation 2", &[1, 3, 9, 9], &[2, 3, 3, 3]).strides(&[2, 2]).dilations(&[2, 2]),
        conv("stride 3 with dilation 2", &[1, 2, 10, 8], &[3, 2, 3, 2])
            .strides(&[3, 2])
            .dilations(&[2, 3])
            .pads(&[1, 0, 2, 1]),
        conv("two groups, pad 1", &[2, 4, 5, 5], &[6, 2, 3, 3]).group(2).pads(&[1, 1, 1, 1]),
        conv("70 channels, stride 2, 17x17", &[1, 70, 17, 17], &[6, 70, 3, 3]).strides(&[2, 2]).pads(&[1, 1, 1, 1]),
        conv("1x1 through matmul, 70 channels", &[2, 70, 3, 4], &[7, 70, 1, 1]),
        conv("3-D strided", &[1, 2, 4, 5, 5], &[3, 2, 2, 3, 3]).strides(&[1, 2, 2]).pads(&[0, 1, 1, 1, 0, 1]),
        // conv_depthwise_dx, or conv_depthwise_dx_rows on a CPU adapter.
        conv("depthwise stride 2 pad 1", &[2, 4, 7, 7], &[4, 1, 3, 3]).group(4).strides(&[2, 2]).pads(&[1, 1, 1, 1]),
        conv("depthwise multiplier 2, dilation 2", &[1, 3, 6, 6], &[6, 1, 3, 3])
            .group(3)
            .dilations(&[2, 2])
            .pads(&[2, 1, 2, 1]),
        conv("depthwise 1-D stride 3 asymmetric", &[2, 3, 11], &[3, 1, 4]).group(3).strides(&[3]).pads(&[2, 0]),
        conv("depthwise stride 1 pad 1", &[2, 5, 6, 7], &[5, 1, 3, 3]).group(5).pads(&[1, 1, 1, 1]),
        conv("depthwise 3-D stride 1", &[1, 2, 4, 5, 4], &[2, 1, 3, 3, 2]).group(2).pads(&[1, 1, 0, 1, 1, 1]),
    ];
    for cpu in [false, true] {
        ctx.set_cpu_kernels(Some(cpu));
        for (i, c) in cases.iter().enumerate() {
            c.run(&ctx, 100 * i as u64 + 7 + cpu as u64);
        }
    }
}

#[test]
fn conv_rejects_weight_gradients() {
    let case = conv("w", &[1, 2, 4, 4], &[3, 2, 3, 3]);
    let ins = [runtime_in(&case.x, 1), const_in(&case.w, 2)];
    let out = [1, 3, 2, 2];
    let mut b = lowering(&ins, &out, BufRef::Value(5), &[(0, BufRef::Value(6), false), (1, BufRef::Value(7), false)]);
    let e = acclimate::ops::conv::backward(&case.attrs(), &mut b).unwrap_err();
    assert!(matches!(&e, OpReason::Internal(r) if r.contains("weight") && r.contains("frozen")), "{e}");
    // A gradient buffer of the wrong shape is an error, not a silent out-of-bounds write.
    let mut b = lowering(&ins, &[1, 3, 3, 3], BufRef::Value(5), &[(0, BufRef::Value(6), false)]);
    assert!(acclimate::ops::conv::backward(&case.attrs(), &mut b).is_err());
}

// ---------------------------------------------------------------------------------------------
// Gemm
// ---------------------------------------------------------------------------------------------

struct GemmRef {
    alpha: f64,
    beta: f64,
    ta: bool,
    tb: bool,
    m: usize,
    k: usize,
    n: usize,
    c_shape: Vec<usize>,
}

impl GemmRef {
    fn y(&self, a: &[f64], b: &[f64], c: &[f64]) -> Vec<f64> {
        let (m, k, n) = (self.m, self.k, self.n);
        let mut out = Vec::with_capacity(m * n);
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for l in 0..k {
                    let av = if self.ta { a[l * m + i] } else { a[i * k + l] };
                    let bv = if self.tb { b[j * k + l] } else { b[l * n + j] };
                    acc += av * bv;
                }
                // C right-aligned to (m, n), unit dims broadcast.
                let cs = &self.c_shape;
                let (cr, cc) = match cs.len() {
                    0 => (1, 1),
                    1 => (1, cs[0]),
                    _ => (cs[0], cs[1]),
                };
                let ci = (if cr == 1 { 0 } else { i }) * cc + if cc == 1 { 0 } else { j };
                out.push(self.alpha * acc + self.beta * c[ci]);
            }
        }
        out
    }
}

#[allow(clippy::too_many_arguments)]
fn gemm_case(
    ctx: &GpuContext,
    name: &str,
    (m, k, n): (usize, usize, usize),
    ta: bool,
    tb: bool,
    alpha: f32,
    beta: f32,
    c_shape: &[usize],
    wanted: &[usize],
    seed: u64,
) {
    let a_shape = if ta { [k, m] } else { [m, k] };
    let b_shape = if tb { [n, k] } else { [k, n] };
    // What is not differentiated is a frozen constant, as in a real model.
    let make =
        |j: usize, shape: &[usize], s: u64| if wanted.contains(&j) { runtime_in(shape, s) } else { const_in(shape, s) };
    let ins = [make(0, &a_shape, seed), make(1, &b_shape, seed + 1), make(2, c_shape, seed + 2)];
    let reference = GemmRef { alpha: alpha as f64, beta: beta as f64, ta, tb, m, k, n, c_shape: c_shape.to_vec() };
    let r = common::random_f32(m * n, seed + 3, -1.0, 1.0);
    let (av, bv, cv) = (f64s(&ins[0].data), f64s(&ins[1].data), f64s(&ins[2].data));
    let want: Vec<(usize, Vec<f64>)> = wanted
        .iter()
        .map(|&j| match j {
            0 => (j, central_diff(&ins[0].data, |a| dot(&r, &reference.y(a, &bv, &cv)))),
            1 => (j, central_diff(&ins[1].data, |b| dot(&r, &reference.y(&av, b, &cv)))),
            _ => (j, central_diff(&ins[2].data, |c| dot(&r, &reference.y(&av, &bv, c)))),
        })
        .collect();
    let attrs = GemmAttrs { alpha, beta, trans_a: ta, trans_b: tb };
    let backward = |b: &mut BackwardLowering| acclimate::ops::matmul::backward_gemm(&attrs, b);
    check_backward(ctx, name, &ins, &[m, n], &r, &want, &backward);
}

#[gpu_test]
fn gemm_transposes_alpha_and_bias(ctx: GpuContext) {
    gemm_case(&ctx, "plain, dA only", (3, 5, 4), false, false, 1.0, 1.0, &[4], &[0], 1);
    gemm_case(&ctx, "transA transB alpha 0.7", (4, 6, 3), true, true, 0.7, 0.5, &[3], &[0], 2);
    gemm_case(&ctx, "transA, all gradients, C per row", (5, 3, 4), true, false, -1.5, 0.25, &[5, 1], &[0, 1, 2], 3);
    gemm_case(&ctx, "transB, dB and scalar C", (2, 4, 3), false, true, 2.0, 3.0, &[], &[1, 2], 4);
    // Several 64-wide tiles along K and N of the dA product.
    gemm_case(&ctx, "wider than a tile", (5, 70, 66), false, true, 0.9, 1.0, &[5, 66], &[0, 2], 5);
}

#[gpu_test]
fn gemm_beta_zero_gives_zero_bias_gradient(ctx: GpuContext) {
    let ins = [const_in(&[2, 3], 1), const_in(&[3, 4], 2), runtime_in(&[4], 3)];
    let r = vec![f32::INFINITY; 8];
    let mut values = vec![ins[2].data.clone(), r, vec![f32::NAN; 4]];
    let weights = vec![ins[0].data.clone(), ins[1].data.clone()];
    let mut b = lowering(&ins, &[2, 4], BufRef::Value(1), &[(2, BufRef::Value(2), false)]);
    let attrs = GemmAttrs { alpha: 1.0, beta: 0.0, trans_a: false, trans_b: false };
    acclimate::ops::matmul::backward_gemm(&attrs, &mut b).unwrap();
    run_dispatches(&ctx, &mut values, &weights, &b.scratch, &b.dispatches).unwrap();
    assert_eq!(values[2], vec![0.0; 4], "beta = 0: C never reached the output");
}

// ---------------------------------------------------------------------------------------------
// MatMul
// ---------------------------------------------------------------------------------------------

/// numpy.matmul in f64 with 1-D promotion and batch broadcasting.
fn matmul_ref(sa: &[usize], a: &[f64], sb: &[usize], b: &[f64]) -> Vec<f64> {
    let (ab, m, k) = if sa.len() == 1 {
        (vec![], 1, sa[0])
    } else {
        (sa[..sa.len() - 2].to_vec(), sa[sa.len() - 2], sa[sa.len() - 1])
    };
    let (bb, n) = if sb.len() == 1 { (vec![], 1) } else { (sb[..sb.len() - 2].to_vec(), sb[sb.len() - 1]) };
    let rank = ab.len().max(bb.len());
    let dim = |v: &[usize], d: usize| if d + v.len() >= rank { v[d + v.len() - rank] } else { 1 };
    let batch: Vec<usize> = (0..rank).map(|d| dim(&ab, d).max(dim(&bb, d))).collect();
    let entries: usize = batch.iter().product();
    let mut out = Vec::new();
    for e in 0..entries {
        let (mut rem, mut ia, mut ib, mut sa_, mut sb_) = (e, 0, 0, 1, 1);
        for d in (0..rank).rev() {
            let i = rem % batch[d];
            rem /= batch[d];
            let (da, db) = (dim(&ab, d), dim(&bb, d));
            ia += if da == 1 { 0 } else { i * sa_ };
            ib += if db == 1 { 0 } else { i * sb_ };
            sa_ *= da;
            sb_ *= db;
        }
        for i in 0..m {
            for j in 0..n {
                out.push((0..k).map(|l| a[ia * m * k + i * k + l] * b[ib * k * n + l * n + j]).sum());
            }
        }
    }
    out
}

fn matmul_case(
    ctx: &GpuContext,
    name: &str,
    sa: &[usize],
    sb: &[usize],
    out_shape: &[usize],
    wanted: &[usize],
    seed: u64,
) {
    let make =
        |j: usize, shape: &[usize], s: u64| if wanted.contains(&j) { runtime_in(shape, s) } else { const_in(shape, s) };
    let ins = [make(0, sa, seed), make(1, sb, seed + 1)];
    let r = common::random_f32(out_shape.iter().product(), seed + 2, -1.0, 1.0);
    let (av, bv) = (f64s(&ins[0].data), f64s(&ins[1].data));
    assert_eq!(matmul_ref(sa, &av, sb, &bv).len(), r.len(), "{name}: output shape");
    let want: Vec<(usize, Vec<f64>)> = wanted
        .iter()
        .map(|&j| match j {
            0 => (j, central_diff(&ins[0].data, |a| dot(&r, &matmul_ref(sa, a, sb, &bv)))),
            _ => (j, central_diff(&ins[1].data, |b| dot(&r, &matmul_ref(sa, &av, sb, b)))),
        })
        .collect();
    let backward = |b: &mut BackwardLowering| acclimate::ops::matmul::backward_matmul(b);
    check_backward(ctx, name, &ins, out_shape, &r, &want, &backward);
}

#[gpu_test]
fn matmul_broadcast_batches(ctx: GpuContext) {
    // Both operands broadcast over a different batch dim: both gradients are reduced.
    matmul_case(&ctx, "A [2,1,3,4] B [3,4,5]", &[2, 1, 3, 4], &[3, 4, 5], &[2, 3, 3, 5], &[0, 1], 1);
    // The weight case: B is shared by every entry, its gradient folds the batch into K.
    matmul_case(&ctx, "A [2,3,4] B [4,5]", &[2, 3, 4], &[4, 5], &[2, 3, 5], &[0, 1], 2);
    // A shared 2-D A against a batched B: dA sums over the batch.
    matmul_case(&ctx, "A [3,4] B [2,2,4,5]", &[3, 4], &[2, 2, 4, 5], &[2, 2, 3, 5], &[0, 1], 3);
    // Unit batch dims on both sides and no reduction at all.
    matmul_case(&ctx, "A [1,2,3,4] B [1,2,4,3]", &[1, 2, 3, 4], &[1, 2, 4, 3], &[1, 2, 3, 3], &[0, 1], 4);
    // Only the activation's gradient, the frozen weight wider than a tile.
    matmul_case(&ctx, "A [2,3,70] B [70,66], dA only", &[2, 3, 70], &[70, 66], &[2, 3, 66], &[0], 5);
}

#[gpu_test]
fn matmul_1d_promotion(ctx: GpuContext) {
    matmul_case(&ctx, "A [4] B [2,4,5]", &[4], &[2, 4, 5], &[2, 5], &[0, 1], 1);
    matmul_case(&ctx, "A [2,3,4] B [4]", &[2, 3, 4], &[4], &[2, 3], &[0, 1], 2);
    matmul_case(&ctx, "A [4] B [4]", &[4], &[4], &[], &[0, 1], 3);
}

#[test]
fn matmul_rejects_mismatched_gradient_shapes() {
    let ins = [runtime_in(&[2, 3], 1), const_in(&[3, 4], 2)];
    let mut b = lowering(&ins, &[2, 5], BufRef::Value(1), &[(0, BufRef::Value(2), false)]);
    let e = acclimate::ops::matmul::backward_matmul(&mut b).unwrap_err();
    assert!(matches!(&e, OpReason::Internal(r) if r.contains("gradient")), "{e}");
}
