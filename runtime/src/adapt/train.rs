//! The adaptation step as one program: forward with the session's normalization statistics, the
//! output stages, the method's loss, the reverse pass from the loss down to the adapted
//! BatchNormalization parameters, and the optimizer update — recorded into one command encoder,
//! with a single readback of the (pre-update) logits and the loss.
//!
//! [`StepPlan::build`] is the driver every method shares; what differs between methods is their
//! [`Objective`] (`super::methods`), called at fixed points of the program: its selection and
//! loss, a change of the gradients after the reverse pass ([`super::reverse`]), and per-parameter
//! terms ahead of the guarded update.

use std::sync::Arc;

use super::bn::{BnHook, StatsMode};
use super::methods::{AfterForward, Deferred, Objective, Param, StepCx, Updated};
use super::optim::{self, OptimizerSpec};
pub use super::reverse::AdaptedBn;
use super::reverse::{bytes_of, err, parameter, reverse_pass};
use crate::gpu::GpuContext;
use crate::ir::Graph;
use crate::ops::BufRef;
use crate::plan::{
    Compiled, GraphOutput, Item, PlanError, Program, WeightInit, WeightStore, lower_forward, read_buffer, staging,
};
use crate::tensor::Tensor;

/// What a step program does.
#[derive(Clone, Debug)]
pub struct StepSpec {
    pub mode: StatsMode,
    /// Adapted layers; empty for a forward-only program (source, norm, rbn).
    pub adapted: Vec<AdaptedBn>,
    pub optimizer: OptimizerSpec,
    /// What a step with adapted layers minimises (the method's, or EATA's Fisher pass).
    pub objective: Option<Arc<dyn Objective>>,
    /// LAME / label-shift stages after the forward pass ([`super::output`]).
    pub output: Option<Arc<super::output::OutputSpec>>,
    /// Normalise with the source scale and bias instead of the adapted ones (the unadapted model
    /// method `auto` judges the stream with).
    pub source_affine: bool,
}

/// A compiled step for one input shape.
pub struct StepPlan {
    compiled: Compiled,
    input: usize,
    pub input_shape: Vec<usize>,
    logits: (usize, Vec<usize>),
    loss: Option<usize>,
    staging_logits: wgpu::Buffer,
    staging_loss: wgpu::Buffer,
    /// A selection read back (ETA/EATA, WoC): [flags (B), weights (B)], and its staging buffer.
    selection: Option<(usize, wgpu::Buffer)>,
    /// A second pass read back (SAR): its loss and selection ([flags (B), |S|]) with one staging
    /// buffer each.
    second: Option<(usize, usize, wgpu::Buffer, wgpu::Buffer)>,
    /// The output stage's values (probabilities, prior) with their staging buffers, and the
    /// gate of its running estimate.
    output: Option<OutputReadback>,
    /// The parameter guard's state buffer ([step_count, gate, non_finite]: the optimizer's, or
    /// `guard:state` in a forward-only program that updates RBN statistics) and its staging
    /// buffer; `None` for programs that change no persistent state.
    guard: Option<(usize, wgpu::Buffer)>,
    pub dispatch_count: usize,
    /// FLOPs of one step: forward, loss, reverse pass and optimizer as this program dispatches
    /// them ([`crate::ops::flops`] has the convention).
    pub flops: crate::ops::flops::FlopCount,
    /// Transient GPU memory of the step (activations kept for the reverse pass, gradients,
    /// scratch), after lifetime-based reuse.
    pub transient_bytes: u64,
    /// Names of the parameters this step updates, in optimizer order.
    pub params: Vec<String>,
}

struct OutputReadback {
    stage: super::output::OutputStage,
    probs: wgpu::Buffer,
    prior: Option<wgpu::Buffer>,
    classes: usize,
}

