//! The adaptation facade: a model, a config, and the adapted state on the GPU.
//!
//! Each [`Session::step`] predicts a batch and adapts on it (TENT and the baselines), returning the
//! prediction made *before* the batch's update, as the reference implementations do
//! (tta-methods.md §0.2). Parameters, normalization statistics and optimizer state live in GPU
//! buffers between steps; they are read back only when asked for.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::bn::StatsMode;
use super::config::{AdaptConfig, Method, NormMode};
pub use super::error::AdaptError;
use super::methods::auto::{self, Decision, Diagnostics};
use super::methods::{self, AfterBatch, Host, Objective, eata, label_shift};
use super::optim::OptimizerSpec;
use super::state::{self, StateError};
use super::train::{AdaptedLayer, Diagnose, StepInput, StepOutput, StepPlan, StepSpec};
use crate::engine::Model;
use crate::gpu::GpuContext;
use crate::ir::{BatchNormInfo, Graph};
use crate::plan::{PlanError, WeightStore, read_buffer, staging};
use crate::tensor::{DType, Tensor};

/// The samples of a batch a filtering method (ETA, EATA, wisdom of crowds) trained on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selection {
    /// Indices into the batch, ascending.
    pub samples: Vec<usize>,
    /// Each selected sample's loss weight (ETA/EATA: exp(E0 − E); 1 where the method does not
    /// reweight).
    pub weights: Vec<f32>,
}

/// What a batch gives back: its logits (before this batch's update) and what the step did.
///
/// ```no_run
/// # fn f(session: &mut acclimate::Session, batch: &acclimate::Tensor) -> acclimate::Result<()> {
/// let p = session.step(batch)?;
/// let classes = p.logits.shape[1];
/// let top1: Vec<usize> = p.logits.to_f32_vec().chunks(classes)
///     .map(|row| (0..classes).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap_or(0))
///     .collect();
/// if p.skipped { eprintln!("update refused: a value would have been NaN or infinite"); }
/// # let _ = top1; Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Prediction {
    /// Logits of the batch before this batch's update.
    pub logits: Tensor,
    /// The loss of the first step on this batch (methods with a gradient step).
    pub loss: Option<f32>,
    /// ETA/EATA/WoC: the samples the first step trained on and their weights; `None` for methods
    /// that do not select.
    pub selected: Option<Selection>,
    /// SAR: the EMA of the second-pass loss after this batch.
    pub ema: Option<f32>,
    /// SAR: whether the model was reset to the source after this batch.
    pub reset: bool,
    /// The output stage's probabilities [B, C] (LAME, label-shift corrections); `None`
    /// without one (the probabilities are then softmax(logits)).
    pub probs: Option<Tensor>,
    /// Method `auto`: what it saw in the batch and what it decided.
    pub auto: Option<Diagnostics>,
    /// The label-distribution estimate q̂ the batch was corrected with (label-shift modes).
    pub prior: Option<Vec<f32>>,
    /// The parameter guard refused this batch's update: a parameter, optimizer moment or
    /// running statistic it would have written was NaN or infinite (a batch that overflows inside
    /// the network, a learning rate too large for float32 arithmetic), so nothing was written
    /// and the session is as it was before the batch. Counted by [`Session::steps_skipped`].
    pub skipped: bool,
}

/// A model adapting on batches: each [`Session::step`] returns the batch's predictions and
/// updates the model as the config's method says (normalization statistics, a gradient step on
/// the BatchNorm parameters, output stages), in one GPU submission. What it learned is saved and
/// restored with [`Session::save_state`] / [`Session::load_state`], and dropped with
/// [`Session::reset`].
///
/// ```no_run
/// use acclimate::{Config, GpuContext, Model, Session, Tensor};
/// let ctx = GpuContext::new()?;
/// let config = Config::from_toml_str("[adapt]\nmethod = \"tent\"")?;
/// let mut session = Session::new(&ctx, Model::load("svhn.onnx".as_ref())?, config)?;
/// let batch = Tensor::f32(vec![16, 3, 32, 32], vec![0.0; 16 * 3 * 32 * 32]);
/// let p = session.step(&batch)?; // logits before the update, then one TENT step
/// println!("loss {:?}, steps so far {}", p.loss, session.steps_taken());
/// session.save_state("tent.safetensors".as_ref())?;
/// session.reset()?; // back to the source model
/// session.load_state("tent.safetensors".as_ref())?; // and to the adapted one
/// # Ok::<(), acclimate::Error>(())
/// ```
pub struct Session {
    ctx: GpuContext,
    model: Model,
    config: AdaptConfig,
    store: WeightStore,
    plans: HashMap<Vec<usize>, StepPlan>,
    /// Forward-only plans of [`Session::predict`], by shape and statistics mode.
    predict_plans: HashMap<(Vec<usize>, String), StepPlan>,
    spec: StepSpec,
    bns: Vec<BatchNormInfo>,
    steps_taken: u64,
    /// Steps (and RBN statistics updates) the parameter guard refused.
    steps_skipped: u64,
    /// The method's state between batches (SAR's recovery), if it keeps one.
    after: Option<Box<dyn AfterBatch>>,
    /// The model's fingerprint (a hash of every weight), computed on first save or load.
    fingerprint: std::sync::OnceLock<String>,
    /// Method `auto`'s second program family and decision state.
    auto: Option<AutoState>,
    /// Frame mode's background steps: how the steps share the GPU with the predictions.
    pacer: Option<Arc<super::train::Pacer>>,
}

/// The step programs' pipelines to compile ahead ([`Session::step_warmer`]).
pub struct StepWarmer {
    ctx: GpuContext,
    graph: Arc<Graph>,
    jobs: Vec<(Vec<usize>, StepSpec)>,
}

impl StepWarmer {
    /// Compiles them; returns how many pipelines were new to the context. A program that cannot
    /// be lowered (a window too large for the device) is skipped: the step itself reports it.
    pub fn run(self) -> usize {
        let mut n = 0;
        let begun = std::time::Instant::now();
        for (shape, spec) in &self.jobs {
            match StepPlan::warm(&self.ctx, &self.graph, shape, spec) {
                Ok(k) => n += k,
                Err(e) => log::debug!("warming the step pipelines for {shape:?}: {e}"),
            }
        }
        log::debug!(
            "step pipelines for {} programs warmed in {:.1} ms ({n} new)",
            self.jobs.len(),
            begun.elapsed().as_secs_f64() * 1e3
        );
        n
    }
}

