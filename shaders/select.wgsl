// Sample selection and Fisher bookkeeping for the entropy-based methods (ETA / EATA, §2 of
// tta-methods.md), entirely on the GPU so a step needs no readback to decide what to learn from.
//
// eata_select runs in ONE workgroup: the |S| count and every class's mean over the selected
// samples are fixed-order sums, so the selection, the weights and the moving average m are
// bit-identical run to run.

const WG: u32 = 256u;

struct SelectParams {
    b: u32,
    c: u32,
    // E0: keep samples whose entropy is below it.
    e0: f32,
    // epsilon: keep samples with |cos(m, p)| below it (once m exists).
    d_margin: f32,
}

struct VecParams {
    n: u32,
    scale: f32,
}

// Uniform, but read only through workgroup memory: lavapipe recompiled eata_select per ETA step
// (0.5 MB each) when its loop bounds came straight from a uniform block (see
// runtime/src/gpu/params.rs).
@group(0) @binding(0) var<uniform> sp_in: SelectParams;
// Staged through workgroup memory at the top of every entry point that reads it (see
// runtime/src/gpu/params.rs): a uniform block, so it does not count against the 4 storage buffers
// per stage of downlevel (phone) limits, that lavapipe cannot inline.
var<workgroup> sp: SelectParams;
@group(0) @binding(0) var<storage, read> vp: VecParams;

// eata_select: four storage buffers (downlevel limits); the inputs arrive packed by
// layout.wgsl's gather3 and the coefficients leave through scatter2.
@group(0) @binding(1) var<storage, read> probs: array<f32>;
// [entropy (B), m (C), m_valid, mask (B)]: m is read only (the step's commit writes the next m,
// see the end of eata_select); mask is a prior filter ANDed in (the WoC flags for eata+woc, ones
// otherwise)
@group(0) @binding(2) var<storage, read> sin: array<f32>;
// [selected flag (B), weight (B), next m (C), next m_valid, coefficient (B)], the first 2B read
// back for reporting; the coefficients w_i / |S| for selected samples (0 otherwise) are copied
// out to the loss's buffer
@group(0) @binding(3) var<storage, read_write> sel: array<f32>;
// the optimizer's [step_count, gate]: the gate closes when nothing is selected
@group(0) @binding(4) var<storage, read_write> opt_state: array<f32>;

fn mstate(k: u32) -> f32 {
    return sin[sp.b + k];
}

var<workgroup> red: array<f32, 256>;

