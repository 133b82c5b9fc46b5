//! Resize and Upsample as interpolation matrices.
//!
//! Every mode of ONNX's Resize — nearest (four rounding rules), linear and cubic, with or without
//! antialiasing, every coordinate transformation, `exclude_outside`, edge clamping — is a linear
//! map along each resized axis, and the resize of several axes is the composition of those maps
//! (the ONNX reference itself resizes one axis at a time). So `Y = M_h · X · M_wᵀ` for the last two
//! axes, each `M` an `[out, in]` matrix computed here on the CPU in f64 once the plan fixes the
//! input shape; the IR expands Resize into two MatMuls with them (`ir/resize.rs`), which carry
//! the backward. `tf_crop_and_resize` writes `extrapolation_value` where the source coordinate
//! leaves the input: a zero row of `M` plus a constant added afterwards.
//!
//! Resizing any axis but the last two (the batch or channel axis of an NCHW tensor, or a 3-D
//! volume's depth) is refused by name, as is a rank-1 input. Opsets before 11 (Resize-10,
//! Upsample) have no coordinate attribute: they use the asymmetric transformation and, for
//! nearest, ONNX Runtime's rule for them (floor when enlarging, ceil when shrinking).

use super::{Attrs, OpReason, OpResult};
use crate::tensor::{DType, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Nearest,
    Linear,
    Cubic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coord {
    HalfPixel,
    HalfPixelSymmetric,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfHalfPixelForNn,
    TfCropAndResize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
    /// Resize-10 and Upsample: floor when the axis grows, ceil when it shrinks.
    Legacy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AspectPolicy {
    Stretch,
    NotLarger,
    NotSmaller,
}

/// Which matrix of the expansion a [`super::shape::ShapeOp::Resize`] node computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// `M_h`, `[out, in]`, for the second-to-last axis (multiplied from the left).
    Rows,
    /// `M_wᵀ`, `[in, out]`, for the last axis (multiplied from the right).
    ColumnsT,
    /// `[out_h, out_w]`: `extrapolation_value` where either coordinate was extrapolated, else 0.
    Extrapolated,
}

/// The attributes of one Resize or Upsample node.
#[derive(Clone, Debug, PartialEq)]
pub struct ResizeAttrs {
    pub mode: Mode,
    pub coord: Coord,
    pub rounding: Rounding,
    pub cubic_a: f64,
    pub exclude_outside: bool,
    pub extrapolation: f32,
    pub antialias: bool,
    pub axes: Option<Vec<i64>>,
    pub policy: AspectPolicy,
    /// Upsample-7's `scales` attribute (later versions take them as an input).
    pub scales: Option<Vec<f32>>,
}

impl ResizeAttrs {
    /// Resize-10's and Upsample's semantics (asymmetric coordinates, the legacy nearest rule), and
    /// the defaults of every later attribute.
    pub fn legacy(mode: Mode) -> ResizeAttrs {
        ResizeAttrs {
            mode,
            coord: Coord::Asymmetric,
            rounding: Rounding::Legacy,
            cubic_a: -0.75,
            exclude_outside: false,
            extrapolation: 0.0,
            antialias: false,
            axes: None,
            policy: AspectPolicy::Stretch,
            scales: None,
        }
    }

    /// Parses a Resize (opset 10+) or Upsample (7–9) node's attributes.
    pub fn parse(op_type: &str, a: &Attrs<'_>, opset: i64) -> OpResult<ResizeAttrs> {
        let legacy = op_type == "Upsample" || opset < 11;
        let mode = match a.string("mode", "nearest")?.as_str() {
            "nearest" => Mode::Nearest,
            "linear" => Mode::Linear,
            "cubic" if !legacy => Mode::Cubic,
            m => {
                return Err(OpReason::Attribute(format!("{op_type} mode '{m}' (ONNX defines nearest, linear, cubic)")));
            }
        };
        let mut attrs = ResizeAttrs::legacy(mode);
        if legacy {
            if op_type == "Upsample" && opset < 9 {
                a.only(&["mode", "scales"])?;
                let s = a.floats("scales")?.ok_or(OpReason::MissingAttribute { op: "Upsample", name: "scales" })?;
                attrs.scales = Some(s);
            } else {
                a.only(&["mode"])?;
            }
            return Ok(attrs);
        }
        let mut known = vec![
            "mode",
            "coordinate_transformation_mode",
            "cubic_coeff_a",
            "exclude_outside",
            "extrapolation_value",
            "nearest_mode",
        ];
        if opset >= 18 {
            known.extend(["antialias", "axes", "keep_aspect_ratio_policy"]);
        }
        a.only(&known)?;
        attrs.coord = match a.string("coordinate_transformation_mode", "half_pixel")?.as_str() {
            "half_pixel" => Coord::HalfPixel,
            "half_pixel_symmetric" if opset >= 19 => Coord::HalfPixelSymmetric,
            "pytorch_half_pixel" => Coord::PytorchHalfPixel,
            "align_corners" => Coord::AlignCorners,
            "asymmetric" => Coord::Asymmetric,
            "tf_half_pixel_for_nn" if opset < 13 => Coord::TfHalfPixelForNn,
            "tf_crop_and_resize" => Coord::TfCropAndResize,
            m => {
                return Err(OpReason::Attribute(format!(
                    "Resize coordinate_transformation_mode '{m}' is not defined at opset {opset}"
                )));
            }
        };
        attrs.rounding = match a.string("nearest_mode", "round_prefer_floor")?.as_str() {
            "round_prefer_floor" => Rounding::RoundPreferFloor,
            "round_prefer_ceil" => Rounding::RoundPreferCeil,
            "floor" => Rounding::Floor,
            "ceil" => Rounding::Ceil,
            m => return Err(OpReason::Attribute(format!("Resize nearest_mode '{m}'"))),
        };
        let a_coeff = a.float("cubic_coeff_a", -0.75)?;
        let extrapolation = a.float("extrapolation_value", 0.0)?;
        if !a_coeff.is_finite() || !extrapolation.is_finite() {
            return Err(OpReason::Attribute(format!(
                "Resize cubic_coeff_a {a_coeff}, extrapolation_value {extrapolation}: must be finite"
            )));
        }
        attrs.cubic_a = a_coeff as f64;
        attrs.extrapolation = extrapolation;
        attrs.exclude_outside = flag(a, "exclude_outside")?;
        attrs.antialias = flag(a, "antialias")?;
        if attrs.antialias && mode == Mode::Nearest {
            return Err(OpReason::Attribute("Resize antialias is defined for linear and cubic modes only".into()));
        }
        attrs.axes = a.ints("axes")?;
        attrs.policy = match a.string("keep_aspect_ratio_policy", "stretch")?.as_str() {
            "stretch" => AspectPolicy::Stretch,
            "not_larger" => AspectPolicy::NotLarger,
            "not_smaller" => AspectPolicy::NotSmaller,
            m => return Err(OpReason::Attribute(format!("Resize keep_aspect_ratio_policy '{m}'"))),
        };
        Ok(attrs)
    }

    /// Whether the expansion adds the extrapolated positions' constant.
    pub fn adds_extrapolation(&self) -> bool {
        self.coord == Coord::TfCropAndResize && self.extrapolation != 0.0
    }
}

fn flag(a: &Attrs<'_>, name: &str) -> OpResult<bool> {
    match a.int(name, 0)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(OpReason::Attribute(format!("Resize {name} = {v} (0 or 1)"))),
    }
}

