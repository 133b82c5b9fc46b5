//! The stream policy: frames in, one prediction per frame out, adaptation in the background of
//! the stream (tta-methods.md §7 and §12).
//!
//! Two protocols over the same frames, so both can be measured on one stream:
//! - **frame** mode predicts every frame at once, alone (batch 1), normalising with
//!   source-anchored statistics ([`StatsMode::Frame`], see [`frame_stats`]): batch statistics of
//!   one frame are instance normalisation, and an EMA of single frames' statistics (RBN) drifts
//!   to the scene's own statistics and normalises its content away. The preprocessed frames
//!   also go into a ring buffer of the last `window` frames, and every `adapt_every` frames the
//!   configured method takes its gradient step on that buffer (batch statistics over the
//!   window, as the method's reference does; see [`StreamSession::new`] for why not the frame
//!   statistics).
//!   Output-only methods (LAME) predict each frame from the window it closes.
//!   With background steps ([`StepTiming::Background`], the default) the step runs on a worker
//!   thread beside the next frames, paced so that no prediction waits behind a whole step
//!   ([`crate::adapt::train::Pacer`]), and lands just before frame k + `adapt_every`; the frames
//!   then stay on the GPU (preprocessed into a ring buffer the predictor and the steps read).
//! - **batch** mode groups frames into batches of `batch` and predicts and adapts per batch,
//!   the protocol of the TTA literature; a frame's result arrives when its batch is complete.
//!
//! [`StreamRunner`] moves a [`StreamSession`] to a worker thread: producers push frames from any
//! thread, and when they outpace the GPU the newest frame replaces the one waiting (the drop is
//! counted), so latency stays bounded by one frame's processing.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use thiserror::Error;

use super::frame::Frame;
use super::preprocess::{FrameError, PreprocessSpec, Preprocessor};
use crate::adapt::bn::StatsMode;
use crate::adapt::config::{AdaptConfig, Method, NormMode, StepTiming, StreamMode};
use crate::adapt::session::{Prediction, Session};
use crate::adapt::train::{Pacer, StepInput, StepPlan};
use crate::engine::{Engine, Model};
use crate::gpu::{GpuContext, GpuError};
use crate::tensor::Tensor;

mod checkpoint;

/// Why a frame produced no result. The stream itself goes on.
#[derive(Debug, Error)]
pub enum StreamError {
    #[error("frame {index}: {source}")]
    Frame { index: u64, source: FrameError },
    #[error("frames {first}..={last}: {source}")]
    Adapt { first: u64, last: u64, source: Box<crate::Error> },
    #[error("source model: {0}")]
    Source(Box<crate::Error>),
    #[error("the preprocessed input has shape {got:?}, the model takes {expected}")]
    Input { got: Vec<usize>, expected: String },
    #[error("the model has no output to predict from")]
    NoOutput,
    #[error("the stream worker thread panicked")]
    Worker,
}

/// One frame's result: its index in the stream, the top-k classes with their probabilities,
/// the source model's top-1 when [`StreamOptions::source_prediction`] asked for it, the latency,
/// and whether a step ran after it.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameResult {
    /// The frame's position in the stream (counting every pushed frame, dropped ones included).
    pub index: u64,
    /// The producer's timestamp, carried through.
    pub timestamp_us: i64,
    /// The `top_k` most probable classes, most probable first.
    pub top_k: Vec<(usize, f32)>,
    /// The unadapted (source) model's top class and probability, when asked for.
    pub source_top: Option<(usize, f32)>,
    /// From the frame's arrival to its result (batch mode includes the wait for the batch).
    pub latency_ms: f32,
    /// Whether a gradient step came with this frame. Frame mode with background steps (the
    /// default): a step landed just before this frame's prediction (it started `adapt_every`
    /// frames earlier); inline steps: one ran right after it. Batch mode: on its batch.
    pub adapted: bool,
    /// The loss of that step, if one ran.
    pub loss: Option<f32>,
    /// The parameter guard refused the update this frame led to (its step, or in frame mode its
    /// RBN statistics update) because it would have written NaN or infinity: the session is as
    /// it was before. Counted by [`StreamSession::skipped_steps`].
    pub skipped: bool,
    /// Method `auto`: the diagnostics and decision of the batch (frame mode: of the window step
    /// that ran with this frame).
    pub auto: Option<crate::adapt::methods::auto::Diagnostics>,
    /// Frame mode, method `auto`: `top_k` was re-ranked by a prior, because the latest decision
    /// judged the labels correlated (the recent frames' classes,
    /// [`FramePrior`](crate::adapt::methods::auto::FramePrior)) or shifted (auto's estimate q̂ of
    /// the stream's class prior, as a label-shifted batch is corrected).
    pub prior_corrected: bool,
}

/// A background step that [`StreamSession::finish`] landed: no frame was left to report it, so
/// its outcome is kept here ([`StreamSession::finished_step`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LandedStep {
    /// Whether a gradient step updated the parameters (`auto` may decide not to step).
    pub adapted: bool,
    /// The step's loss, if one ran.
    pub loss: Option<f32>,
    /// The parameter guard refused its update.
    pub skipped: bool,
    /// Method `auto`: the window's diagnostics and decision.
    pub auto: Option<crate::adapt::methods::auto::Diagnostics>,
}

impl FrameResult {
    /// The predicted class.
    pub fn class(&self) -> usize {
        self.top_k.first().map(|t| t.0).unwrap_or(0)
    }
}

/// Stream settings besides the adaptation config's `[stream]` section.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// Classes per result.
    pub top_k: usize,
    /// Also run the unadapted model on every frame (for comparisons).
    pub source_prediction: bool,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions { top_k: 5, source_prediction: false }
    }
}

struct Pending {
    index: u64,
    timestamp_us: i64,
    arrived: Instant,
}