fn wg_sum(t: u32, v: f32) -> f32 {
    red[t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if t < s {
            red[t] = red[t] + red[t + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn eata_select(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        sp = sp_in;
    }
    workgroupBarrier();
    let t = lid.x;
    let b = sp.b;
    let c = sp.c;
    let m_valid = mstate(c) != 0.0;
    var m_norm2 = 0.0;
    for (var k = 0u; k < c; k++) {
        m_norm2 += mstate(k) * mstate(k);
    }
    var count = 0.0;
    for (var i = t; i < b; i += WG) {
        let e = sin[i];
        var keep = sin[b + c + 1u + i] != 0.0 && e < sp.e0;
        if keep && m_valid {
            // torch.nn.functional.cosine_similarity with its eps of 1e-8.
            var dot = 0.0;
            var p_norm2 = 0.0;
            for (var k = 0u; k < c; k++) {
                let p = probs[i * c + k];
                dot += mstate(k) * p;
                p_norm2 += p * p;
            }
            let cosine = dot / max(sqrt(m_norm2) * sqrt(p_norm2), 1e-8);
            keep = abs(cosine) < sp.d_margin;
        }
        sel[i] = select(0.0, 1.0, keep);
        // exp(E0 - E) on the entropy value: no gradient flows through the weight.
        sel[b + i] = select(0.0, exp(sp.e0 - e), keep);
        count += select(0.0, 1.0, keep);
    }
    let n = wg_sum(t, count);
    storageBarrier();
    workgroupBarrier();
    for (var i = t; i < b; i += WG) {
        sel[2u * b + c + 1u + i] = select(0.0, sel[b + i] / n, sel[i] != 0.0);
    }
    // m <- 0.9 m + 0.1 mean of the selected probabilities (m <- the mean when unset); unchanged
    // when nothing was selected. The parameter guard (optim.wgsl) defers the write: the new
    // [m, m_valid] goes to sel[2B ..], and `guard_commit_copy` moves it into mstate at the end
    // of the step unless a check refused the step (a NaN gradient, or a non-finite m itself).
    var bad = 0.0;
    if n > 0.0 {
        for (var k = t; k < c; k += WG) {
            bad += select(0.0, 1.0, non_finite(m_candidate(k, b, c, n, m_valid)));
        }
    }
    let n_bad = wg_sum(t, bad);
    let moves = n > 0.0 && n_bad == 0.0;
    for (var k = t; k < c; k += WG) {
        sel[2u * b + k] = select(mstate(k), m_candidate(k, b, c, n, m_valid), moves);
    }
    if t == 0u {
        sel[2u * b + c] = select(mstate(c), 1.0, moves);
        opt_state[1] = select(0.0, 1.0, moves);
        if n_bad != 0.0 {
            opt_state[2] = 1.0;
        }
    }
}

fn non_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) == 0x7f800000u;
}

// Class k of EATA's moving average after this batch (the selection flags are in sel[0..b]).
fn m_candidate(k: u32, b: u32, c: u32, n: f32, m_valid: bool) -> f32 {
    var s = 0.0;
    for (var i = 0u; i < b; i++) {
        s += sel[i] * probs[i * c + k];
    }
    let mean = s / n;
    return select(mean, 0.9 * mstate(k) + 0.1 * mean, m_valid);
}

// argmax_rows: pseudo-labels (first maximum), as f32 class indices.
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> labels: array<f32>;

@compute @workgroup_size(64)
fn argmax_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        sp = sp_in;
    }
    workgroupBarrier();
    let i = gid.x;
    if i >= sp.b { return; }
    var best = 0u;
    var v = logits[i * sp.c];
    for (var k = 1u; k < sp.c; k++) {
        let x = logits[i * sp.c + k];
        if x > v {
            v = x;
            best = k;
        }
    }
    labels[i] = f32(best);
}

// fisher_accumulate: F += g * g (the square of the batch-mean gradient).
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> fisher: array<f32>;

@compute @workgroup_size(64)
fn fisher_accumulate(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if i >= vp.n { return; }
    fisher[i] = fisher[i] + grad[i] * grad[i];
}

// woc_select (wisdom of crowds, Lee et al. 2023, as in UniEnt's OSTTA): keep sample i iff the
// adapted model's probability of the ORIGINAL model's argmax class has not fallen below the
// original model's (ties kept). One workgroup; coefficients 1/|S| for the kept samples.
// Four storage buffers (downlevel limits): wsel is [flags (B), flags (B), coefficients (B)], the
// coefficients copied out to the loss's buffer by layout.wgsl's scatter2.
@group(0) @binding(1) var<storage, read> wprobs: array<f32>;
@group(0) @binding(2) var<storage, read> wprobs0: array<f32>;
@group(0) @binding(3) var<storage, read_write> wsel: array<f32>;
@group(0) @binding(4) var<storage, read_write> wopt_state: array<f32>;

@compute @workgroup_size(256)
fn woc_select(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        sp = sp_in;
    }
    workgroupBarrier();
    let t = lid.x;
    let b = sp.b;
    let c = sp.c;
    var count = 0.0;
    for (var i = t; i < b; i += WG) {
        var c0 = 0u;
        var v0 = wprobs0[i * c];
        for (var k = 1u; k < c; k++) {
            let x = wprobs0[i * c + k];
            if x > v0 {
                v0 = x;
                c0 = k;
            }
        }
        let keep = wprobs[i * c + c0] >= v0;
        wsel[i] = select(0.0, 1.0, keep);
        wsel[b + i] = select(0.0, 1.0, keep);
        count += select(0.0, 1.0, keep);
    }
    let n = wg_sum(t, count);
    for (var i = t; i < b; i += WG) {
        wsel[2u * b + i] = select(0.0, 1.0 / n, wsel[i] != 0.0);
    }
    if t == 0u {
        wopt_state[1] = select(0.0, 1.0, n > 0.0);
    }
}

