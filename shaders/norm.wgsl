// BatchNormalization (inference): y = (x - mean[c]) / sqrt(var[c] + eps) * scale[c] + bias[c].
//
// The four per-channel parameters are bound as buffers, not baked in, because test-time
// adaptation updates them on the GPU between runs.
//
// Flat index: gid.x + gid.y * (num_workgroups.x * 256) (see gpu::grid_1d).

struct BnParams {
    n: u32,
    channels: u32,
    // Elements per channel plane (product of the dims after C; 1 for a 2-D input).
    plane: u32,
    eps: f32,
}

// A storage block, read in place: with the parameters packed into one buffer the kernel binds
// four storage buffers in all (downlevel limits), so it needs no uniform block staged through
// workgroup memory. That staging's barrier made lavapipe run every workgroup as coroutines: the
// kernel cost 4.5 times a ReLU pass over the same tensor (`acclimate bench --profile`).
@group(0) @binding(0) var<storage, read> bnp: BnParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
// [scale (C), bias (C), mean (C), var (C)], packed by layout.wgsl's gather3.
@group(0) @binding(2) var<storage, read> sbmv: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn batchnorm_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= bnp.n { return; }
    let cc = bnp.channels;
    let c = (i / bnp.plane) % cc;
    // sqrt then divide, not inverseSqrt: inverseSqrt may be an approximation on some drivers.
    let inv_std = 1.0 / sqrt(sbmv[3u * cc + c] + bnp.eps);
    y[i] = (x[i] - sbmv[2u * cc + c]) * inv_std * sbmv[c] + sbmv[cc + c];
}

// ---------------------------------------------------------------------------------------------
// Adaptation: BatchNormalization with batch statistics (TENT), running EMA statistics (RBN) or a
// mix of source and batch statistics (BN-alpha), and its reverse pass.
//
// Every mode normalises with "used" statistics
//     mean_u = a_mean * mean_B + b_mean * ref_mean,   var_u = a_var * var_B + b_var * ref_var
// where mean_B and var_B (biased) are the current batch's, over (N, D1..Dn), and ref_* are the
// layer's stored statistics: batch mode a = 1, b = 0; EMA a = alpha, b = 1 - alpha (and the used
// statistics are written back as the new running ones); BN-alpha a_mean = alpha,
// a_var = alpha * m / (m - 1) (unbiased batch variance), b = 1 - alpha.
//
// Reductions run in one workgroup per channel with a fixed-order tree: bit-identical run to run.