/// Method `auto` (see [`methods::auto`]): the source-statistics programs with LAME smoothing its
/// decisions come from, and the decision state.
struct AutoState {
    spec: StepSpec,
    plans: HashMap<Vec<usize>, StepPlan>,
    /// The batch-statistics view: the source parameters normalised with the batch's own
    /// statistics, forward only, its predictions' statistics against the judging pass's
    /// ([`auto::dominated`], [`auto::Decision::batch_marginal`]); models with BatchNormalization.
    view_spec: StepSpec,
    view_plans: HashMap<Vec<usize>, StepPlan>,
    decision: Option<Decision>,
    /// The label-shift estimate q̂ ([`auto::PRIOR`]); `None`: uniform.
    prior: Option<Vec<f64>>,
    /// The samples adapted on since the start or the last reset ([`auto::EVIDENCE`]).
    evidence: f64,
    /// The model has BatchNormalization layers to adapt.
    adapts: bool,
}

impl Session {
    pub fn new(ctx: &GpuContext, model: Model, config: AdaptConfig) -> crate::Result<Session> {
        if config.gpu.self_test {
            ctx.self_test_once()?;
        }
        let graph = &model.graph;
        let bns = graph.batch_norms();
        let method = config.adapt.method;
        let norm = config.adapt.norm.unwrap_or_else(|| method.default_norm());
        let mode = match norm {
            NormMode::Source => StatsMode::Source,
            NormMode::Batch => StatsMode::Batch,
            NormMode::Ema => StatsMode::Ema { momentum: config.adapt.norm_momentum },
            NormMode::Alpha => StatsMode::Alpha { alpha: config.adapt.norm_alpha },
        };
        let def = method.def();
        // auto on a model without BatchNormalization runs the source model (and its smoothing).
        let plain = method == Method::Auto && bns.is_empty();
        let (mode, norm) = if plain { (StatsMode::Source, NormMode::Source) } else { (mode, norm) };
        // Gradient methods also adapt the affine parameters of LayerNorm, GroupNorm and
        // InstanceNorm layers (the harness's `collect_params`, SAR's LN/GN models); a model with
        // only those has no statistics to adapt, so `norm` selects nothing there.
        let affines = if method.updates_parameters() && !plain { graph.affine_norms() } else { Vec::new() };
        if bns.is_empty() && affines.is_empty() && (!def.source_model() || norm != NormMode::Source) {
            return Err(AdaptError::NoBatchNorm(format!("{method:?}").to_lowercase()).into());
        }
        let mut adapted = Vec::new();
        if method.updates_parameters() && !plain {
            let chosen = |node: &str| {
                let inc =
                    config.adapt.include.is_empty() || config.adapt.include.iter().any(|s| node.contains(s.as_str()));
                inc && !config.adapt.exclude.iter().any(|s| node.contains(s.as_str()))
            };
            for bn in bns.iter().filter(|bn| chosen(&bn.node)) {
                let node = graph.nodes.iter().position(|n| n.name == bn.node);
                adapted.push(AdaptedLayer { bn_node: node, scale: bn.scale.clone(), bias: Some(bn.bias.clone()) });
            }
            for a in affines.iter().filter(|a| chosen(&a.node)) {
                adapted.push(AdaptedLayer { bn_node: None, scale: a.scale.clone(), bias: a.bias.clone() });
            }
            if adapted.is_empty() {
                return Err(AdaptError::NothingAdapted(format!(
                    "include {:?}, exclude {:?}",
                    config.adapt.include, config.adapt.exclude
                ))
                .into());
            }
        }
        let objective = if plain { None } else { def.objective(&config, graph)? };
        let output = super::output::OutputSpec::from_config(&config, graph)?.map(Arc::new);
        let optimizer = match method {
            Method::Auto => OptimizerSpec::from_config(&auto::optimizer(&config)),
            _ => OptimizerSpec::from_config(&config.optimizer),
        };
        let spec = StepSpec {
            mode,
            adapted,
            optimizer,
            objective,
            output,
            source_affine: false,
            z_piece: 0,
            top_k: 0,
            shift_score: false,
            diagnostics: Diagnose::Off,
            fuse: true,
        };
        let auto = if method == Method::Auto {
            // LAME needs the input of a final Gemm/MatMul, and its iteration kernel 4 storage
            // buffers (more than WebGL2-class devices offer); without it, correlated batches still
            // keep out of the batch statistics and the steps (the source model predicts them).
            let buffers = ctx.limits().max_storage_buffers_per_shader_stage;
            let smoothing = if buffers < methods::lame::STORAGE_BUFFERS {
                log::info!(
                    "method auto: no LAME smoothing on this device ({buffers} storage buffers per shader stage, LAME needs {})",
                    methods::lame::STORAGE_BUFFERS
                );
                None
            } else {
                match Method::Lame.def().output_stage(&config, graph) {
                    Ok(stage) => {
                        stage.map(|s| Arc::new(super::output::OutputSpec { stages: vec![s], source_prior: None }))
                    }
                    Err(e) => {
                        log::info!("method auto: no LAME smoothing for this model ({e})");
                        None
                    }
                }
            };
            let spec = StepSpec {
                mode: StatsMode::Source,
                adapted: Vec::new(),
                optimizer: spec.optimizer,
                objective: None,
                output: smoothing,
                source_affine: true,
                z_piece: 0,
                top_k: 0,
                shift_score: true,
                diagnostics: Diagnose::Judge,
                fuse: true,
            };
            let view_spec = StepSpec {
                mode: StatsMode::Batch,
                output: None,
                shift_score: false,
                diagnostics: Diagnose::Returned,
                ..spec.clone()
            };
            Some(AutoState {
                spec,
                plans: HashMap::new(),
                view_spec,
                view_plans: HashMap::new(),
                decision: None,
                prior: None,
                evidence: 0.0,
                adapts: !plain,
            })
        } else {
            None
        };
        let after = def.after_batch(&config);
        let mut session = Session {
            ctx: ctx.clone(),
            model,
            config,
            store: WeightStore::default(),
            plans: HashMap::new(),
            predict_plans: HashMap::new(),
            spec,
            bns,
            steps_taken: 0,
            steps_skipped: 0,
            after,
            fingerprint: std::sync::OnceLock::new(),
            auto,
            pacer: None,
        };
        let config = session.config.clone();
        def.prepare(&mut session, &config)?;
        Ok(session)
    }

