//! The one place the bindings touch the library, shared by the C ABI (`lib.rs`) and the Kotlin and
//! Swift bindings (`mobile.rs`): building a stream session from a model and a config text, turning
//! planes and strides into a checked [`Frame`], pushing frames, state, and the classification of
//! the library's errors into the bindings' status kinds. Both bindings go through this module, so
//! they check frames and word their errors the same way; it uses `acclimate`'s facade names where
//! the facade has them (the default preset, the output's dims and the stream's error variants are
//! still reached below it).

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

/// What went wrong, as the ABI's status codes distinguish it: the library's own classification.
pub use acclimate::ErrorKind as Kind;
use acclimate::Stream as StreamSession;
use acclimate::adapt::config::{DEFAULT_PRESET, StreamMode};
use acclimate::ir::Dim;
use acclimate::stream::policy::StreamError;
use acclimate::{Config as AdaptConfig, Frame, GpuContext, Model, PixelFormat, Plane, Rotation, StreamOptions};

/// A failed call: its kind and the message `acclimate_last_error` returns.
#[derive(Debug)]
pub struct Failure {
    pub kind: Kind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: Kind, message: impl Into<String>) -> Failure {
        Failure { kind, message: message.into() }
    }
}

impl From<acclimate::Error> for Failure {
    fn from(e: acclimate::Error) -> Failure {
        Failure::new(e.kind(), e.to_string())
    }
}

/// Classes per prediction the ABI returns at most (`ACCLIMATE_MAX_TOP_K`).
pub(crate) const MAX_TOP_K: usize = 5;

/// One frame's prediction, as the ABI returns it.
pub struct Predicted {
    pub frame_index: u64,
    pub top_k: Vec<(usize, f32)>,
    pub stepped: bool,
    /// The unadapted model's top class and probability, for sessions opened with
    /// `compare_source` (the Kotlin/Swift samples' overlay of source vs adapted).
    pub source_top: Option<(usize, f32)>,
}

/// Frames, gradient steps and skipped steps of a session.
pub struct Stats {
    pub frames: u64,
    pub steps: u64,
    pub steps_skipped: u64,
}

/// The GPU context sessions share: one device, and one cache of compiled pipelines, so a
/// second session starts without compiling every kernel again (see `c_suite.rs` for the
/// measured difference). Dropped after a GPU failure, so the next session opens a fresh device.
static CONTEXT: Mutex<Option<GpuContext>> = Mutex::new(None);

fn shared_context() -> Result<GpuContext, Failure> {
    let mut slot = CONTEXT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(ctx) = slot.as_ref() {
        return Ok(ctx.clone());
    }
    let ctx = GpuContext::new()?;
    *slot = Some(ctx.clone());
    Ok(ctx)
}

/// Runs the GPU self-test on the shared context (`GpuContext::self_test`): the number of stages
/// that matched the CPU reference, or the failure naming the wrong stage.
pub fn self_test() -> Result<usize, Failure> {
    Ok(shared_context()?.self_test()?.stages.len())
}

