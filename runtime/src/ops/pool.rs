//! MaxPool, AveragePool, GlobalAveragePool (`shaders/pool.wgsl`).
//!
//! Windowed pools take 1 to 3 spatial dimensions; the kernel always works in 3-D, with leading
//! unit dimensions (kernel 1, stride 1, no padding) filling in for 1-D and 2-D inputs.
//! GlobalAveragePool reduces one (n, c) plane per workgroup with a fixed-order tree, so its
//! result is bit-identical from run to run (no float atomics).
//!
//! The reverse passes are gathers (one thread per input element over the windows covering it),
//! so they need no atomics either; MaxPool's first records each window's argmax from X.

use super::{Attrs, BackwardLowering, Input, Lowering, OpReason, OpResult, required};
use crate::gpu::{KernelKey, Params, Shader, grid_1d};
use crate::tensor::DType;

/// Spatial dimensions the windowed kernel handles.
const MAX_SPATIAL: usize = 3;

/// How padding is chosen (`auto_pad`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoPad {
    /// Explicit `pads`.
    NotSet,
    /// No padding.
    Valid,
    /// Output size ceil(in / stride); an odd total padding puts the extra element at the end.
    SameUpper,
    /// Same, with the extra element at the start.
    SameLower,
}

impl AutoPad {
    /// The (begin, end) padding of one spatial dim of size `input`, for a window spanning `extent`
    /// elements (dilation included) moved by `stride`; `explicit` is used when `NotSet`.
    pub fn resolve(self, input: usize, stride: usize, extent: usize, explicit: (usize, usize)) -> (usize, usize) {
        match self {
            AutoPad::NotSet => explicit,
            AutoPad::Valid => (0, 0),
            AutoPad::SameUpper | AutoPad::SameLower => {
                let o = input.div_ceil(stride);
                // Saturating: `extent` comes from model attributes and may be near usize::MAX.
                let total = ((o.max(1) - 1) * stride).saturating_add(extent).saturating_sub(input);
                if self == AutoPad::SameUpper { (total / 2, total - total / 2) } else { (total - total / 2, total / 2) }
            }
        }
    }
}

/// Output spatial sizes, and the (begin, end) padding applied to each spatial dim.
pub type Geometry = (Vec<usize>, Vec<(usize, usize)>);

#[derive(Clone, Debug, PartialEq)]
pub struct PoolAttrs {
    pub max: bool,
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    /// Begin pads of every spatial dim, then end pads (the ONNX order); zeros unless `NotSet`.
    pub pads: Vec<usize>,
    pub auto_pad: AutoPad,
    pub ceil_mode: bool,
    /// AveragePool: whether padded positions count in the divisor.
    pub count_include_pad: bool,
}

/// A positive list attribute of length `k`, or `default` repeated.
fn positive(a: &Attrs<'_>, name: &str, k: usize) -> OpResult<Vec<usize>> {
    match a.ints(name)? {
        None => Ok(vec![1; k]),
        Some(v) if v.len() != k => {
            Err(OpReason::Attribute(format!("{name} has {} values, expected {k} (one per spatial dim)", v.len())))
        }
        Some(v) => v
            .iter()
            .map(|&x| {
                usize::try_from(x)
                    .ok()
                    .filter(|&x| x > 0)
                    .ok_or_else(|| OpReason::Attribute(format!("{name} {v:?} must be positive")))
            })
            .collect(),
    }
}

