// Output stages of an adaptation step (tta-methods.md §5, §6, §6b): LAME's Laplacian smoothing
// of the probabilities over the batch's features, and the label-shift corrections (the EMA,
// EM and BBSE prior estimates, the label-shift adapter's modulated final layer).
//
// The kernels that iterate to a stopping rule (LAME's fixed point, EM) and those that need a
// batch-wide sum before they can go on run in ONE workgroup, looping with barriers: a batch is
// tens to a few hundred rows, the stop test needs a batch-wide sum every iteration, and inside
// one workgroup every sum is a fixed-order tree, so a result is bit-identical run to run.

const WG: u32 = 256u;

struct OutParams {
    // rows of the batch
    n: u32,
    // classes
    c: u32,
    // feature dimension
    d: u32,
    // lame: k of the affinity / most iterations; adapter: weight layout
    k: u32,
    // lame: affinity kind (0 rbf, 1 knn, 2 linear); adapter: bias mode
    flag: u32,
    // lame: lambda; EMA: momentum m; EM: tolerance; adapter: Gemm alpha
    x: f32,
    // EMA: 1 - m (formed in f64 on the host); adapter: Gemm beta
    y: f32,
    z: f32,
}

// Read-only storage, not uniform: lavapipe recompiles a kernel whose loops or branches read a
// uniform block each time a submit binds it (see runtime/src/gpu/params.rs). adapter_logits
// takes the same block as a uniform one of its own below.
@group(0) @binding(0) var<uniform> op_in: OutParams;
// Staged through workgroup memory at the top of every entry point that reads it (see
// runtime/src/gpu/params.rs): a uniform block, so it does not count against the 4 storage buffers
// per stage of downlevel (phone) limits, that lavapipe cannot inline.
var<workgroup> op: OutParams;

var<workgroup> red: array<f32, 256>;
var<workgroup> total: f32;

// Fixed-order tree sum of one value per thread; every thread gets the same (uniform) total.
fn wg_sum(t: u32, v: f32) -> f32 {
    red[t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if t < s {
            red[t] = red[t] + red[t + s];
        }
        workgroupBarrier();
    }
    if t == 0u {
        total = red[0];
    }
    return workgroupUniformLoad(&total);
}

fn sync() {
    storageBarrier();
    workgroupBarrier();
}

// A positive finite number (NaN fails both comparisons).
fn usable(v: f32) -> bool {
    return v > 0.0 && v <= 3.4028235e38;
}

// ---- lame_normalize: z_i = h_i / max(‖h_i‖, 1e-12) (F.normalize), one thread per row.
@group(0) @binding(1) var<storage, read> ln_h: array<f32>;
@group(0) @binding(2) var<storage, read_write> ln_z: array<f32>;

@compute @workgroup_size(64)
fn lame_normalize(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        op = op_in;
    }
    workgroupBarrier();
    let i = gid.x;
    if i >= op.n {
        return;
    }
    let d = op.d;
    var s = 0.0;
    for (var k = 0u; k < d; k++) {
        let v = ln_h[i * d + k];
        s += v * v;
    }
    let denom = max(sqrt(s), 1e-12);
    for (var k = 0u; k < d; k++) {
        ln_z[i * d + k] = ln_h[i * d + k] / denom;
    }
}

// ---- lame_affinity: dmat[i, j] = ‖z_j − z_i‖ (rbf, knn) or z_i·z_j (linear), one thread per pair.
@group(0) @binding(1) var<storage, read> la_z: array<f32>;
@group(0) @binding(2) var<storage, read_write> la_d: array<f32>;

@compute @workgroup_size(64)
fn lame_affinity(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        op = op_in;
    }
    workgroupBarrier();
    let idx = gid.x + gid.y * nwg.x * 64u;
    let n = op.n;
    if idx >= n * n {
        return;
    }
    let i = idx / n;
    let j = idx % n;
    let d = op.d;
    var s = 0.0;
    if op.flag == 2u {
        for (var k = 0u; k < d; k++) {
            s += la_z[i * d + k] * la_z[j * d + k];
        }
        la_d[idx] = s;
    } else {
        for (var k = 0u; k < d; k++) {
            let t = la_z[j * d + k] - la_z[i * d + k];
            s += t * t;
        }
        la_d[idx] = sqrt(s);
    }
}