/// Output size, scale and region of interest of every axis.
#[derive(Debug)]
struct Geometry {
    input: Vec<usize>,
    output: Vec<usize>,
    scales: Vec<f64>,
    roi: Option<Vec<(f64, f64)>>,
}

/// Values of an optional input: `None` when absent or empty (Resize-11+ passes an empty tensor
/// for whichever of `scales` and `sizes` is not used).
fn present<'t>(inputs: &[Option<&'t Tensor>], i: usize) -> Option<&'t Tensor> {
    inputs.get(i).copied().flatten().filter(|t| t.numel() > 0)
}

fn geometry(attrs: &ResizeAttrs, inputs: &[Option<&Tensor>]) -> OpResult<Geometry> {
    let shape = inputs.first().copied().flatten().ok_or(OpReason::MissingInput { index: 0, what: "X".into() })?;
    let input: Vec<usize> = shape
        .to_i64_vec()
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| OpReason::Internal(format!("Resize input dim {d}"))))
        .collect::<OpResult<_>>()?;
    let r = input.len();
    if r < 2 {
        return Err(OpReason::Unsupported(format!(
            "Resize of a rank-{r} tensor: only the last two axes of a tensor of rank 2 or more can be resized"
        )));
    }
    if let Some(&d) = input.iter().find(|&&d| d == 0) {
        return Err(OpReason::Shape(format!("Resize of an input of shape {input:?} (dim {d})")));
    }
    let axes: Vec<usize> = match &attrs.axes {
        None => (0..r).collect(),
        Some(ax) => {
            let mut out = Vec::new();
            for &a in ax {
                let n = super::norm_axis(a, r)?;
                if out.contains(&n) {
                    return Err(OpReason::Attribute(format!("Resize axes {ax:?} repeat axis {n}")));
                }
                out.push(n);
            }
            out
        }
    };
    let scales_in = attrs.scales.as_ref().map(|s| Tensor::f32(vec![s.len()], s.clone()));
    let scales_t = scales_in.as_ref().or(present(inputs, 2));
    let sizes_t = present(inputs, 3);
    let mut scales: Vec<f64> = vec![1.0; r];
    let mut output: Vec<usize> = input.clone();
    match (scales_t, sizes_t) {
        (Some(_), Some(_)) => {
            return Err(OpReason::Attribute("Resize takes either scales or sizes, not both".into()));
        }
        (None, None) => return Err(OpReason::MissingInput { index: 2, what: "scales or sizes".into() }),
        (Some(s), None) => {
            if !s.dtype.is_float() {
                return Err(OpReason::DType(format!("Resize scales must be floats, got {}", s.dtype)));
            }
            let v = s.to_f32_vec();
            if v.len() != axes.len() {
                return Err(OpReason::Shape(format!("Resize scales {v:?} for {} axes", axes.len())));
            }
            for (&axis, &sc) in axes.iter().zip(&v) {
                if !(sc.is_finite() && sc > 0.0) {
                    return Err(OpReason::Value(format!("Resize scale {sc} (must be finite and positive)")));
                }
                scales[axis] = sc as f64;
                output[axis] = (sc as f64 * input[axis] as f64) as usize;
            }
        }
        (None, Some(s)) => {
            if s.dtype != DType::I64 {
                return Err(OpReason::DType(format!("Resize sizes must be int64, got {}", s.dtype)));
            }
            let v = s.to_i64_vec();
            if v.len() != axes.len() {
                return Err(OpReason::Shape(format!("Resize sizes {v:?} for {} axes", axes.len())));
            }
            for (&axis, &size) in axes.iter().zip(&v) {
                if size <= 0 {
                    return Err(OpReason::Value(format!("Resize size {size} (must be positive)")));
                }
                output[axis] = size as usize;
                scales[axis] = size as f64 / input[axis] as f64;
            }
            if attrs.policy != AspectPolicy::Stretch {
                let pick = axes.iter().map(|&a| scales[a]);
                let s = if attrs.policy == AspectPolicy::NotLarger {
                    pick.fold(f64::INFINITY, f64::min)
                } else {
                    pick.fold(0.0, f64::max)
                };
                for &a in &axes {
                    scales[a] = s;
                    output[a] = (s * input[a] as f64 + 0.5) as usize;
                }
            }
        }
    }
    if let Some(&d) = output.iter().find(|&&d| d == 0) {
        return Err(OpReason::Shape(format!("Resize of {input:?} to {output:?}: an output dim is {d}")));
    }
    let roi = match (attrs.coord, present(inputs, 1)) {
        (Coord::TfCropAndResize, None) => {
            return Err(OpReason::MissingInput { index: 1, what: "roi (tf_crop_and_resize)".into() });
        }
        (Coord::TfCropAndResize, Some(t)) => {
            let v = t.to_f32_vec();
            if v.len() != 2 * axes.len() {
                return Err(OpReason::Shape(format!("Resize roi {v:?} for {} axes", axes.len())));
            }
            let mut roi = vec![(0.0, 1.0); r];
            for (i, &a) in axes.iter().enumerate() {
                roi[a] = (v[i] as f64, v[axes.len() + i] as f64);
            }
            Some(roi)
        }
        _ => None,
    };
    let geo = Geometry { input, output, scales, roi };
    for axis in 0..r - 2 {
        if !geo.identity(axis) {
            return Err(OpReason::Unsupported(format!(
                "Resize of {:?} to {:?} changes axis {axis}: only the last two axes can be resized",
                geo.input, geo.output
            )));
        }
    }
    Ok(geo)
}

