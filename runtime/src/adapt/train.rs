//! The adaptation step as one program: forward with the session's normalization statistics, the
//! loss, the reverse pass from the loss down to the adapted BatchNormalization parameters, and
//! the optimizer update — recorded into one command encoder, with a single readback of the
//! (pre-update) logits and the loss.
//!
//! Only what the reverse pass reads stays alive past its forward use: the planner references a
//! forward tensor from a backward dispatch exactly when that op's backward reads it, and the
//! program's lifetime analysis does the rest. Nodes upstream of the first adapted layer get no
//! reverse pass at all, and frozen weights get no gradient buffers.

use std::collections::{HashMap, HashSet};

use super::bn::{self, BnHook, StatsMode};
use super::eata;
use super::loss;
use super::optim::{self, OptimizerSpec};
use crate::gpu::GpuContext;
use crate::ir::Graph;
use crate::ops::{BackwardLowering, BufRef, GradInput};
use crate::plan::{
    Compiled, Forward, GraphOutput, Item, PlanError, Program, WeightInit, WeightStore, lower_forward, read_buffer,
    staging,
};
use crate::tensor::Tensor;

/// One adapted BatchNormalization layer.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptedBn {
    pub node: usize,
    pub scale: String,
    pub bias: String,
}

/// What a step program does.
#[derive(Clone, Debug)]
pub struct StepSpec {
    pub mode: StatsMode,
    /// Adapted layers; empty for a forward-only program (source, norm, rbn).
    pub adapted: Vec<AdaptedBn>,
    pub optimizer: OptimizerSpec,
    pub objective: Objective,
    /// LAME / label-shift stages after the forward pass ([`super::output`]); not run by the
    /// Fisher pass.
    pub output: Option<std::sync::Arc<super::output::OutputSpec>>,
}

/// What a step minimises, and what it does with the gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Objective {
    /// Mean entropy over the batch (TENT).
    MeanEntropy,
    /// ETA/EATA: weighted entropy over the selected samples, plus the Fisher penalty when
    /// `fisher_alpha` > 0; no step when nothing is selected.
    Eata(super::eata::EataSpec),
    /// The EATA Fisher pass: cross-entropy with argmax pseudo-labels; the gradient's square is
    /// added to the Fisher buffers and no parameter changes.
    Fisher,
    /// SAR (tta-methods.md §3): entropy filter, sharpness-aware step (ascend by ρ·g/‖g‖, second
    /// forward and re-filter within the first selection, gradient there, restore, base step).
    Sar { e_margin: f32, rho: f32 },
    /// Wisdom of crowds (tta-methods.md §4): the original model (source scale and bias, the
    /// batch's statistics) runs too, without gradients; mean entropy over the samples whose
    /// confidence in the original model's class did not fall, minus λ·H(mean prediction of the
    /// whole batch). No step when no sample is kept.
    Woc { lambda: f32 },
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
    /// ETA/EATA: the selection buffer [flags (B), weights (B)] and its staging buffer.
    selection: Option<(usize, wgpu::Buffer)>,
    /// SAR: the second-pass loss and selection ([flags (B), |S|]) with one staging buffer each.
    second: Option<(usize, usize, wgpu::Buffer, wgpu::Buffer)>,
    /// The output stage's values (probabilities, prior) with their staging buffers, and the
    /// gate of its running estimate.
    output: Option<OutputReadback>,
    /// The parameter guard's state buffer ([step_count, gate, non_finite]: the optimizer's, or
    /// `guard:state` in a forward-only program that updates RBN statistics) and its staging
    /// buffer; `None` for programs that change no persistent state.
    guard: Option<(usize, wgpu::Buffer)>,
    pub dispatch_count: usize,
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

fn bytes_of(shape: &[usize]) -> u64 {
    (shape.iter().product::<usize>() as u64 * 4).max(4)
}

