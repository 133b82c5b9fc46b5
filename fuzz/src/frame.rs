//! The frame target: bytes decoded into a frame and a preprocessing spec.
//!
//! The decoding is the structure: every field (format, sizes, plane count, offsets, strides,
//! buffer length, rotation, mirror, YUV encoding) is read from the bytes through a choice among
//! edge values, so random bytes already make frames that are nearly valid (the tight layouts of
//! the constructors, one field off) as well as absurd ones (strides near `usize::MAX`, sizes of
//! 2^32 − 1). [`Frame::validate`] must answer every one with `Ok` or an error; a frame that
//! validates and is small goes through the CPU preprocessing reference, which indexes the
//! buffer with the validated strides.

use acclimate::stream::frame::{Frame, PixelFormat, Plane, Rotation, YuvMatrix, YuvRange};
use acclimate::stream::preprocess::{PreprocessSpec, preprocess_cpu};
use rand::RngExt;
use rand::rngs::Xoshiro256PlusPlus;

/// Frames with more pixels than this are only validated: the CPU reference is plain f64 code.
const PREPROCESS_MAX_PIXELS: u64 = 48 * 48;
/// The largest buffer a decoded frame allocates (a short buffer is a validation error anyway).
const MAX_BUFFER: usize = 1 << 16;

const FORMATS: [PixelFormat; 7] = [
    PixelFormat::Rgba8,
    PixelFormat::Bgra8,
    PixelFormat::Rgb8,
    PixelFormat::Gray8,
    PixelFormat::Nv12,
    PixelFormat::Nv21,
    PixelFormat::I420,
];

/// Reads fields from the input; past its end every read is 0.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// A size: small most of the time, an edge value otherwise.
    fn size(&mut self) -> u32 {
        match self.u8() % 8 {
            0..=4 => 1 + u32::from(self.u8() % 40),
            5 => [0, 1, 2, 3, 255, 256, 4096, 16385, 65535, 65536, 1 << 24, u32::MAX / 2, u32::MAX - 1, u32::MAX]
                [usize::from(self.u8()) % 14],
            _ => self.u32(),
        }
    }

    /// A byte count near `tight`, or an edge value.
    fn near(&mut self, tight: usize) -> usize {
        match self.u8() % 10 {
            0..=5 => tight,
            6 => tight.wrapping_add(usize::from(self.u8() % 8)),
            7 => tight.wrapping_sub(usize::from(self.u8() % 4)),
            8 => [0, 1, 2, 3, 4, usize::MAX, usize::MAX / 2, usize::MAX - 3, 1 << 32, 1 << 63]
                [usize::from(self.u8()) % 10],
            _ => self.u64() as usize,
        }
    }
}

/// The tight layout the constructors build, as the starting point for each plane.
fn tight_planes(format: PixelFormat, w: usize, h: usize) -> (Vec<Plane>, usize) {
    match format {
        PixelFormat::Nv12 | PixelFormat::Nv21 => {
            let f = Frame::nv12(w as u32, h as u32, Vec::new());
            let len = w * h + 2 * w.div_ceil(2) * h.div_ceil(2);
            (f.planes, len)
        }
        PixelFormat::I420 => {
            let f = Frame::i420(w as u32, h as u32, Vec::new());
            let len = w * h + 2 * w.div_ceil(2) * h.div_ceil(2);
            (f.planes, len)
        }
        _ => {
            let bpp = format.sample_bytes(0);
            (vec![Plane::new(0, w * bpp, bpp)], w * h * bpp)
        }
    }
}