/// Forgets the shared context after a GPU failure (a lost device stays lost).
pub fn forget_context() {
    *CONTEXT.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// The config a session runs with: the text as a config file, every key it leaves out at the
/// library's default, and with no `[adapt]` at all the default preset's `[adapt]`,
/// `[optimizer]` and `[eata]` under it (its `[stream]` is the batch protocol of `acclimate
/// demo`; the ABI runs the frame protocol). It must hold `[preprocess]`.
pub fn config_from_text(text: &str) -> Result<AdaptConfig, Failure> {
    let config_err = |e: &dyn std::fmt::Display| Failure::new(Kind::Config, format!("config: {e}"));
    // The library's parser first: its messages name the line and key of the caller's text.
    let own = AdaptConfig::from_toml_str(text).map_err(|e| config_err(&e))?;
    let table: toml::Table = toml::from_str(text).map_err(|e| config_err(&e))?;
    let mut config = if table.contains_key("adapt") {
        own
    } else {
        let mut merged: toml::Table = toml::from_str(DEFAULT_PRESET).map_err(|e| config_err(&e))?;
        merged.remove("stream");
        for (section, value) in table {
            match (merged.get_mut(&section), value) {
                (Some(toml::Value::Table(base)), toml::Value::Table(keys)) => base.extend(keys),
                (_, value) => {
                    merged.insert(section, value);
                }
            }
        }
        let merged = toml::to_string(&merged).map_err(|e| config_err(&e))?;
        AdaptConfig::from_toml_str(&merged).map_err(|e| config_err(&format!("with the default preset: {e}")))?
    };
    if config.preprocess.is_none() {
        return Err(Failure::new(
            Kind::Config,
            "config: no [preprocess] section: add one with spec = \"...\", the string `acclimate stream \
             --preprocess` takes (for example spec = \"size=32,mean=0.4377/0.4438/0.4728,std=0.198/0.201/0.197\")",
        ));
    }
    if config.stream.mode != StreamMode::Frame {
        return Err(Failure::new(
            Kind::Config,
            "config: `stream.mode` = \"batch\": the C ABI runs the frame protocol (one prediction per \
             acclimate_session_push_frame); remove the key or set it to \"frame\"",
        ));
    }
    config.stream.mode = StreamMode::Frame;
    Ok(config)
}

/// A model adapting on a stream of frames, as one C handle holds it.
pub struct Stream {
    stream: StreamSession,
    classes: Option<usize>,
}

impl Stream {
    /// A session on the model at `model_path`; `compare_source` also runs the unadapted model
    /// on every frame ([`Predicted::source_top`]), at the cost of a second forward pass.
    pub fn open(model_path: &Path, config_text: &str, compare_source: bool) -> Result<Stream, Failure> {
        // The config first: a bad config is reported before a slow model load.
        config_from_text(config_text)?;
        let model = Model::load(model_path).map_err(|e| model_failure(&model_path.display().to_string(), e))?;
        Stream::with_model(model, config_text, compare_source)
    }

    /// A session on a model held in memory (an app's asset), as [`Stream::open`] otherwise.
    pub fn from_bytes(model_bytes: &[u8], config_text: &str, compare_source: bool) -> Result<Stream, Failure> {
        config_from_text(config_text)?;
        let model = Model::from_bytes(model_bytes)
            .map_err(|e| model_failure(&format!("({} bytes in memory)", model_bytes.len()), e))?;
        Stream::with_model(model, config_text, compare_source)
    }

    fn with_model(model: Model, config_text: &str, compare_source: bool) -> Result<Stream, Failure> {
        let mut config = config_from_text(config_text)?;
        let spec = config.preprocess.take().map(|p| p.spec).ok_or_else(|| Failure::new(Kind::Config, "no spec"))?;
        let classes = model.graph.outputs.first().and_then(|o| o.dims.as_ref()).and_then(|d| match d.last() {
            Some(Dim::Fixed(n)) => Some(*n),
            _ => None,
        });
        let ctx = shared_context()?;
        let options = StreamOptions { top_k: MAX_TOP_K, source_prediction: compare_source };
        let stream = StreamSession::new(&ctx, model, config, spec, options).map_err(stream_failure)?;
        Ok(Stream { stream, classes })
    }

    /// The model's class count, as its first output declares it.
    pub fn num_classes(&self) -> Result<usize, Failure> {
        self.classes.ok_or_else(|| {
            Failure::new(
                Kind::Model,
                "the model's first output does not declare a fixed class count (its last dimension)",
            )
        })
    }

    /// Runs the frame protocol on `frame` and returns its prediction.
    pub fn push(&mut self, frame: &Frame) -> Result<Predicted, Failure> {
        let mut results = self.stream.push(frame).map_err(stream_failure)?;
        // Frame mode (config_from_text insists on it) gives exactly one result per frame.
        let r = results.pop().ok_or_else(|| Failure::new(Kind::Internal, "the frame protocol returned no result"))?;
        Ok(Predicted { frame_index: r.index, top_k: r.top_k, stepped: r.adapted, source_top: r.source_top })
    }

    /// Pushes a frame [`build_frame`] made, or counts one it refused (so frame indices keep
    /// counting every frame handed over) and returns its reason as a `Frame` failure; the session
    /// is unchanged by a refused frame and takes the next one.
    pub fn push_built(&mut self, frame: Result<Frame, String>) -> Result<Predicted, Failure> {
        match frame {
            Ok(f) => self.push(&f),
            Err(reason) => {
                let index = self.stream.frames();
                self.stream.skip();
                Err(Failure::new(Kind::Frame, format!("frame {index}: {reason}")))
            }
        }
    }

    pub fn save_state(&self, path: &Path) -> Result<(), Failure> {
        self.stream.save_state(path).map_err(Failure::from)
    }

    pub fn load_state(&mut self, path: &Path) -> Result<(), Failure> {
        self.stream.load_state(path).map_err(Failure::from)
    }

    pub fn reset(&mut self) -> Result<(), Failure> {
        self.stream.reset().map_err(Failure::from)
    }

    pub fn stats(&self) -> Stats {
        Stats { frames: self.stream.frames(), steps: self.stream.steps(), steps_skipped: self.stream.skipped_steps() }
    }
}

/// Times a call for `latency_ms`: from the ABI's entry to its result.
pub fn elapsed_ms(since: Instant) -> f32 {
    since.elapsed().as_secs_f32() * 1000.0
}

fn model_failure(what: &str, e: acclimate::Error) -> Failure {
    Failure::new(e.kind(), format!("model {what}: {e}"))
}

fn stream_failure(e: acclimate::Error) -> Failure {
    match &e {
        acclimate::Error::Stream(StreamError::Input { .. }) => {
            Failure::new(e.kind(), format!("config: preprocess.spec: {e}"))
        }
        acclimate::Error::Stream(StreamError::Source(inner)) => {
            Failure::new(e.kind(), format!("model (source): {inner}"))
        }
        _ => e.into(),
    }
}

/// One plane as a binding hands it over: its bytes, and its strides in bytes (0: the format's
/// tightly packed default).
pub struct PlaneIn<'a> {
    pub data: &'a [u8],
    pub row_stride: usize,
    pub pixel_stride: usize,
}

