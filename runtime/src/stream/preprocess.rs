//! Camera frames into a model's input, on the GPU: colour conversion, rotation and mirror,
//! resize of the shorter side, centre crop and normalisation in one dispatch per frame, written
//! straight into the NCHW float32 input buffer at the frame's batch row.
//!
//! # Semantics
//!
//! For a frame of `W×H` stored pixels and a [`PreprocessSpec`] `resize=R,crop=C` (`size=S` is
//! `resize=S,crop=S`; `crop=CWxCH` is a non-square crop, `size=OWxOH` a stretch, below):
//!
//! 1. **Colour.** Every stored pixel becomes RGB in 0–255 (not rounded). YUV frames use the
//!    frame's [`YuvMatrix`] and [`YuvRange`] (default BT.601 video range, what phone cameras
//!    deliver): `Y = (Y' − 16)·255/219`, `U, V = (U', V' − 128)·255/224` in video range
//!    (`Y = Y'`, `U, V = U', V' − 128` in full range), then `R = Y + 2(1−Kr)·V`,
//!    `G = Y − 2Kb(1−Kb)/Kg·U − 2Kr(1−Kr)/Kg·V`, `B = Y + 2(1−Kb)·U`, clamped to 0–255. Chroma
//!    is 4:2:0 without interpolation: stored pixel `(x, y)` takes chroma sample `(x/2, y/2)`;
//!    odd sizes have `ceil(W/2)×ceil(H/2)` chroma samples. With `channels=1` the value is luma:
//!    `0.299R + 0.587G + 0.114B` for RGB frames, the gray value for Gray8, and the Y plane
//!    (range-expanded as above, clamped, chroma never read) for YUV frames. With `channels=3`
//!    a gray frame is replicated into three channels.
//! 2. **Orientation.** The frame is rotated clockwise by its [`Rotation`](super::frame::Rotation),
//!    then mirrored horizontally if `mirror` is set, giving the upright `W'×H'` image.
//! 3. **Resize and crop.** The shorter upright side is scaled to `R` and the longer one to
//!    `floor(R·long/short)` (torchvision's `Resize(R)`), then a `C×C` window is cut from the
//!    centre at `round((size − C)/2)`, rounding halves to even (torchvision's `CenterCrop`, which
//!    uses Python's `round`). Only the `C×C` output pixels are computed: each samples the upright
//!    image bilinearly at `(i + crop + 0.5)·(upright/resized) − 0.5` per axis, negative positions
//!    clamped to 0 and the far neighbour clamped to the border — PyTorch's
//!    `interpolate(mode="bilinear", align_corners=False, antialias=False)`. There is **no
//!    antialiasing**: PIL's `resize` (and torchvision's with `antialias=True`) low-pass filters
//!    when downscaling and gives different values for large reductions; models trained that way
//!    see slightly sharper inputs here. `crop=CWxCH` cuts a `CW×CH` window the same way (both
//!    at most `R`, so it always fits); `size=OWxOH` skips the crop and scales each axis to the
//!    output size on its own (torchvision's `Resize((OH, OW))`: the aspect ratio is not kept), for
//!    models whose input is not square.
//! 4. **Normalisation.** `(pixel·scale − mean[c]) / std[c]`, `scale` = 1/255 unless the spec
//!    sets it; output NCHW float32.
//!
//! [`preprocess_cpu`] implements the same steps in plain f64 code, for tests and for
//! applications without a GPU. Frames are validated on the host ([`Frame::validate`]) before any
//! GPU work, so a malformed frame is a [`FrameError`] and the stream goes on.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

pub use super::frame::FrameError;
use super::frame::{Frame, PixelFormat, Plane, YuvMatrix, YuvRange};
use crate::gpu::{GpuContext, GpuError, KernelKey, Params, Shader, grid_1d};
use crate::tensor::Tensor;

/// Largest `size`, `resize` or `crop`: keeps every pixel index exact in f32 and every output
/// offset inside u32 in the kernel.
pub const MAX_SIZE: u32 = 16384;

/// A malformed preprocessing spec string.
#[derive(Debug, Error, PartialEq)]
pub enum SpecError {
    #[error("'{0}' is not key=value (keys: size, resize, crop, channels, mean, std, scale, layout)")]
    Malformed(String),
    #[error("unknown key '{0}' (keys: size, resize, crop, channels, mean, std, scale, layout)")]
    UnknownKey(String),
    #[error("'{0}' is given twice")]
    Duplicate(String),
    #[error("{key}={value}: '{number}' is not a {expected}")]
    BadNumber { key: String, value: String, number: String, expected: &'static str },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("{key} has {given} value(s) but channels={channels}")]
    CountMismatch { key: String, given: usize, channels: usize },
    #[error("{0}")]
    Shape(String),
}

/// How frames become the model's input: resize of the shorter side, centre crop, channels,
/// normalisation. Parsed from strings such as
/// `size=32,channels=3,mean=0.4377/0.4438/0.4728,std=0.1980/0.2010/0.1970` or
/// `resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225`:
///
/// - `size=S`: shorter side to `S`, centre crop `S×S`; or `resize=R,crop=C` (both): shorter side
///   to `R`, centre crop `C×C`, `C ≤ R` (`crop=WxH`: a `W×H` window, both `≤ R`); or
///   `size=WxH`: each axis scaled to `W×H` (no crop; for models whose input is not square);
/// - `channels=1|3` (default 3): luma or RGB;
/// - `mean=a/b/c`, `std=a/b/c`: one value per channel (defaults 0 and 1), `std > 0`;
/// - `scale=s` (default 1/255): the factor from 0–255 pixel values to the values `mean` and `std`
///   refer to; `scale=1` feeds models that take raw 0–255 inputs.
///
/// ```
/// let imagenet: acclimate::Preprocess = "resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225".parse()?;
/// assert!("size=32,std=0".parse::<acclimate::Preprocess>().is_err()); // std must be > 0
/// # let _ = imagenet;
/// # Ok::<(), acclimate::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct PreprocessSpec {
    /// The shorter side's length after resizing; 0: each axis scaled to the output (`size=WxH`).
    resize: u32,
    /// The output's width and height.
    crop: (u32, u32),
    channels: usize,
    mean: Vec<f32>,
    std: Vec<f32>,
    scale: f32,
    /// `None`: as the model takes it (a stream picks channels-last for a model whose input is
    /// `[N, H, W, C]`, [`PreprocessSpec::for_input`]); NCHW otherwise.
    layout: Option<Layout>,
}

