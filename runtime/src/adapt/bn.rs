//! BatchNormalization under adaptation: which statistics normalise (the mode), how the forward
//! pass is lowered with them, and the layer's reverse pass to x, scale and bias
//! (`shaders/norm.wgsl`, the `bn_*` entry points).

use std::collections::HashMap;

use crate::gpu::{KernelKey, Params, Shader, grid_1d};
use crate::ir::Graph;
use crate::ops::conv::TailAct;
use crate::ops::layout::{gather, scatter};
use crate::ops::{BufRef, Lowering, OpReason, OpResult, Operand};
use crate::plan::{LowerHook, Program, WeightInit};

/// Which statistics a BatchNormalization layer normalises with (tta-methods.md §0.3, §7).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StatsMode {
    /// The model's running statistics (plain inference).
    Source,
    /// The current batch's mean and biased variance; gradients flow through them (TENT).
    Batch,
    /// RBN (RoTTA): running ← (1−m)·running + m·batch (biased), normalising with the updated values.
    Ema { momentum: f32 },
    /// BN-α: (1−α)·source + α·batch with the unbiased batch variance; nothing is updated.
    Alpha { alpha: f32 },
    /// The frame protocol's source-anchored statistics (`bn_frame` in `shaders/norm.wgsl`): the
    /// source statistics moved toward the evidence of the previous frames (running averages of
    /// their statistics over the last `window` frames) by at most `alpha_mean` / `alpha_var`,
    /// ramped in over the first `window` frames; a frame never normalises with its own
    /// statistics. Layers whose map has fewer than `min_plane` values per channel and frame keep
    /// the source statistics. The evidence lives in `frame:est:<running mean name>` and is
    /// committed through the parameter guard; the model's running statistics are never written.
    Frame { alpha_mean: f32, alpha_var: f32, window: u32, min_plane: usize },
}

impl StatsMode {
    /// (a_mean, b_mean, a_var, b_var, write_back) of the used statistics for `m` values a channel.
    fn coefficients(self, m: usize) -> OpResult<(f32, f32, f32, f32, bool)> {
        Ok(match self {
            StatsMode::Source => (0.0, 1.0, 0.0, 1.0, false),
            StatsMode::Batch => (1.0, 0.0, 1.0, 0.0, false),
            StatsMode::Ema { momentum } => (momentum, 1.0 - momentum, momentum, 1.0 - momentum, true),
            StatsMode::Alpha { alpha } => {
                if m < 2 {
                    return Err(OpReason::Shape(
                        "BN-alpha needs at least 2 values per channel for the unbiased batch variance".into(),
                    ));
                }
                let [a0, a1, a2, a3] = alpha_coefficients(alpha, m as u32);
                (a0, a1, a2, a3, false)
            }
            // The statistics a frame is normalised with do not depend on the frame: for the
            // reverse pass they are constants, as the source's are.
            StatsMode::Frame { .. } => (0.0, 1.0, 0.0, 1.0, false),
        })
    }
}

/// Name of the frame-evidence buffer of the layer whose running mean is `mean`:
/// [M1 (C), M2 (C), V (C), frames seen], zeros before the first frame.
pub fn frame_evidence_name(mean: &str) -> String {
    format!("{FRAME_EVIDENCE_PREFIX}{mean}")
}

/// Prefix of the frame-evidence buffers (part of a session's saved state, zeroed by reset).
pub const FRAME_EVIDENCE_PREFIX: &str = "frame:est:";

/// What the forward pass saved for one BatchNormalization layer's reverse pass.
#[derive(Clone, Debug)]
pub struct SavedBn {
    pub x: Operand,
    pub scale: Operand,
    /// [mean_B, var_B, mean_u, var_u], C each.
    pub stats: usize,
    pub channels: usize,
    pub plane: usize,
    pub batch: usize,
    pub eps: f32,
    pub mode: StatsMode,
}

