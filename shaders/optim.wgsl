// Optimizers: torch.optim.SGD and torch.optim.Adam, one dispatch per parameter tensor.
//
// The optimizer state buffer is two f32: [step_count, gate]. step_count is the number of steps
// taken (exact as an f32 integer up to 2^24); a kernel sees t = step_count + 1, the step it is
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
@group(0) @binding(4) var<storage, read_write> m1: array<f32>;
@group(0) @binding(5) var<storage, read_write> m2: array<f32>;

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

@group(0) @binding(0) var<uniform> sp: SgdParams;
@group(0) @binding(0) var<uniform> ap: AdamParams;
@group(0) @binding(0) var<uniform> stp: StateParams;
@group(0) @binding(0) var<uniform> cp: CommitParams;
@group(0) @binding(0) var<uniform> fp: FillParams;

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

// SGD without momentum: p <- p - lr * (g + wd * p).
@compute @workgroup_size(256)
fn sgd_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= sp.n || state[1] == 0.0) {
        return;
    }
    let p = param[i];
    var g = grad[i];
    if (sp.weight_decay != 0.0) {
        g = g + sp.weight_decay * p;
    }
    param[i] = p - sp.lr * g;
}

// SGD with momentum: the buffer is a clone of g on the first step (no dampening), then
// buf <- mu * buf + (1 - dampening) * g; the step direction is buf, or g + mu * buf (Nesterov).
@compute @workgroup_size(256)
fn sgd_momentum_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= sp.n || state[1] == 0.0) {
        return;
    }
    let p = param[i];
    var g = grad[i];
    if (sp.weight_decay != 0.0) {
        g = g + sp.weight_decay * p;
    }
    var b: f32;
    if (state[0] == 0.0) {
        b = g;
    } else {
        b = m1[i] * sp.momentum + sp.one_minus_dampening * g;
    }
    m1[i] = b;
    if (sp.nesterov != 0u) {
        g = g + sp.momentum * b;
    } else {
        g = b;
    }
    param[i] = p - sp.lr * g;
}

// Adam (torch.optim.Adam, amsgrad off): m.lerp_(g, 1-b1); v = v*b2 + (1-b2)*g*g;
// denom = sqrt(v)/sqrt(1-b2^t) + eps; p -= (lr/(1-b1^t)) * m / denom.
@compute @workgroup_size(256)
fn adam_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= ap.n || state[1] == 0.0) {
        return;
    }
    let t = state[0] + 1.0;
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
    let v = m2[i] * ap.beta2 + (ap.w2 * g) * g;
    m1[i] = m;
    m2[i] = v;
    let bias_correction1 = -expm1_neg(t * ap.ln_beta1);
    let bias_correction2 = -expm1_neg(t * ap.ln_beta2);
    let step_size = ap.lr / bias_correction1;
    let denom = sqrt(v) / sqrt(bias_correction2) + ap.eps;
    param[i] = p - (step_size * m) / denom;
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
}

@compute @workgroup_size(256)
fn fill(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i < fp.n) {
        fill_buf[i] = fp.value;
    }
}
