//! Shape arithmetic folded on the CPU: Constant, Shape, Gather, ConstantOfShape, Cast, Range,
//! Equal, Where, Mod, Not, ScatterND, Sin, Cos, Floor, Ceil, Round, CumSum.
//!
//! Exporters compute reshape targets and padding amounts with these ops; once the plan fixes the
//! input shapes every one of them is constant, so they never reach the GPU. Values are held as the
//! host [`Tensor`] holds them: floats as `f32`, integers and booleans as `i64`, with `dtype`
//! recording the declared type.

use super::{Attrs, Input, OpReason, OpResult, norm_axis, required};
use crate::onnx::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use crate::tensor::{DType, Data, Tensor};

/// Largest tensor a constant subgraph may create (ConstantOfShape, Range, Gather): beyond this a
/// shape computation has gone wrong, and the GPU could not bind it anyway.
pub(crate) const MAX_FOLDED_ELEMENTS: usize = 1 << 28;

#[derive(Clone, Debug, PartialEq)]
pub enum ShapeOp {
    Constant(Tensor),
    Shape {
        start: i64,
        end: Option<i64>,
    },
    Gather {
        axis: i64,
    },
    /// The fill value, a one-element tensor whose type the output takes.
    ConstantOfShape(Tensor),
    Cast {
        to: DType,
    },
    Range,
    /// Elementwise equality (numpy broadcasting), boolean: the `-1` test of exported Expand shapes.
    Equal,
    /// `cond ? X : Y` (numpy broadcasting of all three).
    Where,
    /// The remainder A mod B (numpy broadcasting): with the sign of B on integers (`fmod = 0`,
    /// Python's `%`), with the sign of A when `fmod = 1` (C's fmod; the only form ONNX allows on
    /// floats). Exporters compute window paddings with it (Swin, `nn.MultiheadAttention`).
    Mod {
        fmod: bool,
    },
    /// Logical not of a boolean tensor.
    Not,
    /// A copy of `data` with the slices `indices` points at replaced by `updates` (or combined
    /// with them: `reduction` add, mul, max, min), in index order: Swin's attention masks, built
    /// by slice assignment.
    ScatterNd {
        reduction: Reduction,
    },
    /// The positions a ScatterND (reduction none) on run-time data writes its updates to, from
    /// `[Shape(data), indices, Shape(updates)]` (`ir/scatter.rs`; applied by
    /// [`super::Op::Scatter`]).
    ScatterPositions,
    /// Sin or Cos of a constant (XCiT's Fourier position encoding, computed from the input's
    /// size alone), in f64 and rounded.
    Trig {
        cos: bool,
    },
    /// Floor, Ceil or Round (half to even) of a float constant: the "same" padding arithmetic of
    /// exported TensorFlow-style convolutions (timm's NFNet stems).
    Rounding {
        kind: RoundKind,
    },
    /// Cumulative sum along an axis (`exclusive`: each element's sum leaves it out; `reverse`:
    /// from the end): position encodings built from a mask of ones (EdgeNeXt), constant once
    /// the shapes are.
    CumSum {
        exclusive: bool,
        reverse: bool,
    },
    /// BatchNormalization in training mode (opset 14+: `training_mode = 1`) on a constant input:
    /// the weight standardisation of BiT's StdConv (timm's ResNetV2), which normalises each
    /// convolution's filters with `F.batch_norm(w, training=True)`. Y with the input's own mean
    /// and biased variance per channel (axis 1), and the running mean and variance outputs
    /// (`input·momentum + batch·(1 − momentum)`), as ONNX defines them. The model's adaptable
    /// BatchNorm layers are the inference ones; on run-time data this form is refused.
    BatchNormTraining {
        epsilon: f32,
        momentum: f32,
    },
    /// One interpolation matrix of a Resize or Upsample node (`ir/resize.rs`), from
    /// `[Shape(X), roi, scales, sizes]`: see [`super::resize`].
    Resize {
        attrs: Box<super::resize::ResizeAttrs>,
        part: super::resize::Part,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundKind {
    Floor,
    Ceil,
    Round,
}

/// ScatterND's combination of an update with the value it lands on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    None,
    Add,
    Mul,
    Max,
    Min,
}

/// Names the ONNX element types [`DType`] cannot hold, for Cast's error.
fn onnx_type_name(code: i64) -> String {
    let name = match code {
        0 => "undefined",
        8 => "string",
        14 => "complex64",
        15 => "complex128",
        17 => "float8e4m3fn",
        18 => "float8e4m3fnuz",
        19 => "float8e5m2",
        20 => "float8e5m2fnuz",
        21 => "uint4",
        22 => "int4",
        23 => "float4e2m1",
        24 => "float8e8m0",
        25 => "uint2",
        26 => "int2",
        _ => return format!("type code {code}"),
    };
    name.to_string()
}

fn check_size(shape: &[usize], what: &str) -> OpResult<usize> {
    let n = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    match n {
        Some(n) if n <= MAX_FOLDED_ELEMENTS => Ok(n),
        _ => Err(OpReason::TooLarge(format!(
            "{what} would create a tensor of shape {shape:?}, more than {MAX_FOLDED_ELEMENTS} elements"
        ))),
    }
}

impl ShapeOp {
    pub fn parse(op_type: &str, a: &Attrs<'_>, _opset: i64) -> OpResult<ShapeOp> {
        Ok(match op_type {
            "Constant" => ShapeOp::Constant(parse_constant(a)?),
            "Shape" => {
                // start/end arrived in opset 15; earlier files simply never carry them.
                a.only(&["start", "end"])?;
                ShapeOp::Shape { start: a.int("start", 0)?, end: a.opt_int("end")? }
            }
            "Gather" => {
                a.only(&["axis"])?;
                ShapeOp::Gather { axis: a.int("axis", 0)? }
            }
            "ConstantOfShape" => {
                a.only(&["value"])?;
                let value = match a.tensor("value")? {
                    None => Tensor::f32(vec![1], vec![0.0]),
                    Some(t) if t.numel() == 1 => t,
                    Some(t) => {
                        return Err(OpReason::Attribute(format!(
                            "ConstantOfShape value must hold one element, got shape {:?}",
                            t.shape
                        )));
                    }
                };
                ShapeOp::ConstantOfShape(value)
            }
            "Cast" => {
                // saturate (19+) and round_mode (24+) only concern float8/float4 targets, which
                // are rejected below.
                a.only(&["to", "saturate", "round_mode"])?;
                let code = a.opt_int("to")?.ok_or(OpReason::MissingAttribute { op: "Cast", name: "to" })?;
                let to = i32::try_from(code).ok().and_then(DType::from_onnx).ok_or_else(|| {
                    OpReason::Unsupported(format!("Cast to {} is not supported", onnx_type_name(code)))
                })?;
                ShapeOp::Cast { to }
            }
            "Range" => {
                a.only(&[])?;
                ShapeOp::Range
            }
            "Equal" => {
                a.only(&[])?;
                ShapeOp::Equal
            }
            "Where" => {
                a.only(&[])?;
                ShapeOp::Where
            }
            "Mod" => {
                a.only(&["fmod"])?;
                match a.int("fmod", 0)? {
                    0 => ShapeOp::Mod { fmod: false },
                    1 => ShapeOp::Mod { fmod: true },
                    v => return Err(OpReason::Attribute(format!("fmod = {v} (ONNX defines 0 and 1)"))),
                }
            }
            "Not" => {
                a.only(&[])?;
                ShapeOp::Not
            }
            "Sin" | "Cos" => {
                a.only(&[])?;
                ShapeOp::Trig { cos: op_type == "Cos" }
            }
            "Floor" | "Ceil" | "Round" => {
                a.only(&[])?;
                let kind = match op_type {
                    "Floor" => RoundKind::Floor,
                    "Ceil" => RoundKind::Ceil,
                    _ => RoundKind::Round,
                };
                ShapeOp::Rounding { kind }
            }
            "CumSum" => {
                a.only(&["exclusive", "reverse"])?;
                let flag = |name: &str| match a.int(name, 0)? {
                    0 => Ok(false),
                    1 => Ok(true),
                    v => Err(OpReason::Attribute(format!("CumSum {name} = {v} (0 or 1)"))),
                };
                ShapeOp::CumSum { exclusive: flag("exclusive")?, reverse: flag("reverse")? }
            }

            "ScatterND" => {
                a.only(&["reduction"])?;
                let reduction = match a.string("reduction", "none")?.as_str() {
                    "none" => Reduction::None,
                    "add" => Reduction::Add,
                    "mul" => Reduction::Mul,
                    "max" => Reduction::Max,
                    "min" => Reduction::Min,
                    other => return Err(OpReason::Attribute(format!("ScatterND reduction '{other}' is not defined"))),
                };
                ShapeOp::ScatterNd { reduction }
            }
            other => return Err(OpReason::Internal(format!("{other} is not a shape op"))),
        })
    }