/// How a preprocessed frame's values are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[C, H, W]` (PyTorch's and most ONNX classifiers').
    Nchw,
    /// `[H, W, C]`, channels last (models exported from TensorFlow/Keras without a transpose).
    Nhwc,
}

impl PreprocessSpec {
    /// A spec from its parts, checked as the parser checks them.
    pub fn new(
        resize: u32,
        crop: u32,
        channels: usize,
        mean: Vec<f32>,
        std: Vec<f32>,
        scale: f32,
    ) -> Result<PreprocessSpec, SpecError> {
        PreprocessSpec::build(Some(resize), (crop, crop), channels, mean, std, scale)
    }

    /// A spec whose frames are scaled to `width×height` on each axis, without a crop
    /// (`size=WxH`).
    pub fn stretched(
        width: u32,
        height: u32,
        channels: usize,
        mean: Vec<f32>,
        std: Vec<f32>,
        scale: f32,
    ) -> Result<PreprocessSpec, SpecError> {
        PreprocessSpec::build(None, (width, height), channels, mean, std, scale)
    }

    /// `resize`: the shorter side's length (`None`: stretch to `crop`); `crop`: width, height.
    fn build(
        resize: Option<u32>,
        crop: (u32, u32),
        channels: usize,
        mean: Vec<f32>,
        std: Vec<f32>,
        scale: f32,
    ) -> Result<PreprocessSpec, SpecError> {
        let size_err = |key: &str, v: u32| {
            (v == 0 || v > MAX_SIZE)
                .then(|| SpecError::Invalid { key: key.into(), reason: format!("{v} is outside 1..={MAX_SIZE}") })
        };
        let crop_key = if resize.is_some() { "crop" } else { "size" };
        if let Some(e) = resize
            .and_then(|r| size_err("resize", r))
            .or_else(|| size_err(crop_key, crop.0))
            .or_else(|| size_err(crop_key, crop.1))
        {
            return Err(e);
        }
        if let Some(r) = resize
            && crop.0.max(crop.1) > r
        {
            let c = if crop.0 == crop.1 { crop.0.to_string() } else { format!("{}x{}", crop.0, crop.1) };
            return Err(SpecError::Shape(format!(
                "crop={c} is larger than resize={r}: the crop must fit in the resized shorter side"
            )));
        }
        let resize = resize.unwrap_or(0);
        if channels != 1 && channels != 3 {
            return Err(SpecError::Invalid { key: "channels".into(), reason: format!("{channels} is not 1 or 3") });
        }
        for (key, values) in [("mean", &mean), ("std", &std)] {
            if values.len() != channels {
                return Err(SpecError::CountMismatch { key: key.into(), given: values.len(), channels });
            }
            if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                return Err(SpecError::Invalid { key: key.into(), reason: format!("{v} is not finite") });
            }
        }
        if let Some(v) = std.iter().find(|&&v| v <= 0.0) {
            return Err(SpecError::Invalid { key: "std".into(), reason: format!("{v} is not positive") });
        }
        if !(scale.is_finite() && scale > 0.0) {
            return Err(SpecError::Invalid {
                key: "scale".into(),
                reason: format!("{scale} is not a positive number"),
            });
        }
        Ok(PreprocessSpec { resize, crop, channels, mean, std, scale, layout: None })
    }

    /// This spec with its values ordered as `layout` says.
    pub fn with_layout(mut self, layout: Layout) -> PreprocessSpec {
        self.layout = Some(layout);
        self
    }

    /// The layout of the output (NCHW unless set).
    pub fn layout(&self) -> Layout {
        self.layout.unwrap_or(Layout::Nchw)
    }

    /// This spec for a model whose input declares `dims` (`None`: a symbolic dimension): with no
    /// layout set, channels-last when the model takes `[N, H, W, C]` with this spec's size and
    /// channels and not `[N, C, H, W]`; otherwise unchanged.
    pub fn for_input(self, dims: &[Option<usize>]) -> PreprocessSpec {
        let (c, w, h) = (Some(self.channels), Some(self.crop.0 as usize), Some(self.crop.1 as usize));
        let fits = |d: Option<usize>, want: Option<usize>| d.is_none() || d == want;
        let nchw = dims.len() == 4 && fits(dims[1], c) && fits(dims[2], h) && fits(dims[3], w);
        let nhwc = dims.len() == 4 && dims[3] == c && fits(dims[1], h) && fits(dims[2], w);
        if self.layout.is_none() && nhwc && !nchw { self.with_layout(Layout::Nhwc) } else { self }
    }

    /// The shorter side's length after resizing; 0 when each axis is scaled to the output size
    /// (`size=WxH`).
    pub fn resize(&self) -> u32 {
        self.resize
    }

    /// The output's width and height.
    pub fn output_size(&self) -> (u32, u32) {
        self.crop
    }

    /// Output channels: 1 (luma) or 3 (RGB).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Per-channel mean, in the scaled units.
    pub fn mean(&self) -> &[f32] {
        &self.mean
    }

    /// Per-channel standard deviation, in the scaled units.
    pub fn std(&self) -> &[f32] {
        &self.std
    }

    /// Factor from 0–255 pixel values to the units of `mean` and `std`.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Floats per frame: `channels·width·height`.
    pub fn frame_len(&self) -> usize {
        self.channels * self.crop.0 as usize * self.crop.1 as usize
    }

    /// The shape of `batch` preprocessed frames: NCHW, or NHWC with [`Layout::Nhwc`].
    pub fn output_shape(&self, batch: usize) -> Vec<usize> {
        let (c, w, h) = (self.channels, self.crop.0 as usize, self.crop.1 as usize);
        match self.layout() {
            Layout::Nchw => vec![batch, c, h, w],
            Layout::Nhwc => vec![batch, h, w, c],
        }
    }
}