/// How errors name plane `i` of `format`: "Nv21 planes[1] (VU)".
pub fn plane_label(format: PixelFormat, i: usize) -> String {
    let name = format.plane_names().get(i).copied().unwrap_or("unused");
    format!("{format:?} planes[{i}] ({name})")
}

/// A rotation in clockwise degrees.
pub fn rotation(degrees: i64) -> Result<Rotation, String> {
    match degrees {
        0 => Ok(Rotation::R0),
        90 => Ok(Rotation::R90),
        180 => Ok(Rotation::R180),
        270 => Ok(Rotation::R270),
        r => Err(format!("rotation {r} is not 0, 90, 180 or 270 (clockwise degrees)")),
    }
}

/// Builds the library's [`Frame`] from the planes a binding hands over (`planes[i]` for each of
/// the format's planes; more are ignored), copying from each plane exactly the bytes its strides
/// reach: one gather into the frame's buffer, the only copy between the caller's planes and the
/// preprocessing. Every size and stride is checked against the plane's length first, so a short
/// plane is an error naming it, never a read past its end; the library validates the frame
/// again on its side.
pub fn build_frame(
    width: i64,
    height: i64,
    format: PixelFormat,
    planes: &[PlaneIn],
    rotation_degrees: i64,
) -> Result<Frame, String> {
    let rotation = rotation(rotation_degrees)?;
    let (width, height) = match (u32::try_from(width), u32::try_from(height)) {
        (Ok(w), Ok(h)) if w > 0 && h > 0 => (w, h),
        _ => return Err(format!("the frame is {width}x{height}; both sizes must be at least 1")),
    };
    let (w, h) = (width as usize, height as usize);
    let count = format.plane_count();
    if planes.len() < count {
        return Err(format!("{format:?} has {count} planes, {} were handed over", planes.len()));
    }
    let mut layout = Vec::with_capacity(count);
    let mut spans: Vec<&[u8]> = Vec::with_capacity(count);
    let mut total = 0usize;
    for (i, p) in planes.iter().take(count).enumerate() {
        let what = plane_label(format, i);
        let sample = format.sample_bytes(i);
        let (cols, rows) = if format.is_yuv() && i > 0 { (w.div_ceil(2), h.div_ceil(2)) } else { (w, h) };
        let pixel_stride = if p.pixel_stride == 0 { sample } else { p.pixel_stride };
        if pixel_stride < sample {
            return Err(format!(
                "{what}: pixel_stride {pixel_stride} is smaller than the {sample} byte(s) of one sample"
            ));
        }
        let overflow = || format!("{what}: the strides overflow");
        let row_bytes =
            (cols - 1).checked_mul(pixel_stride).and_then(|b| b.checked_add(sample)).ok_or_else(overflow)?;
        let row_stride =
            if p.row_stride == 0 { cols.checked_mul(pixel_stride).ok_or_else(overflow)? } else { p.row_stride };
        if rows > 1 && row_stride < row_bytes {
            return Err(format!(
                "{what}: row_stride {row_stride} is smaller than the {row_bytes} bytes one row of {cols} samples spans"
            ));
        }
        let needed = (rows - 1).checked_mul(row_stride).and_then(|b| b.checked_add(row_bytes)).ok_or_else(overflow)?;
        if needed > p.data.len() {
            return Err(format!(
                "{what}: {rows} rows of row_stride {row_stride} and {cols} samples of pixel_stride {pixel_stride} \
                 reach byte {needed}, but len is {}",
                p.data.len()
            ));
        }
        layout.push(Plane::new(total, row_stride, pixel_stride));
        spans.push(&p.data[..needed]);
        total = total.checked_add(needed).ok_or_else(overflow)?;
    }
    let mut data = Vec::with_capacity(total);
    for span in spans {
        data.extend_from_slice(span);
    }
    Ok(Frame::new(width, height, format, layout, data).with_rotation(rotation))
}
