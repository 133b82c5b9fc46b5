//! Camera frames as applications hand them over: a pixel format, planes with row and pixel
//! strides, a rotation, a mirror flag and a timestamp. Frames own their bytes, so they can be
//! pushed from another thread and bound to C, JNI and Swift as plain buffers.

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

/// Clockwise rotation that brings the frame upright.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Rotation {
    #[default]
    R0,
    R90,
    R180,
    R270,
}

/// One frame.
#[derive(Clone, Debug)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    pub format: PixelFormat,
    /// Plane layout: one plane for packed formats, two for NV12/NV21, three for I420.
    pub planes: Vec<Plane>,
    pub data: Vec<u8>,
    pub rotation: Rotation,
    /// Mirror horizontally (after rotation), as front cameras need.
    pub mirror: bool,
    /// The producer's timestamp (microseconds), carried to the frame's result.
    pub timestamp_us: i64,
}

impl Frame {
    /// A tightly packed RGB8 frame.
    pub fn rgb8(width: u32, height: u32, data: Vec<u8>) -> Frame {
        let plane = Plane { offset: 0, row_stride: width as usize * 3, pixel_stride: 3 };
        Frame {
            width,
            height,
            format: PixelFormat::Rgb8,
            planes: vec![plane],
            data,
            rotation: Rotation::R0,
            mirror: false,
            timestamp_us: 0,
        }
    }

    /// A tightly packed Gray8 frame.
    pub fn gray8(width: u32, height: u32, data: Vec<u8>) -> Frame {
        let plane = Plane { offset: 0, row_stride: width as usize, pixel_stride: 1 };
        Frame {
            width,
            height,
            format: PixelFormat::Gray8,
            planes: vec![plane],
            data,
            rotation: Rotation::R0,
            mirror: false,
            timestamp_us: 0,
        }
    }
}