impl FromStr for PreprocessSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<PreprocessSpec, SpecError> {
        let mut seen: Vec<&str> = Vec::new();
        let (mut size, mut resize, mut crop, mut channels) = (None, None, None, None);
        let (mut mean, mut std, mut scale, mut layout) = (None, None, None, None);
        for part in s.split(',').map(str::trim) {
            let Some((key, value)) = part.split_once('=') else {
                return Err(SpecError::Malformed(part.to_string()));
            };
            let (key, value) = (key.trim(), value.trim());
            if seen.contains(&key) {
                return Err(SpecError::Duplicate(key.to_string()));
            }
            let bad = |number: &str, expected| SpecError::BadNumber {
                key: key.into(),
                value: value.into(),
                number: number.into(),
                expected,
            };
            let int = || value.parse::<u32>().map_err(|_| bad(value, "non-negative integer"));
            // S, or WxH.
            let dims = || -> Result<(u32, u32, bool), SpecError> {
                match value.split_once(['x', 'X']) {
                    Some((w, h)) => {
                        let n = |v: &str| v.trim().parse::<u32>().map_err(|_| bad(v.trim(), "non-negative integer"));
                        Ok((n(w)?, n(h)?, true))
                    }
                    None => int().map(|v| (v, v, false)),
                }
            };
            let floats = || -> Result<Vec<f32>, SpecError> {
                value.split('/').map(|v| v.trim().parse::<f32>().map_err(|_| bad(v.trim(), "number"))).collect()
            };
            match key {
                "size" => size = Some(dims()?),
                "resize" => resize = Some(int()?),
                "crop" => crop = Some(dims()?),
                "channels" => channels = Some(int()? as usize),
                "mean" => mean = Some(floats()?),
                "std" => std = Some(floats()?),
                "scale" => scale = Some(value.parse::<f32>().map_err(|_| bad(value, "number"))?),
                "layout" => {
                    layout = Some(match value {
                        "nchw" => Layout::Nchw,
                        "nhwc" => Layout::Nhwc,
                        _ => {
                            return Err(SpecError::Invalid {
                                key: key.into(),
                                reason: format!("'{value}' is not nchw or nhwc"),
                            });
                        }
                    })
                }
                _ => return Err(SpecError::UnknownKey(key.to_string())),
            }
            seen.push(key);
        }
        let (resize, crop) = match (size, resize, crop) {
            (Some((w, h, true)), None, None) => (None, (w, h)),
            (Some((s, _, false)), None, None) => (Some(s), (s, s)),
            (None, Some(r), Some((w, h, _))) => (Some(r), (w, h)),
            (Some(_), _, _) => {
                return Err(SpecError::Shape("size=S already sets resize and crop; give one or the other".into()));
            }
            (None, Some(_), None) => {
                return Err(SpecError::Shape("resize=R needs crop=C: the model's input is a fixed C×C square".into()));
            }
            (None, None, Some(_)) => return Err(SpecError::Shape("crop=C needs resize=R (or use size=S)".into())),
            (None, None, None) => return Err(SpecError::Shape("the spec needs size=S or resize=R,crop=C".into())),
        };
        let channels = channels.unwrap_or(3);
        let mean = mean.unwrap_or_else(|| vec![0.0; channels]);
        let std = std.unwrap_or_else(|| vec![1.0; channels]);
        let spec = PreprocessSpec::build(resize, crop, channels, mean, std, scale.unwrap_or(1.0 / 255.0))?;
        Ok(match layout {
            Some(l) => spec.with_layout(l),
            None => spec,
        })
    }
}

impl fmt::Display for PreprocessSpec {
    /// The canonical spec string; parsing it gives the same spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (w, h) = self.crop;
        if self.resize == 0 {
            write!(f, "size={w}x{h}")?;
        } else if w != h {
            write!(f, "resize={},crop={w}x{h}", self.resize)?;
        } else if self.resize == w {
            write!(f, "size={w}")?;
        } else {
            write!(f, "resize={},crop={w}", self.resize)?;
        }
        let join = |v: &[f32]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("/");
        write!(f, ",channels={},mean={},std={}", self.channels, join(&self.mean), join(&self.std))?;
        if self.scale != 1.0 / 255.0 {
            write!(f, ",scale={}", self.scale)?;
        }
        match self.layout {
            Some(Layout::Nchw) => write!(f, ",layout=nchw")?,
            Some(Layout::Nhwc) => write!(f, ",layout=nhwc")?,
            None => {}
        }
        Ok(())
    }
}

/// Where a frame's output pixels sample it: the upright size, the resized size, the crop's
/// corner in the resized image and the per-axis scale from resized to upright pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geometry {
    /// Upright (rotated) width and height.
    pub upright: (u32, u32),
    /// Size after resizing the shorter side (the output size when stretched).
    pub resized: (u32, u32),
    /// Left and top of the crop in the resized image.
    pub crop_origin: (u32, u32),
    /// Upright pixels per resized pixel, per axis.
    pub scale: (f64, f64),
}

impl Geometry {
    /// The geometry of `frame` under `spec` (the frame's size must be non-zero).
    pub fn new(frame: &Frame, spec: &PreprocessSpec) -> Geometry {
        let (uw, uh) = frame.upright_size();
        let r = spec.resize as u64;
        // torchvision: the short side becomes R, the long one int(R·long/short) (at least R, so
        // a crop of at most R fits); stretched, each axis becomes the output's.
        let (rw, rh) = if spec.resize == 0 {
            spec.crop
        } else if uw <= uh {
            (spec.resize, (r * uh as u64 / uw as u64) as u32)
        } else {
            ((r * uw as u64 / uh as u64) as u32, spec.resize)
        };
        let origin = |size: u32, crop: u32| round_half_even_half(size - crop);
        Geometry {
            upright: (uw, uh),
            resized: (rw, rh),
            crop_origin: (origin(rw, spec.crop.0), origin(rh, spec.crop.1)),
            scale: (uw as f64 / rw as f64, uh as f64 / rh as f64),
        }
    }
}

