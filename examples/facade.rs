//! The library's facade end to end, and nothing else: a model and camera frames in, predictions
//! out, adapting on the way; the adapted state saved, and reloaded into a fresh stream that then
//! predicts exactly as the first one does.
//!
//! ```sh
//! cargo run --release --example facade -- assets/mobilenetv2.onnx assets/video/carphone_distorted.y4m [FRAMES] [CONFIG.toml]
//! ```
//! The clip is a YUV4MPEG2 file (4:2:0, what `tools/setup.sh` decodes into `assets/video/`); each
//! of its frames reaches the stream as I420 planes, as a camera would hand them over. Without a
//! config file the library's default config runs (`Config::default()`).

use std::path::Path;

use acclimate::{Config, Frame, GpuContext, Model, Preprocess, Stream, StreamOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model_path, clip, rest @ ..] = args.as_slice() else {
        return Err("usage: facade MODEL.onnx CLIP.y4m [FRAMES] [CONFIG.toml]".into());
    };
    let max_frames: usize = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(32);
    let config = match rest.get(1) {
        Some(path) => Config::from_toml_str(&std::fs::read_to_string(path)?)?,
        None => Config::default(),
    };

    let model = Model::load(Path::new(model_path))?;
    println!(
        "model: input {:?}, {} classes, {} BatchNorm layers",
        model.input_shape(),
        model.num_classes().map_or("?".to_string(), |c| c.to_string()),
        model.batch_norms().len()
    );
    let ctx = GpuContext::new()?;
    println!("gpu: {}", ctx.adapter_summary());

    // ImageNet's preprocessing, the same string `acclimate stream --preprocess` takes.
    let pre: Preprocess = "resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225".parse()?;
    let frames = read_y4m(Path::new(clip), max_frames)?;
    let half = frames.len() / 2;

    // Adapt on the first half of the clip, then save what was learned.
    let mut stream = Stream::new(&ctx, model.clone(), config.clone(), pre.clone(), StreamOptions::default())?;
    for frame in &frames[..half] {
        for r in stream.push(frame)? {
            println!("frame {:3}: class {:4} p={:.3}{}", r.index, r.class(), r.top_k[0].1, step_mark(r.adapted));
        }
    }
    let state = std::env::temp_dir().join("acclimate-facade-example.safetensors");
    stream.session().save_state(&state)?;
    println!("saved the adapted state after {} frames ({} steps) to {}", half, stream.steps(), state.display());

    // A fresh stream from the saved state predicts the second half as the first stream does.
    let mut resumed = Stream::new(&ctx, model, config, pre, StreamOptions::default())?;
    resumed.session_mut().load_state(&state)?;
    let (mut same, mut total) = (0, 0);
    for frame in &frames[half..] {
        let a = stream.push(frame)?;
        let b = resumed.push(frame)?;
        for (x, y) in a.iter().zip(&b) {
            total += 1;
            same += usize::from(x.class() == y.class());
        }
    }
    println!("resumed stream: same class as the original on {same}/{total} frames");
    Ok(())
}

fn step_mark(adapted: bool) -> &'static str {
    if adapted { "  (a step ran after this frame)" } else { "" }
}

/// The first `max` frames of a 4:2:0 YUV4MPEG2 file, as I420 frames.
fn read_y4m(path: &Path, max: usize) -> Result<Vec<Frame>, Box<dyn std::error::Error>> {
    let bytes = std::fs::read(path)?;
    let header_end = bytes.iter().position(|&b| b == b'\n').ok_or("not a Y4M file: no header line")?;
    let header = std::str::from_utf8(&bytes[..header_end])?;
    if !header.starts_with("YUV4MPEG2 ") {
        return Err(format!("{}: not a YUV4MPEG2 file", path.display()).into());
    }
    let field = |tag: char| header.split(' ').find_map(|f| f.strip_prefix(tag)).map(str::to_string);
    let width: u32 = field('W').ok_or("Y4M header without W")?.parse()?;
    let height: u32 = field('H').ok_or("Y4M header without H")?.parse()?;
    if let Some(c) = field('C').filter(|c| !c.starts_with("420")) {
        return Err(format!("{}: colour space C{c}; this example reads 4:2:0 only", path.display()).into());
    }
    let (w, h) = (width as usize, height as usize);
    let size = w * h + 2 * w.div_ceil(2) * h.div_ceil(2);
    let mut frames = Vec::new();
    let mut at = header_end + 1;
    while frames.len() < max && at < bytes.len() {
        let line_end = at + bytes[at..].iter().position(|&b| b == b'\n').ok_or("truncated FRAME line")?;
        if !bytes[at..line_end].starts_with(b"FRAME") {
            return Err(format!("{}: expected FRAME at byte {at}", path.display()).into());
        }
        let data = bytes.get(line_end + 1..line_end + 1 + size).ok_or("truncated frame")?;
        frames.push(Frame::i420(width, height, data.to_vec()));
        at = line_end + 1 + size;
    }
    Ok(frames)
}
