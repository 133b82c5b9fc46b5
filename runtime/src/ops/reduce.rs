//! ReduceMean, ReduceSum, ReduceMax and ReduceMin (`shaders/reduce.wgsl`; ReduceL2 and
//! ReduceSumSquare are expanded into ReduceSum in the IR, GlobalMaxPool is a ReduceMax over the
//! spatial axes). Max and min propagate NaN, as the ONNX reference (numpy) does; ONNX Runtime's
//! CPU kernels skip a NaN that is not first in its reduction.
//!
//! Both kernels sum in a fixed order, so a result is bit-identical from run to run: short
//! reductions loop over the reduced elements in one thread per output; long ones give each output
//! a workgroup that strides over the elements and combines the partial sums in a tree.

use super::{
    Attrs, BackwardLowering, Input, Lowering, MAX_RANK, OpReason, OpResult, contiguous_strides, required, u32s,
};
use crate::gpu::{KernelKey, Params, Shader, grid_1d};
use crate::tensor::{DType, Tensor};

/// Reductions at least this long get a workgroup per output instead of a thread.
const WORKGROUP_MIN: usize = 256;

#[derive(Clone, Debug, PartialEq)]
pub struct ReduceMeanAttrs {
    /// ReduceSum: the sum, not divided by the count.
    pub sum: bool,
    /// ReduceMax or ReduceMin instead of a sum.
    pub extreme: Option<Extreme>,
    pub keepdims: bool,
    /// The `axes` attribute (before opset 18).
    pub axes: Option<Vec<i64>>,
    /// From opset 18 the axes are the optional second input (which must be constant).
    pub axes_input: bool,
    /// With no axes given: reduce nothing (true) or everything (false).
    pub noop_with_empty_axes: bool,
    /// Reduce every dim from this axis on (negative counts from the end), whatever the rank:
    /// LayerNormalization's statistics (its expansion in [`crate::ir`]); not an ONNX attribute.
    pub from_axis: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extreme {
    Max,
    Min,
}

impl ReduceMeanAttrs {
    /// ReduceMax or ReduceMin (axes as an input from opset 18).
    pub fn parse_extreme(a: &Attrs<'_>, opset: i64, extreme: Extreme) -> OpResult<ReduceMeanAttrs> {
        Ok(ReduceMeanAttrs { extreme: Some(extreme), ..Self::parse_as(a, opset >= 18, false)? })
    }

    /// GlobalMaxPool: the maximum over every axis after the channels, kept as 1s.
    pub fn global_max() -> ReduceMeanAttrs {
        ReduceMeanAttrs {
            sum: false,
            extreme: Some(Extreme::Max),
            keepdims: true,
            axes: None,
            axes_input: false,
            noop_with_empty_axes: false,
            from_axis: Some(2),
        }
    }

    fn mode(&self) -> i32 {
        match self.extreme {
            None => 0,
            Some(Extreme::Max) => 1,
            Some(Extreme::Min) => 2,
        }
    }

    pub fn parse(a: &Attrs<'_>, opset: i64) -> OpResult<ReduceMeanAttrs> {
        Self::parse_as(a, opset >= 18, false)
    }

    /// ReduceSum (axes as an input from opset 13), and the ReduceSum that ReduceL2 and
    /// ReduceSumSquare expand into (`axes_input`: from opset 18).
    pub fn parse_sum(a: &Attrs<'_>, axes_input: bool) -> OpResult<ReduceMeanAttrs> {
        Self::parse_as(a, axes_input, true)
    }

    fn parse_as(a: &Attrs<'_>, axes_input: bool, sum: bool) -> OpResult<ReduceMeanAttrs> {
        if axes_input {
            a.only(&["keepdims", "noop_with_empty_axes"])?;
        } else {
            a.only(&["axes", "keepdims"])?;
        }
        let flag = |name: &str, default: i64| -> OpResult<bool> {
            match a.int(name, default)? {
                0 => Ok(false),
                1 => Ok(true),
                v => Err(OpReason::Attribute(format!("{name}={v} is not 0 or 1"))),
            }
        };
        Ok(ReduceMeanAttrs {
            sum,
            extreme: None,
            keepdims: flag("keepdims", 1)?,
            axes: a.ints("axes")?,
            axes_input,
            noop_with_empty_axes: flag("noop_with_empty_axes", 0)?,
            from_axis: None,
        })
    }

