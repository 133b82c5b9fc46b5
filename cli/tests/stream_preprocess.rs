//! Frame preprocessing on the GPU (`shaders/preprocess.wgsl`) against the CPU reference
//! `preprocess_cpu`, and both against independent references: colours encoded by hand with the
//! BT.601/BT.709 formulas, a rotated 2×3 image written out pixel by pixel, and PyTorch's bilinear
//! `interpolate` on a rotated, mirrored, cropped image.
//!
//! Error bound GPU vs CPU (f32 kernel, f64 reference): the sample position
//! `(o + crop + 0.5)·scale − 0.5` carries the f32 rounding of `scale` and of the product,
//! about 2·2⁻²⁴·|position| ≤ 5e-6 pixels for these images (positions below 40); bilinear
//! interpolation changes by at most 255 per pixel of position, so ≤ 1.3e-3 in 0–255 units,
//! ≤ 5e-6 after /255, ≤ 3e-5 after dividing by the smallest std used (0.197). The colour and
//! interpolation arithmetic adds a few f32 ulps of 255 (≈ 1e-4 in 0–255 units, 2e-6 after
//! normalisation). Hence `TOL = 1e-4`.

mod common;

use acclimate::GpuContext;
use acclimate::stream::frame::{Frame, FrameError, PixelFormat, Plane, Rotation, YuvMatrix, YuvRange};
use acclimate::stream::preprocess::{PreprocessSpec, Preprocessor, SpecError, preprocess_cpu};
use acclimate_test_macros::gpu_test;

const TOL: f32 = 1e-4;

const FORMATS: [PixelFormat; 7] = [
    PixelFormat::Rgba8,
    PixelFormat::Bgra8,
    PixelFormat::Rgb8,
    PixelFormat::Gray8,
    PixelFormat::Nv12,
    PixelFormat::Nv21,
    PixelFormat::I420,
];
const ROTATIONS: [Rotation; 4] = [Rotation::R0, Rotation::R90, Rotation::R180, Rotation::R270];
const ENCODINGS: [(YuvMatrix, YuvRange); 4] = [
    (YuvMatrix::Bt601, YuvRange::Video),
    (YuvMatrix::Bt601, YuvRange::Full),
    (YuvMatrix::Bt709, YuvRange::Video),
    (YuvMatrix::Bt709, YuvRange::Full),
];

fn spec(s: &str) -> PreprocessSpec {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    common::random_f32(n, seed, 0.0, 256.0).into_iter().map(|v| v.min(255.0) as u8).collect()
}

/// How many memory layouts [`layout_frame`] knows for `format`.
fn layouts(format: PixelFormat) -> usize {
    if format == PixelFormat::I420 { 4 } else { 2 }
}

/// A `w×h` frame of random bytes in layout `variant`: 0 tightly packed; 1 with padded rows and
/// planes starting at odd, unaligned offsets; for I420 also 2, Android's YUV_420_888
/// semi-planar layout (U and V planes with pixel stride 2, V one byte after U, padded rows),
/// and 3, the same with V before U (NV21 memory).
fn layout_frame(format: PixelFormat, w: u32, h: u32, variant: usize, seed: u64) -> Frame {
    let (wu, hu) = (w as usize, h as usize);
    let (cw, ch) = (wu.div_ceil(2), hu.div_ceil(2));
    let (pad, lead) = if variant == 0 { (0, 0) } else { (5, 3) };
    let bpp = format.sample_bytes(0);
    let y = Plane::new(lead, wu * bpp + pad, bpp);
    let after_y = lead + y.row_stride * hu + pad;
    let planes = match format {
        PixelFormat::Rgba8 | PixelFormat::Bgra8 | PixelFormat::Rgb8 | PixelFormat::Gray8 => vec![y],
        PixelFormat::Nv12 | PixelFormat::Nv21 => vec![y, Plane::new(after_y, 2 * cw + pad, 2)],
        PixelFormat::I420 => match variant {
            0 | 1 => {
                let u = Plane::new(after_y, cw + pad, 1);
                let v = Plane::new(after_y + u.row_stride * ch + 1, cw + pad, 1);
                vec![y, u, v]
            }
            2 => vec![y, Plane::new(after_y, 2 * cw + pad, 2), Plane::new(after_y + 1, 2 * cw + pad, 2)],
            _ => vec![y, Plane::new(after_y + 1, 2 * cw + pad, 2), Plane::new(after_y, 2 * cw + pad, 2)],
        },
    };
    let mut frame = Frame::new(w, h, format, planes, Vec::new());
    let end = (0..format.plane_count()).map(|i| frame.plane_extent(i).unwrap().1).max().unwrap();
    // Padded layouts also leave bytes after the last plane, as camera buffers do.
    frame.data = random_bytes(end + if variant == 0 { 0 } else { 7 }, seed);
    frame.validate().unwrap_or_else(|e| panic!("test frame {format:?} variant {variant}: {e}"));
    frame
}

