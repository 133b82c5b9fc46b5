//! Views and data movement (`shaders/layout.wgsl`).
//!
//! Reshape, Flatten, Squeeze, Unsqueeze, Identity and Dropout (inference) only rename bytes: the
//! plan gives their output the input's buffer and records no dispatch. Transpose, Slice, Concat
//! and Split are all one strided copy per (input, output) pair: an index over an iteration shape
//! maps to a source offset through per-dimension strides (negative for Slice's negative steps) and
//! to a destination offset through another set, so a single kernel serves the four ops. Pad has a
//! kernel of its own because out-of-range source coordinates are resolved per mode.
//!
//! Every op resolves its attribute-like inputs (shape, axes, starts, pads, split, ...) in one place,
//! `LayoutOp::resolve`, which yields the output shapes and a [`Movement`]; shape inference, the
//! CPU evaluation used for constant folding and the GPU lowering all consume that description, so
//! the three cannot disagree. The reverse pass consumes it too: the same copies run backwards,
//! and Pad's border gradients fold back onto the elements they were copied from.

use super::{
    Attrs, BackwardLowering, BufRef, Dispatch, Input, Lowering, MAX_RANK, OpReason, OpResult, Operand,
    contiguous_strides, norm_axis, u32s,
};
use std::sync::Arc;

use crate::gpu::{KernelKey, Params, Shader, grid_1d};
use crate::onnx::RawNode;
use crate::tensor::{DType, Data, Tensor};

/// Where a list of ints comes from: an attribute (older opsets) or an input (newer ones).
#[derive(Clone, Debug, PartialEq)]
pub enum IntsArg {
    Attr(Vec<i64>),
    /// Input index; the input itself may be omitted when optional.
    Input(usize),
    Absent,
}

/// Pad's border handling. (`wrap`, added in opset 19, is rejected at load time.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PadMode {
    Constant,
    Reflect,
    Edge,
}

impl PadMode {
    fn code(self) -> i32 {
        match self {
            PadMode::Constant => 0,
            PadMode::Reflect => 1,
            PadMode::Edge => 2,
        }
    }
}

/// Pad's fill value: the `value` attribute before opset 11, the optional `constant_value` input
/// from 11 on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PadValue {
    Attr(f32),
    Input(usize),
}

#[derive(Clone, Debug, PartialEq)]
pub enum LayoutOp {
    Reshape {
        allowzero: bool,
    },
    Flatten {
        axis: i64,
    },
    Squeeze {
        axes: IntsArg,
    },
    Unsqueeze {
        axes: IntsArg,
    },
    Identity,
    /// Cast to float32: a view of a float32 run-time tensor; folded constants are converted.
    CastToFloat,
    /// Inference-mode dropout. `mask` is whether the node declares the boolean mask output.
    Dropout {
        mask: bool,
    },
    Transpose {
        perm: Option<Vec<i64>>,
    },
    Concat {
        axis: i64,
    },
    Split {
        axis: i64,
        split: IntsArg,
        num_outputs: Option<usize>,
        outputs: usize,
    },
    Slice {
        starts: IntsArg,
        ends: IntsArg,
        axes: IntsArg,
        steps: IntsArg,
    },
    Pad {
        mode: PadMode,
        pads: IntsArg,
        value: PadValue,
        axes: IntsArg,
    },
    /// Broadcast to a shape (input 1, constant): a copy whose broadcast dims have stride 0; its
    /// gradient sums over them.
    Expand,
    /// The input repeated `repeats` (input 1, constant) times along each dim: one copy over the
    /// output viewed as [r0, d0, r1, d1, …] reading the input with stride 0 along each r; its
    /// gradient sums over them, as Expand's.
    Tile,
}

/// One strided copy: for every index `i` of `shape`,
/// `dst[dst_offset + Σ i·dst_strides] = src[src_offset + Σ i·src_strides]`.
#[derive(Clone, Debug, PartialEq)]
pub struct StridedCopy {
    pub input: usize,
    pub output: usize,
    pub shape: Vec<usize>,
    pub src_offset: i64,
    pub src_strides: Vec<i64>,
    pub dst_offset: usize,
    pub dst_strides: Vec<usize>,
}

/// How the outputs are made from the inputs.
#[derive(Clone, Debug, PartialEq)]
pub enum Movement {
    /// Output 0 is input 0's bytes under a new shape.
    View,
    /// Strided copies that together write every element of every output.
    Copies(Vec<StridedCopy>),
    /// Output 0 is input 0 padded: output coordinate `o` reads input coordinate `o - begin`,
    /// resolved per mode when outside the input.
    Pad { begin: Vec<i64>, mode: PadMode, value: f64 },
}

/// The resolved form of one node for concrete input shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub shapes: Vec<Vec<usize>>,
    pub movement: Movement,
}

/// What resolution needs to know of an input: its shape and, for constants, its value.
#[derive(Clone, Copy, Debug)]
struct Arg<'a> {
    shape: &'a [usize],
    value: Option<&'a Tensor>,
}

fn ints_attr(a: &Attrs<'_>, name: &str) -> OpResult<IntsArg> {
    Ok(a.ints(name)?.map(IntsArg::Attr).unwrap_or(IntsArg::Absent))
}

impl LayoutOp {
    pub fn parse(op_type: &str, a: &Attrs<'_>, opset: i64, node: &RawNode) -> OpResult<LayoutOp> {
        Ok(match op_type {
            "Reshape" => {
                a.only(&["allowzero"])?;
                let allowzero = a.int("allowzero", 0)?;
                if !(allowzero == 0 || allowzero == 1) {
                    return Err(OpReason::Attribute(format!("Reshape allowzero must be 0 or 1, got {allowzero}")));
                }
                LayoutOp::Reshape { allowzero: allowzero == 1 }
            }
            "Flatten" => {
                a.only(&["axis"])?;
                LayoutOp::Flatten { axis: a.int("axis", 1)? }
            }
            "Squeeze" | "Unsqueeze" => {
                let axes = if opset < 13 {
                    a.only(&["axes"])?;
                    ints_attr(a, "axes")?
                } else {
                    a.only(&[])?;
                    IntsArg::Input(1)
                };
                if op_type == "Squeeze" {
                    LayoutOp::Squeeze { axes }
                } else {
                    if axes == IntsArg::Absent {
                        return Err(OpReason::MissingAttribute { op: "Unsqueeze", name: "axes" });
                    }
                    LayoutOp::Unsqueeze { axes }
                }
            }
            "Identity" => {
                a.only(&[])?;
                LayoutOp::Identity
            }
            "Dropout" => {
                // The ratio (attribute before 12, input from 12) and the seed do not matter at
                // inference; training mode is checked once its input's value is known.
                a.only(&["ratio", "seed"])?;
                let mask = node.outputs.get(1).is_some_and(|s| !s.is_empty());
                LayoutOp::Dropout { mask }
            }
            "Transpose" => {
                a.only(&["perm"])?;
                LayoutOp::Transpose { perm: a.ints("perm")? }
            }
            "Concat" => {
                a.only(&["axis"])?;
                let axis = a.opt_int("axis")?.ok_or(OpReason::MissingAttribute { op: "Concat", name: "axis" })?;
                LayoutOp::Concat { axis }
            }
            "Split" => {
                let outputs = node.outputs.len();
                if outputs == 0 {
                    return Err(OpReason::Attribute("Split has no outputs".into()));
                }
                let (split, num_outputs) = if opset < 13 {
                    a.only(&["axis", "split"])?;
                    (ints_attr(a, "split")?, None)
                } else if opset < 18 {
                    a.only(&["axis"])?;
                    (IntsArg::Input(1), None)
                } else {
                    a.only(&["axis", "num_outputs"])?;
                    let n = match a.opt_int("num_outputs")? {
                        None => None,
                        Some(n) if n >= 1 && n as usize == outputs => Some(n as usize),
                        Some(n) => {
                            return Err(OpReason::Attribute(format!(
                                "Split num_outputs is {n} but the node has {outputs} outputs"
                            )));
                        }
                    };
                    let has_split_input = node.inputs.get(1).is_some_and(|s| !s.is_empty());
                    if n.is_some() && has_split_input {
                        return Err(OpReason::Attribute(
                            "Split takes either the 'split' input or 'num_outputs', not both".into(),
                        ));
                    }
                    (IntsArg::Input(1), n)
                };
                LayoutOp::Split { axis: a.int("axis", 0)?, split, num_outputs, outputs }
            }
            "Slice" => {
                if opset < 10 {
                    a.only(&["starts", "ends", "axes"])?;
                    let starts = a.ints("starts")?.ok_or(OpReason::MissingAttribute { op: "Slice", name: "starts" })?;
                    let ends = a.ints("ends")?.ok_or(OpReason::MissingAttribute { op: "Slice", name: "ends" })?;
                    LayoutOp::Slice {
                        starts: IntsArg::Attr(starts),
                        ends: IntsArg::Attr(ends),
                        axes: ints_attr(a, "axes")?,
                        steps: IntsArg::Absent,
                    }
                } else {
                    a.only(&[])?;
                    LayoutOp::Slice {
                        starts: IntsArg::Input(1),
                        ends: IntsArg::Input(2),
                        axes: IntsArg::Input(3),
                        steps: IntsArg::Input(4),
                    }
                }
            }
            "Expand" => {
                a.only(&[])?;
                LayoutOp::Expand
            }
            "Tile" => {
                a.only(&[])?;
                LayoutOp::Tile
            }
            "Pad" => {
                let mode = match a.string("mode", "constant")?.as_str() {
                    "constant" => PadMode::Constant,
                    "reflect" => PadMode::Reflect,
                    "edge" => PadMode::Edge,
                    "wrap" => {
                        return Err(OpReason::Unsupported(
                            "Pad mode 'wrap' is not supported (constant, reflect and edge are)".into(),
                        ));
                    }
                    other => return Err(OpReason::Attribute(format!("unknown Pad mode '{other}'"))),
                };
                if opset < 11 {
                    a.only(&["mode", "pads", "value"])?;
                    let pads = a.ints("pads")?.ok_or(OpReason::MissingAttribute { op: "Pad", name: "pads" })?;
                    LayoutOp::Pad {
                        mode,
                        pads: IntsArg::Attr(pads),
                        value: PadValue::Attr(a.float("value", 0.0)?),
                        axes: IntsArg::Absent,
                    }
                } else {
                    a.only(&["mode"])?;
                    let axes = if opset >= 18 { IntsArg::Input(3) } else { IntsArg::Absent };
                    LayoutOp::Pad { mode, pads: IntsArg::Input(1), value: PadValue::Input(2), axes }
                }
            }
            other => return Err(OpReason::Internal(format!("{other} is not a layout op"))),
        })
    }

