// Softmax / LogSoftmax over rows of `len` elements spaced `inner` apart (see ops/softmax.rs).
//
// Numerically stable: the row maximum is subtracted before exp, and LogSoftmax is computed as
// x - max - log(sum(exp(x - max))) rather than log(softmax), which would underflow to -inf.
// Short rows take a thread each; long rows a workgroup each, with fixed-order tree reductions.
//
// NaN and infinities as in ONNX Runtime: a row holding a NaN or a +inf (inf - inf = NaN), or only
// -inf values (nothing to normalise by), is NaN throughout; -inf elements of any other row give 0
// (Softmax) and -inf (LogSoftmax). The row maximum is NaN-propagating by bit test, since GPU max
// may drop a NaN, and a bad row is decided from its maximum and sum, not from exp(NaN).

// 1 for LogSoftmax, 0 for Softmax.
override LOG: i32 = 0;

struct SoftmaxParams {
    rows: u32,
    len: u32,
    inner: u32,
    _p0: u32,
}

@group(0) @binding(0) var<storage, read> p: SoftmaxParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

fn row_base(r: u32) -> u32 {
    return (r / p.inner) * p.len * p.inner + r % p.inner;
}

fn is_nan(v: f32) -> bool {
    let b = bitcast<u32>(v);
    return (b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu) != 0u;
}

// max that returns a NaN operand rather than the other one.
fn max_nan(a: f32, b: f32) -> f32 {
    return select(select(max(a, b), b, is_nan(b)), a, is_nan(a));
}

fn finish(v: f32, m: f32, sum: f32) -> f32 {
    // NaN or ±inf maximum (a NaN, a +inf, or only -inf in the row), or a zero sum (only -inf, with
    // the workgroup kernel's finite start value): ONNX Runtime returns NaN for the whole row.
    if (bitcast<u32>(m) & 0x7f800000u) == 0x7f800000u || sum == 0.0 {
        return bitcast<f32>(0x7fc00000u);
    }
    if LOG == 1 {
        return v - m - log(sum);
    }
    return exp(v - m) / sum;
}

@compute @workgroup_size(256)
fn softmax_thread_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 256u;
    if r >= p.rows { return; }
    let base = row_base(r);
    var m = x[base];
    for (var j = 1u; j < p.len; j++) {
        m = max_nan(m, x[base + j * p.inner]);
    }
    var sum = 0.0;
    for (var j = 0u; j < p.len; j++) {
        sum += exp(x[base + j * p.inner] - m);
    }
    for (var j = 0u; j < p.len; j++) {
        let k = base + j * p.inner;
        y[k] = finish(x[k], m, sum);
    }
}

const WG: u32 = 256u;
var<workgroup> partial: array<f32, 256>;

// The maximum and the sum of exp(x - max) of the row at `base` (stride p.inner), by fixed-order
// tree reductions over the workgroup. Call from uniform control flow (it has barriers).
fn wg_row_max_sum(base: u32, t: u32) -> vec2<f32> {
    var m = -3.40282347e38;
    for (var j = t; j < p.len; j += WG) {
        m = max_nan(m, x[base + j * p.inner]);
    }
    partial[t] = m;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if t < s {
            partial[t] = max_nan(partial[t], partial[t + s]);
        }
        workgroupBarrier();
    }
    let row_max = partial[0];
    // Everyone must read the maximum before the slots are reused for the sum.
    workgroupBarrier();
    var sum = 0.0;
    for (var j = t; j < p.len; j += WG) {
        sum += exp(x[base + j * p.inner] - row_max);
    }
    partial[t] = sum;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if t < s {
            partial[t] += partial[t + s];
        }
        workgroupBarrier();
    }
    let row_sum = partial[0];
    // And before the caller's next use of the slots.
    workgroupBarrier();
    return vec2<f32>(row_max, row_sum);
}

@compute @workgroup_size(256)
fn softmax_wg_main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let r = wid.x + wid.y * nwg.x;
    // Uniform per workgroup, so the barriers below stay in uniform control flow.
    if r >= p.rows { return; }
    let base = row_base(r);

    let ms = wg_row_max_sum(base, t);
    let row_max = ms.x;
    let row_sum = ms.y;

    for (var j = t; j < p.len; j += WG) {
        let k = base + j * p.inner;
        y[k] = finish(x[k], row_max, row_sum);
    }
}