/// The result of one step.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// The logits of the forward pass that computed the loss (the prediction before the update).
    pub logits: Tensor,
    pub loss: Option<f32>,
    /// ETA/EATA: indices of the selected samples and their weights exp(E0 − E).
    pub selected: Option<(Vec<usize>, Vec<f32>)>,
    /// SAR: the second-pass loss and how many samples it kept.
    pub second: Option<(f32, usize)>,
    /// The output stage's probabilities [B, C] (LAME, label-shift corrections).
    pub probs: Option<Tensor>,
    /// The label-distribution estimate the output stage corrected with [C].
    pub prior: Option<Vec<f32>>,
    /// The parameter guard refused the step: something it would have written (a parameter, an
    /// optimizer moment, a running statistic) was NaN or infinite, so nothing was written.
    pub skipped: bool,
    /// The optimizer updated the parameters (its gate stayed open: something was selected and
    /// nothing was refused). False for programs without a gradient step.
    pub stepped: bool,
}

/// Name of the guard's state buffer in forward-only programs that commit RBN statistics.
pub const GUARD_STATE: &str = "guard:state";

impl StepPlan {
    pub fn build(
        ctx: &GpuContext,
        graph: &Graph,
        store: &mut WeightStore,
        shape: &[usize],
        spec: &StepSpec,
    ) -> Result<StepPlan, PlanError> {
        if graph.inputs.len() != 1 {
            return Err(err(format!("adaptation needs a model with one input, this one has {}", graph.inputs.len())));
        }
        let training = !spec.adapted.is_empty();
        let mut program = Program::default();
        let mut hook = BnHook::new(spec.mode, training || spec.source_affine);
        hook.source_affine = spec.source_affine;
        let fwd = lower_forward(ctx, graph, &[shape.to_vec()], &mut program, &mut hook)?;
        let (logits_v, logits_shape) = match fwd.outputs.first() {
            Some((_, GraphOutput::Value { id, shape })) => (*id, shape.clone()),
            _ => return Err(err("the model's first output is a constant; nothing to adapt")),
        };
        // What the objective computes from the logits before anything else (ROID: the
        // probabilities, and the prior-corrected logits it returns).
        let forwarded = match &spec.objective {
            Some(objective) if training => objective.after_forward(&mut program, logits_v, &logits_shape)?,
            _ => AfterForward::default(),
        };
        let returned = forwarded.returned.unwrap_or(logits_v);
        // The output stage reads the forward's logits and features right after the forward,
        // so those buffers need not outlive the reverse pass.
        let output = match &spec.output {
            Some(o) => {
                let stage = super::output::lower(ctx, graph, &fwd, o, returned, &logits_shape, &mut program)
                    .map_err(|e| err(e.to_string()))?;
                Some((stage, logits_shape.get(1).copied().unwrap_or(1)))
            }
            _ => None,
        };
        let mut loss_v = None;
        let mut params = Vec::new();
        let mut selection: Option<usize> = None;
        let mut second: Option<(usize, usize)> = None;
        // The parameter guard (optim.rs): every program that changes persistent state opens with
        // `guard_begin` and ends with the checks of everything it would commit, then the commits.
        let commits = std::mem::take(&mut hook.commits);
        let frame_commits = std::mem::take(&mut hook.frame_commits);
        // Method state computed ahead and committed with the step: (value, offset, weight, n).
        let mut deferred: Vec<Deferred> = output.as_ref().and_then(|(stage, _)| stage.deferred).into_iter().collect();
        let guard_state = if training {
            Some(program.weight("opt:state", || WeightInit::Tensor(std::sync::Arc::new(optim::initial_state())), true))
        } else if !commits.is_empty() || !frame_commits.is_empty() || !deferred.is_empty() {
            Some(program.weight(GUARD_STATE, || WeightInit::Tensor(std::sync::Arc::new(optim::initial_state())), true))
        } else {
            None
        };
        if let Some(state) = guard_state {
            program.items.insert(
                0,
                Item {
                    label: "guard begin".into(),
                    dispatches: vec![optim::guard_begin(BufRef::Weight(state))],
                    scratch: vec![],
                },
            );
        }
        let stats_checks = |state: usize| -> Vec<crate::ops::Dispatch> {
            commits
                .iter()
                .map(|c| {
                    optim::guard_check(BufRef::Weight(state), BufRef::Value(c.stats), 2 * c.channels, 2 * c.channels)
                })
                .chain(
                    frame_commits
                        .iter()
                        .map(|&(v, _, n)| optim::guard_check(BufRef::Weight(state), BufRef::Value(v), 0, n)),
                )
                .collect()
        };
        let stats_commits = |state: usize| -> Vec<crate::ops::Dispatch> {
            commits
                .iter()
                .map(|c| optim::commit_stats(BufRef::Weight(state), BufRef::Value(c.stats), c.mean, c.var, c.channels))
                .chain(
                    frame_commits
                        .iter()
                        .map(|&(v, dst, n)| optim::commit_copy(BufRef::Weight(state), BufRef::Value(v), 0, dst, n)),
                )
                .collect()
        };
        if training {
            if logits_shape.len() != 2 {
                return Err(err(format!("adaptation needs logits of shape [batch, classes], got {logits_shape:?}")));
            }
            let (b, c) = (logits_shape[0], logits_shape[1]);
            let (loss, dlogits) = (program.value(4), program.value(bytes_of(&logits_shape)));
            loss_v = Some(loss);
            let state = guard_state.ok_or_else(|| err("a training program has an optimizer state"))?;
            let objective = spec.objective.as_ref().ok_or_else(|| err("a training program has an objective"))?;
            let mut cx = StepCx {
                ctx,
                graph,
                fwd: &fwd,
                shape,
                program: &mut program,
                mode: spec.mode,
                adapted: &spec.adapted,
                logits: logits_v,
                forwarded: &forwarded.values,
                logits_shape: &logits_shape,
                b,
                c,
                state,
                loss,
                dlogits,
                deferred: &mut deferred,
                selection: None,
                second: None,
                carried: None,
            };
            let mut scratch = Vec::new();
            let mut dispatches = Vec::new();
            let coeff = objective.select(&mut cx, &mut dispatches)?;
            objective.loss(&mut cx, coeff, &mut dispatches, &mut scratch)?;
            cx.program.items.push(Item { label: "loss".into(), dispatches, scratch });
            cx.program.flops.other += crate::ops::flops::LOSS_PER_LOGIT * (b * c) as u64;
            let grads = reverse_pass(ctx, graph, &fwd, &hook, &spec.adapted, logits_v, dlogits, cx.program)?;
            let param_grads = objective.gradients(&mut cx, grads)?;
            let mut dispatches = Vec::new();
            let mut scratch = Vec::new();
            for (name, grad) in &param_grads {
                let (weight, n) = parameter(cx.program, name)?;
                let param = Param { name, weight, n, grad: *grad };
                objective.parameter(&mut cx, param, &mut dispatches, &mut scratch)?;
            }
            if objective.updates() {
                // The guard's checks of every update and of the RBN statistics, before anything
                // is written; then one optimizer update per adapted tensor, the step counter and
                // the statistics, each a no-op when a check tripped.
                let mut updates = Vec::new();
                let mut updated = Vec::new();
                let program = &mut *cx.program;
                for (name, grad) in &param_grads {
                    let (p, n) = parameter(program, name)?;
                    // Only the moments the optimizer keeps (none for plain SGD, the momentum
                    // buffer for SGD with momentum, m and v for Adam); unused bindings may alias
                    // any buffer.
                    // Adam's m and v share one buffer, [m (n), v (n)]: downlevel limits allow
                    // 4 storage buffers per kernel.
                    let moments = spec.optimizer.moment_buffers();
                    let m = if moments >= 1 {
                        program.weight(&format!("opt:m:{name}"), || WeightInit::Zeros(moments * n), true)
                    } else {
                        p
                    };
                    let v = m;
                    updated.push(Updated { weight: p, grad: *grad, m, v, n });
                    program.flops.other += crate::ops::flops::optimizer_per_param(moments) * n as u64;
                    let (p, g, m, v, st) = (
                        BufRef::Weight(p),
                        BufRef::Value(*grad),
                        BufRef::Weight(m),
                        BufRef::Weight(v),
                        BufRef::Weight(state),
                    );
                    dispatches.extend(optim::check(&spec.optimizer, p, g, m, v, st, n));
                    updates.extend(optim::step(&spec.optimizer, p, g, m, v, st, n));
                    params.push(name.clone());
                }
                let (checks, writes) = objective.after_update(&mut cx, &spec.optimizer, &updated)?;
                dispatches.extend(checks);
                updates.extend(writes);
                dispatches.extend(stats_checks(state));
                dispatches.extend(updates);
                dispatches.extend(optim::commit(BufRef::Weight(state)));
                dispatches.extend(stats_commits(state));
                dispatches.extend(deferred_commits(state, cx.deferred));
            } else {
                dispatches.extend(stats_checks(state));
                dispatches.extend(stats_commits(state));
                dispatches.extend(deferred_commits(state, cx.deferred));
            }
            cx.program.items.push(Item { label: "update".into(), dispatches, scratch });
            cx.program.pinned_end.push(loss);
            selection = cx.selection;
            second = cx.second;
        } else if let Some(state) = guard_state {
            let mut dispatches = stats_checks(state);
            dispatches.extend(stats_commits(state));
            dispatches.extend(deferred_commits(state, &deferred));
            program.items.push(Item { label: "guard commit".into(), dispatches, scratch: vec![] });
        }
        let compiled = Compiled::compile(ctx, &program, store)?;
        Ok(StepPlan {
            input: fwd.inputs[0].1,
            input_shape: shape.to_vec(),
            staging_logits: staging(ctx, bytes_of(&logits_shape)),
            staging_loss: staging(ctx, 4),
            selection: selection.map(|v| (v, staging(ctx, 2 * shape[0] as u64 * 4))),
            second: second.map(|(l, s)| (l, s, staging(ctx, 4), staging(ctx, (shape[0] as u64 + 1) * 4))),
            output: output.map(|(stage, classes)| OutputReadback {
                probs: staging(ctx, bytes_of(&[shape[0], classes])),
                prior: stage.prior.map(|_| staging(ctx, classes as u64 * 4)),
                stage,
                classes,
            }),
            guard: guard_state.map(|g| (g, staging(ctx, optim::STATE_LEN as u64 * 4))),
            logits: (returned, logits_shape),
            loss: loss_v,
            dispatch_count: compiled.dispatch_count(),
            flops: program.flops,
            transient_bytes: compiled.transient_bytes,
            params,
            compiled,
        })
    }