    /// Which dims of a rank-`rank` input are reduced; `axes` is the constant second input.
    fn reduced(&self, rank: usize, axes: Option<&Tensor>) -> OpResult<Vec<bool>> {
        if let Some(ax) = self.from_axis {
            let r = rank as i64;
            let a = if ax < 0 { ax + r } else { ax };
            if a < 0 || a >= r {
                return Err(OpReason::Axis { axis: ax, rank });
            }
            return Ok((0..rank).map(|d| d as i64 >= a).collect());
        }
        let list: Vec<i64> = if self.axes_input {
            match axes {
                None => Vec::new(),
                Some(t) if t.dtype != DType::I64 => {
                    return Err(OpReason::DType(format!("axes input is {}, expected int64", t.dtype)));
                }
                Some(t) if t.shape.len() > 1 => {
                    return Err(OpReason::Shape(format!("axes input has shape {:?}, expected 1-D", t.shape)));
                }
                Some(t) => t.to_i64_vec(),
            }
        } else {
            self.axes.clone().unwrap_or_default()
        };
        if list.is_empty() {
            return Ok(vec![!self.noop_with_empty_axes; rank]);
        }
        let mut mask = vec![false; rank];
        for &ax in &list {
            let r = rank as i64;
            let a = if ax < 0 { ax + r } else { ax };
            if a < 0 || a >= r {
                return Err(OpReason::Axis { axis: ax, rank });
            }
            if std::mem::replace(&mut mask[a as usize], true) {
                return Err(OpReason::Attribute(format!("axis {ax} appears more than once in axes {list:?}")));
            }
        }
        Ok(mask)
    }
}

fn out_shape(a: &ReduceMeanAttrs, shape: &[usize], mask: &[bool]) -> Vec<usize> {
    shape
        .iter()
        .zip(mask)
        .filter_map(|(&d, &r)| match (r, a.keepdims) {
            (false, _) => Some(d),
            (true, true) => Some(1),
            (true, false) => None,
        })
        .collect()
}

pub fn infer(a: &ReduceMeanAttrs, inputs: &[Option<Input<'_>>]) -> OpResult<Vec<(Vec<usize>, DType)>> {
    let x = required(inputs, 0, "data")?;
    let axes = match inputs.get(1).and_then(|i| i.as_ref()) {
        Some(i) if a.axes_input => Some(i.constant("ReduceMean axes")?),
        Some(_) => return Err(OpReason::Unsupported("ReduceMean takes axes as an input only from opset 18".into())),
        None => None,
    };
    let mask = a.reduced(x.shape.len(), axes)?;
    Ok(vec![(out_shape(a, x.shape, &mask), x.dtype)])
}

/// ReduceMean of a constant, on the CPU (sums in f64): what feeds a folded training-mode
/// BatchNormalization's running statistics in BiT's weight standardisation.
pub fn eval(a: &ReduceMeanAttrs, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
    let x = inputs.first().copied().flatten().ok_or(OpReason::MissingInput { index: 0, what: "data".into() })?;
    let v = x.as_f32().ok_or_else(|| OpReason::DType(format!("ReduceMean of {}", x.dtype)))?;
    let axes = inputs.get(1).copied().flatten();
    if axes.is_some() && !a.axes_input {
        return Err(OpReason::Unsupported("ReduceMean takes axes as an input only from opset 18".into()));
    }
    let mask = a.reduced(x.shape.len(), axes)?;
    let out_dims: Vec<usize> = x.shape.iter().zip(&mask).map(|(&d, &r)| if r { 1 } else { d }).collect();
    let n_out: usize = out_dims.iter().product();
    let count: usize = x.shape.iter().zip(&mask).filter(|(_, r)| **r).map(|(d, _)| *d).product();
    let init = match a.extreme {
        None => 0.0,
        Some(Extreme::Max) => f64::NEG_INFINITY,
        Some(Extreme::Min) => f64::INFINITY,
    };
    let mut sums = vec![init; n_out];
    for (flat, &value) in v.iter().enumerate() {
        // The output index of input element `flat`: its coordinates with reduced dims at 0.
        let (mut rem, mut at, mut stride) = (flat, 0usize, 1usize);
        for d in (0..x.shape.len()).rev() {
            let c = rem % x.shape[d];
            rem /= x.shape[d];
            if !mask[d] {
                at += c * stride;
            }
            stride *= out_dims[d];
        }
        let (acc, v) = (sums[at], value as f64);
        sums[at] = match a.extreme {
            None => acc + v,
            _ if acc.is_nan() || v.is_nan() => f64::NAN,
            Some(Extreme::Max) => acc.max(v),
            Some(Extreme::Min) => acc.min(v),
        };
    }
    let means =
        sums.iter().map(|&s| (if a.sum || a.extreme.is_some() { s } else { s / count.max(1) as f64 }) as f32).collect();
    Ok(vec![Tensor::f32(out_shape(a, &x.shape, &mask), means)])
}

pub fn lower(a: &ReduceMeanAttrs, l: &mut Lowering) -> OpResult<()> {
    let x = l.input(0, "data")?.clone();
    let y = l.output(0)?.clone();
    let axes = match l.inputs.get(1).and_then(|i| i.as_ref()) {
        Some(op) => Some(op.value.clone().ok_or_else(|| OpReason::NotConstant { what: "ReduceMean axes".into() })?),
        None => None,
    };
    let mask = a.reduced(x.shape.len(), axes.as_deref())?;
    let n_in = x.numel();
    if n_in > u32::MAX as usize {
        return Err(OpReason::TooLarge(format!(
            "ReduceMean input has {n_in} elements, more than a 32-bit index covers"
        )));
    }
    // Unit dims change no index, and dropping them keeps both dim lists within MAX_RANK.
    let (n_out, n_red, params) = forward_params(&x.shape, &mask)?;
    if n_out == 0 || n_red == 0 {
        return Err(OpReason::Unsupported(format!(
            "ReduceMean of an empty tensor (shape {:?}) is not supported",
            x.shape
        )));
    }
    let sum = a.sum as i32;
    if n_red >= WORKGROUP_MIN {
        let key = KernelKey::new(Shader::Reduce, "mean_wg_main").with("SUM", sum).with("MODE", a.mode());
        l.dispatch(key, params, vec![x.buf, y.buf], grid_1d(n_out, 1));
    } else {
        let key = KernelKey::new(Shader::Reduce, "mean_thread_main").with("SUM", sum).with("MODE", a.mode());
        l.dispatch(key, params, vec![x.buf, y.buf], grid_1d(n_out, 256));
    }
    Ok(())
}

/// The split of `shape` into kept and reduced non-unit dims, with their strides, as the forward
/// kernels take them: (n_out, n_red, params).
fn forward_params(shape: &[usize], mask: &[bool]) -> OpResult<(usize, usize, Params)> {
    let strides = contiguous_strides(shape);
    let (mut kept, mut kept_strides, mut red, mut red_strides) = (vec![], vec![], vec![], vec![]);
    for (d, (&size, &r)) in shape.iter().zip(mask).enumerate() {
        if size == 1 {
            continue;
        }
        if r {
            red.push(size);
            red_strides.push(strides[d]);
        } else {
            kept.push(size);
            kept_strides.push(strides[d]);
        }
    }
    if kept.len() > MAX_RANK || red.len() > MAX_RANK {
        return Err(OpReason::TooLarge(format!(
            "a reduction over rank {} exceeds the supported maximum of {MAX_RANK}",
            shape.len()
        )));
    }
    let n_out: usize = kept.iter().product();
    let n_red: usize = red.iter().product();
    let params = Params::new()
        .u32(n_out as u32)
        .u32(n_red as u32)
        .u32(kept.len() as u32)
        .u32(red.len() as u32)
        .vec8u(&u32s(&kept))
        .vec8u(&u32s(&kept_strides))
        .vec8u(&u32s(&red))
        .vec8u(&u32s(&red_strides));
    Ok((n_out, n_red, params))
}

/// dX = dY / count, broadcast back over the reduced axes: one thread per input element.
pub fn backward(a: &ReduceMeanAttrs, b: &mut BackwardLowering) -> OpResult<()> {
    let Some(gx) = b.grad_input(0).cloned() else { return Ok(()) };
    if b.grad_input(1).is_some() {
        return Err(OpReason::Internal("ReduceMean's axes input carries no gradient".into()));
    }
    let dy = b.grad_output(0)?.clone();
    let x = b.input(0, "data")?.clone();
    let axes = b
        .inputs
        .get(1)
        .and_then(|i| i.as_ref())
        .map(|op| op.value.clone().ok_or_else(|| OpReason::NotConstant { what: "ReduceMean axes".into() }));
    let axes = axes.transpose()?;
    let mask = a.reduced(x.shape.len(), axes.as_deref())?;
    let n = x.numel();
    if n > u32::MAX as usize {
        return Err(OpReason::TooLarge(format!("ReduceMean input has {n} elements, more than a 32-bit index covers")));
    }
    if dy.shape != out_shape(a, &x.shape, &mask) || gx.shape.iter().product::<usize>() != n {
        return Err(OpReason::Internal(format!(
            "ReduceMean gradient shapes disagree: X {:?}, dY {:?}, dX {:?}",
            x.shape, dy.shape, gx.shape
        )));
    }
    if n == 0 {
        return Ok(());
    }
    // Runs of adjacent non-unit dims of one kind merge: reduced runs have dY stride 0, kept runs
    // the row-major stride over the kept dims (which is the layout of dY, keepdims or not).
    let mut runs: Vec<(usize, bool)> = Vec::new();
    for (&size, &r) in x.shape.iter().zip(&mask) {
        if size == 1 {
            continue;
        }
        match runs.last_mut() {
            Some(last) if last.1 == r => last.0 *= size,
            _ => runs.push((size, r)),
        }
    }
    if runs.len() > MAX_RANK {
        return Err(OpReason::TooLarge(format!(
            "ReduceMean over rank {} exceeds the supported maximum of {MAX_RANK}",
            x.shape.len()
        )));
    }
    let mut strides = vec![0usize; runs.len()];
    let mut s = 1;
    for (k, &(size, r)) in runs.iter().enumerate().rev() {
        if !r {
            strides[k] = s;
            s *= size;
        }
    }
    let n_red: usize = runs.iter().filter(|r| r.1).map(|r| r.0).product();
    let shape: Vec<usize> = runs.iter().map(|r| r.0).collect();
    let grad_params = Params::new()
        .u32(n as u32)
        .u32(runs.len() as u32)
        .u32(n_red as u32)
        .vec8u(&u32s(&shape))
        .vec8u(&u32s(&strides));
    if a.extreme.is_some() {
        // The extreme and dY's share per output, then each element's share.
        let (n_out, _, params) = forward_params(&x.shape, &mask)?;
        let ties = b.scratch(8 * n_out as u64);
        b.dispatch(
            KernelKey::new(Shader::Reduce, "extreme_ties_main").with("MODE", a.mode()),
            params,
            vec![x.buf, dy.buf, ties],
            grid_1d(n_out, 256),
        );
        b.dispatch(
            KernelKey::new(Shader::Reduce, "extreme_backward_main").with("ACCUM", gx.accumulate as i32),
            grad_params,
            vec![x.buf, ties, gx.buf],
            grid_1d(n, 256),
        );
        return Ok(());
    }
    b.dispatch(
        KernelKey::new(Shader::Reduce, "mean_backward_main")
            .with("ACCUM", gx.accumulate as i32)
            .with("SUM", a.sum as i32),
        grad_params,
        vec![dy.buf, gx.buf],
        grid_1d(n, 256),
    );
    Ok(())
}