/// Decodes `data` into a frame and a spec string, validates, and preprocesses small valid frames.
/// Returns how far the input got: 0 refused by validation, 1 valid, 2 preprocessed.
pub fn run(data: &[u8]) -> usize {
    let mut c = Cursor { data, pos: 0 };
    let format = FORMATS[usize::from(c.u8()) % FORMATS.len()];
    let (width, height) = (c.size(), c.size());
    // Layout arithmetic in u64 and saturated, so the decoder itself never overflows.
    let (tw, th) = (width.min(1 << 12) as usize, height.min(1 << 12) as usize);
    let (mut planes, tight_len) = tight_planes(format, tw, th);
    match c.u8() % 12 {
        0 => {
            planes.pop();
        }
        1 => planes.push(Plane::new(0, 1, 1)),
        _ => {}
    }
    for p in &mut planes {
        if c.u8().is_multiple_of(3) {
            p.offset = c.near(p.offset);
            p.row_stride = c.near(p.row_stride);
            p.pixel_stride = c.near(p.pixel_stride);
        }
    }
    let len = c.near(tight_len).min(MAX_BUFFER);
    // Pixel values from one byte of the input (the rest of it describes the frame and the spec).
    let fill = c.u8();
    let bytes: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(fill) ^ (i >> 8) as u8).collect();
    let degrees = [0, 90, 180, 270, -90, 360, 45][usize::from(c.u8()) % 7];
    let flags = c.u8();
    let frame = Frame::new(width, height, format, planes, bytes)
        .with_rotation(Rotation::from_degrees(degrees).unwrap_or_default())
        .with_mirror(flags & 1 != 0)
        .with_timestamp(c.u64() as i64)
        .with_yuv(
            if flags & 2 != 0 { YuvMatrix::Bt709 } else { YuvMatrix::Bt601 },
            if flags & 4 != 0 { YuvRange::Full } else { YuvRange::Video },
        );
    let _ = frame.upright_size();
    for i in 0..4 {
        let _ = frame.plane_extent(i);
    }
    if frame.validate().is_err() {
        return 0;
    }
    if u64::from(width) * u64::from(height) > PREPROCESS_MAX_PIXELS {
        return 1;
    }
    let spec = spec_string(&mut c);
    match spec.parse::<PreprocessSpec>() {
        Ok(spec) if preprocess_cpu(&frame, &spec).is_ok() => 2,
        _ => 1,
    }
}

/// A preprocessing spec string: a valid one most of the time (so frames reach the CPU
/// reference), otherwise from the valid keys with edge values and malformations.
fn spec_string(c: &mut Cursor<'_>) -> String {
    if !c.u8().is_multiple_of(4) {
        let channels = if c.u8().is_multiple_of(2) { 1 } else { 3 };
        let size = 1 + c.u8() % 24;
        let resize = size + c.u8() % 8;
        let per = |v: &str| vec![v; channels].join("/");
        let other = 1 + c.u8() % 24;
        let geometry = match c.u8() % 4 {
            // Not square: stretched to size×other, or a size×other window (both within resize).
            0 => format!("size={size}x{other}"),
            1 => format!("resize={},crop={size}x{other}", resize.max(other)),
            _ if resize == size => format!("size={size}"),
            _ => format!("resize={resize},crop={size}"),
        };
        return format!("{geometry},channels={channels},mean={},std={}", per("0.45"), per("0.225"));
    }
    let small = |c: &mut Cursor<'_>| match c.u8() % 6 {
        0 => "0".to_string(),
        1 => "16385".to_string(),
        2 => "-1".to_string(),
        _ => (1 + c.u8() % 24).to_string(),
    };
    let floats = |c: &mut Cursor<'_>| {
        let n = 1 + c.u8() % 4;
        (0..n)
            .map(|_| ["0.5", "0", "-0", "1e38", "nan", "inf", "0.229", "x"][usize::from(c.u8()) % 8])
            .collect::<Vec<_>>()
            .join("/")
    };
    let mut parts = Vec::new();
    let resize = small(c);
    match c.u8() % 8 {
        0 | 1 => {
            parts.push(format!("resize={resize}"));
            parts.push(format!("crop={}", small(c)));
        }
        2 => {
            parts.push(format!("resize={resize}"));
            parts.push(format!("crop={}x{}", small(c), small(c)));
        }
        3 => parts.push(format!("size={resize}x{}", small(c))),
        _ => parts.push(format!("size={resize}")),
    }
    if c.u8().is_multiple_of(2) {
        parts.push(format!("channels={}", ["1", "3", "2", "0", "4294967296"][usize::from(c.u8()) % 5]));
    }
    if c.u8().is_multiple_of(3) {
        parts.push(format!("mean={}", floats(c)));
    }
    if c.u8().is_multiple_of(3) {
        parts.push(format!("std={}", floats(c)));
    }
    if c.u8().is_multiple_of(4) {
        parts.push(format!("scale={}", ["1", "0", "1e-30", "nan", "-1"][usize::from(c.u8()) % 5]));
    }
    if c.u8().is_multiple_of(8) {
        parts.push(["", "size", "=3", "size=3", "bogus=1"][usize::from(c.u8()) % 5].to_string());
    }
    parts.join(",")
}

/// Random bytes: the decoding above gives them their structure.
pub fn input(rng: &mut Xoshiro256PlusPlus) -> Vec<u8> {
    let n = rng.random_range(8..96);
    (0..n).map(|_| rng.random()).collect()
}
