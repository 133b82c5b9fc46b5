//! The reference side of `android/host-test.sh`: writes a few synthetic camera frames and what
//! the library predicts for them, computed here through `acclimate`'s own API (`Stream` over
//! tightly packed `Frame::rgba8` / `Frame::i420` frames, no bindings involved). The Kotlin suite
//! re-lays the same bytes the way CameraX delivers them (chroma pixel stride 2 with U and V
//! interleaved in one buffer, padded rows, rotation 90/270), pushes them through the generated
//! bindings and must get the same classes and probabilities.
//!
//! ```sh
//! cargo run -p acclimate-ffi --example camera_reference -- assets/svhn.onnx OUT_DIR
//! ```
//!
//! OUT_DIR gets `source.toml` and `tent.toml` (the configs both sides use), `frameK.rgba` and
//! `frameK.i420` (frame K as packed RGBA and packed I420, BT.601 video range) and `expected.txt`:
//! one line per case, `CASE FRAME_INDEX STEPPED K CLASS PROB CLASS PROB …`, probabilities
//! printed so they parse back to the same f32.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use acclimate::stream::frame::{YuvMatrix, YuvRange};
use acclimate::{Config, Frame, GpuContext, Model, Rotation, Stream, StreamOptions};

/// Frame size as stored: not square, so a rotation changes what the model sees.
const W: u32 = 40;
const H: u32 = 30;
/// Frames in the adapting sequence.
const FRAMES: u32 = 8;
const SPEC: &str = "size=32,channels=3,mean=0.4377/0.4438/0.4728,std=0.1980/0.2010/0.1970";

fn configs() -> (String, String) {
    let source = format!("[adapt]\nmethod = \"source\"\n[preprocess]\nspec = \"{SPEC}\"\n");
    // A step every 2 frames on a window of 4: the sequence steps 4 times.
    let tent = format!(
        "[adapt]\nmethod = \"tent\"\n[optimizer]\nlr = 0.01\n[stream]\nwindow = 4\nadapt_every = 2\n\
         [preprocess]\nspec = \"{SPEC}\"\n"
    );
    (source, tent)
}

/// Frame `k` as RGB: gradients and a dark bar that move with `k`, so frames differ.
fn picture(k: u32) -> Vec<[u8; 3]> {
    let mut px = Vec::with_capacity((W * H) as usize);
    for y in 0..H {
        for x in 0..W {
            let bar = (x + 2 * k) % W >= 14 && (x + 2 * k) % W < 22 && (5..25).contains(&y);
            let r = ((x * 255 / (W - 1)) ^ (k * 37)) as u8;
            let g = (y * 255 / (H - 1)) as u8;
            let b = ((x + y) * 9 + k * 29) as u8;
            px.push(if bar { [r / 5, g / 6, b / 4] } else { [r, g, b] });
        }
    }
    px
}

fn rgba(px: &[[u8; 3]]) -> Vec<u8> {
    px.iter().flat_map(|p| [p[0], p[1], p[2], 255]).collect()
}

/// Packed I420, BT.601 video range, chroma from each 2×2 block's mean colour.
fn i420(px: &[[u8; 3]]) -> Vec<u8> {
    let (w, h) = (W as usize, H as usize);
    let (kr, kb) = (0.299f64, 0.114f64);
    let luma = |p: [f64; 3]| kr * p[0] + (1.0 - kr - kb) * p[1] + kb * p[2];
    let q = |v: f64| v.round().clamp(0.0, 255.0) as u8;
    let mut out: Vec<u8> = px.iter().map(|p| q(16.0 + 219.0 * luma(p.map(f64::from)) / 255.0)).collect();
    let (mut u, mut v) = (Vec::new(), Vec::new());
    for by in 0..h / 2 {
        for bx in 0..w / 2 {
            let mut m = [0.0f64; 3];
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let p = px[(2 * by + dy) * w + 2 * bx + dx];
                for c in 0..3 {
                    m[c] += f64::from(p[c]) / 4.0;
                }
            }
            let y = luma(m);
            u.push(q(128.0 + 224.0 * (m[2] - y) / (255.0 * 2.0 * (1.0 - kb))));
            v.push(q(128.0 + 224.0 * (m[0] - y) / (255.0 * 2.0 * (1.0 - kr))));
        }
    }
    out.extend(u);
    out.extend(v);
    out
}

fn stream(ctx: &GpuContext, model: &Path, config: &str) -> Result<Stream, Box<dyn std::error::Error>> {
    let mut config = Config::from_toml_str(config)?;
    let spec = config.preprocess.take().ok_or("the config has no [preprocess]")?.spec;
    let model = Model::load(model)?;
    Ok(Stream::new(ctx, model, config, spec, StreamOptions { top_k: 5, source_prediction: false })?)
}

fn line(out: &mut String, case: &str, stream: &mut Stream, frame: &Frame) -> Result<(), Box<dyn std::error::Error>> {
    let results = stream.push(frame)?;
    let r = results.first().ok_or("the frame protocol returned no result")?;
    write!(out, "{case} {} {} {}", r.index, u8::from(r.adapted), r.top_k.len())?;
    for (class, prob) in &r.top_k {
        write!(out, " {class} {prob:?}")?;
    }
    out.push('\n');
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, out] = args.as_slice() else {
        return Err("usage: camera_reference MODEL.onnx OUT_DIR".into());
    };
    let (model, out) = (PathBuf::from(model), PathBuf::from(out));
    std::fs::create_dir_all(&out)?;
    let (source, tent) = configs();
    std::fs::write(out.join("source.toml"), &source)?;
    std::fs::write(out.join("tent.toml"), &tent)?;
    for k in 0..FRAMES {
        let px = picture(k);
        std::fs::write(out.join(format!("frame{k}.rgba")), rgba(&px))?;
        std::fs::write(out.join(format!("frame{k}.i420")), i420(&px))?;
    }

    let ctx = GpuContext::new()?;
    let mut expected = String::new();
    // Source: a prediction depends on its frame alone, so each case is one push.
    let mut s = stream(&ctx, &model, &source)?;
    let px = picture(0);
    let packed_rgba = || Frame::rgba8(W, H, rgba(&px));
    let packed_yuv = || Frame::i420(W, H, i420(&px));
    line(&mut expected, "rgba_r0", &mut s, &packed_rgba())?;
    line(&mut expected, "rgba_r90_mirror", &mut s, &packed_rgba().with_rotation(Rotation::R90).with_mirror(true))?;
    for (case, rotation) in [("yuv_r0", Rotation::R0), ("yuv_r90", Rotation::R90), ("yuv_r270", Rotation::R270)] {
        line(&mut expected, case, &mut s, &packed_yuv().with_rotation(rotation))?;
    }
    let full = packed_yuv().with_rotation(Rotation::R90).with_yuv(YuvMatrix::Bt601, YuvRange::Full);
    line(&mut expected, "yuv_r90_full", &mut s, &full)?;
    // TENT: the sequence adapts, so each prediction depends on the frames before it.
    let mut t = stream(&ctx, &model, &tent)?;
    for k in 0..FRAMES {
        line(&mut expected, "tent", &mut t, &Frame::i420(W, H, i420(&picture(k))).with_rotation(Rotation::R90))?;
    }
    std::fs::write(out.join("expected.txt"), &expected)?;
    print!("{expected}");
    Ok(())
}
