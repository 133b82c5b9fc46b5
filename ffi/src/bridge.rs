//! The one place the C ABI touches the library: building a stream session from a model path and
//! a config text, pushing frames, state, and the classification of the library's errors into
//! the ABI's status kinds. Everything here goes through `acclimate`'s public API; when the
//! library grows its facade, this module is what changes.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

/// What went wrong, as the ABI's status codes distinguish it: the library's own classification.
pub use acclimate::ErrorKind as Kind;
use acclimate::adapt::config::{AdaptConfig, DEFAULT_PRESET, StreamMode};
use acclimate::ir::Dim;
use acclimate::stream::frame::Frame;
use acclimate::stream::policy::{StreamError, StreamOptions, StreamSession};
use acclimate::{GpuContext, Model};

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
    pub fn open(model_path: &Path, config_text: &str) -> Result<Stream, Failure> {
        let mut config = config_from_text(config_text)?;
        let spec = config.preprocess.take().map(|p| p.spec).ok_or_else(|| Failure::new(Kind::Config, "no spec"))?;
        let model = Model::load(model_path).map_err(|e| model_failure(model_path, e))?;
        let classes = model.graph.outputs.first().and_then(|o| o.dims.as_ref()).and_then(|d| match d.last() {
            Some(Dim::Fixed(n)) => Some(*n),
            _ => None,
        });
        let ctx = shared_context()?;
        let options = StreamOptions { top_k: MAX_TOP_K, source_prediction: false };
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
        Ok(Predicted { frame_index: r.index, top_k: r.top_k, stepped: r.adapted })
    }

    /// Counts a frame the ABI refused before it reached the stream, so frame indices keep
    /// counting every frame handed over.
    pub fn skip(&mut self) {
        self.stream.skip();
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
        Stats {
            frames: self.stream.frames(),
            steps: self.stream.steps(),
            steps_skipped: self.stream.session().steps_skipped(),
        }
    }
}

/// Times a call for `latency_ms`: from the ABI's entry to its result.
pub fn elapsed_ms(since: Instant) -> f32 {
    since.elapsed().as_secs_f32() * 1000.0
}

fn model_failure(path: &Path, e: acclimate::Error) -> Failure {
    Failure::new(e.kind(), format!("model {}: {e}", path.display()))
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
