// Optimizers: torch.optim.SGD and torch.optim.Adam, one dispatch per parameter tensor.
//
// The optimizer state buffer is three f32: [step_count, gate, non_finite]. step_count is the
// number of steps taken (exact as an f32 integer up to 2^24); a kernel sees t = step_count + 1, the step it is
// taking, as torch does after `state['step'] += 1`. gate == 0 makes every update kernel (and the
// commit) a no-op: EATA takes no step at all, not even a momentum one, when it selects nothing.
// `commit` runs after every parameter's update and advances step_count when the gate is open.
//
// Arithmetic follows torch's single-tensor code operation by operation (same operand order, the
// same lerp branch), so the results agree to rounding.

const WG: u32 = 256u;

// Bindings 1.. are, per entry point: state, param, grad, then the moment buffers.
@group(0) @binding(1) var<storage, read_write> state: array<f32>;
@group(0) @binding(2) var<storage, read_write> param: array<f32>;
@group(0) @binding(3) var<storage, read> grad: array<f32>;
// SGD's momentum buffer, or Adam's moments [m (n), v (n)] in one buffer: downlevel (phone) limits
// allow 4 storage buffers per kernel.
@group(0) @binding(4) var<storage, read_write> m1: array<f32>;

// `fill` binds the buffer it writes as binding 1.
@group(0) @binding(1) var<storage, read_write> fill_buf: array<f32>;

struct SgdParams {
    n: u32,
    nesterov: u32,
    lr: f32,
    momentum: f32,
    // 1 - dampening, formed in double precision as torch does.
    one_minus_dampening: f32,
    weight_decay: f32,
}

struct AdamParams {
    n: u32,
    // torch.lerp's branch: 0 when |1 - beta1| < 0.5 (self + w*(end-self)), else 1.
    lerp_high: u32,
    lr: f32,
    beta2: f32,
    // 1 - beta1 and 1 - beta2, formed in double precision.
    w1: f32,
    w2: f32,
    // ln(beta1), ln(beta2) from double precision: 1 - beta^t = -expm1(t ln beta) is accurate to
    // a few ulp even at t = 1, where 1 - f32(beta)^t would lose four digits for beta2 = 0.999.
    ln_beta1: f32,
    ln_beta2: f32,
    eps: f32,
    weight_decay: f32,
}

struct StateParams {
    step_count: f32,
    gate: f32,
}

struct CommitParams {
    increment: f32,
}

struct FillParams {
    n: u32,
    value: f32,
}

@group(0) @binding(0) var<uniform> sp_in: SgdParams;
// Staged through workgroup memory at the top of every entry point that reads it (see
// runtime/src/gpu/params.rs): a uniform block, so it does not count against the 4 storage buffers
// per stage of downlevel (phone) limits, that lavapipe cannot inline.
var<workgroup> sp: SgdParams;
@group(0) @binding(0) var<uniform> ap_in: AdamParams;
// Staged through workgroup memory at the top of every entry point that reads it (see
// runtime/src/gpu/params.rs): a uniform block, so it does not count against the 4 storage buffers
// per stage of downlevel (phone) limits, that lavapipe cannot inline.
var<workgroup> ap: AdamParams;
@group(0) @binding(0) var<storage, read> stp: StateParams;
@group(0) @binding(0) var<storage, read> cp: CommitParams;
@group(0) @binding(0) var<storage, read> fp: FillParams;

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

// e^x - 1 for x <= 0 without the cancellation of exp(x) - 1 near 0.
fn expm1_neg(x: f32) -> f32 {
    if (x > -0.5) {
        // Taylor series to x^10/10! (truncation below 2e-11 on [-0.5, 0]), Horner form.
        var r = 1.0 + x / 10.0;
        r = 1.0 + x / 9.0 * r;
        r = 1.0 + x / 8.0 * r;
        r = 1.0 + x / 7.0 * r;
        r = 1.0 + x / 6.0 * r;
        r = 1.0 + x / 5.0 * r;
        r = 1.0 + x / 4.0 * r;
        r = 1.0 + x / 3.0 * r;
        r = 1.0 + x / 2.0 * r;
        return x * r;
    }
    return exp(x) - 1.0;
}

// The candidate values of one element, shared by the update kernels and the guard's checks so
// that what is checked is exactly what would be written.

// SGD without momentum: p <- p - lr * (g + wd * p).
fn sgd_candidate(i: u32) -> f32 {
    let p = param[i];
    var g = grad[i];
    if (sp.weight_decay != 0.0) {
        g = g + sp.weight_decay * p;
    }
    return p - sp.lr * g;
}