struct BnTrainParams {
    n: u32,
    channels: u32,
    plane: u32,
    eps: f32,
    a_mean: f32,
    b_mean: f32,
    a_var: f32,
    b_var: f32,
    write_back: u32,
    accumulate: u32,
    // bn_frame: the evidence window W in frames.
    window: u32,
    // bn_apply: the activation applied to its output (activation.wgsl, as the Relu and Clip
    // passes compute it): 0 none, 1 Relu, 2 Clip to [lo, hi].
    act: u32,
    lo: f32,
    hi: f32,
    _p2: u32,
    _p3: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> tp_in: BnTrainParams;
// Staged through workgroup memory at the top of every entry point that reads it (see
// runtime/src/gpu/params.rs): a uniform block, so it does not count against the 4 storage buffers
// per stage of downlevel (phone) limits, that lavapipe cannot inline.
var<workgroup> tp: BnTrainParams;
// bn_stats bindings
@group(0) @binding(1) var<storage, read> sx: array<f32>;
@group(0) @binding(2) var<storage, read_write> run_mean: array<f32>;
@group(0) @binding(3) var<storage, read_write> run_var: array<f32>;
// [mean_B (C), var_B (C), mean_u (C), var_u (C)]
@group(0) @binding(4) var<storage, read_write> stats: array<f32>;

var<workgroup> red: array<f32, 256>;

fn element(i: u32, c: u32) -> u32 {
    // i runs over (n, p) of one channel.
    let n = i / tp.plane;
    let p = i % tp.plane;
    return (n * tp.channels + c) * tp.plane + p;
}

// element(i, c) for i = t, t + WG, t + 2·WG, … without a division per step (the `_lanes`
// kernels: llvmpipe divides lane by lane): (n, p) of i, advanced by WG.
fn walk_start(t: u32) -> vec2<u32> {
    return vec2<u32>(t / tp.plane, t % tp.plane);
}

fn walk_next(w: vec2<u32>) -> vec2<u32> {
    var n = w.x;
    var p = w.y + WG;
    while p >= tp.plane {
        p -= tp.plane;
        n += 1u;
    }
    return vec2<u32>(n, p);
}

fn walk_at(w: vec2<u32>, c: u32) -> u32 {
    return (w.x * tp.channels + c) * tp.plane + w.y;
}

// 1 on CPU adapters (gpu::GpuContext::variant): invocation 0 adds the levels of the tree itself,
// level by level in the same order, so the values are the same, behind 2 barriers instead of 9.
// A CPU adapter runs a workgroup's invocations as coroutines and pays for every barrier with a
// switch through all of them: MobileNetV2's TENT step at batch 2 on lavapipe spent 737 ms in
// bn_stats and bn_backward_reduce with the parallel tree, 554 ms with this one (and 231 ms with
// their `_lanes` variants below, which have no barrier in the reduction at all; the kernels
// that still run with a workgroup per channel keep this one).
override SERIAL_TREE: u32 = 0u;

fn tree(t: u32) {
    workgroupBarrier();
    if SERIAL_TREE != 0u {
        if t == 0u {
            for (var s = WG / 2u; s > 0u; s = s >> 1u) {
                for (var i = 0u; i < s; i++) {
                    red[i] = red[i] + red[i + s];
                }
            }
        }
        workgroupBarrier();
        return;
    }
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if t < s {
            red[t] = red[t] + red[t + s];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn bn_stats(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        tp = tp_in;
    }
    workgroupBarrier();
    let c = wid.x;
    let t = lid.x;
    let m = tp.n * tp.plane;
    var acc = 0.0;
    for (var i = t; i < m; i += WG) {
        acc += sx[element(i, c)];
    }
    red[t] = acc;
    tree(t);
    let mean = red[0] / f32(m);
    workgroupBarrier();
    // Two passes (mean, then squared deviations) rather than E[x^2] - E[x]^2, which cancels badly.
    var acc2 = 0.0;
    for (var i = t; i < m; i += WG) {
        let d = sx[element(i, c)] - mean;
        acc2 += d * d;
    }
    red[t] = acc2;
    tree(t);
    if t == 0u {
        stats_out(c, mean, red[0] / f32(m));
    }
}

// Channel c's statistics from its batch mean and biased variance.
fn stats_out(c: u32, mean: f32, var_b: f32) {
    let mean_u = tp.a_mean * mean + tp.b_mean * run_mean[c];
    let var_u = tp.a_var * var_b + tp.b_var * run_var[c];
    stats[c] = mean;
    stats[tp.channels + c] = var_b;
    stats[2u * tp.channels + c] = mean_u;
    stats[3u * tp.channels + c] = var_u;
    if tp.write_back != 0u {
        run_mean[c] = mean_u;
        run_var[c] = var_u;
    }
}

// The reductions' variants for CPU adapters (the lowering picks them, adapt/bn.rs): one
// invocation per channel, LANES channels per workgroup, and no barrier but the parameters'
// staging. Each invocation forms the WG strided partial sums the parallel kernel's invocations
// form, in its private array, then adds them in the same tree: the same values.
const LANES: u32 = 8u;

// The parallel tree of `tree`, on a private array.
fn tree_private(part: ptr<function, array<f32, 256>>) -> f32 {
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        for (var i = 0u; i < s; i++) {
            (*part)[i] = (*part)[i] + (*part)[i + s];
        }
    }
    return (*part)[0];
}

@compute @workgroup_size(8)
fn bn_stats_lanes(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        tp = tp_in;
    }
    workgroupBarrier();
    let c = wid.x * LANES + lid.x;
    if c >= tp.channels { return; }
    let m = tp.n * tp.plane;
    var part: array<f32, 256>;
    for (var t = 0u; t < WG; t++) {
        var acc = 0.0;
        var w = walk_start(t);
        for (var i = t; i < m; i += WG) {
            acc += sx[walk_at(w, c)];
            w = walk_next(w);
        }
        part[t] = acc;
    }
    let mean = tree_private(&part) / f32(m);
    for (var t = 0u; t < WG; t++) {
        var acc2 = 0.0;
        var w = walk_start(t);
        for (var i = t; i < m; i += WG) {
            let d = sx[walk_at(w, c)] - mean;
            acc2 += d * d;
            w = walk_next(w);
        }
        part[t] = acc2;
    }
    stats_out(c, mean, tree_private(&part) / f32(m));
}

