//! The adaptation facade: a model, a config, and the adapted state on the GPU.
//!
//! Each [`Session::step`] predicts a batch and adapts on it (TENT and the baselines), returning the
//! prediction made *before* the batch's update, as the reference implementations do
//! (tta-methods.md §0.2). Parameters, normalization statistics and optimizer state live in GPU
//! buffers between steps; they are read back only when asked for.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;

use super::bn::StatsMode;
use super::config::{AdaptConfig, Method, NormMode};
use super::eata::EataSpec;
use super::optim::OptimizerSpec;
use super::state::{self, StateError};
use super::train::{AdaptedBn, Objective, StepOutput, StepPlan, StepSpec};
use crate::engine::Model;
use crate::gpu::{GpuContext, GpuError};
use crate::ir::BatchNormInfo;
use crate::plan::{PlanError, WeightStore, read_buffer, staging};
use crate::tensor::{DType, Tensor};

/// Errors of an adaptation session.
#[derive(Debug, Error)]
pub enum AdaptError {
    #[error("the model has no BatchNormalization layers with constant parameters: method '{0}' cannot adapt it")]
    NoBatchNorm(String),
    #[error("no BatchNormalization layer is left to adapt after include/exclude ({0})")]
    NothingAdapted(String),
    #[error(
        "batch of shape {shape:?} contains {count} NaN or infinite value(s) (first at flat index {first}); the batch was skipped and nothing was updated"
    )]
    NonFinite { shape: Vec<usize>, count: usize, first: usize },
    #[error(
        "batch of shape {0:?} is empty: a step needs at least one sample (the batch statistics of an empty batch are NaN)"
    )]
    EmptyBatch(Vec<usize>),
    #[error("the model's output does not declare a fixed class count: set eata.e_margin explicitly")]
    Classes,
    #[error("Fisher batches: {0}")]
    Fisher(String),
    #[error("the batch is {0}; adaptation takes float32")]
    DType(DType),
    #[error("the model takes one input of rank {expected}, the batch has shape {got:?}")]
    Rank { expected: usize, got: Vec<usize> },
    #[error(transparent)]
    Output(#[from] super::output::OutputError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// One step's result.
#[derive(Clone, Debug)]
pub struct Prediction {
    /// Logits of the batch before this batch's update.
    pub logits: Tensor,
    /// The loss of the first step on this batch (methods with a gradient step).
    pub loss: Option<f32>,
    /// ETA/EATA: the selected samples of the first step and their weights exp(E0 − E).
    pub selected: Option<(Vec<usize>, Vec<f32>)>,
    /// SAR: the EMA of the second-pass loss after this batch.
    pub ema: Option<f32>,
    /// SAR: whether the model was reset to the source after this batch.
    pub reset: bool,
    /// The output stage's probabilities [B, C] (LAME, label-shift corrections); `None`
    /// without one (the probabilities are then softmax(logits)).
    pub probs: Option<Tensor>,
    /// The label-distribution estimate q̂ the batch was corrected with (label-shift modes).
    pub prior: Option<Vec<f32>>,
    /// The parameter guard refused this batch's update: a parameter, optimizer moment or
    /// running statistic it would have written was NaN or infinite (a batch that overflows inside
    /// the network, a learning rate too large for float32 arithmetic), so nothing was written
    /// and the session is as it was before the batch. Counted by [`Session::steps_skipped`].
    pub skipped: bool,
}

/// An adaptation session over one model.
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
    /// SAR: the EMA of the second-pass loss (the recovery signal).
    sar_ema: Option<f32>,
    /// The model's fingerprint (a hash of every weight), computed on first save or load.
    fingerprint: std::sync::OnceLock<String>,
}

