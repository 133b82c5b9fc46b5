//! Reverse passes of the activation, arithmetic, pooling, ReduceMean, softmax and layout families
//! against f64 central finite differences.
//!
//! Each case runs the op's forward lowering on the GPU (so backward passes that read the saved
//! output see the real one), then its backward lowering with dL/dY = w for a random w, and
//! compares every produced dL/dX with (L(x + h e_i) - L(x - h e_i)) / 2h, L = Σ w ⊙ f(x), where f
//! is a naive f64 reference written here (layout ops take their index map from the CPU
//! evaluation the ONNX node tests validate). Every case runs twice: overwriting a gradient buffer
//! filled with NaN (so an element the backward forgets shows up) and accumulating into one
//! holding random values. Inputs stay away from kinks and ties by more than h; the conventions
//! at kinks and ties are checked separately with exact values.

mod common;

use std::sync::Arc;

use acclimate::GpuContext;
use acclimate::ops::elementwise::{self, BinaryKind, Unary};
use acclimate::ops::layout::{IntsArg, LayoutOp, PadMode, PadValue};
use acclimate::ops::pool::{self, AutoPad, PoolAttrs};
use acclimate::ops::reduce::{self, ReduceMeanAttrs};
use acclimate::ops::softmax::{self, SoftmaxAttrs};
use acclimate::ops::{BackwardLowering, BufRef, GradInput, Lowering, Op, Operand, broadcast_shapes};
use acclimate::plan::standalone::run_dispatches;
use acclimate::tensor::Data;
use acclimate::{DType, Tensor};
use acclimate_test_macros::gpu_test;
use common::random_f32;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// One input of the op under test.
#[derive(Clone, Debug)]
enum Arg {
    /// A runtime tensor; `grad` says whether its gradient is wanted.
    Data { x: Vec<f32>, shape: Vec<usize>, grad: bool },
    /// A constant (a frozen weight or an attribute-like input).
    Const(Tensor),
    /// An omitted optional input.
    Absent,
}

fn data(x: Vec<f32>, shape: &[usize]) -> Arg {
    Arg::Data { x, shape: shape.to_vec(), grad: true }
}

fn frozen(x: Vec<f32>, shape: &[usize]) -> Arg {
    Arg::Const(Tensor::f32(shape.to_vec(), x))
}

fn ints(v: &[i64]) -> Arg {
    Arg::Const(Tensor::i64(vec![v.len()], v.to_vec()))
}

type Lower<'a> = &'a dyn Fn(&mut Lowering) -> acclimate::ops::OpResult<()>;
type LowerBackward<'a> = &'a dyn Fn(&mut BackwardLowering) -> acclimate::ops::OpResult<()>;
/// f64 forward reference: all inputs (constants included, empty when absent) to all outputs.
type Reference<'a> = &'a dyn Fn(&[Vec<f64>]) -> Vec<Vec<f64>>;

struct Case<'a> {
    name: String,
    args: Vec<Arg>,
    outputs: Vec<Vec<usize>>,
    /// dL/dY per output; `None` where no gradient flows.
    dys: Vec<Option<Vec<f32>>>,
    forward: Lower<'a>,
    backward: LowerBackward<'a>,
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Gradient buffers after the backward, and what they held before (per input, `None` where no
/// gradient was asked for).
struct Grads {
    got: Vec<Option<Vec<f32>>>,
    before: Vec<Option<Vec<f32>>>,
}

fn value(values: &mut Vec<Vec<f32>>, v: Vec<f32>) -> BufRef {
    values.push(v);
    BufRef::Value(values.len() - 1)
}

fn run_case(ctx: &GpuContext, case: &Case<'_>, accumulate: bool) -> Result<Grads, String> {
    let mut values: Vec<Vec<f32>> = Vec::new();
    let mut weights: Vec<Vec<f32>> = Vec::new();
    let mut inputs = Vec::new();
    for a in &case.args {
        inputs.push(match a {
            Arg::Data { x, shape, .. } => {
                Some(Operand { buf: value(&mut values, x.clone()), shape: shape.clone(), value: None })
            }
            Arg::Const(t) => {
                weights.push(t.to_f32_vec());
                Some(Operand {
                    buf: BufRef::Weight(weights.len() - 1),
                    shape: t.shape.clone(),
                    value: Some(Arc::new(t.clone())),
                })
            }
            Arg::Absent => None,
        });
    }
    let outputs: Vec<Operand> = case
        .outputs
        .iter()
        .map(|s| Operand { buf: value(&mut values, vec![f32::NAN; numel(s)]), shape: s.clone(), value: None })
        .collect();
    let mut fwd = Lowering {
        node: case.name.clone(),
        inputs: inputs.clone(),
        outputs: outputs.clone(),
        dispatches: Vec::new(),
        scratch: Vec::new(),
        max_workgroup_storage: 16384,
        max_invocations: 256,
        cpu_kernels: false,
    };
    (case.forward)(&mut fwd).map_err(|e| e.to_string())?;
    run_dispatches(ctx, &mut values, &weights, &fwd.scratch, &fwd.dispatches).map_err(|e| e.to_string())?;

    let grad_outputs: Vec<Option<Operand>> = case
        .dys
        .iter()
        .zip(&case.outputs)
        .map(|(d, s)| d.as_ref().map(|d| Operand { buf: value(&mut values, d.clone()), shape: s.clone(), value: None }))
        .collect();
    let mut before = Vec::new();
    let mut grad_inputs = Vec::new();
    for (i, a) in case.args.iter().enumerate() {
        match a {
            Arg::Data { shape, grad: true, .. } => {
                let init = if accumulate {
                    random_f32(numel(shape), 900 + i as u64, -1.0, 1.0)
                } else {
                    vec![f32::NAN; numel(shape)]
                };
                let buf = value(&mut values, init.clone());
                before.push(Some(init));
                grad_inputs.push(Some(GradInput { buf, shape: shape.clone(), accumulate }));
            }
            _ => {
                before.push(None);
                grad_inputs.push(None);
            }
        }
    }
    let mut b = BackwardLowering {
        node: case.name.clone(),
        inputs,
        outputs,
        grad_outputs,
        grad_inputs: grad_inputs.clone(),
        dispatches: Vec::new(),
        scratch: Vec::new(),
        max_workgroup_storage: 16384,
        max_invocations: 256,
        cpu_kernels: false,
    };
    (case.backward)(&mut b).map_err(|e| e.to_string())?;
    run_dispatches(ctx, &mut values, &weights, &b.scratch, &b.dispatches).map_err(|e| e.to_string())?;
    let got = grad_inputs
        .iter()
        .map(|g| {
            g.as_ref().map(|g| match g.buf {
                BufRef::Value(i) => values[i].clone(),
                other => panic!("gradient buffer {other:?} is not a value"),
            })
        })
        .collect();
    Ok(Grads { got, before })
}

fn as_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn host_args(args: &[Arg]) -> Vec<Vec<f64>> {
    args.iter()
        .map(|a| match a {
            Arg::Data { x, .. } => as_f64(x),
            Arg::Const(t) => as_f64(&t.to_f32_vec()),
            Arg::Absent => Vec::new(),
        })
        .collect()
}

/// L = Σ_k Σ w_k ⊙ y_k over the outputs that receive a gradient.
fn loss(reference: Reference<'_>, xs: &[Vec<f64>], dys: &[Option<Vec<f32>>]) -> f64 {
    let ys = reference(xs);
    let mut l = 0.0;
    for (y, w) in ys.iter().zip(dys) {
        if let Some(w) = w {
            assert_eq!(y.len(), w.len(), "reference output size");
            l += y.iter().zip(w).map(|(a, b)| a * *b as f64).sum::<f64>();
        }
    }
    l
}

const H: f64 = 1e-3;

fn finite_differences(reference: Reference<'_>, xs: &[Vec<f64>], which: usize, dys: &[Option<Vec<f32>>]) -> Vec<f64> {
    let mut xs = xs.to_vec();
    (0..xs[which].len())
        .map(|i| {
            let x0 = xs[which][i];
            xs[which][i] = x0 + H;
            let up = loss(reference, &xs, dys);
            xs[which][i] = x0 - H;
            let down = loss(reference, &xs, dys);
            xs[which][i] = x0;
            (up - down) / (2.0 * H)
        })
        .collect()
}

/// Runs the case overwriting and accumulating, and checks every gradient against finite
/// differences of `reference`.
fn check(ctx: &GpuContext, case: &Case<'_>, reference: Reference<'_>) {
    let xs = host_args(&case.args);
    let fds: Vec<Option<Vec<f64>>> = case
        .args
        .iter()
        .enumerate()
        .map(|(i, a)| match a {
            Arg::Data { grad: true, .. } => Some(finite_differences(reference, &xs, i, &case.dys)),
            _ => None,
        })
        .collect();
    for accumulate in [false, true] {
        let g = run_case(ctx, case, accumulate).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        for (i, fd) in fds.iter().enumerate() {
            let Some(fd) = fd else { continue };
            let got = g.got[i].as_ref().expect("gradient produced");
            let before = g.before[i].as_ref().expect("gradient buffer");
            let scale = fd.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (e, (&gv, &want)) in got.iter().zip(fd).enumerate() {
                let gv = gv as f64 - if accumulate { before[e] as f64 } else { 0.0 };
                assert!(
                    (gv - want).abs() <= 1e-3 * scale + 1e-4,
                    "{} (accumulate={accumulate}): dL/dx{i}[{e}] = {gv}, finite differences give {want}",
                    case.name
                );
            }
        }
    }
}

fn dy_for(shapes: &[Vec<usize>], seed: u64) -> Vec<Option<Vec<f32>>> {
    shapes.iter().enumerate().map(|(k, s)| Some(random_f32(numel(s), seed + k as u64, -1.0, 1.0))).collect()
}

/// Row-major multi-index of flat index `i`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = i % shape[d];
        i /= shape[d];
    }
    idx
}