/// A model adapting on a stream of frames. `[stream]` in the config picks the protocol: frame
/// mode (the default, what a phone runs: each frame's prediction at once, a step every
/// `adapt_every` frames on the window of recent frames) or batch mode (frames are gathered into
/// batches; each batch is predicted and adapted on together).
///
/// ```no_run
/// use acclimate::{Config, Frame, GpuContext, Model, Stream, StreamOptions};
/// let ctx = GpuContext::new()?;
/// let model = Model::load("svhn.onnx".as_ref())?;
/// let mut stream = Stream::new(&ctx, model, Config::default(), "size=32".parse()?, StreamOptions::default())?;
/// for _ in 0..100 {
///     let frame = Frame::rgb8(64, 64, vec![90; 64 * 64 * 3]); // from the camera
///     for r in stream.push(&frame)? {
///         println!("frame {}: {:?}", r.index, r.top_k);
///     }
/// }
/// for r in stream.finish()? { // batch mode: the last, partial batch
///     println!("frame {}: {:?}", r.index, r.top_k);
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct StreamSession {
    /// Behind a lock: frame mode's background steps run on a worker thread.
    session: Arc<Mutex<Session>>,
    /// The session's config and model graph (read without the lock).
    config: AdaptConfig,
    graph: Arc<crate::ir::Graph>,
    ctx: GpuContext,
    /// Frame mode with background steps ([`StepTiming::Background`]): the frames' forward
    /// program, on the session's buffers, run beside a step in flight.
    background: bool,
    predictor: Option<StepPlan>,
    /// Frame mode, background steps: how many pipelines of the step programs were compiled when
    /// the stream was made ([`Session::step_warmer`]).
    warmed: Option<usize>,
    /// Background steps: the window on the GPU (made on the first frame).
    gpu_ring: Option<GpuRing>,
    inflight: Option<InFlight>,
    /// The step `finish` landed with no frame left to report it.
    finished_step: Option<LandedStep>,
    /// Statistics updates of the predictor the guard refused (added to the session's count).
    predictor_skips: u64,
    /// The session's count of refused updates as of the last landed step.
    session_skips: u64,
    /// The least time a frame's forward took with no step beside it (ms).
    prediction_ms: f64,
    /// The GPU time the last background step got between two frames (ms, [`Pacer::idle_ms`]).
    idle_ms: f64,
    pre: Preprocessor,
    source: Option<Engine>,
    options: StreamOptions,
    /// Frame mode: the preprocessed frames of the window, oldest first.
    ring: VecDeque<Vec<f32>>,
    /// Frame mode: the most recent frames a step takes when the whole window does not fit the
    /// device ([`StreamSession::step_frames_cap`]).
    step_cap: Option<usize>,
    /// Batch mode: the most frames predicted and adapted on at once when a whole batch does not
    /// fit the device ([`StreamSession::batch_frames_cap`]).
    batch_cap: Option<usize>,
    since_step: usize,
    /// Batch mode: the frames of the batch being filled, and their preprocessed rows.
    pending: Vec<(Pending, Vec<f32>)>,
    next_index: u64,
    frame_len: usize,
    frame_shape: Vec<usize>,
    steps: u64,
    /// Frame mode, method `auto`: the recent-class prior (made on the first frame, when the
    /// class count is known), whether the latest decision judged the labels correlated, and the
    /// class-prior estimate when it judged them shifted.
    frame_prior: FramePriorState,
}

/// [`StreamSession`]'s recent-class prior (frame mode, method `auto`).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct FramePriorState {
    /// Frame mode with method `auto`.
    pub on: bool,
    pub prior: Option<crate::adapt::methods::auto::FramePrior>,
    pub correlated: bool,
    /// The latest decision's window stepped with its own statistics alone (the inputs' shift
    /// dominated it, or the source statistics biased the predictions): frames are normalised
    /// with the recent frames' statistics (frame weight 1) instead of the source's.
    pub dominated: bool,
    /// The latest decision judged the labels shifted: the session's class-prior estimate q̂ then.
    pub label_prior: Option<Vec<f64>>,
}

/// Frame mode's window on the GPU (background steps): the preprocessed frames in a ring of
/// `capacity` rows, the snapshot a step reads, and a one-row staging buffer for the source
/// model's comparison. Made once per stream.
struct GpuRing {
    rows: wgpu::Buffer,
    snapshot: wgpu::Buffer,
    row_staging: wgpu::Buffer,
    capacity: usize,
    /// The next slot written and how many slots hold frames.
    head: usize,
    len: usize,
}

impl GpuRing {
    fn new(ctx: &GpuContext, capacity: usize, row_bytes: u64) -> Result<GpuRing, GpuError> {
        let bytes = capacity as u64 * row_bytes;
        ctx.check_buffer(|| format!("the window of {capacity} frames"), bytes, true)?;
        let make = |label: &str, usage: wgpu::BufferUsages| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage,
                mapped_at_creation: false,
            })
        };
        use wgpu::BufferUsages as U;
        Ok(GpuRing {
            rows: make("frame ring", U::STORAGE | U::COPY_SRC | U::COPY_DST),
            snapshot: make("window snapshot", U::STORAGE | U::COPY_SRC | U::COPY_DST),
            row_staging: crate::plan::staging(ctx, row_bytes),
            capacity,
            head: 0,
            len: 0,
        })
    }
}

/// The frames a frame-mode step takes: host rows (inline steps) or a GPU snapshot of the ring
/// (background steps), oldest first.
enum Window<'a> {
    Host(&'a [Vec<f32>]),
    Gpu { snapshot: &'a wgpu::Buffer, count: usize },
}

impl Window<'_> {
    fn len(&self) -> usize {
        match self {
            Window::Host(rows) => rows.len(),
            Window::Gpu { count, .. } => *count,
        }
    }
}

/// A frame-mode step running on a worker thread ([`StepTiming::Background`]).
struct InFlight {
    handle: JoinHandle<(Result<Prediction, StreamError>, Option<usize>)>,
    pacer: Arc<Pacer>,
    /// Set by the worker once it has released the session: whether a gradient step ran.
    done: Arc<(Mutex<Option<bool>>, Condvar)>,
    /// The frame before whose prediction the step lands.
    due: u64,
    /// A stream state was saved while it ran: it is in that state, so the frame it lands
    /// before does not report it (a stream loaded from the state reports nothing there either).
    silenced: std::sync::atomic::AtomicBool,
}