impl Geometry {
    /// An axis the reference leaves as it is (no interpolation at all).
    fn identity(&self, axis: usize) -> bool {
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
        close(self.scales[axis], 1.0)
            && self.output[axis] == self.input[axis]
            && self.roi.as_ref().is_none_or(|r| close(r[axis].0 + 1.0, 1.0) && close(r[axis].1, 1.0))
    }

    /// `[out, in]` row-major, and which outputs were extrapolated.
    fn matrix(&self, attrs: &ResizeAttrs, axis: usize) -> (Vec<f64>, Vec<bool>) {
        let (n_in, n_out) = (self.input[axis], self.output[axis]);
        let mut m = vec![0.0; n_out * n_in];
        let mut extrapolated = vec![false; n_out];
        if self.identity(axis) {
            for i in 0..n_in {
                m[i * n_in + i] = 1.0;
            }
            return (m, extrapolated);
        }
        let roi = self.roi.as_ref().map(|r| r[axis]);
        for y in 0..n_out {
            let Some(x) = source_coordinate(attrs.coord, y, n_in, n_out, self.scales[axis], roi) else {
                extrapolated[y] = true;
                continue;
            };
            let row = &mut m[y * n_in..(y + 1) * n_in];
            for (j, c) in taps(attrs, x, self.scales[axis], n_in) {
                row[j.clamp(0, n_in as i64 - 1) as usize] += c;
            }
        }
        (m, extrapolated)
    }
}