/// Largest |GPU − CPU| over `frames` preprocessed in one batch, checking the batch's shape.
fn batch_error(pre: &mut Preprocessor, frames: &[Frame], what: &str) -> f32 {
    let spec = pre.spec().clone();
    let out = pre.run(frames).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(out.shape, spec.output_shape(frames.len()));
    let gpu = out.as_f32().unwrap();
    let len = spec.frame_len();
    let mut worst = 0f32;
    for (i, frame) in frames.iter().enumerate() {
        let cpu = preprocess_cpu(frame, &spec).unwrap();
        for (k, (g, c)) in gpu[i * len..(i + 1) * len].iter().zip(&cpu).enumerate() {
            let err = (g - c).abs();
            assert!(
                err <= TOL,
                "{what}: frame {i} ({:?} {}x{} {:?} mirror {} planes {:?} {:?}): element {k}: gpu {g} cpu {c}",
                frame.format,
                frame.width,
                frame.height,
                frame.rotation,
                frame.mirror,
                frame.planes,
                (frame.yuv_matrix, frame.yuv_range),
            );
            worst = worst.max(err);
        }
    }
    worst
}

/// Every format × rotation × mirror, odd sizes, padded and Android layouts, all four YUV
/// encodings, channels 1 and 3, `size=` and `resize=,crop=` (down- and upsampling), all 56
/// frames of mixed formats in one batch per spec.
#[gpu_test]
fn gpu_matches_cpu_for_every_format_rotation_and_mirror(ctx: GpuContext) {
    let mut frames = Vec::new();
    for (f, &format) in FORMATS.iter().enumerate() {
        for (r, &rotation) in ROTATIONS.iter().enumerate() {
            for mirror in [false, true] {
                let k = 2 * r + mirror as usize;
                let (w, h) = if mirror { (23, 37) } else { (37, 23) };
                let (matrix, range) = ENCODINGS[k % 4];
                let frame = layout_frame(format, w, h, k % layouts(format), (f * 100 + k) as u64)
                    .with_rotation(rotation)
                    .with_mirror(mirror)
                    .with_yuv(matrix, range);
                frames.push(frame);
            }
        }
    }
    for s in [
        "size=9,channels=3,mean=0.4377/0.4438/0.4728,std=0.1980/0.2010/0.1970",
        "resize=12,crop=8,channels=1,mean=0.45,std=0.226",
        "resize=40,crop=31,mean=0.485/0.456/0.406,std=0.229/0.224/0.225",
        "resize=40,crop=31,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nhwc",
        // Models whose input is not square: stretched, and a non-square centre crop.
        "size=13x7,channels=3,mean=0.5/0.5/0.5,std=0.25/0.25/0.25",
        "size=6x19,channels=1,mean=0.45,std=0.226,layout=nhwc",
        "resize=40,crop=31x17,mean=0.485/0.456/0.406,std=0.229/0.224/0.225",
        "resize=30,crop=11x29,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nhwc",
    ] {
        let mut pre = Preprocessor::new(&ctx, spec(s));
        let worst = batch_error(&mut pre, &frames, s);
        eprintln!("{s}: max |gpu - cpu| = {worst:.3e} over {} frames", frames.len());
    }
}

