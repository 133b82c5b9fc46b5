// ROID (Marsden, Döbler, Yang, WACV 2024), as the authors' methods/roid.py with
// USE_CONSISTENCY=False (shared/docs/tta-universal.md §1, §6); host side in runtime/src/adapt/roid.rs.
//
// Per step, over logits z [B, C] with p = softmax(z) and the class-probability EMA ē [C]:
//   roid_weights   one workgroup: d = 1 - cos(ē, p) (F.cosine_similarity, eps 1e-8), c = -H(p),
//                  d̂ and ĉ min-max normalised, kept = d̂ >= mean d̂, w = exp(d̂ ĉ / T) (0 where
//                  dropped), ē' = m ē + (1 - m) mean_i p_i over the whole batch (written ahead,
//                  committed by the parameter guard). When max d = min d or max c = min c (always
//                  at B = 1) the normalisation is 0/0: the authors' parameters turn NaN for good;
//                  here every weight is 0 and the gate closes, so no gradient step is taken.
//   roid_slr_rows  one workgroup per row: SLR_i = -sum_k q log(q / (1 - q) + 1e-5),
//                  q = clamp(p, 0, 0.99); term_i = coeff_i SLR_i and
//                  dz_ij = scale coeff_i p_ij (g_j - sum_k p_ik g_k) with
//                  g_k = -log(r_k + 1e-5) - q_k / ((r_k + 1e-5)(1 - q_k)^2), r = q / (1 - q), and
//                  g_k = 0 where p_k > 0.99 (the clamp passes no gradient). A dropped sample
//                  (coeff 0) contributes exactly 0, as the reference's loss_out[~mask].
//   roid_prior     one workgroup: pi = mean_i p_i, s = max(1/B, 1/C) / max pi,
//                  pi~ = (pi + s) / (1 + s C), returned logits z * pi~ (logits, not
//                  probabilities, are multiplied: tta-universal.md §1.8.1).
//   roid_ensemble  after the optimizer's update: theta <- a theta + (1 - a) theta_src, unless the
//                  parameter guard's flag is up. A closed gate (no gradient step) still ensembles,
//                  as the reference's ensembling does not depend on the loss.
//
// This file is compiled after optim.wgsl (gpu::Shader::Roid) so that the ensembling's guard
// checks (roid_*_ensemble_check) compute the optimizer's own candidate values with its own
// functions and bindings, then the ensembled value: nothing is written unless every value the
// step would write, ensembled, is finite.

struct RoidParams {
    b: u32,
    c: u32,
    // roid_weights: 0 turns the weighting off (every sample kept with weight 1, ē frozen).
    // roid_slr_rows: add into dz and the terms instead of overwriting.
    flag: u32,
    // roid_weights: T. roid_slr_rows: the loss's 1 / B_cfg. roid_prior: max(1/B, 1/C).
    x: f32,
    // roid_weights: m_p and 1 - m_p (formed in double precision, as torch forms the scalar).
    momentum: f32,
    one_minus_momentum: f32,
}

struct RoidVecParams {
    n: u32,
}

@group(0) @binding(0) var<uniform> roid_p_in: RoidParams;
// Staged through workgroup memory at the top of every entry point that reads it (see
// runtime/src/gpu/params.rs): a uniform block, so it does not count against the 4 storage buffers
// per stage of downlevel (phone) limits, that lavapipe cannot inline.
var<workgroup> roid_p: RoidParams;
@group(0) @binding(0) var<uniform> roid_vp_in: RoidVecParams;
// Staged through workgroup memory at the top of every entry point that reads it (see
// runtime/src/gpu/params.rs): a uniform block, so it does not count against the 4 storage buffers
// per stage of downlevel (phone) limits, that lavapipe cannot inline.
var<workgroup> roid_vp: RoidVecParams;

var<workgroup> roid_red: array<f32, 256>;

fn roid_reduce(t: u32, v: f32, op: u32) -> f32 {
    roid_red[t] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if t < s {
            let a = roid_red[t];
            let b = roid_red[t + s];
            if op == 0u {
                roid_red[t] = a + b;
            } else if op == 1u {
                roid_red[t] = min(a, b);
            } else {
                roid_red[t] = max(a, b);
            }
        }
        workgroupBarrier();
    }
    let r = roid_red[0];
    workgroupBarrier();
    return r;
}