    /// Whether output 0 is input 0's buffer under a new shape.
    pub fn is_alias(&self) -> bool {
        matches!(
            self,
            LayoutOp::Reshape { .. }
                | LayoutOp::Flatten { .. }
                | LayoutOp::Squeeze { .. }
                | LayoutOp::Unsqueeze { .. }
                | LayoutOp::Identity
                | LayoutOp::CastToFloat
                | LayoutOp::Dropout { .. }
        )
    }

    pub fn infer(&self, inputs: &[Option<Input<'_>>]) -> OpResult<Vec<(Vec<usize>, DType)>> {
        let args: Vec<Option<Arg<'_>>> =
            inputs.iter().map(|i| i.map(|x| Arg { shape: x.shape, value: x.value })).collect();
        let r = self.resolve(&args)?;
        let dtype = match self {
            LayoutOp::CastToFloat => DType::F32,
            _ => inputs.first().and_then(|x| x.as_ref()).map(|x| x.dtype).unwrap_or(DType::F32),
        };
        let mut out: Vec<(Vec<usize>, DType)> = r.shapes.into_iter().map(|s| (s, dtype)).collect();
        if let LayoutOp::Dropout { mask: true } = self
            && let Some(first) = out.first().cloned()
        {
            // The mask is boolean, so a reader of it at run time is rejected by the plan.
            out.push((first.0, DType::Bool));
        }
        Ok(out)
    }

    /// CPU evaluation for constant folding, on f32 or i64 data.
    pub fn eval(&self, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let args: Vec<Option<Arg<'_>>> =
            inputs.iter().map(|i| i.map(|t| Arg { shape: &t.shape, value: Some(t) })).collect();
        let r = self.resolve(&args)?;
        let x = inputs
            .first()
            .copied()
            .flatten()
            .ok_or_else(|| OpReason::MissingInput { index: 0, what: "data".into() })?;
        let mut outs = match &r.movement {
            Movement::View => {
                let shape = r.shapes.first().cloned().ok_or_else(|| OpReason::Internal("no output shape".into()))?;
                let t = Tensor { dtype: x.dtype, shape, data: x.data.clone() };
                match self {
                    LayoutOp::CastToFloat => vec![super::shape::cast(&t, DType::F32)],
                    _ => vec![t],
                }
            }
            Movement::Copies(copies) => {
                // Only data inputs are copied; attribute-like ones (possibly omitted) are not.
                let data = &inputs[..inputs.len().min(self.copy_sources())];
                let srcs: Vec<&Tensor> = data
                    .iter()
                    .enumerate()
                    .map(|(i, t)| t.ok_or_else(|| OpReason::MissingInput { index: i, what: "data".into() }))
                    .collect::<OpResult<_>>()?;
                eval_copies(&srcs, &r.shapes, copies)?
            }
            Movement::Pad { begin, mode, value } => {
                vec![eval_pad(x, &r.shapes[0], begin, *mode, *value)]
            }
        };
        if let LayoutOp::Dropout { mask: true } = self {
            // Inference-mode dropout keeps every element, so the mask is all true.
            let shape = x.shape.clone();
            let n = x.numel();
            outs.push(Tensor { dtype: DType::Bool, shape, data: Data::I64(vec![1; n]) });
        }
        Ok(outs)
    }

    /// Which inputs carry data (the others are attribute-like and never copied).
    fn copy_sources(&self) -> usize {
        match self {
            LayoutOp::Concat { .. } => usize::MAX,
            _ => 1,
        }
    }

    pub fn lower(&self, l: &mut Lowering) -> OpResult<()> {
        let operands: Vec<Option<Operand>> = l.inputs.clone();
        let args: Vec<Option<Arg<'_>>> =
            operands.iter().map(|o| o.as_ref().map(|o| Arg { shape: &o.shape, value: o.value.as_deref() })).collect();
        let r = self.resolve(&args)?;
        match r.movement {
            Movement::View => {
                // The plan normally shares the buffer instead; when it does not, a flat copy
                // is the same view materialised.
                let n = l.input(0, "data")?.numel();
                lower_copies(l, &r.shapes, &[flat_copy(n)])
            }
            Movement::Copies(copies) => lower_copies(l, &r.shapes, &copies),
            Movement::Pad { begin, mode, value } => lower_pad(l, &r.shapes[0], &begin, mode, value as f32),
        }
    }

    /// Resolves attribute-like inputs against concrete shapes: output shapes and data movement.
    fn resolve(&self, args: &[Option<Arg<'_>>]) -> OpResult<Resolved> {
        let x =
            args.first().copied().flatten().ok_or_else(|| OpReason::MissingInput { index: 0, what: "data".into() })?;
        let view = |shape: Vec<usize>| Ok(Resolved { shapes: vec![shape], movement: Movement::View });
        match self {
            LayoutOp::Reshape { allowzero } => {
                let target = ints_input(args, 1, "Reshape shape")?
                    .ok_or_else(|| OpReason::Attribute("Reshape needs its 'shape' input".into()))?;
                view(reshape_shape(x.shape, &target, *allowzero)?)
            }
            LayoutOp::Flatten { axis } => view(flatten_shape(x.shape, *axis)?),
            LayoutOp::Squeeze { axes } => {
                let axes = resolve_ints(axes, args, "Squeeze axes")?;
                view(squeeze_shape(x.shape, axes.as_deref())?)
            }
            LayoutOp::Unsqueeze { axes } => {
                let axes = resolve_ints(axes, args, "Unsqueeze axes")?
                    .ok_or_else(|| OpReason::Attribute("Unsqueeze needs axes".into()))?;
                view(unsqueeze_shape(x.shape, &axes)?)
            }
            LayoutOp::Identity | LayoutOp::CastToFloat => view(x.shape.to_vec()),
            LayoutOp::Dropout { .. } => {
                if let Some(t) = args.get(2).copied().flatten() {
                    let v = t.value.ok_or_else(|| {
                        OpReason::Unsupported(
                            "Dropout training_mode must be a constant (only inference-mode dropout is supported)"
                                .into(),
                        )
                    })?;
                    if v.to_i64_vec().iter().any(|&b| b != 0) {
                        return Err(OpReason::Unsupported(
                            "Dropout in training mode is not supported (inference only)".into(),
                        ));
                    }
                }
                view(x.shape.to_vec())
            }
            LayoutOp::Transpose { perm } => resolve_transpose(x.shape, perm.as_deref()),
            LayoutOp::Concat { axis } => {
                let shapes: Vec<&[usize]> = args
                    .iter()
                    .enumerate()
                    .map(|(i, a)| {
                        a.map(|a| a.shape)
                            .ok_or_else(|| OpReason::MissingInput { index: i, what: "Concat input".into() })
                    })
                    .collect::<OpResult<_>>()?;
                resolve_concat(&shapes, *axis)
            }
            LayoutOp::Split { axis, split, num_outputs, outputs } => {
                let split = resolve_ints(split, args, "Split split")?;
                resolve_split(x.shape, *axis, split.as_deref(), *num_outputs, *outputs)
            }
            LayoutOp::Slice { starts, ends, axes, steps } => {
                let starts = resolve_ints(starts, args, "Slice starts")?
                    .ok_or_else(|| OpReason::Attribute("Slice needs starts".into()))?;
                let ends = resolve_ints(ends, args, "Slice ends")?
                    .ok_or_else(|| OpReason::Attribute("Slice needs ends".into()))?;
                let axes = resolve_ints(axes, args, "Slice axes")?;
                let steps = resolve_ints(steps, args, "Slice steps")?;
                resolve_slice(x.shape, &starts, &ends, axes.as_deref(), steps.as_deref())
            }
            LayoutOp::Tile => {
                let repeats = ints_input(args, 1, "Tile repeats")?
                    .ok_or_else(|| OpReason::MissingInput { index: 1, what: "repeats".into() })?;
                resolve_tile(x.shape, &repeats)
            }
            LayoutOp::Expand => {
                let target = ints_input(args, 1, "Expand shape")?
                    .ok_or_else(|| OpReason::MissingInput { index: 1, what: "shape".into() })?;
                resolve_expand(x.shape, &target)
            }
            LayoutOp::Pad { mode, pads, value, axes } => {
                let pads = resolve_ints(pads, args, "Pad pads")?
                    .ok_or_else(|| OpReason::Attribute("Pad needs pads".into()))?;
                let axes = resolve_ints(axes, args, "Pad axes")?;
                let value = match value {
                    PadValue::Attr(v) => f64::from(*v),
                    PadValue::Input(i) => match args.get(*i).copied().flatten() {
                        None => 0.0,
                        Some(a) => {
                            let t = a
                                .value
                                .ok_or_else(|| OpReason::Unsupported("Pad constant_value must be a constant".into()))?;
                            if t.numel() != 1 {
                                return Err(OpReason::Shape(format!(
                                    "Pad constant_value must be a scalar, got shape {:?}",
                                    t.shape
                                )));
                            }
                            match &t.data {
                                Data::F32(v) => f64::from(v[0]),
                                Data::I64(v) => v[0] as f64,
                            }
                        }
                    },
                };
                resolve_pad(x.shape, &pads, axes.as_deref(), *mode, value)
            }
        }
    }
}

/// The constant value of input `i` as ints; `None` when the optional input is omitted.
fn ints_input(args: &[Option<Arg<'_>>], i: usize, what: &str) -> OpResult<Option<Vec<i64>>> {
    match args.get(i).copied().flatten() {
        None => Ok(None),
        Some(a) => {
            let t = a.value.ok_or_else(|| OpReason::NotConstant { what: what.to_owned() })?;
            if t.dtype.is_float() {
                return Err(OpReason::DType(format!("{what} must be an integer tensor, got {}", t.dtype)));
            }
            if t.shape.len() > 1 {
                return Err(OpReason::Shape(format!("{what} must be 1-D, got shape {:?}", t.shape)));
            }
            Ok(Some(t.to_i64_vec()))
        }
    }
}

fn resolve_ints(src: &IntsArg, args: &[Option<Arg<'_>>], what: &str) -> OpResult<Option<Vec<i64>>> {
    match src {
        IntsArg::Attr(v) => Ok(Some(v.clone())),
        IntsArg::Input(i) => ints_input(args, *i, what),
        IntsArg::Absent => Ok(None),
    }
}

/// Normalises a list of axes against `rank`, rejecting duplicates.
fn norm_axes(axes: &[i64], rank: usize) -> OpResult<Vec<usize>> {
    let mut out: Vec<usize> = Vec::with_capacity(axes.len());
    for &a in axes {
        let n = norm_axis(a, rank)?;
        if rank == 0 || out.contains(&n) {
            return Err(OpReason::Shape(format!("axes {axes:?} are invalid for rank {rank}")));
        }
        out.push(n);
    }
    Ok(out)
}

fn dim_i64(d: usize) -> i64 {
    d as i64
}

pub fn reshape_shape(input: &[usize], target: &[i64], allowzero: bool) -> OpResult<Vec<usize>> {
    // Checked products: the target is data from the model file (found by tools/fuzz.sh: a
    // target of [2^62, 4] overflowed).
    fn product(dims: impl Iterator<Item = usize>) -> Option<usize> {
        dims.into_iter().try_fold(1usize, |a, d| a.checked_mul(d))
    }
    let total = product(input.iter().copied())
        .ok_or_else(|| OpReason::TooLarge(format!("Reshape input {input:?} has too many elements")))?;
    if target.iter().filter(|&&d| d == -1).count() > 1 {
        return Err(OpReason::Shape(format!("Reshape target {target:?} has more than one -1")));
    }
    if allowzero && target.contains(&0) && target.contains(&-1) {
        return Err(OpReason::Shape(format!("Reshape target {target:?} has both 0 and -1 with allowzero=1")));
    }
    let mut out: Vec<usize> = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, &d) in target.iter().enumerate() {
        match d {
            -1 => {
                infer_at = Some(i);
                out.push(1);
            }
            0 if !allowzero => {
                let v = input.get(i).ok_or_else(|| {
                    OpReason::Shape(format!(
                        "Reshape target {target:?} copies dimension {i}, but the input {input:?} has rank {}",
                        input.len()
                    ))
                })?;
                out.push(*v);
            }
            d if d >= 0 => out.push(d as usize),
            d => {
                return Err(OpReason::Shape(format!("Reshape target {target:?} has the invalid dimension {d}")));
            }
        }
    }
    if let Some(i) = infer_at {
        let known = product(out.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, d)| *d))
            .ok_or_else(|| OpReason::TooLarge(format!("Reshape target {target:?} has too many elements")))?;
        if known == 0 || !total.is_multiple_of(known) {
            return Err(OpReason::Shape(format!(
                "cannot reshape {input:?} to {target:?}: the -1 dimension is not determined"
            )));
        }
        out[i] = total / known;
    }
    if product(out.iter().copied()) != Some(total) {
        return Err(OpReason::Shape(format!("cannot reshape {input:?} ({total} elements) to {target:?}")));
    }
    Ok(out)
}

pub fn flatten_shape(input: &[usize], axis: i64) -> OpResult<Vec<usize>> {
    let r = dim_i64(input.len());
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a > r {
        return Err(OpReason::Shape(format!("Flatten axis {axis} is out of range for rank {r}")));
    }
    let a = a as usize;
    Ok(vec![input[..a].iter().product(), input[a..].iter().product()])
}

pub fn squeeze_shape(input: &[usize], axes: Option<&[i64]>) -> OpResult<Vec<usize>> {
    match axes {
        None => Ok(input.iter().copied().filter(|&d| d != 1).collect()),
        Some(axes) => {
            let axes = norm_axes(axes, input.len())?;
            for &a in &axes {
                if input[a] != 1 {
                    return Err(OpReason::Shape(format!("Squeeze axis {a} has size {}, not 1", input[a])));
                }
            }
            Ok(input.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, d)| *d).collect())
        }
    }
}