    /// Runs the step on `x`: one encoder, one submit, one readback.
    pub fn run(&self, ctx: &GpuContext, x: &[f32]) -> Result<StepOutput, PlanError> {
        self.run_with(ctx, x, true)
    }

    /// [`StepPlan::run`]; `update_state` false holds the output stage's running estimate (the
    /// later steps on a batch, whose predictions are not returned).
    pub fn run_with(&self, ctx: &GpuContext, x: &[f32], update_state: bool) -> Result<StepOutput, PlanError> {
        self.run_paced(ctx, x, update_state, None)
    }

    /// A proxy of the program's GPU work (its dispatches' workgroups, see [`Pacer`]).
    pub fn work(&self) -> u64 {
        self.compiled.dispatch_work().iter().sum()
    }

    /// [`StepPlan::run_with`], its GPU work paced by `pacer` when given: everything before the
    /// first item that writes the model's persistent state is submitted in chunks of about
    /// [`Pacer::chunk`] work, each waited for before the next is submitted (so another thread's
    /// submissions, a stream's predictions, wait for at most one chunk); then the pacer's gate
    /// is waited for, and the rest (the writes, the readbacks) is submitted at once.
    pub fn run_paced(
        &self,
        ctx: &GpuContext,
        x: &[f32],
        update_state: bool,
        pacer: Option<&Pacer>,
    ) -> Result<StepOutput, PlanError> {
        if x.len() != self.input_shape.iter().product::<usize>() {
            return Err(PlanError::InputData { name: "input".into(), shape: self.input_shape.clone(), len: x.len() });
        }
        ctx.queue.write_buffer(self.compiled.value_buffer(self.input), 0, bytemuck::cast_slice(x));
        if let Some(g) = self.output.as_ref().and_then(|o| o.stage.gate) {
            let gate = [if update_state { 1.0f32 } else { 0.0 }];
            ctx.queue.write_buffer(&self.compiled.weight_buffers[g], 0, bytemuck::cast_slice(&gate));
        }
        let n = self.compiled.dispatch_count();
        let mut start = 0;
        if let Some(pacer) = pacer {
            let gated = self.compiled.first_dispatch_of(|label| WRITES_MODEL_STATE.contains(&label)).unwrap_or(n);
            let work = self.compiled.dispatch_work();
            let chunk = pacer.chunk(work[..gated].iter().sum());
            while start < gated {
                let (mut end, mut sum) = (start, 0u64);
                while end < gated && (end == start || sum + work[end] <= chunk) {
                    sum += work[end];
                    end += 1;
                }
                let mut encoder =
                    ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step chunk") });
                self.compiled.record_range(&mut encoder, "step chunk", start..end);
                let index = ctx.queue.submit([encoder.finish()]);
                ctx.device.poll(wgpu::PollType::Wait { submission_index: Some(index), timeout: None }).map_err(
                    |e| ctx.check().err().unwrap_or(crate::gpu::GpuError::Readback(format!("a step chunk: {e}"))),
                )?;
                start = end;
            }
            pacer.gate.wait();
        }
        let mut encoder =
            ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("adapt step") });
        self.compiled.record_range(&mut encoder, "adapt step", start..n);
        let lb = bytes_of(&self.logits.1).div_ceil(4) * 4;
        encoder.copy_buffer_to_buffer(self.compiled.value_buffer(self.logits.0), 0, &self.staging_logits, 0, lb);
        if let Some(l) = self.loss {
            encoder.copy_buffer_to_buffer(self.compiled.value_buffer(l), 0, &self.staging_loss, 0, 4);
        }
        let b = self.input_shape[0];
        if let Some((v, st)) = &self.selection {
            encoder.copy_buffer_to_buffer(self.compiled.value_buffer(*v), 0, st, 0, 2 * b as u64 * 4);
        }
        if let Some((l, s, lst, sst)) = &self.second {
            encoder.copy_buffer_to_buffer(self.compiled.value_buffer(*l), 0, lst, 0, 4);
            encoder.copy_buffer_to_buffer(self.compiled.value_buffer(*s), 0, sst, 0, (b as u64 + 1) * 4);
        }
        if let Some(o) = &self.output {
            let v = self.compiled.value_buffer(o.stage.probs);
            encoder.copy_buffer_to_buffer(v, 0, &o.probs, 0, (b * o.classes) as u64 * 4);
            if let (Some(q), Some(st)) = (o.stage.prior, &o.prior) {
                encoder.copy_buffer_to_buffer(self.compiled.value_buffer(q), 0, st, 0, o.classes as u64 * 4);
            }
        }
        if let Some((g, st)) = &self.guard {
            encoder.copy_buffer_to_buffer(&self.compiled.weight_buffers[*g], 0, st, 0, optim::STATE_LEN as u64 * 4);
        }
        ctx.queue.submit([encoder.finish()]);
        let n: usize = self.logits.1.iter().product();
        let logits = Tensor::f32(self.logits.1.clone(), read_buffer(ctx, &self.staging_logits, n)?);
        let loss = match self.loss {
            Some(_) => Some(read_buffer(ctx, &self.staging_loss, 1)?[0]),
            None => None,
        };
        let selected = match &self.selection {
            Some((_, st)) => {
                let sel = read_buffer(ctx, st, 2 * b)?;
                let idx: Vec<usize> = (0..b).filter(|&i| sel[i] != 0.0).collect();
                let w = idx.iter().map(|&i| sel[b + i]).collect();
                Some((idx, w))
            }
            None => None,
        };
        let second = match &self.second {
            Some((_, _, lst, sst)) => {
                let l = read_buffer(ctx, lst, 1)?[0];
                let sel = read_buffer(ctx, sst, b + 1)?;
                Some((l, sel[b] as usize))
            }
            None => None,
        };
        let (probs, prior) = match &self.output {
            Some(o) => {
                let probs = Tensor::f32(vec![b, o.classes], read_buffer(ctx, &o.probs, b * o.classes)?);
                let prior = match &o.prior {
                    Some(st) => Some(read_buffer(ctx, st, o.classes)?),
                    None => None,
                };
                (Some(probs), prior)
            }
            None => (None, None),
        };
        let (skipped, stepped) = match &self.guard {
            Some((_, st)) => {
                let state = read_buffer(ctx, st, optim::STATE_LEN)?;
                let skipped = state[optim::STATE_NON_FINITE] != 0.0;
                (skipped, self.loss.is_some() && !self.params.is_empty() && state[optim::STATE_GATE] != 0.0 && !skipped)
            }
            None => (false, false),
        };
        Ok(StepOutput { logits, loss, selected, second, probs, prior, skipped, stepped })
    }
}