// ---- roid_weights ------------------------------------------------------------------------------
@group(0) @binding(1) var<storage, read> w_probs: array<f32>;
// per-sample loss coefficients: w_i for kept samples, 0 for dropped ones
@group(0) @binding(2) var<storage, read_write> w_coeff: array<f32>;
// [kept flag (B), w (B), ē' (C), d̂ (B), ĉ (B), H(p) (B), ē (C)]; the first 2B are read back for
// reporting. H(p) and ē are copied in by layout.wgsl's gather3 (downlevel limits allow 4 storage
// buffers per kernel); ē stays as it is: the step's commit writes ē' into it under the guard.
@group(0) @binding(3) var<storage, read_write> w_sel: array<f32>;
// the optimizer's state [step_count, gate, non_finite]: the gate closes when the weights are
// undefined
@group(0) @binding(4) var<storage, read_write> w_opt: array<f32>;

fn w_entropy(i: u32) -> f32 {
    return w_sel[4u * roid_p.b + roid_p.c + i];
}

fn w_ema(k: u32) -> f32 {
    return w_sel[5u * roid_p.b + roid_p.c + k];
}

@compute @workgroup_size(256)
fn roid_weights(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        roid_p = roid_p_in;
    }
    workgroupBarrier();
    let t = lid.x;
    let b = roid_p.b;
    let c = roid_p.c;
    let dbase = 2u * b + c;
    let cbase = 3u * b + c;
    // ē' over the full batch, whatever the weights.
    for (var k = t; k < c; k += 256u) {
        var s = 0.0;
        for (var i = 0u; i < b; i++) {
            s += w_probs[i * c + k];
        }
        let next = roid_p.momentum * w_ema(k) + roid_p.one_minus_momentum * (s / f32(b));
        w_sel[2u * b + k] = select(w_ema(k), next, roid_p.flag != 0u);
    }
    if roid_p.flag == 0u {
        for (var i = t; i < b; i += 256u) {
            w_sel[i] = 1.0;
            w_sel[b + i] = 1.0;
            w_coeff[i] = 1.0;
        }
        return;
    }
    // cosine_similarity divides each vector by its norm clamped at eps, then sums the products.
    var e2 = 0.0;
    for (var k = t; k < c; k += 256u) {
        e2 += w_ema(k) * w_ema(k);
    }
    let e_norm = max(sqrt(roid_reduce(t, e2, 0u)), 1e-8);
    // Each thread owns samples t, t + 256, ...: what it stores in w_sel it alone reads back.
    var dmin = 3.4028235e38;
    var dmax = -3.4028235e38;
    var cmin = 3.4028235e38;
    var cmax = -3.4028235e38;
    for (var i = t; i < b; i += 256u) {
        var p2 = 0.0;
        for (var k = 0u; k < c; k++) {
            let p = w_probs[i * c + k];
            p2 += p * p;
        }
        let p_norm = max(sqrt(p2), 1e-8);
        var dot = 0.0;
        for (var k = 0u; k < c; k++) {
            dot += (w_ema(k) / e_norm) * (w_probs[i * c + k] / p_norm);
        }
        let d = 1.0 - dot;
        let cert = -w_entropy(i);
        w_sel[dbase + i] = d;
        w_sel[cbase + i] = cert;
        dmin = min(dmin, d);
        dmax = max(dmax, d);
        cmin = min(cmin, cert);
        cmax = max(cmax, cert);
    }
    dmin = roid_reduce(t, dmin, 1u);
    dmax = roid_reduce(t, dmax, 2u);
    cmin = roid_reduce(t, cmin, 1u);
    cmax = roid_reduce(t, cmax, 2u);
    let drange = dmax - dmin;
    let crange = cmax - cmin;
    // Written so that a NaN range (NaN logits) counts as undefined too.
    let defined = drange > 0.0 && crange > 0.0;
    var dsum = 0.0;
    for (var i = t; i < b; i += 256u) {
        let dn = (w_sel[dbase + i] - dmin) / drange;
        w_sel[dbase + i] = dn;
        dsum += dn;
    }
    let dmean = roid_reduce(t, dsum, 0u) / f32(b);
    for (var i = t; i < b; i += 256u) {
        let dn = w_sel[dbase + i];
        let cn = (w_sel[cbase + i] - cmin) / crange;
        w_sel[cbase + i] = cn;
        let keep = defined && !(dn < dmean);
        let w = select(0.0, exp(dn * cn / roid_p.x), keep);
        w_sel[i] = select(0.0, 1.0, keep);
        w_sel[b + i] = w;
        w_coeff[i] = w;
    }
    if t == 0u && !defined {
        w_opt[1] = 0.0;
    }
}