pub fn unsqueeze_shape(input: &[usize], axes: &[i64]) -> OpResult<Vec<usize>> {
    let rank = input.len() + axes.len();
    let axes = norm_axes(axes, rank)?;
    let mut dims = input.iter();
    let mut out = Vec::with_capacity(rank);
    for j in 0..rank {
        if axes.contains(&j) {
            out.push(1);
        } else {
            out.push(*dims.next().ok_or_else(|| OpReason::Shape("Unsqueeze axes are inconsistent".into()))?);
        }
    }
    Ok(out)
}

fn resolve_transpose(input: &[usize], perm: Option<&[i64]>) -> OpResult<Resolved> {
    let rank = input.len();
    let perm: Vec<usize> = match perm {
        None => (0..rank).rev().collect(),
        Some(p) => {
            let mut seen = vec![false; rank];
            let mut out = Vec::with_capacity(rank);
            for &d in p {
                if d < 0 || d as usize >= rank || seen[d as usize] {
                    return Err(OpReason::Shape(format!("Transpose perm {p:?} is not a permutation of 0..{rank}")));
                }
                seen[d as usize] = true;
                out.push(d as usize);
            }
            if out.len() != rank {
                return Err(OpReason::Shape(format!("Transpose perm {p:?} is not a permutation of 0..{rank}")));
            }
            out
        }
    };
    let in_strides = contiguous_strides(input);
    let shape: Vec<usize> = perm.iter().map(|&p| input[p]).collect();
    let copy = StridedCopy {
        input: 0,
        output: 0,
        shape: shape.clone(),
        src_offset: 0,
        src_strides: perm.iter().map(|&p| in_strides[p] as i64).collect(),
        dst_offset: 0,
        dst_strides: contiguous_strides(&shape),
    };
    Ok(Resolved { shapes: vec![shape], movement: Movement::Copies(vec![copy]) })
}

fn resolve_concat(inputs: &[&[usize]], axis: i64) -> OpResult<Resolved> {
    let first = *inputs.first().ok_or_else(|| OpReason::Shape("Concat has no inputs".into()))?;
    let rank = first.len();
    if rank == 0 {
        return Err(OpReason::Shape("Concat of scalars is not defined".into()));
    }
    let axis = norm_axis(axis, rank)?;
    let mut out = first.to_vec();
    out[axis] = 0;
    for s in inputs {
        let same = s.len() == rank && s.iter().zip(first).enumerate().all(|(d, (a, b))| d == axis || a == b);
        if !same {
            return Err(OpReason::Shape(format!("Concat inputs {inputs:?} differ outside axis {axis}")));
        }
        out[axis] += s[axis];
    }
    let dst_strides = contiguous_strides(&out);
    let mut copies = Vec::new();
    let mut at = 0;
    for (i, s) in inputs.iter().enumerate() {
        copies.push(StridedCopy {
            input: i,
            output: 0,
            shape: s.to_vec(),
            src_offset: 0,
            src_strides: contiguous_strides(s).iter().map(|&v| v as i64).collect(),
            dst_offset: at * dst_strides[axis],
            dst_strides: dst_strides.clone(),
        });
        at += s[axis];
    }
    Ok(Resolved { shapes: vec![out], movement: Movement::Copies(copies) })
}