impl InFlight {
    /// Lets the step write its update and waits until it has released the session; returns
    /// whether a gradient step ran.
    fn settle(&self) -> bool {
        self.pacer.release();
        let (lock, cv) = &*self.done;
        let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(stepped) = *g {
                return stepped;
            }
            g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The most a frame-mode prediction's mean and variance move from the source statistics toward
/// the evidence of the recent frames (`bn_frame`): 0, so a frame is predicted with the source
/// statistics and only the gradient step adapts. Measured with `tools/frame_stats_sweep.py`
/// (MobileNetV2, the carphone clip clean and compressed, 120 frames; agreement of the clean
/// clip's predictions with the unadapted model's, then of the compressed clip's with the clean
/// predictions, where the unadapted model has 23.3 %): the statistics of one scene's frames are
/// its content, not a domain, and every weight tried loses — 0.02 on every layer 85.8 % / 6.7 %;
/// 0.005 with the 7×7 layers kept at the source 98.3 % / 20.0 %; the variance alone at 0.05
/// 97.5 % / 19.2 %; RBN (an EMA of single frames, momentum 0.05) 0 % / 0 %. A caller that has
/// evidence of a covariate shift (a shift score) can raise it through [`StatsMode::Frame`];
/// method `auto` sets it to 1 while its latest window found the inputs' shift dominating
/// (`StreamSession::apply_frame_weight`): the window's own statistics, not the scene's
/// content, decided that.
pub const FRAME_ALPHA: f32 = 0.0;

/// Layers whose map has fewer values per channel than this keep the source statistics in frame
/// mode whatever the weight: MobileNetV2's 7×7 maps (49 values) hold one frame's class
/// evidence, and their frame statistics collapse it (RBN on only the 14×14 and 7×7 layers: 0.8 %
/// agreement with the unadapted model on the clean clip; `frame_stats_sweep.py planes`).
pub const FRAME_MIN_PLANE: usize = 64;

/// The frame protocol's statistics for a stream with evidence window `window` (frames): each
/// prediction adds its frame to the evidence.
pub fn frame_stats(window: usize) -> StatsMode {
    StatsMode::Frame {
        alpha_mean: FRAME_ALPHA,
        alpha_var: FRAME_ALPHA,
        window: window.clamp(1, u32::MAX as usize) as u32,
        min_plane: FRAME_MIN_PLANE,
    }
}

/// Softmax of each row of `logits` [B, C] (or the rows of `probs` as they are).
fn probabilities(p: &Prediction) -> Tensor {
    if let Some(probs) = &p.probs {
        return probs.clone();
    }
    softmax_rows(&p.logits)
}

/// The class count of a classifier's output of `shape` ([N, C] or [N, C, 1, …, 1]).
fn classes_of(shape: &[usize]) -> usize {
    crate::tensor::class_rows_shape(shape).last().copied().unwrap_or(1).max(1)
}

fn softmax_rows(logits: &Tensor) -> Tensor {
    let c = classes_of(&logits.shape);
    let mut out = logits.to_f32_vec();
    for row in out.chunks_mut(c) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut s = 0.0;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            s += *v;
        }
        for v in row.iter_mut() {
            *v /= s;
        }
    }
    Tensor::f32(logits.shape.clone(), out)
}

fn top_k(row: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    // Stable: equal probabilities keep class order, so the top-1 is the first argmax.
    idx.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap_or(std::cmp::Ordering::Equal));
    idx.into_iter().take(k.max(1)).map(|i| (i, row[i])).collect()
}

impl StreamSession {
    /// A stream over `model` adapted as `config` says (`[stream]` picks the protocol), with
    /// frames preprocessed as `spec` says.
    pub fn new(
        ctx: &GpuContext,
        model: Model,
        config: AdaptConfig,
        spec: PreprocessSpec,
        options: StreamOptions,
    ) -> crate::Result<StreamSession> {
        // A model that takes [N, H, W, C] gets its frames channels last (unless the spec says).
        let spec = spec.for_input(&model.input_shape());
        let pre = Preprocessor::new(ctx, spec);
        let frame_shape = pre.output_shape(1);
        if let Some(dims) = model.graph.inputs.first().and_then(|i| i.dims.as_ref()) {
            let fixed: Vec<Option<usize>> =
                dims.iter().map(|d| if let crate::ir::Dim::Fixed(n) = d { Some(*n) } else { None }).collect();
            let ok = fixed.len() == frame_shape.len()
                && fixed.iter().zip(&frame_shape).skip(1).all(|(d, &s)| d.is_none_or(|d| d == s));
            if !ok {
                return Err(StreamError::Input { got: frame_shape, expected: format!("{dims:?}") }.into());
            }
        }
        let source = options.source_prediction.then(|| Engine::new(ctx, model.clone()));
        let graph = model.graph.clone();
        // `auto` in frame mode steps at its learning rate scaled for the overlapping windows
        // (`auto::frame_lr_scale`).
        let mut session_config = config.clone();
        if config.adapt.method == Method::Auto {
            session_config.auto.lr *= crate::adapt::methods::auto::frame_lr_scale(&config.stream);
        }
        let session = Session::new(ctx, model, session_config).map_err(|e| StreamError::Adapt {
            first: 0,
            last: 0,
            source: Box::new(e),
        })?;
        // Background steps need a prediction that reads nothing a step writes before its update:
        // no output stage (its running estimate moves with every step), no episodic reset.
        let background = config.stream.mode == StreamMode::Frame
            && config.stream.steps == StepTiming::Background
            && config.adapt.method.updates_parameters()
            && config.adapt.method != Method::Lame
            && !config.adapt.episodic
            && !session.has_output_stage();
        // ... and a window that fits one GPU buffer (the ring the frames are preprocessed into).
        let ring_bytes = (config.stream.window.max(1) * frame_shape.iter().product::<usize>()) as u64 * 4;
        let limits = ctx.limits();
        let fits = ring_bytes <= limits.max_buffer_size && ring_bytes <= limits.max_storage_buffer_binding_size;
        if background && !fits {
            log::info!(
                "frame mode: a window of {} frames ({ring_bytes} bytes) does not fit one buffer on this device: \
                 steps run inline",
                config.stream.window
            );
        }
        let background = background && fits;
        // The step programs' pipelines are created now, with the stream, rather than by the first
        // step of each window size on the step's thread, where a driver that compiles at pipeline
        // creation (Vulkan and Metal drivers of GPUs) makes the frame that step lands before wait
        // for the compiler. Lavapipe compiles at a pipeline's first dispatch instead: there the
        // creation costs 0.3 s at the start of a MobileNetV2 ETA stream and the first run of
        // each step still carries the compilation (README, "Steps that never stall").
        let warmed = background.then(|| {
            let shapes = step_shapes(config.stream.window, config.stream.adapt_every, &frame_shape);
            session.step_warmer(&shapes, true).run()
        });
        // The step on the window keeps the method's batch statistics over the window. Stepping
        // with the frame statistics (the source's) instead, to match the predictions, collapsed
        // ETA (SGD 2.5e-4, demo_video.toml) and TENT to one class within a step or two (77.5 %
        // agreement on the clean carphone clip, 7.5 % on the compressed one; with the window's
        // statistics 100 % and 25.0 %, the unadapted model's): with fixed statistics a scale or
        // bias change is not renormalised by the next layer, so the learning rates tuned for
        // batch statistics are far too large.

        let frame_len = frame_shape.iter().product();
        let frame_prior_on = config.stream.mode == StreamMode::Frame && config.adapt.method == Method::Auto;
        Ok(StreamSession {
            session: Arc::new(Mutex::new(session)),
            config,
            graph,
            ctx: ctx.clone(),
            background,
            predictor: None,
            warmed,
            gpu_ring: None,
            inflight: None,
            finished_step: None,
            predictor_skips: 0,
            session_skips: 0,
            prediction_ms: 0.0,
            idle_ms: 0.0,
            pre,
            source,
            options,
            ring: VecDeque::new(),
            step_cap: None,
            batch_cap: None,
            since_step: 0,
            pending: Vec::new(),
            next_index: 0,
            frame_len,
            frame_shape,
            steps: 0,
            frame_prior: FramePriorState { on: frame_prior_on, ..Default::default() },
        })
    }