// bn_frame: the frame protocol's source-anchored statistics (adapt/bn.rs `StatsMode::Frame`).
// `fest` holds the evidence of the frames seen so far, [M1 (C), M2 (C), V (C), n]: running
// averages of each frame's channel mean, squared mean and biased variance, over the last W
// frames (rate max(1/W, 1/(n + 1)): a plain average until W frames, then an EMA). The layer
// normalises with
//     mean_u = src_mean + a_mean * r * (M1 - src_mean)
//     var_u  = src_var  + a_var  * r * (V + max(M2 - M1^2, 0) - src_var),   r = min(n, W) / W
// i.e. the evidence BEFORE this frame, never this frame's own statistics, blended into the
// source's with at most weight a: one frame cannot move its own prediction, and no run of
// frames can take more than a of the source away. V + (M2 - M1^2) is the population variance
// (within-frame plus between-frame), which the within-frame variance alone underestimates.
// The next evidence goes to `fnext` (committed by the parameter guard); stats gets
// [mean_B, var_B, mean_u, var_u] as bn_stats writes it.
// Four storage buffers at most (downlevel limits): the source statistics and the evidence
// arrive packed by gather3 as [src_mean (C), src_var (C), M1 (C), M2 (C), V (C), n].
@group(0) @binding(1) var<storage, read> fx: array<f32>;
@group(0) @binding(2) var<storage, read> fsrc: array<f32>;
@group(0) @binding(3) var<storage, read_write> fstats: array<f32>;
@group(0) @binding(4) var<storage, read_write> fnext: array<f32>;

@compute @workgroup_size(256)
fn bn_frame(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        tp = tp_in;
    }
    workgroupBarrier();
    let c = wid.x;
    let t = lid.x;
    let m = tp.n * tp.plane;
    var acc = 0.0;
    for (var i = t; i < m; i += WG) {
        acc += fx[element(i, c)];
    }
    red[t] = acc;
    tree(t);
    let mean = red[0] / f32(m);
    workgroupBarrier();
    var acc2 = 0.0;
    for (var i = t; i < m; i += WG) {
        let d = fx[element(i, c)] - mean;
        acc2 += d * d;
    }
    red[t] = acc2;
    tree(t);
    if t == 0u {
        frame_out(c, mean, red[0] / f32(m));
    }
}

// Channel c's used statistics and next evidence from this frame's mean and biased variance.
fn frame_out(c: u32, mean: f32, var_b: f32) {
    let cc = tp.channels;
    let w = f32(max(tp.window, 1u));
    let seen = fsrc[5u * cc];
    let r = min(seen, w) / w;
    let m1 = fsrc[2u * cc + c];
    let m2 = fsrc[3u * cc + c];
    let v = fsrc[4u * cc + c];
    let var_est = v + max(m2 - m1 * m1, 0.0);
    fstats[c] = mean;
    fstats[cc + c] = var_b;
    fstats[2u * cc + c] = fsrc[c] + tp.a_mean * r * (m1 - fsrc[c]);
    fstats[3u * cc + c] = fsrc[cc + c] + tp.a_var * r * (var_est - fsrc[cc + c]);
    let rate = max(1.0 / w, 1.0 / (seen + 1.0));
    fnext[c] = m1 + rate * (mean - m1);
    fnext[cc + c] = m2 + rate * (mean * mean - m2);
    fnext[2u * cc + c] = v + rate * (var_b - v);
    if c == 0u {
        fnext[3u * cc] = seen + 1.0;
    }
}