/// Flat index in `shape` (right-aligned against `idx`, broadcast dims read index 0).
fn ravel_broadcast(idx: &[usize], shape: &[usize]) -> usize {
    let off = idx.len() - shape.len();
    shape.iter().enumerate().fold(0, |acc, (d, &s)| acc * s + if s == 1 { 0 } else { idx[d + off] })
}

/// Moves values closer than `gap` to any kink by 2·gap, so finite differences never straddle one.
fn avoid(mut x: Vec<f32>, kinks: &[f32], gap: f32) -> Vec<f32> {
    for v in &mut x {
        for &k in kinks {
            if (*v - k).abs() < gap {
                *v = k + 2.0 * gap;
            }
        }
    }
    x
}

// ---------------------------------------------------------------------------------------------
// Activations
// ---------------------------------------------------------------------------------------------

fn unary_ref(u: Unary, x: f64) -> f64 {
    match u {
        Unary::Relu => x.max(0.0),
        Unary::LeakyRelu { alpha } => {
            if x < 0.0 {
                x * alpha as f64
            } else {
                x
            }
        }
        Unary::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        Unary::HardSigmoid { alpha, beta } => (alpha as f64 * x + beta as f64).clamp(0.0, 1.0),
        Unary::HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
        Unary::Clip { min, max } => x.max(min as f64).min(max as f64),
        Unary::Log => x.ln(),
        Unary::Exp => x.exp(),
        Unary::Tanh => x.tanh(),
        Unary::Neg => -x,
        Unary::Abs => x.abs(),
        Unary::Sqrt => x.sqrt(),
        Unary::Erf => libm::erf(x),
        Unary::Gelu { tanh: false } => 0.5 * x * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2),
        Unary::Gelu { tanh: true } => {
            0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
        }
        Unary::Softplus => (1.0 + x.exp()).ln(),
        Unary::Softsign => x / (1.0 + x.abs()),
        Unary::Elu { alpha } => {
            if x > 0.0 {
                x
            } else {
                alpha as f64 * (x.exp() - 1.0)
            }
        }
        Unary::Selu { alpha, gamma } => gamma as f64 * if x > 0.0 { x } else { alpha as f64 * (x.exp() - 1.0) },
        Unary::Reciprocal => 1.0 / x,
        Unary::Mish => x * (1.0 + x.exp()).ln().tanh(),
    }
}

#[gpu_test]
fn activations_match_finite_differences(ctx: GpuContext) {
    let shape = [2, 3, 5];
    let n = numel(&shape);
    let cases: Vec<(Unary, f32, f32, Vec<f32>)> = vec![
        (Unary::Relu, -2.0, 2.0, vec![0.0]),
        (Unary::LeakyRelu { alpha: 0.1 }, -2.0, 2.0, vec![0.0]),
        // A negative slope flips the sign test, so this one reads its input.
        (Unary::LeakyRelu { alpha: -0.5 }, -2.0, 2.0, vec![0.0]),
        (Unary::Sigmoid, -4.0, 4.0, vec![]),
        (Unary::HardSigmoid { alpha: 0.2, beta: 0.5 }, -4.0, 4.0, vec![-2.5, 2.5]),
        (Unary::HardSwish, -5.0, 5.0, vec![-3.0, 3.0]),
        (Unary::Clip { min: 0.0, max: 6.0 }, -2.0, 8.0, vec![0.0, 6.0]),
        (Unary::Clip { min: -1.0, max: f32::MAX }, -3.0, 3.0, vec![-1.0]),
    ];
    for (k, (u, lo, hi, kinks)) in cases.into_iter().enumerate() {
        let x = avoid(random_f32(n, 10 + k as u64, lo, hi), &kinks, 0.02);
        let outputs = vec![shape.to_vec()];
        let case = Case {
            name: format!("{u:?}"),
            args: vec![data(x, &shape)],
            dys: dy_for(&outputs, 20 + k as u64),
            outputs,
            forward: &|l| elementwise::lower_unary(&u, l),
            backward: &|b| Op::Unary(u).lower_backward(b),
        };
        check(&ctx, &case, &|xs| vec![xs[0].iter().map(|&v| unary_ref(u, v)).collect()]);
    }
}

/// The math functions, on ranges inside their domains (abs kept away from its kink at 0).
#[gpu_test]
fn math_functions_match_finite_differences(ctx: GpuContext) {
    let shape = [2, 3, 5];
    let n = numel(&shape);
    let cases: Vec<(Unary, f32, f32, Vec<f32>)> = vec![
        (Unary::Log, 0.2, 3.0, vec![]),
        (Unary::Exp, -3.0, 3.0, vec![]),
        (Unary::Tanh, -3.0, 3.0, vec![]),
        (Unary::Neg, -2.0, 2.0, vec![]),
        (Unary::Abs, -2.0, 2.0, vec![0.0]),
        (Unary::Sqrt, 0.1, 4.0, vec![]),
        (Unary::Erf, -3.0, 3.0, vec![]),
        (Unary::Gelu { tanh: false }, -4.0, 4.0, vec![]),
        (Unary::Gelu { tanh: true }, -4.0, 4.0, vec![]),
        (Unary::Softplus, -4.0, 4.0, vec![]),
        (Unary::Softsign, -3.0, 3.0, vec![0.0]),
        (Unary::Elu { alpha: 0.7 }, -3.0, 3.0, vec![0.0]),
        (Unary::Selu { alpha: 1.6732632, gamma: 1.050701 }, -3.0, 3.0, vec![0.0]),
        (Unary::Reciprocal, 0.3, 3.0, vec![]),
        (Unary::Mish, -4.0, 4.0, vec![]),
    ];
    for (k, (u, lo, hi, kinks)) in cases.into_iter().enumerate() {
        let x = avoid(random_f32(n, 50 + k as u64, lo, hi), &kinks, 0.02);
        let outputs = vec![shape.to_vec()];
        let case = Case {
            name: format!("{u:?}"),
            args: vec![data(x, &shape)],
            dys: dy_for(&outputs, 60 + k as u64),
            outputs,
            forward: &|l| elementwise::lower_unary(&u, l),
            backward: &|b| Op::Unary(u).lower_backward(b),
        };
        check(&ctx, &case, &|xs| vec![xs[0].iter().map(|&v| unary_ref(u, v)).collect()]);
    }
}