fn resolve_split(
    input: &[usize],
    axis: i64,
    split: Option<&[i64]>,
    num_outputs: Option<usize>,
    outputs: usize,
) -> OpResult<Resolved> {
    let axis = norm_axis(axis, input.len())?;
    if input.is_empty() {
        return Err(OpReason::Shape("Split of a scalar is not defined".into()));
    }
    let dim = input[axis];
    let sizes: Vec<usize> = match (split, num_outputs) {
        (Some(s), _) => {
            if s.len() != outputs || s.iter().any(|&v| v < 0) || s.iter().sum::<i64>() != dim_i64(dim) {
                return Err(OpReason::Shape(format!(
                    "Split sizes {s:?} do not divide axis {axis} of size {dim} into {outputs} outputs"
                )));
            }
            s.iter().map(|&v| v as usize).collect()
        }
        (None, Some(n)) => {
            // Opset 18: chunks of ceil(dim / n), the last one smaller.
            let chunk = dim.div_ceil(n);
            if chunk * (n - 1) > dim {
                return Err(OpReason::Shape(format!("Split cannot cut an axis of size {dim} into {n} outputs")));
            }
            let mut v = vec![chunk; n - 1];
            v.push(dim - chunk * (n - 1));
            v
        }
        (None, None) => {
            if !dim.is_multiple_of(outputs) {
                return Err(OpReason::Shape(format!(
                    "Split cannot cut an axis of size {dim} into {outputs} equal parts"
                )));
            }
            vec![dim / outputs; outputs]
        }
    };
    let in_strides: Vec<i64> = contiguous_strides(input).iter().map(|&v| v as i64).collect();
    let mut shapes = Vec::with_capacity(outputs);
    let mut copies = Vec::with_capacity(outputs);
    let mut at = 0usize;
    for (j, &sz) in sizes.iter().enumerate() {
        let mut shape = input.to_vec();
        shape[axis] = sz;
        copies.push(StridedCopy {
            input: 0,
            output: j,
            shape: shape.clone(),
            src_offset: at as i64 * in_strides[axis],
            src_strides: in_strides.clone(),
            dst_offset: 0,
            dst_strides: contiguous_strides(&shape),
        });
        shapes.push(shape);
        at += sz;
    }
    Ok(Resolved { shapes, movement: Movement::Copies(copies) })
}

fn resolve_slice(
    input: &[usize],
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> OpResult<Resolved> {
    let rank = input.len();
    let n = starts.len();
    let axes: Vec<i64> = axes.map(|a| a.to_vec()).unwrap_or_else(|| (0..n as i64).collect());
    let steps: Vec<i64> = steps.map(|s| s.to_vec()).unwrap_or_else(|| vec![1; n]);
    if ends.len() != n || axes.len() != n || steps.len() != n {
        return Err(OpReason::Shape(format!(
            "Slice starts {starts:?}, ends {ends:?}, axes {axes:?} and steps {steps:?} differ in length"
        )));
    }
    let axes = norm_axes(&axes, rank)?;
    let in_strides = contiguous_strides(input);
    let mut shape = input.to_vec();
    let mut src_strides: Vec<i64> = in_strides.iter().map(|&v| v as i64).collect();
    let mut src_offset = 0i64;
    for i in 0..n {
        let (a, step) = (axes[i], steps[i]);
        if step == 0 {
            return Err(OpReason::Shape("Slice step 0 is not allowed".into()));
        }
        let dim = dim_i64(input[a]);
        let wrap = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
        let (s, e) = (wrap(starts[i]), wrap(ends[i]));
        // In i128: a step near ±2^63 overflows the ceiling division in i64 (the loader fuzzer,
        // seed 11). |e − s| ≤ dim, so the length fits back.
        let (s, len) = if step > 0 {
            let s = s.max(0).min(dim);
            let e = e.max(0).min(dim);
            (s, if e > s { ((e - s) as i128 + step as i128 - 1) / step as i128 } else { 0 })
        } else {
            let s = s.max(0).min(dim - 1);
            let e = e.max(-1).min(dim - 1);
            (s, if s > e { ((s - e) as i128 - step as i128 - 1) / -(step as i128) } else { 0 })
        };
        let len = len as i64;
        shape[a] = len as usize;
        if len > 0 {
            src_offset += s * in_strides[a] as i64;
        }
        // More than one element means |step| < dim: the stride stays within the tensor. With one
        // (or none) the step is never taken.
        src_strides[a] = if len > 1 { step * in_strides[a] as i64 } else { in_strides[a] as i64 };
    }
    let copy = StridedCopy {
        input: 0,
        output: 0,
        shape: shape.clone(),
        src_offset,
        src_strides,
        dst_offset: 0,
        dst_strides: contiguous_strides(&shape),
    };
    Ok(Resolved { shapes: vec![shape], movement: Movement::Copies(vec![copy]) })
}

/// Expand: numpy's broadcast of the input's shape and the target (either may have the larger
/// rank, a 1 on either side stretches); one copy reading the input with stride 0 along every
/// broadcast dim.
fn resolve_expand(input: &[usize], target: &[i64]) -> OpResult<Resolved> {
    let target: Vec<usize> = target
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| OpReason::Shape(format!("Expand shape {target:?} has a negative dim")))
        })
        .collect::<OpResult<_>>()?;
    let out = super::broadcast_shapes(input, &target)?;
    if out.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).is_none() {
        return Err(OpReason::TooLarge(format!("Expand to {out:?}: the element count overflows")));
    }
    let src_strides: Vec<i64> = super::broadcast_strides(input, &out).into_iter().map(|v| v as i64).collect();
    let copy = StridedCopy {
        input: 0,
        output: 0,
        shape: out.clone(),
        src_offset: 0,
        src_strides,
        dst_offset: 0,
        dst_strides: contiguous_strides(&out),
    };
    Ok(Resolved { shapes: vec![out], movement: Movement::Copies(vec![copy]) })
}

/// Tile: the output dims split into (repeat, size) pairs — pairs of 1 dropped, so that a rank-4
/// input repeated along every dim still fits the copy kernel's rank — with stride 0 along the
/// repeats.
fn tile_split(input: &[usize], repeats: &[i64]) -> OpResult<(Vec<usize>, Vec<usize>, Vec<usize>)> {
    if repeats.len() != input.len() {
        return Err(OpReason::Shape(format!("Tile repeats {repeats:?} for an input of rank {}", input.len())));
    }
    let strides = contiguous_strides(input);
    let (mut shape, mut src, mut x_view) = (Vec::new(), Vec::new(), Vec::new());
    for ((&d, &r), &s) in input.iter().zip(repeats).zip(&strides) {
        let r = usize::try_from(r)
            .map_err(|_| OpReason::Shape(format!("Tile repeats {repeats:?} has a negative value")))?;
        if r != 1 {
            shape.push(r);
            src.push(0);
            x_view.push(1);
        }
        if d != 1 || r == 1 {
            shape.push(d);
            src.push(s);
            x_view.push(d);
        }
    }
    if shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).is_none_or(|n| n > 1 << 40) {
        return Err(OpReason::TooLarge(format!("Tile of {input:?} by {repeats:?}: the element count overflows")));
    }
    Ok((shape, src, x_view))
}

fn resolve_tile(input: &[usize], repeats: &[i64]) -> OpResult<Resolved> {
    let (shape, src, _) = tile_split(input, repeats)?;
    if shape.len() > MAX_RANK {
        return Err(OpReason::TooLarge(format!(
            "Tile of {input:?} by {repeats:?} needs a copy of rank {}, more than {MAX_RANK}",
            shape.len()
        )));
    }
    let out: Vec<usize> = input.iter().zip(repeats).map(|(&d, &r)| d * r as usize).collect();
    let copy = StridedCopy {
        input: 0,
        output: 0,
        dst_strides: contiguous_strides(&shape),
        shape,
        src_offset: 0,
        src_strides: src.into_iter().map(|v| v as i64).collect(),
        dst_offset: 0,
    };
    Ok(Resolved { shapes: vec![out], movement: Movement::Copies(vec![copy]) })
}

fn resolve_pad(input: &[usize], pads: &[i64], axes: Option<&[i64]>, mode: PadMode, value: f64) -> OpResult<Resolved> {
    let rank = input.len();
    let axes: Vec<usize> = match axes {
        Some(a) => norm_axes(a, rank)?,
        None => (0..rank).collect(),
    };
    if pads.len() != 2 * axes.len() {
        return Err(OpReason::Shape(format!(
            "Pad pads {pads:?} should have {} values (begin and end per axis)",
            2 * axes.len()
        )));
    }
    let mut begin = vec![0i64; rank];
    let mut out = input.to_vec();
    for (k, &a) in axes.iter().enumerate() {
        let (b, e) = (pads[k], pads[k + axes.len()]);
        let d = dim_i64(input[a]).saturating_add(b).saturating_add(e);
        if d < 0 {
            return Err(OpReason::Shape(format!(
                "Pad pads {pads:?} remove more than axis {a} of size {} holds",
                input[a]
            )));
        }
        if mode != PadMode::Constant && input[a] == 0 && d > 0 {
            return Err(OpReason::Shape(format!("Pad mode {mode:?} cannot pad the empty axis {a}")));
        }
        begin[a] = b;
        out[a] = d as usize;
    }
    Ok(Resolved { shapes: vec![out], movement: Movement::Pad { begin, mode, value } })
}