// bn_frame on CPU adapters: one channel per invocation, as bn_stats_lanes (the same values).
@compute @workgroup_size(8)
fn bn_frame_lanes(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        tp = tp_in;
    }
    workgroupBarrier();
    let c = wid.x * LANES + lid.x;
    if c >= tp.channels { return; }
    let m = tp.n * tp.plane;
    var part: array<f32, 256>;
    for (var t = 0u; t < WG; t++) {
        var acc = 0.0;
        var w = walk_start(t);
        for (var i = t; i < m; i += WG) {
            acc += fx[walk_at(w, c)];
            w = walk_next(w);
        }
        part[t] = acc;
    }
    let mean = tree_private(&part) / f32(m);
    for (var t = 0u; t < WG; t++) {
        var acc2 = 0.0;
        var w = walk_start(t);
        for (var i = t; i < m; i += WG) {
            let d = fx[walk_at(w, c)] - mean;
            acc2 += d * d;
            w = walk_next(w);
        }
        part[t] = acc2;
    }
    frame_out(c, mean, tree_private(&part) / f32(m));
}

// bn_shift: one layer's covariate-shift score for method auto's diagnostics (adapt/bn.rs
// `ShiftScores`): the mean over the channels of
//     KL(N(mean_B, var_B + eps) || N(mean_s, var_s + eps))
//       = ((var_B + eps + (mean_B - mean_s)^2) / (var_s + eps) - 1 - ln((var_B + eps) / (var_s + eps))) / 2,
// the current batch's statistics (bn_stats' [mean_B, var_B, ...]) against the layer's stored
// ones, written to shift[slot]. One workgroup, a fixed-order tree over the channels.
struct BnShiftParams {
    channels: u32,
    slot: u32,
    eps: f32,
    _p0: u32,
}

@group(0) @binding(0) var<uniform> hp_in: BnShiftParams;
var<workgroup> hp: BnShiftParams;
@group(0) @binding(1) var<storage, read> hstats: array<f32>;
@group(0) @binding(2) var<storage, read> hmean: array<f32>;
@group(0) @binding(3) var<storage, read> hvar: array<f32>;
@group(0) @binding(4) var<storage, read_write> shift: array<f32>;

@compute @workgroup_size(256)
fn bn_shift(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        hp = hp_in;
    }
    workgroupBarrier();
    let t = lid.x;
    let cc = hp.channels;
    var acc = 0.0;
    for (var c = t; c < cc; c += WG) {
        let vb = hstats[cc + c] + hp.eps;
        let vs = hvar[c] + hp.eps;
        let d = hstats[c] - hmean[c];
        acc += 0.5 * ((vb + d * d) / vs - 1.0 - log(vb / vs));
    }
    red[t] = acc;
    tree(t);
    if t == 0u {
        shift[hp.slot] = red[0] / f32(cc);
    }
}

// bn_apply bindings
// Four storage buffers at most (downlevel limits): packed by gather3 as
// [scale (C), bias (C), mean_B, var_B, mean_u, var_u (C each)].
// Three data buffers: the parameters are a storage block read in place, with no staging barrier
// (batchnorm_main says why; MobileNetV2's TENT step at batch 2 spent 158 ms here with one).
@group(0) @binding(0) var<storage, read> atp: BnTrainParams;
@group(0) @binding(1) var<storage, read> ax: array<f32>;
@group(0) @binding(2) var<storage, read> apk: array<f32>;
@group(0) @binding(3) var<storage, read_write> ay: array<f32>;