/// Frames at the edges of the geometry: 1×1, one row, one column, even sizes, chroma planes
/// of one sample, and a batch reusing buffers that grew in an earlier larger call.
#[gpu_test]
fn tiny_odd_and_even_frames(ctx: GpuContext) {
    let mut frames = Vec::new();
    for (i, &(w, h)) in [(1, 1), (1, 5), (6, 1), (2, 2), (16, 10), (3, 7)].iter().enumerate() {
        for (f, &format) in FORMATS.iter().enumerate() {
            let rotation = ROTATIONS[(i + f) % 4];
            let frame = layout_frame(format, w, h, (i + f) % layouts(format), (i * 10 + f) as u64 + 5000)
                .with_rotation(rotation)
                .with_mirror((i + f).is_multiple_of(3));
            frames.push(frame);
        }
    }
    let mut pre = Preprocessor::new(&ctx, spec("size=5,mean=0.5/0.4/0.3,std=0.25/0.3/0.2"));
    let worst = batch_error(&mut pre, &frames, "tiny frames");
    let again = batch_error(&mut pre, &frames[..3], "a smaller batch on grown buffers");
    eprintln!("tiny frames: max |gpu - cpu| = {:.3e}", worst.max(again));
}

/// Y, Cb, Cr bytes of an RGB colour, from the standard's formulas: E'Y = Kr·R + Kg·G + Kb·B,
/// E'Cb = (B − Y)/(2(1 − Kb)), E'Cr = (R − Y)/(2(1 − Kr)) on 0–1 values, quantised as
/// 16 + 219·Y, 128 + 224·C (video range) or 255·Y, 128 + 255·C (full range), rounded and
/// clipped to bytes.
fn encode_yuv(rgb: [f64; 3], kr: f64, kb: f64, full: bool) -> [u8; 3] {
    let [r, g, b] = rgb.map(|v| v / 255.0);
    let y = kr * r + (1.0 - kr - kb) * g + kb * b;
    let cb = (b - y) / (2.0 * (1.0 - kb));
    let cr = (r - y) / (2.0 * (1.0 - kr));
    let q = |v: f64| v.round().clamp(0.0, 255.0) as u8;
    if full {
        [q(255.0 * y), q(128.0 + 255.0 * cb), q(128.0 + 255.0 * cr)]
    } else {
        [q(16.0 + 219.0 * y), q(128.0 + 224.0 * cb), q(128.0 + 224.0 * cr)]
    }
}