/// `round(d / 2)` with halves to even, as Python's `round` in torchvision's `CenterCrop`.
fn round_half_even_half(d: u32) -> u32 {
    let h = d / 2;
    if d % 2 == 1 && h % 2 == 1 { h + 1 } else { h }
}

/// YUV → RGB constants of one matrix and range, in the form the kernel uses:
/// `Y = (Y' − luma_offset)·luma_gain`, `R = Y + cr_r·V`, `G = Y − cb_g·U − cr_g·V`,
/// `B = Y + cb_b·U` with `U, V = U', V' − 128`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct YuvCoefficients {
    pub luma_offset: f64,
    pub luma_gain: f64,
    pub cr_r: f64,
    pub cb_g: f64,
    pub cr_g: f64,
    pub cb_b: f64,
}

impl YuvCoefficients {
    /// From the standard's Kr and Kb (ITU-R BT.601 / BT.709 §3) and the range's quantisation
    /// (video: luma 219 levels from 16, chroma 224 levels around 128; full: 255 levels).
    pub fn new(matrix: YuvMatrix, range: YuvRange) -> YuvCoefficients {
        let (kr, kb) = matrix.kr_kb();
        let kg = 1.0 - kr - kb;
        let (luma_offset, luma_gain, chroma_gain) = match range {
            YuvRange::Video => (16.0, 255.0 / 219.0, 255.0 / 224.0),
            YuvRange::Full => (0.0, 1.0, 1.0),
        };
        YuvCoefficients {
            luma_offset,
            luma_gain,
            cr_r: 2.0 * (1.0 - kr) * chroma_gain,
            cb_g: 2.0 * kb * (1.0 - kb) / kg * chroma_gain,
            cr_g: 2.0 * kr * (1.0 - kr) / kg * chroma_gain,
            cb_b: 2.0 * (1.0 - kb) * chroma_gain,
        }
    }
}

/// The U and V planes of a YUV frame as separate planes (NV12/NV21 chroma pairs split into
/// their two bytes).
fn chroma_planes(frame: &Frame) -> (Plane, Plane) {
    let second = |p: Plane| Plane { offset: p.offset + 1, ..p };
    match frame.format {
        PixelFormat::Nv12 => (frame.planes[1], second(frame.planes[1])),
        PixelFormat::Nv21 => (second(frame.planes[1]), frame.planes[1]),
        _ => (frame.planes[1], frame.planes[2]),
    }
}

/// Byte offsets of R, G and B within a packed pixel.
fn rgb_offsets(format: PixelFormat) -> [usize; 3] {
    match format {
        PixelFormat::Bgra8 => [2, 1, 0],
        _ => [0, 1, 2],
    }
}

/// Maps upright pixel `(u, v)` to the stored pixel it shows (mirror undone first, then the
/// rotation).
fn stored_pixel(frame: &Frame, up_w: u32, u: u32, v: u32) -> (u32, u32) {
    use super::frame::Rotation;
    let m = if frame.mirror { up_w - 1 - u } else { u };
    let (w, h) = (frame.width, frame.height);
    match frame.rotation {
        Rotation::R0 => (m, v),
        Rotation::R90 => (v, h - 1 - m),
        Rotation::R180 => (w - 1 - m, h - 1 - v),
        Rotation::R270 => (w - 1 - v, m),
    }
}

/// The CPU reference: the same semantics as [`Preprocessor`] (see the module docs) in plain f64
/// code, one frame, `channels·width·height` floats in CHW (or HWC) order.
pub fn preprocess_cpu(frame: &Frame, spec: &PreprocessSpec) -> Result<Vec<f32>, FrameError> {
    frame.validate()?;
    let g = Geometry::new(frame, spec);
    let yuv = YuvCoefficients::new(frame.yuv_matrix, frame.yuv_range);
    let byte = |p: &Plane, x: u32, y: u32, k: usize| {
        frame.data[p.offset + y as usize * p.row_stride + x as usize * p.pixel_stride + k] as f64
    };
    let gray = spec.channels == 1;
    let texel = |x: u32, y: u32| -> [f64; 3] {
        let p0 = &frame.planes[0];
        match frame.format {
            PixelFormat::Gray8 => [byte(p0, x, y, 0); 3],
            PixelFormat::Rgba8 | PixelFormat::Bgra8 | PixelFormat::Rgb8 => {
                let o = rgb_offsets(frame.format);
                let rgb = [byte(p0, x, y, o[0]), byte(p0, x, y, o[1]), byte(p0, x, y, o[2])];
                if gray { [0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]; 3] } else { rgb }
            }
            PixelFormat::Nv12 | PixelFormat::Nv21 | PixelFormat::I420 => {
                let l = (byte(p0, x, y, 0) - yuv.luma_offset) * yuv.luma_gain;
                if gray {
                    return [l.clamp(0.0, 255.0); 3];
                }
                let (pu, pv) = chroma_planes(frame);
                let u = byte(&pu, x / 2, y / 2, 0) - 128.0;
                let v = byte(&pv, x / 2, y / 2, 0) - 128.0;
                [l + yuv.cr_r * v, l - yuv.cb_g * u - yuv.cr_g * v, l + yuv.cb_b * u].map(|c| c.clamp(0.0, 255.0))
            }
        }
    };
    let (uw, uh) = g.upright;
    let upright = |u: u32, v: u32| {
        let (x, y) = stored_pixel(frame, uw, u, v);
        texel(x, y)
    };
    // One axis of PyTorch's bilinear (align_corners=False): the two neighbours and the weight
    // of the second.
    let axis = |o: u32, origin: u32, scale: f64, size: u32| {
        let s = ((o + origin) as f64 + 0.5) * scale - 0.5;
        let s = s.max(0.0);
        let i0 = (s.floor() as u32).min(size - 1);
        (i0, (i0 + 1).min(size - 1), s - i0 as f64)
    };
    let (ow, oh) = spec.crop;
    let plane = ow as usize * oh as usize;
    let mut out = vec![0f32; spec.channels * plane];
    for oy in 0..oh {
        let (y0, y1, fy) = axis(oy, g.crop_origin.1, g.scale.1, uh);
        for ox in 0..ow {
            let (x0, x1, fx) = axis(ox, g.crop_origin.0, g.scale.0, uw);
            let (a, b, cc, d) = (upright(x0, y0), upright(x1, y0), upright(x0, y1), upright(x1, y1));
            for ch in 0..spec.channels {
                let top = a[ch] * (1.0 - fx) + b[ch] * fx;
                let bottom = cc[ch] * (1.0 - fx) + d[ch] * fx;
                let v = top * (1.0 - fy) + bottom * fy;
                let n = (v * spec.scale as f64 - spec.mean[ch] as f64) / spec.std[ch] as f64;
                let at = oy as usize * ow as usize + ox as usize;
                match spec.layout() {
                    Layout::Nchw => out[ch * plane + at] = n as f32,
                    Layout::Nhwc => out[at * spec.channels + ch] = n as f32,
                }
            }
        }
    }
    Ok(out)
}