    /// Classes a frame's prediction is taken among before [`StreamSession::frame_prior_top`]
    /// keeps the `top_k` reported ones.
    fn internal_top_k(&self) -> usize {
        match self.frame_prior.on {
            true => self.options.top_k.max(crate::adapt::methods::auto::FramePrior::TOP),
            false => self.options.top_k,
        }
    }

    /// Frame mode, method `auto`: the frame predictor's weight of the recent frames' statistics,
    /// 1 while the latest decision found the inputs' shift dominating (the window's statistics
    /// made the source model far more certain than the source statistics: the USPS network on
    /// contrast-reduced digits, 19.2 % with the source statistics) or the source statistics
    /// biasing the predictions (its window stepped with α = 1), else [`FRAME_ALPHA`].
    pub(crate) fn apply_frame_weight(&self) {
        if let Some(p) = &self.predictor {
            p.set_frame_alpha(&self.ctx, if self.frame_prior.dominated { 1.0 } else { FRAME_ALPHA });
        }
    }

    /// Frame mode, method `auto`: notes the decision of a window step, with the session's
    /// class-prior estimate after it (`label_prior`, read only when the decision needs it).
    fn note_decision(
        &mut self,
        d: Option<&crate::adapt::methods::auto::Diagnostics>,
        label_prior: impl FnOnce() -> Option<Vec<f64>>,
    ) {
        if let Some(d) = d {
            let state = &mut self.frame_prior;
            // Source predictions too uncertain for an output stage, or a window the inputs'
            // shift dominated (it stepped): frames are not corrected.
            state.correlated = d.correlated && !d.unjudged && !d.uncertain && !d.dominated;
            state.label_prior = match d.label_shift && !d.correlated && !d.uncertain && !d.dominated && state.on {
                true => label_prior(),
                false => None,
            };
            // The window stepped with its own statistics alone (α = 1; its inputs' shift
            // dominated, the source statistics biased the predictions or diverged from the
            // window's own): the frames follow.
            state.dominated = (d.dominated || d.source_biased || d.diverged) && state.on;
            self.apply_frame_weight();
        }
    }

    /// Frame mode, method `auto`: `top` (the frame's [`StreamSession::internal_top_k`] classes
    /// of `classes`) re-ranked by the recent-class prior when the latest decision judged the
    /// labels correlated, or by the class-prior estimate q̂ when it judged them shifted; the
    /// recent-class prior then takes the frame. Returns the `top_k` classes to report and whether
    /// they were re-ranked.
    fn frame_prior_top(&mut self, top: Vec<(usize, f32)>, classes: usize) -> (Vec<(usize, f32)>, bool) {
        let k = self.options.top_k;
        let state = &mut self.frame_prior;
        if !state.on {
            return (top, false);
        }
        let auto = &self.config.auto;
        let prior = state.prior.get_or_insert_with(|| crate::adapt::methods::auto::FramePrior::new(classes));
        let (mut out, corrected) = match (&state.label_prior, state.correlated) {
            (_, true) if auto.frame_prior_power > 0.0 => (prior.correct(&top, auto.frame_prior_power), true),
            (Some(q), false) => (crate::adapt::methods::auto::reweight(q, &top, 1.0), true),
            _ => (top.clone(), false),
        };
        prior.observe(&top, auto.frame_prior_momentum);
        out.truncate(k);
        (out, corrected)
    }

    /// The frame preprocessor (its GPU objects are reused from frame to frame).
    pub fn preprocessor(&self) -> &Preprocessor {
        &self.pre
    }

