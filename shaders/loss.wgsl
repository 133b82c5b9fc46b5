// Losses over logits z [B, C] (row-major): the scalar loss and dL/dz.
//
// Deterministic: every sum runs in a fixed order (a strided per-thread sum, then a fixed tree
// across the 256 threads of one workgroup); no atomics. Row kernels run one workgroup per sample;
// per-sample (or per-element) loss terms go to a buffer that `sum_terms` adds up in one
// workgroup. With `accumulate` set, kernels add into dz and the loss instead of overwriting, so
// terms compose.
//
// softmax and log_softmax are formed as PyTorch forms them: p = exp(z - max) / sum and
// log p = (z - max) - log(sum); the entropy is -sum p * log p over those, with no epsilon.

const WG: u32 = 256u;

struct RowParams {
    b: u32,
    c: u32,
    accumulate: u32,
    // Multiplies the gradient (diversity: lambda / B).
    scale: f32,
    // A quiet NaN, written where a label is not a class index (WGSL has no NaN literal).
    nan: f32,
}

struct SumParams {
    n: u32,
    accumulate: u32,
    scale: f32,
}

struct EwcParams {
    n: u32,
    two_lambda: f32,
}

struct FillParams {
    n: u32,
    value: f32,
}

@group(0) @binding(0) var<uniform> rp_in: RowParams;
// Staged through workgroup memory at the top of every entry point that reads it (see
// runtime/src/gpu/params.rs): a uniform block, so it does not count against the 4 storage buffers
// per stage of downlevel (phone) limits, that lavapipe cannot inline.
var<workgroup> rp: RowParams;
@group(0) @binding(0) var<storage, read> sp: SumParams;
@group(0) @binding(0) var<uniform> ep_in: EwcParams;
// Staged through workgroup memory at the top of every entry point that reads it (see
// runtime/src/gpu/params.rs): a uniform block, so it does not count against the 4 storage buffers
// per stage of downlevel (phone) limits, that lavapipe cannot inline.
var<workgroup> ep: EwcParams;
@group(0) @binding(0) var<storage, read> fp: FillParams;

// Row kernels: z is binding 1.
@group(0) @binding(1) var<storage, read> z: array<f32>;
// softmax_stats: probabilities and entropies.
@group(0) @binding(2) var<storage, read_write> probs_out: array<f32>;
@group(0) @binding(3) var<storage, read_write> entropy_out: array<f32>;
// entropy_rows: per-sample coefficients, per-sample terms, dz.
@group(0) @binding(2) var<storage, read> coeff2: array<f32>;
@group(0) @binding(3) var<storage, read_write> terms3: array<f32>;
@group(0) @binding(4) var<storage, read_write> dz4: array<f32>;
// cross_entropy_rows: labels, coefficients, terms, dz.
// [labels (B), coefficients (B)], packed by layout.wgsl's gather3: downlevel limits allow 4
// storage buffers per kernel.
@group(0) @binding(2) var<storage, read> labels_coeff2: array<f32>;
@group(0) @binding(3) var<storage, read_write> terms3x: array<f32>;
@group(0) @binding(4) var<storage, read_write> dz4x: array<f32>;
// diversity_mean: probabilities in, log of the batch mean and the per-class terms out.
@group(0) @binding(1) var<storage, read> probs_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> logmean2: array<f32>;
@group(0) @binding(3) var<storage, read_write> terms3b: array<f32>;
// diversity_grad: probabilities, log-mean, dz.
@group(0) @binding(2) var<storage, read> logmean_in: array<f32>;
@group(0) @binding(3) var<storage, read_write> dz3: array<f32>;
// sum_terms: terms in, the 1-element loss out.
@group(0) @binding(1) var<storage, read> terms_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> loss: array<f32>;
// ewc: theta, [theta* (n), Fisher (n)] packed by layout.wgsl's gather3 (downlevel limits allow 4
// storage buffers per kernel), the parameter gradient, per-element terms.
@group(0) @binding(1) var<storage, read> theta: array<f32>;
@group(0) @binding(2) var<storage, read> star_fisher: array<f32>;
@group(0) @binding(3) var<storage, read_write> pgrad: array<f32>;
@group(0) @binding(4) var<storage, read_write> terms4e: array<f32>;
// fill
@group(0) @binding(1) var<storage, read_write> fill_buf: array<f32>;