/// Lowers every BatchNormalization with batch-dependent statistics; `Source` layers keep the
/// inference kernel.
pub struct BnHook {
    pub mode: StatsMode,
    /// Lower `Source` layers through the adaptation kernels too (an adaptation step needs their
    /// saved state for the reverse pass to scale and bias).
    pub always: bool,
    /// Normalise with the source scale and bias (kept in `woc:source:<name>` buffers) instead of
    /// the adapted ones: the "original model" of the wisdom-of-crowds filter.
    pub source_affine: bool,
    /// With `source_affine`: the affine parameters outside BatchNormalization (LayerNorm,
    /// GroupNorm, InstanceNorm: [`affine_norm_params`]), which the nodes that read them read
    /// from source copies too ([`LowerHook::weight_name`]).
    pub source_params: std::collections::HashSet<String>,
    /// Saved state by node index.
    pub saved: HashMap<usize, SavedBn>,
    /// RBN layers whose running statistics the program must commit at its end (the parameter
    /// guard decides whether they are finite first): `bn_stats` no longer writes them back.
    pub commits: Vec<StatsCommit>,
    /// Frame-mode layers' deferred evidence updates: (value, evidence weight, length).
    pub frame_commits: Vec<(usize, BufRef, usize)>,
    /// Each layer's covariate-shift score, computed after its statistics (`bn_shift`).
    pub shift: Option<ShiftScores>,
    /// The program reads nothing of the forward but its logits (no reverse pass, no output
    /// stage): convolutions may take the BatchNormalization layers it leaves to the inference
    /// kernel and their activations into their write-out ([`LowerHook::fusable`]).
    pub fuse: bool,
    /// The program reads nothing of the forward but what no reverse pass needs: the layers
    /// lowered here may apply the Relu or Clip that only their output feeds in `bn_apply`
    /// ([`LowerHook::fuses_activation`]).
    pub fuse_activation: bool,
}

/// Where the layers' covariate-shift scores go: one float per BatchNormalization layer, in the
/// order they are lowered, in the value `out` (method auto's judging forward: the batch's
/// statistics against the source's, [`crate::adapt::methods::auto::Diagnostics`]).
#[derive(Clone, Debug)]
pub struct ShiftScores {
    pub out: usize,
    /// Slots in `out`.
    pub layers: usize,
    /// Slots written so far.
    pub written: usize,
}

/// One RBN layer's deferred statistics update: running mean and variance ← `stats`' used
/// statistics ([mean_B, var_B, mean_u, var_u], `channels` each).
#[derive(Clone, Debug)]
pub struct StatsCommit {
    pub stats: usize,
    pub mean: BufRef,
    pub var: BufRef,
    pub channels: usize,
}

impl BnHook {
    pub fn new(mode: StatsMode, always: bool) -> BnHook {
        BnHook {
            mode,
            always,
            source_affine: false,
            source_params: Default::default(),
            saved: HashMap::new(),
            commits: Vec::new(),
            frame_commits: Vec::new(),
            shift: None,
            fuse: false,
            fuse_activation: false,
        }
    }
}

fn params(s: &SavedBn, a: (f32, f32, f32, f32, bool), accumulate: bool) -> Params {
    act_params(s, a, accumulate, TailAct::None)
}

/// [`params`] with `bn_apply`'s fused activation.
fn act_params(s: &SavedBn, a: (f32, f32, f32, f32, bool), accumulate: bool, act: TailAct) -> Params {
    let (code, lo, hi) = match act {
        TailAct::None => (0, 0.0, 0.0),
        TailAct::Relu => (1, 0.0, 0.0),
        TailAct::Clip { min, max } => (2, min, max),
    };
    let window = if let StatsMode::Frame { window, .. } = s.mode { window } else { 0 };
    let p = Params::new()
        .u32(s.batch as u32)
        .u32(s.channels as u32)
        .u32(s.plane as u32)
        .f32(s.eps)
        .f32(a.0)
        .f32(a.1)
        .f32(a.2)
        .f32(a.3)
        .u32(a.4 as u32)
        .u32(accumulate as u32)
        .u32(window)
        .u32(code)
        .f32(lo)
        .f32(hi)
        .u32(0)
        .u32(0);
    // BN-α's α may be set again between runs (`Compiled::set_bn_alpha`): words 4–7.
    match s.mode {
        StatsMode::Alpha { .. } => p.bn_alpha_at(4, (s.batch * s.plane) as u32),
        _ => p,
    }
}

/// BN-α's coefficients (a_mean, b_mean, a_var, b_var) for `m` values per channel, exactly as
/// the lowering computes them.
pub fn alpha_coefficients(alpha: f32, m: u32) -> [f32; 4] {
    [alpha, 1.0 - alpha, alpha * m as f32 / (m as f32 - 1.0), 1.0 - alpha]
}