@compute @workgroup_size(256)
fn bn_apply(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= atp.n * atp.channels * atp.plane { return; }
    let c = (i / atp.plane) % atp.channels;
    let cc = atp.channels;
    let inv_std = 1.0 / sqrt(apk[5u * cc + c] + atp.eps);
    ay[i] = apply_act((ax[i] - apk[4u * cc + c]) * inv_std * apk[c] + apk[cc + c]);
}

// The Relu or Clip that only bn_apply's output feeds, fused (forward-only programs, adapt/bn.rs).
fn apply_act(r: f32) -> f32 {
    if atp.act == 1u {
        return nan_or(r, max(r, 0.0));
    } else if atp.act == 2u {
        return clip_onnx(r, atp.lo, atp.hi);
    }
    return r;
}

// bn_apply_rows: bn_apply with a grid of its own, for CPU adapters (adapt/bn.rs picks it; the
// same values): workgroup (x, y + z·65535) covers positions [256x, 256x + 256) of the plane of
// row n·C + c, each invocation 4 consecutive ones, so the channel's values are loaded once and
// no position is divided by the plane.
@compute @workgroup_size(64)
fn bn_apply_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let row = wid.y + wid.z * nwg.y;
    let cc = atp.channels;
    if row >= atp.n * cc { return; }
    let c = row % cc;
    let inv_std = 1.0 / sqrt(apk[5u * cc + c] + atp.eps);
    let mean = apk[4u * cc + c];
    let scale = apk[c];
    let shift = apk[cc + c];
    let base = row * atp.plane;
    let first = wid.x * 256u + lid.x * 4u;
    for (var k = 0u; k < 4u; k++) {
        let i = first + k;
        if i < atp.plane {
            ay[base + i] = apply_act((ax[base + i] - mean) * inv_std * scale + shift);
        }
    }
}

// bn_backward_reduce bindings: per channel, dbeta = sum(dy), dgamma = sum(dy * xhat_u), and the
// two coefficients of dx (k1, k2 below) into coef [2C].
// Four storage buffers at most (downlevel limits): one packed buffer, filled by gather3 with
// [scale (C), mean_B, var_B, mean_u, var_u (C each)], gets coef (2C), dscale (C) and dbias (C)
// after them; scatter2 copies dscale and dbias out to the gradients.
@group(0) @binding(1) var<storage, read> rx: array<f32>;
@group(0) @binding(2) var<storage, read> rdy: array<f32>;
@group(0) @binding(3) var<storage, read_write> rpk: array<f32>;

@compute @workgroup_size(256)
fn bn_backward_reduce(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        tp = tp_in;
    }
    workgroupBarrier();
    let c = wid.x;
    let t = lid.x;
    let m = tp.n * tp.plane;
    let mean_u = rpk[3u * tp.channels + c];
    var s1 = 0.0;
    for (var i = t; i < m; i += WG) {
        s1 += rdy[element(i, c)];
    }
    red[t] = s1;
    tree(t);
    let sum_dy = red[0];
    workgroupBarrier();
    var s2 = 0.0;
    for (var i = t; i < m; i += WG) {
        let e = element(i, c);
        s2 += rdy[e] * (rx[e] - mean_u);
    }
    red[t] = s2;
    tree(t);
    if t == 0u {
        reduce_out(c, sum_dy, red[0]);
    }
}

// Channel c's reverse-pass coefficients from Σ dY and Σ dY·(x − mean_u).
fn reduce_out(c: u32, sum_dy: f32, sum_dy_xc: f32) {
    let m = tp.n * tp.plane;
    let var_u = rpk[4u * tp.channels + c];
    let inv_std = 1.0 / sqrt(var_u + tp.eps);
    let g = rpk[c];
    rpk[8u * tp.channels + c] = sum_dy;
    rpk[7u * tp.channels + c] = sum_dy_xc * inv_std;
    // dL/dmean_u and dL/dvar_u through xhat; the chain to x goes through mean_B and var_B.
    let d_mean_u = -g * inv_std * sum_dy;
    let d_var_u = -0.5 * g * sum_dy_xc * inv_std * inv_std * inv_std;
    rpk[5u * tp.channels + c] = d_mean_u * tp.a_mean / f32(m);
    rpk[6u * tp.channels + c] = d_var_u * tp.a_var * 2.0 / f32(m);
}