/// The input coordinate output `y` samples, or `None` where `tf_crop_and_resize` extrapolates.
fn source_coordinate(
    coord: Coord,
    y: usize,
    n_in: usize,
    n_out: usize,
    scale: f64,
    roi: Option<(f64, f64)>,
) -> Option<f64> {
    let (y, w_in) = (y as f64, n_in as f64);
    // The reference divides by the real-valued output length scale·in, not the rounded one.
    let w_out = scale * w_in;
    Some(match coord {
        Coord::AlignCorners if w_out == 1.0 => 0.0,
        Coord::AlignCorners => y * (w_in - 1.0) / (w_out - 1.0),
        Coord::Asymmetric => y / scale,
        Coord::TfHalfPixelForNn => (y + 0.5) / scale,
        Coord::PytorchHalfPixel if w_out == 1.0 => -0.5,
        Coord::PytorchHalfPixel | Coord::HalfPixel => (y + 0.5) / scale - 0.5,
        Coord::HalfPixelSymmetric => {
            let offset = w_in / 2.0 * (1.0 - n_out as f64 / w_out);
            offset + (y + 0.5) / scale - 0.5
        }
        Coord::TfCropAndResize => {
            let (start, end) = roi.unwrap_or((0.0, 1.0));
            let x = if w_out == 1.0 {
                (end - start) * (w_in - 1.0) / 2.0
            } else {
                y * (end - start) * (w_in - 1.0) / (w_out - 1.0)
            } + start * (w_in - 1.0);
            if x < 0.0 || x > w_in - 1.0 {
                return None;
            }
            x
        }
    })
}