/// Bytes of the kernel's parameter block (`Params` in `shaders/preprocess.wgsl`, a read-only
/// storage buffer: see the shader for why not a uniform one).
const PARAMS_BYTES: u64 = 192;

/// Bind groups kept for reuse at most. A caller that records into ever new destination buffers
/// recycles the cache instead of growing it (a cached bind group keeps its destination alive).
const MAX_CACHED_BIND_GROUPS: usize = 64;

/// What one frame's bind group binds: the destination buffer and its bound range, and the
/// frame's spans of the upload and parameter buffers (which the cache belongs to).
#[derive(Clone, PartialEq, Eq, Hash)]
struct BindKey {
    dst: wgpu::Buffer,
    dst_offset: u64,
    dst_size: u64,
    upload_offset: u64,
    upload_size: u64,
    params_offset: u64,
}

/// The GPU preprocessor: owns reusable upload, parameter and output buffers that grow to the
/// largest batch seen, and the bind groups over them, cached by what they bind, so a stream of
/// frames of one size creates no GPU object after its first frame.
pub struct Preprocessor {
    ctx: GpuContext,
    spec: PreprocessSpec,
    upload: Option<wgpu::Buffer>,
    params: Option<wgpu::Buffer>,
    out: Option<wgpu::Buffer>,
    staging: Option<wgpu::Buffer>,
    bind_groups: std::collections::HashMap<BindKey, wgpu::BindGroup>,
    bind_groups_created: u64,
    /// The parameter blocks last written to `params` (rewritten only when they change).
    written_params: Vec<u8>,
}

impl fmt::Debug for Preprocessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Preprocessor").field("spec", &self.spec.to_string()).finish()
    }
}

/// Where one frame's words go in the upload buffer.
struct Staged {
    /// Byte offset of the frame's span in the upload buffer (binding-aligned).
    at: u64,
    /// Bytes bound for the frame (a multiple of 4).
    len: u64,
    /// First byte of `frame.data` that was uploaded (a multiple of 4).
    lo: usize,
}

impl Preprocessor {
    /// A preprocessor for `spec` on `ctx`. Buffers and the pipeline are made on first use.
    pub fn new(ctx: &GpuContext, spec: PreprocessSpec) -> Preprocessor {
        Preprocessor {
            ctx: ctx.clone(),
            spec,
            upload: None,
            params: None,
            out: None,
            staging: None,
            bind_groups: std::collections::HashMap::new(),
            bind_groups_created: 0,
            written_params: Vec::new(),
        }
    }

    /// Bind groups this preprocessor has created since it was made (a stream of same-sized
    /// frames creates one per batch row once, then reuses them).
    pub fn bind_groups_created(&self) -> u64 {
        self.bind_groups_created
    }

    /// The spec frames are preprocessed with.
    pub fn spec(&self) -> &PreprocessSpec {
        &self.spec
    }

    /// The NCHW shape of `batch` preprocessed frames: `[batch, channels, crop, crop]`.
    pub fn output_shape(&self, batch: usize) -> Vec<usize> {
        self.spec.output_shape(batch)
    }

