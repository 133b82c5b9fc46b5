//! Camera frames as applications hand them over: a pixel format, planes with row and pixel
//! strides, a rotation, a mirror flag, the YUV colour encoding and a timestamp. Frames own their
//! bytes, so they can be pushed from another thread and bound to C, JNI and Swift as plain
//! buffers.
//!
//! [`Frame::validate`] checks a frame against its own description (sizes, plane count, strides,
//! buffer length) on the host, so a malformed frame is an error value before any GPU work and
//! the stream goes on with the next one.

use thiserror::Error;

use crate::gpu::GpuError;

/// Pixel formats of incoming frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    /// 4 bytes per pixel: R, G, B, A.
    Rgba8,
    /// 4 bytes per pixel: B, G, R, A (Apple's and Windows' native order).
    Bgra8,
    /// 3 bytes per pixel: R, G, B.
    Rgb8,
    /// 1 byte per pixel: luma.
    Gray8,
    /// Y plane, then one interleaved U/V plane at half resolution in both directions.
    Nv12,
    /// Y plane, then one interleaved V/U plane at half resolution (Android's camera default).
    Nv21,
    /// Y, U and V planes, U and V at half resolution (I420; Android's YUV_420_888 with its
    /// per-plane row and pixel strides).
    I420,
}

impl PixelFormat {
    /// How many [`Plane`]s a frame of this format has.
    pub fn plane_count(self) -> usize {
        match self {
            PixelFormat::Rgba8 | PixelFormat::Bgra8 | PixelFormat::Rgb8 | PixelFormat::Gray8 => 1,
            PixelFormat::Nv12 | PixelFormat::Nv21 => 2,
            PixelFormat::I420 => 3,
        }
    }

    /// Whether the format carries YUV (and so [`Frame::yuv_matrix`] and [`Frame::yuv_range`]
    /// apply to it).
    pub fn is_yuv(self) -> bool {
        matches!(self, PixelFormat::Nv12 | PixelFormat::Nv21 | PixelFormat::I420)
    }

    /// The planes' names, in order, as error messages use them.
    pub fn plane_names(self) -> &'static [&'static str] {
        match self {
            PixelFormat::Rgba8 => &["RGBA"],
            PixelFormat::Bgra8 => &["BGRA"],
            PixelFormat::Rgb8 => &["RGB"],
            PixelFormat::Gray8 => &["gray"],
            PixelFormat::Nv12 => &["Y", "UV"],
            PixelFormat::Nv21 => &["Y", "VU"],
            PixelFormat::I420 => &["Y", "U", "V"],
        }
    }

    /// Bytes one pixel (or one chroma sample, or one interleaved chroma pair) of plane `plane`
    /// occupies: the smallest pixel stride that keeps neighbouring samples apart.
    pub fn sample_bytes(self, plane: usize) -> usize {
        match (self, plane) {
            (PixelFormat::Rgba8 | PixelFormat::Bgra8, _) => 4,
            (PixelFormat::Rgb8, _) => 3,
            (PixelFormat::Nv12 | PixelFormat::Nv21, 1) => 2,
            _ => 1,
        }
    }
}

/// Where one plane of a frame lies in its byte buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plane {
    /// Byte offset of the plane's first pixel.
    pub offset: usize,
    /// Bytes from one row to the next.
    pub row_stride: usize,
    /// Bytes from one pixel (or chroma sample) to the next within a row.
    pub pixel_stride: usize,
}

impl Plane {
    /// A plane of rows of `row_stride` bytes starting at `offset`, samples `pixel_stride` apart.
    pub fn new(offset: usize, row_stride: usize, pixel_stride: usize) -> Plane {
        Plane { offset, row_stride, pixel_stride }
    }
}

/// Clockwise rotation that brings the frame upright.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Rotation {
    /// Already upright.
    #[default]
    R0,
    /// Rotate 90° clockwise: the frame's left column, read bottom to top, becomes the top row
    /// (Android's `sensorOrientation` 90 on a phone held upright).
    R90,
    /// Rotate 180°.
    R180,
    /// Rotate 270° clockwise (90° counter-clockwise): the top row, read right to left, becomes
    /// the left column.
    R270,
}

impl Rotation {
    /// The rotation for `degrees` clockwise (any multiple of 90, negative ones included).
    pub fn from_degrees(degrees: i32) -> Option<Rotation> {
        if degrees % 90 != 0 {
            return None;
        }
        Some(match degrees.rem_euclid(360) {
            0 => Rotation::R0,
            90 => Rotation::R90,
            180 => Rotation::R180,
            _ => Rotation::R270,
        })
    }