/// Known colours through both matrices and both ranges, as I420, NV12 and NV21 frames: the
/// decoded RGB (scale=1, so in 0–255) must be the colour that was encoded. Quantising Y, Cb and
/// Cr to bytes moves each by ≤ 0.5 (the clipped Cr of full-range red by 0.5 as well); decoding
/// multiplies that by at most 255/219 on Y and 2(1−Kb)·255/224 ≤ 2.12 on chroma, so every
/// channel is within 0.58 + 0.5·2.12 < 2 of the colour. Decoding with the other matrix misses
/// red, green or blue by more than 10.
#[gpu_test]
fn colour_matrices_decode_known_colours(ctx: GpuContext) {
    let colours: [[f64; 3]; 6] =
        [[255.0, 0.0, 0.0], [0.0, 255.0, 0.0], [0.0, 0.0, 255.0], [128.0, 128.0, 128.0], [255.0; 3], [0.0; 3]];
    let rgb_spec = spec("size=2,scale=1");
    let luma_spec = spec("size=2,channels=1,scale=1");
    let mut rgb_pre = Preprocessor::new(&ctx, rgb_spec.clone());
    let mut luma_pre = Preprocessor::new(&ctx, luma_spec.clone());
    let mut frames = Vec::new();
    let mut expected = Vec::new();
    for (matrix, range) in ENCODINGS {
        let (kr, kb) = match matrix {
            YuvMatrix::Bt601 => (0.299, 0.114),
            YuvMatrix::Bt709 => (0.2126, 0.0722),
        };
        for colour in colours {
            let [y, cb, cr] = encode_yuv(colour, kr, kb, range == YuvRange::Full);
            for (format, data) in [
                (PixelFormat::I420, vec![y, y, y, y, cb, cr]),
                (PixelFormat::Nv12, vec![y, y, y, y, cb, cr]),
                (PixelFormat::Nv21, vec![y, y, y, y, cr, cb]),
            ] {
                let frame = match format {
                    PixelFormat::I420 => Frame::i420(2, 2, data),
                    PixelFormat::Nv12 => Frame::nv12(2, 2, data),
                    _ => Frame::nv21(2, 2, data),
                };
                frames.push(frame.with_yuv(matrix, range));
                expected.push((colour, y, range));
            }
        }
    }
    let rgb = rgb_pre.run(&frames).unwrap();
    let luma = luma_pre.run(&frames).unwrap();
    let (rgb, luma) = (rgb.as_f32().unwrap(), luma.as_f32().unwrap());
    let mut worst = 0f64;
    for (i, (frame, &(colour, y, range))) in frames.iter().zip(&expected).enumerate() {
        let cpu = preprocess_cpu(frame, &rgb_spec).unwrap();
        for c in 0..3 {
            for px in 0..4 {
                for (who, got) in [("gpu", rgb[i * 12 + c * 4 + px]), ("cpu", cpu[c * 4 + px])] {
                    let err = (got as f64 - colour[c]).abs();
                    assert!(
                        err < 2.0,
                        "{who}: {:?} {:?} {:?} colour {colour:?} channel {c}: {got}",
                        frame.format,
                        frame.yuv_matrix,
                        range
                    );
                    worst = worst.max(err);
                }
            }
        }
        // channels=1 on YUV is the Y plane itself, range-expanded.
        let want_y = match range {
            YuvRange::Video => ((y as f64 - 16.0) * 255.0 / 219.0).clamp(0.0, 255.0),
            YuvRange::Full => y as f64,
        };
        for px in 0..4 {
            assert!((luma[i * 4 + px] as f64 - want_y).abs() < 1e-3, "luma of {colour:?}: {}", luma[i * 4 + px]);
        }
    }
    eprintln!("known colours: max |decoded - encoded| = {worst:.3} (0-255 units)");

    // The other matrix gives visibly wrong colours, so the test above can tell them apart.
    let [y, cb, cr] = encode_yuv([255.0, 0.0, 0.0], 0.299, 0.114, false);
    let wrong = Frame::i420(2, 2, vec![y, y, y, y, cb, cr]).with_yuv(YuvMatrix::Bt709, YuvRange::Video);
    let out = preprocess_cpu(&wrong, &rgb_spec).unwrap();
    assert!(out[4] > 10.0, "BT.601 red decoded as BT.709 should not stay pure red: {out:?}");
}

/// A 2×3 gray image with distinct pixels in every rotation, mirrored or not. `size=2` on an
/// upright 3×2 (or 2×3) image resizes by exactly 1, so the output is the upright image's top-left
/// 2×2 (the centre crop of 3 starts at round(0.5) = 0), exact.
#[gpu_test]
fn rotations_and_mirror_move_pixels_where_expected(ctx: GpuContext) {
    // Stored 2 wide, 3 tall:   10 20
    //                          30 40
    //                          50 60
    let image = vec![10, 20, 30, 40, 50, 60];
    let cases: [(Rotation, bool, [f32; 4]); 8] = [
        (Rotation::R0, false, [10.0, 20.0, 30.0, 40.0]),
        // Clockwise: the left column read bottom to top becomes the top row: 50 30 10 / 60 40 20.
        (Rotation::R90, false, [50.0, 30.0, 60.0, 40.0]),
        (Rotation::R180, false, [60.0, 50.0, 40.0, 30.0]),
        // Counter-clockwise: 20 40 60 / 10 30 50.
        (Rotation::R270, false, [20.0, 40.0, 10.0, 30.0]),
        (Rotation::R0, true, [20.0, 10.0, 40.0, 30.0]),
        // Mirror after rotation: 10 30 50 / 20 40 60.
        (Rotation::R90, true, [10.0, 30.0, 20.0, 40.0]),
        (Rotation::R180, true, [50.0, 60.0, 30.0, 40.0]),
        (Rotation::R270, true, [60.0, 40.0, 50.0, 30.0]),
    ];
    let gray = spec("size=2,channels=1,scale=1");
    let rgb = spec("size=2,channels=3,scale=1");
    let frames: Vec<Frame> =
        cases.iter().map(|&(r, m, _)| Frame::gray8(2, 3, image.clone()).with_rotation(r).with_mirror(m)).collect();
    let out = Preprocessor::new(&ctx, gray.clone()).run(&frames).unwrap();
    let out3 = Preprocessor::new(&ctx, rgb.clone()).run(&frames).unwrap();
    let (out, out3) = (out.as_f32().unwrap(), out3.as_f32().unwrap());
    for (i, (frame, (r, m, want))) in frames.iter().zip(&cases).enumerate() {
        assert_eq!(&out[i * 4..i * 4 + 4], want, "gpu, {r:?} mirror {m}");
        assert_eq!(preprocess_cpu(frame, &gray).unwrap(), want, "cpu, {r:?} mirror {m}");
        // A gray frame with channels=3 is the same image three times.
        for c in 0..3 {
            assert_eq!(&out3[i * 12 + c * 4..i * 12 + c * 4 + 4], want, "channel {c}, {r:?} mirror {m}");
        }
    }
}