var<workgroup> red: array<f32, 256>;

fn wg_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            red[lid] = red[lid] + red[lid + s];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn wg_max(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

// (max, sum of exp(z - max)) of the row starting at `base`.
fn row_max_sum(base: u32, lid: u32) -> vec2<f32> {
    var mx = -3.4028235e38;
    for (var j = lid; j < rp.c; j = j + WG) {
        mx = max(mx, z[base + j]);
    }
    let m = wg_max(lid, mx);
    var s = 0.0;
    for (var j = lid; j < rp.c; j = j + WG) {
        s = s + exp(z[base + j] - m);
    }
    return vec2<f32>(m, wg_sum(lid, s));
}

// H = -sum_j p_j log p_j of the row, given its (max, sum).
fn row_entropy(base: u32, lid: u32, ms: vec2<f32>) -> f32 {
    let log_s = log(ms.y);
    var h = 0.0;
    for (var j = lid; j < rp.c; j = j + WG) {
        let d = z[base + j] - ms.x;
        h = h + (exp(d) / ms.y) * (d - log_s);
    }
    return -wg_sum(lid, h);
}

fn row_of(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// probs [B, C] and entropies [B].
@compute @workgroup_size(256)
fn softmax_stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    if lid == 0u {
        rp = rp_in;
    }
    workgroupBarrier();
    let row = row_of(wid, nwg);
    if (row >= rp.b) {
        return;
    }
    let base = row * rp.c;
    let ms = row_max_sum(base, lid);
    let h = row_entropy(base, lid, ms);
    for (var j = lid; j < rp.c; j = j + WG) {
        probs_out[base + j] = exp(z[base + j] - ms.x) / ms.y;
    }
    if (lid == 0u) {
        entropy_out[row] = h;
    }
}

// Softmax only (the diversity term's first pass): probs [B, C].
@compute @workgroup_size(256)
fn softmax_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    if lid == 0u {
        rp = rp_in;
    }
    workgroupBarrier();
    let row = row_of(wid, nwg);
    if (row >= rp.b) {
        return;
    }
    let base = row * rp.c;
    let ms = row_max_sum(base, lid);
    for (var j = lid; j < rp.c; j = j + WG) {
        probs_out[base + j] = exp(z[base + j] - ms.x) / ms.y;
    }
}

// term_i = c_i H_i; dz_ij = c_i * (-p_ij * (log p_ij + H_i)).
@compute @workgroup_size(256)
fn entropy_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    if lid == 0u {
        rp = rp_in;
    }
    workgroupBarrier();
    let row = row_of(wid, nwg);
    if (row >= rp.b) {
        return;
    }
    let base = row * rp.c;
    let ms = row_max_sum(base, lid);
    let h = row_entropy(base, lid, ms);
    let ci = coeff2[row];
    let log_s = log(ms.y);
    for (var j = lid; j < rp.c; j = j + WG) {
        let d = z[base + j] - ms.x;
        let p = exp(d) / ms.y;
        let g = ci * (-p * ((d - log_s) + h));
        if (rp.accumulate != 0u) {
            dz4[base + j] = dz4[base + j] + g;
        } else {
            dz4[base + j] = g;
        }
    }
    if (lid == 0u) {
        terms3[row] = ci * h;
    }
}