// ---- lame_kernel: the affinity W from dmat, in one workgroup.
//   rbf: σ = mean over i of the k-th smallest distance of row i counting i itself (k clamped to
//        N as the reference's min(k, N)); W = exp(−d²/(2σ²)), so the diagonal is 1. σ = 0 (every
//        k-th neighbour coincides, e.g. a batch of one) takes the limit σ → 0+: 1 where d = 0,
//        0 elsewhere (the reference divides 0 by 0 there).
//   knn: W[i, j] = 1 for the k nearest j ≠ i in (distance, index) order, so equal distances go
//        to the lower index (k clamped to N − 1 as the reference's topk(min(k + 1, N))[1:]).
//   linear: W = dmat.
@group(0) @binding(1) var<storage, read> lk_d: array<f32>;
@group(0) @binding(2) var<storage, read_write> lk_w: array<f32>;

// The column of the k-th (1-based) entry of row i in (distance, index) order, column `skip`
// left out; n when fewer than k entries compare (NaN distances).
fn kth_pair(i: u32, k: u32, skip: u32) -> u32 {
    let n = op.n;
    var pd = 0.0;
    var pj = n;
    for (var r = 0u; r < k; r++) {
        var bd = 0.0;
        var bj = n;
        for (var j = 0u; j < n; j++) {
            if j == skip {
                continue;
            }
            let dj = lk_d[i * n + j];
            let after = pj == n || dj > pd || (dj == pd && j > pj);
            if after && (bj == n || dj < bd || (dj == bd && j < bj)) {
                bd = dj;
                bj = j;
            }
        }
        if bj == n {
            return n;
        }
        pd = bd;
        pj = bj;
    }
    return pj;
}

@compute @workgroup_size(256)
fn lame_kernel(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        op = op_in;
    }
    workgroupBarrier();
    let t = lid.x;
    let n = op.n;
    if op.flag == 2u {
        for (var idx = t; idx < n * n; idx += WG) {
            lk_w[idx] = lk_d[idx];
        }
        return;
    }
    if op.flag == 1u {
        let k = min(op.k, n - 1u);
        for (var i = t; i < n; i += WG) {
            var jk = n;
            if k > 0u {
                jk = kth_pair(i, k, i);
            }
            let dk = select(0.0, lk_d[i * n + min(jk, n - 1u)], jk < n);
            for (var j = 0u; j < n; j++) {
                let dj = lk_d[i * n + j];
                let near = jk < n && j != i && (dj < dk || (dj == dk && j <= jk));
                lk_w[i * n + j] = select(0.0, 1.0, near);
            }
        }
        return;
    }
    let k = min(op.k, n);
    var part = 0.0;
    for (var i = t; i < n; i += WG) {
        let j = kth_pair(i, k, n);
        // j = n only for NaN distances, which make W NaN below anyway.
        part += select(0.0, lk_d[i * n + min(j, n - 1u)], j < n);
    }
    let sigma = wg_sum(t, part) / f32(n);
    for (var idx = t; idx < n * n; idx += WG) {
        let d = lk_d[idx];
        if sigma == 0.0 {
            lk_w[idx] = select(0.0, 1.0, d == 0.0);
        } else {
            lk_w[idx] = exp(-(d * d) / (2.0 * (sigma * sigma)));
        }
    }
}

// ---- lame_iterate: the bound optimisation of LAME in one workgroup (fiveai/LAME's
// laplacian_optimization): Y ← softmax(log(P + 1e-10) + λ·W·Y) from Y = softmax(log(P + 1e-10)),
// E = Σ unary·Y − λ·pair·Y + Y·log(max(Y, 1e-20)) with pair = λ·W·Y of the previous Y (λ enters E
// twice, as in the reference), stop after iteration i (0-based) when i > 1 and
// |E − E_old| ≤ 1e-8·|E_old|, at most `k` iterations.
@group(0) @binding(1) var<storage, read> li_p: array<f32>;
@group(0) @binding(2) var<storage, read> li_w: array<f32>;
// Y [N, C]: the output probabilities
@group(0) @binding(3) var<storage, read_write> li_y: array<f32>;
// [λ·W·Y [N, C] | log(P + 1e-10) [N, C] | iterations run, final E]: one buffer, as downlevel
// limits allow 4 storage buffers per kernel
@group(0) @binding(4) var<storage, read_write> li_work: array<f32>;

