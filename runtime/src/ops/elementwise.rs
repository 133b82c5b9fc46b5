//! Activations and broadcasting arithmetic (`shaders/elementwise.wgsl`).
//!
//! In the reverse pass, each operand's gradient sums dY over the dims that operand was broadcast
//! along, one thread (or, for long sums, one workgroup) per gradient element in a fixed order.

use std::sync::Arc;

use super::{
    Attrs, BackwardLowering, BufRef, GradInput, Input, Lowering, OpReason, OpResult, Operand, broadcast_shapes,
    broadcast_strides, check_rank, f32_out, required, u32s,
};
use crate::gpu::{KernelKey, Params, Shader, grid_1d};
use crate::tensor::{DType, Data, Tensor};

/// A unary activation with its attributes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    Relu,
    LeakyRelu {
        alpha: f32,
    },
    Sigmoid,
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    HardSwish,
    /// Clip with bounds known at load time (attributes before opset 11, inputs after).
    Clip {
        min: f32,
        max: f32,
    },
    /// Natural logarithm: -inf at 0, NaN below.
    Log,
    Exp,
    Tanh,
    Neg,
    Abs,
    /// Square root: NaN below 0.
    Sqrt,
    /// The error function.
    Erf,
    /// x·Φ(x) (opset 20's Gelu, `approximate = "none"`), or with `tanh` its tanh approximation.
    Gelu {
        tanh: bool,
    },
    /// ln(1 + eˣ).
    Softplus,
    /// x/(1 + |x|).
    Softsign,
    /// x above 0, alpha·(eˣ − 1) at or below.
    Elu {
        alpha: f32,
    },
    /// gamma·Elu(alpha).
    Selu {
        alpha: f32,
        gamma: f32,
    },
    /// 1/x.
    Reciprocal,
    /// x·tanh(softplus(x)) (opset 18).
    Mish,
}

impl Unary {
    pub fn parse(op_type: &str, a: &Attrs<'_>) -> OpResult<Unary> {
        Ok(match op_type {
            "Relu" => Unary::Relu,
            "LeakyRelu" => Unary::LeakyRelu { alpha: a.float("alpha", 0.01)? },
            "Sigmoid" => Unary::Sigmoid,
            "HardSigmoid" => Unary::HardSigmoid { alpha: a.float("alpha", 0.2)?, beta: a.float("beta", 0.5)? },
            "HardSwish" => Unary::HardSwish,
            "Clip" => Unary::Clip { min: a.float("min", f32::MIN)?, max: a.float("max", f32::MAX)? },
            "Log" => Unary::Log,
            "Exp" => Unary::Exp,
            "Tanh" => Unary::Tanh,
            "Neg" => Unary::Neg,
            "Abs" => Unary::Abs,
            "Sqrt" => Unary::Sqrt,
            "Erf" => Unary::Erf,
            "Softplus" => Unary::Softplus,
            "Softsign" => Unary::Softsign,
            "Elu" => Unary::Elu { alpha: a.float("alpha", 1.0)? },
            "Selu" => Unary::Selu { alpha: a.float("alpha", 1.673_263_2)?, gamma: a.float("gamma", 1.050_701)? },
            "Reciprocal" => Unary::Reciprocal,
            "Mish" => Unary::Mish,
            "Gelu" => match a.string("approximate", "none")?.as_str() {
                "none" => Unary::Gelu { tanh: false },
                "tanh" => Unary::Gelu { tanh: true },
                other => {
                    return Err(OpReason::Attribute(format!(
                        "Gelu approximate = \"{other}\" (ONNX defines \"none\" and \"tanh\")"
                    )));
                }
            },
            other => return Err(OpReason::Internal(format!("{other} is not a unary activation"))),
        })
    }