    /// Preprocesses `frames` (of any formats, sizes and orientations) into one
    /// `[frames.len(), channels, crop, crop]` tensor: one submit and one readback for the batch.
    pub fn run(&mut self, frames: &[Frame]) -> Result<Tensor, FrameError> {
        let shape = self.output_shape(frames.len());
        let n = frames.len() * self.spec.frame_len();
        if n == 0 {
            return Ok(Tensor::f32(shape, Vec::new()));
        }
        let bytes = n as u64 * 4;
        let limit = self.ctx.limits().max_buffer_size;
        if bytes > limit {
            return Err(FrameError::TooLarge { what: format!("the output of {} frames", frames.len()), bytes, limit });
        }
        let old_out = self.out.clone();
        let out = grow(
            &self.ctx,
            &mut self.out,
            bytes,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            "preprocess output",
        )?;
        if let Some(old) = old_out
            && old != out
        {
            // Bind groups into the old output would keep it alive until the cache recycles.
            self.bind_groups.retain(|k, _| k.dst != old);
        }
        let staging = grow(
            &self.ctx,
            &mut self.staging,
            bytes,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            "preprocess readback",
        )?;
        let ctx = self.ctx.clone();
        ctx.scoped("preprocessing frames", || -> Result<(), FrameError> {
            let mut encoder =
                ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("preprocess") });
            self.record(&mut encoder, frames, &out, 0)?;
            encoder.copy_buffer_to_buffer(&out, 0, &staging, 0, bytes);
            ctx.queue.submit([encoder.finish()]);
            Ok(())
        })??;
        let data = crate::plan::read_buffer(&self.ctx, &staging, n)?;
        Ok(Tensor::f32(shape, data))
    }

    /// Records the preprocessing of `frames` into `encoder`, writing frame `i` at batch row
    /// `dst_row + i` of `dst`, a storage buffer in the model's NCHW input layout (row length
    /// `channels·crop·crop` floats). Every frame is validated before anything is recorded.
    ///
    /// The frames' bytes and parameters go through the queue (`Queue::write_buffer`) into
    /// buffers this preprocessor reuses; the queue applies them when the encoder is submitted.
    /// Submit the encoder before the next `record` or `run` on the same preprocessor, or the
    /// later call's frames replace these. Several frames in one call are always safe. The bind
    /// groups are cached by destination, row and frame size (at most 64, each keeping its
    /// destination alive until the cache recycles), so recording into the same buffer frame
    /// after frame creates nothing new.
    pub fn record(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        frames: &[Frame],
        dst: &wgpu::Buffer,
        dst_row: usize,
    ) -> Result<(), FrameError> {
        if frames.is_empty() {
            return Ok(());
        }
        for (index, frame) in frames.iter().enumerate() {
            frame
                .validate()
                .map_err(|e| if frames.len() > 1 { FrameError::Batch { index, source: Box::new(e) } } else { e })?;
        }
        let limits = self.ctx.limits();
        let row_bytes = self.spec.frame_len() as u64 * 4;
        if !dst.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(FrameError::Destination("it was not created with BufferUsages::STORAGE".into()));
        }
        let needed = (dst_row + frames.len()) as u64 * row_bytes;
        if dst.size() < needed {
            return Err(FrameError::Destination(format!(
                "rows {dst_row}..{} of {row_bytes} bytes need {needed} bytes, the buffer has {}",
                dst_row + frames.len(),
                dst.size()
            )));
        }

        // Each frame's bytes (from its first plane's word to its last byte) at a binding-aligned
        // offset of the upload buffer.
        let storage_align = limits.min_storage_buffer_offset_alignment as u64;
        let max_binding = limits.max_storage_buffer_binding_size.min(u32::MAX as u64 - 3);
        let mut staged = Vec::with_capacity(frames.len());
        let mut cursor = 0u64;
        for (index, frame) in frames.iter().enumerate() {
            // validate() checked every extent.
            let spans: Vec<(usize, usize)> = (0..frame.planes.len()).filter_map(|i| frame.plane_extent(i)).collect();
            let lo = spans.iter().map(|s| s.0).min().unwrap_or(0) / 4 * 4;
            let hi = spans.iter().map(|s| s.1).max().unwrap_or(0);
            let len = (hi - lo).div_ceil(4) as u64 * 4;
            if len > max_binding {
                let what = if frames.len() > 1 { format!("frame {index} of the batch") } else { "the frame".into() };
                return Err(FrameError::TooLarge { what, bytes: len, limit: max_binding });
            }
            staged.push(Staged { at: cursor, len, lo });
            cursor = (cursor + len).div_ceil(storage_align) * storage_align;
        }
        if cursor > limits.max_buffer_size {
            return Err(FrameError::TooLarge {
                what: format!("the {} frames' bytes", frames.len()),
                bytes: cursor,
                limit: limits.max_buffer_size,
            });
        }
        let params_stride = PARAMS_BYTES.div_ceil(storage_align) * storage_align;
        let before = (self.upload.clone(), self.params.clone());
        let upload = grow(
            &self.ctx,
            &mut self.upload,
            cursor,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            "preprocess frames",
        )?;
        let params_buffer = grow(
            &self.ctx,
            &mut self.params,
            params_stride * frames.len() as u64,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            "preprocess params",
        )?;
        // Cached bind groups bind the old upload and parameter buffers: drop them with those.
        if before != (self.upload.clone(), self.params.clone())
            || self.bind_groups.len() + frames.len() > MAX_CACHED_BIND_GROUPS
        {
            self.bind_groups.clear();
            self.written_params.clear();
        }
        let pipeline = self.ctx.pipeline(&KernelKey::new(Shader::Preprocess, "preprocess"))?;
        let layout = pipeline.get_bind_group_layout(0);

        let mut params = vec![0u8; (params_stride * frames.len() as u64) as usize];
        let mut bind_groups = Vec::with_capacity(frames.len());
        for (i, (frame, s)) in frames.iter().zip(&staged).enumerate() {
            write_frame(&self.ctx.queue, &upload, s, frame);
            // The destination is bound from the aligned offset at or below the row's start.
            let start = (dst_row + i) as u64 * row_bytes;
            let base = start / storage_align * storage_align;
            let size = start + row_bytes - base;
            if size > max_binding {
                return Err(FrameError::TooLarge { what: "one output row".into(), bytes: size, limit: max_binding });
            }
            let block = frame_params(frame, &self.spec, s, ((start - base) / 4) as u32).bytes();
            let at = i * params_stride as usize;
            params[at..at + block.len()].copy_from_slice(&block);
            let key = BindKey {
                dst: dst.clone(),
                dst_offset: base,
                dst_size: size,
                upload_offset: s.at,
                upload_size: s.len,
                params_offset: at as u64,
            };
            let bg = match self.bind_groups.get(&key) {
                Some(bg) => bg.clone(),
                None => {
                    let bg = self.ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some("preprocess"),
                        layout: &layout,
                        entries: &[
                            buffer_entry(0, &params_buffer, at as u64, PARAMS_BYTES),
                            buffer_entry(1, &upload, s.at, s.len),
                            buffer_entry(2, dst, base, size),
                        ],
                    });
                    self.bind_groups_created += 1;
                    self.bind_groups.insert(key, bg.clone());
                    bg
                }
            };
            bind_groups.push(bg);
        }
        if params != self.written_params {
            self.ctx.queue.write_buffer(&params_buffer, 0, &params);
            self.written_params = params;
        }

        let grid = grid_1d(self.spec.frame_len() / self.spec.channels, 64);
        let mut pass = encoder
            .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("preprocess"), timestamp_writes: None });
        pass.set_pipeline(&pipeline);
        for bg in &bind_groups {
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
        }
        Ok(())
    }
}

fn buffer_entry(binding: u32, buffer: &wgpu::Buffer, offset: u64, size: u64) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer,
            offset,
            size: wgpu::BufferSize::new(size),
        }),
    }
}