fn err(msg: impl Into<String>) -> PlanError {
    PlanError::Program(msg.into())
}

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
        let mut hook = BnHook::new(spec.mode, training);
        let fwd = lower_forward(ctx, graph, &[shape.to_vec()], &mut program, &mut hook)?;
        let (logits_v, logits_shape) = match fwd.outputs.first() {
            Some((_, GraphOutput::Value { id, shape })) => (*id, shape.clone()),
            _ => return Err(err("the model's first output is a constant; nothing to adapt")),
        };
        // The output stage reads the forward's logits and features right after the forward,
        // so those buffers need not outlive the reverse pass.
        let output = match &spec.output {
            Some(o) if spec.objective != Objective::Fisher => {
                let stage = super::output::lower(ctx, graph, &fwd, o, logits_v, &logits_shape, &mut program)
                    .map_err(|e| err(e.to_string()))?;
                Some((stage, logits_shape.get(1).copied().unwrap_or(1)))
            }
            _ => None,
        };
        let mut loss_v = None;
        let mut params = Vec::new();
        let mut selection: Option<usize> = None;
        let mut sar_first: Option<usize> = None;
        let mut second: Option<(usize, usize)> = None;
        // The parameter guard (optim.rs): every program that changes persistent state opens with
        // `guard_begin` and ends with the checks of everything it would commit, then the commits.
        let commits = std::mem::take(&mut hook.commits);
        let frame_commits = std::mem::take(&mut hook.frame_commits);
        // Method state computed ahead and committed with the step: (value, offset, weight, n).
        let mut deferred: Vec<(usize, usize, usize, usize)> =
            output.as_ref().and_then(|(stage, _)| stage.deferred).into_iter().collect();
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
            let mut scratch = Vec::new();
            let mut dispatches = Vec::new();
            let coeff = match spec.objective {
                Objective::MeanEntropy | Objective::Fisher => BufRef::Weight(program.weight(
                    &format!("adapt:mean_coeff:{b}"),
                    || WeightInit::Tensor(std::sync::Arc::new(Tensor::f32(vec![b], vec![1.0 / b as f32; b]))),
                    true,
                )),
                Objective::Eata(e) => {
                    // sel: [flags (B), weights (B), the next m (C + 1)] (select.wgsl).
                    let (probs, ent, coeff, sel) = (
                        program.value(bytes_of(&logits_shape)),
                        program.value(b as u64 * 4),
                        program.value(b as u64 * 4),
                        program.value((2 * b + c + 1) as u64 * 4),
                    );
                    let m = program.weight("eata:m", || WeightInit::Zeros(c + 1), true);
                    deferred.push((sel, 2 * b, m, c + 1));
                    dispatches.extend(loss::softmax_stats(
                        BufRef::Value(logits_v),
                        b,
                        c,
                        BufRef::Value(probs),
                        BufRef::Value(ent),
                    ));
                    let mask = if e.woc {
                        // eata+woc: the WoC flags (the original model's class kept its
                        // confidence) gate EATA's filters; EATA's loss and m follow the result.
                        let mut hook0 = BnHook::new(StatsMode::Batch, false);
                        hook0.source_affine = true;
                        let (_, logits0) = forward_on_same_input(ctx, graph, &fwd, shape, &mut program, &mut hook0)?;
                        let (probs0, ent0, coeff0, sel0) = (
                            program.value(bytes_of(&logits_shape)),
                            program.value(b as u64 * 4),
                            program.value(b as u64 * 4),
                            program.value(2 * b as u64 * 4),
                        );
                        dispatches.extend(loss::softmax_stats(
                            BufRef::Value(logits0),
                            b,
                            c,
                            BufRef::Value(probs0),
                            BufRef::Value(ent0),
                        ));
                        dispatches.push(eata::woc_select(
                            BufRef::Value(probs),
                            BufRef::Value(probs0),
                            BufRef::Value(coeff0),
                            BufRef::Value(sel0),
                            BufRef::Weight(state),
                            b,
                            c,
                        ));
                        BufRef::Value(sel0)
                    } else {
                        BufRef::Weight(program.weight(
                            &format!("adapt:ones:{b}"),
                            || WeightInit::Tensor(std::sync::Arc::new(Tensor::f32(vec![b], vec![1.0; b]))),
                            true,
                        ))
                    };
                    dispatches.push(eata::select(
                        &e,
                        BufRef::Value(probs),
                        BufRef::Value(ent),
                        BufRef::Weight(m),
                        BufRef::Value(coeff),
                        BufRef::Value(sel),
                        BufRef::Weight(state),
                        mask,
                        b,
                        c,
                    ));
                    program.pinned_end.push(sel);
                    selection = Some(sel);
                    BufRef::Value(coeff)
                }
                Objective::Sar { e_margin, .. } => {
                    let (probs, ent, coeff, sel) = (
                        program.value(bytes_of(&logits_shape)),
                        program.value(b as u64 * 4),
                        program.value(b as u64 * 4),
                        program.value((b as u64 + 1) * 4),
                    );
                    let ones = program.weight(
                        &format!("adapt:ones:{b}"),
                        || WeightInit::Tensor(std::sync::Arc::new(Tensor::f32(vec![b], vec![1.0; b]))),
                        true,
                    );
                    dispatches.extend(loss::softmax_stats(
                        BufRef::Value(logits_v),
                        b,
                        c,
                        BufRef::Value(probs),
                        BufRef::Value(ent),
                    ));
                    dispatches.push(eata::entropy_filter(
                        e_margin,
                        BufRef::Value(ent),
                        BufRef::Weight(ones),
                        BufRef::Value(coeff),
                        BufRef::Value(sel),
                        b,
                    ));
                    sar_first = Some(sel);
                    BufRef::Value(coeff)
                }
                Objective::Woc { .. } => {
                    // The original model: the same graph in batch-statistics mode with the source
                    // affine parameters, reading the same input buffer.
                    let mut hook0 = BnHook::new(StatsMode::Batch, false);
                    hook0.source_affine = true;
                    let (_, logits0) = forward_on_same_input(ctx, graph, &fwd, shape, &mut program, &mut hook0)?;
                    let (probs, probs0, ent, ent0, coeff, sel) = (
                        program.value(bytes_of(&logits_shape)),
                        program.value(bytes_of(&logits_shape)),
                        program.value(b as u64 * 4),
                        program.value(b as u64 * 4),
                        program.value(b as u64 * 4),
                        program.value(2 * b as u64 * 4),
                    );
                    dispatches.extend(loss::softmax_stats(
                        BufRef::Value(logits_v),
                        b,
                        c,
                        BufRef::Value(probs),
                        BufRef::Value(ent),
                    ));
                    dispatches.extend(loss::softmax_stats(
                        BufRef::Value(logits0),
                        b,
                        c,
                        BufRef::Value(probs0),
                        BufRef::Value(ent0),
                    ));
                    dispatches.push(eata::woc_select(
                        BufRef::Value(probs),
                        BufRef::Value(probs0),
                        BufRef::Value(coeff),
                        BufRef::Value(sel),
                        BufRef::Weight(state),
                        b,
                        c,
                    ));
                    program.pinned_end.push(sel);
                    selection = Some(sel);
                    BufRef::Value(coeff)
                }
            };
            if spec.objective == Objective::Fisher {
                let labels = program.value(b as u64 * 4);
                dispatches.push(eata::argmax_rows(BufRef::Value(logits_v), BufRef::Value(labels), b, c));
                dispatches.extend(loss::cross_entropy_loss(
                    BufRef::Value(logits_v),
                    BufRef::Value(labels),
                    coeff,
                    b,
                    c,
                    BufRef::Value(loss),
                    BufRef::Value(dlogits),
                    false,
                    &mut scratch,
                ));
            } else {
                dispatches.extend(loss::entropy_loss(
                    BufRef::Value(logits_v),
                    coeff,
                    b,
                    c,
                    BufRef::Value(loss),
                    BufRef::Value(dlogits),
                    false,
                    &mut scratch,
                ));
            }
            if let Objective::Woc { lambda } = spec.objective {
                // − λ·H(p̄) over the whole batch (the diversity term), into the same loss and dz.
                dispatches.extend(loss::diversity_loss(
                    BufRef::Value(logits_v),
                    lambda,
                    b,
                    c,
                    BufRef::Value(loss),
                    BufRef::Value(dlogits),
                    true,
                    &mut scratch,
                ));
            }
            program.items.push(Item { label: "loss".into(), dispatches, scratch });
            let mut param_grads = reverse_pass(ctx, graph, &fwd, &hook, spec, logits_v, dlogits, &mut program)?;
            if let (Objective::Sar { e_margin, rho }, Some(sel1)) = (spec.objective, sar_first) {
                let (g2, loss2, sel2) = sam_second_pass(
                    ctx,
                    graph,
                    &fwd,
                    shape,
                    spec.mode,
                    &param_grads,
                    sel1,
                    e_margin,
                    rho,
                    b,
                    c,
                    &logits_shape,
                    &mut program,
                    spec,
                )?;
                param_grads = g2;
                second = Some((loss2, sel2));
            }
            let mut dispatches = Vec::new();
            let mut scratch = Vec::new();
            for (name, grad) in &param_grads {
                let (p, n) = parameter(&program, name)?;
                let fisher = format!("eata:fisher:{name}");
                match spec.objective {
                    Objective::Fisher => {
                        let f = program.weight(&fisher, || WeightInit::Zeros(n), true);
                        dispatches.push(eata::fisher_accumulate(BufRef::Value(*grad), BufRef::Weight(f), n));
                    }
                    Objective::Eata(e) if e.fisher_alpha > 0.0 => {
                        // β·Σ F·(θ − θ*)², θ* the source values, in the same backward.
                        let f = program.weight(&fisher, || WeightInit::Zeros(n), true);
                        let init = program.weights[p].init.clone();
                        let anchor = program.weight(&format!("eata:anchor:{name}"), || init, true);
                        dispatches.extend(loss::ewc_penalty(
                            BufRef::Weight(p),
                            BufRef::Weight(anchor),
                            BufRef::Weight(f),
                            e.fisher_alpha,
                            n,
                            BufRef::Value(loss),
                            BufRef::Value(*grad),
                            true,
                            &mut scratch,
                        ));
                    }
                    _ => {}
                }
            }
            if spec.objective != Objective::Fisher {
                // The guard's checks of every update and of the RBN statistics, before anything
                // is written; then one optimizer update per adapted tensor, the step counter and
                // the statistics, each a no-op when a check tripped.
                let mut updates = Vec::new();
                for (name, grad) in &param_grads {
                    let (p, n) = parameter(&program, name)?;
                    // Only the moments the optimizer keeps (none for plain SGD, the momentum
                    // buffer for SGD with momentum, m and v for Adam); unused bindings may alias
                    // any buffer.
                    let moments = spec.optimizer.moment_buffers();
                    let m = if moments >= 1 {
                        program.weight(&format!("opt:m:{name}"), || WeightInit::Zeros(n), true)
                    } else {
                        p
                    };
                    let v = if moments >= 2 {
                        program.weight(&format!("opt:v:{name}"), || WeightInit::Zeros(n), true)
                    } else {
                        m
                    };
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
                dispatches.extend(stats_checks(state));
                dispatches.extend(updates);
                dispatches.extend(optim::commit(BufRef::Weight(state)));
                dispatches.extend(stats_commits(state));
                dispatches.extend(deferred_commits(state, &deferred));
            } else {
                dispatches.extend(stats_checks(state));
                dispatches.extend(stats_commits(state));
                dispatches.extend(deferred_commits(state, &deferred));
            }
            program.items.push(Item { label: "update".into(), dispatches, scratch });
            program.pinned_end.push(loss);
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
            logits: (logits_v, logits_shape),
            loss: loss_v,
            dispatch_count: compiled.dispatch_count(),
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
        if x.len() != self.input_shape.iter().product::<usize>() {
            return Err(PlanError::InputData { name: "input".into(), shape: self.input_shape.clone(), len: x.len() });
        }
        ctx.queue.write_buffer(self.compiled.value_buffer(self.input), 0, bytemuck::cast_slice(x));
        if let Some(g) = self.output.as_ref().and_then(|o| o.stage.gate) {
            let gate = [if update_state { 1.0f32 } else { 0.0 }];
            ctx.queue.write_buffer(&self.compiled.weight_buffers[g], 0, bytemuck::cast_slice(&gate));
        }
        let mut encoder =
            ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("adapt step") });
        self.compiled.record(&mut encoder, "adapt step");
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

