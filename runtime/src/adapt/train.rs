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
use super::methods::auto;
use super::methods::{AfterForward, Deferred, Objective, Param, StepCx, Updated};
use super::optim::{self, OptimizerSpec};
pub use super::reverse::AdaptedLayer;
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
    pub adapted: Vec<AdaptedLayer>,
    pub optimizer: OptimizerSpec,
    /// What a step with adapted layers minimises (the method's, or EATA's Fisher pass).
    pub objective: Option<Arc<dyn Objective>>,
    /// LAME / label-shift stages after the forward pass ([`super::output`]).
    pub output: Option<Arc<super::output::OutputSpec>>,
    /// Normalise with the source scale and bias instead of the adapted ones (the unadapted model
    /// method `auto` judges the stream with).
    pub source_affine: bool,
    /// Split long dispatches along z into pieces of at most this many workgroups (0: never; see
    /// [`Program::z_piece`]): paced steps.
    pub z_piece: u32,
    /// Forward-only programs without an output stage: read back only the `top_k` most probable
    /// classes of each row and their probabilities, computed on the GPU
    /// ([`StepOutput::top`]), instead of the logits (0: the logits).
    pub top_k: usize,
    /// Compute each BatchNormalization layer's covariate-shift score on the GPU and read the
    /// scores back ([`StepOutput::shift`]): method auto's judging forward.
    pub shift_score: bool,
    /// Method auto's batch statistics computed in the program ([`StepOutput::stats`]).
    pub diagnostics: Diagnose,
    /// Forward-only programs fuse what they may (convolutions with their fixed-statistics
    /// BatchNormalization and activation, the adapted layers with their activation); false
    /// lowers one pass per node: the reference the fused programs are tested against.
    pub fuse: bool,
}

/// Which of method auto's batch statistics ([`auto::BatchStats`]) a program computes on the GPU
/// after its forward pass and reads back in place of the predictions it judges by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Diagnose {
    #[default]
    Off,
    /// The judging pass: the source predictions' statistics (their top-1 classes kept on the
    /// GPU in [`auto::REFERENCE_PREFIX`]`B` for the step to compare with), and against them those of the output
    /// stage's probabilities and of the predictions corrected by the class-prior estimate
    /// [`auto::PRIOR`]. The logits and the output stage's probabilities are not read back with
    /// the run: [`StepPlan::read_predictions`] reads them when the batch returns them.
    Judge,
    /// A step: its returned predictions' statistics against the judging pass's top-1 classes.
    Returned,
}

/// [`StepSpec::z_piece`] of paced steps: 4 images (× groups, × stride phases) per convolution
/// dispatch. On lavapipe a batch-64 convolution of the SVHN network is one 400–600 ms dispatch
/// (its first layer's reverse pass), where a frame's forward pass takes 30 ms; in pieces of 4
/// the longest is about 37 ms (pieces of 8: a p95 latency 2.2× the median at 3 frames/s, of
/// 4: 1.4×; README "Steps that never stall a prediction").
pub const PACED_Z_PIECE: u32 = 4;