    /// The op code of `elementwise.wgsl` and the (alpha, beta) uniform values.
    fn code(&self) -> (i32, f32, f32) {
        match *self {
            Unary::Relu => (0, 0.0, 0.0),
            Unary::LeakyRelu { alpha } => (1, alpha, 0.0),
            Unary::Sigmoid => (2, 0.0, 0.0),
            Unary::HardSigmoid { alpha, beta } => (3, alpha, beta),
            Unary::HardSwish => (4, 0.0, 0.0),
            Unary::Clip { min, max } => (5, min, max),
            Unary::Log => (6, 0.0, 0.0),
            Unary::Exp => (7, 0.0, 0.0),
            Unary::Tanh => (8, 0.0, 0.0),
            Unary::Neg => (9, 0.0, 0.0),
            Unary::Abs => (10, 0.0, 0.0),
            Unary::Sqrt => (11, 0.0, 0.0),
            Unary::Erf => (12, 0.0, 0.0),
            Unary::Gelu { tanh } => (13, if tanh { 1.0 } else { 0.0 }, 0.0),
            Unary::Softplus => (14, 0.0, 0.0),
            Unary::Softsign => (15, 0.0, 0.0),
            Unary::Elu { alpha } => (16, alpha, 0.0),
            Unary::Selu { alpha, gamma } => (17, alpha, gamma),
            Unary::Reciprocal => (18, 0.0, 0.0),
            Unary::Mish => (19, 0.0, 0.0),
        }
    }

    /// The same function on the CPU (constant folding and tests).
    pub fn apply(&self, v: f32) -> f32 {
        match *self {
            // ONNX Runtime's comparisons, not f32::max (which drops NaN): NaN and -0 pass through.
            Unary::Relu => {
                if v < 0.0 {
                    0.0
                } else {
                    v
                }
            }
            Unary::LeakyRelu { alpha } => {
                if v < 0.0 {
                    v * alpha
                } else {
                    v
                }
            }
            Unary::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            Unary::HardSigmoid { alpha, beta } => (alpha * v + beta).clamp(0.0, 1.0),
            Unary::HardSwish => v * (v / 6.0 + 0.5).clamp(0.0, 1.0),
            // A NaN bound fails both comparisons and so bounds nothing, as in ONNX Runtime.
            Unary::Clip { min, max } => {
                let lo = if v < min { min } else { v };
                if lo > max { max } else { lo }
            }
            Unary::Log => v.ln(),
            Unary::Exp => v.exp(),
            Unary::Tanh => v.tanh(),
            Unary::Neg => -v,
            Unary::Abs => v.abs(),
            Unary::Sqrt => v.sqrt(),
            Unary::Erf => erf(v as f64) as f32,
            Unary::Gelu { tanh: false } => {
                let x = v as f64;
                (x * normal_cdf(x)) as f32
            }
            Unary::Gelu { tanh: true } => {
                let x = v as f64;
                let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                (x / (1.0 + (-2.0 * u).exp())) as f32
            }
            Unary::Softplus => softplus(v as f64) as f32,
            Unary::Softsign => v / (1.0 + v.abs()),
            Unary::Elu { alpha } => elu(v as f64, alpha as f64) as f32,
            Unary::Selu { alpha, gamma } => (gamma as f64 * elu(v as f64, alpha as f64)) as f32,
            Unary::Reciprocal => 1.0 / v,
            Unary::Mish => {
                let x = v as f64;
                (x * softplus(x).tanh()) as f32
            }
        }
    }
}