#[gpu_test]
fn clip_with_bound_inputs_matches_finite_differences(ctx: GpuContext) {
    let shape = [3, 7];
    let n = numel(&shape);
    let scalar = |v: f32| Arg::Const(Tensor::f32(vec![], vec![v]));
    let variants: Vec<(Arg, Arg, f64, f64)> = vec![
        (scalar(0.0), scalar(6.0), 0.0, 6.0),
        (scalar(-0.5), Arg::Absent, -0.5, f64::MAX),
        (Arg::Absent, scalar(0.25), f64::MIN, 0.25),
    ];
    for (k, (lo, hi, min, max)) in variants.into_iter().enumerate() {
        let x = avoid(random_f32(n, 30 + k as u64, -2.0, 8.0), &[min as f32, max as f32], 0.02);
        let outputs = vec![shape.to_vec()];
        let case = Case {
            name: format!("Clip(inputs) [{min}, {max}]"),
            args: vec![data(x, &shape), lo, hi],
            dys: dy_for(&outputs, 40 + k as u64),
            outputs,
            forward: &elementwise::lower_clip_inputs,
            backward: &|b| Op::ClipInputs.lower_backward(b),
        };
        check(&ctx, &case, &|xs| vec![xs[0].iter().map(|&v| v.max(min).min(max)).collect()]);
    }
}

/// Runs an activation's forward and backward on exact values with dL/dY = 1.
fn unary_grads_at(ctx: &GpuContext, op: Op, forward: Lower<'_>, args: Vec<Arg>) -> Vec<f32> {
    let Some(Arg::Data { shape, .. }) = args.first().cloned() else { panic!("first argument must be data") };
    let outputs = vec![shape.clone()];
    let case = Case {
        name: format!("{op:?}"),
        dys: vec![Some(vec![1.0; numel(&shape)])],
        args,
        outputs,
        forward,
        backward: &|b| op.lower_backward(b),
    };
    run_case(ctx, &case, false).expect("backward runs").got[0].clone().expect("dX")
}

/// The kink conventions are PyTorch's: clip passes the gradient only strictly inside (min, max)
/// (hardtanh, which nn.ReLU6 is, rather than clamp's closed interval); relu's gradient at 0 is 0,
/// leaky relu's the slope; hard swish uses x/3 + 1/2 on the closed [-3, 3]; hard sigmoid passes
/// alpha only strictly inside its linear range.
#[gpu_test]
fn activation_kinks_follow_pytorch(ctx: GpuContext) {
    let x = vec![0.0, 6.0, -1.0, 7.0, 3.0];
    let clip = Unary::Clip { min: 0.0, max: 6.0 };
    let want = vec![0.0, 0.0, 0.0, 0.0, 1.0];
    let got =
        unary_grads_at(&ctx, Op::Unary(clip), &|l| elementwise::lower_unary(&clip, l), vec![data(x.clone(), &[5])]);
    assert_eq!(got, want, "Clip attribute form");
    let bound = |v: f32| Arg::Const(Tensor::f32(vec![1], vec![v]));
    let got = unary_grads_at(
        &ctx,
        Op::ClipInputs,
        &elementwise::lower_clip_inputs,
        vec![data(x, &[5]), bound(0.0), bound(6.0)],
    );
    assert_eq!(got, want, "Clip input form");

    let x = vec![-3.0, 3.0, -3.5, 3.5, 0.0];
    let got = unary_grads_at(
        &ctx,
        Op::Unary(Unary::HardSwish),
        &|l| elementwise::lower_unary(&Unary::HardSwish, l),
        vec![data(x, &[5])],
    );
    assert_eq!(got, vec![-0.5, 1.5, 0.0, 1.0, 0.5], "HardSwish");

    let hs = Unary::HardSigmoid { alpha: 0.25, beta: 0.5 };
    let got = unary_grads_at(
        &ctx,
        Op::Unary(hs),
        &|l| elementwise::lower_unary(&hs, l),
        vec![data(vec![-2.0, 2.0, 0.0], &[3])],
    );
    assert_eq!(got, vec![0.0, 0.0, 0.25], "HardSigmoid");

    let got = unary_grads_at(
        &ctx,
        Op::Unary(Unary::Relu),
        &|l| elementwise::lower_unary(&Unary::Relu, l),
        vec![data(vec![0.0, 1.0, -1.0], &[3])],
    );
    assert_eq!(got, vec![0.0, 1.0, 0.0], "Relu");
    let lr = Unary::LeakyRelu { alpha: 0.125 };
    let got = unary_grads_at(
        &ctx,
        Op::Unary(lr),
        &|l| elementwise::lower_unary(&lr, l),
        vec![data(vec![0.0, 1.0, -1.0], &[3])],
    );
    assert_eq!(got, vec![0.125, 1.0, 0.125], "LeakyRelu");

    // abs: sign(x), 0 at 0. sqrt: 1/(2y), +inf at 0; log: 1/x, +inf at 0 (what autograd gives).
    let got = unary_grads_at(
        &ctx,
        Op::Unary(Unary::Abs),
        &|l| elementwise::lower_unary(&Unary::Abs, l),
        vec![data(vec![0.0, -0.5, 2.0, -0.0], &[4])],
    );
    assert_eq!(got, vec![0.0, -1.0, 1.0, 0.0], "Abs");
    for u in [Unary::Sqrt, Unary::Log] {
        let got =
            unary_grads_at(&ctx, Op::Unary(u), &|l| elementwise::lower_unary(&u, l), vec![data(vec![0.0, 0.25], &[2])]);
        let want = if u == Unary::Sqrt { 1.0 } else { 4.0 };
        assert_eq!(got, vec![f32::INFINITY, want], "{u:?}");
    }
}