/// The (input index, weight) pairs output coordinate `x` is computed from, before clamping the
/// indices to the input (clamping is edge padding).
fn taps(attrs: &ResizeAttrs, x: f64, scale: f64, n_in: usize) -> Vec<(i64, f64)> {
    let floor = x.floor();
    let integer = x == floor;
    if attrs.mode == Mode::Nearest {
        let ratio = x - floor;
        let up = match attrs.rounding {
            _ if integer => false,
            Rounding::RoundPreferFloor => ratio > 0.5,
            Rounding::RoundPreferCeil => ratio >= 0.5,
            Rounding::Floor => false,
            Rounding::Ceil => true,
            Rounding::Legacy => scale < 1.0,
        };
        return vec![(floor as i64 + up as i64, 1.0)];
    }
    // The weights sit on n consecutive indices around x (n even); ratio in (0, 1] measures x
    // from the index left of it, 1 when x is an index itself.
    let ratio = if integer { 1.0 } else { x - floor };
    let a = attrs.cubic_a;
    let mut w: Vec<f64> = match (attrs.mode, attrs.antialias) {
        (Mode::Linear, false) => vec![1.0 - ratio, ratio],
        (Mode::Cubic, false) => {
            let (r, q) = (ratio, 1.0 - ratio);
            vec![
                ((a * (r + 1.0) - 5.0 * a) * (r + 1.0) + 8.0 * a) * (r + 1.0) - 4.0 * a,
                ((a + 2.0) * r - (a + 3.0)) * r * r + 1.0,
                ((a + 2.0) * q - (a + 3.0)) * q * q + 1.0,
                ((a * (q + 1.0) - 5.0 * a) * (q + 1.0) + 8.0 * a) * (q + 1.0) - 4.0 * a,
            ]
        }
        (mode, _) => {
            // Antialiasing stretches the kernel by 1/scale when shrinking.
            let s = scale.min(1.0);
            let support = if mode == Mode::Linear { 1.0 } else { 2.0 };
            let start = (-support / s).floor() as i64 + 1;
            // Indices start..2 − start around x: 2 − 2·start taps (even).
            let w: Vec<f64> = (start..2 - start)
                .map(|i| {
                    let t = (s * (i as f64 - ratio)).abs();
                    if mode == Mode::Linear { (1.0 - t).clamp(0.0, 1.0) } else { cubic_kernel(t, a) }
                })
                .collect();
            let sum: f64 = w.iter().sum();
            w.into_iter().map(|c| c / sum).collect()
        }
    };
    let n = w.len() as i64;
    let start = if integer { floor as i64 - n / 2 } else { floor as i64 - n / 2 + 1 };
    if attrs.exclude_outside {
        for (i, c) in w.iter_mut().enumerate() {
            let j = start + i as i64;
            if j < 0 || j >= n_in as i64 {
                *c = 0.0;
            }
        }
        let sum: f64 = w.iter().sum();
        let sum = if sum == 0.0 { 1.0 } else { sum };
        w.iter_mut().for_each(|c| *c /= sum);
    }
    w.into_iter().enumerate().map(|(i, c)| (start + i as i64, c)).collect()
}

/// Keys' cubic convolution kernel with parameter `a`.
fn cubic_kernel(t: f64, a: f64) -> f64 {
    let (t2, t3) = (t * t, t * t * t);
    if t <= 1.0 {
        (a + 2.0) * t3 - (a + 3.0) * t2 + 1.0
    } else if t < 2.0 {
        a * t3 - 5.0 * a * t2 + 8.0 * a * t - 4.0 * a
    } else {
        0.0
    }
}

/// Shape of the matrix `part` for the given constant inputs (`[Shape(X), roi, scales, sizes]`).
pub fn infer(attrs: &ResizeAttrs, part: Part, inputs: &[Option<&Tensor>]) -> OpResult<Vec<usize>> {
    let g = geometry(attrs, inputs)?;
    let r = g.input.len();
    Ok(match part {
        Part::Rows => vec![g.output[r - 2], g.input[r - 2]],
        Part::ColumnsT => vec![g.input[r - 1], g.output[r - 1]],
        Part::Extrapolated => vec![g.output[r - 2], g.output[r - 1]],
    })
}