/// Source coordinate for output coordinate `o` along an axis of size `m` (`None`: the fill value).
fn pad_source(o: i64, begin: i64, m: i64, mode: PadMode) -> Option<i64> {
    let c = o - begin;
    if (0..m).contains(&c) {
        return Some(c);
    }
    match mode {
        PadMode::Constant => None,
        PadMode::Edge => Some(c.max(0).min(m - 1)),
        PadMode::Reflect => {
            // Reflection without repeating the edge has period 2(m-1); numpy's iterated
            // reflection for pads wider than the axis gives the same sequence.
            if m == 1 {
                return Some(0);
            }
            let p = 2 * (m - 1);
            let r = c.rem_euclid(p);
            Some(if r >= m { p - r } else { r })
        }
    }
}

/// Runs strided copies on the host over the data inputs (attribute-like inputs left out).
fn eval_copies(data_inputs: &[&Tensor], shapes: &[Vec<usize>], copies: &[StridedCopy]) -> OpResult<Vec<Tensor>> {
    let first = data_inputs.first().ok_or_else(|| OpReason::MissingInput { index: 0, what: "data".into() })?;
    let all_f32 = data_inputs.iter().all(|t| matches!(t.data, Data::F32(_)));
    let all_i64 = data_inputs.iter().all(|t| matches!(t.data, Data::I64(_)));
    let outs: Vec<Data> = if all_f32 {
        let srcs: Vec<&[f32]> = data_inputs.iter().map(|t| t.as_f32().unwrap_or(&[])).collect();
        run_copies(&srcs, shapes, copies)?.into_iter().map(Data::F32).collect()
    } else if all_i64 {
        let srcs: Vec<&[i64]> = data_inputs
            .iter()
            .map(|t| match &t.data {
                Data::I64(v) => v.as_slice(),
                Data::F32(_) => &[],
            })
            .collect();
        run_copies(&srcs, shapes, copies)?.into_iter().map(Data::I64).collect()
    } else {
        let types: Vec<String> = data_inputs.iter().map(|t| t.dtype.to_string()).collect();
        return Err(OpReason::DType(format!("inputs of different element types ({})", types.join(", "))));
    };
    Ok(outs
        .into_iter()
        .zip(shapes)
        .map(|(data, shape)| Tensor { dtype: first.dtype, shape: shape.clone(), data })
        .collect())
}

fn run_copies<T: Copy + Default>(
    srcs: &[&[T]],
    shapes: &[Vec<usize>],
    copies: &[StridedCopy],
) -> OpResult<Vec<Vec<T>>> {
    let mut outs: Vec<Vec<T>> = shapes.iter().map(|s| vec![T::default(); s.iter().product()]).collect();
    for c in copies {
        let src =
            srcs.get(c.input).ok_or_else(|| OpReason::Internal(format!("copy reads missing input {}", c.input)))?;
        let dst = outs
            .get_mut(c.output)
            .ok_or_else(|| OpReason::Internal(format!("copy writes missing output {}", c.output)))?;
        let n: usize = c.shape.iter().product();
        for i in 0..n {
            let (mut rem, mut s, mut d) = (i, c.src_offset, c.dst_offset);
            for k in (0..c.shape.len()).rev() {
                let idx = rem % c.shape[k];
                rem /= c.shape[k];
                s += idx as i64 * c.src_strides[k];
                d += idx * c.dst_strides[k];
            }
            let v = usize::try_from(s)
                .ok()
                .and_then(|s| src.get(s))
                .ok_or_else(|| OpReason::Internal("strided copy reads out of range".into()))?;
            *dst.get_mut(d).ok_or_else(|| OpReason::Internal("strided copy writes out of range".into()))? = *v;
        }
    }
    Ok(outs)
}

fn eval_pad(x: &Tensor, out: &[usize], begin: &[i64], mode: PadMode, value: f64) -> Tensor {
    let in_strides = contiguous_strides(&x.shape);
    let n: usize = out.iter().product();
    let source = |i: usize| -> Option<usize> {
        let (mut rem, mut s) = (i, 0usize);
        for k in (0..out.len()).rev() {
            let o = rem % out[k];
            rem /= out[k];
            let c = pad_source(o as i64, begin[k], dim_i64(x.shape[k]), mode)?;
            s += c as usize * in_strides[k];
        }
        Some(s)
    };
    let data = match &x.data {
        Data::F32(v) => Data::F32((0..n).map(|i| source(i).map_or(value as f32, |s| v[s])).collect()),
        Data::I64(v) => Data::I64((0..n).map(|i| source(i).map_or(value as i64, |s| v[s])).collect()),
    };
    Tensor { dtype: x.dtype, shape: out.to_vec(), data }
}

/// Merges dimensions that are contiguous in both source and destination and drops size-1 ones,
/// so most copies run at rank 1–3 whatever the tensor rank.
fn coalesce(c: &StridedCopy) -> (Vec<usize>, Vec<i64>, Vec<usize>) {
    let mut shape: Vec<usize> = Vec::new();
    let mut ss: Vec<i64> = Vec::new();
    let mut ds: Vec<usize> = Vec::new();
    for k in 0..c.shape.len() {
        let n = c.shape[k];
        if n == 1 {
            continue;
        }
        if let (Some(&ln), Some(&ls), Some(&ld)) = (shape.last(), ss.last(), ds.last())
            && ls == c.src_strides[k] * n as i64
            && ld == c.dst_strides[k] * n
        {
            let last = shape.len() - 1;
            shape[last] = ln * n;
            ss[last] = c.src_strides[k];
            ds[last] = c.dst_strides[k];
            continue;
        }
        shape.push(n);
        ss.push(c.src_strides[k]);
        ds.push(c.dst_strides[k]);
    }
    (shape, ss, ds)
}

fn to_i32(v: i64, what: &str) -> OpResult<i32> {
    i32::try_from(v)
        .map_err(|_| OpReason::TooLarge(format!("{what} {v} exceeds the 32-bit index range of the copy kernel")))
}

fn to_u32(v: usize, what: &str) -> OpResult<u32> {
    u32::try_from(v)
        .map_err(|_| OpReason::TooLarge(format!("{what} {v} exceeds the 32-bit index range of the copy kernel")))
}

fn lower_copies(l: &mut Lowering, shapes: &[Vec<usize>], copies: &[StridedCopy]) -> OpResult<()> {
    for c in copies {
        let n: usize = c.shape.iter().product();
        if n == 0 {
            continue;
        }
        let src = l.input(c.input, "data")?.buf;
        let dst = l.output(c.output)?;
        // An output the node leaves unnamed comes without a shape of its own: nothing reads it.
        if shapes.get(c.output) != Some(&dst.shape) {
            continue;
        }
        let dst: BufRef = dst.buf;
        l.dispatch(KernelKey::new(Shader::Layout, "copy_main"), copy_params(c)?, vec![src, dst], grid_1d(n, 256));
    }
    Ok(())
}

/// The uniform block of `copy_main` / `copy_add_main` for one (non-empty) strided copy.
fn copy_params(c: &StridedCopy) -> OpResult<Params> {
    let n: usize = c.shape.iter().product();
    let (shape, ss, ds) = coalesce(c);
    if shape.len() > MAX_RANK {
        return Err(OpReason::TooLarge(format!(
            "a copy of rank {} (after merging contiguous dimensions) exceeds {MAX_RANK}",
            shape.len()
        )));
    }
    let ss: Vec<i32> = ss.iter().map(|&s| to_i32(s, "source stride")).collect::<OpResult<_>>()?;
    let ds: Vec<u32> = ds.iter().map(|&s| to_u32(s, "destination stride")).collect::<OpResult<_>>()?;
    Ok(Params::new()
        .u32(to_u32(n, "element count")?)
        .u32(shape.len() as u32)
        .i32(to_i32(c.src_offset, "source offset")?)
        .u32(to_u32(c.dst_offset, "destination offset")?)
        .vec8u(&u32s(&shape))
        .vec8i(&ss)
        .vec8u(&ds))
}