    /// EATA's Fisher information, once, before adaptation (tta-methods.md §2): on clean batches,
    /// in batch-statistics mode, the square of each batch-mean cross-entropy gradient with argmax
    /// pseudo-labels, averaged over the batches. Parameters do not change.
    pub fn compute_fisher(&mut self, dir: &Path) -> Result<(), AdaptError> {
        eata::compute_fisher(self, dir)
    }

    /// EATA's Fisher information by adapted parameter name (zeros before it was computed or
    /// loaded).
    pub fn fisher(&self) -> Result<Vec<(String, Tensor)>, AdaptError> {
        eata::fisher(self)
    }

    /// Saves the Fisher (one tensor per adapted parameter) as a safetensors file tied to this
    /// model's fingerprint, for `eata.fisher_file`.
    pub fn save_fisher(&self, path: &Path) -> Result<(), AdaptError> {
        eata::save_fisher(self, path)
    }

    /// Loads a Fisher saved by [`Session::save_fisher`] for the same model. Every adapted
    /// parameter must be present with its size; on any error nothing changes.
    pub fn load_fisher(&mut self, path: &Path) -> Result<(), AdaptError> {
        eata::load_fisher(self, path)
    }

    pub fn config(&self) -> &AdaptConfig {
        &self.config
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Names of the adapted parameters (ONNX initializer names), scale then bias per layer.
    pub fn adapted_parameters(&self) -> Vec<String> {
        self.spec.adapted.iter().flat_map(|a| a.names().cloned()).collect()
    }

    /// The BatchNormalization layers of the model.
    pub fn batch_norms(&self) -> &[BatchNormInfo] {
        &self.bns
    }

    /// Whether steps update the running statistics (EMA / RBN mode).
    pub fn updates_statistics(&self) -> bool {
        matches!(self.spec.mode, StatsMode::Ema { .. })
    }

    /// Gradient steps taken since the session started (or was reset): updates the optimizer made.
    /// A step that selected nothing (ETA, EATA, WoC) or that the guard refused is not counted.
    pub fn steps_taken(&self) -> u64 {
        self.steps_taken
    }

    /// Updates the parameter guard refused since the session started (gradient steps, and RBN
    /// statistics updates of [`Session::predict`]): each would have written a NaN or an
    /// infinity, and wrote nothing instead. Not cleared by [`Session::reset`].
    pub fn steps_skipped(&self) -> u64 {
        self.steps_skipped
    }

    /// Method `auto`: its current estimate q̂ of the stream's class prior (label-shift EMA over
    /// the source predictions of every batch it decided on; saved as [`auto::PRIOR`]). `None`
    /// for other methods and before `auto`'s first batch.
    pub fn auto_label_prior(&self) -> Option<Vec<f64>> {
        self.auto.as_ref().and_then(|a| a.prior.clone())
    }

    /// The spec of the step program for a batch of `shape` (`paced`: run by a [`super::train::Pacer`], its
    /// long dispatches split along the batch).
    fn step_spec(&self, shape: &[usize], paced: bool) -> StepSpec {
        let mut spec = self.spec.clone();
        if self.config.adapt.method == Method::Auto && !spec.adapted.is_empty() {
            // auto's step: the source statistics weigh as a prior of `source_samples` samples.
            let b = shape.first().copied().unwrap_or(1) as f32;
            spec.mode = StatsMode::Alpha { alpha: b / (self.config.auto.source_samples + b) };
            // Its predictions' statistics against the judging pass's, on the GPU.
            spec.diagnostics = Diagnose::Returned;
        }
        if paced {
            spec.z_piece = super::train::PACED_Z_PIECE;
        }
        spec
    }

    fn plan(&mut self, shape: &[usize]) -> Result<&StepPlan, AdaptError> {
        if !self.plans.contains_key(shape) {
            let spec = self.step_spec(shape, self.pacer.is_some());
            let p = StepPlan::build(&self.ctx, &self.model.graph, &mut self.store, shape, &spec)?;
            self.plans.insert(shape.to_vec(), p);
        }
        Ok(&self.plans[shape])
    }

    /// What compiles, on any thread, the pipelines of the step programs a batch of each of
    /// `shapes` will run (method `auto`: its judging program and batch-statistics view too) and
    /// that this session has not built yet (`paced`: as a [`super::train::Pacer`] runs them). The
    /// frame stream runs one when it is made (background steps), so that no step compiles a
    /// pipeline on its way to landing.
    pub fn step_warmer(&self, shapes: &[Vec<usize>], paced: bool) -> StepWarmer {
        let mut jobs = Vec::new();
        for shape in shapes {
            if let Some(state) = &self.auto {
                if !state.plans.contains_key(shape) {
                    let z_piece = if paced { super::train::PACED_Z_PIECE } else { 0 };
                    jobs.push((shape.clone(), StepSpec { z_piece, ..state.spec.clone() }));
                }
                if !state.adapts {
                    continue;
                }
                if !state.view_plans.contains_key(shape) {
                    let z_piece = if paced { super::train::PACED_Z_PIECE } else { 0 };
                    jobs.push((shape.clone(), StepSpec { z_piece, ..state.view_spec.clone() }));
                }
            }
            if !self.plans.contains_key(shape) {
                jobs.push((shape.clone(), self.step_spec(shape, paced)));
            }
        }
        StepWarmer { ctx: self.ctx.clone(), graph: self.model.graph.clone(), jobs }
    }

    /// Predicts `batch` with the current parameters WITHOUT a gradient step, normalising with
    /// `norm` ([`NormMode::Ema`]: RBN statistics, updated by every call). The adapted parameters
    /// are the same buffers the steps update. The stream's frame mode uses
    /// [`Session::predict_with`] and the frame statistics instead: RBN fed one frame at a time
    /// drifts to the scene's own statistics (stream/policy.rs).
    pub fn predict(&mut self, batch: &Tensor, norm: NormMode) -> crate::Result<Prediction> {
        let mode = match norm {
            NormMode::Source => StatsMode::Source,
            NormMode::Batch => StatsMode::Batch,
            NormMode::Ema => StatsMode::Ema { momentum: self.config.adapt.norm_momentum },
            NormMode::Alpha => StatsMode::Alpha { alpha: self.config.adapt.norm_alpha },
        };
        self.predict_with(batch, mode)
    }

    /// [`Session::predict`] with any statistics mode (the frame protocol's
    /// [`StatsMode::Frame`]).
    pub fn predict_with(&mut self, batch: &Tensor, mode: StatsMode) -> crate::Result<Prediction> {
        let data = self.check_batch(batch)?;
        let key = (batch.shape.clone(), format!("{mode:?}"));
        if !self.predict_plans.contains_key(&key) {
            let spec = StepSpec { mode, adapted: Vec::new(), objective: None, ..self.spec.clone() };
            let p = StepPlan::build(&self.ctx, &self.model.graph, &mut self.store, &batch.shape, &spec)?;
            self.predict_plans.insert(key.clone(), p);
        }
        let out = self.predict_plans[&key].run(&self.ctx, data)?;
        if out.skipped {
            self.steps_skipped += 1;
            log::warn!(
                "non-finite statistics from a batch of shape {:?}: the statistics update was skipped",
                batch.shape
            );
        }
        Ok(Prediction {
            logits: out.logits,
            loss: None,
            selected: None,
            ema: None,
            reset: false,
            probs: out.probs,
            prior: out.prior,
            skipped: out.skipped,
            auto: None,
        })
    }

    /// A forward-only program for `shape` with statistics `mode` on this session's buffers (its
    /// parameters and statistics as the steps leave them), to run apart from the session: frame
    /// mode predicts with it while a step runs on another thread.
    pub(crate) fn forward_plan(&mut self, shape: &[usize], mode: StatsMode, top_k: usize) -> crate::Result<StepPlan> {
        let spec = StepSpec { mode, adapted: Vec::new(), objective: None, top_k, ..self.spec.clone() };
        Ok(StepPlan::build(&self.ctx, &self.model.graph, &mut self.store, shape, &spec)?)
    }

    /// Whether predictions run an output stage (LAME, label shift) whose running state the steps
    /// also write.
    pub(crate) fn has_output_stage(&self) -> bool {
        self.spec.output.is_some()
    }

    /// Paces the GPU work of the next steps (`None`: each step one submission).
    pub(crate) fn set_pacer(&mut self, pacer: Option<Arc<super::train::Pacer>>) {
        self.pacer = pacer;
    }

    fn check_batch<'a>(&self, batch: &'a Tensor) -> Result<&'a [f32], AdaptError> {
        let data = batch.as_f32().ok_or(AdaptError::DType(batch.dtype))?;
        if batch.dtype != DType::F32 {
            return Err(AdaptError::DType(batch.dtype));
        }
        if let Some(dims) = self.model.graph.inputs.first().and_then(|i| i.dims.as_ref())
            && dims.len() != batch.shape.len()
        {
            return Err(AdaptError::Rank { expected: dims.len(), got: batch.shape.clone() });
        }
        if batch.shape.first() == Some(&0) || data.is_empty() {
            return Err(AdaptError::EmptyBatch(batch.shape.clone()));
        }
        if let Some(first) = data.iter().position(|v| !v.is_finite()) {
            let count = data.iter().filter(|v| !v.is_finite()).count();
            return Err(AdaptError::NonFinite { shape: batch.shape.clone(), count, first });
        }
        Ok(data)
    }

    /// Predicts `batch` and adapts on it; returns the pre-update prediction.
    pub fn step(&mut self, batch: &Tensor) -> crate::Result<Prediction> {
        let data = self.check_batch(batch)?;
        self.step_input(StepInput::Host(data), &batch.shape)
    }

    /// Takes a step on `batch` ([`Session::step`]), then times each dispatch of the step
    /// program alone `runs` times and keeps each one's median ([`crate::plan::profile`]). The
    /// timed runs are steps too: they update the parameters again (a benchmark's session).
    /// Method `auto` profiles its gradient step, so only a batch it steps on has one.
    pub fn profile_step(&mut self, batch: &Tensor, runs: usize) -> crate::Result<crate::plan::profile::Profile> {
        self.step(batch)?;
        let plan = self.plans.get(&batch.shape).ok_or_else(|| {
            PlanError::Program(format!("no step program ran on the batch of shape {:?}", batch.shape))
        })?;
        Ok(plan.compiled.profile(&self.ctx, runs, None)?)
    }

    /// The dispatches of the program [`Session::predict_with`] ran for batches of `shape` with
    /// statistics `mode` (`None`: it has not run).
    pub fn predict_dispatch_count(&self, shape: &[usize], mode: StatsMode) -> Option<usize> {
        self.predict_plans.get(&(shape.to_vec(), format!("{mode:?}"))).map(|p| p.dispatch_count)
    }

    /// [`Session::predict_with`] on `batch`, then each dispatch of its program timed alone `runs`
    /// times ([`crate::plan::profile`]; the timed runs are predictions too: frame statistics
    /// move).
    pub fn profile_predict(
        &mut self,
        batch: &Tensor,
        mode: StatsMode,
        runs: usize,
    ) -> crate::Result<crate::plan::profile::Profile> {
        self.predict_with(batch, mode)?;
        let key = (batch.shape.clone(), format!("{mode:?}"));
        let plan =
            self.predict_plans.get(&key).ok_or_else(|| PlanError::Program("no prediction program ran".into()))?;
        Ok(plan.compiled.profile(&self.ctx, runs, None)?)
    }

    /// [`Session::step`] on a batch of shape `shape` that `input` holds (frame mode's window,
    /// already on the GPU: [`StepInput::Gpu`]). A GPU input is not checked for NaN here: the
    /// stream's preprocessing makes finite values from any pixels.
    pub(crate) fn step_input(&mut self, input: StepInput<'_>, shape: &[usize]) -> crate::Result<Prediction> {
        if let Some(mut state) = self.auto.take() {
            let r = self.auto_step(&mut state, input, shape);
            self.auto = Some(state);
            return r;
        }
        let batch_shape = shape.to_vec();
        // Build (and so validate) the plan before touching any state.
        self.plan(&batch_shape)?;
        if self.config.adapt.episodic {
            self.reset()?;
        }
        let steps = if self.spec.adapted.is_empty() { 1 } else { self.config.adapt.steps.max(1) };
        let plan = &self.plans[&batch_shape];
        let mut first: Option<StepOutput> = None;
        let (mut skipped, mut stepped) = (0u64, 0u64);
        for s in 0..steps {
            // The output stage's estimate moves once per batch, with the returned prediction.
            let out = plan.run_paced(&self.ctx, input, s == 0, self.pacer.as_deref())?;
            skipped += out.skipped as u64;
            stepped += out.stepped as u64;
            if first.is_none() {
                first = Some(out);
            }
        }
        self.steps_taken += stepped;
        if skipped > 0 {
            self.steps_skipped += skipped;
            log::warn!(
                "the parameter guard skipped {skipped} step(s) on a batch of shape {batch_shape:?}: the update would have written NaN or infinity"
            );
        }
        let Some(out) = first else { return Err(PlanError::Program("no step ran".into()).into()) };
        let end = match self.after.as_mut() {
            Some(after) => after.after_batch(out.second),
            None => methods::BatchEnd::default(),
        };
        if end.reset {
            self.reset()?;
        }
        let (ema, reset) = (end.ema, end.reset);
        Ok(Prediction {
            logits: out.logits,
            loss: out.loss,
            selected: out.selected.map(|(samples, weights)| Selection { samples, weights }),
            ema,
            reset,
            probs: out.probs,
            prior: out.prior,
            skipped: skipped > 0,
            auto: None,
        })
    }

    /// Method `auto`'s batch: the source-statistics prediction (LAME-smoothed) decides whether
    /// the batch takes an ETA step with its own statistics (see [`methods::auto`]).
    fn auto_step(&mut self, state: &mut AutoState, input: StepInput<'_>, shape: &[usize]) -> crate::Result<Prediction> {
        let shape = shape.to_vec();
        // Build (and so validate) both programs before touching any state.
        if !state.plans.contains_key(&shape) {
            let z_piece = if self.pacer.is_some() { super::train::PACED_Z_PIECE } else { 0 };
            let spec = StepSpec { z_piece, ..state.spec.clone() };
            let p = StepPlan::build(&self.ctx, &self.model.graph, &mut self.store, &shape, &spec)?;
            state.plans.insert(shape.clone(), p);
        }
        if state.adapts {
            if !state.view_plans.contains_key(&shape) {
                let z_piece = if self.pacer.is_some() { super::train::PACED_Z_PIECE } else { 0 };
                let spec = StepSpec { z_piece, ..state.view_spec.clone() };
                let p = StepPlan::build(&self.ctx, &self.model.graph, &mut self.store, &shape, &spec)?;
                state.view_plans.insert(shape.clone(), p);
            }
            self.plan(&shape)?;
        }
        let judge = &state.plans[&shape];
        let a = judge.run_paced(&self.ctx, input, true, self.pacer.as_deref())?;
        let c = judge.output_classes();
        let missing = || PlanError::Program("method auto's judging pass computed no statistics".into());
        let source = a.stats.source.clone().ok_or_else(missing)?;
        // The batch-statistics view, after the judging pass (its top-1 classes are what the
        // view's agreement is counted against).
        let view = match state.view_plans.get(&shape) {
            Some(v) => {
                Some(v.run_paced(&self.ctx, input, true, self.pacer.as_deref())?.stats.returned.ok_or_else(missing)?)
            }
            None => None,
        };
        let covariate_shift = a.shift.as_deref().and_then(auto::covariate_shift);
        let section = self.config.auto.clone();
        let decision = state.decision.get_or_insert_with(|| Decision::initial(c, section.prior_samples as f64));
        if decision.marginal.len() != c {
            *decision = Decision::initial(c, section.prior_samples as f64);
        }
        let rho = decision.observe_stats(&source, view.as_ref(), covariate_shift.map(f64::from), &section);
        let prior = match state.prior.take() {
            Some(q) if q.len() == c => q,
            _ => vec![1.0 / c as f64; c],
        };
        let shifted = decision.label_shifted(&section);
        let source_entropy = source.row_entropy;
        let smooth = !state.adapts || !auto::stepped_branch(decision, &section);
        let mut alpha = None;
        // The statistics of what the batch returns, computed on the GPU with the predictions.
        let (mut p, stepped, returned) = if smooth {
            // The source model's predictions are returned: only now are they read back.
            let (logits, smoothed) = state.plans[&shape].read_predictions(&self.ctx)?;
            let (probs, returned) = if auto::output_stage_off(decision, &section, source_entropy) {
                (None, Some(source.against_itself()))
            } else if decision.judged && decision.correlated {
                (smoothed, a.stats.smoothed.clone().or_else(|| Some(source.against_itself())))
            } else if shifted {
                let rows = auto::correct_prior(&auto::softmax(&logits.to_f32_vec(), c), &prior);
                let t = Tensor::f32(vec![rows.len(), c], rows.iter().flatten().map(|&v| v as f32).collect());
                (Some(t), a.stats.corrected.clone())
            } else {
                (None, Some(source.against_itself()))
            };
            let p = Prediction {
                probs,
                logits,
                loss: None,
                selected: None,
                ema: None,
                reset: false,
                prior: None,
                skipped: a.skipped,
                auto: None,
            };
            (p, false, returned)
        } else {
            alpha = Some(auto::step_alpha(decision, &section, shape[0], state.evidence));
            self.plans[&shape].set_bn_alpha(&self.ctx, alpha.unwrap_or(0.0));
            state.evidence += shape[0] as f64;
            let out = self.plans[&shape].run_paced(&self.ctx, input, true, self.pacer.as_deref())?;
            self.steps_taken += out.stepped as u64;
            if out.skipped {
                self.steps_skipped += 1;
                log::warn!(
                    "the parameter guard skipped a step on a batch of shape {shape:?}: the update would have written NaN or infinity"
                );
            }
            let p = Prediction {
                logits: out.logits,
                loss: out.loss,
                selected: out.selected.map(|(samples, weights)| Selection { samples, weights }),
                ema: None,
                reset: false,
                probs: out.probs,
                prior: out.prior,
                skipped: out.skipped,
                auto: None,
            };
            (p, out.stepped, out.stats.returned)
        };
        let returned = returned.ok_or_else(missing)?;
        // The state continues from what its buffer holds (f32), so that a session loaded from a
        // saved state decides exactly as the one that saved it.
        let decision = match Decision::from_buffer(&decision.to_buffer()) {
            Some(mut d) => {
                d.set_batch_marginal(&decision.batch_marginal.iter().map(|&m| m as f32).collect::<Vec<_>>());
                d.dominated = decision.dominated;
                d.biased = decision.biased;
                d.diverged = decision.diverged;
                d.uncorroborated = decision.uncorroborated;
                d.unsettled = decision.unsettled;
                d
            }
            None => decision.clone(),
        };
        let next: Vec<f64> = auto::update_prior_mean(&prior, &source.mean, section.label_shift_momentum as f64)
            .into_iter()
            .map(|q| q as f32 as f64)
            .collect();
        // A batch whose source probabilities are not finite leaves the estimate as it was.
        let prior = if next.iter().all(|q| q.is_finite()) { next } else { prior };
        let diag = auto::diagnose_stats(rho, &decision, stepped, &source, &returned, &section);
        if diag.reset && state.adapts {
            log::warn!(
                "method auto: the adapted predictions collapsed (mean entropy {:.3} of ln C against the source's {:.3}): back to the source parameters",
                diag.mean_entropy,
                diag.source_mean_entropy
            );
            self.reset()?;
            p.reset = true;
            state.evidence = 0.0;
        }
        self.write(auto::STATE, &decision.to_buffer());
        self.write(auto::PRIOR, &prior.iter().map(|&q| q as f32).collect::<Vec<_>>());
        self.write(auto::EVIDENCE, &[state.evidence as f32]);
        self.write(auto::BATCH_MARGINAL, &decision.batch_marginal.iter().map(|&m| m as f32).collect::<Vec<_>>());
        self.ctx.queue.submit([]);
        state.decision = Some(decision);
        state.prior = Some(prior);
        let batch_entropy = view.as_ref().map(|v| v.row_entropy as f32);
        let view_agreement = view.as_ref().map(|v| v.agreement as f32);
        p.auto = Some(Diagnostics {
            reset: diag.reset && state.adapts,
            alpha,
            covariate_shift,
            batch_entropy,
            view_agreement,
            ..diag
        });
        Ok(p)
    }

    /// Restores parameters, normalization statistics and optimizer state to the source model.
    pub fn reset(&mut self) -> crate::Result<()> {
        let graph = self.model.graph.clone();
        for (name, buf) in &self.store.buffers {
            if let Some(t) = graph.initializers.get(name) {
                self.ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(&t.to_f32_vec()));
            } else if name == label_shift::PRIOR_BUFFER {
                // The label-shift estimate restarts from the source prior.
                let c = (buf.size() / 4) as usize;
                let ps =
                    self.spec.output.as_ref().map(|o| o.source_prior_for(c)).unwrap_or_else(|| vec![1.0 / c as f32; c]);
                self.ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(&ps));
            } else if let Some(v) = self.config.adapt.method.def().reset_value(name, (buf.size() / 4) as usize) {
                self.ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(&v));
            } else if name.starts_with("opt:") || name.starts_with(super::bn::FRAME_EVIDENCE_PREFIX) {
                let zeros = vec![0u8; buf.size() as usize];
                self.ctx.queue.write_buffer(buf, 0, &zeros);
                if name == "opt:state" {
                    let init = super::optim::initial_state().to_f32_vec();
                    self.ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(&init));
                }
            }
        }
        self.ctx.queue.submit([]);
        self.steps_taken = 0;
        if let Some(state) = self.auto.as_mut() {
            state.decision = None;
            state.prior = None;
            state.evidence = 0.0;
        }
        Ok(())
    }

    /// Method `auto`'s decision state as the store holds it (after a load or a reset).
    fn sync_auto(&mut self) -> Result<(), AdaptError> {
        if self.auto.is_none() {
            return Ok(());
        }
        let mut decision = match self.store.get(auto::STATE) {
            Some(_) => {
                let v = self.read_named(&[auto::STATE.to_string()])?;
                v.first().and_then(|(_, t)| Decision::from_buffer(&t.to_f32_vec()))
            }
            None => None,
        };
        // A state saved before the batch-statistics marginal existed continues with a copy of
        // the source marginal (Decision::from_buffer).
        if let (Some(d), Some(_)) = (decision.as_mut(), self.store.get(auto::BATCH_MARGINAL)) {
            let v = self.read_named(&[auto::BATCH_MARGINAL.to_string()])?;
            if let Some((_, t)) = v.first() {
                d.set_batch_marginal(&t.to_f32_vec());
            }
        }
        let prior = match self.store.get(auto::PRIOR) {
            Some(_) => {
                let v = self.read_named(&[auto::PRIOR.to_string()])?;
                v.first()
                    .map(|(_, t)| t.to_f32_vec())
                    .filter(|q| q.iter().all(|x| x.is_finite() && *x >= 0.0))
                    .map(|q| q.into_iter().map(f64::from).collect())
            }
            None => None,
        };
        let evidence = match self.store.get(auto::EVIDENCE) {
            Some(_) => {
                let v = self.read_named(&[auto::EVIDENCE.to_string()])?;
                v.first().and_then(|(_, t)| t.to_f32_vec().first().copied()).filter(|n| n.is_finite() && *n >= 0.0)
            }
            None => None,
        };
        if let Some(state) = self.auto.as_mut() {
            state.decision = decision;
            state.prior = prior;
            state.evidence = evidence.unwrap_or(0.0) as f64;
        }
        Ok(())
    }

    /// Reads named weight buffers back (the source values for buffers no plan created yet).
    fn read_named(&self, names: &[String]) -> Result<Vec<(String, Tensor)>, AdaptError> {
        let mut encoder =
            self.ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("read state") });
        let mut pending = Vec::new();
        let mut out = Vec::new();
        for name in names {
            match self.store.get(name) {
                Some(buf) => {
                    let st = staging(&self.ctx, buf.size());
                    encoder.copy_buffer_to_buffer(buf, 0, &st, 0, buf.size());
                    pending.push((name.clone(), st, (buf.size() / 4) as usize));
                }
                None => pending.push((name.clone(), staging(&self.ctx, 4), usize::MAX)),
            }
        }
        self.ctx.queue.submit([encoder.finish()]);
        for (name, st, n) in pending {
            let shape_of = |name: &str| self.model.graph.initializers.get(name).map(|t| t.shape.clone());
            if n == usize::MAX {
                if let Some(t) = self.model.graph.initializers.get(&name) {
                    out.push((name, Tensor::f32(t.shape.clone(), t.to_f32_vec())));
                }
                continue;
            }
            let data = read_buffer(&self.ctx, &st, n)?;
            let shape = shape_of(&name).unwrap_or_else(|| vec![data.len()]);
            let len = shape.iter().product::<usize>().min(data.len());
            out.push((name, Tensor::f32(shape, data[..len].to_vec())));
        }
        Ok(out)
    }

    /// The current values of the adapted parameters, by ONNX initializer name.
    pub fn parameters(&self) -> crate::Result<Vec<(String, Tensor)>> {
        Ok(self.read_named(&self.adapted_parameters())?)
    }

    /// The current normalization statistics (running mean and variance of every layer).
    pub fn statistics(&self) -> crate::Result<Vec<(String, Tensor)>> {
        let names: Vec<String> = self.bns.iter().flat_map(|b| [b.mean.clone(), b.var.clone()]).collect();
        Ok(self.read_named(&names)?)
    }

    /// Everything that makes up the adapted state: parameters, statistics, optimizer state.
    fn state_names(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.bns.iter().flat_map(|b| [b.scale.clone(), b.bias.clone(), b.mean.clone(), b.var.clone()]).collect();
        names.extend(self.spec.adapted.iter().filter(|a| a.bn_node.is_none()).flat_map(|a| a.names().cloned()));
        let mut opt: Vec<String> = self
            .store
            .buffers
            .keys()
            .filter(|k| {
                k.starts_with("opt:")
                    || Method::ALL.iter().flat_map(|m| m.def().state_prefixes()).any(|p| k.starts_with(p))
                    || k.starts_with(super::bn::FRAME_EVIDENCE_PREFIX)
                    || *k == label_shift::PRIOR_BUFFER
            })
            .cloned()
            .collect();
        opt.sort();
        names.extend(opt);
        names
    }

    fn fingerprint(&self) -> &str {
        self.fingerprint.get_or_init(|| state::fingerprint(&self.model.graph))
    }

    /// Saves the adapted state atomically (see [`super::state`]).
    pub fn save_state(&self, path: &Path) -> crate::Result<()> {
        let tensors = self.read_named(&self.state_names())?;
        let meta = vec![
            ("method".to_string(), self.state_method()),
            ("steps_taken".to_string(), self.steps_taken.to_string()),
        ];
        state::save_state(path, self.fingerprint(), &tensors, &meta)?;
        Ok(())
    }

    /// The `method` entry a state file records.
    fn state_method(&self) -> String {
        format!("{:?}", self.config.adapt.method).to_lowercase()
    }

    /// Loads a state saved for the same model by the same method. On any error (a torn or
    /// non-finite file, another model, another method) the session is unchanged.
    ///
    /// A state without a `method` entry is refused too: every version that wrote state files
    /// wrote it, so its absence means a hand-made or damaged file, and the tensors one method
    /// keeps (optimizer moments, EATA's Fisher, LAME's prior) mean nothing to another.
    pub fn load_state(&mut self, path: &Path) -> crate::Result<()> {
        let fp = self.fingerprint().to_string();
        let loaded = state::load_state(path, &fp)?;
        let ours = self.state_method();
        match loaded.method.as_deref() {
            Some(m) if m == ours => {}
            Some(m) => {
                return Err(StateError::Mismatch(format!(
                    "{} was saved by method '{m}', this session runs method '{ours}'",
                    path.display()
                ))
                .into());
            }
            None => {
                return Err(StateError::Mismatch(format!(
                    "{} records no method (this session runs method '{ours}'); refusing a state of unknown origin",
                    path.display()
                ))
                .into());
            }
        }
        let tensors = migrate_adam_moments(loaded.tensors);
        // Validate every tensor against what it replaces before writing anything.
        let mut writes: Vec<(String, Arc<Tensor>)> = Vec::new();
        for (name, t) in tensors {
            let expected = self.model.graph.initializers.get(&name).map(|s| s.numel());
            if let Some(n) = expected
                && n != t.numel()
            {
                return Err(StateError::Mismatch(format!(
                    "tensor {name} has {} values, the model's has {n}",
                    t.numel()
                ))
                .into());
            }
            writes.push((name, Arc::new(t)));
        }
        for (name, t) in &writes {
            if let Some(buf) = self.store.get(name)
                && buf.size() < t.numel() as u64 * 4
            {
                return Err(StateError::Mismatch(format!("tensor {name} does not fit its buffer")).into());
            }
        }
        // Everything checked: now write (creating buffers a session that has not run yet lacks).
        for (name, t) in &writes {
            match self.store.get(name) {
                Some(buf) => self.ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(&t.to_f32_vec())),
                None => {
                    use wgpu::util::DeviceExt;
                    let b = self.ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some(name),
                        contents: bytemuck::cast_slice(&t.to_f32_vec()),
                        usage: wgpu::BufferUsages::STORAGE
                            | wgpu::BufferUsages::COPY_DST
                            | wgpu::BufferUsages::COPY_SRC,
                    });
                    self.store.buffers.insert(name.clone(), b);
                }
            }
        }
        // A state saved before `auto` kept its class-prior estimate and its evidence has neither:
        // they start as after a reset, instead of keeping this session's values.
        if self.auto.is_some() {
            for name in [auto::PRIOR, auto::EVIDENCE] {
                if !writes.iter().any(|(n, _)| n == name)
                    && let Some(buf) = self.store.get(name)
                    && let Some(v) = self.config.adapt.method.def().reset_value(name, (buf.size() / 4) as usize)
                {
                    self.ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(&v));
                }
            }
            // One saved before the batch-statistics marginal existed continues with a copy of
            // its source marginal (host-side only: no program binds the buffer).
            if !writes.iter().any(|(n, _)| n == auto::BATCH_MARGINAL) {
                self.store.buffers.remove(auto::BATCH_MARGINAL);
            }
        }
        self.ctx.queue.submit([]);
        self.steps_taken = loaded.steps_taken;
        self.sync_auto()?;
        Ok(())
    }

    /// Bytes of the persistent buffers (weights, statistics, optimizer state) created so far.
    pub fn resident_bytes(&self) -> u64 {
        self.store.buffers.values().map(|b| b.size()).sum()
    }

    /// FLOPs of one [`Session::step`] on a batch of `shape` (its plan built if needed): forward,
    /// loss, reverse pass and optimizer as the program dispatches them, times the configured
    /// steps per batch.
    pub fn step_flops(&mut self, shape: &[usize]) -> crate::Result<crate::ops::flops::FlopCount> {
        let steps = if self.spec.adapted.is_empty() { 1 } else { self.config.adapt.steps.max(1) } as u64;
        let f = self.plan(shape)?.flops;
        let scale = |x: u64| x * steps;
        Ok(crate::ops::flops::FlopCount {
            conv: scale(f.conv),
            gemm: scale(f.gemm),
            norm: scale(f.norm),
            pool: scale(f.pool),
            elementwise: scale(f.elementwise),
            other: scale(f.other),
        })
    }

    /// Transient GPU bytes and dispatch count of the step plan for `shape` (built if needed).
    pub fn step_footprint(&mut self, shape: &[usize]) -> crate::Result<(u64, usize)> {
        let p = self.plan(shape)?;
        Ok((p.transient_bytes, p.dispatch_count))
    }
}