@compute @workgroup_size(8)
fn bn_backward_reduce_lanes(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        tp = tp_in;
    }
    workgroupBarrier();
    let c = wid.x * LANES + lid.x;
    if c >= tp.channels { return; }
    let m = tp.n * tp.plane;
    let mean_u = rpk[3u * tp.channels + c];
    var part: array<f32, 256>;
    for (var t = 0u; t < WG; t++) {
        var s1 = 0.0;
        var w = walk_start(t);
        for (var i = t; i < m; i += WG) {
            s1 += rdy[walk_at(w, c)];
            w = walk_next(w);
        }
        part[t] = s1;
    }
    let sum_dy = tree_private(&part);
    for (var t = 0u; t < WG; t++) {
        var s2 = 0.0;
        var w = walk_start(t);
        for (var i = t; i < m; i += WG) {
            let e = walk_at(w, c);
            s2 += rdy[e] * (rx[e] - mean_u);
            w = walk_next(w);
        }
        part[t] = s2;
    }
    reduce_out(c, sum_dy, tree_private(&part));
}

// bn_backward_dx bindings: dx = g * dy / s + k1 + k2 * (x - mean_B).
// The packed buffer of bn_backward_reduce: [scale, mean_B, var_B, mean_u, var_u, k1, k2, ...].
@group(0) @binding(1) var<storage, read> bx: array<f32>;
@group(0) @binding(2) var<storage, read> bdy: array<f32>;
@group(0) @binding(3) var<storage, read> bpk: array<f32>;
@group(0) @binding(4) var<storage, read_write> bdx: array<f32>;

@compute @workgroup_size(256)
fn bn_backward_dx(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        tp = tp_in;
    }
    workgroupBarrier();
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= tp.n * tp.channels * tp.plane { return; }
    let c = (i / tp.plane) % tp.channels;
    let cc = tp.channels;
    let inv_std = 1.0 / sqrt(bpk[4u * cc + c] + tp.eps);
    let v = bpk[c] * bdy[i] * inv_std + bpk[5u * cc + c] + bpk[6u * cc + c] * (bx[i] - bpk[cc + c]);
    if tp.accumulate != 0u {
        bdx[i] = bdx[i] + v;
    } else {
        bdx[i] = v;
    }
}

// bn_backward_dx_rows: bn_backward_dx with bn_apply_rows' grid, for CPU adapters (the same
// values): the channel's coefficients loaded once per invocation, 4 positions each.
@compute @workgroup_size(64)
fn bn_backward_dx_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) pli: u32,
) {
    if pli == 0u {
        tp = tp_in;
    }
    workgroupBarrier();
    let row = wid.y + wid.z * nwg.y;
    let cc = tp.channels;
    if row >= tp.n * cc { return; }
    let c = row % cc;
    let inv_std = 1.0 / sqrt(bpk[4u * cc + c] + tp.eps);
    let g = bpk[c];
    let k1 = bpk[5u * cc + c];
    let k2 = bpk[6u * cc + c];
    let mean = bpk[cc + c];
    let base = row * tp.plane;
    let first = wid.x * 256u + lid.x * 4u;
    for (var k = 0u; k < 4u; k++) {
        let i = first + k;
        if i < tp.plane {
            let e = base + i;
            let v = g * bdy[e] * inv_std + k1 + k2 * (bx[e] - mean);
            if tp.accumulate != 0u {
                bdx[e] = bdx[e] + v;
            } else {
                bdx[e] = v;
            }
        }
    }
}