// Writes row i of Y = softmax(lp + pair·use_pair); returns the row's share of E.
fn lame_row(i: u32, use_pair: bool) -> f32 {
    let c = op.c;
    let lambda = op.x;
    // row i of lp, which follows pair in li_work
    let lp = op.n * c + i * c;
    var m = -3.4028235e38;
    for (var k = 0u; k < c; k++) {
        let e = li_work[lp + k] + select(0.0, li_work[i * c + k], use_pair);
        m = max(m, e);
    }
    var s = 0.0;
    for (var k = 0u; k < c; k++) {
        s += exp(li_work[lp + k] + select(0.0, li_work[i * c + k], use_pair) - m);
    }
    var energy = 0.0;
    for (var k = 0u; k < c; k++) {
        let pair = select(0.0, li_work[i * c + k], use_pair);
        let y = exp(li_work[lp + k] + pair - m) / s;
        li_y[i * c + k] = y;
        energy += -li_work[lp + k] * y - lambda * pair * y + y * log(max(y, 1e-20));
    }
    return energy;
}

@compute @workgroup_size(256)
fn lame_iterate(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        op = op_in;
    }
    workgroupBarrier();
    let t = lid.x;
    let n = op.n;
    let c = op.c;
    let lambda = op.x;
    for (var idx = t; idx < n * c; idx += WG) {
        li_work[n * c + idx] = log(li_p[idx] + 1e-10);
    }
    sync();
    for (var i = t; i < n; i += WG) {
        lame_row(i, false);
    }
    var old_e = 0.0;
    var e = 0.0;
    var iterations = 0u;
    for (var it = 0u; it < op.k; it++) {
        sync();
        for (var idx = t; idx < n * c; idx += WG) {
            let i = idx / c;
            let k = idx % c;
            var s = 0.0;
            for (var j = 0u; j < n; j++) {
                s += li_w[i * n + j] * li_y[j * c + k];
            }
            li_work[idx] = lambda * s;
        }
        sync();
        var part = 0.0;
        for (var i = t; i < n; i += WG) {
            part += lame_row(i, true);
        }
        e = wg_sum(t, part);
        iterations = it + 1u;
        if it > 1u && abs(e - old_e) <= 1e-8 * abs(old_e) {
            break;
        }
        old_e = e;
    }
    if t == 0u {
        li_work[2u * n * c] = f32(iterations);
        li_work[2u * n * c + 1u] = e;
    }
}

// ---- ls_prior_ema: the online estimate. snap[0..C) ← q (the estimate this batch is corrected
// with: rounds before it, as the online label-shift literature predicts); snap[C..2C) ← the next
// estimate: when the gate is open (the first step on a batch), m·q + (1 − m)·mean_i p_i, else q.
// The estimate is persistent state: the parameter guard (optim.wgsl) commits snap[C..2C) into q
// at the end of the program unless the step was refused, and the next estimate stays q when any
// of its values would be NaN or infinite, so this runs in one workgroup that decides for all
// classes at once.
@group(0) @binding(1) var<storage, read> le_p: array<f32>;
@group(0) @binding(2) var<storage, read> le_q: array<f32>;
@group(0) @binding(3) var<storage, read_write> le_snap: array<f32>;
@group(0) @binding(4) var<storage, read> le_gate: array<f32>;

var<workgroup> le_bad: array<u32, 64>;

fn le_candidate(k: u32) -> f32 {
    var s = 0.0;
    for (var i = 0u; i < op.n; i++) {
        s += le_p[i * op.c + k];
    }
    return op.x * le_q[k] + op.y * (s / f32(op.n));
}

@compute @workgroup_size(64)
fn ls_prior_ema(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        op = op_in;
    }
    workgroupBarrier();
    let t = lid.x;
    let c = op.c;
    var bad = 0u;
    if le_gate[0] != 0.0 {
        for (var k = t; k < c; k += 64u) {
            bad += select(0u, 1u, (bitcast<u32>(le_candidate(k)) & 0x7f800000u) == 0x7f800000u);
        }
    }
    le_bad[t] = bad;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
        if t < s {
            le_bad[t] = le_bad[t] + le_bad[t + s];
        }
        workgroupBarrier();
    }
    let update = le_gate[0] != 0.0 && le_bad[0] == 0u;
    for (var k = t; k < c; k += 64u) {
        let q = le_q[k];
        le_snap[k] = q;
        le_snap[c + k] = select(q, le_candidate(k), update);
    }
}