impl LowerHook for BnHook {
    fn fusable(&self, graph: &Graph, node: usize) -> bool {
        let bn_lowered_here = matches!(graph.nodes[node].op, crate::ops::Op::BatchNorm(_))
            && (self.mode != StatsMode::Source || self.always || self.shift.is_some());
        self.fuse && !bn_lowered_here
    }

    fn lower(&mut self, graph: &Graph, node: usize, l: &mut Lowering, program: &mut Program) -> Option<OpResult<()>> {
        self.lower_bn(graph, node, l, program, TailAct::None)
    }

    fn fuses_activation(&self, graph: &Graph, node: usize) -> bool {
        self.fuse_activation && self.lowers(graph, node)
    }

    fn lower_with_activation(
        &mut self,
        graph: &Graph,
        node: usize,
        l: &mut Lowering,
        program: &mut Program,
        act: TailAct,
    ) -> OpResult<()> {
        self.lower_bn(graph, node, l, program, act)
            .unwrap_or_else(|| Err(OpReason::Internal("a fused activation after a layer not lowered here".into())))
    }

    fn weight_name(&self, name: &str) -> Option<String> {
        (self.source_affine && self.source_params.contains(name)).then(|| source_affine_name(name))
    }
}

/// Every LayerNorm, GroupNorm and InstanceNorm affine parameter of `graph`: what a
/// `source_affine` program reads from the source copies (whether adapted or not: the ones that
/// are not hold their source values anyway).
pub fn affine_norm_params(graph: &Graph) -> std::collections::HashSet<String> {
    graph.affine_norms().into_iter().flat_map(|a| std::iter::once(a.scale).chain(a.bias)).collect()
}

/// The buffer holding adapted parameter `name`'s source value for programs that run the
/// unadapted model (`source_affine`): created from the initializer, never written.
pub fn source_affine_name(name: &str) -> String {
    format!("woc:source:{name}")
}

impl BnHook {
    /// Whether `node` is a BatchNormalization this hook lowers (the others keep the inference
    /// kernel).
    fn lowers(&self, graph: &Graph, node: usize) -> bool {
        matches!(graph.nodes[node].op, crate::ops::Op::BatchNorm(_)) && (self.mode != StatsMode::Source || self.always)
    }