/// `slot`'s buffer, replaced by a larger one when it holds fewer than `size` bytes (sizes
/// double, so a stream of growing batches reallocates a few times only).
fn grow(
    ctx: &GpuContext,
    slot: &mut Option<wgpu::Buffer>,
    size: u64,
    usage: wgpu::BufferUsages,
    label: &str,
) -> Result<wgpu::Buffer, GpuError> {
    if let Some(b) = slot
        && b.size() >= size
    {
        return Ok(b.clone());
    }
    let max = ctx.limits().max_buffer_size;
    let size = size.max(256).next_power_of_two().min(max).max(size);
    let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage,
        mapped_at_creation: false,
    });
    if pollster::block_on(scope.pop()).is_some() {
        return Err(GpuError::OutOfMemory(format!("allocating the {label} buffer ({size} bytes)")));
    }
    *slot = Some(buffer.clone());
    Ok(buffer)
}

/// Queues the frame's bytes `[lo, lo + len)` (zero-padded past the data's end) for upload.
fn write_frame(queue: &wgpu::Queue, upload: &wgpu::Buffer, s: &Staged, frame: &Frame) {
    let end = (s.lo + s.len as usize).min(frame.data.len());
    let body = (end - s.lo) / 4 * 4;
    if body > 0 {
        queue.write_buffer(upload, s.at, &frame.data[s.lo..s.lo + body]);
    }
    if (body as u64) < s.len {
        let mut tail = [0u8; 4];
        let rest = &frame.data[s.lo + body..end];
        tail[..rest.len()].copy_from_slice(rest);
        queue.write_buffer(upload, s.at + body as u64, &tail);
    }
}