/// A compiled step for one input shape.
pub struct StepPlan {
    pub(crate) compiled: Compiled,
    /// [`StepSpec::top_k`]: the value holding [k indices, k probabilities] per row, k, and its
    /// staging buffer (read back instead of the logits).
    top: Option<(usize, usize, wgpu::Buffer)>,
    /// Paced runs ([`StepPlan::run_paced`]): the chunks' measured milliseconds, the least seen
    /// per chunk (a chunk may also wait for a prediction queued ahead of it).
    chunk_ms: std::sync::Mutex<Vec<f64>>,
    input: usize,
    pub input_shape: Vec<usize>,
    logits: (usize, Vec<usize>),
    loss: Option<usize>,
    staging_logits: wgpu::Buffer,
    staging_loss: wgpu::Buffer,
    /// A selection read back (ETA/EATA, WoC): [flags (B), weights (B)], and its staging buffer.
    selection: Option<(usize, wgpu::Buffer)>,
    /// [`StepSpec::shift_score`]: the value holding the layers' scores, how many, and its staging
    /// buffer.
    shift: Option<(usize, usize, wgpu::Buffer)>,
    /// [`StepSpec::diagnostics`]: which statistics, the value holding each block, and the
    /// blocks' staging buffer.
    stats: Vec<(auto::StatsOf, usize)>,
    staging_stats: Option<wgpu::Buffer>,
    /// [`Diagnose::Judge`]: the predictions are read on request ([`StepPlan::read_predictions`]).
    deferred: bool,
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
    /// The label-distribution estimate the output stage corrected with \[C\].
    pub prior: Option<Vec<f32>>,
    /// The parameter guard refused the step: something it would have written (a parameter, an
    /// optimizer moment, a running statistic) was NaN or infinite, so nothing was written.
    pub skipped: bool,
    /// Programs built with [`StepSpec::top_k`]: per row, the most probable classes (most
    /// probable first) and their probabilities; `logits` is then empty (never read back).
    pub top: Option<Vec<Vec<(usize, f32)>>>,
    /// The optimizer updated the parameters (its gate stayed open: something was selected and
    /// nothing was refused). False for programs without a gradient step.
    pub stepped: bool,
    /// [`StepSpec::shift_score`]: per BatchNormalization layer (in the graph's order), the mean
    /// over its channels of KL(batch statistics ‖ stored statistics) (`bn_shift`).
    pub shift: Option<Vec<f32>>,
    /// [`StepSpec::diagnostics`]: the batch statistics computed on the GPU.
    pub stats: auto::PassStats,
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
        Self::build_or_warm(ctx, graph, Some(store), shape, spec)?
            .ok_or_else(|| err("the step program was lowered but not built"))
    }

    /// Compiles the pipelines of the step program [`StepPlan::build`] would build for `shape`
    /// into the context's cache, without creating a buffer or touching any weight: a later build
    /// of the same program compiles nothing. The frame stream runs it when it is made
    /// ([`crate::adapt::Session::step_warmer`]). Returns how many of the program's pipelines
    /// were not compiled yet.
    pub fn warm(ctx: &GpuContext, graph: &Graph, shape: &[usize], spec: &StepSpec) -> Result<usize, PlanError> {
        let before = ctx.pipeline_count();
        Self::build_or_warm(ctx, graph, None, shape, spec)?;
        Ok(ctx.pipeline_count().saturating_sub(before))
    }

    /// [`StepPlan::build`] with a store; without one, the lowering only, then the pipelines of
    /// every dispatch compiled ([`StepPlan::warm`]).
    fn build_or_warm(
        ctx: &GpuContext,
        graph: &Graph,
        store: Option<&mut WeightStore>,
        shape: &[usize],
        spec: &StepSpec,
    ) -> Result<Option<StepPlan>, PlanError> {
        if graph.inputs.len() != 1 {
            return Err(err(format!("adaptation needs a model with one input, this one has {}", graph.inputs.len())));
        }
        let training = !spec.adapted.is_empty();
        let mut program = Program { z_piece: spec.z_piece, ..Program::default() };
        let mut hook = BnHook::new(spec.mode, training || spec.source_affine);
        hook.source_affine = spec.source_affine;
        if spec.source_affine {
            hook.source_params = super::bn::affine_norm_params(graph);
        }
        hook.fuse = spec.fuse && !training && spec.output.is_none() && !spec.shift_score;
        // Nothing but the outputs (and the tensors an output stage names) is read back: the
        // layers lowered here apply the activation after them in the same pass.
        hook.fuse_activation = spec.fuse
            && !training
            && spec.output.as_ref().is_none_or(|o| !o.stages.iter().any(|s| s.reads_named_tensor()));
        if spec.shift_score {
            let layers = graph.nodes.iter().filter(|n| matches!(n.op, crate::ops::Op::BatchNorm(_))).count();
            if layers > 0 {
                let out = program.value(layers as u64 * 4);
                program.pinned_end.push(out);
                hook.shift = Some(super::bn::ShiftScores { out, layers, written: 0 });
            }
        }
        let fwd = lower_forward(ctx, graph, &[shape.to_vec()], &mut program, &mut hook)?;
        let (logits_v, logits_shape) = match (softmax_logits(graph, &fwd), fwd.outputs.first()) {
            // A classifier that puts out probabilities adapts on the logits its Softmax reads
            // (entropies and steps of the softmax of probabilities would be near uniform).
            (Some((v, shape)), _) => {
                program.pinned_end.push(v);
                (v, crate::tensor::class_rows_shape(&shape))
            }
            (None, Some((_, GraphOutput::Value { id, shape }))) => (*id, crate::tensor::class_rows_shape(shape)),
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
        // Only the top-k of a forward-only program's rows comes back.
        let top = match (spec.top_k, &logits_shape[..]) {
            (k, &[b, c]) if k > 0 && spec.adapted.is_empty() && output.is_none() => {
                let k = crate::ops::softmax::top_k_of(k, c);
                let out = program.value((b * 2 * k) as u64 * 4);
                program.pinned_end.push(out);
                let d = crate::ops::softmax::top_k(BufRef::Value(returned), BufRef::Value(out), b, c, k);
                program.items.push(Item { label: "top-k".into(), dispatches: vec![d], scratch: vec![] });
                Some((out, k, staging(ctx, (b * 2 * k) as u64 * 4)))
            }
            _ => None,
        };
        // Method auto's statistics of what the pass predicts, before anything else can reuse
        // the logits' buffer.
        let mut stats = Vec::new();
        if spec.diagnostics != Diagnose::Off {
            let &[b, c] = &logits_shape[..] else {
                return Err(err(format!("diagnostics need logits of shape [batch, classes], got {logits_shape:?}")));
            };
            let reference = BufRef::Weight(program.weight(
                &format!("{}{b}", auto::REFERENCE_PREFIX),
                || WeightInit::Zeros(b),
                true,
            ));
            let mut dispatches = Vec::new();
            let mut block = |program: &mut Program, of: auto::StatsOf, d: &dyn Fn(BufRef) -> crate::ops::Dispatch| {
                let out = program.value(auto::stats_len(b, c) as u64 * 4);
                program.pinned_end.push(out);
                dispatches.push(d(BufRef::Value(out)));
                stats.push((of, out));
            };
            let rows = BufRef::Value(returned);
            match spec.diagnostics {
                Diagnose::Judge => {
                    let logits = BufRef::Value(logits_v);
                    block(&mut program, auto::StatsOf::Source, &|out| {
                        auto::stats_dispatch(logits, logits, reference, out, b, c, auto::Rows::Logits, false)
                    });
                    if let Some((stage, _)) = &output {
                        let probs = BufRef::Value(stage.probs);
                        block(&mut program, auto::StatsOf::Smoothed, &|out| {
                            auto::stats_dispatch(probs, probs, reference, out, b, c, auto::Rows::Probs, true)
                        });
                    }
                    let uniform = || WeightInit::Tensor(Arc::new(Tensor::f32(vec![c], vec![1.0 / c as f32; c])));
                    let prior = BufRef::Weight(program.weight(auto::PRIOR, uniform, true));
                    block(&mut program, auto::StatsOf::Corrected, &|out| {
                        auto::stats_dispatch(logits, prior, reference, out, b, c, auto::Rows::Corrected, true)
                    });
                }
                Diagnose::Returned => block(&mut program, auto::StatsOf::Returned, &|out| {
                    auto::stats_dispatch(rows, rows, reference, out, b, c, auto::Rows::Logits, true)
                }),
                Diagnose::Off => {}
            }
            program.flops.other += (stats.len() * 8 * b * c) as u64;
            program.items.push(Item { label: "diagnostics".into(), dispatches, scratch: vec![] });
        }
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
        let shift = hook.shift.as_ref().filter(|s| s.written > 0).map(|s| (s.out, s.written));
        let Some(store) = store else {
            for d in program.items.iter().flat_map(|item| &item.dispatches) {
                ctx.pipeline(&d.key)?;
            }
            return Ok(None);
        };
        let compiled = Compiled::compile(ctx, &program, store)?;
        let block_bytes = (auto::stats_len(shape[0], logits_shape.last().copied().unwrap_or(1)) * 4) as u64;
        Ok(Some(StepPlan {
            shift: shift.map(|(v, n)| (v, n, staging(ctx, n as u64 * 4))),
            staging_stats: (!stats.is_empty()).then(|| staging(ctx, block_bytes * stats.len() as u64)),
            stats,
            deferred: spec.diagnostics == Diagnose::Judge,
            chunk_ms: Default::default(),
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
            top,
            loss: loss_v,
            dispatch_count: compiled.dispatch_count(),
            flops: program.flops,
            transient_bytes: compiled.transient_bytes,
            params,
            compiled,
        }))
    }

    /// Runs the step on `x`: one encoder, one submit, one readback.
    pub fn run(&self, ctx: &GpuContext, x: &[f32]) -> Result<StepOutput, PlanError> {
        self.run_with(ctx, x, true)
    }

    /// [`StepPlan::run`]; `update_state` false holds the output stage's running estimate (the
    /// later steps on a batch, whose predictions are not returned).
    pub fn run_with(&self, ctx: &GpuContext, x: &[f32], update_state: bool) -> Result<StepOutput, PlanError> {
        self.run_paced(ctx, StepInput::Host(x), update_state, None)
    }

    /// The class count: the last dimension of the logits.
    pub fn output_classes(&self) -> usize {
        self.logits.1.last().copied().unwrap_or(1).max(1)
    }

    /// Sets α of the program's BN-α layers for its next runs (method `auto`'s falling source
    /// prior); returns how many parameter blocks changed (0: the program has no BN-α layer).
    pub fn set_bn_alpha(&self, ctx: &GpuContext, alpha: f32) -> usize {
        self.compiled.set_bn_alpha(&ctx.queue, alpha)
    }

    /// Sets the frame statistics' weight of the recent frames' evidence
    /// ([`crate::plan::Compiled::set_frame_alpha`]); returns how many blocks it wrote.
    pub fn set_frame_alpha(&self, ctx: &GpuContext, alpha: f32) -> usize {
        self.compiled.set_frame_alpha(&ctx.queue, alpha)
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
        input: StepInput<'_>,
        update_state: bool,
        pacer: Option<&Pacer>,
    ) -> Result<StepOutput, PlanError> {
        let len = self.input_shape.iter().product::<usize>();
        let dst = self.compiled.value_buffer(self.input);
        match input {
            StepInput::Host(x) => {
                if x.len() != len {
                    return Err(PlanError::InputData {
                        name: "input".into(),
                        shape: self.input_shape.clone(),
                        len: x.len(),
                    });
                }
                ctx.queue.write_buffer(dst, 0, bytemuck::cast_slice(x));
            }
            StepInput::Gpu { buffer, offset } => {
                let bytes = len as u64 * 4;
                if offset % 4 != 0 || buffer.size() < offset + bytes {
                    return Err(PlanError::Program(format!(
                        "a GPU input of {bytes} bytes at offset {offset} of a {}-byte buffer",
                        buffer.size()
                    )));
                }
                // A copy on the GPU, ahead of the program in the queue.
                let mut encoder =
                    ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step input") });
                encoder.copy_buffer_to_buffer(buffer, offset, dst, 0, bytes);
                ctx.queue.submit([encoder.finish()]);
            }
        }
        if let Some(g) = self.output.as_ref().and_then(|o| o.stage.gate) {
            let gate = [if update_state { 1.0f32 } else { 0.0 }];
            ctx.queue.write_buffer(&self.compiled.weight_buffers[g], 0, bytemuck::cast_slice(&gate));
        }
        let n = self.compiled.dispatch_count();
        let mut start = 0;
        if let Some(pacer) = pacer {
            let gated = self.compiled.first_dispatch_of(|label| WRITES_MODEL_STATE.contains(&label)).unwrap_or(n);
            let work = self.compiled.dispatch_work();
            let pieces = self.compiled.dispatch_pieces();
            let mut ranges = Vec::new();
            while start < gated {
                let (mut end, mut sum) = (start, 0u64);
                // A piece of a split dispatch is long whatever its workgroup count says: alone.
                while end < gated
                    && (end == start || (sum + work[end] <= pacer.prediction && !pieces[end] && !pieces[end - 1]))
                {
                    sum += work[end];
                    end += 1;
                }
                ranges.push(start..end);
                start = end;
            }
            // The chunks' costs: measured on an earlier run, else their share of the work at
            // the prediction's measured speed.
            let measured = self.chunk_ms.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let estimated = measured.len() != ranges.len();
            let costs: Vec<f64> = match estimated {
                false => measured,
                true => ranges
                    .iter()
                    .map(|r| work[r.clone()].iter().sum::<u64>() as f64 / pacer.prediction as f64 * pacer.prediction_ms)
                    .collect(),
            };
            pacer.plan(costs.iter().sum(), ranges.len() as u64, estimated);
            let begun = std::time::Instant::now();
            let chunks = ranges.len();
            let mut took = Vec::with_capacity(chunks);
            for (range, &cost) in ranges.into_iter().zip(&costs) {
                let charged = pacer.before_chunk(cost, estimated);
                let t = std::time::Instant::now();
                let mut encoder =
                    ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step chunk") });
                self.compiled.record_range(&mut encoder, "step chunk", range.clone());
                let index = ctx.queue.submit([encoder.finish()]);
                ctx.device.poll(wgpu::PollType::Wait { submission_index: Some(index), timeout: None }).map_err(
                    |e| ctx.check().err().unwrap_or(crate::gpu::GpuError::Readback(format!("a step chunk: {e}"))),
                )?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                if ms > 4.0 * pacer.prediction_ms {
                    log::debug!("long step chunk {range:?}: {ms:.1} ms ({})", self.compiled.describe(range.clone()));
                }
                if estimated {
                    pacer.after_chunk(cost, ms, charged);
                }
                took.push(ms);
            }
            {
                let mut m = self.chunk_ms.lock().unwrap_or_else(|e| e.into_inner());
                if m.len() == took.len() {
                    m.iter_mut().zip(&took).for_each(|(a, &b)| *a = a.min(b));
                } else {
                    *m = took;
                }
            }
            log::debug!(
                "paced step: {chunks} chunks of {gated} dispatches in {:.1} ms; waiting for the gate",
                begun.elapsed().as_secs_f64() * 1e3
            );
            pacer.wait_release();
        }
        let mut encoder =
            ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("adapt step") });
        self.compiled.record_range(&mut encoder, "adapt step", start..n);
        match &self.top {
            Some((v, k, st)) => {
                let bytes = (self.input_shape[0] * 2 * k) as u64 * 4;
                encoder.copy_buffer_to_buffer(self.compiled.value_buffer(*v), 0, st, 0, bytes);
            }
            None if self.deferred => {}
            None => self.copy_logits(&mut encoder),
        }
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
        if let Some(o) = self.output.as_ref().filter(|_| !self.deferred) {
            self.copy_output(&mut encoder, o);
        }
        let block = self.stats_block_len();
        if let Some(st) = &self.staging_stats {
            for (i, (_, v)) in self.stats.iter().enumerate() {
                let (bytes, at) = (block as u64 * 4, (i * block) as u64 * 4);
                encoder.copy_buffer_to_buffer(self.compiled.value_buffer(*v), 0, st, at, bytes);
            }
        }
        if let Some((g, st)) = &self.guard {
            encoder.copy_buffer_to_buffer(&self.compiled.weight_buffers[*g], 0, st, 0, optim::STATE_LEN as u64 * 4);
        }
        if let Some((v, n, st)) = &self.shift {
            encoder.copy_buffer_to_buffer(self.compiled.value_buffer(*v), 0, st, 0, *n as u64 * 4);
        }
        ctx.queue.submit([encoder.finish()]);
        let (logits, top) = match &self.top {
            Some((_, k, st)) => {
                let rows = self.input_shape[0];
                let raw = read_buffer(ctx, st, rows * 2 * k)?;
                let top = raw.chunks(2 * k).map(|r| (0..*k).map(|q| (r[q] as usize, r[k + q])).collect()).collect();
                (Tensor::f32(vec![0], Vec::new()), Some(top))
            }
            None if self.deferred => (Tensor::f32(vec![0], Vec::new()), None),
            None => (self.read_logits(ctx)?, None),
        };
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
        let (probs, prior) = match self.output.as_ref().filter(|_| !self.deferred) {
            Some(o) => self.read_output(ctx, o)?,
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
        let shift = match &self.shift {
            Some((_, n, st)) => Some(read_buffer(ctx, st, *n)?),
            None => None,
        };
        let mut stats = auto::PassStats::default();
        if let Some(st) = &self.staging_stats {
            let raw = read_buffer(ctx, st, block * self.stats.len())?;
            let (rows, classes) = (self.input_shape[0], self.output_classes());
            for ((of, _), chunk) in self.stats.iter().zip(raw.chunks(block)) {
                let s = auto::BatchStats::from_block(chunk, rows, classes)
                    .ok_or_else(|| err("a diagnostics block came back short"))?;
                *stats.get_mut(*of) = Some(s);
            }
        }
        Ok(StepOutput { logits, loss, selected, second, probs, prior, skipped, stepped, top, shift, stats })
    }

    fn stats_block_len(&self) -> usize {
        auto::stats_len(self.input_shape[0], self.output_classes())
    }

    fn copy_logits(&self, encoder: &mut wgpu::CommandEncoder) {
        let lb = bytes_of(&self.logits.1).div_ceil(4) * 4;
        encoder.copy_buffer_to_buffer(self.compiled.value_buffer(self.logits.0), 0, &self.staging_logits, 0, lb);
    }

    fn read_logits(&self, ctx: &GpuContext) -> Result<Tensor, PlanError> {
        let n: usize = self.logits.1.iter().product();
        Ok(Tensor::f32(self.logits.1.clone(), read_buffer(ctx, &self.staging_logits, n)?))
    }

    fn copy_output(&self, encoder: &mut wgpu::CommandEncoder, o: &OutputReadback) {
        let b = self.input_shape[0];
        let v = self.compiled.value_buffer(o.stage.probs);
        encoder.copy_buffer_to_buffer(v, 0, &o.probs, 0, (b * o.classes) as u64 * 4);
        if let (Some(q), Some(st)) = (o.stage.prior, &o.prior) {
            encoder.copy_buffer_to_buffer(self.compiled.value_buffer(q), 0, st, 0, o.classes as u64 * 4);
        }
    }

    #[allow(clippy::type_complexity)]
    fn read_output(
        &self,
        ctx: &GpuContext,
        o: &OutputReadback,
    ) -> Result<(Option<Tensor>, Option<Vec<f32>>), PlanError> {
        let b = self.input_shape[0];
        let probs = Tensor::f32(vec![b, o.classes], read_buffer(ctx, &o.probs, b * o.classes)?);
        let prior = match &o.prior {
            Some(st) => Some(read_buffer(ctx, st, o.classes)?),
            None => None,
        };
        Ok((Some(probs), prior))
    }

    /// A [`Diagnose::Judge`] program's predictions of its last run, which the run left on the
    /// GPU: the logits and the output stage's probabilities (`None` without an output stage).
    /// Valid until the program runs again.
    pub fn read_predictions(&self, ctx: &GpuContext) -> Result<(Tensor, Option<Tensor>), PlanError> {
        let mut encoder =
            ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("read predictions") });
        self.copy_logits(&mut encoder);
        if let Some(o) = &self.output {
            self.copy_output(&mut encoder, o);
        }
        ctx.queue.submit([encoder.finish()]);
        let logits = self.read_logits(ctx)?;
        let probs = match &self.output {
            Some(o) => self.read_output(ctx, o)?.0,
            None => None,
        };
        Ok((logits, probs))
    }
}