    /// The adaptation session (parameters, state files, reset). A background step in flight
    /// (frame mode) writes its update first and is waited for: what the session shows includes
    /// every step started so far.
    pub fn session(&self) -> MutexGuard<'_, Session> {
        if let Some(f) = &self.inflight {
            f.settle();
        }
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`StreamSession::session`], to change it (load a state, reset).
    pub fn session_mut(&mut self) -> MutexGuard<'_, Session> {
        self.session()
    }

    /// The session, with no step in flight (the caller holds the stream mutably, so none starts).
    fn locked(&self) -> MutexGuard<'_, Session> {
        self.session()
    }

    /// Whether this stream's steps run in the background ([`StepTiming::Background`]): frame
    /// mode asked for it, the method has gradient steps and no output stage, no episodic reset,
    /// and the window fits one GPU buffer.
    pub fn background_steps(&self) -> bool {
        self.background
    }

    /// Waits for the step in flight (if any), letting it write its update now; returns its
    /// outcome and counts its step.
    fn land(&mut self) -> Option<Result<Prediction, StreamError>> {
        let f = self.inflight.take()?;
        self.idle_ms = f.pacer.idle_ms();
        f.pacer.release();
        let (result, cap) = f.handle.join().unwrap_or((Err(StreamError::Worker), None));
        if cap.is_some() {
            self.step_cap = cap;
        }
        if let Ok(p) = &result {
            self.steps += p.auto.as_ref().is_none_or(|d| d.stepped) as u64;
        }
        let skips = self.locked().steps_skipped();
        self.session_skips = skips;
        Some(result)
    }

    /// The background step that [`StreamSession::finish`] landed, which no frame reported
    /// (`None`: there was none, or a saved state already held it).
    pub fn finished_step(&self) -> Option<&LandedStep> {
        self.finished_step.as_ref()
    }

    /// Gradient steps taken on the stream.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Updates the parameter guard refused on this stream's session (steps and statistics
    /// updates that would have written NaN or infinity; see [`FrameResult::skipped`]).
    pub fn skipped_steps(&self) -> u64 {
        // With a step in flight: the count as of the last landing (asking must not land it).
        let session = match &self.inflight {
            Some(_) => self.session_skips,
            None => self.locked().steps_skipped(),
        };
        session + self.predictor_skips
    }

    /// Frames pushed so far (the next frame's index).
    pub fn frames(&self) -> u64 {
        self.next_index
    }

    /// Counts a frame that never reached the session (dropped by a producer), so indices keep
    /// matching the producer's frame count.
    pub fn skip(&mut self) {
        self.next_index += 1;
    }

    fn mode(&self) -> StreamMode {
        self.config.stream.mode
    }

    /// The statistics a single frame is predicted with: source-anchored ([`frame_stats`]), unless
    /// the method predicts with the source statistics (source, lame) or the config names BN-α or
    /// the source statistics.
    fn frame_norm(&self) -> StatsMode {
        let cfg = &self.config;
        match (cfg.adapt.method, cfg.adapt.norm) {
            (Method::Source, None) | (_, Some(NormMode::Source)) => StatsMode::Source,
            (_, Some(NormMode::Alpha)) => StatsMode::Alpha { alpha: cfg.adapt.norm_alpha },
            _ => match (frame_stats(cfg.stream.window), self.frame_prior.dominated) {
                // Inline steps predict with the session's program for this mode (background ones
                // with the stream's predictor, whose weight `apply_frame_weight` sets).
                (StatsMode::Frame { window, min_plane, .. }, true) => {
                    StatsMode::Frame { alpha_mean: 1.0, alpha_var: 1.0, window, min_plane }
                }
                (mode, _) => mode,
            },
        }
    }

    fn output_only(&self) -> bool {
        self.config.adapt.method == Method::Lame
    }

    fn batch_tensor(&self, rows: &[&[f32]]) -> Tensor {
        let mut shape = self.frame_shape.clone();
        shape[0] = rows.len();
        let mut data = Vec::with_capacity(rows.len() * self.frame_len);
        for r in rows {
            data.extend_from_slice(r);
        }
        Tensor::f32(shape, data)
    }

    fn source_top(&mut self, x: &Tensor) -> Result<Option<Vec<(usize, f32)>>, StreamError> {
        let Some(engine) = self.source.as_mut() else { return Ok(None) };
        let outs = engine.run(std::slice::from_ref(x)).map_err(|e| StreamError::Source(Box::new(e)))?;
        let Some(logits) = outs.into_iter().next() else { return Err(StreamError::NoOutput) };
        // A model whose output is already the softmax of its logits is not normalised again.
        let graph = &engine.model().graph;
        let probabilities = graph.softmax_head().is_some_and(|(node, _)| match &node.op {
            crate::ops::Op::Softmax(a) => a.normalises_rows(&logits.shape),
            _ => false,
        });
        let probs = if probabilities { logits } else { softmax_rows(&logits) };
        let c = classes_of(&probs.shape);
        Ok(Some(probs.to_f32_vec().chunks(c).map(|r| top_k(r, 1)[0]).collect()))
    }

    /// Pushes one frame. Frame mode returns its result; batch mode returns the results of a
    /// batch when this frame completes it (else nothing). A bad frame is an error for that
    /// frame only.
    pub fn push(&mut self, frame: &Frame) -> crate::Result<Vec<FrameResult>> {
        let arrived = Instant::now();
        let index = self.next_index;
        self.next_index += 1;
        let meta = Pending { index, timestamp_us: frame.timestamp_us, arrived };
        if self.background {
            // The frame stays on the GPU: preprocessed into the window's ring, predicted from there.
            return Ok(vec![self.push_frame_background(meta, frame)?]);
        }
        let x = self.pre.run(std::slice::from_ref(frame)).map_err(|source| StreamError::Frame { index, source })?;
        let row = x.to_f32_vec();
        Ok(match self.mode() {
            StreamMode::Frame => vec![self.push_frame(meta, row)?],
            StreamMode::Batch => {
                self.pending.push((meta, row));
                if self.pending.len() >= self.config.stream.batch { self.flush()? } else { Vec::new() }
            }
        })
    }

    /// Batch mode: predicts and adapts on the frames of an incomplete last batch. Frame mode:
    /// lands a background step still in flight (its update is in the session afterwards).
    /// Such a step is reported by [`StreamSession::finished_step`] (unless a saved state
    /// already holds it).
    pub fn finish(&mut self) -> crate::Result<Vec<FrameResult>> {
        let silenced = self.inflight.as_ref().is_some_and(|f| f.silenced.load(std::sync::atomic::Ordering::SeqCst));
        if let Some(r) = self.land() {
            let p = r?;
            if !silenced {
                self.finished_step = Some(LandedStep {
                    adapted: p.auto.as_ref().is_none_or(|d| d.stepped),
                    loss: p.loss,
                    skipped: p.skipped,
                    auto: p.auto,
                });
            }
        }
        if self.pending.is_empty() { Ok(Vec::new()) } else { Ok(self.flush()?) }
    }

    fn push_frame(&mut self, meta: Pending, row: Vec<f32>) -> Result<FrameResult, StreamError> {
        let window = self.config.stream.window;
        let adapt_every = self.config.stream.adapt_every;
        let index = meta.index;
        let x = self.batch_tensor(&[&row]);
        let source_top = self.source_top(&x)?.and_then(|v| v.into_iter().next());
        self.ring.push_back(row);
        while self.ring.len() > window {
            self.ring.pop_front();
        }
        let adapt_err = |e| StreamError::Adapt { first: index, last: index, source: Box::new(e) };
        // The frame's reported classes: re-ranked by auto's recent-class prior on the frame path.
        let (mut reported, mut prior_corrected) = (Vec::new(), false);
        let frame_path = !self.output_only();
        let (probs, adapted, loss, skipped, auto) = if self.output_only() {
            // LAME: the frame's prediction is its row of the output stage over the window.
            let rows: Vec<&[f32]> = self.ring.iter().map(|r| r.as_slice()).collect();
            let batch = self.batch_tensor(&rows);
            let p = self.locked().step(&batch).map_err(adapt_err)?;
            let probs = probabilities(&p);
            let c = classes_of(&probs.shape);
            let last = probs.to_f32_vec()[(rows.len() - 1) * c..rows.len() * c].to_vec();
            (last, false, None, p.skipped, None)
        } else {
            let norm = self.frame_norm();
            let p = self.locked().predict_with(&x, norm).map_err(adapt_err)?;
            let probs = probabilities(&p).to_f32_vec();
            self.since_step += 1;
            let mut adapted = false;
            let mut loss = None;
            let mut skipped = p.skipped;
            let mut auto = None;
            let (top, corrected) = self.frame_prior_top(top_k(&probs, self.internal_top_k()), probs.len());
            prior_corrected = corrected;
            reported = top;
            if self.config.adapt.method.updates_parameters() && self.since_step >= adapt_every && self.ring.len() >= 2 {
                let rows: Vec<Vec<f32>> = self.ring.iter().cloned().collect();
                let session = self.session.clone();
                let mut guard = session.lock().unwrap_or_else(|e| e.into_inner());
                let step =
                    step_on_window(&mut guard, Window::Host(&rows), &self.frame_shape, &mut self.step_cap, index)?;
                let q = guard.auto_label_prior();
                drop(guard);
                self.since_step = 0;
                // auto decides per window whether a gradient step runs.
                adapted = step.auto.as_ref().is_none_or(|d| d.stepped);
                self.steps += adapted as u64;
                loss = step.loss;
                skipped |= step.skipped;
                auto = step.auto;
                self.note_decision(auto.as_ref(), || q);
            }
            (probs, adapted, loss, skipped, auto)
        };
        if !frame_path {
            reported = top_k(&probs, self.options.top_k);
        }
        Ok(FrameResult {
            index,
            timestamp_us: meta.timestamp_us,
            top_k: reported,
            source_top,
            latency_ms: meta.arrived.elapsed().as_secs_f32() * 1000.0,
            adapted,
            loss,
            skipped,
            auto,
            prior_corrected,
        })
    }

    /// Frame mode with background steps: how many pipelines of the step programs the stream
    /// compiled when it was made, ahead of its first steps (`None`: other modes).
    pub fn warmed_pipelines(&self) -> Option<usize> {
        self.warmed
    }

    /// The most frames a frame-mode step takes, when the device's limits made it smaller than
    /// the window (`None`: the whole window).
    pub fn step_frames_cap(&self) -> Option<usize> {
        self.step_cap
    }

    /// Frame mode with background steps: lands the step due before this frame, preprocesses
    /// the frame into its slot of the window's ring on the GPU, predicts it from there with the
    /// predictor (beside any step in flight; only the logits come back), and starts the next
    /// step when one is due, on a snapshot of the ring taken on the GPU.
    fn push_frame_background(&mut self, meta: Pending, frame: &Frame) -> Result<FrameResult, StreamError> {
        let (window, adapt_every) = (self.config.stream.window.max(1), self.config.stream.adapt_every);
        let index = meta.index;
        let landed = match self.inflight.as_ref().filter(|f| f.due <= index) {
            Some(f) => {
                log::debug!("frame {index}: landing the step (finished: {})", f.handle.is_finished());
                let silenced = f.silenced.load(std::sync::atomic::Ordering::SeqCst);
                self.land().transpose()?.filter(|_| !silenced)
            }
            None => None,
        };
        // A step in flight takes this frame's share of its chunks while the frame runs.
        let busy = self.inflight.as_ref().map(|f| FrameBusy::begin(f.pacer.clone(), f.due - index));
        let adapt_err = |e: crate::Error| StreamError::Adapt { first: index, last: index, source: Box::new(e) };
        let row_bytes = self.frame_len as u64 * 4;
        if self.gpu_ring.is_none() {
            self.gpu_ring = Some(GpuRing::new(&self.ctx, window, row_bytes).map_err(|e| adapt_err(e.into()))?);
        }
        let ring = self.gpu_ring.as_ref().expect("made above");
        let slot = ring.head;
        let mut encoder =
            self.ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("frame into ring") });
        self.pre
            .record(&mut encoder, std::slice::from_ref(frame), &ring.rows, slot)
            .map_err(|source| StreamError::Frame { index, source })?;
        let offset = slot as u64 * row_bytes;
        let source_top = match self.source.is_some() {
            // The unadapted model runs on the host's copy of the frame (a comparison, not the
            // frame path).
            true => {
                encoder.copy_buffer_to_buffer(&ring.rows, offset, &ring.row_staging, 0, row_bytes);
                self.ctx.queue.submit([encoder.finish()]);
                let row = crate::plan::read_buffer(&self.ctx, &ring.row_staging, self.frame_len)
                    .map_err(|e| adapt_err(e.into()))?;
                let x = self.batch_tensor(&[&row]);
                self.source_top(&x)?.and_then(|v| v.into_iter().next())
            }
            false => {
                self.ctx.queue.submit([encoder.finish()]);
                None
            }
        };
        if self.predictor.is_none() {
            let norm = self.frame_norm();
            let shape = self.frame_shape.clone();
            // Only the frame's top-k comes back from the GPU (up to 32 classes; more: the logits).
            let k = self.internal_top_k();
            let k = if k <= 32 { k.max(1) } else { 0 };
            let plan = self.locked().forward_plan(&shape, norm, k).map_err(adapt_err)?;
            self.predictor = Some(plan);
            self.apply_frame_weight();
        }
        let internal_k = self.internal_top_k();
        let predictor = self.predictor.as_ref().expect("built above");
        let ring = self.gpu_ring.as_mut().expect("made above");
        let t = Instant::now();
        let out = predictor
            .run_paced(&self.ctx, StepInput::Gpu { buffer: &ring.rows, offset }, true, None)
            .map_err(|e| adapt_err(e.into()))?;
        let took = t.elapsed().as_secs_f64() * 1e3;
        if busy.is_none() {
            // The prediction's own time (no step chunk beside it): the unit of the step's chunks.
            self.prediction_ms = if self.prediction_ms > 0.0 { self.prediction_ms.min(took) } else { took };
        }
        let work = predictor.work();
        if out.skipped {
            self.predictor_skips += 1;
            log::warn!("non-finite statistics from frame {index}: the statistics update was skipped");
        }
        let classes = predictor.output_classes();
        let top = match out.top.and_then(|t| t.into_iter().next()) {
            Some(top) => top,
            None => {
                let probs = out.probs.unwrap_or_else(|| softmax_rows(&out.logits)).to_f32_vec();
                top_k(&probs, internal_k)
            }
        };
        ring.head = (slot + 1) % window;
        ring.len = (ring.len + 1).min(window);
        let ring_len = ring.len;
        // The decision of the step that landed before this frame counts for it (the step is
        // done: the session is free).
        let session = self.session.clone();
        self.note_decision(landed.as_ref().and_then(|p| p.auto.as_ref()), || {
            session.lock().unwrap_or_else(|e| e.into_inner()).auto_label_prior()
        });
        let (top, prior_corrected) = self.frame_prior_top(top, classes);
        self.since_step += 1;
        if self.since_step >= adapt_every && ring_len >= 2 {
            // The previous step landed at the latest above (due = its start + adapt_every); it
            // must have, before its snapshot is overwritten.
            if let Some(r) = self.land() {
                r?;
            }
            let ring = self.gpu_ring.as_ref().expect("made above");
            // The window, oldest first, into the snapshot the step reads (on the GPU, ahead of
            // the next frames' writes into the ring).
            let count = ring.len;
            let mut encoder =
                self.ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("window") });
            let oldest = (ring.head + window - count) % window;
            let first = count.min(window - oldest);
            encoder.copy_buffer_to_buffer(
                &ring.rows,
                oldest as u64 * row_bytes,
                &ring.snapshot,
                0,
                first as u64 * row_bytes,
            );
            if first < count {
                encoder.copy_buffer_to_buffer(
                    &ring.rows,
                    0,
                    &ring.snapshot,
                    first as u64 * row_bytes,
                    (count - first) as u64 * row_bytes,
                );
            }
            self.ctx.queue.submit([encoder.finish()]);
            let snapshot = ring.snapshot.clone();
            let pacer = Arc::new(Pacer::new(work, self.prediction_ms, self.idle_ms));
            let done = Arc::new((Mutex::new(None), Condvar::new()));
            let (session, shape, mut cap) = (self.session.clone(), self.frame_shape.clone(), self.step_cap);
            let (worker_pacer, worker_done) = (pacer.clone(), done.clone());
            let handle = std::thread::spawn(move || {
                // Whatever happens (a failed step, even a panic), the frames waiting on the step's
                // budget or its end are let go.
                let mut finished = Finished { pacer: worker_pacer.clone(), done: worker_done, stepped: false };
                let mut s = session.lock().unwrap_or_else(|e| e.into_inner());
                s.set_pacer(Some(worker_pacer));
                let window = Window::Gpu { snapshot: &snapshot, count };
                let r = step_on_window(&mut s, window, &shape, &mut cap, index);
                s.set_pacer(None);
                drop(s);
                finished.stepped = r.as_ref().is_ok_and(|p| p.auto.as_ref().is_none_or(|d| d.stepped));
                drop(finished);
                (r, cap)
            });
            let silenced = Default::default();
            self.inflight = Some(InFlight { handle, pacer, done, due: index + adapt_every as u64, silenced });
            self.since_step = 0;
        }
        let (adapted, loss, skipped, auto) = match landed {
            Some(p) => (p.auto.as_ref().is_none_or(|d| d.stepped), p.loss, p.skipped || out.skipped, p.auto),
            None => (false, None, out.skipped, None),
        };
        // The frame's share of the step in flight is part of its latency.
        drop(busy);
        Ok(FrameResult {
            index,
            timestamp_us: meta.timestamp_us,
            top_k: top,
            source_top,
            latency_ms: meta.arrived.elapsed().as_secs_f32() * 1000.0,
            adapted,
            loss,
            skipped,
            auto,
            prior_corrected,
        })
    }

    /// The window's frames, oldest first (read back from the GPU ring in background mode).
    pub(crate) fn window_rows(&self) -> crate::Result<Vec<Vec<f32>>> {
        let Some(ring) = self.gpu_ring.as_ref().filter(|_| self.background) else {
            return Ok(self.ring.iter().cloned().collect());
        };
        let window = ring.capacity;
        let row_bytes = self.frame_len as u64 * 4;
        let oldest = (ring.head + window - ring.len) % window;
        let staging = crate::plan::staging(&self.ctx, (ring.len.max(1) as u64) * row_bytes);
        let mut encoder =
            self.ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("window readback") });
        for i in 0..ring.len {
            let slot = (oldest + i) % window;
            encoder.copy_buffer_to_buffer(
                &ring.rows,
                slot as u64 * row_bytes,
                &staging,
                i as u64 * row_bytes,
                row_bytes,
            );
        }
        self.ctx.queue.submit([encoder.finish()]);
        let all = crate::plan::read_buffer(&self.ctx, &staging, ring.len * self.frame_len)?;
        Ok(all.chunks(self.frame_len.max(1)).map(|r| r.to_vec()).collect())
    }

    /// Replaces the window's frames (oldest first; at most `window`).
    pub(crate) fn set_window_rows(&mut self, rows: Vec<Vec<f32>>) -> crate::Result<()> {
        if !self.background {
            self.ring = rows.into();
            return Ok(());
        }
        let window = self.config.stream.window.max(1);
        let row_bytes = self.frame_len as u64 * 4;
        if self.gpu_ring.is_none() {
            self.gpu_ring = Some(GpuRing::new(&self.ctx, window, row_bytes)?);
        }
        let ring = self.gpu_ring.as_mut().expect("made above");
        for (i, r) in rows.iter().enumerate() {
            self.ctx.queue.write_buffer(&ring.rows, i as u64 * row_bytes, bytemuck::cast_slice(r));
        }
        ring.len = rows.len().min(window);
        ring.head = ring.len % window;
        Ok(())
    }

    /// Empties the window.
    pub(crate) fn clear_window(&mut self) {
        self.ring.clear();
        if let Some(r) = self.gpu_ring.as_mut() {
            r.head = 0;
            r.len = 0;
        }
    }

    /// Batch mode: predicts and adapts on the pending frames, as one batch, or in parts of
    /// [`StreamSession::batch_frames_cap`] frames when a whole batch does not fit the device.
    fn flush(&mut self) -> Result<Vec<FrameResult>, StreamError> {
        let pending = std::mem::take(&mut self.pending);
        let mut out = Vec::with_capacity(pending.len());
        let mut start = 0;
        while start < pending.len() {
            let take = self.batch_cap.map_or(pending.len() - start, |c| c.min(pending.len() - start));
            match self.flush_part(&pending[start..start + take]) {
                Err(e) if take > 1 && too_large(&e).is_some() => {
                    let c = take / 2;
                    log::warn!(
                        "batch mode: a batch of {take} frames does not fit the device ({}); predicting and \
                         adapting on parts of {c} frames from now on",
                        too_large(&e).map(|g| g.to_string()).unwrap_or_default()
                    );
                    self.batch_cap = Some(c);
                }
                Err(e) => return Err(e),
                Ok(rs) => {
                    out.extend(rs);
                    start += take;
                }
            }
        }
        Ok(out)
    }

    /// The most frames a batch-mode batch is predicted and adapted on at once, when the device's
    /// limits made it smaller than `[stream] batch` (`None`: the whole batch).
    pub fn batch_frames_cap(&self) -> Option<usize> {
        self.batch_cap
    }

    fn flush_part(&mut self, pending: &[(Pending, Vec<f32>)]) -> Result<Vec<FrameResult>, StreamError> {
        let (first, last) = (pending[0].0.index, pending[pending.len() - 1].0.index);
        let rows: Vec<&[f32]> = pending.iter().map(|(_, r)| r.as_slice()).collect();
        let x = self.batch_tensor(&rows);
        let source = self.source_top(&x)?;
        let p = self.locked().step(&x).map_err(|e| StreamError::Adapt { first, last, source: Box::new(e) })?;
        let adapted = match &p.auto {
            Some(d) => d.stepped,
            None => self.config.adapt.method.updates_parameters(),
        };
        if adapted {
            self.steps += 1;
        }
        let probs = probabilities(&p);
        let c = classes_of(&probs.shape);
        let probs = probs.to_f32_vec();
        Ok(pending
            .iter()
            .enumerate()
            .map(|(i, (meta, _))| FrameResult {
                index: meta.index,
                timestamp_us: meta.timestamp_us,
                top_k: top_k(&probs[i * c..(i + 1) * c], self.options.top_k),
                source_top: source.as_ref().map(|s| s[i]),
                latency_ms: meta.arrived.elapsed().as_secs_f32() * 1000.0,
                adapted,
                loss: p.loss,
                skipped: p.skipped,
                auto: p.auto.clone(),
                prior_corrected: false,
            })
            .collect())
    }
}