impl PoolAttrs {
    /// `outputs` is the number of outputs the node declares.
    pub fn parse(op_type: &str, a: &Attrs<'_>, outputs: usize) -> OpResult<PoolAttrs> {
        let max = op_type == "MaxPool";
        if max {
            a.only(&["auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "storage_order", "strides"])?;
            if outputs > 1 {
                return Err(OpReason::Unsupported(
                    "MaxPool's second output (Indices) is not supported; declare only Y".into(),
                ));
            }
            let order = a.int("storage_order", 0)?;
            if order != 0 {
                return Err(OpReason::Unsupported(format!(
                    "MaxPool storage_order={order} is not supported (only 0, row major)"
                )));
            }
        } else {
            a.only(&["auto_pad", "ceil_mode", "count_include_pad", "dilations", "kernel_shape", "pads", "strides"])?;
        }
        let kernel: Vec<usize> = a
            .ints("kernel_shape")?
            .ok_or_else(|| OpReason::Attribute(format!("{op_type} needs the kernel_shape attribute")))?
            .iter()
            .map(|&x| usize::try_from(x).ok().filter(|&x| x > 0))
            .collect::<Option<_>>()
            .ok_or_else(|| OpReason::Attribute(format!("{op_type} kernel_shape must be positive")))?;
        let k = kernel.len();
        if k == 0 || k > MAX_SPATIAL {
            return Err(OpReason::Unsupported(format!(
                "{op_type} over {k} spatial dims is not supported (1 to {MAX_SPATIAL})"
            )));
        }
        let strides = positive(a, "strides", k)?;
        let dilations = positive(a, "dilations", k)?;
        let auto_pad = match a.string("auto_pad", "NOTSET")?.as_str() {
            "NOTSET" => AutoPad::NotSet,
            "VALID" => AutoPad::Valid,
            "SAME_UPPER" => AutoPad::SameUpper,
            "SAME_LOWER" => AutoPad::SameLower,
            other => {
                return Err(OpReason::Attribute(format!(
                    "auto_pad '{other}' is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER"
                )));
            }
        };
        let pads: Vec<usize> = match a.ints("pads")? {
            None => vec![0; 2 * k],
            Some(v) if v.len() != 2 * k => {
                return Err(OpReason::Attribute(format!(
                    "pads has {} values, expected {} (begin and end per spatial dim)",
                    v.len(),
                    2 * k
                )));
            }
            Some(v) => v
                .iter()
                .map(|&x| usize::try_from(x).ok())
                .collect::<Option<_>>()
                .ok_or_else(|| OpReason::Attribute(format!("pads {v:?} must be non-negative")))?,
        };
        // ONNX sizes SAME padding from the dilated window; ONNX Runtime from the undilated one, so
        // the two disagree on the output shape and neither can be matched without breaking the other.
        if matches!(auto_pad, AutoPad::SameUpper | AutoPad::SameLower) && dilations.iter().any(|&d| d > 1) {
            return Err(OpReason::Unsupported(format!(
                "{op_type} with auto_pad SAME_* and dilations {dilations:?} is not supported (the ONNX spec and \
                 ONNX Runtime disagree on its output shape); use explicit pads"
            )));
        }
        if auto_pad != AutoPad::NotSet && pads.iter().any(|&p| p != 0) {
            return Err(OpReason::Attribute("explicit pads cannot be combined with auto_pad other than NOTSET".into()));
        }
        let ceil_mode = match a.int("ceil_mode", 0)? {
            0 => false,
            1 => true,
            v => return Err(OpReason::Attribute(format!("ceil_mode={v} is not 0 or 1"))),
        };
        let count_include_pad = match a.int("count_include_pad", 0)? {
            0 => false,
            1 => true,
            v => return Err(OpReason::Attribute(format!("count_include_pad={v} is not 0 or 1"))),
        };
        Ok(PoolAttrs { max, kernel, strides, dilations, pads, auto_pad, ceil_mode, count_include_pad })
    }

    fn name(&self) -> &'static str {
        if self.max { "MaxPool" } else { "AveragePool" }
    }

    /// Output spatial sizes and the (begin, end) pads actually applied, for spatial input `input`.
    pub fn geometry(&self, input: &[usize]) -> OpResult<Geometry> {
        if input.len() != self.kernel.len() {
            return Err(OpReason::Shape(format!(
                "{} with a {}-D kernel needs {} spatial dims, got {input:?}",
                self.name(),
                self.kernel.len(),
                self.kernel.len()
            )));
        }
        let k = self.kernel.len();
        let mut out = Vec::with_capacity(k);
        let mut pads = Vec::with_capacity(k);
        for (d, &inp) in input.iter().enumerate() {
            let s = self.strides[d];
            let extent = (self.kernel[d] - 1) * self.dilations[d] + 1;
            let (pb, pe) = self.auto_pad.resolve(inp, s, extent, (self.pads[d], self.pads[d + k]));
            let padded = inp + pb + pe;
            if padded < extent {
                return Err(OpReason::TooLarge(format!(
                    "{} window of extent {extent} (kernel {} dilation {}) exceeds the padded input size {padded} \
                     in spatial dim {d}",
                    self.name(),
                    self.kernel[d],
                    self.dilations[d]
                )));
            }
            let span = padded - extent;
            let o = if matches!(self.auto_pad, AutoPad::SameUpper | AutoPad::SameLower) {
                inp.div_ceil(s)
            } else if self.ceil_mode {
                let mut o = span.div_ceil(s) + 1;
                // The last window must start inside the input or its left padding, not wholly in
                // the right padding (the rule ONNX Runtime and PyTorch apply).
                if (o - 1) * s >= inp + pb {
                    o -= 1;
                }
                o
            } else {
                span / s + 1
            };
            out.push(o);
            pads.push((pb, pe));
        }
        Ok((out, pads))
    }
}

fn nc_spatial<'s>(what: &str, x: &'s [usize]) -> OpResult<(usize, usize, &'s [usize])> {
    if x.len() < 3 {
        return Err(OpReason::Shape(format!("{what} input must have rank >= 3 (N, C, spatial...), got shape {x:?}")));
    }
    Ok((x[0], x[1], &x[2..]))
}