/// Against PyTorch (`torch.rot90(img, k=-1)`, `flip`, torchvision's resize-size rule,
/// `F.interpolate(mode="bilinear", align_corners=False, antialias=False)`, centre crop with
/// Python's `round`, normalise; f64). The images are `(37x + 91y + 53c + 11) mod 256`.
/// Generated with torch 2.9.1:
///
/// ```python
/// def run(img, k_cw, mirror, resize, crop, mean, std, gray):   # img: [3, H, W] float64
///     if gray: img = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
///     img = torch.rot90(img, k=-k_cw, dims=(1, 2))
///     if mirror: img = img.flip(2)
///     _, h, w = img.shape
///     if w <= h: nw, nh = resize, int(resize * h / w)
///     else: nh, nw = resize, int(resize * w / h)
///     img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=False)[0]
///     top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
///     img = img[:, top:top + crop, left:left + crop] / 255.0
///     return ((img - mean[:, None, None]) / std[:, None, None]).flatten()
/// A = run(frame(7, 5), 1, True, 4, 3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], False)
/// B = run(frame(4, 3), 3, False, 6, 6, [0.5], [0.25], True)
/// ```
#[gpu_test]
fn matches_pytorch_bilinear_resize_with_rotation_mirror_and_crop(ctx: GpuContext) {
    const A: [f64; 27] = [
        -0.720952136,
        0.240602791,
        -0.551417073,
        0.166110112,
        0.470074493,
        -0.321945372,
        0.833975512,
        0.261152496,
        0.565116876,
        0.320290616,
        0.631039916,
        -0.178658964,
        0.666929272,
        -1.26321779,
        0.728203782,
        1.57379202,
        -0.356355042,
        0.514618347,
        1.13019608,
        0.101002179,
        0.968104575,
        1.80993464,
        -0.111633987,
        1.87093682,
        -1.19137255,
        0.791198257,
        -0.0149019608,
    ];
    const B: [f64; 36] = [
        0.446196078,
        0.246635294,
        -0.152486275,
        -0.442682353,
        -0.623952941,
        -0.714588235,
        0.156,
        0.251090196,
        0.441270588,
        0.15107451,
        -0.619498039,
        -1.00478431,
        -0.134196078,
        0.136831373,
        0.678886275,
        0.463733333,
        -0.508627451,
        -0.994807843,
        -0.424392157,
        -0.0961411765,
        0.560360784,
        0.495294118,
        -0.291341176,
        -0.684658824,
        -0.714588235,
        -0.35772549,
        0.356,
        0.513301961,
        0.114180392,
        -0.0853803922,
        -1.00478431,
        -0.647921569,
        0.0658039216,
        0.517756863,
        0.707937255,
        0.803027451,
    ];
    let image = |w: u32, h: u32| {
        let mut d = Vec::new();
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    d.push(((x * 37 + y * 91 + c * 53 + 11) % 256) as u8);
                }
            }
        }
        Frame::rgb8(w, h, d)
    };
    let cases = [
        (
            image(7, 5).with_rotation(Rotation::R90).with_mirror(true),
            "resize=4,crop=3,mean=0.485/0.456/0.406,std=0.229/0.224/0.225",
            &A[..],
        ),
        (image(4, 3).with_rotation(Rotation::R270), "size=6,channels=1,mean=0.5,std=0.25", &B[..]),
    ];
    for (frame, s, want) in cases {
        let spec = spec(s);
        let gpu = Preprocessor::new(&ctx, spec.clone()).run(std::slice::from_ref(&frame)).unwrap();
        let cpu = preprocess_cpu(&frame, &spec).unwrap();
        for (who, got) in [("gpu", gpu.as_f32().unwrap()), ("cpu", &cpu[..])] {
            let worst = got.iter().zip(want).map(|(&g, w)| (g as f64 - w).abs()).fold(0f64, f64::max);
            eprintln!("{s} {who}: max |ours - torch| = {worst:.3e}");
            assert!(worst < 1e-5, "{who} {s}: {got:?} vs torch {want:?}");
        }
    }
}