/// The end of a background step's worker (on drop, also when it panics): the pacer is released
/// and the step's outcome published for [`InFlight::settle`], after the session's lock is free.
struct Finished {
    pacer: Arc<Pacer>,
    done: Arc<(Mutex<Option<bool>>, Condvar)>,
    stepped: bool,
}

impl Drop for Finished {
    fn drop(&mut self) {
        self.pacer.release();
        let (lock, cv) = &*self.done;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.stepped);
        cv.notify_all();
    }
}

/// A frame in progress beside a background step ([`Pacer::frame_begin`]), ended on drop.
struct FrameBusy(Arc<Pacer>);

impl FrameBusy {
    fn begin(pacer: Arc<Pacer>, frames_left: u64) -> FrameBusy {
        pacer.frame_begin(frames_left);
        FrameBusy(pacer)
    }
}

impl Drop for FrameBusy {
    fn drop(&mut self) {
        self.0.frame_end();
    }
}

impl Drop for StreamSession {
    /// A step in flight finishes (its update lands) before the stream goes away.
    fn drop(&mut self) {
        let _ = self.land();
    }
}

/// Frame mode's step on the most recent frames of `rows` (the window). A window whose step does
/// not fit the device (an activation over `max_storage_buffer_binding_size`: MobileNetV2's
/// [32, 96, 112, 112] is 154 MB where lavapipe allows 128 MiB) steps on the most recent frames
/// that fit instead, halving until it does (at least 2), and remembers the cap in `cap`; the
/// limit is checked before anything is allocated or written, so a refused size changes nothing.
fn step_on_window(
    session: &mut Session,
    window: Window<'_>,
    frame_shape: &[usize],
    cap: &mut Option<usize>,
    index: u64,
) -> Result<Prediction, StreamError> {
    let count = window.len();
    let frame_len: usize = frame_shape[1..].iter().product();
    loop {
        let take = cap.map_or(count, |c| c.min(count));
        let mut shape = frame_shape.to_vec();
        shape[0] = take;
        let first = index + 1 - take as u64;
        let r = match &window {
            Window::Host(rows) => {
                let data: Vec<f32> = rows[count - take..].iter().flatten().copied().collect();
                session.step(&Tensor::f32(shape, data))
            }
            Window::Gpu { snapshot, .. } => {
                let offset = ((count - take) * frame_len * 4) as u64;
                session.step_input(StepInput::Gpu { buffer: snapshot, offset }, &shape)
            }
        };
        match r {
            Err(crate::Error::Gpu(GpuError::TooLarge { what, bytes, limit, .. })) if take > 2 => {
                let c = take / 2;
                log::warn!(
                    "frame mode: a step on {take} frames needs {what} of {bytes} bytes (device limit {limit}); \
                     stepping on the last {c} frames of the window from now on"
                );
                *cap = Some(c);
            }
            Err(e) => return Err(StreamError::Adapt { first, last: index, source: Box::new(e) }),
            Ok(p) => return Ok(p),
        }
    }
}