/// Builds the reverse pass into `program`; returns each adapted parameter's gradient value.
#[allow(clippy::too_many_arguments)]
fn reverse_pass(
    ctx: &GpuContext,
    graph: &Graph,
    fwd: &Forward,
    hook: &BnHook,
    spec: &StepSpec,
    logits: usize,
    dlogits: usize,
    program: &mut Program,
) -> Result<Vec<(String, usize)>, PlanError> {
    let limits = ctx.limits();
    let adapted: HashMap<usize, &AdaptedBn> = spec.adapted.iter().map(|a| (a.node, a)).collect();
    let value_id = |o: &Option<crate::ops::Operand>| match o {
        Some(crate::ops::Operand { buf: BufRef::Value(v), .. }) => Some(*v),
        _ => None,
    };
    // Values that depend on an adapted parameter: only they carry gradients.
    let mut requires: HashSet<usize> = HashSet::new();
    for ln in &fwd.nodes {
        let depends = adapted.contains_key(&ln.node)
            || ln.inputs.iter().any(|i| value_id(i).is_some_and(|v| requires.contains(&v)));
        if depends {
            for o in &ln.outputs {
                if let BufRef::Value(v) = o.buf {
                    requires.insert(v);
                }
            }
        }
    }
    if !requires.contains(&logits) {
        return Err(err("no adapted parameter influences the model's output"));
    }
    let mut grads: HashMap<usize, usize> = HashMap::from([(logits, dlogits)]);
    let mut param_grads = Vec::new();
    for ln in fwd.nodes.iter().rev() {
        let node = &graph.nodes[ln.node];
        let out_grads: Vec<Option<usize>> = ln
            .outputs
            .iter()
            .map(|o| if let BufRef::Value(v) = o.buf { grads.get(&v).copied() } else { None })
            .collect();
        if out_grads.iter().all(|g| g.is_none()) {
            continue;
        }
        let node_err = |reason: String| PlanError::Node {
            node: node.name.clone(),
            op: node.op_type.clone(),
            shapes: ln.inputs.iter().map(|i| i.as_ref().map(|o| o.shape.clone()).unwrap_or_default()).collect(),
            reason: format!("reverse pass: {reason}"),
        };
        if let Some(saved) = hook.saved.get(&ln.node) {
            let dy = out_grads[0].ok_or_else(|| node_err("no gradient for Y".into()))?;
            let mut scratch = Vec::new();
            let dparams = adapted.get(&ln.node).map(|a| {
                let n = saved.channels as u64 * 4;
                let (ds, db) = (program.value(n), program.value(n));
                param_grads.push((a.scale.clone(), ds));
                param_grads.push((a.bias.clone(), db));
                (ds, db)
            });
            let dx = value_id(&ln.inputs[0])
                .filter(|v| requires.contains(v))
                .map(|v| grad_for(&mut grads, v, program, bytes_of(&saved.x.shape)));
            let dispatches = bn::backward(saved, dy, dparams, dx, &mut scratch).map_err(node_err)?;
            program.items.push(Item { label: format!("{} backward", node.name), dispatches, scratch });
            continue;
        }
        if matches!(node.op, crate::ops::Op::BatchNorm(_)) {
            return Err(node_err(
                "BatchNormalization with source statistics on the gradient path must be lowered by the adaptation hook"
                    .into(),
            ));
        }
        // A view passes its gradient through unchanged: share the buffer when it is the first
        // contribution to the input's gradient.
        if node.op.is_alias()
            && let Some(v) = value_id(&ln.inputs[0]).filter(|v| requires.contains(v))
            && !grads.contains_key(&v)
            && let Some(g) = out_grads[0]
        {
            let a = program.alias(g);
            grads.insert(v, a);
            continue;
        }
        let mut grad_inputs = Vec::new();
        for inp in &ln.inputs {
            grad_inputs.push(match value_id(inp).filter(|v| requires.contains(v)) {
                Some(v) => {
                    let shape = inp.as_ref().map(|o| o.shape.clone()).unwrap_or_default();
                    let (g, accumulate) = grad_for(&mut grads, v, program, bytes_of(&shape));
                    Some(GradInput { buf: BufRef::Value(g), shape, accumulate })
                }
                None => None,
            });
        }
        let mut b = BackwardLowering {
            node: node.name.clone(),
            inputs: ln.inputs.clone(),
            outputs: ln.outputs.clone(),
            grad_outputs: ln
                .outputs
                .iter()
                .zip(&out_grads)
                .map(|(o, g)| {
                    g.map(|g| crate::ops::Operand { buf: BufRef::Value(g), shape: o.shape.clone(), value: None })
                })
                .collect(),
            grad_inputs,
            dispatches: Vec::new(),
            scratch: Vec::new(),
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
        };
        node.op.lower_backward(&mut b).map_err(node_err)?;
        program.items.push(Item {
            label: format!("{} backward", node.name),
            dispatches: b.dispatches,
            scratch: b.scratch,
        });
    }
    Ok(param_grads)
}