    /// For Shape: the value from the input's shape alone (even when the input is not constant).
    pub fn shape_of(&self, inputs: &[Option<Input<'_>>]) -> Option<OpResult<Tensor>> {
        match self {
            ShapeOp::Shape { start, end } => {
                Some(required(inputs, 0, "data").map(|x| shape_tensor(x.shape, *start, *end)))
            }
            _ => None,
        }
    }

    pub fn infer(&self, inputs: &[Option<Input<'_>>]) -> OpResult<Vec<(Vec<usize>, DType)>> {
        match self {
            ShapeOp::Constant(t) => Ok(vec![(t.shape.clone(), t.dtype)]),
            ShapeOp::Shape { start, end } => {
                let x = required(inputs, 0, "data")?;
                Ok(vec![(vec![shape_tensor(x.shape, *start, *end).numel()], DType::I64)])
            }
            ShapeOp::Gather { axis } => {
                let data = required(inputs, 0, "data")?;
                let indices = required(inputs, 1, "indices")?;
                if indices.dtype.is_float() {
                    return Err(OpReason::DType(format!("Gather indices must be integers, got {}", indices.dtype)));
                }
                let (shape, _, _, _) = gather_shape(data.shape, indices.shape, *axis)?;
                Ok(vec![(shape, data.dtype)])
            }
            ShapeOp::ConstantOfShape(v) => {
                let s = required(inputs, 0, "input")?.constant("ConstantOfShape shape")?;
                Ok(vec![(const_shape(s)?, v.dtype)])
            }
            ShapeOp::Cast { to } => Ok(vec![(required(inputs, 0, "input")?.shape.to_vec(), *to)]),
            ShapeOp::Range => {
                let get = |i: usize, what: &str| -> OpResult<&Tensor> { required(inputs, i, what)?.constant(what) };
                let t = range(get(0, "Range start")?, get(1, "Range limit")?, get(2, "Range delta")?)?;
                Ok(vec![(t.shape, t.dtype)])
            }
            ShapeOp::Equal => {
                let (a, b) = (required(inputs, 0, "A")?, required(inputs, 1, "B")?);
                Ok(vec![(super::broadcast_shapes(a.shape, b.shape)?, DType::Bool)])
            }
            ShapeOp::Where => {
                let (c, x, y) =
                    (required(inputs, 0, "condition")?, required(inputs, 1, "X")?, required(inputs, 2, "Y")?);
                if x.dtype != y.dtype {
                    return Err(OpReason::DType(format!("Where X is {} and Y is {}", x.dtype, y.dtype)));
                }
                let shape = super::broadcast_shapes(&super::broadcast_shapes(c.shape, x.shape)?, y.shape)?;
                Ok(vec![(shape, x.dtype)])
            }
            ShapeOp::Mod { fmod } => {
                let (a, b) = (required(inputs, 0, "A")?, required(inputs, 1, "B")?);
                if a.dtype != b.dtype {
                    return Err(OpReason::DType(format!("Mod of {} by {}", a.dtype, b.dtype)));
                }
                if a.dtype.is_float() && !fmod {
                    return Err(OpReason::Attribute("Mod on floats needs fmod = 1".into()));
                }
                Ok(vec![(super::broadcast_shapes(a.shape, b.shape)?, a.dtype)])
            }
            ShapeOp::Not => {
                let x = required(inputs, 0, "X")?;
                if x.dtype != DType::Bool {
                    return Err(OpReason::DType(format!("Not takes a bool tensor, got {}", x.dtype)));
                }
                Ok(vec![(x.shape.to_vec(), DType::Bool)])
            }
            ShapeOp::Trig { .. } | ShapeOp::Rounding { .. } => {
                let x = required(inputs, 0, "input")?;
                if !x.dtype.is_float() {
                    return Err(OpReason::DType(format!(
                        "Sin, Cos, Floor, Ceil and Round take floats, got {}",
                        x.dtype
                    )));
                }
                Ok(vec![(x.shape.to_vec(), x.dtype)])
            }
            ShapeOp::CumSum { .. } => {
                let x = required(inputs, 0, "x")?;
                let axis = required(inputs, 1, "axis")?;
                if axis.dtype.is_float() || axis.shape.iter().product::<usize>() != 1 || axis.shape.len() > 1 {
                    return Err(OpReason::Shape(format!(
                        "CumSum axis must be one integer, got {} of shape {:?}",
                        axis.dtype, axis.shape
                    )));
                }
                if x.shape.is_empty() {
                    return Err(OpReason::Shape("CumSum of a scalar".into()));
                }
                Ok(vec![(x.shape.to_vec(), x.dtype)])
            }
            ShapeOp::BatchNormTraining { .. } => {
                let x = required(inputs, 0, "X")?;
                if x.shape.len() < 2 {
                    return Err(OpReason::Shape(format!("BatchNormalization input of rank {}", x.shape.len())));
                }
                let c = x.shape[1];
                for (i, what) in [(1, "scale"), (2, "B"), (3, "input_mean"), (4, "input_var")] {
                    let p = required(inputs, i, what)?;
                    if p.shape != [c] || !p.dtype.is_float() {
                        return Err(OpReason::Shape(format!(
                            "{what} of shape {:?} ({}), expected [{c}] floats",
                            p.shape, p.dtype
                        )));
                    }
                }
                Ok(vec![(x.shape.to_vec(), x.dtype), (vec![c], x.dtype), (vec![c], x.dtype)])
            }
            ShapeOp::Resize { attrs, part } => {
                let mut values = Vec::new();
                for (i, x) in inputs.iter().enumerate() {
                    values.push(match x {
                        Some(x) => Some(x.constant(if i == 0 {
                            "Resize input shape"
                        } else {
                            "Resize roi, scales and sizes"
                        })?),
                        None => None,
                    });
                }
                Ok(vec![(super::resize::infer(attrs, *part, &values)?, DType::F32)])
            }
            ShapeOp::ScatterPositions => {
                let get = |i: usize, what: &str| -> OpResult<&Tensor> { required(inputs, i, what)?.constant(what) };
                let (data, indices, updates) = (get(0, "data shape")?, get(1, "indices")?, get(2, "updates shape")?);
                let t = scatter_positions(&const_shape(data)?, indices, &const_shape(updates)?)?;
                Ok(vec![(t.shape, DType::F32)])
            }
            ShapeOp::ScatterNd { .. } => {
                let data = required(inputs, 0, "data")?;
                let (indices, updates) = (required(inputs, 1, "indices")?, required(inputs, 2, "updates")?);
                scatter_nd_shapes(data.shape, indices.shape, updates.shape)?;
                if indices.dtype != DType::I64 {
                    return Err(OpReason::DType(format!("ScatterND indices must be int64, got {}", indices.dtype)));
                }
                if updates.dtype != data.dtype {
                    return Err(OpReason::DType(format!(
                        "ScatterND updates are {}, data {}",
                        updates.dtype, data.dtype
                    )));
                }
                Ok(vec![(data.shape.to_vec(), data.dtype)])
            }
        }
    }

    pub fn eval(&self, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let get = |i: usize, what: &str| -> OpResult<&Tensor> {
            inputs.get(i).copied().flatten().ok_or_else(|| OpReason::MissingInput { index: i, what: what.to_owned() })
        };
        if let ShapeOp::BatchNormTraining { epsilon, momentum } = self {
            let x = get(0, "X")?;
            let params: Vec<&Tensor> = [(1, "scale"), (2, "B"), (3, "input_mean"), (4, "input_var")]
                .iter()
                .map(|&(i, w)| get(i, w))
                .collect::<OpResult<_>>()?;
            return batch_norm_training(x, &params, *epsilon, *momentum);
        }
        let t = match self {
            ShapeOp::Constant(t) => t.clone(),
            ShapeOp::Shape { start, end } => shape_tensor(&get(0, "data")?.shape, *start, *end),
            ShapeOp::Gather { axis } => gather(get(0, "data")?, get(1, "indices")?, *axis)?,
            ShapeOp::ConstantOfShape(v) => {
                let shape = const_shape(get(0, "input")?)?;
                let n = check_size(&shape, "ConstantOfShape")?;
                let data = match &v.data {
                    Data::F32(x) => Data::F32(vec![x[0]; n]),
                    Data::I64(x) => Data::I64(vec![x[0]; n]),
                };
                Tensor { dtype: v.dtype, shape, data }
            }
            ShapeOp::Cast { to } => cast(get(0, "input")?, *to),
            ShapeOp::Range => range(get(0, "start")?, get(1, "limit")?, get(2, "delta")?)?,
            ShapeOp::Equal => equal(get(0, "A")?, get(1, "B")?)?,
            ShapeOp::Where => where_(get(0, "condition")?, get(1, "X")?, get(2, "Y")?)?,
            ShapeOp::Mod { fmod } => modulo(get(0, "A")?, get(1, "B")?, *fmod)?,
            ShapeOp::Not => {
                let x = get(0, "X")?;
                if x.dtype != DType::Bool {
                    return Err(OpReason::DType(format!("Not takes a bool tensor, got {}", x.dtype)));
                }
                let v = x.to_i64_vec().iter().map(|&b| (b == 0) as i64).collect();
                Tensor { dtype: DType::Bool, shape: x.shape.clone(), data: Data::I64(v) }
            }
            ShapeOp::BatchNormTraining { .. } => unreachable!("evaluated above"),
            ShapeOp::Resize { attrs, part } => super::resize::eval(attrs, *part, inputs)?,
            ShapeOp::Trig { cos } => {
                let x = get(0, "input")?;
                let v =
                    x.as_f32().ok_or_else(|| OpReason::DType(format!("Sin and Cos take floats, got {}", x.dtype)))?;
                let f = |t: f32| if *cos { (t as f64).cos() as f32 } else { (t as f64).sin() as f32 };
                Tensor { dtype: x.dtype, shape: x.shape.clone(), data: Data::F32(v.iter().map(|&t| f(t)).collect()) }
            }
            ShapeOp::Rounding { kind } => {
                let x = get(0, "input")?;
                let v = x.as_f32().ok_or_else(|| OpReason::DType(format!("{kind:?} takes floats, got {}", x.dtype)))?;
                let f = |t: f32| match kind {
                    RoundKind::Floor => t.floor(),
                    RoundKind::Ceil => t.ceil(),
                    RoundKind::Round => t.round_ties_even(),
                };
                Tensor { dtype: x.dtype, shape: x.shape.clone(), data: Data::F32(v.iter().map(|&t| f(t)).collect()) }
            }
            ShapeOp::CumSum { exclusive, reverse } => cum_sum(get(0, "x")?, get(1, "axis")?, *exclusive, *reverse)?,
            ShapeOp::ScatterPositions => {
                let (data, indices, updates) = (get(0, "data shape")?, get(1, "indices")?, get(2, "updates shape")?);
                if indices.dtype != DType::I64 {
                    return Err(OpReason::DType(format!("ScatterND indices must be int64, got {}", indices.dtype)));
                }
                scatter_positions(&const_shape(data)?, indices, &const_shape(updates)?)?
            }
            ShapeOp::ScatterNd { reduction } => {
                scatter_nd(get(0, "data")?, get(1, "indices")?, get(2, "updates")?, *reduction)?
            }
        };
        Ok(vec![t])
    }
}

fn parse_constant(a: &Attrs<'_>) -> OpResult<Tensor> {
    let names: Vec<&str> = a.names().collect();
    if names.len() != 1 {
        return Err(OpReason::Attribute(format!("Constant must have exactly one value attribute, found {names:?}")));
    }
    Ok(match names[0] {
        "value" => a.tensor("value")?.ok_or_else(|| OpReason::Attribute("Constant value is missing".into()))?,
        "value_float" => Tensor::f32(vec![], vec![a.float("value_float", 0.0)?]),
        "value_floats" => {
            let v = a.floats("value_floats")?.unwrap_or_default();
            Tensor::f32(vec![v.len()], v)
        }
        "value_int" => Tensor::i64(vec![], vec![a.int("value_int", 0)?]),
        "value_ints" => {
            let v = a.ints("value_ints")?.unwrap_or_default();
            Tensor::i64(vec![v.len()], v)
        }
        "sparse_value" => return Err(OpReason::Unsupported("Constant with a sparse_value is not supported".into())),
        "value_string" | "value_strings" => {
            return Err(OpReason::Unsupported("string constants are not supported".into()));
        }
        other => return Err(OpReason::Unsupported(format!("Constant attribute '{other}' is not supported"))),
    })
}

/// The flat index into `t` of every element of the broadcast `out` shape (numpy's rule).
fn broadcast_index(t: &[usize], out: &[usize]) -> OpResult<Vec<usize>> {
    let n = check_size(out, "a broadcast")?;
    let strides = super::broadcast_strides(t, out);
    let mut idx = Vec::with_capacity(n);
    for flat in 0..n {
        let (mut rem, mut at) = (flat, 0);
        for d in (0..out.len()).rev() {
            at += (rem % out[d]) * strides[d];
            rem /= out[d];
        }
        idx.push(at);
    }
    Ok(idx)
}

/// Equal on integers or floats (NaN equals nothing), as a boolean tensor.
fn equal(a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
    if a.dtype.is_float() != b.dtype.is_float() {
        return Err(OpReason::DType(format!("Equal compares {} with {}", a.dtype, b.dtype)));
    }
    let out = super::broadcast_shapes(&a.shape, &b.shape)?;
    let (ia, ib) = (broadcast_index(&a.shape, &out)?, broadcast_index(&b.shape, &out)?);
    let data: Vec<i64> = match (&a.data, &b.data) {
        (Data::F32(x), Data::F32(y)) => ia.iter().zip(&ib).map(|(&i, &j)| (x[i] == y[j]) as i64).collect(),
        _ => {
            let (x, y) = (a.to_i64_vec(), b.to_i64_vec());
            ia.iter().zip(&ib).map(|(&i, &j)| (x[i] == y[j]) as i64).collect()
        }
    };
    Ok(Tensor { dtype: DType::Bool, shape: out, data: Data::I64(data) })
}

/// Mod (see [`ShapeOp::Mod`]); an integer division by zero is an error, a float one NaN (fmod).
fn modulo(a: &Tensor, b: &Tensor, fmod: bool) -> OpResult<Tensor> {
    if a.dtype != b.dtype {
        return Err(OpReason::DType(format!("Mod of {} by {}", a.dtype, b.dtype)));
    }
    let out = super::broadcast_shapes(&a.shape, &b.shape)?;
    let (ia, ib) = (broadcast_index(&a.shape, &out)?, broadcast_index(&b.shape, &out)?);
    let data = match (&a.data, &b.data) {
        (Data::F32(x), Data::F32(y)) => {
            if !fmod {
                return Err(OpReason::Attribute("Mod on floats needs fmod = 1".into()));
            }
            Data::F32(ia.iter().zip(&ib).map(|(&i, &j)| x[i] % y[j]).collect())
        }
        (Data::I64(x), Data::I64(y)) => {
            let mut v = Vec::with_capacity(ia.len());
            for (&i, &j) in ia.iter().zip(&ib) {
                let r = x[i].checked_rem(y[j]).ok_or_else(|| {
                    OpReason::Value(format!("Mod of {} by {}: integer division by zero or overflow", x[i], y[j]))
                })?;
                // fmod = 0: the sign of the divisor (Python's %).
                v.push(if !fmod && r != 0 && ((r < 0) != (y[j] < 0)) { r + y[j] } else { r });
            }
            Data::I64(v)
        }
        _ => return Err(OpReason::Internal("Mod operands of one dtype hold different data".into())),
    };
    Ok(Tensor { dtype: a.dtype, shape: out, data })
}

/// [`ShapeOp::BatchNormTraining`]: [Y, running_mean, running_var], statistics in f64.
fn batch_norm_training(x: &Tensor, p: &[&Tensor], epsilon: f32, momentum: f32) -> OpResult<Vec<Tensor>> {
    let xv = x.as_f32().ok_or_else(|| OpReason::DType(format!("BatchNormalization X is {}", x.dtype)))?;
    if x.shape.len() < 2 || p.len() != 4 || p.iter().any(|t| t.shape != [x.shape[1]]) {
        return Err(OpReason::Shape(format!("BatchNormalization X {:?} with parameters of other sizes", x.shape)));
    }
    let (n, c) = (x.shape[0], x.shape[1]);
    let plane: usize = x.shape[2..].iter().product();
    let [scale, bias, mean_in, var_in] = [0, 1, 2, 3].map(|i| p[i].to_f32_vec());
    let m = (n * plane).max(1) as f64;
    let mut y = vec![0f32; xv.len()];
    let (mut run_mean, mut run_var) = (vec![0f32; c], vec![0f32; c]);
    for ch in 0..c {
        let at = |b: usize, i: usize| (b * c + ch) * plane + i;
        let values = || (0..n).flat_map(move |b| (0..plane).map(move |i| xv[at(b, i)] as f64));
        let mean = values().sum::<f64>() / m;
        let var = values().map(|v| (v - mean) * (v - mean)).sum::<f64>() / m;
        let inv = 1.0 / (var + epsilon as f64).sqrt();
        for b in 0..n {
            for i in 0..plane {
                let k = at(b, i);
                y[k] = ((xv[k] as f64 - mean) * inv * scale[ch] as f64 + bias[ch] as f64) as f32;
            }
        }
        let mo = momentum as f64;
        run_mean[ch] = (mean_in[ch] as f64 * mo + mean * (1.0 - mo)) as f32;
        run_var[ch] = (var_in[ch] as f64 * mo + var * (1.0 - mo)) as f32;
    }
    Ok(vec![Tensor::f32(x.shape.clone(), y), Tensor::f32(vec![c], run_mean), Tensor::f32(vec![c], run_var)])
}

/// ScatterND's shape rule: indices [..., k] with k ≤ rank(data), updates = indices[:-1] ++
/// data[k:]; returns (k, the number of index tuples, the elements per slice).
fn scatter_nd_shapes(data: &[usize], indices: &[usize], updates: &[usize]) -> OpResult<(usize, usize, usize)> {
    let Some((&k, lead)) = indices.split_last() else {
        return Err(OpReason::Shape("ScatterND indices must have rank >= 1".into()));
    };
    if k > data.len() {
        return Err(OpReason::Shape(format!("ScatterND index tuples of length {k} into data of rank {}", data.len())));
    }
    let want: Vec<usize> = lead.iter().chain(&data[k..]).copied().collect();
    if updates != want.as_slice() {
        return Err(OpReason::Shape(format!(
            "ScatterND updates of shape {updates:?}, expected {want:?} for indices {indices:?} into data {data:?}"
        )));
    }
    Ok((k, lead.iter().product(), data[k..].iter().product()))
}

/// The flat offset in `data` of each index tuple's slice, and the slice's length.
fn scatter_offsets(data: &[usize], indices: &Tensor, updates: &[usize]) -> OpResult<(Vec<usize>, usize)> {
    let (k, tuples, slice) = scatter_nd_shapes(data, &indices.shape, updates)?;
    check_size(data, "ScatterND")?;
    let idx = indices.to_i64_vec();
    let mut offsets = Vec::with_capacity(tuples);
    for t in 0..tuples {
        let mut at = 0usize;
        for d in 0..k {
            let (i, n) = (idx[t * k + d], data[d] as i64);
            let i = if i < 0 { i + n } else { i };
            if !(0..n).contains(&i) {
                return Err(OpReason::Value(format!(
                    "ScatterND index {} out of range for dim {d} of size {n}",
                    idx[t * k + d]
                )));
            }
            at = at * data[d] + i as usize;
        }
        offsets.push(at * slice);
    }
    Ok((offsets, slice))
}

/// ScatterND (reduction none) on run-time data, as positions: for each element of `updates`, the
/// flat position in data it lands on, -1 where a later index tuple overwrites it (ONNX leaves
/// repeated indices to the implementation; this keeps the last, as the CPU fold does). As floats,
/// exact below 2^24.
fn scatter_positions(data: &[usize], indices: &Tensor, updates: &[usize]) -> OpResult<Tensor> {
    let (offsets, slice) = scatter_offsets(data, indices, updates)?;
    let n: usize = data.iter().product();
    if n >= 1 << 24 {
        return Err(OpReason::TooLarge(format!(
            "ScatterND into {data:?} on run-time data: {n} elements, more than the 2^24 its positions address"
        )));
    }
    let mut pos = vec![-1.0f32; offsets.len() * slice];
    let mut last: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    for (t, &o) in offsets.iter().enumerate() {
        for e in 0..slice {
            if let Some(prev) = last.insert(o + e, t * slice + e) {
                pos[prev] = -1.0;
            }
            pos[t * slice + e] = (o + e) as f32;
        }
    }
    Ok(Tensor::f32(updates.to_vec(), pos))
}

fn scatter_nd(data: &Tensor, indices: &Tensor, updates: &Tensor, reduction: Reduction) -> OpResult<Tensor> {
    if updates.dtype != data.dtype {
        return Err(OpReason::DType(format!("ScatterND updates are {}, data {}", updates.dtype, data.dtype)));
    }
    let (offsets, slice) = scatter_offsets(&data.shape, indices, &updates.shape)?;
    fn apply<T: Copy + PartialOrd + std::ops::Add<Output = T> + std::ops::Mul<Output = T>>(
        out: &mut [T],
        upd: &[T],
        offsets: &[usize],
        slice: usize,
        reduction: Reduction,
    ) {
        for (t, &o) in offsets.iter().enumerate() {
            for e in 0..slice {
                let (v, u) = (out[o + e], upd[t * slice + e]);
                out[o + e] = match reduction {
                    Reduction::None => u,
                    Reduction::Add => v + u,
                    Reduction::Mul => v * u,
                    Reduction::Max => {
                        if u > v {
                            u
                        } else {
                            v
                        }
                    }
                    Reduction::Min => {
                        if u < v {
                            u
                        } else {
                            v
                        }
                    }
                };
            }
        }
    }
    let mut out = data.clone();
    match (&mut out.data, &updates.data) {
        (Data::F32(o), Data::F32(u)) => apply(o, u, &offsets, slice, reduction),
        (Data::I64(o), Data::I64(u)) => apply(o, u, &offsets, slice, reduction),
        _ => return Err(OpReason::Internal("ScatterND operands of one dtype hold different data".into())),
    }
    Ok(out)
}

fn cum_sum(x: &Tensor, axis: &Tensor, exclusive: bool, reverse: bool) -> OpResult<Tensor> {
    let a = *axis.to_i64_vec().first().ok_or_else(|| OpReason::Shape("CumSum axis is empty".into()))?;
    let axis = super::norm_axis(a, x.shape.len())?;
    let n = x.shape[axis];
    let inner: usize = x.shape[axis + 1..].iter().product();
    let outer: usize = x.shape[..axis].iter().product();
    // Integers wrap on overflow, as Cast does.
    fn scan<T: Copy + Default>(
        v: &[T],
        add: fn(T, T) -> T,
        (outer, n, inner): (usize, usize, usize),
        exclusive: bool,
        reverse: bool,
    ) -> Vec<T> {
        let mut out = vec![T::default(); v.len()];
        for o in 0..outer {
            for i in 0..inner {
                let mut acc = T::default();
                for k in 0..n {
                    let k = if reverse { n - 1 - k } else { k };
                    let at = (o * n + k) * inner + i;
                    if exclusive {
                        out[at] = acc;
                        acc = add(acc, v[at]);
                    } else {
                        acc = add(acc, v[at]);
                        out[at] = acc;
                    }
                }
            }
        }
        out
    }
    let dims = (outer, n, inner);
    let data = match &x.data {
        Data::F32(v) => Data::F32(scan(v, |a, b| a + b, dims, exclusive, reverse)),
        Data::I64(v) => Data::I64(scan(v, i64::wrapping_add, dims, exclusive, reverse)),
    };
    Ok(Tensor { dtype: x.dtype, shape: x.shape.clone(), data })
}

fn where_(c: &Tensor, x: &Tensor, y: &Tensor) -> OpResult<Tensor> {
    if c.dtype != DType::Bool {
        return Err(OpReason::DType(format!("Where condition must be bool, got {}", c.dtype)));
    }
    if x.dtype != y.dtype {
        return Err(OpReason::DType(format!("Where X is {} and Y is {}", x.dtype, y.dtype)));
    }
    let out = super::broadcast_shapes(&super::broadcast_shapes(&c.shape, &x.shape)?, &y.shape)?;
    let (ic, ix, iy) =
        (broadcast_index(&c.shape, &out)?, broadcast_index(&x.shape, &out)?, broadcast_index(&y.shape, &out)?);
    let cond = c.to_i64_vec();
    let data = match (&x.data, &y.data) {
        (Data::F32(a), Data::F32(b)) => Data::F32(
            ic.iter().zip(ix.iter().zip(&iy)).map(|(&k, (&i, &j))| if cond[k] != 0 { a[i] } else { b[j] }).collect(),
        ),
        (Data::I64(a), Data::I64(b)) => Data::I64(
            ic.iter().zip(ix.iter().zip(&iy)).map(|(&k, (&i, &j))| if cond[k] != 0 { a[i] } else { b[j] }).collect(),
        ),
        _ => return Err(OpReason::Internal("Where operands of one dtype hold different data".into())),
    };
    Ok(Tensor { dtype: x.dtype, shape: out, data })
}

/// Shape's output: dims `start..end` of `shape`, both clamped into `0..=rank` after adding the
/// rank to negative values (opset 15).
fn shape_tensor(shape: &[usize], start: i64, end: Option<i64>) -> Tensor {
    let r = shape.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).max(0).min(r) as usize;
    let (s, e) = (clamp(start), clamp(end.unwrap_or(r)));
    let dims: Vec<i64> = if s < e { shape[s..e].iter().map(|&d| d as i64).collect() } else { Vec::new() };
    Tensor::i64(vec![dims.len()], dims)
}

/// Output shape of Gather and the (outer, axis size, inner) extents of `data`.
fn gather_shape(data: &[usize], indices: &[usize], axis: i64) -> OpResult<(Vec<usize>, usize, usize, usize)> {
    if data.is_empty() {
        return Err(OpReason::Shape("Gather on a scalar is not defined".into()));
    }
    let axis = norm_axis(axis, data.len())?;
    let mut out = data[..axis].to_vec();
    out.extend_from_slice(indices);
    out.extend_from_slice(&data[axis + 1..]);
    Ok((out, data[..axis].iter().product(), data[axis], data[axis + 1..].iter().product()))
}

/// Gather's indices into an axis of `dim`, negative ones counted from the end; out of range is
/// an error (the CPU folding and the GPU copies agree on both).
pub(crate) fn gather_indices(indices: &Tensor, dim: usize) -> OpResult<Vec<usize>> {
    indices
        .to_i64_vec()
        .into_iter()
        .map(|i| {
            let j = if i < 0 { i + dim as i64 } else { i };
            if j < 0 || j >= dim as i64 {
                return Err(OpReason::Value(format!("Gather index {i} is out of range for an axis of size {dim}")));
            }
            Ok(j as usize)
        })
        .collect()
}

fn gather(data: &Tensor, indices: &Tensor, axis: i64) -> OpResult<Tensor> {
    if indices.dtype.is_float() {
        return Err(OpReason::DType(format!("Gather indices must be integers, got {}", indices.dtype)));
    }
    let (shape, outer, dim, inner) = gather_shape(&data.shape, &indices.shape, axis)?;
    check_size(&shape, "Gather")?;
    let idx = gather_indices(indices, dim)?;
    fn pick<T: Copy>(v: &[T], outer: usize, dim: usize, inner: usize, idx: &[usize]) -> Vec<T> {
        let mut out = Vec::with_capacity(outer * idx.len() * inner);
        for o in 0..outer {
            for &j in idx {
                let base = (o * dim + j) * inner;
                out.extend_from_slice(&v[base..base + inner]);
            }
        }
        out
    }
    let data_out = match &data.data {
        Data::F32(v) => Data::F32(pick(v, outer, dim, inner, &idx)),
        Data::I64(v) => Data::I64(pick(v, outer, dim, inner, &idx)),
    };
    Ok(Tensor { dtype: data.dtype, shape, data: data_out })
}

/// ConstantOfShape's input: a 1-D tensor of non-negative dims (empty: a scalar output).
fn const_shape(t: &Tensor) -> OpResult<Vec<usize>> {
    if t.dtype.is_float() || t.shape.len() > 1 {
        return Err(OpReason::Shape(format!(
            "ConstantOfShape input must be a 1-D integer tensor, got {} of shape {:?}",
            t.dtype, t.shape
        )));
    }
    t.to_i64_vec()
        .into_iter()
        .map(|d| usize::try_from(d).map_err(|_| OpReason::Value(format!("ConstantOfShape dimension {d} is negative"))))
        .collect()
}

/// Wraps an integer to the width of `to` (two's complement), as a C cast does.
fn wrap_int(v: i64, to: DType) -> i64 {
    match to {
        DType::I8 => v as i8 as i64,
        DType::I16 => v as i16 as i64,
        DType::I32 => v as i32 as i64,
        DType::U8 => v as u8 as i64,
        DType::U16 => v as u16 as i64,
        DType::U32 => v as u32 as i64,
        DType::Bool => (v != 0) as i64,
        _ => v,
    }
}

/// Cast. Float targets are stored as f32, rounded through f16/bf16 when the target is one of
/// those; integer targets truncate toward zero, then wrap to the target width.
pub fn cast(t: &Tensor, to: DType) -> Tensor {
    let data = if to.is_float() {
        let round: fn(f32) -> f32 = match to {
            DType::F16 => |x| f16_to_f32(f32_to_f16(x)),
            DType::BF16 => |x| bf16_to_f32(f32_to_bf16(x)),
            _ => |x| x,
        };
        Data::F32(t.to_f32_vec().into_iter().map(round).collect())
    } else {
        let ints: Vec<i64> = match (&t.data, to) {
            // NaN is true as a boolean but 0 through `as i64`.
            (Data::F32(v), DType::Bool) => v.iter().map(|&x| (x != 0.0) as i64).collect(),
            (Data::F32(v), _) => v.iter().map(|&x| wrap_int(x as i64, to)).collect(),
            (Data::I64(v), _) => v.iter().map(|&x| wrap_int(x, to)).collect(),
        };
        Data::I64(ints)
    };
    Tensor { dtype: to, shape: t.shape.clone(), data }
}

fn range(start: &Tensor, limit: &Tensor, delta: &Tensor) -> OpResult<Tensor> {
    for (t, what) in [(start, "start"), (limit, "limit"), (delta, "delta")] {
        if t.numel() != 1 {
            return Err(OpReason::Shape(format!("Range {what} must be a scalar, got shape {:?}", t.shape)));
        }
    }
    match (&start.data, &limit.data, &delta.data) {
        (Data::I64(s), Data::I64(l), Data::I64(d)) => {
            let (s, l, d) = (s[0], l[0], d[0]);
            if d == 0 {
                return Err(OpReason::Value("Range delta is 0".into()));
            }
            let span = i128::from(l) - i128::from(s);
            let d128 = i128::from(d);
            let q = span / d128;
            let n = if span % d128 != 0 && ((span < 0) == (d128 < 0)) { q + 1 } else { q }.max(0);
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            check_size(&[n], "Range")?;
            let v = (0..n as i64).map(|i| wrap_int(s.wrapping_add(i.wrapping_mul(d)), start.dtype)).collect();
            Ok(Tensor { dtype: start.dtype, shape: vec![n], data: Data::I64(v) })
        }
        _ => {
            let (s, l, d) = (start.to_f32_vec()[0] as f64, limit.to_f32_vec()[0] as f64, delta.to_f32_vec()[0] as f64);
            if d == 0.0 || !d.is_finite() || !s.is_finite() || !l.is_finite() {
                return Err(OpReason::Value(format!(
                    "Range start {s}, limit {l}, delta {d} do not define a finite sequence"
                )));
            }
            let n = ((l - s) / d).ceil().max(0.0);
            if n > MAX_FOLDED_ELEMENTS as f64 {
                return Err(OpReason::TooLarge(format!(
                    "Range would create {n} elements, more than {MAX_FOLDED_ELEMENTS}"
                )));
            }
            let n = n as usize;
            let t = Tensor::f32(vec![n], (0..n).map(|i| (s + i as f64 * d) as f32).collect());
            Ok(if start.dtype.is_float() { cast(&t, start.dtype) } else { t })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cast_truncates_and_wraps() {
        let t = Tensor::f32(vec![4], vec![-1.7, 2.9, 300.0, f32::NAN]);
        assert_eq!(cast(&t, DType::I32).to_i64_vec(), vec![-1, 2, 300, 0]);
        assert_eq!(cast(&t, DType::U8).to_i64_vec(), vec![255, 2, 44, 0]);
        assert_eq!(cast(&t, DType::Bool).to_i64_vec(), vec![1, 1, 1, 1]);
        let h = cast(&Tensor::f32(vec![1], vec![0.1]), DType::F16);
        assert_eq!(h.as_f32().unwrap()[0], f16_to_f32(f32_to_f16(0.1)));
        assert_ne!(h.as_f32().unwrap()[0], 0.1);
    }

    #[test]
    fn range_counts() {
        let r = range(&Tensor::i64(vec![], vec![10]), &Tensor::i64(vec![], vec![4]), &Tensor::i64(vec![], vec![-3]))
            .unwrap();
        assert_eq!(r.to_i64_vec(), vec![10, 7]);
        let r =
            range(&Tensor::f32(vec![], vec![1.0]), &Tensor::f32(vec![], vec![5.0]), &Tensor::f32(vec![], vec![2.0]))
                .unwrap();
        assert_eq!(r.to_f32_vec(), vec![1.0, 3.0]);
    }

    #[test]
    fn shape_start_end_clamp() {
        assert_eq!(shape_tensor(&[2, 3, 4], -1, None).to_i64_vec(), vec![4]);
        assert_eq!(shape_tensor(&[2, 3, 4], 2, Some(1)).to_i64_vec(), Vec::<i64>::new());
        assert_eq!(shape_tensor(&[2, 3, 4], -10, Some(10)).to_i64_vec(), vec![2, 3, 4]);
    }

    #[test]
    fn not_negates_booleans_and_refuses_other_types() {
        let b = Tensor { dtype: DType::Bool, shape: vec![2, 2], data: Data::I64(vec![1, 0, 0, 1]) };
        let out = ShapeOp::Not.eval(&[Some(&b)]).unwrap().remove(0);
        assert_eq!((out.dtype, out.shape.clone(), out.to_i64_vec()), (DType::Bool, vec![2, 2], vec![0, 1, 1, 0]));
        assert!(ShapeOp::Not.eval(&[Some(&Tensor::i64(vec![1], vec![1]))]).is_err());
    }

    /// Errors, not panics: an integer Mod by zero, ScatterND indices out of range or of the wrong
    /// shape.
    #[test]
    fn mod_and_scatter_nd_refuse_bad_values() {
        let a = Tensor::i64(vec![2], vec![5, -5]);
        assert!(modulo(&a, &Tensor::i64(vec![1], vec![0]), false).is_err());
        assert_eq!(modulo(&a, &Tensor::i64(vec![1], vec![3]), false).unwrap().to_i64_vec(), vec![2, 1]);
        assert_eq!(modulo(&a, &Tensor::i64(vec![1], vec![3]), true).unwrap().to_i64_vec(), vec![2, -2]);
        assert!(modulo(&Tensor::f32(vec![1], vec![1.0]), &Tensor::f32(vec![1], vec![3.0]), false).is_err());
        let data = Tensor::f32(vec![3], vec![1.0, 2.0, 3.0]);
        let upd = Tensor::f32(vec![1], vec![9.0]);
        let at = |i: i64| Tensor::i64(vec![1, 1], vec![i]);
        assert_eq!(scatter_nd(&data, &at(-1), &upd, Reduction::None).unwrap().to_f32_vec(), vec![1.0, 2.0, 9.0]);
        assert!(scatter_nd(&data, &at(3), &upd, Reduction::None).is_err());
        assert!(scatter_nd(&data, &at(-4), &upd, Reduction::None).is_err());
        assert!(scatter_nd(&data, &Tensor::i64(vec![1, 2], vec![0, 0]), &upd, Reduction::None).is_err());
        assert!(scatter_nd(&data, &at(0), &Tensor::f32(vec![2], vec![0.0, 0.0]), Reduction::None).is_err());
    }

    #[test]
    fn gather_axis1_negative() {
        let d = Tensor::i64(vec![2, 3], vec![0, 1, 2, 3, 4, 5]);
        let i = Tensor::i64(vec![2], vec![-1, 0]);
        let g = gather(&d, &i, 1).unwrap();
        assert_eq!(g.shape, vec![2, 2]);
        assert_eq!(g.to_i64_vec(), vec![2, 0, 5, 3]);
    }
}