    /// Clockwise degrees: 0, 90, 180 or 270.
    pub fn degrees(self) -> u32 {
        match self {
            Rotation::R0 => 0,
            Rotation::R90 => 90,
            Rotation::R180 => 180,
            Rotation::R270 => 270,
        }
    }

    /// Whether the rotation swaps width and height.
    pub fn swaps_axes(self) -> bool {
        matches!(self, Rotation::R90 | Rotation::R270)
    }
}

/// The YUV → RGB matrix of a YUV frame: the luma weights Kr and Kb of its standard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum YuvMatrix {
    /// ITU-R BT.601 (Kr = 0.299, Kb = 0.114): SD video, JPEG, and what Android's and most phone
    /// cameras deliver in their YUV buffers. The default.
    #[default]
    Bt601,
    /// ITU-R BT.709 (Kr = 0.2126, Kb = 0.0722): HD video, some desktop capture pipelines.
    Bt709,
}

impl YuvMatrix {
    /// The standard's (Kr, Kb); Kg = 1 − Kr − Kb.
    pub fn kr_kb(self) -> (f64, f64) {
        match self {
            YuvMatrix::Bt601 => (0.299, 0.114),
            YuvMatrix::Bt709 => (0.2126, 0.0722),
        }
    }
}

/// The quantisation range of a YUV frame's samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum YuvRange {
    /// Video ("limited", "studio", "TV") range: Y in 16–235, U and V in 16–240 around 128. What
    /// camera YUV buffers and video decoders deliver. The default.
    #[default]
    Video,
    /// Full ("PC", JPEG) range: Y, U and V use 0–255, chroma around 128.
    Full,
}