// SGD with momentum: the buffer is a clone of g on the first step (no dampening), then
// buf <- mu * buf + (1 - dampening) * g; the step direction is buf, or g + mu * buf (Nesterov).
// Returns (new param, new buffer); `first` is step_count == 0.
fn sgd_momentum_candidate(i: u32, first: bool) -> vec2<f32> {
    let p = param[i];
    var g = grad[i];
    if (sp.weight_decay != 0.0) {
        g = g + sp.weight_decay * p;
    }
    var b: f32;
    if (first) {
        b = g;
    } else {
        b = m1[i] * sp.momentum + sp.one_minus_dampening * g;
    }
    if (sp.nesterov != 0u) {
        g = g + sp.momentum * b;
    } else {
        g = b;
    }
    return vec2<f32>(p - sp.lr * g, b);
}

// Adam (torch.optim.Adam, amsgrad off): m.lerp_(g, 1-b1); v = v*b2 + (1-b2)*g*g;
// denom = sqrt(v)/sqrt(1-b2^t) + eps; p -= (lr/(1-b1^t)) * m / denom.
// Returns (new param, new m, new v) for step t.
fn adam_candidate(i: u32, t: f32) -> vec3<f32> {
    let p = param[i];
    var g = grad[i];
    if (ap.weight_decay != 0.0) {
        g = g + ap.weight_decay * p;
    }
    let m0 = m1[i];
    var m: f32;
    if (ap.lerp_high == 0u) {
        m = m0 + ap.w1 * (g - m0);
    } else {
        m = g - (g - m0) * (1.0 - ap.w1);
    }
    let v = m1[ap.n + i] * ap.beta2 + (ap.w2 * g) * g;
    let bias_correction1 = -expm1_neg(t * ap.ln_beta1);
    let bias_correction2 = -expm1_neg(t * ap.ln_beta2);
    let step_size = ap.lr / bias_correction1;
    let denom = sqrt(v) / sqrt(bias_correction2) + ap.eps;
    return vec3<f32>(p - (step_size * m) / denom, m, v);
}

@compute @workgroup_size(256)
fn sgd_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        sp = sp_in;
    }
    workgroupBarrier();
    let i = flat(gid, nwg);
    if (i >= sp.n || state[1] == 0.0) {
        return;
    }
    param[i] = sgd_candidate(i);
}

@compute @workgroup_size(256)
fn sgd_momentum_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        sp = sp_in;
    }
    workgroupBarrier();
    let i = flat(gid, nwg);
    if (i >= sp.n || state[1] == 0.0) {
        return;
    }
    let r = sgd_momentum_candidate(i, state[0] == 0.0);
    m1[i] = r.y;
    param[i] = r.x;
}

@compute @workgroup_size(256)
fn adam_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        ap = ap_in;
    }
    workgroupBarrier();
    let i = flat(gid, nwg);
    if (i >= ap.n || state[1] == 0.0) {
        return;
    }
    let r = adam_candidate(i, state[0] + 1.0);
    m1[i] = r.y;
    m1[ap.n + i] = r.z;
    param[i] = r.x;
}

// ---------------------------------------------------------------------------------------------
// The parameter guard: a step commits only if everything it would write is finite.
//
// Every program that changes persistent state starts with `guard_begin` (gate open, flag clear).
// Before any update is written, the `*_check` kernels compute each update's candidate values
// (the same functions the updates use) and `guard_check` scans the statistics a step would
// commit; a NaN or an infinity anywhere closes the gate (state[1] = 0) and raises the flag
// (state[2] = 1). The updates, the step counter and `guard_commit_stats` then see the gate or the
// flag and write nothing: the step is skipped whole, on the GPU, without a readback. The host
// learns of it from state[2], read back with the logits.
//
// The checks view the state buffer as u32 words and write it with atomic stores (many threads
// may find a non-finite value at once); the words stored are the bit patterns of 0.0 and 1.0.
// NaN and infinity are recognised by their exponent bits: `x != x` may be folded away by a
// shader compiler that assumes finite arithmetic.

@group(0) @binding(1) var<storage, read_write> gstate: array<atomic<u32>>;

const ONE_BITS: u32 = 0x3f800000u;

fn non_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) == 0x7f800000u;
}

fn trip() {
    atomicStore(&gstate[1], 0u);
    atomicStore(&gstate[2], ONE_BITS);
}