// ---- roid_slr_rows -----------------------------------------------------------------------------
@group(0) @binding(1) var<storage, read> s_z: array<f32>;
@group(0) @binding(2) var<storage, read> s_coeff: array<f32>;
@group(0) @binding(3) var<storage, read_write> s_terms: array<f32>;
@group(0) @binding(4) var<storage, read_write> s_dz: array<f32>;

// (dL/dq_k masked by the clamp, q_k log(q_k / (1 - q_k) + 1e-5)) of one probability.
fn roid_slr_elem(p: f32) -> vec2<f32> {
    let q = clamp(p, 0.0, 0.99);
    let r = q / (1.0 - q) + 1e-5;
    let l = log(r);
    let g = -l - q / (r * ((1.0 - q) * (1.0 - q)));
    return vec2<f32>(select(0.0, g, p <= 0.99), q * l);
}

@compute @workgroup_size(256)
fn roid_slr_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    if lid == 0u {
        roid_p = roid_p_in;
    }
    workgroupBarrier();
    let row = wid.x + wid.y * nwg.x;
    if row >= roid_p.b {
        return;
    }
    let c = roid_p.c;
    let base = row * c;
    var mx = -3.4028235e38;
    for (var j = lid; j < c; j += 256u) {
        mx = max(mx, s_z[base + j]);
    }
    let m = roid_reduce(lid, mx, 2u);
    var se = 0.0;
    for (var j = lid; j < c; j += 256u) {
        se += exp(s_z[base + j] - m);
    }
    let sum = roid_reduce(lid, se, 0u);
    var dot = 0.0;
    var slr = 0.0;
    for (var j = lid; j < c; j += 256u) {
        let p = exp(s_z[base + j] - m) / sum;
        let e = roid_slr_elem(p);
        dot += p * e.x;
        slr += e.y;
    }
    let pg = roid_reduce(lid, dot, 0u);
    let total = -roid_reduce(lid, slr, 0u);
    let ci = s_coeff[row];
    let kept = ci != 0.0;
    let scale = roid_p.x * ci;
    for (var j = lid; j < c; j += 256u) {
        let p = exp(s_z[base + j] - m) / sum;
        let g = select(0.0, scale * (p * (roid_slr_elem(p).x - pg)), kept);
        if roid_p.flag != 0u {
            s_dz[base + j] = s_dz[base + j] + g;
        } else {
            s_dz[base + j] = g;
        }
    }
    if lid == 0u {
        let term = select(0.0, ci * total, kept);
        if roid_p.flag != 0u {
            s_terms[row] = s_terms[row] + term;
        } else {
            s_terms[row] = term;
        }
    }
}

// ---- roid_prior --------------------------------------------------------------------------------
@group(0) @binding(1) var<storage, read> r_z: array<f32>;
@group(0) @binding(2) var<storage, read> r_probs: array<f32>;
@group(0) @binding(3) var<storage, read_write> r_out: array<f32>;
// pi~ [C]
@group(0) @binding(4) var<storage, read_write> r_prior: array<f32>;

@compute @workgroup_size(256)
fn roid_prior(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        roid_p = roid_p_in;
    }
    workgroupBarrier();
    let t = lid.x;
    let b = roid_p.b;
    let c = roid_p.c;
    var mx = -3.4028235e38;
    for (var k = t; k < c; k += 256u) {
        var s = 0.0;
        for (var i = 0u; i < b; i++) {
            s += r_probs[i * c + k];
        }
        let pi = s / f32(b);
        r_prior[k] = pi;
        mx = max(mx, pi);
    }
    let shift = roid_p.x / roid_reduce(t, mx, 2u);
    let denom = 1.0 + shift * f32(c);
    for (var k = t; k < c; k += 256u) {
        r_prior[k] = (r_prior[k] + shift) / denom;
    }
    storageBarrier();
    workgroupBarrier();
    for (var e = t; e < b * c; e += 256u) {
        r_out[e] = r_z[e] * r_prior[e % c];
    }
}