/// The batch shapes of the frame-mode steps as the window fills: `adapt_every`, 2·`adapt_every`,
/// … frames up to `window` (at least 2: a step needs two frames).
fn step_shapes(window: usize, adapt_every: usize, frame_shape: &[usize]) -> Vec<Vec<usize>> {
    let (window, every) = (window.max(1), adapt_every.max(1));
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut n = 0;
    while n < window {
        n = (n + every).min(window);
        let mut shape = frame_shape.to_vec();
        shape[0] = n.max(2);
        if !out.contains(&shape) {
            out.push(shape);
        }
    }
    out
}

/// The device-limit error of `e` when a batch was too large for the device (a buffer over its
/// binding or buffer size limit), else `None`.
fn too_large(e: &StreamError) -> Option<&GpuError> {
    match e {
        StreamError::Adapt { source, .. } | StreamError::Source(source) => match source.as_ref() {
            crate::Error::Gpu(g @ GpuError::TooLarge { .. }) => Some(g),
            _ => None,
        },
        _ => None,
    }
}

/// The producer side of a [`StreamRunner`]: push frames from any thread.
#[derive(Clone)]
pub struct FrameSender {
    slot: Arc<(Mutex<Slot>, Condvar)>,
}

#[derive(Default)]
struct Slot {
    frame: Option<Frame>,
    closed: bool,
    drops: u64,
}