/// ln(1 + eˣ) without overflow: max(x, 0) + ln(1 + e^−|x|).
fn softplus(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn elu(x: f64, alpha: f64) -> f64 {
    if x <= 0.0 { alpha * x.exp_m1() } else { x }
}

/// erfc(a) for a ≥ 1 as the kernel computes it (`erfc_tail` in elementwise.wgsl: the fit of
/// tools/erf_fit.py), in f64 for constant folding.
fn erfc_tail(a: f64) -> f64 {
    erfc_with_square(a, a * a)
}

/// erfc(a) for a ≥ 1 given a² (Φ passes x²/2 computed from x).
fn erfc_with_square(a: f64, a2: f64) -> f64 {
    if a >= 10.0 {
        return 0.0;
    }
    const P: [f64; 9] = [
        -0.7823777794837952,
        0.3265846371650696,
        0.017190933227539062,
        -0.004760499112308025,
        -0.001008396502584219,
        0.0001801046309992671,
        6.426724576158449e-05,
        -9.681571100372821e-06,
        -3.994111466454342e-06,
    ];
    let t = 1.0 / (1.0 + 0.5 * a);
    let s = 4.0 * t - 5.0 / 3.0;
    let p = P.iter().rev().fold(0.0, |acc, &c| acc * s + c);
    t * (p - a2).exp()
}

/// erf: its Taylor series below 1 (terms to n = 11), 1 − erfc above; NaN passes through.
fn erf(x: f64) -> f64 {
    let a = x.abs();
    if a < 1.0 {
        let u = a * a;
        let (mut p, mut fact) = (0.0, 1.0);
        let mut terms = [0.0; 12];
        for (n, t) in terms.iter_mut().enumerate() {
            if n > 0 {
                fact *= n as f64;
            }
            let sign = if n % 2 == 0 { 1.0 } else { -1.0 };
            *t = sign / (fact * (2 * n + 1) as f64);
        }
        for t in terms.iter().rev() {
            p = p * u + t;
        }
        2.0 / std::f64::consts::PI.sqrt() * x * p
    } else if a >= 1.0 {
        (1.0 - erfc_tail(a)).copysign(x)
    } else {
        x
    }
}

/// Φ(x), as erfc(|z|)/2 below 0 (the kernel's `normal_cdf`).
fn normal_cdf(x: f64) -> f64 {
    let z = x * std::f64::consts::FRAC_1_SQRT_2;
    if z.abs() < 1.0 {
        return 0.5 + 0.5 * erf(z);
    }
    let c = 0.5 * erfc_with_square(z.abs(), 0.5 * x * x);
    if x < 0.0 { c } else { 1.0 - c }
}

/// A broadcasting binary op. PRelu uses the same kernel with the slope as the right operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryKind {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    PRelu,
    /// The larger operand (NaN if either is NaN).
    Max,
    /// The smaller operand (NaN if either is NaN).
    Min,
}

impl BinaryKind {
    pub fn parse(op_type: &str) -> OpResult<BinaryKind> {
        Ok(match op_type {
            "Add" => BinaryKind::Add,
            "Sub" => BinaryKind::Sub,
            "Mul" => BinaryKind::Mul,
            "Div" => BinaryKind::Div,
            "Pow" => BinaryKind::Pow,
            "PRelu" => BinaryKind::PRelu,
            "Max" => BinaryKind::Max,
            "Min" => BinaryKind::Min,
            other => return Err(OpReason::Internal(format!("{other} is not a binary op"))),
        })
    }

    fn code(self) -> i32 {
        match self {
            BinaryKind::Add => 0,
            BinaryKind::Sub => 1,
            BinaryKind::Mul => 2,
            BinaryKind::Div => 3,
            BinaryKind::Pow => 4,
            BinaryKind::PRelu => 5,
            BinaryKind::Max => 6,
            BinaryKind::Min => 7,
        }
    }

    pub fn apply_f32(self, a: f32, b: f32) -> f32 {
        match self {
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
            BinaryKind::Max | BinaryKind::Min if a.is_nan() || b.is_nan() => f32::NAN,
            BinaryKind::Max => a.max(b),
            BinaryKind::Min => a.min(b),
        }
    }

    fn apply_i64(self, a: i64, b: i64) -> OpResult<i64> {
        Ok(match self {
            BinaryKind::Add => a.wrapping_add(b),
            BinaryKind::Sub => a.wrapping_sub(b),
            BinaryKind::Mul => a.wrapping_mul(b),
            BinaryKind::Div => {
                if b == 0 {
                    return Err(OpReason::Value("integer division by zero in a constant subgraph".into()));
                }
                a.wrapping_div(b)
            }
            BinaryKind::Pow => {
                if b < 0 {
                    return Err(OpReason::Value("negative integer exponent in a constant subgraph".into()));
                }
                a.wrapping_pow(b.min(u32::MAX as i64) as u32)
            }
            BinaryKind::PRelu => {
                if a < 0 {
                    a.wrapping_mul(b)
                } else {
                    a
                }
            }
            BinaryKind::Max => a.max(b),
            BinaryKind::Min => a.min(b),
        })
    }
}