pub fn infer(a: &PoolAttrs, inputs: &[Option<Input<'_>>]) -> OpResult<Vec<(Vec<usize>, DType)>> {
    let x = required(inputs, 0, "X")?;
    let (n, c, spatial) = nc_spatial(a.name(), x.shape)?;
    let (out, _) = a.geometry(spatial)?;
    let mut shape = vec![n, c];
    shape.extend(out);
    Ok(vec![(shape, x.dtype)])
}

pub fn infer_global(inputs: &[Option<Input<'_>>]) -> OpResult<Vec<(Vec<usize>, DType)>> {
    let x = required(inputs, 0, "X")?;
    let (n, c, spatial) = nc_spatial("GlobalAveragePool", x.shape)?;
    let mut shape = vec![n, c];
    shape.extend(std::iter::repeat_n(1, spatial.len()));
    Ok(vec![(shape, x.dtype)])
}

/// Left-pads per-dim values to the kernel's 3 spatial dims.
fn lanes3(v: &[usize], fill: usize) -> Vec<u32> {
    let mut out = vec![fill as u32; MAX_SPATIAL - v.len()];
    out.extend(v.iter().map(|&x| x as u32));
    out
}

fn check_u32(what: &str, n: usize) -> OpResult<()> {
    if n > u32::MAX as usize {
        return Err(OpReason::TooLarge(format!("{what} has {n} elements, more than a 32-bit index covers")));
    }
    Ok(())
}

pub fn lower(a: &PoolAttrs, l: &mut Lowering) -> OpResult<()> {
    let x = l.input(0, "X")?.clone();
    let y = l.output(0)?.clone();
    let (_, _, spatial) = nc_spatial(a.name(), &x.shape)?;
    let (out, pads) = a.geometry(spatial)?;
    check_u32("the pool input", x.numel())?;
    let n = y.numel();
    l.dispatch(
        KernelKey::new(Shader::Pool, "pool_main").with("MAX", a.max as i32),
        pool_params(a, n, spatial, &out, &pads),
        vec![x.buf, y.buf],
        grid_1d(n, 256),
    );
    Ok(())
}

pub fn lower_global(l: &mut Lowering) -> OpResult<()> {
    let x = l.input(0, "X")?.clone();
    let y = l.output(0)?.clone();
    let (n, c, spatial) = nc_spatial("GlobalAveragePool", &x.shape)?;
    check_u32("the GlobalAveragePool input", x.numel())?;
    let planes = n * c;
    let plane: usize = spatial.iter().product();
    // One workgroup per (n, c) plane, laid out 2-D past 65 535 planes; on a CPU adapter one
    // invocation per plane, 8 per workgroup (`global_avg_lanes`, the same values).
    let (entry, groups) = match l.cpu_kernels {
        true => ("global_avg_lanes", grid_1d(planes.div_ceil(8), 1)),
        false => ("global_avg_main", grid_1d(planes, 1)),
    };
    l.dispatch(
        KernelKey::new(Shader::Pool, entry),
        Params::new().u32(planes as u32).u32(plane as u32),
        vec![x.buf, y.buf],
        groups,
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Reverse pass
// ------------------------------------------------------------------------------------------------

/// The uniform block of the windowed kernels, with `n` the number of threads.
fn pool_params(a: &PoolAttrs, n: usize, spatial: &[usize], out: &[usize], pads: &[(usize, usize)]) -> Params {
    let begin: Vec<usize> = pads.iter().map(|p| p.0).collect();
    let end: Vec<usize> = pads.iter().map(|p| p.1).collect();
    Params::new()
        .u32(n as u32)
        .u32(a.count_include_pad as u32)
        .vec4u(&lanes3(spatial, 1))
        .vec4u(&lanes3(out, 1))
        .vec4u(&lanes3(&a.kernel, 1))
        .vec4u(&lanes3(&a.strides, 1))
        .vec4u(&lanes3(&a.dilations, 1))
        .vec4u(&lanes3(&begin, 0))
        .vec4u(&lanes3(&end, 0))
}

/// MaxPool routes each dY to its window's first maximum in scan order (ties go to the earliest
/// element, as in PyTorch and ONNX Runtime); AveragePool spreads dY / count over the window with
/// the forward's divisor. Both are gathers over the windows covering each input element, and
/// MaxPool first records every window's argmax in a scratch buffer (reading only X, not Y).
pub fn backward(a: &PoolAttrs, b: &mut BackwardLowering) -> OpResult<()> {
    let Some(gx) = b.grad_input(0).cloned() else { return Ok(()) };
    let dy = b.grad_output(0)?.clone();
    let x = b.input(0, "X")?.clone();
    let (_, _, spatial) = nc_spatial(a.name(), &x.shape)?;
    let (out, pads) = a.geometry(spatial)?;
    check_u32("the pool input", x.numel())?;
    let mut want = x.shape[..2].to_vec();
    want.extend(&out);
    if dy.shape != want || gx.shape.iter().product::<usize>() != x.numel() {
        return Err(OpReason::Internal(format!(
            "{} gradient shapes disagree: X {:?}, dY {:?} (expected {want:?}), dX {:?}",
            a.name(),
            x.shape,
            dy.shape,
            gx.shape
        )));
    }
    let (n_in, n_out) = (x.numel(), dy.numel());
    if n_in == 0 {
        return Ok(());
    }
    let accum = gx.accumulate as i32;
    if a.max {
        let arg = b.scratch(4 * n_out as u64);
        b.dispatch(
            KernelKey::new(Shader::Pool, "maxpool_argmax_main"),
            pool_params(a, n_out, spatial, &out, &pads),
            vec![x.buf, arg],
            grid_1d(n_out, 256),
        );
        b.dispatch(
            KernelKey::new(Shader::Pool, "maxpool_backward_main").with("ACCUM", accum),
            pool_params(a, n_in, spatial, &out, &pads),
            vec![dy.buf, arg, gx.buf],
            grid_1d(n_in, 256),
        );
    } else {
        b.dispatch(
            KernelKey::new(Shader::Pool, "avgpool_backward_main").with("ACCUM", accum),
            pool_params(a, n_in, spatial, &out, &pads),
            vec![dy.buf, gx.buf],
            grid_1d(n_in, 256),
        );
    }
    Ok(())
}

/// dX = dY / (spatial size), broadcast over each (n, c) plane.
pub fn backward_global(b: &mut BackwardLowering) -> OpResult<()> {
    let Some(gx) = b.grad_input(0).cloned() else { return Ok(()) };
    let dy = b.grad_output(0)?.clone();
    let x = b.input(0, "X")?.clone();
    let (n, c, spatial) = nc_spatial("GlobalAveragePool", &x.shape)?;
    check_u32("the GlobalAveragePool input", x.numel())?;
    if dy.numel() != n * c || gx.shape.iter().product::<usize>() != x.numel() {
        return Err(OpReason::Internal(format!(
            "GlobalAveragePool gradient shapes disagree: X {:?}, dY {:?}, dX {:?}",
            x.shape, dy.shape, gx.shape
        )));
    }
    let plane: usize = spatial.iter().product();
    if x.numel() == 0 {
        return Ok(());
    }
    b.dispatch(
        KernelKey::new(Shader::Pool, "global_avg_backward_main").with("ACCUM", gx.accumulate as i32),
        Params::new().u32((n * c) as u32).u32(plane as u32),
        vec![dy.buf, gx.buf],
        grid_1d(x.numel(), 256),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::Attr;
    use std::collections::BTreeMap;

    fn attrs(kv: &[(&str, Attr)]) -> BTreeMap<String, Attr> {
        kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn ceil_mode_drops_a_window_starting_in_the_right_padding() {
        // in 5, kernel 2, stride 2, pads 1/1: floor gives 3, ceil gives 4, but window 4 would
        // start at 6 - 1 = 5, past the input (which ends at 5 counting the left pad).
        let m = attrs(&[
            ("kernel_shape", Attr::Ints(vec![2])),
            ("strides", Attr::Ints(vec![2])),
            ("pads", Attr::Ints(vec![1, 1])),
            ("ceil_mode", Attr::Int(1)),
        ]);
        let a = PoolAttrs::parse("AveragePool", &Attrs::new(&m), 1).unwrap();
        assert_eq!(a.geometry(&[5]).unwrap().0, vec![3]);
        let m = attrs(&[
            ("kernel_shape", Attr::Ints(vec![3])),
            ("strides", Attr::Ints(vec![2])),
            ("ceil_mode", Attr::Int(1)),
        ]);
        let a = PoolAttrs::parse("MaxPool", &Attrs::new(&m), 1).unwrap();
        assert_eq!(a.geometry(&[6]).unwrap().0, vec![3]);
    }

    #[test]
    fn same_lower_puts_the_odd_pad_first() {
        let m = attrs(&[("kernel_shape", Attr::Ints(vec![2, 2])), ("auto_pad", Attr::String("SAME_LOWER".into()))]);
        let a = PoolAttrs::parse("MaxPool", &Attrs::new(&m), 1).unwrap();
        let (out, pads) = a.geometry(&[5, 4]).unwrap();
        assert_eq!(out, vec![5, 4]);
        assert_eq!(pads, vec![(1, 0), (1, 0)]);
    }

    #[test]
    fn same_padding_with_dilations_is_rejected() {
        let m = attrs(&[
            ("kernel_shape", Attr::Ints(vec![3])),
            ("dilations", Attr::Ints(vec![2])),
            ("auto_pad", Attr::String("SAME_UPPER".into())),
        ]);
        let e = PoolAttrs::parse("AveragePool", &Attrs::new(&m), 1).unwrap_err();
        assert!(matches!(&e, OpReason::Unsupported(r) if r.contains("SAME")), "{e}");
    }

    #[test]
    fn indices_output_is_rejected() {
        let m = attrs(&[("kernel_shape", Attr::Ints(vec![2, 2]))]);
        let e = PoolAttrs::parse("MaxPool", &Attrs::new(&m), 2).unwrap_err();
        assert!(matches!(&e, OpReason::Unsupported(r) if r.contains("Indices")), "{e}");
    }
}