// term_i = -c_i log p_i[y_i]; dz_ij = c_i * (p_ij - [j == y_i]). A label that is not an integer
// in [0, C) makes the row's term and gradient NaN, so it cannot pass unnoticed.
@compute @workgroup_size(256)
fn cross_entropy_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    if lid == 0u {
        rp = rp_in;
    }
    workgroupBarrier();
    let row = row_of(wid, nwg);
    if (row >= rp.b) {
        return;
    }
    let base = row * rp.c;
    let ms = row_max_sum(base, lid);
    let log_s = log(ms.y);
    let y = labels_coeff2[row];
    let valid = y >= 0.0 && y < f32(rp.c) && floor(y) == y;
    let yi = select(0u, u32(y), valid);
    let ci = labels_coeff2[rp.b + row];
    for (var j = lid; j < rp.c; j = j + WG) {
        let p = exp(z[base + j] - ms.x) / ms.y;
        var g = ci * (p - select(0.0, 1.0, j == yi));
        if (!valid) {
            g = rp.nan;
        }
        if (rp.accumulate != 0u) {
            dz4x[base + j] = dz4x[base + j] + g;
        } else {
            dz4x[base + j] = g;
        }
    }
    if (lid == 0u) {
        if (valid) {
            terms3x[row] = ci * -((z[base + yi] - ms.x) - log_s);
        } else {
            terms3x[row] = rp.nan;
        }
    }
}

// Per class j (one thread each): pbar_j = mean_i p_ij, logmean_j = log pbar_j and
// term_j = pbar_j log pbar_j, both 0 where pbar_j = 0 (the limit; every p_ij is then 0 too).
@compute @workgroup_size(256)
fn diversity_mean(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        rp = rp_in;
    }
    workgroupBarrier();
    let j = gid.x + gid.y * nwg.x * WG;
    if (j >= rp.c) {
        return;
    }
    var s = 0.0;
    for (var i = 0u; i < rp.b; i = i + 1u) {
        s = s + probs_in[i * rp.c + j];
    }
    let pbar = s / f32(rp.b);
    let lp = log(pbar);
    logmean2[j] = select(lp, 0.0, pbar == 0.0);
    terms3b[j] = select(pbar * lp, 0.0, pbar == 0.0);
}

// dL/dz_ik = (lambda / B) p_ik (log pbar_k - sum_j p_ij log pbar_j), for L = -lambda H(pbar).
@compute @workgroup_size(256)
fn diversity_grad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    if lid == 0u {
        rp = rp_in;
    }
    workgroupBarrier();
    let row = row_of(wid, nwg);
    if (row >= rp.b) {
        return;
    }
    let base = row * rp.c;
    var s = 0.0;
    for (var j = lid; j < rp.c; j = j + WG) {
        s = s + probs_in[base + j] * logmean_in[j];
    }
    let dot = wg_sum(lid, s);
    for (var j = lid; j < rp.c; j = j + WG) {
        let g = rp.scale * (probs_in[base + j] * (logmean_in[j] - dot));
        if (rp.accumulate != 0u) {
            dz3[base + j] = dz3[base + j] + g;
        } else {
            dz3[base + j] = g;
        }
    }
}

// loss = scale * sum_i terms_i (added to the loss with accumulate). One workgroup.
@compute @workgroup_size(256)
fn sum_terms(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var i = lid; i < sp.n; i = i + WG) {
        s = s + terms_in[i];
    }
    let total = sp.scale * wg_sum(lid, s);
    if (lid == 0u) {
        if (sp.accumulate != 0u) {
            loss[0] = loss[0] + total;
        } else {
            loss[0] = total;
        }
    }
}

// EWC: grad += 2 lambda F (theta - theta*); term = F (theta - theta*)^2.
@compute @workgroup_size(256)
fn ewc(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        ep = ep_in;
    }
    workgroupBarrier();
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= ep.n) {
        return;
    }
    let d = theta[i] - star_fisher[i];
    let f = star_fisher[ep.n + i];
    pgrad[i] = pgrad[i] + ep.two_lambda * (f * d);
    terms4e[i] = f * (d * d);
}

@compute @workgroup_size(256)
fn fill(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i < fp.n) {
        fill_buf[i] = fp.value;
    }
}