pub fn infer_unary(inputs: &[Option<Input<'_>>]) -> OpResult<Vec<(Vec<usize>, DType)>> {
    let x = required(inputs, 0, "X")?;
    Ok(vec![(x.shape.to_vec(), x.dtype)])
}

pub fn infer_prelu(inputs: &[Option<Input<'_>>]) -> OpResult<Vec<(Vec<usize>, DType)>> {
    let x = required(inputs, 0, "X")?;
    let s = required(inputs, 1, "slope")?;
    let out = broadcast_shapes(x.shape, s.shape)?;
    if out != x.shape {
        return Err(OpReason::Shape(format!("slope of shape {:?} does not broadcast to X {:?}", s.shape, x.shape)));
    }
    Ok(f32_out(out))
}

pub fn infer_binary(kind: BinaryKind, inputs: &[Option<Input<'_>>]) -> OpResult<Vec<(Vec<usize>, DType)>> {
    if kind == BinaryKind::PRelu {
        return infer_prelu(inputs);
    }
    let a = required(inputs, 0, "A")?;
    let b = required(inputs, 1, "B")?;
    let out = broadcast_shapes(a.shape, b.shape)?;
    // Pow's result takes the base's type; the others require equal types.
    Ok(vec![(out, a.dtype)])
}

pub fn eval_unary(u: &Unary, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
    let x = inputs.first().copied().flatten().ok_or_else(|| OpReason::MissingInput { index: 0, what: "X".into() })?;
    // Shape arithmetic negates and takes absolute values of integer sizes: keep them integers.
    if let (Data::I64(v), Unary::Neg | Unary::Abs) = (&x.data, u) {
        let f = if *u == Unary::Neg { i64::wrapping_neg } else { i64::wrapping_abs };
        let out = v.iter().map(|&e| f(e)).collect();
        return Ok(vec![Tensor { dtype: x.dtype, shape: x.shape.clone(), data: Data::I64(out) }]);
    }
    let v: Vec<f32> = x.to_f32_vec().into_iter().map(|v| u.apply(v)).collect();
    Ok(vec![Tensor::f32(x.shape.clone(), v)])
}

/// The bounds of opset-11+ Clip from its optional constant inputs.
pub(crate) fn clip_bounds(min: Option<&Tensor>, max: Option<&Tensor>) -> OpResult<Unary> {
    let scalar = |t: &Tensor, what: &str| -> OpResult<f32> {
        if t.numel() != 1 {
            return Err(OpReason::Shape(format!("Clip {what} must be a scalar, got shape {:?}", t.shape)));
        }
        Ok(t.to_f32_vec()[0])
    };
    Ok(Unary::Clip {
        min: min.map(|t| scalar(t, "min")).transpose()?.unwrap_or(f32::MIN),
        max: max.map(|t| scalar(t, "max")).transpose()?.unwrap_or(f32::MAX),
    })
}

pub fn eval_clip_inputs(inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
    let x = inputs.first().copied().flatten().ok_or_else(|| OpReason::MissingInput { index: 0, what: "X".into() })?;
    let u = clip_bounds(inputs.get(1).copied().flatten(), inputs.get(2).copied().flatten())?;
    match &x.data {
        Data::I64(v) => {
            let (lo, hi) = match u {
                Unary::Clip { min, max } => (min as f64, max as f64),
                _ => unreachable!(),
            };
            let out = v.iter().map(|&e| (e as f64).clamp(lo, hi) as i64).collect();
            Ok(vec![Tensor { dtype: x.dtype, shape: x.shape.clone(), data: Data::I64(out) }])
        }
        Data::F32(_) => eval_unary(&u, &inputs[..1]),
    }
}

pub fn eval_binary(kind: BinaryKind, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
    let a = inputs.first().copied().flatten().ok_or_else(|| OpReason::MissingInput { index: 0, what: "A".into() })?;
    let b = inputs.get(1).copied().flatten().ok_or_else(|| OpReason::MissingInput { index: 1, what: "B".into() })?;
    let out = broadcast_shapes(&a.shape, &b.shape)?;
    let sa = broadcast_strides(&a.shape, &out);
    let sb = broadcast_strides(&b.shape, &out);
    let n: usize = out.iter().product();
    let index = |i: usize| {
        let (mut rem, mut ia, mut ib) = (i, 0, 0);
        for d in (0..out.len()).rev() {
            let idx = rem % out[d];
            rem /= out[d];
            ia += idx * sa[d];
            ib += idx * sb[d];
        }
        (ia, ib)
    };
    let t = match (&a.data, &b.data) {
        (Data::I64(x), Data::I64(y)) => {
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                let (ia, ib) = index(i);
                v.push(kind.apply_i64(x[ia], y[ib])?);
            }
            Tensor { dtype: a.dtype, shape: out, data: Data::I64(v) }
        }
        _ => {
            let (x, y) = (a.to_f32_vec(), b.to_f32_vec());
            let v = (0..n)
                .map(|i| {
                    let (ia, ib) = index(i);
                    kind.apply_f32(x[ia], y[ib])
                })
                .collect();
            let mut t = Tensor::f32(out, v);
            if a.dtype.is_float() {
                t.dtype = a.dtype;
            }
            t
        }
    };
    Ok(vec![t])
}

fn unary_dispatch(u: &Unary, l: &mut Lowering, x: BufRef, n: usize) -> OpResult<()> {
    let y = l.output(0)?.buf;
    let (code, alpha, beta) = u.code();
    l.dispatch(
        KernelKey::new(Shader::Elementwise, "unary_main").with("OP", code),
        Params::new().u32(n as u32).f32(alpha).f32(beta),
        vec![x, y],
        grid_1d(n, 256),
    );
    Ok(())
}

pub fn lower_unary(u: &Unary, l: &mut Lowering) -> OpResult<()> {
    let x = l.input(0, "X")?;
    let (buf, n) = (x.buf, x.numel());
    unary_dispatch(u, l, buf, n)
}

/// The value of Clip's optional bound input `i` (which must be a constant).
fn constant_bound(inputs: &[Option<Operand>], i: usize, what: &str) -> OpResult<Option<Arc<Tensor>>> {
    match inputs.get(i).and_then(|x| x.as_ref()) {
        None => Ok(None),
        Some(op) => Ok(Some(op.value.clone().ok_or_else(|| {
            OpReason::Unsupported(format!("Clip {what} must be a constant (it depends on the model input)"))
        })?)),
    }
}

pub fn lower_clip_inputs(l: &mut Lowering) -> OpResult<()> {
    let u =
        clip_bounds(constant_bound(&l.inputs, 1, "min")?.as_deref(), constant_bound(&l.inputs, 2, "max")?.as_deref())?;
    lower_unary(&u, l)
}

pub fn lower_prelu(l: &mut Lowering) -> OpResult<()> {
    lower_binary(BinaryKind::PRelu, l)
}

pub fn lower_binary(kind: BinaryKind, l: &mut Lowering) -> OpResult<()> {
    let a = l.input(0, "A")?.clone();
    let b = l.input(1, "B")?.clone();
    let out = l.output(0)?.clone();
    check_rank(&out.shape)?;
    let n = out.numel();
    let sa = broadcast_strides(&a.shape, &out.shape);
    let sb = broadcast_strides(&b.shape, &out.shape);
    l.dispatch(
        KernelKey::new(Shader::Elementwise, "binary_main").with("OP", kind.code()),
        Params::new()
            .u32(n as u32)
            .u32(out.shape.len() as u32)
            .vec8u(&u32s(&out.shape))
            .vec8u(&u32s(&sa))
            .vec8u(&u32s(&sb)),
        vec![a.buf, b.buf, out.buf],
        grid_1d(n, 256),
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Reverse pass
// ------------------------------------------------------------------------------------------------

/// Broadcast reductions at least this long get a workgroup per gradient element instead of a
/// thread.
const GRAD_WORKGROUP_MIN: usize = 256;

/// What an activation's backward reads, as (input, output): the output wherever it determines
/// the derivative, since the output of an activation is usually the next layer's saved input
/// anyway, while its input (a BatchNormalization output) would be kept alive for this op alone.
///
/// ReLU, Clip (hardtanh convention: gradient only strictly inside (min, max)) and leaky ReLU with
/// a non-negative slope test `v > 0` or `min < v < max`, which holds for y exactly when it holds
/// for x; sigmoid is y(1 - y); hard sigmoid tests 0 < y < 1; exp is y, tanh 1 - y², sqrt
/// 1/(2y). Hard swish is not invertible on [-3, 0] and a negative leaky slope flips the sign
/// test, so those two read their input, as do log (1/x: exp(-y) would lose precision) and abs
/// (|x| has lost the sign). Neg's gradient is -dY and reads neither.
pub fn unary_backward_saves(u: &Unary) -> (bool, bool) {
    match *u {
        Unary::HardSwish
        | Unary::Log
        | Unary::Abs
        | Unary::Erf
        | Unary::Gelu { .. }
        | Unary::Softplus
        | Unary::Softsign
        | Unary::Elu { .. }
        | Unary::Selu { .. }
        | Unary::Reciprocal
        | Unary::Mish => (true, false),
        Unary::LeakyRelu { alpha } if alpha.is_nan() || alpha < 0.0 => (true, false),
        Unary::Neg => (false, false),
        _ => (false, true),
    }
}

/// Sums need no operand values; products, quotients, powers and PRelu do.
pub fn binary_backward_needs_inputs(k: BinaryKind) -> bool {
    !matches!(k, BinaryKind::Add | BinaryKind::Sub)
}

pub fn backward_unary(u: &Unary, b: &mut BackwardLowering) -> OpResult<()> {
    let (_, from_output) = unary_backward_saves(u);
    unary_grad(u, from_output, b)
}

pub fn backward_clip_inputs(b: &mut BackwardLowering) -> OpResult<()> {
    let u =
        clip_bounds(constant_bound(&b.inputs, 1, "min")?.as_deref(), constant_bound(&b.inputs, 2, "max")?.as_deref())?;
    // Clip's test reads the same from x and y, so bind whichever the planner keeps.
    let from_output = super::Op::ClipInputs.backward_saves().outputs;
    unary_grad(&u, from_output, b)
}

fn unary_grad(u: &Unary, from_output: bool, b: &mut BackwardLowering) -> OpResult<()> {
    for i in 1..b.grad_inputs.len() {
        if b.grad_input(i).is_some() {
            return Err(OpReason::Internal(format!("input {i} of an activation (a Clip bound) carries no gradient")));
        }
    }
    let Some(gx) = b.grad_input(0).cloned() else { return Ok(()) };
    let dy = b.grad_output(0)?.clone();
    // The kernel always binds a saved tensor; Neg reads none, so it gets dY again rather than a
    // forward tensor the planner need not keep alive.
    let saved = if matches!(u, Unary::Neg) {
        dy.clone()
    } else if from_output {
        b.output(0)?.clone()
    } else {
        b.input(0, "X")?.clone()
    };
    let n = dy.numel();
    if saved.numel() != n || gx.shape.iter().product::<usize>() != n {
        return Err(OpReason::Internal(format!(
            "activation gradient shapes disagree: dY {:?}, saved {:?}, dX {:?}",
            dy.shape, saved.shape, gx.shape
        )));
    }
    if n > u32::MAX as usize {
        return Err(OpReason::TooLarge(format!(
            "activation gradient has {n} elements, more than a 32-bit index covers"
        )));
    }
    if from_output && matches!(u, Unary::HardSwish | Unary::Log | Unary::Abs) {
        return Err(OpReason::Internal(format!("{u:?}'s gradient needs its input, not its output")));
    }
    let (code, alpha, beta) = u.code();
    b.dispatch(
        KernelKey::new(Shader::Elementwise, "unary_backward_main")
            .with("OP", code)
            .with("FROM_OUTPUT", from_output as i32)
            .with("ACCUM", gx.accumulate as i32),
        Params::new().u32(n as u32).f32(alpha).f32(beta),
        vec![dy.buf, saved.buf, gx.buf],
        grid_1d(n, 256),
    );
    Ok(())
}

/// One gradient's iteration space: the dims the operand keeps (which index its elements) and
/// the dims it was broadcast along (which its gradient sums over), each as (size, output
/// stride, other-operand stride), with unit dims dropped and mergeable neighbours merged.
#[derive(Debug, Default, PartialEq)]
struct GradSpace {
    kept: Vec<[usize; 3]>,
    red: Vec<[usize; 3]>,
}

fn grad_space(x: &[usize], other: &[usize], out: &[usize]) -> GradSpace {
    let sx = broadcast_strides(x, out);
    let so = broadcast_strides(other, out);
    let so_out = super::contiguous_strides(out);
    let mut g = GradSpace::default();
    for d in 0..out.len() {
        if out[d] == 1 {
            continue;
        }
        let dim = [out[d], so_out[d], so[d]];
        let list = if sx[d] != 0 { &mut g.kept } else { &mut g.red };
        // Two dims merge when the outer one's strides are the inner one's times its size in
        // both tensors (the operand's own layout is row major over its kept dims, so it agrees).
        match list.last_mut() {
            Some(last) if last[1] == dim[1] * dim[0] && last[2] == dim[2] * dim[0] => {
                *last = [last[0] * dim[0], dim[1], dim[2]];
            }
            _ => list.push(dim),
        }
    }
    g
}

/// The `GradParams` block of the broadcast-gradient kernels: `n` operand elements, each summing
/// `n_red` output positions over `g`'s kept and reduced dims, times `scale`.
fn grad_params(n: usize, n_red: usize, g: &GradSpace, scale: f32) -> Params {
    let col = |v: &[[usize; 3]], k: usize| u32s(&v.iter().map(|d| d[k]).collect::<Vec<_>>());
    Params::new()
        .u32(n as u32)
        .u32(n_red as u32)
        .u32(g.kept.len() as u32)
        .u32(g.red.len() as u32)
        .f32(scale)
        .vec8u(&col(&g.kept, 0))
        .vec8u(&col(&g.kept, 1))
        .vec8u(&col(&g.kept, 2))
        .vec8u(&col(&g.red, 0))
        .vec8u(&col(&g.red, 1))
        .vec8u(&col(&g.red, 2))
}

pub fn backward_binary(kind: BinaryKind, b: &mut BackwardLowering) -> OpResult<()> {
    let dy = b.grad_output(0)?.clone();
    check_rank(&dy.shape)?;
    if kind == BinaryKind::PRelu && b.grad_input(1).is_some() {
        return Err(OpReason::Internal("PRelu's slope is a frozen weight and gets no gradient".into()));
    }
    let shapes = [b.input(0, "A")?.shape.clone(), b.input(1, "B")?.shape.clone()];
    let bufs = [b.input(0, "A")?.buf, b.input(1, "B")?.buf];
    let n_out = dy.numel();
    if n_out > u32::MAX as usize {
        return Err(OpReason::TooLarge(format!("binary gradient over {n_out} elements exceeds a 32-bit index")));
    }
    if broadcast_shapes(&shapes[0], &shapes[1])? != dy.shape {
        return Err(OpReason::Internal(format!(
            "dY shape {:?} is not the broadcast of {:?} and {:?}",
            dy.shape, shapes[0], shapes[1]
        )));
    }
    for side in 0..2 {
        let Some(gx) = b.grad_input(side).cloned() else { continue };
        let (own, other) = (&shapes[side], &shapes[1 - side]);
        if gx.shape.iter().product::<usize>() != own.iter().product::<usize>() {
            return Err(OpReason::Internal(format!(
                "gradient buffer of shape {:?} for an operand of shape {own:?}",
                gx.shape
            )));
        }
        let n: usize = own.iter().product();
        if n == 0 || n_out == 0 {
            continue;
        }
        let g = grad_space(own, other, &dy.shape);
        let n_red: usize = g.red.iter().map(|d| d[0]).product();
        let scale = if kind == BinaryKind::Sub && side == 1 { -1.0 } else { 1.0 };
        let params = grad_params(n, n_red, &g, scale);
        let wg = n_red >= GRAD_WORKGROUP_MIN;
        let sum = matches!(kind, BinaryKind::Add | BinaryKind::Sub);
        let entry = match (sum, wg) {
            (true, false) => "binary_grad_sum_main",
            (true, true) => "binary_grad_sum_wg_main",
            (false, false) => "binary_grad_main",
            (false, true) => "binary_grad_wg_main",
        };
        let key = KernelKey::new(Shader::Elementwise, entry)
            .with("OP", kind.code())
            .with("SIDE", side as i32)
            .with("ACCUM", gx.accumulate as i32);
        let buffers = if sum { vec![dy.buf, gx.buf] } else { vec![dy.buf, bufs[0], bufs[1], gx.buf] };
        let groups = if wg { grid_1d(n, 1) } else { grid_1d(n, 256) };
        b.dispatch(key, params, buffers, groups);
    }
    Ok(())
}

/// dX of a broadcast (Expand): dY summed over the dims `x_shape` was broadcast along, as the
/// gradient of Add's operand (the other operand taken of dY's shape).
pub fn sum_to_shape(b: &mut BackwardLowering, dy: &Operand, x_shape: &[usize], gx: &GradInput) -> OpResult<()> {
    check_rank(&dy.shape)?;
    let n: usize = x_shape.iter().product();
    let n_out = dy.shape.iter().product::<usize>();
    if n == 0 || n_out == 0 {
        return Ok(());
    }
    if n_out > u32::MAX as usize {
        return Err(OpReason::TooLarge(format!("a broadcast gradient over {n_out} elements exceeds a 32-bit index")));
    }
    let g = grad_space(x_shape, &dy.shape, &dy.shape);
    let n_red: usize = g.red.iter().map(|d| d[0]).product();
    let params = grad_params(n, n_red, &g, 1.0);
    let wg = n_red >= GRAD_WORKGROUP_MIN;
    let entry = if wg { "binary_grad_sum_wg_main" } else { "binary_grad_sum_main" };
    let key = KernelKey::new(Shader::Elementwise, entry)
        .with("OP", BinaryKind::Add.code())
        .with("SIDE", 0)
        .with("ACCUM", gx.accumulate as i32);
    let groups = if wg { grid_1d(n, 1) } else { grid_1d(n, 256) };
    b.dispatch(key, params, vec![dy.buf, gx.buf], groups);
    Ok(())
}

#[cfg(test)]
mod grad_tests {
    use super::*;

    #[test]
    fn grad_space_merges_and_splits_broadcast_dims() {
        // A per-channel operand against NCHW: kept C, reduced N and H·W (merged).
        let g = grad_space(&[3, 1, 1], &[2, 3, 4, 5], &[2, 3, 4, 5]);
        assert_eq!(g.kept, vec![[3, 20, 20]]);
        assert_eq!(g.red, vec![[2, 60, 60], [20, 1, 1]]);
        // Same shapes: one flat kept dim, nothing to sum.
        let g = grad_space(&[2, 3, 4], &[2, 3, 4], &[2, 3, 4]);
        assert_eq!(g.kept, vec![[24, 1, 1]]);
        assert!(g.red.is_empty());
        // The other operand broadcast: its strides are 0 there, which blocks no merge of ours.
        let g = grad_space(&[3, 4], &[1, 4], &[3, 4]);
        assert_eq!(g.kept, vec![[3, 4, 0], [4, 1, 1]]);
    }
}