/// The gradient buffer of value `v`: `(buffer, accumulate)`. The first contribution overwrites a
/// fresh buffer; later ones (a fanned-out tensor) add into it.
fn grad_for(grads: &mut HashMap<usize, usize>, v: usize, program: &mut Program, bytes: u64) -> (usize, bool) {
    match grads.get(&v) {
        Some(&g) => (g, true),
        None => {
            let g = program.value(bytes);
            grads.insert(v, g);
            (g, false)
        }
    }
}

/// The gradients at SAR's perturbed point (by parameter name), the second loss and selection.
type SecondPass = (Vec<(String, usize)>, usize, usize);

/// SAR's sharpness-aware half of the step: global gradient norm, ascent to θ + ρ·g/‖g‖, a second
/// forward (same statistics mode) and re-filter within the first selection, the entropy over it,
/// the reverse pass there, and the restore of θ. Returns the gradients at the perturbed point
/// (for the base optimizer), the second loss and the second selection.
#[allow(clippy::too_many_arguments)]
fn sam_second_pass(
    ctx: &GpuContext,
    graph: &Graph,
    fwd: &Forward,
    shape: &[usize],
    mode: StatsMode,
    grads: &[(String, usize)],
    sel1: usize,
    e_margin: f32,
    rho: f32,
    b: usize,
    c: usize,
    logits_shape: &[usize],
    program: &mut Program,
    spec: &StepSpec,
) -> Result<SecondPass, PlanError> {
    let mut params = Vec::new();
    for (name, g) in grads {
        let (p, n) = parameter(program, name)?;
        params.push((p, *g, n));
    }
    let norms = program.value(params.len() as u64 * 4);
    let olds: Vec<usize> = params.iter().map(|&(_, _, n)| program.value(n as u64 * 4)).collect();
    let mut dispatches = Vec::new();
    for (slot, &(_, g, n)) in params.iter().enumerate() {
        dispatches.push(eata::sumsq(BufRef::Value(g), BufRef::Value(norms), n, slot));
    }
    for (&(p, g, n), &old) in params.iter().zip(&olds) {
        dispatches.push(eata::sam_perturb(
            BufRef::Weight(p),
            BufRef::Value(g),
            BufRef::Value(old),
            BufRef::Value(norms),
            n,
            params.len(),
            rho,
        ));
    }
    program.items.push(Item { label: "sam ascent".into(), dispatches, scratch: vec![] });
    // The second forward reads the same input buffer, at the perturbed parameters.
    let mut hook2 = BnHook::new(mode, true);
    let (fwd2, logits2) = forward_on_same_input(ctx, graph, fwd, shape, program, &mut hook2)?;
    let (probs, ent, coeff, sel2, loss2, dlogits2) = (
        program.value(bytes_of(logits_shape)),
        program.value(b as u64 * 4),
        program.value(b as u64 * 4),
        program.value((b as u64 + 1) * 4),
        program.value(4),
        program.value(bytes_of(logits_shape)),
    );
    let mut scratch = Vec::new();
    let mut dispatches = loss::softmax_stats(BufRef::Value(logits2), b, c, BufRef::Value(probs), BufRef::Value(ent));
    dispatches.push(eata::entropy_filter(
        e_margin,
        BufRef::Value(ent),
        BufRef::Value(sel1),
        BufRef::Value(coeff),
        BufRef::Value(sel2),
        b,
    ));
    dispatches.extend(loss::entropy_loss(
        BufRef::Value(logits2),
        BufRef::Value(coeff),
        b,
        c,
        BufRef::Value(loss2),
        BufRef::Value(dlogits2),
        false,
        &mut scratch,
    ));
    program.items.push(Item { label: "sam second loss".into(), dispatches, scratch });
    let grads2 = reverse_pass(ctx, graph, &fwd2, &hook2, spec, logits2, dlogits2, program)?;
    let dispatches = params
        .iter()
        .zip(&olds)
        .map(|(&(p, _, n), &old)| eata::sam_restore(BufRef::Weight(p), BufRef::Value(old), n))
        .collect();
    program.items.push(Item { label: "sam restore".into(), dispatches, scratch: vec![] });
    program.pinned_end.push(loss2);
    program.pinned_end.push(sel2);
    Ok((grads2, loss2, sel2))
}