// ---- weight ensembling -------------------------------------------------------------------------
// roid_ensemble: state, param, source, [a, 1 - a].
@group(0) @binding(1) var<storage, read> e_state: array<f32>;
@group(0) @binding(2) var<storage, read_write> e_param: array<f32>;
@group(0) @binding(3) var<storage, read> e_src: array<f32>;
@group(0) @binding(4) var<storage, read> e_coef: array<f32>;

@compute @workgroup_size(256)
fn roid_ensemble(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        roid_vp = roid_vp_in;
    }
    workgroupBarrier();
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= roid_vp.n || e_state[2] != 0.0 {
        return;
    }
    e_param[i] = e_coef[0] * e_param[i] + e_coef[1] * e_src[i];
}

// The checks bind what the optimizer's check binds (state, param, grad, its moments), with the
// gradient binding holding [grad (n), θ_src (n), a, 1 - a] (roid_pack writes it): downlevel
// limits allow 4 storage buffers per stage, and Adam's check already binds 4. The optimizer's
// candidate is the value its update will write, or the parameter itself when the gate is closed
// (no gradient step: the ensembling still runs).
@group(0) @binding(1) var<storage, read> pk_grad: array<f32>;
@group(0) @binding(2) var<storage, read> pk_src: array<f32>;
@group(0) @binding(3) var<storage, read> pk_coef: array<f32>;
@group(0) @binding(4) var<storage, read_write> pk_out: array<f32>;

// roid_pack: grad, source, [a, 1 - a], out = [grad (n), source (n), a, 1 - a].
@compute @workgroup_size(256)
fn roid_pack(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        roid_vp = roid_vp_in;
    }
    workgroupBarrier();
    let i = gid.x + gid.y * nwg.x * 256u;
    let n = roid_vp.n;
    if i < n {
        pk_out[i] = pk_grad[i];
        pk_out[n + i] = pk_src[i];
    }
    if i < 2u {
        pk_out[2u * n + i] = pk_coef[i];
    }
}

fn roid_ensemble_bad(p: f32, s: f32, a: f32, one_minus_a: f32) -> bool {
    return non_finite(a * p + one_minus_a * s);
}

@compute @workgroup_size(256)
fn roid_sgd_ensemble_check(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) pli: u32,
) {
    if pli == 0u {
        sp = sp_in;
    }
    workgroupBarrier();
    let i = flat(gid, nwg);
    if i >= sp.n {
        return;
    }
    var p = param[i];
    if gate_open() {
        p = sgd_candidate(i);
    }
    if roid_ensemble_bad(p, grad[sp.n + i], grad[2u * sp.n], grad[2u * sp.n + 1u]) {
        trip();
    }
}

@compute @workgroup_size(256)
fn roid_sgd_momentum_ensemble_check(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) pli: u32,
) {
    if pli == 0u {
        sp = sp_in;
    }
    workgroupBarrier();
    let i = flat(gid, nwg);
    if i >= sp.n {
        return;
    }
    var p = param[i];
    if gate_open() {
        p = sgd_momentum_candidate(i, atomicLoad(&gstate[0]) == 0u).x;
    }
    if roid_ensemble_bad(p, grad[sp.n + i], grad[2u * sp.n], grad[2u * sp.n + 1u]) {
        trip();
    }
}

@compute @workgroup_size(256)
fn roid_adam_ensemble_check(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) pli: u32,
) {
    if pli == 0u {
        ap = ap_in;
    }
    workgroupBarrier();
    let i = flat(gid, nwg);
    if i >= ap.n {
        return;
    }
    var p = param[i];
    if gate_open() {
        p = adam_candidate(i, bitcast<f32>(atomicLoad(&gstate[0])) + 1.0).x;
    }
    if roid_ensemble_bad(p, grad[ap.n + i], grad[2u * ap.n], grad[2u * ap.n + 1u]) {
        trip();
    }
}