/// States saved before Adam's moments shared one buffer hold `opt:m:<p>` and `opt:v:<p>`, n values
/// each; the step now keeps `opt:m:<p>` = [m (n), v (n)] (4 storage buffers per kernel on phones).
/// Such a pair becomes the one tensor, so that a state a user saved still loads, exactly.
fn migrate_adam_moments(tensors: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    let m_len: HashMap<String, usize> =
        tensors.iter().filter_map(|(n, t)| n.strip_prefix("opt:m:").map(|p| (p.to_string(), t.numel()))).collect();
    let v_of: HashMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(n, t)| {
            let p = n.strip_prefix("opt:v:")?;
            (m_len.get(p) == Some(&t.numel())).then(|| (p.to_string(), t.clone()))
        })
        .collect();
    tensors
        .into_iter()
        .filter_map(|(name, t)| {
            if name.strip_prefix("opt:v:").is_some_and(|p| v_of.contains_key(p)) {
                return None;
            }
            match name.strip_prefix("opt:m:").and_then(|p| v_of.get(p)) {
                Some(v) => {
                    let mut data = t.to_f32_vec();
                    data.extend(v.to_f32_vec());
                    Some((name, Tensor::f32(vec![data.len()], data)))
                }
                None => Some((name, t)),
            }
        })
        .collect()
}