/// Lowers one more forward pass of `graph` into `program` reading the first pass's input buffer
/// (WoC's original model, SAR's pass at the perturbed point); returns it and its logits value.
fn forward_on_same_input(
    ctx: &GpuContext,
    graph: &Graph,
    first: &Forward,
    shape: &[usize],
    program: &mut Program,
    hook: &mut BnHook,
) -> Result<(Forward, usize), PlanError> {
    let fwd = lower_forward(ctx, graph, &[shape.to_vec()], program, hook)?;
    let input = fwd.inputs[0].1;
    program.pinned_start.retain(|&v| v != input);
    program.values[input].alias_of = Some(first.inputs[0].1);
    let logits = match fwd.outputs.first() {
        Some((_, GraphOutput::Value { id, .. })) => *id,
        _ => return Err(err("the model's output is a constant")),
    };
    Ok((fwd, logits))
}

/// The parameter guard's commits of method state computed ahead ((value, offset, weight, n):
/// EATA's m, the label-shift estimate), each a no-op when the step was refused.
fn deferred_commits(state: usize, deferred: &[(usize, usize, usize, usize)]) -> Vec<crate::ops::Dispatch> {
    deferred
        .iter()
        .map(|&(src, offset, dst, n)| {
            optim::commit_copy(BufRef::Weight(state), BufRef::Value(src), offset, BufRef::Weight(dst), n)
        })
        .collect()
}

/// The weight id and element count of adapted parameter `name`.
fn parameter(program: &Program, name: &str) -> Result<(usize, usize), PlanError> {
    let p = program
        .weights
        .iter()
        .position(|w| w.name == name)
        .ok_or_else(|| err(format!("parameter {name} has no buffer")))?;
    let n = match &program.weights[p].init {
        WeightInit::Tensor(t) => t.numel(),
        WeightInit::Zeros(n) => *n,
    };
    Ok((p, n))
}