    /// The layer's lowering, `act` applied to its output by `bn_apply`.
    fn lower_bn(
        &mut self,
        graph: &Graph,
        node: usize,
        l: &mut Lowering,
        program: &mut Program,
        act: TailAct,
    ) -> Option<OpResult<()>> {
        let crate::ops::Op::BatchNorm(attrs) = &graph.nodes[node].op else { return None };
        if self.mode == StatsMode::Source && !self.always {
            return None;
        }
        Some((|| {
            let x = l.input(0, "X")?.clone();
            if x.shape.len() < 2 {
                return Err(OpReason::Shape(format!(
                    "BatchNormalization input must have rank >= 2, got {:?}",
                    x.shape
                )));
            }
            let (batch, channels) = (x.shape[0], x.shape[1]);
            let plane: usize = x.shape[2..].iter().product();
            let m = batch * plane;
            let mut coef = self.mode.coefficients(m)?;
            // The write-back of RBN's running statistics is deferred to the end of the program,
            // where the parameter guard commits it only if every value is finite.
            let write_back = std::mem::replace(&mut coef.4, false);
            let mut scale = l.input(1, "scale")?.clone();
            let mut bias = l.input(2, "B")?.clone();
            if self.source_affine {
                for p in [&mut scale, &mut bias] {
                    if let BufRef::Weight(w) = p.buf {
                        let (name, init) = (program.weights[w].name.clone(), program.weights[w].init.clone());
                        p.buf = BufRef::Weight(program.weight(&source_affine_name(&name), || init, true));
                    }
                }
            }
            let mean = l.input(3, "input_mean")?.clone();
            let var = l.input(4, "input_var")?.clone();
            for (what, p) in [("scale", &scale), ("B", &bias), ("input_mean", &mean), ("input_var", &var)] {
                if !matches!(p.buf, BufRef::Weight(_)) {
                    return Err(OpReason::Unsupported(format!("{what} must be a constant to use batch statistics")));
                }
            }
            let stats = program.value(4 * channels as u64 * 4);
            if self.mode != StatsMode::Source {
                program.flops.norm += crate::ops::flops::BN_BATCH_STATS * (batch * channels * plane) as u64;
            }
            let saved = SavedBn {
                x: x.clone(),
                scale: scale.clone(),
                stats,
                channels,
                plane,
                batch,
                eps: attrs.epsilon,
                mode: self.mode,
            };
            let y = l.output(0)?.buf;
            if let StatsMode::Frame { alpha_mean, alpha_var, min_plane, .. } = self.mode {
                // The source statistics as the model has them, in buffers no update writes (an
                // EMA-mode gradient step would write the model's own running statistics).
                let source = |p: &Operand, program: &mut Program| -> OpResult<BufRef> {
                    let BufRef::Weight(w) = p.buf else {
                        return Err(OpReason::Unsupported(
                            "frame statistics need constant BatchNormalization parameters".into(),
                        ));
                    };
                    let (name, init) = (program.weights[w].name.clone(), program.weights[w].init.clone());
                    Ok(BufRef::Weight(program.weight(&format!("frame:source:{name}"), || init, true)))
                };
                let (src_mean, src_var) = (source(&mean, program)?, source(&var, program)?);
                let BufRef::Weight(mw) = mean.buf else {
                    return Err(OpReason::NotConstant { what: "input_mean".into() });
                };
                let evidence_len = 3 * channels + 1;
                let evidence_name = frame_evidence_name(&program.weights[mw].name);
                let evidence = program.weight(&evidence_name, || WeightInit::Zeros(evidence_len), true);
                let next = program.value(evidence_len as u64 * 4);
                let (a_mean, a_var) = if plane < min_plane { (0.0, 0.0) } else { (alpha_mean, alpha_var) };
                // Downlevel limits allow 4 storage buffers per kernel: bn_frame reads the source
                // statistics and the evidence packed into one.
                let sources = l.scratch((2 * channels + evidence_len) as u64 * 4);
                dispatch(
                    l,
                    gather(
                        &[(src_mean, channels), (src_var, channels), (BufRef::Weight(evidence), evidence_len)],
                        sources,
                        0,
                    ),
                );
                let (entry, groups) = reduce_kernel("bn_frame", channels, l.cpu_kernels);
                // The weights may be set again between runs (`Compiled::set_frame_alpha`), except
                // in the layers kept at the source.
                let block = params(&saved, (a_mean, 0.0, a_var, 0.0, false), false);
                l.dispatch(
                    KernelKey::new(Shader::Norm, entry),
                    if plane < min_plane { block } else { block.frame_alpha_at(4) },
                    vec![x.buf, sources, BufRef::Value(stats), BufRef::Value(next)],
                    groups,
                );
                apply(l, &saved, coef, (scale.buf, bias.buf), y, act);
                self.frame_commits.push((next, BufRef::Weight(evidence), evidence_len));
                self.saved.insert(node, saved);
                return Ok(());
            }
            let (entry, groups) = reduce_kernel("bn_stats", channels, l.cpu_kernels);
            l.dispatch(
                KernelKey::new(Shader::Norm, entry),
                params(&saved, coef, false),
                vec![x.buf, mean.buf, var.buf, BufRef::Value(stats)],
                groups,
            );
            if let Some(shift) = self.shift.as_mut().filter(|s| s.written < s.layers) {
                l.dispatch(
                    KernelKey::new(Shader::Norm, "bn_shift"),
                    Params::new().u32(channels as u32).u32(shift.written as u32).f32(attrs.epsilon),
                    vec![BufRef::Value(stats), mean.buf, var.buf, BufRef::Value(shift.out)],
                    [1, 1, 1],
                );
                shift.written += 1;
                program.flops.norm += 8 * channels as u64;
            }
            apply(l, &saved, coef, (scale.buf, bias.buf), y, act);
            if write_back {
                self.commits.push(StatsCommit { stats, mean: mean.buf, var: var.buf, channels });
            }
            self.saved.insert(node, saved);
            Ok(())
        })())
    }
}

fn dispatch(l: &mut Lowering, d: crate::ops::Dispatch) {
    l.dispatch(d.key, d.params, d.buffers, d.workgroups);
}

/// bn_apply, after packing [scale, bias, statistics] into one buffer (downlevel limits allow 4
/// storage buffers per kernel).
fn apply(
    l: &mut Lowering,
    s: &SavedBn,
    coef: (f32, f32, f32, f32, bool),
    affine: (BufRef, BufRef),
    y: BufRef,
    act: TailAct,
) {
    let c = s.channels;
    let packed = l.scratch(6 * c as u64 * 4);
    dispatch(l, gather(&[(affine.0, c), (affine.1, c), (BufRef::Value(s.stats), 4 * c)], packed, 0));
    let (entry, groups) = elementwise_kernel("bn_apply", s, l.cpu_kernels);
    l.dispatch(KernelKey::new(Shader::Norm, entry), act_params(s, coef, false, act), vec![s.x.buf, packed, y], groups);
}