/// A method's set-up reaches its session through this (EATA's Fisher).
impl Host for Session {
    fn adapted_parameters(&self) -> Vec<String> {
        Session::adapted_parameters(self)
    }

    fn parameters(&self) -> Result<Vec<(String, Tensor)>, AdaptError> {
        self.read_named(&self.adapted_parameters())
    }

    fn read(&self, names: &[String]) -> Result<Vec<(String, Tensor)>, AdaptError> {
        self.read_named(names)
    }

    fn has_buffer(&self, name: &str) -> bool {
        self.store.get(name).is_some()
    }

    fn zero(&mut self, name: &str) {
        if let Some(buf) = self.store.get(name) {
            self.ctx.queue.write_buffer(buf, 0, &vec![0u8; buf.size() as usize]);
        }
    }

    fn write(&mut self, name: &str, values: &[f32]) {
        match self.store.get(name) {
            Some(buf) => self.ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(values)),
            None => {
                use wgpu::util::DeviceExt;
                let b = self.ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(name),
                    contents: bytemuck::cast_slice(values),
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                });
                self.store.buffers.insert(name.to_string(), b);
            }
        }
    }

    fn flush(&mut self) {
        self.ctx.queue.submit([]);
    }

    fn fingerprint(&self) -> &str {
        Session::fingerprint(self)
    }

    fn run_pass(
        &mut self,
        mode: StatsMode,
        objective: Arc<dyn Objective>,
        batches: &mut dyn Iterator<Item = Result<(PathBuf, Tensor), AdaptError>>,
        rejected: &dyn Fn(&Path, AdaptError) -> AdaptError,
    ) -> Result<(), AdaptError> {
        let spec = StepSpec { mode, objective: Some(objective), output: None, ..self.spec.clone() };
        let mut plans: HashMap<Vec<usize>, StepPlan> = HashMap::new();
        for batch in batches {
            let (f, x) = batch?;
            self.check_batch(&x).map_err(|e| rejected(&f, e))?;
            if !plans.contains_key(&x.shape) {
                let p = StepPlan::build(&self.ctx, &self.model.graph, &mut self.store, &x.shape, &spec)?;
                plans.insert(x.shape.clone(), p);
            }
            plans[&x.shape].run(&self.ctx, x.as_f32().unwrap_or(&[]))?;
        }
        Ok(())
    }
}