/// Labels of the program items that write what a prediction reads (parameters, statistics,
/// method state): SAR's ascent moves the parameters, the update and the guard's commit write
/// parameters, statistics and deferred state. A paced step ([`StepPlan::run_paced`]) submits
/// nothing from the first of them on before its gate opens.
pub const WRITES_MODEL_STATE: [&str; 3] = ["sam ascent", "update", "guard commit"];

/// A one-shot gate: closed until [`Latch::open`], then open for good.
#[derive(Debug, Default)]
pub struct Latch {
    open: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Latch {
    pub fn open(&self) {
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }

    pub fn is_open(&self) -> bool {
        *self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn wait(&self) {
        let mut g = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while !*g {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// How a step shares the GPU queue with a stream's predictions (frame mode's background steps):
/// its work before the state writes goes in chunks of about one prediction's work, or of the
/// step's `1/spread` when that is larger (so a step still ends within `spread` predictions when
/// chunks and predictions alternate); its writes wait for `gate`.
#[derive(Debug)]
pub struct Pacer {
    /// The work of one prediction ([`StepPlan::work`] of the frame's program).
    pub prediction: u64,
    /// Predictions the step may spread over (`adapt_every`).
    pub spread: u64,
    pub gate: Latch,
}

impl Pacer {
    pub fn new(prediction: u64, spread: u64) -> Pacer {
        Pacer { prediction: prediction.max(1), spread: spread.max(1), gate: Latch::default() }
    }

    /// The work per submission for a program with `total` work before its writes.
    pub fn chunk(&self, total: u64) -> u64 {
        self.prediction.max(total.div_ceil(self.spread))
    }
}

/// The parameter guard's commits of method state computed ahead ((value, offset, weight, n):
/// EATA's m, the label-shift estimate), each a no-op when the step was refused.
fn deferred_commits(state: usize, deferred: &[Deferred]) -> Vec<crate::ops::Dispatch> {
    deferred
        .iter()
        .map(|&(src, offset, dst, n)| {
            optim::commit_copy(BufRef::Weight(state), BufRef::Value(src), offset, BufRef::Weight(dst), n)
        })
        .collect()
}