// ---- ls_correct: out_i ∝ p_i ⊙ (q / p_s); a row whose normaliser is not positive and finite
// (every class it supports has q = 0) keeps p_i. One thread per row.
@group(0) @binding(1) var<storage, read> lc_p: array<f32>;
@group(0) @binding(2) var<storage, read> lc_q: array<f32>;
@group(0) @binding(3) var<storage, read> lc_ps: array<f32>;
@group(0) @binding(4) var<storage, read_write> lc_out: array<f32>;

@compute @workgroup_size(64)
fn ls_correct(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        op = op_in;
    }
    workgroupBarrier();
    let i = gid.x;
    let c = op.c;
    if i >= op.n {
        return;
    }
    var s = 0.0;
    for (var k = 0u; k < c; k++) {
        s += lc_p[i * c + k] * (lc_q[k] / lc_ps[k]);
    }
    let ok = usable(s);
    for (var k = 0u; k < c; k++) {
        let p = lc_p[i * c + k];
        lc_out[i * c + k] = select(p, p * (lc_q[k] / lc_ps[k]) / s, ok);
    }
}

// ---- ls_em: maximum-likelihood label shift (Saerens et al. 2002; MLLS of
// acmi-lab/OnlineLabelShift) on one batch, in one workgroup. From q = mean_i p_i: E-step
// r_i ∝ p_i ⊙ (q / p_s), M-step q' = mean_i r_i, stop when Σ|q' − q| < tol (q ← q' first), at
// most `k` iterations. A row whose normaliser is not positive and finite contributes p_i.
@group(0) @binding(1) var<storage, read> lm_p: array<f32>;
@group(0) @binding(2) var<storage, read> lm_ps: array<f32>;
// [C]: the estimate
@group(0) @binding(3) var<storage, read_write> lm_q: array<f32>;
// [N + 2]: row normalisers, then [iterations run, last Σ|q' − q|] (one buffer: downlevel limits
// allow 4 storage buffers per kernel)
@group(0) @binding(4) var<storage, read_write> lm_z: array<f32>;

@compute @workgroup_size(256)
fn ls_em(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        op = op_in;
    }
    workgroupBarrier();
    let t = lid.x;
    let n = op.n;
    let c = op.c;
    for (var k = t; k < c; k += WG) {
        var s = 0.0;
        for (var i = 0u; i < n; i++) {
            s += lm_p[i * c + k];
        }
        lm_q[k] = s / f32(n);
    }
    var diff = 0.0;
    var iterations = 0u;
    for (var it = 0u; it < op.k; it++) {
        sync();
        for (var i = t; i < n; i += WG) {
            var s = 0.0;
            for (var k = 0u; k < c; k++) {
                s += lm_p[i * c + k] * (lm_q[k] / lm_ps[k]);
            }
            lm_z[i] = s;
        }
        sync();
        // Thread k alone reads and writes q[k] in this phase; the E-step above read every q
        // before the barrier.
        var part = 0.0;
        for (var k = t; k < c; k += WG) {
            let w = lm_q[k] / lm_ps[k];
            var s = 0.0;
            for (var i = 0u; i < n; i++) {
                let z = lm_z[i];
                let p = lm_p[i * c + k];
                s += select(p, p * w / z, usable(z));
            }
            let qn = s / f32(n);
            part += abs(qn - lm_q[k]);
            lm_q[k] = qn;
        }
        diff = wg_sum(t, part);
        iterations = it + 1u;
        if diff < op.x {
            break;
        }
    }
    if t == 0u {
        lm_z[n] = f32(iterations);
        lm_z[n + 1u] = diff;
    }
}

// ---- ls_bbse: black-box shift estimation (Lipton et al. 2018) on one batch, in one workgroup:
// μ̂_c = fraction of rows whose (first) argmax is c; ŵ = max(M·μ̂, 0) with M = (CᵀC + 1e-8 I)⁻¹Cᵀ
// from the source confusion matrix; q = ŵ ⊙ p_s / Σ(ŵ ⊙ p_s), or p_s when that sum is not
// positive (every weight clipped).
@group(0) @binding(1) var<storage, read> lb_p: array<f32>;
// [C]: the estimate
@group(0) @binding(2) var<storage, read_write> lb_q: array<f32>;
// [N + C + C·C + C]: each row's argmax, then μ̂, then M and p_s (copied in by layout.wgsl's
// gather3: downlevel limits allow 4 storage buffers per kernel)
@group(0) @binding(3) var<storage, read_write> lb_tmp: array<f32>;