/// A per-element pass's entry and grid: one invocation per value, or on a CPU adapter
/// (`cpu_kernels`) its `_rows` variant, a workgroup per 256 positions of one (sample, channel)
/// plane, the rows past 65,535 on z (norm.wgsl `bn_apply_rows`).
fn elementwise_kernel(entry: &'static str, s: &SavedBn, cpu_kernels: bool) -> (&'static str, [u32; 3]) {
    if !cpu_kernels {
        return (entry, grid_1d(s.x.numel(), 256));
    }
    let rows = s.batch * s.channels;
    let groups = [s.plane.div_ceil(256) as u32, rows.min(65535) as u32, rows.div_ceil(65535) as u32];
    match entry {
        "bn_apply" => ("bn_apply_rows", groups),
        "bn_backward_dx" => ("bn_backward_dx_rows", groups),
        other => (other, grid_1d(s.x.numel(), 256)),
    }
}

/// A per-channel reduction's entry and grid: one workgroup per channel, or on a CPU adapter
/// (`cpu_kernels`) its `_lanes` variant, one invocation per channel (norm.wgsl says why).
fn reduce_kernel(entry: &'static str, channels: usize, cpu_kernels: bool) -> (&'static str, [u32; 3]) {
    match (cpu_kernels, entry) {
        (true, "bn_stats") => ("bn_stats_lanes", [channels.div_ceil(LANES) as u32, 1, 1]),
        (true, "bn_backward_reduce") => ("bn_backward_reduce_lanes", [channels.div_ceil(LANES) as u32, 1, 1]),
        (true, "bn_frame") => ("bn_frame_lanes", [channels.div_ceil(LANES) as u32, 1, 1]),
        _ => (entry, [channels as u32, 1, 1]),
    }
}

/// Channels per workgroup of the `_lanes` reductions (norm.wgsl's `LANES`).
const LANES: usize = 8;

/// The reverse pass of one layer: dscale and dbias (when the layer is adapted) and dx (when the
/// layer's input depends on an earlier adapted parameter). `dx` is `(value, accumulate)`;
/// `cpu_kernels` as [`crate::ops::BackwardLowering::cpu_kernels`].
pub fn backward(
    s: &SavedBn,
    dy: usize,
    dparams: Option<(usize, usize)>,
    dx: Option<(usize, bool)>,
    scratch: &mut Vec<u64>,
    cpu_kernels: bool,
) -> OpResult<Vec<crate::ops::Dispatch>> {
    let m = s.batch * s.plane;
    let coef = s.mode.coefficients(m)?;
    let mut out = Vec::new();
    // Downlevel limits allow 4 storage buffers per kernel, so both kernels share one packed
    // buffer: [scale (C), statistics (4C)] gathered here, then [k1, k2 (C each), dscale, dbias]
    // written by the reduce.
    let c = s.channels;
    scratch.push(9 * c as u64 * 4);
    let k = BufRef::Scratch(scratch.len() - 1);
    out.push(gather(&[(s.scale.buf, c), (BufRef::Value(s.stats), 4 * c)], k, 0));
    let (entry, workgroups) = reduce_kernel("bn_backward_reduce", c, cpu_kernels);
    out.push(crate::ops::Dispatch {
        key: KernelKey::new(Shader::Norm, entry),
        params: params(s, coef, false),
        buffers: vec![s.x.buf, BufRef::Value(dy), k],
        workgroups,
    });
    // The reduce always writes dscale and dbias; only an adapted layer's go anywhere.
    if let Some((ds, db)) = dparams {
        out.push(scatter(k, (BufRef::Value(ds), 7 * c, c), (BufRef::Value(db), 8 * c, c)));
    }
    if let Some((dx, accumulate)) = dx {
        let (entry, workgroups) = elementwise_kernel("bn_backward_dx", s, cpu_kernels);
        out.push(crate::ops::Dispatch {
            key: KernelKey::new(Shader::Norm, entry),
            params: params(s, coef, accumulate),
            buffers: vec![s.x.buf, BufRef::Value(dy), k, BufRef::Value(dx)],
            workgroups,
        });
    }
    Ok(out)
}