/// The logits of a classifier whose first output is their softmax ([`Graph::softmax_head`], over
/// each sample's classes): their value and shape in `fwd`.
fn softmax_logits(graph: &Graph, fwd: &crate::plan::Forward) -> Option<(usize, Vec<usize>)> {
    let (node, input) = graph.softmax_head()?;
    let crate::ops::Op::Softmax(attrs) = &node.op else { return None };
    let shape = fwd.spec.values.get(input)?.shape.clone();
    let v = *fwd.value_of.get(input)?;
    attrs.normalises_rows(&shape).then_some((v, shape))
}

/// Where a step's (or a prediction's) input comes from.
#[derive(Clone, Copy, Debug)]
pub enum StepInput<'a> {
    /// Floats on the host, uploaded (their count is the input's).
    Host(&'a [f32]),
    /// Already on the GPU: the input's floats from byte `offset` of `buffer` on (a storage or
    /// copy-source buffer), copied on the GPU: frame mode's ring of preprocessed frames.
    Gpu { buffer: &'a wgpu::Buffer, offset: u64 },
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

/// How a step shares the GPU queue with a stream's predictions (frame mode's background steps).
///
/// The step's work before its writes is split into chunks of about one prediction's work
/// ([`StepPlan::work`] of the frame's program), each submitted alone and waited for. Between
/// frames the chunks run freely (the GPU is otherwise idle). While a frame is being processed
/// ([`Pacer::frame_begin`] … [`Pacer::frame_end`]) the chunks run on a budget: each frame
/// grants its share of what is left of the step, `left / frames until the step lands` (in
/// milliseconds: each chunk's time measured on the plan's earlier runs, else estimated from its
/// work at the prediction's speed), and ends once the step has used it. A stream that keeps
/// the GPU busy so spreads each step evenly over its frames, and the step is done by the frame
/// it lands before. The writes wait for the gate ([`Pacer::release`]).
#[derive(Debug)]
pub struct Pacer {
    /// The work of one chunk: one prediction's ([`StepPlan::work`]).
    pub prediction: u64,
    /// A prediction's measured time (ms).
    pub prediction_ms: f64,
    idle_prior: f64,
    gate: Latch,
    sched: std::sync::Mutex<Schedule>,
    cv: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct Schedule {
    /// A frame is being processed.
    busy: bool,
    /// Milliseconds of chunks the step may still run while this frame is processed.
    budget: f64,
    /// Chunks planned and not submitted, and their milliseconds: measured on an earlier run of
    /// their plan, or estimated from their work (scaled by `real_ms / estimated_ms` of the
    /// estimated chunks run so far).
    left: u64,
    left_measured_ms: f64,
    left_estimated_ms: f64,
    estimated_ms: f64,
    real_ms: f64,
    /// Milliseconds of chunks run between frames: in the current gap, and over the gaps seen.
    gap_ms: f64,
    gaps_ms: f64,
    gaps: u64,
    /// A frame has ended since the step started (the next begin closes a gap).
    ended: bool,
}

impl Pacer {
    /// `idle_ms`: the GPU time a step got between two frames on this stream so far (the
    /// previous step's [`Pacer::idle_ms`]; 0 when unknown).
    pub fn new(prediction: u64, prediction_ms: f64, idle_ms: f64) -> Pacer {
        Pacer {
            prediction: prediction.max(1),
            prediction_ms: prediction_ms.max(1e-3),
            idle_prior: idle_ms.max(0.0),
            gate: Latch::default(),
            sched: Default::default(),
            cv: Default::default(),
        }
    }

    fn schedule(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How much longer the estimated chunks left will take than estimated, from those run so
    /// far: their ratio real / estimated, trusted in proportion to the work it was seen on
    /// (the chunks left count as taking their estimate). Chunks differ: MobileNetV2's first
    /// 8 chunks (depthwise pieces) took 5.8× their estimate and the rest of the step 1.0×. The
    /// plain ratio then put the step at 41 s instead of 8, and one frame's share ran the whole
    /// step (6.7 s); the weighted one says 1.15×.
    fn scale(s: &Schedule) -> f64 {
        if s.estimated_ms > 0.0 && s.real_ms > 0.0 {
            (s.real_ms + s.left_estimated_ms) / (s.estimated_ms + s.left_estimated_ms)
        } else {
            1.0
        }
    }

    fn left_ms(s: &Schedule) -> f64 {
        s.left_measured_ms + s.left_estimated_ms * Self::scale(s)
    }

    fn idle(s: &Schedule, prior: f64) -> f64 {
        if s.gaps > 0 { s.gaps_ms / s.gaps as f64 } else { prior }
    }

    /// The GPU time the step got per gap between frames (ms): how much of a step the frames'
    /// gaps absorb.
    pub fn idle_ms(&self) -> f64 {
        Self::idle(&self.schedule(), self.idle_prior)
    }

    /// A frame starts, `frames_left` frames (≥ 1, this one included) before the step lands:
    /// grants this frame its share of what the gaps before the landing will not absorb.
    pub fn frame_begin(&self, frames_left: u64) {
        let mut s = self.schedule();
        if s.ended && s.left > 0 {
            // A gap in which the step could run to its end says nothing of the gaps' length.
            s.gaps_ms += s.gap_ms;
            s.gaps += 1;
        }
        s.gap_ms = 0.0;
        s.busy = true;
        s.budget = share(Self::left_ms(&s), frames_left, Self::idle(&s, self.idle_prior));
        self.cv.notify_all();
    }

    /// The frame is done once the step has used its share (the last chunk may still run);
    /// until the next frame begins, chunks run freely.
    pub fn frame_end(&self) {
        let mut s = self.schedule();
        while s.budget > 0.0 && s.left > 0 && !self.gate.is_open() {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.busy = false;
        s.budget = 0.0;
        s.ended = true;
        self.cv.notify_all();
    }

    /// The step plans `n` more chunks of `ms` milliseconds in all (`estimated`: from their work,
    /// not measured).
    fn plan(&self, ms: f64, n: u64, estimated: bool) {
        let mut s = self.schedule();
        s.left += n;
        if estimated {
            s.left_estimated_ms += ms;
        } else {
            s.left_measured_ms += ms;
        }
    }

    /// Waits until the next chunk (of `ms`, estimated or measured) may be submitted, and counts
    /// it; returns what it was charged (ms).
    fn before_chunk(&self, ms: f64, estimated: bool) -> f64 {
        let mut s = self.schedule();
        while s.busy && s.budget <= 0.0 && !self.gate.is_open() {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        let cost = if estimated { ms * Self::scale(&s) } else { ms };
        if s.busy {
            s.budget -= cost;
        } else {
            s.gap_ms += cost;
        }
        s.left = s.left.saturating_sub(1);
        if estimated {
            s.left_estimated_ms = (s.left_estimated_ms - ms).max(0.0);
        } else {
            s.left_measured_ms = (s.left_measured_ms - ms).max(0.0);
        }
        self.cv.notify_all();
        cost
    }

    /// An estimated chunk of `estimated` ms, charged `charged` ms, took `real` ms: the estimates
    /// left are scaled, and the difference is charged to the frame being processed (else to the
    /// gap). A frame's budget is thus spent in real milliseconds: on the first run of a plan the
    /// scale moves from chunk to chunk (MobileNetV2's depthwise pieces run several times slower
    /// than their arithmetic says, its matrix products faster), and a budget charged only the
    /// estimates let one frame run nearly a whole step (12.5 s).
    fn after_chunk(&self, estimated: f64, real: f64, charged: f64) {
        let mut s = self.schedule();
        s.estimated_ms += estimated;
        s.real_ms += real;
        if s.busy {
            s.budget -= real - charged;
        } else {
            s.gap_ms += real - charged;
        }
        self.cv.notify_all();
    }

    /// Lets every chunk run and the writes happen: the step lands now.
    pub fn release(&self) {
        self.gate.open();
        let _s = self.schedule();
        self.cv.notify_all();
    }

    /// Waits for [`Pacer::release`].
    fn wait_release(&self) {
        self.gate.wait();
    }

    /// Whether the step may write.
    pub fn released(&self) -> bool {
        self.gate.is_open()
    }
}

/// A frame's share of a step's `left_ms` when it lands `frames_left` frames on (this one
/// included) and each gap between frames gives the step `idle_ms`: what the gaps will not
/// absorb, spread over the frames.
fn share(left_ms: f64, frames_left: u64, idle_ms: f64) -> f64 {
    let fl = frames_left.max(1) as f64;
    (left_ms - (fl - 1.0) * idle_ms).max(0.0) / fl
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_takes_its_share_of_what_the_gaps_do_not_absorb() {
        // No idle time (frames back to back): an even split; the last frame takes the rest.
        assert_eq!(share(300.0, 15, 0.0), 20.0);
        assert_eq!(share(40.0, 1, 0.0), 40.0);
        // Gaps of 50 ms absorb 14 × 50 = 700 ms of a 1000 ms step: 300 ms over 15 frames.
        assert_eq!(share(1000.0, 15, 50.0), 20.0);
        // Gaps that absorb the whole step: no share.
        assert_eq!(share(300.0, 15, 50.0), 0.0);
        // frames_left 0 is treated as 1.
        assert_eq!(share(10.0, 0, 5.0), 10.0);
    }

    #[test]
    fn chunks_wait_for_a_busy_frames_budget_and_run_freely_between_frames() {
        let pacer = std::sync::Arc::new(Pacer::new(1, 1.0, 0.0));
        pacer.plan(4.0, 4, false);
        // Between frames: no wait, the chunk counts as the gap's.
        pacer.before_chunk(1.0, false);
        // A frame 3 frames before the landing: 3 ms left, no idle known → 1 ms now.
        pacer.frame_begin(3);
        pacer.before_chunk(1.0, false);
        // The budget is spent: the next chunk waits until the frame ends.
        let p = pacer.clone();
        let waiter = std::thread::spawn(move || p.before_chunk(1.0, false));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished(), "a chunk ran beyond the frame's budget");
        pacer.frame_end();
        waiter.join().unwrap();
        // The chunk that waited ran after the frame ended, in the gap: 1 ms of idle time per gap
        // (the chunk before the first frame was in no gap between frames: not counted).
        pacer.frame_begin(2);
        assert_eq!(pacer.idle_ms(), 1.0);
        pacer.frame_end();
        // Release: nothing waits any more.
        pacer.frame_begin(1);
        pacer.release();
        pacer.before_chunk(1.0, false);
        pacer.before_chunk(1.0, false);
        pacer.frame_end();
        assert!(pacer.released());
    }

    /// Also the regression of a frame's budget charged only estimates: the chunk's real time is
    /// charged once it completes (MobileNetV2's first 16-frame step ran almost whole in one frame).
    #[test]
    fn estimated_chunks_are_rescaled_by_how_long_they_really_took() {
        let pacer = Pacer::new(1, 1.0, 0.0);
        // 4 estimated chunks of 1 ms; the first really took 3 ms: the 3 left, trusted 1/4,
        // scale (3 + 3) / (1 + 3) = 1.5×: 4.5 ms.
        pacer.plan(4.0, 4, true);
        let charged = pacer.before_chunk(1.0, true);
        pacer.after_chunk(1.0, 3.0, charged);
        pacer.frame_begin(3);
        let s = pacer.schedule();
        assert_eq!(Pacer::left_ms(&s), 4.5);
        assert_eq!(s.budget, 1.5);
        drop(s);
        // A chunk taken in the frame costs its estimate rescaled...
        let charged = pacer.before_chunk(1.0, true);
        assert_eq!((charged, pacer.schedule().budget), (1.5, 0.0));
        // ... and then what it really took: 1 ms instead of 1.5 gives the frame 0.5 ms back.
        pacer.after_chunk(1.0, 1.0, charged);
        assert_eq!(pacer.schedule().budget, 0.5);
        // The scale is now (4 + 2) / (2 + 2) = 1.5× and moves to the plain ratio as the
        // estimated work left shrinks: (4 + 0) / (2 + 0) = 2× once nothing is left.
        assert_eq!(Pacer::scale(&pacer.schedule()), 1.5);
        pacer.release();
        pacer.frame_end();
    }

    /// A few slow chunks at a step's start do not make the whole step look slow (MobileNetV2,
    /// ETA, window 16, compressed carphone clip: the first 8 of 310 chunks, 224 ms estimated,
    /// took 1,297 ms; the plain ratio 5.8× set frame 10's share at 8.2 s, and that frame ran the
    /// rest of the 8.2 s step: 6.7 s of latency against 0.8 s for the frames around it).
    #[test]
    fn slow_first_chunks_do_not_inflate_a_frames_share() {
        let pacer = Pacer::new(1, 790.0, 0.0);
        pacer.plan(7328.0, 310, true);
        for _ in 0..8 {
            let charged = pacer.before_chunk(28.0, true);
            pacer.after_chunk(28.0, 1297.0 / 8.0, charged);
        }
        pacer.frame_begin(5);
        let budget = pacer.schedule().budget;
        // The even share of the step's real 8.2 s (what is left of it: 6.9 s) over 5 frames is
        // 1.4 s; the plain ratio granted 8.2 s.
        assert!((1000.0..2000.0).contains(&budget), "{budget}");
        pacer.release();
        pacer.frame_end();
    }
}