/// The matrix `part` (f32, computed in f64).
pub fn eval(attrs: &ResizeAttrs, part: Part, inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let g = geometry(attrs, inputs)?;
    let r = g.input.len();
    let (h, w) = (r - 2, r - 1);
    let elements = match part {
        Part::Rows => g.output[h] * g.input[h],
        Part::ColumnsT => g.input[w] * g.output[w],
        Part::Extrapolated => g.output[h] * g.output[w],
    };
    if elements > super::shape::MAX_FOLDED_ELEMENTS {
        return Err(OpReason::TooLarge(format!(
            "Resize of {:?} to {:?} needs an interpolation matrix of {elements} elements",
            g.input, g.output
        )));
    }
    Ok(match part {
        Part::Rows => {
            let (m, _) = g.matrix(attrs, h);
            Tensor::f32(vec![g.output[h], g.input[h]], m.into_iter().map(|v| v as f32).collect())
        }
        Part::ColumnsT => {
            let (m, _) = g.matrix(attrs, w);
            let (n_in, n_out) = (g.input[w], g.output[w]);
            let mut t = vec![0.0f32; n_in * n_out];
            for y in 0..n_out {
                for x in 0..n_in {
                    t[x * n_out + y] = m[y * n_in + x] as f32;
                }
            }
            Tensor::f32(vec![n_in, n_out], t)
        }
        Part::Extrapolated => {
            let (_, rows) = g.matrix(attrs, h);
            let (_, cols) = g.matrix(attrs, w);
            let e = attrs.extrapolation;
            let v = rows.iter().flat_map(|&ry| cols.iter().map(move |&cx| if ry || cx { e } else { 0.0 })).collect();
            Tensor::f32(vec![g.output[h], g.output[w]], v)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(mode: Mode, coord: Coord) -> ResizeAttrs {
        ResizeAttrs { coord, rounding: Rounding::RoundPreferFloor, ..ResizeAttrs::legacy(mode) }
    }

    fn rows(a: &ResizeAttrs, shape: &[i64], scales: &[f32]) -> Tensor {
        let s = Tensor::i64(vec![shape.len()], shape.to_vec());
        let sc = Tensor::f32(vec![scales.len()], scales.to_vec());
        eval(a, Part::Rows, &[Some(&s), None, Some(&sc), None]).unwrap()
    }

    #[test]
    fn every_row_of_a_matrix_sums_to_one() {
        for mode in [Mode::Nearest, Mode::Linear, Mode::Cubic] {
            for coord in [Coord::HalfPixel, Coord::AlignCorners, Coord::Asymmetric, Coord::PytorchHalfPixel] {
                for scale in [0.3f32, 0.5, 0.75, 1.5, 2.0, 3.0] {
                    let mut a = attrs(mode, coord);
                    for antialias in [false, true] {
                        a.antialias = antialias && mode != Mode::Nearest;
                        let m = rows(&a, &[1, 1, 7, 1], &[1.0, 1.0, scale, 1.0]);
                        let n = m.shape[1];
                        for row in m.to_f32_vec().chunks(n) {
                            let s: f32 = row.iter().sum();
                            assert!((s - 1.0).abs() < 1e-5, "{mode:?} {coord:?} {scale} {antialias}: {row:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn nearest_doubling_repeats_each_row() {
        let a = attrs(Mode::Nearest, Coord::Asymmetric);
        let m = rows(&a, &[1, 1, 3, 1], &[1.0, 1.0, 2.0, 1.0]);
        assert_eq!(m.shape, vec![6, 3]);
        let v = m.to_f32_vec();
        let picked: Vec<usize> = v.chunks(3).map(|r| r.iter().position(|&c| c == 1.0).unwrap()).collect();
        assert_eq!(picked, vec![0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn resizing_the_channel_axis_is_refused() {
        let a = attrs(Mode::Linear, Coord::HalfPixel);
        let s = Tensor::i64(vec![4], vec![1, 3, 4, 4]);
        let sc = Tensor::f32(vec![4], vec![1.0, 2.0, 2.0, 2.0]);
        let err = eval(&a, Part::Rows, &[Some(&s), None, Some(&sc), None]).unwrap_err();
        assert!(err.to_string().contains("changes axis 1"), "{err}");
    }
}