fn lower_pad(l: &mut Lowering, out: &[usize], begin: &[i64], mode: PadMode, value: f32) -> OpResult<()> {
    let x = l.input(0, "data")?.clone();
    let y = l.output(0)?.buf;
    if out.len() > MAX_RANK {
        return Err(OpReason::TooLarge(format!(
            "Pad of rank {} exceeds the supported maximum of {MAX_RANK}",
            out.len()
        )));
    }
    let n: usize = out.iter().product();
    if n == 0 {
        return Ok(());
    }
    let begin: Vec<i32> = begin.iter().map(|&b| to_i32(b, "pad")).collect::<OpResult<_>>()?;
    let in_strides: Vec<u32> =
        contiguous_strides(&x.shape).iter().map(|&s| to_u32(s, "stride")).collect::<OpResult<_>>()?;
    let in_shape: Vec<u32> = x.shape.iter().map(|&s| to_u32(s, "dimension")).collect::<OpResult<_>>()?;
    let out_shape: Vec<u32> = out.iter().map(|&s| to_u32(s, "dimension")).collect::<OpResult<_>>()?;
    l.dispatch(
        KernelKey::new(Shader::Layout, "pad_main").with("MODE", mode.code()),
        Params::new()
            .u32(to_u32(n, "element count")?)
            .u32(out.len() as u32)
            .f32(value)
            .u32(0)
            .vec8u(&out_shape)
            .vec8u(&in_shape)
            .vec8u(&in_strides)
            .vec8i(&begin),
        vec![x.buf, y],
        grid_1d(n, 256),
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Reverse pass
// ------------------------------------------------------------------------------------------------

impl LayoutOp {
    /// The adjoint of the data movement: views copy (or add) dY flat, strided copies run
    /// backwards, Pad gathers. Attribute-like inputs (shapes, axes, starts, pads) carry no
    /// gradient.
    pub fn backward(&self, b: &mut BackwardLowering) -> OpResult<()> {
        let operands: Vec<Option<Operand>> = b.inputs.clone();
        let args: Vec<Option<Arg<'_>>> =
            operands.iter().map(|o| o.as_ref().map(|o| Arg { shape: &o.shape, value: o.value.as_deref() })).collect();
        let r = self.resolve(&args)?;
        let data = self.copy_sources().min(b.grad_inputs.len());
        if let Some(i) = (data..b.grad_inputs.len()).find(|&i| b.grad_input(i).is_some()) {
            return Err(OpReason::Internal(format!(
                "input {i} is attribute-like (shape, axes, indices or pads) and carries no gradient"
            )));
        }
        if let LayoutOp::Expand = self {
            // Many output elements read one input element: dX sums dY over the broadcast dims.
            let Some(gx) = b.grad_input(0).cloned() else { return Ok(()) };
            let x_shape = b.input(0, "input")?.shape.clone();
            let dy = b.grad_output(0)?.clone();
            return super::elementwise::sum_to_shape(b, &dy, &x_shape, &gx);
        }
        if let LayoutOp::Tile = self {
            // dY viewed as [r0, d0, r1, d1, …] summed over the repeats: Expand's gradient.
            let Some(gx) = b.grad_input(0).cloned() else { return Ok(()) };
            let x_shape = b.input(0, "input")?.shape.clone();
            let repeats = ints_input(&args, 1, "Tile repeats")?
                .ok_or_else(|| OpReason::MissingInput { index: 1, what: "repeats".into() })?;
            let (split, _, x_view) = tile_split(&x_shape, &repeats)?;
            let mut dy = b.grad_output(0)?.clone();
            dy.shape = split;
            return super::elementwise::sum_to_shape(b, &dy, &x_view, &gx);
        }
        match r.movement {
            Movement::View => backward_view(b),
            Movement::Copies(copies) => backward_copies(b, &copies),
            Movement::Pad { begin, mode, .. } => backward_pad(b, &r.shapes[0], &begin, mode),
        }
    }
}

/// Runs a flat copy (or, accumulating, a flat add) of `n` elements from `src` into `dst`.
fn flat_grad(b: &mut BackwardLowering, src: BufRef, dst: BufRef, n: usize, accumulate: bool) -> OpResult<()> {
    if n == 0 {
        return Ok(());
    }
    let c = flat_copy(n);
    let entry = if accumulate { "copy_add_main" } else { "copy_main" };
    b.dispatch(KernelKey::new(Shader::Layout, entry), copy_params(&c)?, vec![src, dst], grid_1d(n, 256));
    Ok(())
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Views: the planner shares the gradient buffer too where it can; otherwise dX = dY, or
/// dX += dY when another consumer's gradient is already in dX.
fn backward_view(b: &mut BackwardLowering) -> OpResult<()> {
    let Some(gx) = b.grad_input(0).cloned() else { return Ok(()) };
    let dy = b.grad_output(0)?.clone();
    let n = numel(&dy.shape);
    if numel(&gx.shape) != n {
        return Err(OpReason::Internal(format!("view gradient shapes disagree: dY {:?}, dX {:?}", dy.shape, gx.shape)));
    }
    if dy.buf == gx.buf {
        if gx.accumulate {
            return Err(OpReason::Internal("a view cannot add its gradient into the buffer that holds it".into()));
        }
        return Ok(());
    }
    flat_grad(b, dy.buf, gx.buf, n, gx.accumulate)
}

/// The forward copy `c` run backwards: read dY through its destination strides, write dX
/// through its source strides. Dims walked backwards in X (negative Slice steps) are flipped so
/// the writes use non-negative strides and the reads carry the sign.
fn reverse_copy(c: &StridedCopy) -> OpResult<StridedCopy> {
    let mut read_off = c.dst_offset as i64;
    let mut write_off = c.src_offset;
    let mut read_strides = Vec::with_capacity(c.shape.len());
    let mut write_strides = Vec::with_capacity(c.shape.len());
    for k in 0..c.shape.len() {
        let last = c.shape[k] as i64 - 1;
        let (mut rs, mut ws) = (c.dst_strides[k] as i64, c.src_strides[k]);
        if ws < 0 {
            read_off += last * rs;
            write_off += last * ws;
            rs = -rs;
            ws = -ws;
        }
        read_strides.push(rs);
        write_strides.push(ws as usize);
    }
    let dst_offset = usize::try_from(write_off)
        .map_err(|_| OpReason::Internal("a reversed copy starts before its buffer".into()))?;
    Ok(StridedCopy {
        input: c.output,
        output: c.input,
        shape: c.shape.clone(),
        src_offset: read_off,
        src_strides: read_strides,
        dst_offset,
        dst_strides: write_strides,
    })
}

/// Gather on a tensor computed at run time with constant indices (a class token picked out of a
/// sequence, `x[:, 0]`; rows by a constant list): one strided copy per run of consecutive indices
/// (the indices wrapped, checked against the axis, in the order given). Returns the output shape
/// and the copies, and whether an index repeats (the backward then adds).
fn gather_copies(data: &[usize], indices: &Tensor, axis: i64) -> OpResult<(Vec<usize>, Vec<StridedCopy>, bool)> {
    if indices.dtype.is_float() {
        return Err(OpReason::DType(format!("Gather indices must be integers, got {}", indices.dtype)));
    }
    if data.is_empty() {
        return Err(OpReason::Shape("Gather on a scalar is not defined".into()));
    }
    let rank = data.len();
    let a = norm_axes(&[axis], rank)?[0];
    let dim = data[a];
    let idx: Vec<i64> = super::shape::gather_indices(indices, dim)?.into_iter().map(|j| j as i64).collect();
    let mut out = data[..a].to_vec();
    out.extend_from_slice(&indices.shape);
    out.extend_from_slice(&data[a + 1..]);
    let in_strides = contiguous_strides(data);
    let out_strides = contiguous_strides(&out);
    let inner: usize = data[a + 1..].iter().product();
    let outer_dst: Vec<usize> = out_strides[..a].to_vec();
    let inner_dst: Vec<usize> = out_strides[a + indices.shape.len()..].to_vec();
    let mut copies = Vec::new();
    let mut start = 0;
    while start < idx.len() {
        let mut end = start + 1;
        while end < idx.len() && idx[end] == idx[end - 1] + 1 {
            end += 1;
        }
        // dims: outer…, the run, inner…
        let mut shape = data[..a].to_vec();
        shape.push(end - start);
        shape.extend_from_slice(&data[a + 1..]);
        let mut src_strides: Vec<i64> = in_strides.iter().map(|&v| v as i64).collect();
        let mut dst_strides = outer_dst.clone();
        dst_strides.push(inner);
        dst_strides.extend_from_slice(&inner_dst);
        src_strides[a] = in_strides[a] as i64;
        copies.push(StridedCopy {
            input: 0,
            output: 0,
            shape,
            src_offset: idx[start] * in_strides[a] as i64,
            src_strides,
            dst_offset: start * inner,
            dst_strides,
        });
        start = end;
    }
    let mut seen = idx.clone();
    seen.sort_unstable();
    let repeats = seen.windows(2).any(|w| w[0] == w[1]);
    Ok((out, copies, repeats))
}

fn gather_indices(inputs: &[Option<Operand>]) -> OpResult<Arc<Tensor>> {
    let op = inputs
        .get(1)
        .and_then(|x| x.as_ref())
        .ok_or_else(|| OpReason::MissingInput { index: 1, what: "indices".into() })?;
    op.value.clone().ok_or_else(|| OpReason::NotConstant { what: "Gather indices".into() })
}

/// Gather on the GPU: data computed at run time, indices constant.
/// Runs of consecutive indices up to which a Gather is that many strided copies; beyond, one
/// indexed-read kernel (`gather_main`). A few runs are a class token or a slice of rows; a
/// relative-position index ([196², heads] of scattered rows) was tens of thousands of copies,
/// one dispatch and bind group each, and lavapipe crashed allocating their descriptors.
const GATHER_MAX_COPIES: usize = 16;

/// The indexed form's parameters (output or data element count first), when the indices call
/// for it: (outer, count, dim, inner).
fn gather_kernel_dims(data: &[usize], indices: &Tensor, axis: i64, copies: usize) -> OpResult<Option<[usize; 4]>> {
    let a = norm_axes(&[axis], data.len())?[0];
    // The kernel reads the indices as floats: exact below 2^24.
    if copies <= GATHER_MAX_COPIES || data[a] >= 1 << 24 {
        return Ok(None);
    }
    Ok(Some([data[..a].iter().product(), indices.numel(), data[a], data[a + 1..].iter().product()]))
}

fn gather_params(n: usize, [_, count, dim, inner]: [usize; 4]) -> OpResult<Params> {
    Ok(Params::new()
        .u32(to_u32(n, "Gather element count")?)
        .u32(to_u32(count, "Gather index count")?)
        .u32(to_u32(dim, "Gather axis")?)
        .u32(to_u32(inner, "Gather inner size")?))
}

pub fn lower_gather(axis: i64, l: &mut Lowering) -> OpResult<()> {
    let indices = gather_indices(&l.inputs)?;
    let data = l.input(0, "data")?.shape.clone();
    let (out, copies, _) = gather_copies(&data, &indices, axis)?;
    if let Some(dims) = gather_kernel_dims(&data, &indices, axis, copies.len())? {
        let n = numel(&out);
        let bufs = vec![l.input(0, "data")?.buf, l.input(1, "indices")?.buf, l.output(0)?.buf];
        l.dispatch(KernelKey::new(Shader::Layout, "gather_main"), gather_params(n, dims)?, bufs, grid_1d(n, 256));
        return Ok(());
    }
    lower_copies(l, &[out], &copies)
}

/// dData of Gather: the reversed copies, added (after zeroing) where an index repeats; for the
/// indexed form, one kernel summing each data element's gradient over the positions that read it.
pub fn backward_gather(axis: i64, b: &mut BackwardLowering) -> OpResult<()> {
    if b.grad_inputs.len() > 1 && b.grad_input(1).is_some() {
        return Err(OpReason::Internal("Gather's indices carry no gradient".into()));
    }
    let indices = gather_indices(&b.inputs)?;
    let data = b.input(0, "data")?.shape.clone();
    let (_, copies, repeats) = gather_copies(&data, &indices, axis)?;
    let dy = b.grad_outputs.first().and_then(|g| g.as_ref()).map(|g| g.buf);
    // Without an output gradient the copies' path only zeroes the data's gradient.
    if let (Some(dims), Some(dy)) = (gather_kernel_dims(&data, &indices, axis, copies.len())?, dy) {
        let Some(gx) = b.grad_input(0).cloned() else { return Ok(()) };
        let n = numel(&data);
        let key = KernelKey::new(Shader::Layout, "gather_backward_main").with("ACCUM", gx.accumulate as i32);
        let bufs = vec![dy, b.input(1, "indices")?.buf, gx.buf];
        b.dispatch(key, gather_params(n, dims)?, bufs, grid_1d(n, 256));
        return Ok(());
    }
    backward_copies_of(b, &copies, repeats, 1)
}

/// Transpose, Concat, Split, Slice. The forward copies read disjoint elements of their input,
/// so each input gradient is written at most once per element; elements that no gradient reaches
/// (sliced away, or Split outputs with no gradient) are zeroed first unless accumulating.
fn backward_copies(b: &mut BackwardLowering, copies: &[StridedCopy]) -> OpResult<()> {
    let inputs = b.grad_inputs.len();
    backward_copies_of(b, copies, false, inputs)
}

/// The reversed copies into the gradients of the first `inputs` inputs; with `overlapping`
/// forward copies (Gather's repeated indices) every one adds onto a zeroed (or accumulating)
/// gradient.
fn backward_copies_of(
    b: &mut BackwardLowering,
    copies: &[StridedCopy],
    overlapping: bool,
    inputs: usize,
) -> OpResult<()> {
    for j in 0..inputs.min(b.grad_inputs.len()) {
        let Some(gx) = b.grad_input(j).cloned() else { continue };
        let x_shape = b.input(j, "data")?.shape.clone();
        let n = numel(&x_shape);
        if numel(&gx.shape) != n {
            return Err(OpReason::Internal(format!(
                "gradient of shape {:?} for input {j} of shape {x_shape:?}",
                gx.shape
            )));
        }
        let mut mine = Vec::new();
        for c in copies.iter().filter(|c| c.input == j && numel(&c.shape) > 0) {
            if let Some(dy) = b.grad_outputs.get(c.output).and_then(|g| g.as_ref()) {
                mine.push((c, dy.buf));
            }
        }
        let covered: usize = mine.iter().map(|(c, _)| numel(&c.shape)).sum();
        if (covered != n || overlapping) && !gx.accumulate && n > 0 {
            let zero = Params::new().u32(to_u32(n, "element count")?);
            b.dispatch(KernelKey::new(Shader::Layout, "fill_zero_main"), zero, vec![gx.buf], grid_1d(n, 256));
        }
        let entry = if gx.accumulate || overlapping { "copy_add_main" } else { "copy_main" };
        for (c, dy) in mine {
            let r = reverse_copy(c)?;
            let count = numel(&r.shape);
            b.dispatch(KernelKey::new(Shader::Layout, entry), copy_params(&r)?, vec![dy, gx.buf], grid_1d(count, 256));
        }
    }
    Ok(())
}

/// Pad: constant mode gathers dX from the interior of dY in one pass; reflect and edge fold one
/// padded axis at a time (through scratch buffers), adding each border gradient onto the
/// element it was copied from.
fn backward_pad(b: &mut BackwardLowering, out: &[usize], begin: &[i64], mode: PadMode) -> OpResult<()> {
    let Some(gx) = b.grad_input(0).cloned() else { return Ok(()) };
    let dy = b.grad_output(0)?.clone();
    let x_shape = b.input(0, "data")?.shape.clone();
    let n = numel(&x_shape);
    if dy.shape != out || numel(&gx.shape) != n {
        return Err(OpReason::Internal(format!(
            "Pad gradient shapes disagree: X {x_shape:?}, dY {:?} (expected {out:?}), dX {:?}",
            dy.shape, gx.shape
        )));
    }
    if out.len() > MAX_RANK {
        return Err(OpReason::TooLarge(format!(
            "Pad of rank {} exceeds the supported maximum of {MAX_RANK}",
            out.len()
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let accum = gx.accumulate as i32;
    let dims = |v: &[usize], what: &str| -> OpResult<Vec<u32>> { v.iter().map(|&s| to_u32(s, what)).collect() };
    if mode == PadMode::Constant {
        let begin: Vec<i32> = begin.iter().map(|&v| to_i32(v, "pad")).collect::<OpResult<_>>()?;
        to_u32(numel(out), "element count")?;
        b.dispatch(
            KernelKey::new(Shader::Layout, "pad_backward_constant_main").with("ACCUM", accum),
            Params::new()
                .u32(to_u32(n, "element count")?)
                .u32(out.len() as u32)
                .f32(0.0)
                .u32(0)
                .vec8u(&dims(out, "dimension")?)
                .vec8u(&dims(&x_shape, "dimension")?)
                .vec8u(&dims(&contiguous_strides(out), "stride")?)
                .vec8i(&begin),
            vec![dy.buf, gx.buf],
            grid_1d(n, 256),
        );
        return Ok(());
    }
    let axes: Vec<usize> = (0..out.len()).filter(|&k| begin[k] != 0 || out[k] != x_shape[k]).collect();
    if axes.is_empty() {
        return flat_grad(b, dy.buf, gx.buf, n, gx.accumulate);
    }
    let mut cur_shape = out.to_vec();
    let mut cur = dy.buf;
    for (step, &k) in axes.iter().enumerate() {
        let last = step + 1 == axes.len();
        let mut next_shape = cur_shape.clone();
        next_shape[k] = x_shape[k];
        let count = numel(&next_shape);
        let dst = if last { gx.buf } else { b.scratch(4 * count as u64) };
        let inner = numel(&cur_shape[k + 1..]);
        to_u32(numel(&cur_shape), "element count")?;
        b.dispatch(
            KernelKey::new(Shader::Layout, "pad_fold_main")
                .with("MODE", mode.code())
                .with("ACCUM", if last { accum } else { 0 }),
            Params::new()
                .u32(to_u32(count, "element count")?)
                .u32(to_u32(cur_shape[k], "dimension")?)
                .u32(to_u32(x_shape[k], "dimension")?)
                .u32(to_u32(inner, "dimension")?)
                .i32(to_i32(begin[k], "pad")?),
            vec![cur, dst],
            grid_1d(count, 256),
        );
        cur = dst;
        cur_shape = next_shape;
    }
    Ok(())
}

/// Copies up to three buffers, each `(buffer, words)`, one after the other into `dst` starting at
/// word `offset` (layout.wgsl `gather3`), so that a kernel binds one packed buffer where it would
/// bind several: downlevel (phone) limits allow 4 storage buffers per shader stage. A pure copy
/// of the words, so results stay bit-identical.
pub fn gather(srcs: &[(BufRef, usize)], dst: BufRef, offset: usize) -> Dispatch {
    debug_assert!(!srcs.is_empty() && srcs.len() <= 3, "gather takes one to three sources");
    let mut n = [0u32; 3];
    let mut off = [0u32; 3];
    let mut bufs = Vec::with_capacity(4);
    let mut at = offset;
    for i in 0..3 {
        // An unused slot binds the first source again and copies nothing.
        let (b, words) = srcs.get(i).copied().unwrap_or((srcs[0].0, 0));
        n[i] = words as u32;
        off[i] = at as u32;
        at += words;
        bufs.push(b);
    }
    bufs.push(dst);
    let most = srcs.iter().map(|s| s.1).max().unwrap_or(0);
    Dispatch {
        key: KernelKey::new(Shader::Layout, "gather3"),
        params: Params::new().vec4u(&n).vec4u(&off),
        buffers: bufs,
        workgroups: grid_1d(most, 256),
    }
}

/// Copies two ranges of `src`, `(word offset, words)` each, out to `a` and `b` (layout.wgsl
/// `scatter2`): the reverse of [`gather`].
pub fn scatter(src: BufRef, a: (BufRef, usize, usize), b: (BufRef, usize, usize)) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Layout, "scatter2"),
        params: Params::new().vec4u(&[a.2 as u32, b.2 as u32]).vec4u(&[a.1 as u32, b.1 as u32]),
        buffers: vec![src, a.0, b.0],
        workgroups: grid_1d(a.2.max(b.2), 256),
    }
}

/// ScatterND (reduction none) on run-time data, as the IR expands it: `Y = Scatter(data,
/// positions, updates)` with the constant positions of [`super::shape::ShapeOp::ScatterPositions`].
pub fn infer_scatter(inputs: &[Option<Input<'_>>]) -> OpResult<Vec<(Vec<usize>, DType)>> {
    let data = super::required(inputs, 0, "data")?;
    let (pos, upd) = (super::required(inputs, 1, "positions")?, super::required(inputs, 2, "updates")?);
    if numel(pos.shape) != numel(upd.shape) {
        return Err(OpReason::Internal(format!("{:?} positions for updates {:?}", pos.shape, upd.shape)));
    }
    if upd.dtype != data.dtype {
        return Err(OpReason::DType(format!("ScatterND updates are {}, data {}", upd.dtype, data.dtype)));
    }
    Ok(vec![(data.shape.to_vec(), data.dtype)])
}

/// The copy of `data` with each update at its position (all three constant).
pub fn eval_scatter(inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
    let get = |i: usize, what: &str| {
        inputs.get(i).copied().flatten().ok_or_else(|| OpReason::MissingInput { index: i, what: what.into() })
    };
    let (data, pos, upd) = (get(0, "data")?, get(1, "positions")?, get(2, "updates")?);
    let positions: Vec<Option<usize>> = pos.to_f32_vec().iter().map(|&p| (p >= 0.0).then_some(p as usize)).collect();
    let mut out = data.clone();
    match (&mut out.data, &upd.data) {
        (Data::F32(o), Data::F32(u)) => positions.iter().zip(u).for_each(|(p, &v)| p.iter().for_each(|&p| o[p] = v)),
        (Data::I64(o), Data::I64(u)) => positions.iter().zip(u).for_each(|(p, &v)| p.iter().for_each(|&p| o[p] = v)),
        _ => return Err(OpReason::DType("ScatterND operands of one dtype hold different data".into())),
    }
    Ok(vec![out])
}

fn scatter_params(n: usize) -> OpResult<Params> {
    Ok(Params::new().u32(to_u32(n, "ScatterND update count")?).u32(0).u32(0).u32(0))
}

/// A flat copy of `n` elements.
fn flat_copy(n: usize) -> StridedCopy {
    StridedCopy {
        input: 0,
        output: 0,
        shape: vec![n],
        src_offset: 0,
        src_strides: vec![1],
        dst_offset: 0,
        dst_strides: vec![1],
    }
}

pub fn lower_scatter(l: &mut Lowering) -> OpResult<()> {
    let (data, pos, upd) = (l.input(0, "data")?.clone(), l.input(1, "positions")?.buf, l.input(2, "updates")?.buf);
    let y = l.output(0)?.buf;
    let (n, k) = (data.numel(), numel(&l.input(2, "updates")?.shape));
    if n > 0 {
        l.dispatch(
            KernelKey::new(Shader::Layout, "copy_main"),
            copy_params(&flat_copy(n))?,
            vec![data.buf, y],
            grid_1d(n, 256),
        );
    }
    if k > 0 {
        l.dispatch(
            KernelKey::new(Shader::Layout, "scatter_main"),
            scatter_params(k)?,
            vec![upd, pos, y],
            grid_1d(k, 256),
        );
    }
    Ok(())
}

/// dData = dY with the overwritten positions zeroed; dUpdates = dY at each update's position.
pub fn backward_scatter(b: &mut BackwardLowering) -> OpResult<()> {
    if b.grad_input(1).is_some() {
        return Err(OpReason::Internal("ScatterND's positions carry no gradient".into()));
    }
    let dy = b.grad_output(0)?.buf;
    let pos = b.input(1, "positions")?.buf;
    let (n, k) = (numel(&b.input(0, "data")?.shape), numel(&b.input(2, "updates")?.shape));
    if let Some(gx) = b.grad_input(0).cloned()
        && n > 0
    {
        let copy = copy_params(&flat_copy(n))?;
        let target = if gx.accumulate { b.scratch(4 * n as u64) } else { gx.buf };
        b.dispatch(KernelKey::new(Shader::Layout, "copy_main"), copy.clone(), vec![dy, target], grid_1d(n, 256));
        if k > 0 {
            b.dispatch(
                KernelKey::new(Shader::Layout, "scatter_zero_main"),
                scatter_params(k)?,
                vec![pos, target],
                grid_1d(k, 256),
            );
        }
        if gx.accumulate {
            b.dispatch(KernelKey::new(Shader::Layout, "copy_add_main"), copy, vec![target, gx.buf], grid_1d(n, 256));
        }
    }
    if let Some(gu) = b.grad_input(2).cloned()
        && k > 0
    {
        let key = KernelKey::new(Shader::Layout, "scatter_grad_main").with("ACCUM", gu.accumulate as i32);
        b.dispatch(key, scatter_params(k)?, vec![dy, pos, gu.buf], grid_1d(k, 256));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_zero_and_minus_one() {
        assert_eq!(reshape_shape(&[2, 3, 4], &[0, -1], false).unwrap(), vec![2, 12]);
        assert_eq!(reshape_shape(&[0, 3, 4], &[3, 4, 0], true).unwrap(), vec![3, 4, 0]);
        assert!(reshape_shape(&[2, 3, 4], &[5, -1], false).is_err());
        assert!(reshape_shape(&[2, 3, 4], &[-1, -1], false).is_err());
        assert!(reshape_shape(&[2, 3], &[0, 0, 0], false).is_err());
    }

    #[test]
    fn slice_negative_step_clamps() {
        let r = resolve_slice(&[5], &[-1], &[i64::MIN], None, Some(&[-2])).unwrap();
        assert_eq!(r.shapes, vec![vec![3]]);
        let x = Tensor::i64(vec![5], vec![0, 1, 2, 3, 4]);
        let Movement::Copies(c) = r.movement else { panic!("not copies") };
        let out = eval_copies(&[&x], &r.shapes, &c).unwrap();
        assert_eq!(out[0].to_i64_vec(), vec![4, 2, 0]);
        let r = resolve_slice(&[5], &[10], &[20], None, None).unwrap();
        assert_eq!(r.shapes, vec![vec![0]]);
    }

    #[test]
    fn eval_skips_omitted_optional_inputs() {
        let op = LayoutOp::Slice {
            starts: IntsArg::Input(1),
            ends: IntsArg::Input(2),
            axes: IntsArg::Input(3),
            steps: IntsArg::Input(4),
        };
        let x = Tensor::i64(vec![6], (0..6).collect());
        let (s, e, st) = (Tensor::i64(vec![1], vec![4]), Tensor::i64(vec![1], vec![0]), Tensor::i64(vec![1], vec![-2]));
        let out = op.eval(&[Some(&x), Some(&s), Some(&e), None, Some(&st)]).unwrap();
        assert_eq!(out[0].to_i64_vec(), vec![4, 2]);
        assert_eq!(out[0].dtype, DType::I64);

        let concat = LayoutOp::Concat { axis: 0 };
        let f = Tensor::f32(vec![1], vec![1.0]);
        assert!(concat.eval(&[Some(&x), Some(&f)]).is_err(), "mixed element types must be rejected");
    }

    #[test]
    fn reflect_matches_numpy() {
        // np.pad([0,1,2], 4, 'reflect') = [2,1,0,1, 0,1,2, 1,0,1,2]
        let got: Vec<i64> = (0..11).map(|o| pad_source(o, 4, 3, PadMode::Reflect).unwrap()).collect();
        assert_eq!(got, vec![0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2]);
    }

    #[test]
    fn coalesce_merges_contiguous_dims() {
        let r = resolve_concat(&[&[2, 3, 4], &[2, 5, 4]], 1).unwrap();
        let Movement::Copies(c) = r.movement else { panic!("not copies") };
        assert_eq!(coalesce(&c[0]), (vec![2, 12], vec![12, 1], vec![32, 1]));
    }

    #[test]
    fn split_num_outputs_chunks() {
        let r = resolve_split(&[4, 5], 1, None, Some(4), 4);
        assert!(r.is_err(), "5 cannot be cut into 4 chunks of ceil(5/4) = 2");
        let r = resolve_split(&[4, 7], 1, None, Some(4), 4).unwrap();
        assert_eq!(r.shapes.iter().map(|s| s[1]).collect::<Vec<_>>(), vec![2, 2, 2, 1]);
    }
}