// ---------------------------------------------------------------------------------------------
// SAR (Niu et al., ICLR 2023): the entropy filter, and the sharpness-aware perturbation.

// entropy_filter: keep i iff mask[i] != 0 and entropy[i] < E0; coefficients 1/|S| (0 when
// nothing is kept: the reverse pass then yields zero gradients, as the reference's mean over an
// empty selection does). sel = [flags (B), |S|].
@group(0) @binding(1) var<storage, read> fent: array<f32>;
@group(0) @binding(2) var<storage, read> fmask: array<f32>;
@group(0) @binding(3) var<storage, read_write> fcoeff: array<f32>;
@group(0) @binding(4) var<storage, read_write> fsel: array<f32>;

@compute @workgroup_size(256)
fn entropy_filter(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        sp = sp_in;
    }
    workgroupBarrier();
    let t = lid.x;
    var count = 0.0;
    for (var i = t; i < sp.b; i += WG) {
        let keep = fmask[i] != 0.0 && fent[i] < sp.e0;
        fsel[i] = select(0.0, 1.0, keep);
        count += select(0.0, 1.0, keep);
    }
    let n = wg_sum(t, count);
    for (var i = t; i < sp.b; i += WG) {
        fcoeff[i] = select(0.0, 1.0 / n, fsel[i] != 0.0);
    }
    if t == 0u {
        fsel[sp.b] = n;
    }
}

// sumsq: norms[slot] = sum of squares of g over n values (one workgroup, fixed-order tree).
struct SlotParams {
    n: u32,
    slot: u32,
    slots: u32,
    rho: f32,
}
@group(0) @binding(0) var<uniform> qp_in: SlotParams;
// Staged through workgroup memory at the top of every entry point that reads it (see
// runtime/src/gpu/params.rs): a uniform block, so it does not count against the 4 storage buffers
// per stage of downlevel (phone) limits, that lavapipe cannot inline.
var<workgroup> qp: SlotParams;
@group(0) @binding(1) var<storage, read> qg: array<f32>;
@group(0) @binding(2) var<storage, read_write> qnorms: array<f32>;

@compute @workgroup_size(256)
fn sumsq(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        qp = qp_in;
    }
    workgroupBarrier();
    let t = lid.x;
    var s = 0.0;
    for (var i = t; i < qp.n; i += WG) {
        s += qg[i] * qg[i];
    }
    let total = wg_sum(t, s);
    if t == 0u {
        qnorms[qp.slot] = total;
    }
}

// sam_perturb: old = theta; theta += rho * g / (||g||_2 + 1e-12), the norm over every adapted
// tensor (the sum of the slots, in slot order).
@group(0) @binding(1) var<storage, read_write> ptheta: array<f32>;
@group(0) @binding(2) var<storage, read> pg: array<f32>;
@group(0) @binding(3) var<storage, read_write> pold: array<f32>;
@group(0) @binding(4) var<storage, read> pnorms: array<f32>;

@compute @workgroup_size(64)
fn sam_perturb(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        qp = qp_in;
    }
    workgroupBarrier();
    let i = gid.x;
    if i >= qp.n { return; }
    var s = 0.0;
    for (var k = 0u; k < qp.slots; k++) {
        s += pnorms[k];
    }
    let scale = qp.rho / (sqrt(s) + 1e-12);
    pold[i] = ptheta[i];
    ptheta[i] = ptheta[i] + pg[i] * scale;
}

// sam_restore: theta = old.
@group(0) @binding(1) var<storage, read_write> rtheta: array<f32>;
@group(0) @binding(2) var<storage, read> rold: array<f32>;

@compute @workgroup_size(64)
fn sam_restore(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        qp = qp_in;
    }
    workgroupBarrier();
    let i = gid.x;
    if i >= qp.n { return; }
    rtheta[i] = rold[i];
}