impl Session {
    pub fn new(ctx: &GpuContext, model: Model, config: AdaptConfig) -> Result<Session, AdaptError> {
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
        let source_model = matches!(method, Method::Source | Method::Lame);
        if bns.is_empty() && (!source_model || norm != NormMode::Source) {
            return Err(AdaptError::NoBatchNorm(format!("{method:?}").to_lowercase()));
        }
        let mut adapted = Vec::new();
        if method.updates_parameters() {
            for bn in &bns {
                let inc = config.adapt.include.is_empty()
                    || config.adapt.include.iter().any(|s| bn.node.contains(s.as_str()));
                let exc = config.adapt.exclude.iter().any(|s| bn.node.contains(s.as_str()));
                if inc && !exc {
                    let node = graph.nodes.iter().position(|n| n.name == bn.node).unwrap_or(usize::MAX);
                    adapted.push(AdaptedBn { node, scale: bn.scale.clone(), bias: bn.bias.clone() });
                }
            }
            if adapted.is_empty() {
                return Err(AdaptError::NothingAdapted(format!(
                    "include {:?}, exclude {:?}",
                    config.adapt.include, config.adapt.exclude
                )));
            }
        }
        let objective = match method {
            Method::Eta | Method::Eata | Method::Sar | Method::EataWoc => {
                let configured = if method == Method::Sar { config.sar.e_margin } else { config.adapt_e_margin() };
                let e_margin = match configured {
                    Some(e) => e,
                    None => {
                        let classes = graph
                            .outputs
                            .first()
                            .and_then(|o| o.dims.as_ref())
                            .and_then(|d| d.last())
                            .and_then(|d| if let crate::ir::Dim::Fixed(n) = d { Some(*n) } else { None })
                            .ok_or(AdaptError::Classes)?;
                        0.4 * (classes as f32).ln()
                    }
                };
                if method == Method::Sar {
                    Objective::Sar { e_margin, rho: config.sar.rho }
                } else {
                    let with_fisher = matches!(method, Method::Eata | Method::EataWoc);
                    let fisher_alpha = if with_fisher { config.eata.fisher_alpha } else { 0.0 };
                    Objective::Eata(EataSpec {
                        e_margin,
                        d_margin: config.eata.d_margin,
                        fisher_alpha,
                        woc: method == Method::EataWoc,
                    })
                }
            }
            Method::Woc => Objective::Woc { lambda: config.woc.lambda },
            _ => Objective::MeanEntropy,
        };
        let output = super::output::OutputSpec::from_config(&config, graph)?.map(Arc::new);
        let optimizer = OptimizerSpec::from_config(&config.optimizer);
        let spec = StepSpec { mode, adapted, optimizer, objective, output };
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
            sar_ema: None,
            fingerprint: std::sync::OnceLock::new(),
        };
        if matches!(method, Method::Eata | Method::EataWoc) {
            if let Some(dir) = session.config.eata.fisher_batches.clone() {
                session.compute_fisher(&dir)?;
            } else if let Some(file) = session.config.eata.fisher_file.clone() {
                session.load_fisher(&file)?;
            }
        }
        Ok(session)
    }

    /// EATA's Fisher information, once, before adaptation (tta-methods.md §2): on clean batches,
    /// in batch-statistics mode, the square of each batch-mean cross-entropy gradient with argmax
    /// pseudo-labels, averaged over the batches. Parameters do not change.
    pub fn compute_fisher(&mut self, dir: &Path) -> Result<(), AdaptError> {
        let files = super::replay::batch_files(dir).map_err(|e| AdaptError::Fisher(e.to_string()))?;
        if files.is_empty() {
            return Err(AdaptError::Fisher(format!("no .npy batches in {}", dir.display())));
        }
        // Start from zero: the pass accumulates squared gradients into the Fisher buffers.
        for name in self.fisher_names() {
            if let Some(buf) = self.store.get(&name) {
                self.ctx.queue.write_buffer(buf, 0, &vec![0u8; buf.size() as usize]);
            }
        }
        let spec = StepSpec { mode: StatsMode::Batch, objective: Objective::Fisher, ..self.spec.clone() };
        let mut plans: HashMap<Vec<usize>, StepPlan> = HashMap::new();
        for f in &files {
            let x = crate::npy::read_f32(f).map_err(|e| AdaptError::Fisher(e.to_string()))?;
            self.check_batch(&x).map_err(|e| AdaptError::Fisher(format!("{}: {e}", f.display())))?;
            if !plans.contains_key(&x.shape) {
                let p = StepPlan::build(&self.ctx, &self.model.graph, &mut self.store, &x.shape, &spec)?;
                plans.insert(x.shape.clone(), p);
            }
            plans[&x.shape].run(&self.ctx, x.as_f32().unwrap_or(&[]))?;
        }
        // Average over the batches (the reference divides the sum once, after the last batch).
        let names: Vec<String> = self.adapted_parameters().iter().map(|n| format!("eata:fisher:{n}")).collect();
        let scale = 1.0 / files.len() as f32;
        let fisher = self.read_named(&names)?;
        // A batch that overflows inside the network leaves NaN or infinity in the squared
        // gradients; EATA's penalty would then poison every step. Refuse it here, at set-up.
        for (name, t) in &fisher {
            let bad = t.to_f32_vec().iter().filter(|v| !(*v * scale).is_finite()).count();
            if bad > 0 {
                for n in &names {
                    if let Some(buf) = self.store.get(n) {
                        self.ctx.queue.write_buffer(buf, 0, &vec![0u8; buf.size() as usize]);
                    }
                }
                self.ctx.queue.submit([]);
                return Err(AdaptError::Fisher(format!(
                    "the Fisher of {} has {bad} NaN or infinite value(s): a batch in {} overflows inside the network",
                    name.trim_start_matches("eata:fisher:"),
                    dir.display()
                )));
            }
        }
        for (name, t) in fisher {
            if let Some(buf) = self.store.get(&name) {
                let v: Vec<f32> = t.to_f32_vec().iter().map(|x| x * scale).collect();
                self.ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(&v));
            }
        }
        self.ctx.queue.submit([]);
        Ok(())
    }

    fn fisher_names(&self) -> Vec<String> {
        self.adapted_parameters().iter().map(|n| format!("eata:fisher:{n}")).collect()
    }

    /// EATA's Fisher information by adapted parameter name (zeros before it was computed or
    /// loaded).
    pub fn fisher(&self) -> Result<Vec<(String, Tensor)>, AdaptError> {
        let params = self.parameters()?;
        let mut out = Vec::new();
        for (name, p) in params {
            let key = format!("eata:fisher:{name}");
            let values = match self.store.get(&key) {
                Some(_) => self
                    .read_named(std::slice::from_ref(&key))?
                    .pop()
                    .map(|(_, t)| t.to_f32_vec())
                    .unwrap_or_else(|| vec![0.0; p.numel()]),
                None => vec![0.0; p.numel()],
            };
            out.push((name, Tensor::f32(p.shape.clone(), values[..p.numel().min(values.len())].to_vec())));
        }
        Ok(out)
    }

    /// Saves the Fisher (one tensor per adapted parameter) as a safetensors file tied to this
    /// model's fingerprint, for `eata.fisher_file`.
    pub fn save_fisher(&self, path: &Path) -> Result<(), AdaptError> {
        let tensors: Vec<(String, Tensor)> =
            self.fisher()?.into_iter().map(|(n, t)| (format!("eata:fisher:{n}"), t)).collect();
        let meta = vec![("content".to_string(), "eata-fisher".to_string())];
        state::save_state(path, self.fingerprint(), &tensors, &meta)?;
        Ok(())
    }

    /// Loads a Fisher saved by [`Session::save_fisher`] for the same model. Every adapted
    /// parameter must be present with its size; on any error nothing changes.
    pub fn load_fisher(&mut self, path: &Path) -> Result<(), AdaptError> {
        let fp = self.fingerprint().to_string();
        let loaded = state::load_state(path, &fp)?;
        if loaded.metadata.get("content").map(String::as_str) != Some("eata-fisher") {
            return Err(AdaptError::Fisher(format!(
                "{} is not a saved Fisher (save one with save_fisher)",
                path.display()
            )));
        }
        let mut writes = Vec::new();
        for (name, p) in self.parameters()? {
            let key = format!("eata:fisher:{name}");
            let t = loaded.get(&key).ok_or_else(|| {
                AdaptError::Fisher(format!("{} has no Fisher for the adapted parameter {name}", path.display()))
            })?;
            if t.numel() != p.numel() {
                return Err(AdaptError::Fisher(format!(
                    "{}: the Fisher of {name} has {} values, the parameter {}",
                    path.display(),
                    t.numel(),
                    p.numel()
                )));
            }
            writes.push((key, t.to_f32_vec()));
        }
        for (key, v) in writes {
            match self.store.get(&key) {
                Some(buf) => self.ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(&v)),
                None => {
                    use wgpu::util::DeviceExt;
                    let b = self.ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some(&key),
                        contents: bytemuck::cast_slice(&v),
                        usage: wgpu::BufferUsages::STORAGE
                            | wgpu::BufferUsages::COPY_DST
                            | wgpu::BufferUsages::COPY_SRC,
                    });
                    self.store.buffers.insert(key, b);
                }
            }
        }
        self.ctx.queue.submit([]);
        Ok(())
    }

    pub fn config(&self) -> &AdaptConfig {
        &self.config
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Names of the adapted parameters (ONNX initializer names), scale then bias per layer.
    pub fn adapted_parameters(&self) -> Vec<String> {
        self.spec.adapted.iter().flat_map(|a| [a.scale.clone(), a.bias.clone()]).collect()
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

    fn plan(&mut self, shape: &[usize]) -> Result<&StepPlan, AdaptError> {
        if !self.plans.contains_key(shape) {
            let p = StepPlan::build(&self.ctx, &self.model.graph, &mut self.store, shape, &self.spec)?;
            self.plans.insert(shape.to_vec(), p);
        }
        Ok(&self.plans[shape])
    }

    /// Predicts `batch` with the current parameters WITHOUT a gradient step, normalising with
    /// `norm` ([`NormMode::Ema`]: RBN statistics, updated by every call). The adapted parameters
    /// are the same buffers the steps update. The stream's frame mode uses
    /// [`Session::predict_with`] and the frame statistics instead: RBN fed one frame at a time
    /// drifts to the scene's own statistics (stream/policy.rs).
    pub fn predict(&mut self, batch: &Tensor, norm: NormMode) -> Result<Prediction, AdaptError> {
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
    pub fn predict_with(&mut self, batch: &Tensor, mode: StatsMode) -> Result<Prediction, AdaptError> {
        let data = self.check_batch(batch)?;
        let key = (batch.shape.clone(), format!("{mode:?}"));
        if !self.predict_plans.contains_key(&key) {
            let spec = StepSpec { mode, adapted: Vec::new(), objective: Objective::MeanEntropy, ..self.spec.clone() };
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
        })
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
    pub fn step(&mut self, batch: &Tensor) -> Result<Prediction, AdaptError> {
        let data = self.check_batch(batch)?;
        // Build (and so validate) the plan before touching any state.
        self.plan(&batch.shape)?;
        if self.config.adapt.episodic {
            self.reset()?;
        }
        let steps = if self.spec.adapted.is_empty() { 1 } else { self.config.adapt.steps.max(1) };
        let plan = &self.plans[&batch.shape];
        let mut first: Option<StepOutput> = None;
        let (mut skipped, mut stepped) = (0u64, 0u64);
        for s in 0..steps {
            // The output stage's estimate moves once per batch, with the returned prediction.
            let out = plan.run_with(&self.ctx, data, s == 0)?;
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
                "the parameter guard skipped {skipped} step(s) on a batch of shape {:?}: the update would have written NaN or infinity",
                batch.shape
            );
        }
        let Some(out) = first else { return Err(AdaptError::Plan(PlanError::Program("no step ran".into()))) };
        let mut reset = false;
        if let Some((loss2, kept)) = out.second {
            // SAR's recovery (tta-methods.md §3): the EMA moves only when the second pass kept a
            // sample (the reference's loss is NaN otherwise); below the threshold, reset.
            if kept > 0 && loss2.is_finite() {
                self.sar_ema = Some(match self.sar_ema {
                    None => loss2,
                    Some(e) => 0.9 * e + 0.1 * loss2,
                });
            }
            if self.sar_ema.is_some_and(|e| e < self.config.sar.reset_threshold) {
                let ema = self.sar_ema;
                self.reset()?;
                self.sar_ema = if self.config.sar.reset_clears_ema { None } else { ema };
                reset = true;
            }
        }
        let ema = if out.second.is_some() { self.sar_ema } else { None };
        Ok(Prediction {
            logits: out.logits,
            loss: out.loss,
            selected: out.selected,
            ema,
            reset,
            probs: out.probs,
            prior: out.prior,
            skipped: skipped > 0,
        })
    }

    /// Restores parameters, normalization statistics and optimizer state to the source model.
    pub fn reset(&mut self) -> Result<(), AdaptError> {
        let graph = self.model.graph.clone();
        for (name, buf) in &self.store.buffers {
            if let Some(t) = graph.initializers.get(name) {
                self.ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(&t.to_f32_vec()));
            } else if name == super::output::PRIOR_BUFFER {
                // The label-shift estimate restarts from the source prior.
                let c = (buf.size() / 4) as usize;
                let ps =
                    self.spec.output.as_ref().map(|o| o.source_prior_for(c)).unwrap_or_else(|| vec![1.0 / c as f32; c]);
                self.ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(&ps));
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
    pub fn parameters(&self) -> Result<Vec<(String, Tensor)>, AdaptError> {
        self.read_named(&self.adapted_parameters())
    }

    /// The current normalization statistics (running mean and variance of every layer).
    pub fn statistics(&self) -> Result<Vec<(String, Tensor)>, AdaptError> {
        let names: Vec<String> = self.bns.iter().flat_map(|b| [b.mean.clone(), b.var.clone()]).collect();
        self.read_named(&names)
    }

    /// Everything that makes up the adapted state: parameters, statistics, optimizer state.
    fn state_names(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.bns.iter().flat_map(|b| [b.scale.clone(), b.bias.clone(), b.mean.clone(), b.var.clone()]).collect();
        let mut opt: Vec<String> = self
            .store
            .buffers
            .keys()
            .filter(|k| {
                k.starts_with("opt:")
                    || k.starts_with("eata:")
                    || k.starts_with(super::bn::FRAME_EVIDENCE_PREFIX)
                    || *k == super::output::PRIOR_BUFFER
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
    pub fn save_state(&self, path: &Path) -> Result<(), AdaptError> {
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
    pub fn load_state(&mut self, path: &Path) -> Result<(), AdaptError> {
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
        // Validate every tensor against what it replaces before writing anything.
        let mut writes: Vec<(String, Arc<Tensor>)> = Vec::new();
        for (name, t) in loaded.tensors {
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
        self.ctx.queue.submit([]);
        self.steps_taken = loaded.steps_taken;
        Ok(())
    }

    /// Bytes of the persistent buffers (weights, statistics, optimizer state) created so far.
    pub fn resident_bytes(&self) -> u64 {
        self.store.buffers.values().map(|b| b.size()).sum()
    }

    /// Transient GPU bytes and dispatch count of the step plan for `shape` (built if needed).
    pub fn step_footprint(&mut self, shape: &[usize]) -> Result<(u64, usize), AdaptError> {
        let p = self.plan(shape)?;
        Ok((p.transient_bytes, p.dispatch_count))
    }
}