fn lb_m(i: u32) -> f32 {
    return lb_tmp[op.n + op.c + i];
}

fn lb_ps(k: u32) -> f32 {
    return lb_tmp[op.n + op.c + op.c * op.c + k];
}

@compute @workgroup_size(256)
fn ls_bbse(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        op = op_in;
    }
    workgroupBarrier();
    let t = lid.x;
    let n = op.n;
    let c = op.c;
    for (var i = t; i < n; i += WG) {
        var best = 0u;
        var bv = lb_p[i * c];
        for (var k = 1u; k < c; k++) {
            let v = lb_p[i * c + k];
            if v > bv {
                bv = v;
                best = k;
            }
        }
        lb_tmp[i] = f32(best);
    }
    sync();
    for (var k = t; k < c; k += WG) {
        var count = 0.0;
        for (var i = 0u; i < n; i++) {
            count += select(0.0, 1.0, u32(lb_tmp[i]) == k);
        }
        lb_tmp[n + k] = count / f32(n);
    }
    sync();
    var part = 0.0;
    for (var k = t; k < c; k += WG) {
        var w = 0.0;
        for (var j = 0u; j < c; j++) {
            w += lb_m(k * c + j) * lb_tmp[n + j];
        }
        let wp = max(w, 0.0) * lb_ps(k);
        lb_q[k] = wp;
        part += wp;
    }
    let s = wg_sum(t, part);
    for (var k = t; k < c; k += WG) {
        lb_q[k] = select(lb_ps(k), lb_q[k] / s, usable(s));
    }
}

// ---- adapter_logits: the label-shift adapter's final layer,
// z'[i, c] = Σ_d (α·W[c, d] + ΔW[c, d])·(γ_d·h[i, d] + β_d) + β_C·b[c] + Δb[c], one thread per
// output. W is read as stored: k = 0 for [C, D] (Gemm transB = 1), 1 for [D, C] (Gemm transB = 0,
// MatMul); flag = 0 no bias, 1 a bias per class, 2 one scalar.
@group(0) @binding(1) var<storage, read> ad_h: array<f32>;
@group(0) @binding(2) var<storage, read> ad_w: array<f32>;
// [γ (D) | β (D) | ΔW (C·D) | Δb (C) | b (C, 1 or none, by flag)], copied in by layout.wgsl's
// gather3: downlevel limits allow 4 storage buffers per kernel
@group(0) @binding(3) var<storage, read> ad_pk: array<f32>;
@group(0) @binding(4) var<storage, read_write> ad_out: array<f32>;
// The parameter block is a uniform one read only through workgroup memory (ad_params), which
// lavapipe cannot inline (the rule in runtime/src/gpu/params.rs).
@group(0) @binding(0) var<uniform> ad_op: OutParams;
var<workgroup> ad_params: OutParams;

@compute @workgroup_size(64)
fn adapter_logits(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    if t == 0u {
        ad_params = ad_op;
    }
    let op = workgroupUniformLoad(&ad_params);
    let idx = gid.x + gid.y * nwg.x * 64u;
    let c = op.c;
    let d = op.d;
    if idx >= op.n * c {
        return;
    }
    let i = idx / c;
    let k = idx % c;
    let dw = 2u * d;
    let db = dw + c * d;
    var s = 0.0;
    for (var j = 0u; j < d; j++) {
        let w = select(ad_w[k * d + j], ad_w[j * c + k], op.k == 1u);
        let x = ad_pk[j] * ad_h[i * d + j] + ad_pk[d + j];
        s += (op.x * w + ad_pk[dw + k * d + j]) * x;
    }
    var bias = 0.0;
    if op.flag == 1u {
        bias = op.y * ad_pk[db + c + k];
    } else if op.flag == 2u {
        bias = op.y * ad_pk[db + c];
    }
    ad_out[idx] = s + (bias + ad_pk[db + k]);
}