/// The kernel's parameter block for one frame (field order of `Params` in the WGSL).
fn frame_params(frame: &Frame, spec: &PreprocessSpec, s: &Staged, dst_offset: u32) -> Params {
    let g = Geometry::new(frame, spec);
    let kind = match frame.format {
        PixelFormat::Rgba8 | PixelFormat::Bgra8 | PixelFormat::Rgb8 => 0,
        PixelFormat::Gray8 => 1,
        PixelFormat::Nv12 | PixelFormat::Nv21 | PixelFormat::I420 => 2,
    };
    let planes: Vec<Plane> = if frame.format.is_yuv() {
        let (u, v) = chroma_planes(frame);
        vec![frame.planes[0], u, v]
    } else {
        vec![frame.planes[0]]
    };
    // Offsets are relative to the uploaded span; validate() and the binding limit keep them in u32.
    let offsets: Vec<u32> = planes.iter().map(|p| (p.offset - s.lo) as u32).collect();
    let rows: Vec<u32> = planes.iter().map(|p| p.row_stride as u32).collect();
    let pixels: Vec<u32> = planes.iter().map(|p| p.pixel_stride as u32).collect();
    let yuv = YuvCoefficients::new(frame.yuv_matrix, frame.yuv_range);
    let rgb = rgb_offsets(frame.format);
    let inv_std: Vec<f32> = spec.std.iter().map(|&s| (1.0 / s as f64) as f32).collect();
    Params::new()
        .u32(kind)
        .u32(frame.width)
        .u32(frame.height)
        .u32(frame.rotation.degrees() / 90)
        .u32(frame.mirror as u32)
        .u32(g.upright.0)
        .u32(g.upright.1)
        .u32(spec.crop.0)
        .u32(spec.channels as u32)
        .u32(dst_offset)
        .u32(g.crop_origin.0)
        .u32(g.crop_origin.1)
        .u32(rgb[0] as u32)
        .u32(rgb[1] as u32)
        .u32(rgb[2] as u32)
        .f32(g.scale.0 as f32)
        .f32(g.scale.1 as f32)
        .f32(spec.scale)
        .f32(yuv.luma_offset as f32)
        .f32(yuv.luma_gain as f32)
        .u32((spec.layout() == Layout::Nhwc) as u32)
        .u32(spec.crop.1)
        .vec4u(&offsets)
        .vec4u(&rows)
        .vec4u(&pixels)
        .vec4f(&[yuv.cr_r as f32, yuv.cb_g as f32, yuv.cr_g as f32, yuv.cb_b as f32])
        .vec4f(&spec.mean)
        .vec4f(&inv_std)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<PreprocessSpec, SpecError> {
        s.parse()
    }

    #[test]
    fn parses_the_two_reference_specs() {
        let svhn = parse("size=32,channels=3,mean=0.4377/0.4438/0.4728,std=0.1980/0.2010/0.1970").unwrap();
        assert_eq!((svhn.resize(), svhn.output_size(), svhn.channels()), (32, (32, 32), 3));
        assert_eq!(svhn.mean(), &[0.4377, 0.4438, 0.4728]);
        assert_eq!(svhn.std(), &[0.1980, 0.2010, 0.1970]);
        assert_eq!(svhn.scale(), 1.0 / 255.0);
        assert_eq!(svhn.output_shape(4), vec![4, 3, 32, 32]);
        let imagenet = parse("resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225").unwrap();
        assert_eq!((imagenet.resize(), imagenet.output_size(), imagenet.channels()), (256, (224, 224), 3));
        assert_eq!(imagenet.frame_len(), 3 * 224 * 224);
    }

    #[test]
    fn defaults_spaces_and_scale() {
        let s = parse(" size = 28 , channels=1 ").unwrap();
        assert_eq!((s.mean(), s.std()), (&[0.0f32][..], &[1.0f32][..]));
        let s = parse("size=8,scale=1,mean=127.5/127.5/127.5,std=127.5/127.5/127.5").unwrap();
        assert_eq!(s.scale(), 1.0);
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "size=32,channels=3,mean=0.4377/0.4438/0.4728,std=0.198/0.201/0.197",
            "resize=256,crop=224,channels=1,mean=0.5,std=0.25,scale=1",
            "size=192x48,channels=3,mean=0.5/0.5/0.5,std=0.5/0.5/0.5",
            "resize=256,crop=224x160,channels=1,mean=0,std=1",
        ] {
            let spec = parse(text).unwrap();
            assert_eq!(spec.to_string(), text);
            assert_eq!(parse(&spec.to_string()).unwrap(), spec);
        }
    }

    #[test]
    fn rejects_bad_specs_with_what_is_wrong() {
        let err = |s: &str| parse(s).unwrap_err();
        assert_eq!(err("size=32,colour=rgb"), SpecError::UnknownKey("colour".into()));
        assert_eq!(err("size=32,channels"), SpecError::Malformed("channels".into()));
        assert_eq!(err("size=32,size=32"), SpecError::Duplicate("size".into()));
        assert!(matches!(err("size=3y2"), SpecError::BadNumber { ref key, .. } if key == "size"));
        assert!(matches!(err("size=3xq"), SpecError::BadNumber { ref number, .. } if number == "q"));
        assert!(matches!(err("size=0x8"), SpecError::Invalid { ref key, .. } if key == "size"));
        assert!(err("resize=64,crop=96x48").to_string().contains("crop=96x48 is larger than resize=64"));
        assert!(matches!(err("size=-1"), SpecError::BadNumber { .. }));
        let e = err("size=32,mean=0.5/abc/0.5");
        assert!(matches!(e, SpecError::BadNumber { ref number, .. } if number == "abc"), "{e}");
        assert!(e.to_string().contains("'abc' is not a number"), "{e}");
        assert_eq!(err("size=32,mean=0.5/0.5"), SpecError::CountMismatch { key: "mean".into(), given: 2, channels: 3 });
        assert_eq!(
            err("size=32,channels=1,std=1/1/1"),
            SpecError::CountMismatch { key: "std".into(), given: 3, channels: 1 }
        );
        assert!(matches!(err("size=32,channels=2"), SpecError::Invalid { ref key, .. } if key == "channels"));
        assert!(matches!(err("size=32,std=1/0/1"), SpecError::Invalid { ref key, .. } if key == "std"));
        assert!(matches!(err("size=32,mean=nan/0/0"), SpecError::Invalid { ref key, .. } if key == "mean"));
        assert!(matches!(err("size=32,scale=0"), SpecError::Invalid { ref key, .. } if key == "scale"));
        assert!(matches!(err("size=0"), SpecError::Invalid { ref key, .. } if key == "resize"));
        assert!(matches!(err("size=100000"), SpecError::Invalid { .. }));
        for s in ["resize=256", "crop=224", "channels=3", "size=32,crop=16", "resize=224,crop=256", ""] {
            assert!(matches!(parse(s), Err(SpecError::Shape(_)) | Err(SpecError::Malformed(_))), "{s}");
        }
        assert!(err("resize=224,crop=256").to_string().contains("crop=256 is larger than resize=224"));
    }

    #[test]
    fn geometry_follows_torchvision_resize_and_center_crop() {
        let spec = parse("resize=256,crop=224").unwrap();
        let frame = Frame::rgb8(640, 480, vec![0; 640 * 480 * 3]);
        let g = Geometry::new(&frame, &spec);
        // 256·640/480 = 341.33 → 341; (341 − 224)/2 = 58.5 → 58 (half to even); (256 − 224)/2 = 16.
        assert_eq!((g.upright, g.resized, g.crop_origin), ((640, 480), (341, 256), (58, 16)));
        let g = Geometry::new(&frame.clone().with_rotation(super::super::frame::Rotation::R90), &spec);
        assert_eq!((g.upright, g.resized, g.crop_origin), ((480, 640), (256, 341), (16, 58)));
        assert_eq!((g.scale.0, g.scale.1), (480.0 / 256.0, 640.0 / 341.0));
        // 2.5 → 2 and 3.5 → 4, as Python's round.
        assert_eq!((round_half_even_half(5), round_half_even_half(7), round_half_even_half(6)), (2, 4, 3));
    }

    /// Models whose input is not square: `size=WxH` scales each axis to the output (torchvision's
    /// `Resize((H, W))`), `crop=WxH` cuts a non-square centre window after the shorter-side
    /// resize; the output shapes follow, NCHW and NHWC.
    #[test]
    fn non_square_outputs_stretch_or_crop() {
        let spec = parse("size=192x48").unwrap();
        assert_eq!((spec.resize(), spec.output_size()), (0, (192, 48)));
        assert_eq!(spec.output_shape(2), vec![2, 3, 48, 192]);
        assert_eq!(spec.clone().with_layout(Layout::Nhwc).output_shape(2), vec![2, 48, 192, 3]);
        assert_eq!(spec.frame_len(), 3 * 192 * 48);
        let frame = Frame::rgb8(640, 480, vec![0; 640 * 480 * 3]);
        let g = Geometry::new(&frame, &spec);
        assert_eq!((g.resized, g.crop_origin, g.scale), ((192, 48), (0, 0), (640.0 / 192.0, 480.0 / 48.0)));
        let spec = parse("resize=256,crop=224x160").unwrap();
        let g = Geometry::new(&frame, &spec);
        // (341 − 224)/2 = 58.5 → 58; (256 − 160)/2 = 48.
        assert_eq!((g.resized, g.crop_origin), ((341, 256), (58, 48)));
        assert_eq!(spec.output_shape(1), vec![1, 3, 160, 224]);
        // A model's [N, C, H, W] input picks the layout by height and width, not one side.
        let dims = |d: [usize; 4]| d.map(Some);
        assert_eq!(spec.clone().for_input(&dims([1, 3, 160, 224])).layout(), Layout::Nchw);
        assert_eq!(spec.for_input(&dims([1, 160, 224, 3])).layout(), Layout::Nhwc);
    }

    #[test]
    fn bt601_video_coefficients_are_the_usual_ones() {
        let c = YuvCoefficients::new(YuvMatrix::Bt601, YuvRange::Video);
        for (got, want) in [(c.luma_gain, 1.164383), (c.cr_r, 1.596027), (c.cb_g, 0.391762), (c.cr_g, 0.812968)] {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert!((c.cb_b - 2.017232).abs() < 1e-6);
        let c = YuvCoefficients::new(YuvMatrix::Bt709, YuvRange::Full);
        for (got, want) in [(c.cr_r, 1.5748), (c.cb_g, 0.187324), (c.cr_g, 0.468124), (c.cb_b, 1.8556)] {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }
}