// ------------------------------------------------------------------------------------------------
// softmax_topk: per row of `len` logits (inner 1; `_p0` = k), the k most probable classes and
// their softmax probabilities, written [k class indices (as f32), k probabilities] per row: all a
// stream's frame needs to come back from the GPU. Probabilities as softmax_wg_main computes them;
// equal probabilities keep class order (the lower index first), as the host's stable sort does.
// k is at most 32 and at most len.
// ------------------------------------------------------------------------------------------------

var<workgroup> topk_v: array<f32, 256>;
var<workgroup> topk_i: array<u32, 256>;
var<workgroup> topk_chosen: array<u32, 32>;

const NONE: u32 = 0xffffffffu;

// Whether (vb, ib) ranks before (va, ia): larger probability, then lower index; NONE never.
fn topk_before(vb: f32, ib: u32, va: f32, ia: u32) -> bool {
    if ib == NONE { return false; }
    if ia == NONE { return true; }
    return vb > va || (vb == va && ib < ia);
}

@compute @workgroup_size(256)
fn softmax_topk(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let r = wid.x + wid.y * nwg.x;
    // Uniform per workgroup, so the barriers below stay in uniform control flow.
    if r >= p.rows { return; }
    // p.inner is 1 (top_k in ops/softmax.rs).
    let base = row_base(r);
    let ms = wg_row_max_sum(base, t);
    let row_max = ms.x;
    let row_sum = ms.y;
    let k = min(min(p._p0, p.len), 32u);
    let out = r * 2u * k;
    for (var q = 0u; q < k; q++) {
        var bv = 0.0;
        var bi = NONE;
        for (var j = t; j < p.len; j += WG) {
            var taken = false;
            for (var c = 0u; c < q; c++) {
                if topk_chosen[c] == j { taken = true; }
            }
            if taken { continue; }
            let v = finish(x[base + j], row_max, row_sum);
            if topk_before(v, j, bv, bi) {
                bv = v;
                bi = j;
            }
        }
        topk_v[t] = bv;
        topk_i[t] = bi;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
            if t < s && topk_before(topk_v[t + s], topk_i[t + s], topk_v[t], topk_i[t]) {
                topk_v[t] = topk_v[t + s];
                topk_i[t] = topk_i[t + s];
            }
            workgroupBarrier();
        }
        if t == 0u {
            topk_chosen[q] = topk_i[0];
            y[out + q] = f32(topk_i[0]);
            y[out + k + q] = topk_v[0];
        }
        workgroupBarrier();
    }
}

// ------------------------------------------------------------------------------------------------
// Reverse pass, from the saved output y (buffers: y, dy, dX):
//   softmax:    dx = y * (dy - Σ dy·y)
//   logsoftmax: dx = dy - exp(y) * Σ dy
// One row per thread or per workgroup as in the forward, with the same fixed-order sums.
// ------------------------------------------------------------------------------------------------

// 1 to add into the gradient buffer, 0 to overwrite it.
override ACCUM: i32 = 0;

@group(0) @binding(2) var<storage, read> gy: array<f32>;
@group(0) @binding(3) var<storage, read_write> gx: array<f32>;

// Row term summed for the backward: dy·y (softmax) or dy (logsoftmax).
fn grad_term(k: u32) -> f32 {
    if LOG == 1 { return gy[k]; }
    return gy[k] * x[k];
}

fn store_grad(k: u32, s: f32) {
    var v: f32;
    if LOG == 1 {
        v = gy[k] - exp(x[k]) * s;
    } else {
        v = x[k] * (gy[k] - s);
    }
    if ACCUM == 1 { v = gx[k] + v; }
    gx[k] = v;
}

@compute @workgroup_size(256)
fn softmax_backward_thread_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 256u;
    if r >= p.rows { return; }
    let base = row_base(r);
    var s = 0.0;
    for (var j = 0u; j < p.len; j++) {
        s += grad_term(base + j * p.inner);
    }
    for (var j = 0u; j < p.len; j++) {
        store_grad(base + j * p.inner, s);
    }
}

@compute @workgroup_size(256)
fn softmax_backward_wg_main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let r = wid.x + wid.y * nwg.x;
    // Uniform per workgroup, so the barriers below stay in uniform control flow.
    if r >= p.rows { return; }
    let base = row_base(r);
    var s = 0.0;
    for (var j = t; j < p.len; j += WG) {
        s += grad_term(base + j * p.inner);
    }
    partial[t] = s;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h >>= 1u) {
        if t < h {
            partial[t] += partial[t + h];
        }
        workgroupBarrier();
    }
    let row_sum = partial[0];
    for (var j = t; j < p.len; j += WG) {
        store_grad(base + j * p.inner, row_sum);
    }
}