fn read_back(ctx: &acclimate::GpuContext, buffer: &wgpu::Buffer, floats: usize) -> Vec<f32> {
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: buffer.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, buffer.size());
    ctx.queue.submit([encoder.finish()]);
    acclimate::plan::read_buffer(ctx, &staging, floats).unwrap()
}

/// `record` writes rows `dst_row..` of an existing buffer and nothing else; rows of 75 floats
/// (300 bytes) start at offsets that are not multiples of the storage alignment.
#[gpu_test]
fn record_writes_rows_of_an_existing_buffer(ctx: GpuContext) {
    let spec = spec("size=5,mean=0.5/0.5/0.5,std=0.25/0.25/0.25");
    let row = spec.frame_len();
    let rows = 5;
    let dst = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (rows * row * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    ctx.queue.write_buffer(&dst, 0, bytemuck::cast_slice(&vec![-7.0f32; rows * row]));
    let a = layout_frame(PixelFormat::Nv21, 9, 7, 1, 1).with_rotation(Rotation::R90);
    let b = layout_frame(PixelFormat::I420, 8, 11, 2, 2).with_mirror(true);
    let c = layout_frame(PixelFormat::Bgra8, 6, 6, 1, 3);
    let mut pre = Preprocessor::new(&ctx, spec.clone());
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    pre.record(&mut encoder, std::slice::from_ref(&a), &dst, 1).unwrap();
    ctx.queue.submit([encoder.finish()]);
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    pre.record(&mut encoder, &[b.clone(), c.clone()], &dst, 3).unwrap();
    ctx.queue.submit([encoder.finish()]);
    let got = read_back(&ctx, &dst, rows * row);
    let expect: [Option<&Frame>; 5] = [None, Some(&a), None, Some(&b), Some(&c)];
    for (r, frame) in expect.iter().enumerate() {
        let got = &got[r * row..(r + 1) * row];
        match frame {
            None => assert!(got.iter().all(|&v| v == -7.0), "row {r} was overwritten"),
            Some(f) => {
                let cpu = preprocess_cpu(f, &spec).unwrap();
                let worst = got.iter().zip(&cpu).map(|(g, c)| (g - c).abs()).fold(0f32, f32::max);
                assert!(worst <= TOL, "row {r}: max error {worst}");
            }
        }
    }

    // A destination too small for the rows, or not usable as storage, is refused before any work.
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let err = pre.record(&mut encoder, std::slice::from_ref(&a), &dst, rows).unwrap_err();
    assert!(matches!(err, FrameError::Destination(_)), "{err}");
    assert!(err.to_string().contains(&format!("need {} bytes", (rows + 1) * row * 4)), "{err}");
    let not_storage = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (row * 4) as u64,
        usage: wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let err = pre.record(&mut encoder, std::slice::from_ref(&a), &not_storage, 0).unwrap_err();
    assert!(err.to_string().contains("STORAGE"), "{err}");
    ctx.queue.submit([encoder.finish()]);
}

/// Malformed frames are error values that say what is wrong, checked before any GPU work, and
/// the preprocessor keeps working afterwards.
#[gpu_test]
fn malformed_frames_are_errors_and_the_stream_goes_on(ctx: GpuContext) {
    let spec = spec("size=4");
    let mut pre = Preprocessor::new(&ctx, spec.clone());
    let good = layout_frame(PixelFormat::Rgb8, 5, 4, 0, 9);
    let check = |frame: &Frame, pre: &mut Preprocessor| -> FrameError {
        let cpu = preprocess_cpu(frame, &spec).unwrap_err().to_string();
        let gpu = pre.run(std::slice::from_ref(frame)).unwrap_err();
        assert_eq!(gpu.to_string(), cpu);
        gpu
    };

    let e = check(&Frame::rgb8(0, 4, vec![]), &mut pre);
    assert!(matches!(e, FrameError::ZeroSize { width: 0, height: 4 }), "{e}");
    assert_eq!(e.to_string(), "the frame is 0x4; both sizes must be at least 1");

    // A 5×4 NV12 frame needs 20 bytes of Y and 2 rows of 3 UV pairs: 32 bytes.
    let e = check(&Frame::nv12(5, 4, vec![0; 31]), &mut pre);
    assert!(matches!(e, FrameError::ShortBuffer { plane: "UV", needed: 32, given: 31, .. }), "{e}");
    assert!(e.to_string().contains("plane UV") && e.to_string().contains("byte 32") && e.to_string().contains("31"));
    let e = check(&Frame::nv12(5, 4, vec![0; 19]), &mut pre);
    assert!(matches!(e, FrameError::ShortBuffer { plane: "Y", needed: 20, given: 19, .. }), "{e}");
    // I420 5×4: Y 20, U 3×2 = 6, V 6: 32 bytes.
    let e = check(&Frame::i420(5, 4, vec![0; 31]), &mut pre);
    assert!(matches!(e, FrameError::ShortBuffer { plane: "V", needed: 32, given: 31, .. }), "{e}");
    let e = check(&Frame::rgba8(5, 4, vec![0; 79]), &mut pre);
    assert!(matches!(e, FrameError::ShortBuffer { plane: "RGBA", needed: 80, given: 79, .. }), "{e}");
    // A padded row stride makes the buffer need more than width·height·3.
    let mut padded = Frame::rgb8(5, 4, vec![0; 60]);
    padded.planes[0].row_stride = 16;
    let e = check(&padded, &mut pre);
    assert!(matches!(e, FrameError::ShortBuffer { needed: 63, given: 60, .. }), "{e}");

    let mut two = Frame::i420(4, 4, vec![0; 24]);
    two.planes.pop();
    let e = check(&two, &mut pre);
    assert!(matches!(e, FrameError::PlaneCount { expected: 3, given: 2, .. }), "{e}");
    let mut overlap = Frame::nv21(4, 4, vec![0; 24]);
    overlap.planes[1].pixel_stride = 1;
    let e = check(&overlap, &mut pre);
    assert!(matches!(e, FrameError::Stride { plane: "VU", .. }), "{e}");
    let mut rows = Frame::gray8(4, 4, vec![0; 16]);
    rows.planes[0].row_stride = 3;
    assert!(matches!(check(&rows, &mut pre), FrameError::Stride { plane: "gray", .. }));

    // In a batch the error names the frame; the good frames are not processed either.
    let e = pre.run(&[good.clone(), Frame::nv12(5, 4, vec![0; 31])]).unwrap_err();
    assert!(matches!(e, FrameError::Batch { index: 1, .. }), "{e}");
    assert!(e.to_string().starts_with("frame 1 of the batch: Nv12 plane UV: "), "{e}");

    // The stream goes on.
    let out = pre.run(std::slice::from_ref(&good)).unwrap();
    let cpu = preprocess_cpu(&good, &spec).unwrap();
    let worst = out.as_f32().unwrap().iter().zip(&cpu).map(|(g, c)| (g - c).abs()).fold(0f32, f32::max);
    assert!(worst <= TOL);
    // An empty batch is an empty tensor.
    assert_eq!(pre.run(&[]).unwrap().shape, vec![0, 3, 4, 4]);
}

/// Spec strings: the two documented forms parse, and mistakes say what is wrong.
/// Channels last (`layout=nhwc`, what a model taking [N, H, W, C] gets): the same values as the
/// NCHW output, transposed, on the GPU; the spec string keeps the layout; a stream picks it for
/// such a model when the spec does not say (`PreprocessSpec::for_input`).
#[gpu_test]
fn channels_last_is_the_nchw_output_transposed(ctx: GpuContext) {
    use acclimate::stream::preprocess::Layout;
    let frames: Vec<Frame> = (0..3).map(|i| layout_frame(FORMATS[i], 29, 17, 0, 700 + i as u64)).collect();
    let base = "resize=20,crop=16,mean=0.5/0.4/0.3,std=0.25/0.3/0.2";
    let nchw = Preprocessor::new(&ctx, spec(base)).run(&frames).unwrap().to_f32_vec();
    let nhwc_spec = spec(&format!("{base},layout=nhwc"));
    assert_eq!(nhwc_spec.output_shape(3), vec![3, 16, 16, 3]);
    assert_eq!(nhwc_spec.to_string().parse::<PreprocessSpec>().unwrap(), nhwc_spec);
    let nhwc = Preprocessor::new(&ctx, nhwc_spec).run(&frames).unwrap().to_f32_vec();
    let plane = 16 * 16;
    for f in 0..3 {
        for c in 0..3 {
            for i in 0..plane {
                assert_eq!(
                    nhwc[f * 3 * plane + i * 3 + c],
                    nchw[f * 3 * plane + c * plane + i],
                    "frame {f} channel {c} pixel {i}"
                );
            }
        }
    }
    let s = spec(base);
    assert_eq!(s.clone().for_input(&[None, Some(16), Some(16), Some(3)]).layout(), Layout::Nhwc);
    assert_eq!(s.clone().for_input(&[None, Some(3), Some(16), Some(16)]).layout(), Layout::Nchw);
    // Ambiguous (every dimension symbolic) or set explicitly: unchanged.
    assert_eq!(s.clone().for_input(&[None, None, None, None]).layout(), Layout::Nchw);
    let explicit = spec(&format!("{base},layout=nchw")).for_input(&[None, Some(16), Some(16), Some(3)]);
    assert_eq!(explicit.layout(), Layout::Nchw);
}

/// `size=WxH` stretches each axis on its own, as PyTorch's `interpolate(size=(H, W),
/// mode="bilinear", align_corners=False)`: a 2×2 gray frame [[0, 100], [200, 50]] to 4×2 samples
/// x at (o + 0.5)·0.5 − 0.5 = −0.25 (clamped to 0), 0.25, 0.75, 1.25 (the far neighbour clamped),
/// rows unchanged — values worked out by hand. The same frame to 2×4 (the other axis).
#[gpu_test]
fn stretch_matches_bilinear_worked_by_hand(ctx: GpuContext) {
    let frame = Frame::new(2, 2, PixelFormat::Gray8, vec![Plane::new(0, 2, 1)], vec![0, 100, 200, 50]);
    for (s, want) in [
        ("size=4x2,channels=1,mean=0,std=1,scale=1", vec![0.0, 25.0, 75.0, 100.0, 200.0, 162.5, 87.5, 50.0]),
        ("size=2x4,channels=1,mean=0,std=1,scale=1", vec![0.0, 100.0, 50.0, 87.5, 150.0, 62.5, 200.0, 50.0]),
    ] {
        let spec = spec(s);
        assert_eq!(preprocess_cpu(&frame, &spec).unwrap(), want, "{s}: CPU reference");
        let mut pre = Preprocessor::new(&ctx, spec);
        let got = pre.run(std::slice::from_ref(&frame)).unwrap();
        assert_eq!(got.as_f32().unwrap(), &want[..], "{s}: GPU");
    }
}

#[test]
fn spec_strings_parse_or_say_what_is_wrong() {
    let s = spec("resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225");
    assert_eq!(s.output_shape(2), vec![2, 3, 224, 224]);
    assert_eq!(s.to_string(), "resize=256,crop=224,channels=3,mean=0.485/0.456/0.406,std=0.229/0.224/0.225");
    let err = |t: &str| t.parse::<PreprocessSpec>().unwrap_err();
    assert_eq!(
        err("size=32,gamma=2").to_string(),
        "unknown key 'gamma' (keys: size, resize, crop, channels, mean, std, scale, layout)"
    );
    assert_eq!(err("size=3.5").to_string(), "size=3.5: '3.5' is not a non-negative integer");
    assert_eq!(err("size=32,std=0.2/0.2").to_string(), "std has 2 value(s) but channels=3");
    assert_eq!(err("size=32,channels=1,mean=0.1/0.2/0.3").to_string(), "mean has 3 value(s) but channels=1");
    assert!(matches!(err("resize=256"), SpecError::Shape(_)));
    assert!(matches!(err("size=32,mean=0.1/x/0.3"), SpecError::BadNumber { .. }));
    assert_eq!(err("size=32,layout=chw").to_string(), "layout: 'chw' is not nchw or nhwc");
}