// The gate as the update kernels will see it (closed by a selection kernel or a check).
fn gate_open() -> bool {
    return atomicLoad(&gstate[1]) != 0u;
}

// Opens the gate (stp.gate is 1) and clears the flag; the step count stays.
@compute @workgroup_size(1)
fn guard_begin() {
    atomicStore(&gstate[1], bitcast<u32>(stp.gate));
    atomicStore(&gstate[2], 0u);
}

@compute @workgroup_size(256)
fn sgd_check(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        sp = sp_in;
    }
    workgroupBarrier();
    let i = flat(gid, nwg);
    if (i >= sp.n || !gate_open()) {
        return;
    }
    if (non_finite(sgd_candidate(i))) {
        trip();
    }
}

@compute @workgroup_size(256)
fn sgd_momentum_check(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        sp = sp_in;
    }
    workgroupBarrier();
    let i = flat(gid, nwg);
    if (i >= sp.n || !gate_open()) {
        return;
    }
    let r = sgd_momentum_candidate(i, atomicLoad(&gstate[0]) == 0u);
    if (non_finite(r.x) || non_finite(r.y)) {
        trip();
    }
}

@compute @workgroup_size(256)
fn adam_check(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        ap = ap_in;
    }
    workgroupBarrier();
    let i = flat(gid, nwg);
    if (i >= ap.n || !gate_open()) {
        return;
    }
    let r = adam_candidate(i, bitcast<f32>(atomicLoad(&gstate[0])) + 1.0);
    if (non_finite(r.x) || non_finite(r.y) || non_finite(r.z)) {
        trip();
    }
}

// guard_check: count values [offset, offset + n) of `checked` (statistics about to be committed).
struct CheckParams {
    n: u32,
    offset: u32,
}

@group(0) @binding(0) var<uniform> gp_in: CheckParams;
// Staged through workgroup memory at the top of every entry point that reads it (see
// runtime/src/gpu/params.rs): a uniform block, so it does not count against the 4 storage buffers
// per stage of downlevel (phone) limits, that lavapipe cannot inline.
var<workgroup> gp: CheckParams;
@group(0) @binding(2) var<storage, read> checked: array<f32>;

@compute @workgroup_size(256)
fn guard_check(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        gp = gp_in;
    }
    workgroupBarrier();
    let i = flat(gid, nwg);
    if (i >= gp.n) {
        return;
    }
    if (non_finite(checked[gp.offset + i])) {
        trip();
    }
}

// guard_commit_stats: RBN's running statistics, deferred from bn_stats to the end of the
// program: running <- the used statistics [mean_u (C), var_u (C)] at `offset` of the layer's
// stats, unless a check raised the flag. (The gate is not consulted: a step that selected
// nothing still moves the statistics, as the reference's forward pass does.)
@group(0) @binding(1) var<storage, read> cstate: array<f32>;
// guard_commit_copy: dst[0 .. n) <- src[offset ..], unless a check raised the flag.
@group(0) @binding(3) var<storage, read_write> cdst: array<f32>;

@compute @workgroup_size(256)
fn guard_commit_copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        gp = gp_in;
    }
    workgroupBarrier();
    let i = flat(gid, nwg);
    if (i >= gp.n || cstate[2] != 0.0) {
        return;
    }
    cdst[i] = cstats[gp.offset + i];
}

@group(0) @binding(2) var<storage, read> cstats: array<f32>;
@group(0) @binding(3) var<storage, read_write> crun_mean: array<f32>;
@group(0) @binding(4) var<storage, read_write> crun_var: array<f32>;

@compute @workgroup_size(256)
fn guard_commit_stats(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        gp = gp_in;
    }
    workgroupBarrier();
    let c = flat(gid, nwg);
    if (c >= gp.n || cstate[2] != 0.0) {
        return;
    }
    crun_mean[c] = cstats[gp.offset + c];
    crun_var[c] = cstats[gp.offset + gp.n + c];
}

// After all updates of a step: count the step if the gate was open.
@compute @workgroup_size(1)
fn commit() {
    if (state[1] != 0.0) {
        state[0] = state[0] + cp.increment;
    }
}

// Sets the whole state (reset: [0, 1]).
@compute @workgroup_size(1)
fn set_state() {
    state[0] = stp.step_count;
    state[1] = stp.gate;
    state[2] = 0.0;
}

@compute @workgroup_size(256)
fn fill(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i < fp.n) {
        fill_buf[i] = fp.value;
    }
}