#[test]
fn activations_save_their_output_where_it_determines_the_gradient() {
    let saves = |u: Unary| Op::Unary(u).backward_saves();
    for u in
        [Unary::Relu, Unary::Sigmoid, Unary::HardSigmoid { alpha: 0.2, beta: 0.5 }, Unary::Clip { min: 0.0, max: 6.0 }]
    {
        let s = saves(u);
        assert!(s.outputs && !s.inputs, "{u:?} should read only its output, saves {s:?}");
    }
    for u in [Unary::Exp, Unary::Tanh, Unary::Sqrt] {
        let s = saves(u);
        assert!(s.outputs && !s.inputs, "{u:?} should read only its output, saves {s:?}");
    }
    for u in [Unary::HardSwish, Unary::Log, Unary::Abs] {
        let s = saves(u);
        assert!(s.inputs && !s.outputs, "{u:?} reads its input, saves {s:?}");
    }
    let s = saves(Unary::Neg);
    assert!(!s.inputs && !s.outputs, "Neg reads nothing from the forward pass, saves {s:?}");
    let s = saves(Unary::LeakyRelu { alpha: -1.0 });
    assert!(s.inputs && !s.outputs, "a negative leaky slope reads the input, saves {s:?}");
    assert!(!elementwise::binary_backward_needs_inputs(BinaryKind::Add));
    assert!(!elementwise::binary_backward_needs_inputs(BinaryKind::Sub));
    for k in [BinaryKind::Mul, BinaryKind::Div, BinaryKind::Pow, BinaryKind::PRelu, BinaryKind::Max, BinaryKind::Min] {
        assert!(elementwise::binary_backward_needs_inputs(k), "{k:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Broadcasting arithmetic and PRelu
// ---------------------------------------------------------------------------------------------

fn binary_ref(k: BinaryKind, a: f64, b: f64) -> f64 {
    match k {
        BinaryKind::Add => a + b,
        BinaryKind::Sub => a - b,
        BinaryKind::Mul => a * b,
        BinaryKind::Div => a / b,
        BinaryKind::Pow => a.powf(b),
        BinaryKind::PRelu => {
            if a < 0.0 {
                a * b
            } else {
                a
            }
        }
        BinaryKind::Max => a.max(b),
        BinaryKind::Min => a.min(b),
    }
}

fn broadcast_ref(k: BinaryKind, a: &[f64], sa: &[usize], b: &[f64], sb: &[usize]) -> Vec<f64> {
    let out = broadcast_shapes(sa, sb).expect("shapes broadcast");
    (0..numel(&out))
        .map(|i| {
            let idx = unravel(i, &out);
            binary_ref(k, a[ravel_broadcast(&idx, sa)], b[ravel_broadcast(&idx, sb)])
        })
        .collect()
}

fn check_binary(ctx: &GpuContext, k: BinaryKind, a: Arg, b: Arg, seed: u64) {
    let shape_of = |x: &Arg| match x {
        Arg::Data { shape, .. } => shape.clone(),
        Arg::Const(t) => t.shape.clone(),
        Arg::Absent => unreachable!(),
    };
    let (sa, sb) = (shape_of(&a), shape_of(&b));
    let outputs = vec![broadcast_shapes(&sa, &sb).expect("shapes broadcast")];
    let case = Case {
        name: format!("{k:?} {sa:?} {sb:?}"),
        args: vec![a, b],
        dys: dy_for(&outputs, seed),
        outputs,
        forward: &|l| elementwise::lower_binary(k, l),
        backward: &|bl| Op::Binary(k).lower_backward(bl),
    };
    check(ctx, &case, &|xs| vec![broadcast_ref(k, &xs[0], &sa, &xs[1], &sb)]);
}

fn rand(shape: &[usize], seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    random_f32(numel(shape), seed, lo, hi)
}

/// Values with |v| in [lo, hi] and random signs (divisors away from 0).
fn away_from_zero(shape: &[usize], seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let m = rand(shape, seed, lo, hi);
    let s = rand(shape, seed + 1, -1.0, 1.0);
    m.iter().zip(&s).map(|(m, s)| if *s < 0.0 { -m } else { *m }).collect()
}

#[gpu_test]
fn sums_and_differences_reduce_over_broadcast_dims(ctx: GpuContext) {
    let s4 = [2, 3, 4, 5];
    // The residual Add: same shapes, both sides.
    check_binary(&ctx, BinaryKind::Add, data(rand(&s4, 1, -1.0, 1.0), &s4), data(rand(&s4, 2, -1.0, 1.0), &s4), 3);
    // A per-channel operand: B's gradient sums over N, H and W.
    check_binary(
        &ctx,
        BinaryKind::Add,
        data(rand(&s4, 4, -1.0, 1.0), &s4),
        data(rand(&[3, 1, 1], 5, -1.0, 1.0), &[3, 1, 1]),
        6,
    );
    // Both sides broadcast, B negated.
    check_binary(
        &ctx,
        BinaryKind::Sub,
        data(rand(&[3, 1], 7, -1.0, 1.0), &[3, 1]),
        data(rand(&[1, 4], 8, -1.0, 1.0), &[1, 4]),
        9,
    );
    check_binary(
        &ctx,
        BinaryKind::Sub,
        data(rand(&[1, 3, 1, 5], 10, -1.0, 1.0), &[1, 3, 1, 5]),
        data(rand(&s4, 11, -1.0, 1.0), &s4),
        12,
    );
    // Long reductions (a workgroup per gradient element): 2·12·12 = 288 terms each.
    let big = [2, 3, 12, 12];
    check_binary(
        &ctx,
        BinaryKind::Sub,
        data(rand(&big, 13, -1.0, 1.0), &big),
        data(rand(&[1, 3, 1, 1], 14, -1.0, 1.0), &[1, 3, 1, 1]),
        15,
    );
}

#[gpu_test]
fn products_quotients_and_powers_reduce_over_broadcast_dims(ctx: GpuContext) {
    check_binary(
        &ctx,
        BinaryKind::Mul,
        data(rand(&[2, 3, 4], 1, -1.0, 1.0), &[2, 3, 4]),
        data(rand(&[4], 2, -1.0, 1.0), &[4]),
        3,
    );
    // Squeeze-excitation style: a per-(n, c) gate over the plane.
    check_binary(
        &ctx,
        BinaryKind::Mul,
        data(rand(&[2, 3, 1, 1], 4, -1.0, 1.0), &[2, 3, 1, 1]),
        data(rand(&[2, 3, 4, 4], 5, -1.0, 1.0), &[2, 3, 4, 4]),
        6,
    );
    // Hard-swish chains: by a constant, only the data side gets a gradient.
    check_binary(&ctx, BinaryKind::Div, data(rand(&[2, 3, 4], 7, -4.0, 4.0), &[2, 3, 4]), frozen(vec![6.0], &[1]), 8);
    check_binary(
        &ctx,
        BinaryKind::Mul,
        frozen(vec![0.5, -2.0, 3.0], &[3, 1]),
        data(rand(&[3, 5], 9, -1.0, 1.0), &[3, 5]),
        10,
    );
    check_binary(
        &ctx,
        BinaryKind::Div,
        data(rand(&[2, 3, 1, 5], 11, -1.0, 1.0), &[2, 3, 1, 5]),
        data(away_from_zero(&[3, 4, 1], 12, 0.5, 2.0), &[3, 4, 1]),
        13,
    );
    check_binary(
        &ctx,
        BinaryKind::Pow,
        data(rand(&[2, 3], 14, 0.5, 2.0), &[2, 3]),
        data(rand(&[3], 15, -2.0, 2.0), &[3]),
        16,
    );
    // Integral exponents on negative bases: d/da only.
    check_binary(
        &ctx,
        BinaryKind::Pow,
        data(rand(&[2, 3], 17, -2.0, 2.0), &[2, 3]),
        frozen(vec![2.0, 3.0, 0.0], &[3]),
        18,
    );
    // Max and Min: dy to the operand chosen, summed over broadcasting (values drawn apart from
    // each other's range edges, no ties).
    for (k, kind) in [BinaryKind::Max, BinaryKind::Min].into_iter().enumerate() {
        check_binary(
            &ctx,
            kind,
            data(rand(&[2, 3, 4], 30 + k as u64, -1.0, 1.0), &[2, 3, 4]),
            data(rand(&[3, 1], 32 + k as u64, -1.0, 1.0), &[3, 1]),
            34 + k as u64,
        );
    }
    // Long reduction of a product.
    let big = [2, 3, 12, 12];
    check_binary(
        &ctx,
        BinaryKind::Mul,
        data(rand(&big, 19, -1.0, 1.0), &big),
        data(rand(&[3, 1, 1], 20, -1.0, 1.0), &[3, 1, 1]),
        21,
    );
}

#[gpu_test]
fn prelu_passes_data_gradients_through_a_frozen_slope(ctx: GpuContext) {
    let s = [2, 3, 4, 4];
    let x = avoid(rand(&s, 1, -2.0, 2.0), &[0.0], 0.02);
    check_binary(&ctx, BinaryKind::PRelu, data(x.clone(), &s), frozen(vec![0.25, -0.5, 2.0], &[3, 1, 1]), 2);

    let outputs = vec![s.to_vec()];
    let case = Case {
        name: "PRelu slope".into(),
        args: vec![data(x, &s), data(vec![0.25, -0.5, 2.0], &[3, 1, 1])],
        dys: dy_for(&outputs, 3),
        outputs,
        forward: &|l| elementwise::lower_binary(BinaryKind::PRelu, l),
        backward: &|b| Op::Binary(BinaryKind::PRelu).lower_backward(b),
    };
    let e = run_case(&ctx, &case, false).err().expect("a slope gradient is refused");
    assert!(e.contains("slope"), "{e}");
}

#[gpu_test]
fn pow_exponent_gradient_is_zero_at_non_positive_bases(ctx: GpuContext) {
    let outputs = vec![vec![4]];
    let case = Case {
        name: "Pow at a <= 0".into(),
        args: vec![
            Arg::Data { x: vec![0.0, -2.0, 0.0, 2.0], shape: vec![4], grad: false },
            data(vec![2.0, 2.0, 0.0, 1.0], &[4]),
        ],
        dys: vec![Some(vec![1.0; 4])],
        outputs,
        forward: &|l| elementwise::lower_binary(BinaryKind::Pow, l),
        backward: &|b| Op::Binary(BinaryKind::Pow).lower_backward(b),
    };
    let g = run_case(&ctx, &case, false).expect("backward runs");
    let db = g.got[1].clone().expect("dB");
    assert_eq!(&db[..3], &[0.0, 0.0, 0.0]);
    assert!((db[3] - 2.0 * 2f32.ln()).abs() < 1e-6, "{db:?}");
}

/// Long reductions and fan-in sums are bit-identical from run to run.
#[gpu_test]
fn broadcast_reductions_are_deterministic(ctx: GpuContext) {
    let big = [4, 3, 16, 16];
    let outputs = vec![big.to_vec()];
    let case = Case {
        name: "Mul determinism".into(),
        args: vec![data(rand(&big, 1, -1.0, 1.0), &big), data(rand(&[3, 1, 1], 2, -1.0, 1.0), &[3, 1, 1])],
        dys: dy_for(&outputs, 3),
        outputs,
        forward: &|l| elementwise::lower_binary(BinaryKind::Mul, l),
        backward: &|b| Op::Binary(BinaryKind::Mul).lower_backward(b),
    };
    let first = run_case(&ctx, &case, false).expect("runs").got;
    for _ in 0..3 {
        let again = run_case(&ctx, &case, false).expect("runs").got;
        let bits = |g: &Vec<Option<Vec<f32>>>| -> Vec<Vec<u32>> {
            g.iter().flatten().map(|v| v.iter().map(|x| x.to_bits()).collect()).collect()
        };
        assert_eq!(bits(&first), bits(&again));
    }
}

// ---------------------------------------------------------------------------------------------
// Pooling
// ---------------------------------------------------------------------------------------------

fn pool_attrs(max: bool, kernel: &[usize], strides: &[usize], dilations: &[usize], pads: &[usize]) -> PoolAttrs {
    PoolAttrs {
        max,
        kernel: kernel.to_vec(),
        strides: strides.to_vec(),
        dilations: dilations.to_vec(),
        pads: pads.to_vec(),
        auto_pad: AutoPad::NotSet,
        ceil_mode: false,
        count_include_pad: false,
    }
}

/// Naive pooling over 1 to 3 spatial dims: every window tap, clipped to the input; the average's
/// divisor counts taps inside [-pad_begin, in + pad_end) with count_include_pad, else inside the
/// input.
fn pool_ref(a: &PoolAttrs, x: &[f64], shape: &[usize]) -> Vec<f64> {
    let spatial = &shape[2..];
    let (out, pads) = a.geometry(spatial).expect("geometry");
    let k = spatial.len();
    let plane_in = numel(spatial);
    let taps = numel(&a.kernel);
    let mut y = Vec::new();
    for plane in 0..shape[0] * shape[1] {
        for o in 0..numel(&out) {
            let oi = unravel(o, &out);
            let (mut best, mut sum, mut count) = (f64::NEG_INFINITY, 0.0, 0usize);
            for t in 0..taps {
                let ti = unravel(t, &a.kernel);
                let pos: Vec<i64> =
                    (0..k).map(|d| (oi[d] * a.strides[d] + ti[d] * a.dilations[d]) as i64 - pads[d].0 as i64).collect();
                let inside = (0..k).all(|d| pos[d] >= 0 && pos[d] < spatial[d] as i64);
                let counted = if a.count_include_pad {
                    (0..k).all(|d| pos[d] >= -(pads[d].0 as i64) && pos[d] < (spatial[d] + pads[d].1) as i64)
                } else {
                    inside
                };
                if counted {
                    count += 1;
                }
                if inside {
                    let flat = pos.iter().zip(spatial).fold(0usize, |acc, (&p, &s)| acc * s + p as usize);
                    let v = x[plane * plane_in + flat];
                    best = best.max(v);
                    sum += v;
                }
            }
            y.push(if a.max { best } else { sum / count as f64 });
        }
    }
    y
}

/// Distinct values at least 0.01 apart, shuffled, so no window has a near-tie.
fn distinct(n: usize, seed: u64) -> Vec<f32> {
    let keys = random_f32(n, seed, 0.0, 1.0);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| keys[i].total_cmp(&keys[j]));
    let mut x = vec![0.0; n];
    for (rank, &i) in order.iter().enumerate() {
        x[i] = rank as f32 * 0.01 - n as f32 * 0.005;
    }
    x
}

fn check_pool(ctx: &GpuContext, a: PoolAttrs, shape: &[usize], seed: u64) {
    let (out, _) = a.geometry(&shape[2..]).expect("geometry");
    let mut out_shape = shape[..2].to_vec();
    out_shape.extend(out);
    let outputs = vec![out_shape];
    let case = Case {
        name: format!("{a:?} on {shape:?}"),
        args: vec![data(distinct(numel(shape), seed), shape)],
        dys: dy_for(&outputs, seed + 1),
        outputs,
        forward: &|l| pool::lower(&a, l),
        backward: &|b| Op::Pool(a.clone()).lower_backward(b),
    };
    check(ctx, &case, &|xs| vec![pool_ref(&a, &xs[0], shape)]);
}

#[gpu_test]
fn max_pool_matches_finite_differences(ctx: GpuContext) {
    // Overlapping windows, pads, ceil_mode (a last window hanging into the end padding).
    let mut a = pool_attrs(true, &[3, 3], &[2, 2], &[1, 1], &[1, 1, 1, 1]);
    a.ceil_mode = true;
    check_pool(&ctx, a, &[1, 2, 6, 6], 1);
    // Dilation, asymmetric pads, stride 1.
    check_pool(&ctx, pool_attrs(true, &[2, 2], &[1, 2], &[2, 1], &[0, 1, 1, 0]), &[2, 1, 5, 6], 2);
    // 1-D and 3-D.
    let mut a = pool_attrs(true, &[3], &[2], &[1], &[1, 0]);
    a.ceil_mode = true;
    check_pool(&ctx, a, &[1, 3, 8], 3);
    check_pool(&ctx, pool_attrs(true, &[2, 2, 2], &[1, 2, 2], &[1, 1, 1], &[0, 0, 0, 0, 1, 1]), &[1, 1, 3, 4, 4], 4);
}

#[gpu_test]
fn average_pool_matches_finite_differences(ctx: GpuContext) {
    for include in [false, true] {
        for ceil in [false, true] {
            let mut a = pool_attrs(false, &[3, 3], &[2, 2], &[1, 1], &[1, 1, 1, 1]);
            a.ceil_mode = ceil;
            a.count_include_pad = include;
            check_pool(&ctx, a, &[1, 2, 6, 6], 10 + include as u64 * 2 + ceil as u64);
        }
    }
    let mut a = pool_attrs(false, &[2, 3], &[2, 1], &[2, 1], &[1, 0, 0, 2]);
    a.count_include_pad = true;
    a.ceil_mode = true;
    check_pool(&ctx, a, &[2, 1, 7, 5], 20);
    let mut a = pool_attrs(false, &[3], &[2], &[1], &[1, 1]);
    a.ceil_mode = true;
    check_pool(&ctx, a, &[1, 2, 8], 21);
}

/// Ties route the gradient to the first maximum in scan order, as PyTorch and ONNX Runtime do.
#[gpu_test]
fn max_pool_ties_go_to_the_first_maximum(ctx: GpuContext) {
    let run = |x: Vec<f32>, shape: &[usize], a: PoolAttrs, dy: Vec<f32>, out: &[usize]| -> Vec<f32> {
        let outputs = vec![out.to_vec()];
        let case = Case {
            name: "MaxPool ties".into(),
            args: vec![data(x, shape)],
            dys: vec![Some(dy)],
            outputs,
            forward: &|l| pool::lower(&a, l),
            backward: &|b| Op::Pool(a.clone()).lower_backward(b),
        };
        run_case(&ctx, &case, false).expect("backward runs").got[0].clone().expect("dX")
    };
    // All equal, 2x2 windows at stride 1 over 3x3: each window's first tap is its top-left.
    let a = pool_attrs(true, &[2, 2], &[1, 1], &[1, 1], &[0, 0, 0, 0]);
    let got = run(vec![1.0; 9], &[1, 1, 3, 3], a.clone(), vec![1.0, 2.0, 3.0, 4.0], &[1, 1, 2, 2]);
    assert_eq!(got, vec![1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
    // The maximum appears twice in one window, at (0, 1) and (1, 0): the first in row-major
    // order wins. Overlapping windows both choosing one element add up.
    let x = vec![1.0, 5.0, 2.0, 5.0, 2.0, 5.0, 0.0, 1.0, 3.0];
    let got = run(x, &[1, 1, 3, 3], a, vec![1.0, 10.0, 100.0, 1000.0], &[1, 1, 2, 2]);
    assert_eq!(got, vec![0.0, 11.0, 0.0, 100.0, 0.0, 1000.0, 0.0, 0.0, 0.0]);
}

#[gpu_test]
fn global_average_pool_matches_finite_differences(ctx: GpuContext) {
    let shape = [2, 3, 5, 4];
    let outputs = vec![vec![2, 3, 1, 1]];
    let case = Case {
        name: "GlobalAveragePool".into(),
        args: vec![data(rand(&shape, 1, -1.0, 1.0), &shape)],
        dys: dy_for(&outputs, 2),
        outputs,
        forward: &pool::lower_global,
        backward: &|b| Op::GlobalAveragePool.lower_backward(b),
    };
    check(&ctx, &case, &|xs| vec![xs[0].chunks(20).map(|c| c.iter().sum::<f64>() / 20.0).collect()]);
}

// ---------------------------------------------------------------------------------------------
// ReduceMean and Softmax
// ---------------------------------------------------------------------------------------------

fn mean_ref(x: &[f64], shape: &[usize], mask: &[bool]) -> Vec<f64> {
    let kept: Vec<usize> = shape.iter().zip(mask).map(|(&s, &r)| if r { 1 } else { s }).collect();
    let mut sums = vec![0.0; numel(&kept)];
    let mut counts = vec![0usize; sums.len()];
    for (i, &v) in x.iter().enumerate() {
        let idx = unravel(i, shape);
        let o = idx.iter().zip(&kept).fold(0, |acc, (&j, &s)| acc * s + if s == 1 { 0 } else { j });
        sums[o] += v;
        counts[o] += 1;
    }
    sums.iter().zip(&counts).map(|(s, &c)| s / c as f64).collect()
}

/// A ReduceMean variant: attributes, the opset-18 axes input, the reduced dims, dY's shape.
struct MeanCase {
    a: ReduceMeanAttrs,
    axes: Option<Vec<i64>>,
    mask: Vec<bool>,
    out: Vec<usize>,
}

#[gpu_test]
fn reduce_mean_and_sum_match_finite_differences(ctx: GpuContext) {
    let shape = [2, 3, 4, 5];
    let attrs = |keepdims: bool, axes: Option<Vec<i64>>, axes_input: bool| ReduceMeanAttrs {
        sum: false,
        extreme: None,
        keepdims,
        axes,
        axes_input,
        noop_with_empty_axes: false,
        from_axis: None,
    };
    let variants = vec![
        MeanCase {
            a: attrs(false, Some(vec![1, 3]), false),
            axes: None,
            mask: vec![false, true, false, true],
            out: vec![2, 4],
        },
        MeanCase {
            a: attrs(true, None, true),
            axes: Some(vec![-1, -2]),
            mask: vec![false, false, true, true],
            out: vec![2, 3, 1, 1],
        },
        MeanCase { a: attrs(true, None, false), axes: None, mask: vec![true; 4], out: vec![1, 1, 1, 1] },
        // ReduceSum: the same kernels without the division.
        MeanCase {
            a: ReduceMeanAttrs { sum: true, ..attrs(false, None, true) },
            axes: Some(vec![0, 2]),
            mask: vec![true, false, true, false],
            out: vec![3, 5],
        },
    ];
    for (k, MeanCase { a, axes, mask, out }) in variants.into_iter().enumerate() {
        let mut args = vec![data(rand(&shape, 1 + k as u64, -1.0, 1.0), &shape)];
        if let Some(ax) = &axes {
            args.push(ints(ax));
        }
        let outputs = vec![out];
        let case = Case {
            name: format!("ReduceMean {a:?} {axes:?}"),
            args,
            dys: dy_for(&outputs, 10 + k as u64),
            outputs,
            forward: &|l| reduce::lower(&a, l),
            backward: &|b| Op::ReduceMean(a.clone()).lower_backward(b),
        };
        let count: usize = shape.iter().zip(&mask).filter(|(_, r)| **r).map(|(d, _)| *d).product();
        let scale = if a.sum { count as f64 } else { 1.0 };
        check(&ctx, &case, &|xs| vec![mean_ref(&xs[0], &shape, &mask).iter().map(|v| v * scale).collect()]);
    }
}

/// ReduceMax (`max`) or ReduceMin over the dims of `mask`, in f64.
fn extreme_ref(x: &[f64], shape: &[usize], mask: &[bool], max: bool) -> Vec<f64> {
    let kept: Vec<usize> = shape.iter().zip(mask).map(|(&s, &r)| if r { 1 } else { s }).collect();
    let mut out = vec![if max { f64::NEG_INFINITY } else { f64::INFINITY }; numel(&kept)];
    for (i, &v) in x.iter().enumerate() {
        let idx = unravel(i, shape);
        let o = idx.iter().zip(&kept).fold(0, |acc, (&j, &s)| acc * s + if s == 1 { 0 } else { j });
        out[o] = if max { out[o].max(v) } else { out[o].min(v) };
    }
    out
}

/// ReduceMax, ReduceMin and GlobalMaxPool: dY goes to the extreme, shared evenly among tied
/// elements (torch's amax rule; central differences at a tie give the same half), through the
/// per-thread and the workgroup forward kernels.
#[gpu_test]
fn reduce_max_and_min_match_finite_differences(ctx: GpuContext) {
    use acclimate::ops::reduce::Extreme;
    let attrs = |extreme, keepdims: bool, axes: Option<Vec<i64>>| ReduceMeanAttrs {
        sum: false,
        extreme: Some(extreme),
        keepdims,
        axes,
        axes_input: false,
        noop_with_empty_axes: false,
        from_axis: None,
    };
    // Distinct values a multiple of 1/64 apart (no tie within a finite-difference step), ties
    // (integers repeated), and a 320-element reduction (the workgroup kernel).
    let spread = |n: usize, seed: u64| -> Vec<f32> {
        let mut v: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) / 64.0).collect();
        let r = rand(&[n], seed, 0.0, 1.0);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| r[a].total_cmp(&r[b]));
        v = order.iter().map(|&i| v[i]).collect();
        v
    };
    // Two-way ties at every group's extreme along the last axis: each gets half of dY, which is
    // what central differences give at a two-way tie (at a k-way one they still give a half,
    // where the rule gives 1/k).
    let ties = |pattern: [f32; 5]| -> Vec<f32> { (0..120).map(|i| pattern[i % 5] + (i / 5) as f32 / 32.0).collect() };
    // (attributes, X's shape, X, the reduced dims, dY's shape)
    type ExtremeCase = (ReduceMeanAttrs, Vec<usize>, Vec<f32>, Vec<bool>, Vec<usize>);
    let cases: Vec<ExtremeCase> = vec![
        (
            attrs(Extreme::Max, false, Some(vec![1, 3])),
            vec![2, 3, 4, 5],
            spread(120, 1),
            vec![false, true, false, true],
            vec![2, 4],
        ),
        (attrs(Extreme::Min, true, None), vec![2, 3, 4, 5], spread(120, 2), vec![true; 4], vec![1, 1, 1, 1]),
        (
            ReduceMeanAttrs::global_max(),
            vec![2, 3, 4, 5],
            spread(120, 3),
            vec![false, false, true, true],
            vec![2, 3, 1, 1],
        ),
        (
            attrs(Extreme::Max, false, Some(vec![-1])),
            vec![2, 3, 4, 5],
            ties([0.1, 0.3, 0.9, 0.2, 0.9]),
            vec![false, false, false, true],
            vec![2, 3, 4],
        ),
        (
            attrs(Extreme::Min, true, Some(vec![3])),
            vec![2, 3, 4, 5],
            ties([0.5, -0.7, 0.2, -0.7, 0.1]),
            vec![false, false, false, true],
            vec![2, 3, 4, 1],
        ),
        (
            attrs(Extreme::Min, true, Some(vec![0, 2])),
            vec![2, 3, 4, 5],
            spread(120, 5),
            vec![true, false, true, false],
            vec![1, 3, 1, 5],
        ),
        (attrs(Extreme::Max, false, Some(vec![1])), vec![2, 320], spread(640, 4), vec![false, true], vec![2]),
    ];
    for (k, (a, shape, x, mask, out)) in cases.into_iter().enumerate() {
        let max = a.extreme == Some(Extreme::Max);
        let outputs = vec![out];
        let case = Case {
            name: format!("{a:?} on {shape:?}"),
            args: vec![data(x, &shape)],
            dys: dy_for(&outputs, 20 + k as u64),
            outputs,
            forward: &|l| reduce::lower(&a, l),
            backward: &|b| Op::ReduceMean(a.clone()).lower_backward(b),
        };
        check(&ctx, &case, &|xs| vec![extreme_ref(&xs[0], &shape, &mask, max)]);
    }
}

fn softmax_ref(x: &[f64], outer: usize, len: usize, inner: usize, log: bool) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| o * len * inner + j * inner + i;
            let m = (0..len).map(|j| x[at(j)]).fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = (0..len).map(|j| (x[at(j)] - m).exp()).sum();
            for j in 0..len {
                y[at(j)] = if log { x[at(j)] - m - s.ln() } else { (x[at(j)] - m).exp() / s };
            }
        }
    }
    y
}