impl FrameSender {
    /// Hands a frame to the worker. If the previous frame is still waiting (the producer is
    /// faster than the GPU), it is replaced and counted as dropped; returns whether that
    /// happened. Frames pushed after [`FrameSender::close`] are ignored (returns false).
    pub fn push(&self, frame: Frame) -> bool {
        let (lock, cv) = &*self.slot;
        let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
        if s.closed {
            return false;
        }
        let dropped = s.frame.replace(frame).is_some();
        if dropped {
            s.drops += 1;
        }
        cv.notify_one();
        dropped
    }

    /// Frames replaced before the worker took them.
    pub fn drops(&self) -> u64 {
        self.slot.0.lock().unwrap_or_else(|e| e.into_inner()).drops
    }

    /// Ends the stream: the worker processes the waiting frame, flushes a partial batch and
    /// stops.
    pub fn close(&self) {
        let (lock, cv) = &*self.slot;
        lock.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        cv.notify_one();
    }
}

/// A [`StreamSession`] on its own thread.
pub struct StreamRunner {
    pub frames: FrameSender,
    /// Results (and per-frame errors) in frame order.
    pub results: Receiver<crate::Result<FrameResult>>,
    worker: JoinHandle<StreamSession>,
}

impl StreamRunner {
    /// Starts the worker thread.
    pub fn spawn(mut stream: StreamSession) -> StreamRunner {
        let slot = Arc::new((Mutex::new(Slot::default()), Condvar::new()));
        let (tx, rx): (Sender<crate::Result<FrameResult>>, _) = channel();
        let worker_slot = slot.clone();
        let worker = std::thread::spawn(move || {
            let mut seen_drops = 0u64;
            loop {
                let (frame, closed) = {
                    let (lock, cv) = &*worker_slot;
                    let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
                    while s.frame.is_none() && !s.closed {
                        s = cv.wait(s).unwrap_or_else(|e| e.into_inner());
                    }
                    // Dropped frames still take an index, so results line up with the producer.
                    for _ in seen_drops..s.drops {
                        stream.skip();
                    }
                    seen_drops = s.drops;
                    (s.frame.take(), s.closed)
                };
                if let Some(f) = frame {
                    match stream.push(&f) {
                        Ok(rs) => rs.into_iter().for_each(|r| {
                            let _ = tx.send(Ok(r));
                        }),
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                } else if closed {
                    match stream.finish() {
                        Ok(rs) => rs.into_iter().for_each(|r| {
                            let _ = tx.send(Ok(r));
                        }),
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                    return stream;
                }
            }
        });
        StreamRunner { frames: FrameSender { slot }, results: rx, worker }
    }

    /// Closes the stream, waits for the worker and returns the session with its adapted state.
    pub fn join(self) -> crate::Result<StreamSession> {
        self.frames.close();
        self.worker.join().map_err(|_| StreamError::Worker.into())
    }
}