/// Why a frame cannot be preprocessed. Checked on the host before any GPU work.
#[derive(Debug, Error)]
pub enum FrameError {
    #[error("the frame is {width}x{height}; both sizes must be at least 1")]
    ZeroSize { width: u32, height: u32 },
    #[error("a {format:?} frame has {expected} plane(s), {given} given")]
    PlaneCount { format: PixelFormat, expected: usize, given: usize },
    #[error("{format:?} plane {plane}: {reason}")]
    Stride { format: PixelFormat, plane: &'static str, reason: String },
    #[error(
        "{format:?} plane {plane}: its offset and strides reach byte {needed} of the buffer, but the buffer holds \
         {given} bytes"
    )]
    ShortBuffer { format: PixelFormat, plane: &'static str, needed: usize, given: usize },
    #[error("{what} takes {bytes} bytes; the device allows at most {limit}")]
    TooLarge { what: String, bytes: u64, limit: u64 },
    #[error("destination buffer: {0}")]
    Destination(String),
    #[error("frame {index} of the batch: {source}")]
    Batch { index: usize, source: Box<FrameError> },
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

/// One camera frame as it arrives: its bytes, pixel format, planes with their strides, rotation
/// and mirroring. Preprocessing (to the model's input) runs on the GPU.
///
/// ```
/// use acclimate::{Frame, Plane, Rotation};
/// // A packed RGBA frame, tightly packed rows.
/// let rgba = Frame::rgba8(4, 2, vec![0; 4 * 2 * 4]);
/// // Android's YUV_420_888 as CameraX delivers it: padded rows, chroma pixel stride 2
/// // (U and V interleaved in one buffer), and the sensor rotated by 90°.
/// let (w, h, row) = (4u32, 2u32, 8usize);
/// let data = vec![128u8; row * 2 + row];
/// let y = Plane::new(0, row, 1);
/// let u = Plane::new(row * 2, row, 2);
/// let v = Plane::new(row * 2 + 1, row, 2);
/// let frame = Frame::yuv_420_888(w, h, data, y, u, v).with_rotation(Rotation::R90);
/// # let _ = (rgba, frame);
/// ```
#[derive(Clone, Debug)]
pub struct Frame {
    /// Width in pixels as stored (before rotation).
    pub width: u32,
    /// Height in pixels as stored (before rotation).
    pub height: u32,
    /// How the bytes encode the pixels.
    pub format: PixelFormat,
    /// Plane layout: one plane for packed formats, two for NV12/NV21 (Y, then the interleaved
    /// chroma pairs: `pixel_stride` is the distance between pairs, 2 when tightly packed), three
    /// for I420 (Y, U, V; U and V may interleave as Android's YUV_420_888 does, pixel stride 2
    /// and V one byte after U or before it).
    pub planes: Vec<Plane>,
    /// The frame's bytes; planes may start anywhere in it and rows may be padded.
    pub data: Vec<u8>,
    /// Clockwise rotation that brings the frame upright.
    pub rotation: Rotation,
    /// Mirror horizontally (after rotation), as front cameras need.
    pub mirror: bool,
    /// The producer's timestamp (microseconds), carried to the frame's result.
    pub timestamp_us: i64,
    /// The YUV → RGB matrix (YUV formats only; default BT.601, what phone cameras deliver).
    pub yuv_matrix: YuvMatrix,
    /// The YUV quantisation range (YUV formats only; default video range, as cameras deliver).
    pub yuv_range: YuvRange,
}

impl Frame {
    /// A frame with explicit planes, upright, not mirrored, timestamp 0, BT.601 video range.
    pub fn new(width: u32, height: u32, format: PixelFormat, planes: Vec<Plane>, data: Vec<u8>) -> Frame {
        Frame {
            width,
            height,
            format,
            planes,
            data,
            rotation: Rotation::R0,
            mirror: false,
            timestamp_us: 0,
            yuv_matrix: YuvMatrix::default(),
            yuv_range: YuvRange::default(),
        }
    }

    fn packed(width: u32, height: u32, format: PixelFormat, data: Vec<u8>) -> Frame {
        let bpp = format.sample_bytes(0);
        Frame::new(width, height, format, vec![Plane::new(0, width as usize * bpp, bpp)], data)
    }

    /// A tightly packed RGBA8 frame.
    pub fn rgba8(width: u32, height: u32, data: Vec<u8>) -> Frame {
        Frame::packed(width, height, PixelFormat::Rgba8, data)
    }

    /// A tightly packed BGRA8 frame.
    pub fn bgra8(width: u32, height: u32, data: Vec<u8>) -> Frame {
        Frame::packed(width, height, PixelFormat::Bgra8, data)
    }

    /// A tightly packed RGB8 frame.
    pub fn rgb8(width: u32, height: u32, data: Vec<u8>) -> Frame {
        Frame::packed(width, height, PixelFormat::Rgb8, data)
    }

    /// A tightly packed Gray8 frame.
    pub fn gray8(width: u32, height: u32, data: Vec<u8>) -> Frame {
        Frame::packed(width, height, PixelFormat::Gray8, data)
    }

    fn semi_planar(width: u32, height: u32, format: PixelFormat, data: Vec<u8>) -> Frame {
        let (w, h) = (width as usize, height as usize);
        let chroma_row = 2 * w.div_ceil(2);
        let planes = vec![Plane::new(0, w, 1), Plane::new(w * h, chroma_row, 2)];
        Frame::new(width, height, format, planes, data)
    }

    /// A tightly packed NV12 frame: `width·height` bytes of Y, then `ceil(h/2)` rows of
    /// `ceil(w/2)` U/V pairs.
    pub fn nv12(width: u32, height: u32, data: Vec<u8>) -> Frame {
        Frame::semi_planar(width, height, PixelFormat::Nv12, data)
    }

    /// A tightly packed NV21 frame: like [`Frame::nv12`] with V before U in each pair.
    pub fn nv21(width: u32, height: u32, data: Vec<u8>) -> Frame {
        Frame::semi_planar(width, height, PixelFormat::Nv21, data)
    }

    /// A tightly packed I420 frame: Y, then `ceil(w/2)·ceil(h/2)` bytes of U, then as many of V.
    pub fn i420(width: u32, height: u32, data: Vec<u8>) -> Frame {
        let (w, h) = (width as usize, height as usize);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let planes = vec![Plane::new(0, w, 1), Plane::new(w * h, cw, 1), Plane::new(w * h + cw * ch, cw, 1)];
        Frame::new(width, height, PixelFormat::I420, planes, data)
    }

    /// Android's `YUV_420_888` (`android.media.Image`): three planes with their own row and pixel
    /// strides, as `Image.getPlanes()` reports them, in one buffer. Semi-planar images have pixel
    /// stride 2 on U and V and the two planes interleave (V one byte after U for NV12 memory,
    /// before it for NV21).
    pub fn yuv_420_888(width: u32, height: u32, data: Vec<u8>, y: Plane, u: Plane, v: Plane) -> Frame {
        Frame::new(width, height, PixelFormat::I420, vec![y, u, v], data)
    }

    /// The same frame with `rotation`.
    pub fn with_rotation(mut self, rotation: Rotation) -> Frame {
        self.rotation = rotation;
        self
    }

    /// The same frame, mirrored horizontally after rotation or not.
    pub fn with_mirror(mut self, mirror: bool) -> Frame {
        self.mirror = mirror;
        self
    }

    /// The same frame with timestamp `timestamp_us`.
    pub fn with_timestamp(mut self, timestamp_us: i64) -> Frame {
        self.timestamp_us = timestamp_us;
        self
    }

    /// The same frame with another YUV encoding (ignored by RGB and gray formats).
    pub fn with_yuv(mut self, matrix: YuvMatrix, range: YuvRange) -> Frame {
        self.yuv_matrix = matrix;
        self.yuv_range = range;
        self
    }

    /// Width and height after rotation.
    pub fn upright_size(&self) -> (u32, u32) {
        if self.rotation.swaps_axes() { (self.height, self.width) } else { (self.width, self.height) }
    }

    /// Samples per row and rows of plane `plane`: the full size for luma and packed planes,
    /// `ceil(w/2) × ceil(h/2)` for chroma (odd sizes are valid: the last chroma sample covers
    /// one column or row).
    pub fn plane_size(&self, plane: usize) -> (usize, usize) {
        let (w, h) = (self.width as usize, self.height as usize);
        if self.format.is_yuv() && plane > 0 { (w.div_ceil(2), h.div_ceil(2)) } else { (w, h) }
    }

    /// The byte range `[start, end)` plane `plane` reaches, given its offset and strides; `None`
    /// when the arithmetic overflows or the frame is empty (a zero width or height).
    pub fn plane_extent(&self, plane: usize) -> Option<(usize, usize)> {
        let p = self.planes.get(plane)?;
        let (cols, rows) = self.plane_size(plane);
        let last = (rows.checked_sub(1)?)
            .checked_mul(p.row_stride)?
            .checked_add(cols.checked_sub(1)?.checked_mul(p.pixel_stride)?)?;
        let end = p.offset.checked_add(last)?.checked_add(self.format.sample_bytes(plane))?;
        Some((p.offset, end))
    }

    /// Checks sizes, plane count, strides and the buffer's length against the format. Every
    /// byte a preprocessing pass reads is then inside `data`.
    pub fn validate(&self) -> Result<(), FrameError> {
        if self.width == 0 || self.height == 0 {
            return Err(FrameError::ZeroSize { width: self.width, height: self.height });
        }
        let expected = self.format.plane_count();
        if self.planes.len() != expected {
            return Err(FrameError::PlaneCount { format: self.format, expected, given: self.planes.len() });
        }
        for (i, p) in self.planes.iter().enumerate() {
            let name = self.format.plane_names()[i];
            let sample = self.format.sample_bytes(i);
            let (cols, rows) = self.plane_size(i);
            let stride_err = |reason: String| FrameError::Stride { format: self.format, plane: name, reason };
            // Overlapping samples within a row are always a mistake (a stride given in pixels
            // instead of bytes, or a chroma plane described as if it were luma).
            if p.pixel_stride < sample {
                return Err(stride_err(format!(
                    "pixel stride {} is smaller than the {sample} byte(s) of one sample",
                    p.pixel_stride
                )));
            }
            // Checked: strides come from the caller (found by tools/fuzz.sh: a pixel stride near
            // usize::MAX overflowed here).
            let row_bytes = (cols - 1)
                .checked_mul(p.pixel_stride)
                .and_then(|b| b.checked_add(sample))
                .ok_or_else(|| stride_err("offset and strides overflow".into()))?;
            if rows > 1 && p.row_stride < row_bytes {
                return Err(stride_err(format!(
                    "row stride {} is smaller than the {row_bytes} bytes one row of {cols} samples spans",
                    p.row_stride
                )));
            }
            let (_, end) = self.plane_extent(i).ok_or_else(|| stride_err("offset and strides overflow".into()))?;
            if end > self.data.len() {
                return Err(FrameError::ShortBuffer {
                    format: self.format,
                    plane: name,
                    needed: end,
                    given: self.data.len(),
                });
            }
        }
        Ok(())
    }
}