#[gpu_test]
fn softmax_and_log_softmax_match_finite_differences(ctx: GpuContext) {
    // (shape, axis, opset < 13, outer, len, inner): along a middle axis, coerced to 2-D, and a
    // row long enough for the workgroup kernel.
    let layouts: Vec<(Vec<usize>, i64, bool, usize, usize, usize)> = vec![
        (vec![2, 5, 3], 1, false, 2, 5, 3),
        (vec![2, 3, 4], 1, true, 2, 12, 1),
        (vec![3, 80], -1, false, 3, 80, 1),
    ];
    for (k, (shape, axis, coerce_2d, outer, len, inner)) in layouts.into_iter().enumerate() {
        for log in [false, true] {
            let a = SoftmaxAttrs { axis, log, coerce_2d };
            let outputs = vec![shape.clone()];
            let case = Case {
                name: format!("{a:?} on {shape:?}"),
                args: vec![data(rand(&shape, 1 + k as u64, -3.0, 3.0), &shape)],
                dys: dy_for(&outputs, 10 + k as u64),
                outputs,
                forward: &|l| softmax::lower(&a, l),
                backward: &|b| Op::Softmax(a.clone()).lower_backward(b),
            };
            check(&ctx, &case, &|xs| vec![softmax_ref(&xs[0], outer, len, inner, log)]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------------

/// The f64 reference of a data-movement op: its CPU evaluation on element ids (1 + a running
/// index over all data inputs; 0 marks Pad's fill) says where each output element comes from.
fn layout_ref(op: &LayoutOp, args: &[Arg]) -> impl Fn(&[Vec<f64>]) -> Vec<Vec<f64>> + use<> {
    let mut origin = Vec::new();
    let mut tensors = Vec::new();
    for (j, a) in args.iter().enumerate() {
        tensors.push(match a {
            // Data inputs, frozen ones included (Concat's), get ids; integer inputs are attributes.
            Arg::Data { shape, .. } | Arg::Const(Tensor { dtype: DType::F32, shape, .. }) => {
                let ids: Vec<i64> = (0..numel(shape))
                    .map(|e| {
                        origin.push((j, e));
                        origin.len() as i64
                    })
                    .collect();
                Some(Tensor::i64(shape.clone(), ids))
            }
            Arg::Const(t) => Some(t.clone()),
            Arg::Absent => None,
        });
    }
    let refs: Vec<Option<&Tensor>> = tensors.iter().map(|t| t.as_ref()).collect();
    let outs = op.eval(&refs).expect("CPU evaluation");
    let maps: Vec<Vec<Option<(usize, usize)>>> = outs
        .iter()
        .map(|t| {
            assert!(matches!(t.data, Data::I64(_)), "ids stay integers");
            t.to_i64_vec().iter().map(|&id| if id == 0 { None } else { Some(origin[id as usize - 1]) }).collect()
        })
        .collect();
    move |xs: &[Vec<f64>]| maps.iter().map(|m| m.iter().map(|o| o.map_or(0.0, |(j, e)| xs[j][e])).collect()).collect()
}

fn layout_outputs(op: &LayoutOp, args: &[Arg]) -> Vec<Vec<usize>> {
    let inputs: Vec<Option<acclimate::ops::Input<'_>>> = args
        .iter()
        .map(|a| match a {
            Arg::Data { shape, .. } => Some(acclimate::ops::Input { shape, dtype: DType::F32, value: None }),
            Arg::Const(t) => Some(acclimate::ops::Input { shape: &t.shape, dtype: t.dtype, value: Some(t) }),
            Arg::Absent => None,
        })
        .collect();
    op.infer(&inputs).expect("shapes infer").into_iter().filter(|(_, d)| *d == DType::F32).map(|(s, _)| s).collect()
}

fn check_layout(ctx: &GpuContext, op: LayoutOp, args: Vec<Arg>, seed: u64, drop_grads: &[usize]) {
    let outputs = layout_outputs(&op, &args);
    let mut dys = dy_for(&outputs, seed);
    for &k in drop_grads {
        dys[k] = None;
    }
    let reference = layout_ref(&op, &args);
    let case = Case {
        name: format!("{op:?}"),
        args,
        outputs,
        dys,
        forward: &|l| op.lower(l),
        backward: &|b| Op::Layout(op.clone()).lower_backward(b),
    };
    check(ctx, &case, &reference);
}

#[gpu_test]
fn views_copy_or_add_their_gradient(ctx: GpuContext) {
    let s = [2, 3, 4];
    check_layout(
        &ctx,
        LayoutOp::Reshape { allowzero: false },
        vec![data(rand(&s, 1, -1.0, 1.0), &s), ints(&[4, -1])],
        2,
        &[],
    );
    check_layout(&ctx, LayoutOp::Flatten { axis: 1 }, vec![data(rand(&s, 3, -1.0, 1.0), &s)], 4, &[]);
    check_layout(
        &ctx,
        LayoutOp::Unsqueeze { axes: IntsArg::Attr(vec![0, 3]) },
        vec![data(rand(&s, 5, -1.0, 1.0), &s)],
        6,
        &[],
    );
    check_layout(&ctx, LayoutOp::Identity, vec![data(rand(&s, 7, -1.0, 1.0), &s)], 8, &[]);
}

#[gpu_test]
fn transpose_concat_split_slice_match_finite_differences(ctx: GpuContext) {
    let s = [2, 3, 4];
    check_layout(
        &ctx,
        LayoutOp::Transpose { perm: Some(vec![2, 0, 1]) },
        vec![data(rand(&s, 1, -1.0, 1.0), &s)],
        2,
        &[],
    );
    check_layout(
        &ctx,
        LayoutOp::Transpose { perm: None },
        vec![data(rand(&[2, 3, 2, 5], 3, -1.0, 1.0), &[2, 3, 2, 5])],
        4,
        &[],
    );
    // Concat of three, the middle one frozen.
    check_layout(
        &ctx,
        LayoutOp::Concat { axis: 1 },
        vec![
            data(rand(&[2, 1, 4], 5, -1.0, 1.0), &[2, 1, 4]),
            frozen(rand(&[2, 2, 4], 6, -1.0, 1.0), &[2, 2, 4]),
            data(rand(&[2, 3, 4], 7, -1.0, 1.0), &[2, 3, 4]),
        ],
        8,
        &[],
    );
    // Split into three, the middle output without a gradient: its block must come out zero.
    let split = LayoutOp::Split { axis: -1, split: IntsArg::Input(1), num_outputs: None, outputs: 3 };
    check_layout(&ctx, split.clone(), vec![data(rand(&[3, 7], 9, -1.0, 1.0), &[3, 7]), ints(&[2, 4, 1])], 10, &[1]);
    check_layout(&ctx, split, vec![data(rand(&[3, 7], 11, -1.0, 1.0), &[3, 7]), ints(&[2, 4, 1])], 12, &[]);
    // Slice with a step of 2, a negative step, and negative indices.
    let slice = LayoutOp::Slice {
        starts: IntsArg::Input(1),
        ends: IntsArg::Input(2),
        axes: IntsArg::Input(3),
        steps: IntsArg::Input(4),
    };
    check_layout(
        &ctx,
        slice.clone(),
        vec![
            data(rand(&[4, 5, 6], 13, -1.0, 1.0), &[4, 5, 6]),
            ints(&[1, -1, 0]),
            ints(&[4, 0, 6]),
            ints(&[0, 1, 2]),
            ints(&[2, -2, 1]),
        ],
        14,
        &[],
    );
    // A slice that reverses a whole axis covers the input: no zero fill, every element written.
    check_layout(
        &ctx,
        slice,
        vec![data(rand(&[3, 4], 15, -1.0, 1.0), &[3, 4]), ints(&[-1]), ints(&[i64::MIN]), Arg::Absent, ints(&[-1])],
        16,
        &[],
    );
}

#[gpu_test]
fn pad_folds_border_gradients_back(ctx: GpuContext) {
    let s = [2, 3, 4];
    for mode in [PadMode::Constant, PadMode::Reflect, PadMode::Edge] {
        let op = LayoutOp::Pad { mode, pads: IntsArg::Input(1), value: PadValue::Input(2), axes: IntsArg::Absent };
        // Both spatial-like axes padded, N untouched.
        check_layout(&ctx, op.clone(), vec![data(rand(&s, 1, -1.0, 1.0), &s), ints(&[0, 2, 1, 0, 1, 3])], 2, &[]);
        // Pads wider than the axis (iterated reflection), and a negative pad that crops.
        let wide = if mode == PadMode::Reflect { 5 } else { 6 };
        check_layout(&ctx, op.clone(), vec![data(rand(&s, 3, -1.0, 1.0), &s), ints(&[0, wide, -1, 0, 2, 2])], 4, &[]);
        // An axis of size 1.
        check_layout(
            &ctx,
            op,
            vec![data(rand(&[2, 1, 3], 5, -1.0, 1.0), &[2, 1, 3]), ints(&[1, 2, 0, 0, 1, 1])],
            6,
            &[],
        );
    }
    // The opset-18 axes input.
    let op = LayoutOp::Pad {
        mode: PadMode::Reflect,
        pads: IntsArg::Input(1),
        value: PadValue::Input(2),
        axes: IntsArg::Input(3),
    };
    check_layout(&ctx, op, vec![data(rand(&s, 7, -1.0, 1.0), &s), ints(&[1, 2]), Arg::Absent, ints(&[-1])], 8, &[]);
}

#[gpu_test]
fn attribute_like_inputs_get_no_gradient(ctx: GpuContext) {
    let op = LayoutOp::Reshape { allowzero: false };
    let args =
        vec![data(rand(&[2, 3], 1, -1.0, 1.0), &[2, 3]), Arg::Data { x: vec![3.0, 2.0], shape: vec![2], grad: true }];
    let outputs = vec![vec![6]];
    let case = Case {
        name: "Reshape shape gradient".into(),
        args,
        dys: dy_for(&outputs, 2),
        outputs,
        forward: &|_| Ok(()),
        backward: &|b| {
            // The shape must be a constant for resolution; give it one and still ask for its gradient.
            b.inputs[1] = Some(Operand {
                buf: BufRef::Value(1),
                shape: vec![1],
                value: Some(Arc::new(Tensor::i64(vec![1], vec![6]))),
            });
            Op::Layout(op.clone()).lower_backward(b)
        },
    };
    let e = run_case(&ctx, &case, false).err().expect("refused");
    assert!(e.contains("no gradient"), "{e}");
}

/// Gather of run-time data by constant indices (strided copies per run of consecutive indices;
/// beyond 16 runs one indexed kernel and, backward, one summing kernel): the gradient is scattered
/// back, added where an index repeats, zero where none points.
#[gpu_test]
fn gather_scatters_its_gradient_back(ctx: GpuContext) {
    use acclimate::ops::shape::ShapeOp;
    // 40 scattered indices into 9 rows, repeats and negatives among them: a relative-position
    // bias table's index (the indexed kernels).
    let scattered: Vec<i64> = (0..40).map(|i: i64| (i * 7 + i * i) % 17 - 8).collect();
    let cases: Vec<(Vec<usize>, i64, Tensor)> = vec![
        // Repeats (3 twice, 4 as -1), a run (3, 4) and a gap (0, 2 never read).
        (vec![2, 5, 3], 1, Tensor::i64(vec![2, 2], vec![3, 1, 3, -1])),
        (vec![2, 5, 3], 1, Tensor::i64(vec![3], vec![1, 2, 3])),
        // A scalar index drops the axis: the class token of a sequence.
        (vec![2, 5, 3], 2, Tensor::i64(vec![], vec![-1])),
        (vec![2, 5, 3], 0, Tensor::i64(vec![1], vec![1])),
        (vec![2, 9, 3], 1, Tensor::i64(vec![5, 8], scattered.clone())),
        (vec![9, 2], 0, Tensor::i64(vec![40], scattered)),
    ];
    for (k, (s, axis, indices)) in cases.into_iter().enumerate() {
        let op = Op::Shape(ShapeOp::Gather { axis });
        let a = axis as usize;
        let dim = s[a];
        let idx: Vec<usize> =
            indices.to_i64_vec().iter().map(|&i| if i < 0 { (i + dim as i64) as usize } else { i as usize }).collect();
        let mut out: Vec<usize> = s[..a].to_vec();
        out.extend_from_slice(&indices.shape);
        out.extend_from_slice(&s[a + 1..]);
        let (outer, inner): (usize, usize) = (s[..a].iter().product(), s[a + 1..].iter().product());
        let reference = move |xs: &[Vec<f64>]| {
            let mut y = Vec::new();
            for o in 0..outer {
                for &j in &idx {
                    y.extend_from_slice(&xs[0][(o * dim + j) * inner..(o * dim + j + 1) * inner]);
                }
            }
            vec![y]
        };
        let outputs = vec![out];
        let case = Case {
            name: format!("Gather axis {axis} indices {:?}", indices.to_i64_vec()),
            args: vec![data(random_f32(numel(&s), 90 + k as u64, -1.0, 1.0), &s), Arg::Const(indices)],
            dys: dy_for(&outputs, 95 + k as u64),
            outputs,
            forward: &|l| op.lower(l),
            backward: &|b| op.lower_backward(b),
        };
        check(&ctx, &case, &reference);
    }
}

/// ScatterND (reduction none) on run-time data and updates, as the IR expands it (`Op::Scatter`
/// with constant positions, -1 where a later index overwrites an update): the data's gradient is
/// dY except at the written positions, the updates' is dY where each landed, 0 where overwritten.
#[gpu_test]
fn scatter_nd_splits_its_gradient_between_data_and_updates(ctx: GpuContext) {
    let s = [3, 4, 2];
    // Rows (1, 2), (0, 0), (1, 2) again: the first write to (1, 2) is overwritten.
    let rows: [usize; 3] = [6, 0, 6];
    let mut pos = Vec::new();
    for (t, &r) in rows.iter().enumerate() {
        for e in 0..2 {
            pos.push(if t == 0 { -1.0 } else { (r * 2 + e) as f32 });
        }
    }
    let positions = Tensor::f32(vec![3, 2], pos.clone());
    let reference = move |xs: &[Vec<f64>]| {
        let mut y = xs[0].clone();
        for (k, &p) in pos.iter().enumerate() {
            if p >= 0.0 {
                y[p as usize] = xs[2][k];
            }
        }
        vec![y]
    };
    let outputs = vec![s.to_vec()];
    let case = Case {
        name: "ScatterND rows [[1, 2], [0, 0], [1, 2]]".into(),
        args: vec![
            data(random_f32(numel(&s), 110, -1.0, 1.0), &s),
            Arg::Const(positions),
            data(random_f32(6, 111, -1.0, 1.0), &[3, 2]),
        ],
        dys: dy_for(&outputs, 112),
        outputs,
        forward: &|l| Op::Scatter.lower(l),
        backward: &|b| Op::Scatter.lower_backward(b),
    };
    check(&ctx, &case, &reference);
}

/// Expand (numpy broadcasting both ways: a new leading dim, a 1 stretched, a 1 in the target kept
/// at the input's size): the copy reads with stride 0, the gradient sums over the broadcast dims,
/// both across a workgroup-long reduction (64 × 5 = 320 summed elements per input element).
#[gpu_test]
fn expand_sums_its_gradient_over_the_broadcast_dims(ctx: GpuContext) {
    let shape = |v: &[i64]| Arg::Const(Tensor::i64(vec![v.len()], v.to_vec()));
    let s = [3, 1, 4];
    check_layout(
        &ctx,
        LayoutOp::Expand,
        vec![data(random_f32(numel(&s), 101, -1.0, 1.0), &s), shape(&[2, 1, 5, 1])],
        102,
        &[],
    );
    let s = [1, 6];
    check_layout(
        &ctx,
        LayoutOp::Expand,
        vec![data(random_f32(6, 103, -1.0, 1.0), &s), shape(&[64, 5, 1, 6])],
        104,
        &[],
    );
}

/// Tile on run-time data (XCiT's position encoding repeated over the batch): the forward copy over
/// the output viewed as [r0, d0, r1, d1, …], the gradient summed over the repeats — repeats of
/// unit dims (an Expand), of longer dims (modular reads) and a rank-4 input repeated along every
/// dim (a copy of rank 8).
#[gpu_test]
fn tile_sums_its_gradient_over_the_repeats(ctx: GpuContext) {
    let repeats = |v: &[i64]| Arg::Const(Tensor::i64(vec![v.len()], v.to_vec()));
    for (k, (s, r)) in [(vec![1, 3, 2], vec![4, 1, 1]), (vec![2, 3], vec![3, 2]), (vec![2, 3, 2, 2], vec![2, 2, 3, 2])]
        .into_iter()
        .enumerate()
    {
        let x = data(random_f32(numel(&s), 110 + k as u64, -1.0, 1.0), &s);
        check_layout(&ctx, LayoutOp::Tile, vec![x, repeats(&r)], 120 + k as u64, &[]);
    }
}
