// Elementwise kernels: activations (one pipeline per op code) and broadcasting binary ops.
//
// NaN and infinities follow ONNX Runtime's CPU kernels (tests/nan_semantics.rs): GPU min, max and
// clamp may return the non-NaN operand (Relu(NaN) was 0), so every one of them here is guarded
// by a bit-pattern NaN test (WGSL has no isnan, and `x != x` may be folded away). Relu, Clip and
// the hard activations return NaN for NaN; a NaN Clip bound is no bound (ONNX Runtime's
// comparisons against it fail); Clip without bounds clamps to ±FLT_MAX, so ±inf become ±FLT_MAX.
// Pow follows C99's pow in every special case (pow(1, NaN) = 1, pow(NaN, 0) = 1, ±0 and ±inf).
//
// Flat index: gid.x + gid.y * (num_workgroups.x * 256), so more than 65 535 workgroups fit
// (see gpu::grid_1d).

// Unary op codes (override OP).
const RELU: i32 = 0;
const LEAKY_RELU: i32 = 1;
const SIGMOID: i32 = 2;
const HARD_SIGMOID: i32 = 3;
const HARD_SWISH: i32 = 4;
const CLIP: i32 = 5;
const LOG: i32 = 6;
const EXP: i32 = 7;
const TANH: i32 = 8;
const NEG: i32 = 9;
const ABS: i32 = 10;
const SQRT: i32 = 11;
const ERF: i32 = 12;
// Gelu: alpha 0 for the exact form, 1 for the tanh approximation.
const GELU: i32 = 13;
const SOFTPLUS: i32 = 14;
const SOFTSIGN: i32 = 15;
// Elu: alpha; Selu: alpha and gamma (beta).
const ELU: i32 = 16;
const SELU: i32 = 17;
const RECIPROCAL: i32 = 18;
const MISH: i32 = 19;

// Binary op codes (override OP).
const ADD: i32 = 0;
const SUB: i32 = 1;
const MUL: i32 = 2;
const DIV: i32 = 3;
const POW: i32 = 4;
const PRELU: i32 = 5;
const MAX: i32 = 6;
const MIN: i32 = 7;

override OP: i32 = 0;

struct UnaryParams {
    n: u32,
    alpha: f32,
    beta: f32,
    _pad: u32,
}

struct BinaryParams {
    n: u32,
    rank: u32,
    _p0: u32,
    _p1: u32,
    shape0: vec4<u32>,
    shape1: vec4<u32>,
    sa0: vec4<u32>,
    sa1: vec4<u32>,
    sb0: vec4<u32>,
    sb1: vec4<u32>,
}

@group(0) @binding(0) var<storage, read> up: UnaryParams;
@group(0) @binding(0) var<storage, read> bp: BinaryParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

fn unary(v: f32) -> f32 {
    switch OP {
        case 0: { return nan_or(v, max(v, 0.0)); }
        case 1: { return select(v, v * up.alpha, v < 0.0); }
        case 2: { return 1.0 / (1.0 + exp(-v)); }
        case 3: { return clamp_nan(up.alpha * v + up.beta, 0.0, 1.0); }
        case 4: { return v * clamp_nan(v / 6.0 + 0.5, 0.0, 1.0); }
        case LOG: { return log_onnx(v); }
        case EXP: { return exp(v); }
        case TANH: { return tanh_onnx(v); }
        case NEG: { return -v; }
        case ABS: { return abs(v); }
        case SQRT: { return select(sqrt(v), f32_nan(), v < 0.0); }
        case ERF: { return erf_onnx(v); }
        case GELU: { return gelu(v); }
        case SOFTPLUS: { return softplus(v); }
        case SOFTSIGN: { return v / (1.0 + abs(v)); }
        case ELU: { return elu(v); }
        case SELU: { return up.beta * elu(v); }
        case RECIPROCAL: { return 1.0 / v; }
        case MISH: { return v * tanh_onnx(softplus(v)); }
        default: { return clip_onnx(v, up.alpha, up.beta); }
    }
}

fn is_inf(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) == 0x7f800000u;
}

fn clamp_nan(v: f32, lo: f32, hi: f32) -> f32 {
    return nan_or(v, clamp(v, lo, hi));
}

// WGSL leaves log and sqrt of values out of their domain undefined; ONNX follows C. (Functions,
// not constants: WGSL constant expressions may not be NaN or infinite.)
fn f32_nan() -> f32 { return bitcast<f32>(0x7fc00000u); }
fn f32_neg_inf() -> f32 { return bitcast<f32>(0xff800000u); }

// ln x with full relative precision near x = 1, where the builtin (log2(x)·ln 2 with an absolute
// error near 5e-8) was off by 5e-5 relative at x = 0.999 on lavapipe and on NVIDIA. x = 2^e·m
// with m in [1/√2, √2), ln m = 2·atanh(s), s = (m − 1)/(m + 1), |s| ≤ 0.172: the series to
// s⁹ leaves 2e-9 relative; ln 2 is split so e·ln 2 carries no rounding of its own.
fn log_onnx(x: f32) -> f32 {
    if x == 0.0 { return f32_neg_inf(); }
    if !(x > 0.0) { return f32_nan(); }
    if x > 3.4028235e38 { return x; }
    var v = x;
    var e = 0i;
    // Subnormals (where a device keeps them): scale into the normal range first.
    if v < 1.17549435e-38 {
        v = v * 8388608.0;
        e = -23;
    }
    let bits = bitcast<u32>(v);
    e += i32((bits >> 23u) & 0xffu) - 127;
    var m = bitcast<f32>((bits & 0x007fffffu) | 0x3f800000u);
    if m > 1.41421356 {
        m = m * 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let lm = 2.0 * s * (1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0)))));
    let fe = f32(e);
    return fe * 0.693145751953125 + (fe * 1.42860682030941723212e-6 + lm);
}

// exp(u) − 1 without cancellation near 0: its Taylor series below |u| = 1.25 (terms to
// u^12/12!, 2e-9 relative), exp(u) − 1 above.
fn expm1_onnx(u: f32) -> f32 {
    if abs(u) < 1.25 {
        var t = 1.0 + u / 12.0;
        t = 1.0 + u / 11.0 * t;
        t = 1.0 + u / 10.0 * t;
        t = 1.0 + u / 9.0 * t;
        t = 1.0 + u / 8.0 * t;
        t = 1.0 + u / 7.0 * t;
        t = 1.0 + u / 6.0 * t;
        t = 1.0 + u / 5.0 * t;
        t = 1.0 + u / 4.0 * t;
        t = 1.0 + u / 3.0 * t;
        t = 1.0 + u / 2.0 * t;
        return u * t;
    }
    return exp(u) - 1.0;
}

// tanh x = sign(x)·u/(u + 2) with u = expm1(2|x|), no cancellation anywhere: Mesa lowers the
// builtin to (e^2x − 1)/(e^2x + 1), which gave tanh(1e-30) = 3e-8 on lavapipe, and WGSL leaves
// its precision to the driver. From |x| = 9.02 on, tanh rounds to ±1 in f32.
// Ordered comparisons only: NaN fails both tests and comes back unchanged.
fn tanh_onnx(x: f32) -> f32 {
    let a = abs(x);
    var r: f32;
    if a < 9.5 {
        let em1 = expm1_onnx(2.0 * a);
        r = em1 / (em1 + 2.0);
    } else if a >= 9.5 {
        r = 1.0;
    } else {
        return x;
    }
    return select(r, -r, x < 0.0);
}

// log(1 + u) for 0 <= u <= 1 with full relative precision near 0: 2·atanh(s), s = u/(2 + u) ≤ 1/3,
// the series to s¹⁷ (next term below 2e-9 relative). Not ln(1 + u)·u/((1 + u) − 1): the compiler
// may fold (1 + u) − 1 to u, which lavapipe did (4e-6 relative at u = 0.015).
fn log1p_pos(u: f32) -> f32 {
    let s = u / (2.0 + u);
    let s2 = s * s;
    var p = 1.0 / 17.0;
    p = p * s2 + 1.0 / 15.0;
    p = p * s2 + 1.0 / 13.0;
    p = p * s2 + 1.0 / 11.0;
    p = p * s2 + 1.0 / 9.0;
    p = p * s2 + 1.0 / 7.0;
    p = p * s2 + 1.0 / 5.0;
    p = p * s2 + 1.0 / 3.0;
    p = p * s2 + 1.0;
    return 2.0 * s * p;
}

// softplus x = ln(1 + e^x) = max(x, 0) + ln(1 + e^−|x|) (e^−|x| ≤ 1): no overflow, no
// cancellation.
fn softplus(x: f32) -> f32 {
    return nan_or(x, max(x, 0.0) + log1p_pos(exp(-abs(x))));
}

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

// Elu (alpha = up.alpha; Selu scales it by up.beta): x above 0, alpha·(e^x − 1) at or below.
fn elu(x: f32) -> f32 {
    return select(x, up.alpha * expm1_onnx(x), x <= 0.0);
}

// erfc(a) for a >= 1: t·exp(−a² + P(s)), t = 1/(1 + a/2), s = 4t − 5/3 (t's range over [1, 10]
// mapped onto [−1, 1]), P the degree-8 fit of tools/erf_fit.py (1.2e-7 relative in f32). The
// caller passes a² as hi2 + lo2 with hi2 exact (the square of a's top 12 bits), so the rounding of
// a² (7.6e-6 at a = 10) never reaches the exponent. 0 from 10 on (erfc(9.2) is already below f32's
// smallest normal); NaN stays NaN.
fn erfc_split(a: f32, hi2: f32, lo2: f32) -> f32 {
    if a >= 10.0 { return 0.0; }
    let t = 1.0 / (1.0 + 0.5 * a);
    let s = 4.0 * t - 1.6666666666666667;
    var p = -3.994111466454342e-06;
    p = p * s - 9.681571100372821e-06;
    p = p * s + 6.426724576158449e-05;
    p = p * s + 0.0001801046309992671;
    p = p * s - 0.001008396502584219;
    p = p * s - 0.004760499112308025;
    p = p * s + 0.017190933227539062;
    p = p * s + 0.3265846371650696;
    p = p * s - 0.7823777794837952;
    return t * exp(-hi2) * exp(p - lo2);
}

// v's top 12 significant bits: its square is exact in f32.
fn top_bits(v: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(v) & 0xfffff000u);
}

fn erfc_tail(a: f32) -> f32 {
    let hi = top_bits(a);
    return erfc_split(a, hi * hi, (a - hi) * (a + hi));
}

// erf(a) for |a| < 1: 2/√π · a · Σ (−a²)ⁿ / (n!(2n + 1)), n ≤ 11 (the next term is below 1e-9):
// full relative precision near 0, where 1 − erfc would cancel.
fn erf_series(a: f32) -> f32 {
    let u = a * a;
    var p = -1.0 / (39916800.0 * 23.0);
    p = p * u + 1.0 / (3628800.0 * 21.0);
    p = p * u - 1.0 / (362880.0 * 19.0);
    p = p * u + 1.0 / (40320.0 * 17.0);
    p = p * u - 1.0 / (5040.0 * 15.0);
    p = p * u + 1.0 / (720.0 * 13.0);
    p = p * u - 1.0 / (120.0 * 11.0);
    p = p * u + 1.0 / (24.0 * 9.0);
    p = p * u - 1.0 / (6.0 * 7.0);
    p = p * u + 1.0 / (2.0 * 5.0);
    p = p * u - 1.0 / 3.0;
    p = p * u + 1.0;
    return 1.1283791670955126 * a * p;
}

// erf with ONNX Runtime's edges: ±0 kept, ±1 at ±inf, NaN passes through (ordered comparisons
// only: NaN fails every test and comes back unchanged).
fn erf_onnx(x: f32) -> f32 {
    let a = abs(x);
    var r: f32;
    if a < 1.0 {
        return erf_series(x);
    } else if a >= 1.0 {
        r = 1.0 - erfc_tail(a);
    } else {
        return x;
    }
    return select(r, -r, x < 0.0);
}

// Φ(x) = (1 + erf(x/√2))/2, as erfc(|z|)/2 below 0 so that the left tail keeps its relative
// precision (1 + erf cancels there). The tail's exponent z² = x²/2 comes from x itself: the
// rounding of x/√2 would be amplified x²-fold there.
fn normal_cdf(x: f32) -> f32 {
    let z = x * 0.70710678118654752;
    let a = abs(z);
    if a < 1.0 { return 0.5 + 0.5 * erf_series(z); }
    let ax = abs(x);
    let hi = top_bits(ax);
    let c = 0.5 * erfc_split(a, 0.5 * hi * hi, 0.5 * (ax - hi) * (ax + hi));
    return select(1.0 - c, c, x < 0.0);
}

// The tanh approximation's 0.5·(1 + tanh u) = σ(2u), u = √(2/π)·(x + 0.044715x³): no cancellation
// on either side.
fn gelu_tanh_gate(x: f32) -> f32 {
    let u = 0.79788456080286536 * (x + 0.044715 * x * x * x);
    return 1.0 / (1.0 + exp(-2.0 * u));
}

// Gelu(x) = x·Φ(x) (approximate = "none") or x·σ(2u) ("tanh"). NaN passes through.
fn gelu(x: f32) -> f32 {
    if up.alpha == 0.0 { return x * normal_cdf(x); }
    return x * gelu_tanh_gate(x);
}

@compute @workgroup_size(256)
fn unary_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if i >= up.n { return; }
    y[i] = unary(x[i]);
}

fn lane(v0: vec4<u32>, v1: vec4<u32>, d: u32) -> u32 {
    if d < 4u { return v0[d]; }
    return v1[d - 4u];
}

fn binary(a: f32, c: f32) -> f32 {
    switch OP {
        case 0: { return a + c; }
        case 1: { return a - c; }
        case 2: { return a * c; }
        case 3: { return a / c; }
        case 4: { return pow_onnx(a, c); }
        // NaN in either operand gives NaN (the builtins may return the other one).
        case MAX: { return select(max(a, c), a + c, is_nan(a) || is_nan(c)); }
        case MIN: { return select(min(a, c), a + c, is_nan(a) || is_nan(c)); }
        default: { return select(a, a * c, a < 0.0); }
    }
}

// pow() in WGSL is exp2(c * log2(a)): undefined for a negative base, and wrong for C's special
// cases (pow(1, NaN) = 1, pow(NaN, 0) = 1, pow(0, -1) = inf, pow(-0, -3) = -inf, pow(-1, inf) = 1).
// ONNX Runtime calls C's pow, so every special case of C99 (F.9.4.4) is spelled out; what remains
// is |a|^c with the sign of a for odd integral c, and NaN for a negative base and a non-integral c.
fn pow_onnx(a: f32, c: f32) -> f32 {
    if c == 0.0 || a == 1.0 { return 1.0; }
    if is_nan(a) { return a; }
    if is_nan(c) { return c; }
    let integral = !is_inf(c) && c == floor(c);
    let odd = integral && abs(c) < 16777216.0 && (abs(c) % 2.0) == 1.0;
    let neg = (bitcast<u32>(a) & 0x80000000u) != 0u;
    let inf = bitcast<f32>(0x7f800000u);
    if a == 0.0 {
        if c < 0.0 {
            return select(inf, -inf, odd && neg);
        }
        return select(0.0, -0.0, odd && neg);
    }
    if is_inf(c) {
        let m = abs(a);
        if m == 1.0 { return 1.0; }
        if (m < 1.0) == (c < 0.0) { return inf; }
        return 0.0;
    }
    if is_inf(a) {
        var r = select(0.0, inf, c > 0.0);
        if neg && odd { r = -r; }
        return r;
    }
    if neg && !integral { return bitcast<f32>(0x7fc00000u); }
    let m = pow(abs(a), c);
    if neg && odd { return -m; }
    return m;
}

@compute @workgroup_size(256)
fn binary_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if i >= bp.n { return; }
    var rem = i;
    var ia = 0u;
    var ib = 0u;
    for (var d = i32(bp.rank) - 1; d >= 0; d--) {
        let du = u32(d);
        let s = lane(bp.shape0, bp.shape1, du);
        let idx = rem % s;
        rem = rem / s;
        ia += idx * lane(bp.sa0, bp.sa1, du);
        ib += idx * lane(bp.sb0, bp.sb1, du);
    }
    out[i] = binary(x[ia], b[ib]);
}

// ------------------------------------------------------------------------------------------------
// Reverse pass
//
// ACCUM = 1 adds into the gradient buffer (a fanned-out tensor whose other consumer's gradient
// is already there) instead of overwriting it. Every gradient element is produced by one thread
// (or one workgroup) summing in a fixed order, so results are bit-reproducible without atomics.
// ------------------------------------------------------------------------------------------------

override ACCUM: i32 = 0;
// Activations: 1 when the saved tensor bound is the forward output, 0 when it is the input.
override FROM_OUTPUT: i32 = 0;
// Binary ops: 0 for the gradient of A, 1 for the gradient of B.
override SIDE: i32 = 0;

// Every gradient kernel binds dy first. Activations: dy, the saved tensor, dX.
@group(0) @binding(1) var<storage, read> gy: array<f32>;
@group(0) @binding(2) var<storage, read> saved: array<f32>;
@group(0) @binding(3) var<storage, read_write> gx: array<f32>;

fn store_grad(i: u32, v: f32) {
    if ACCUM == 1 {
        gx[i] = gx[i] + v;
    } else {
        gx[i] = v;
    }
}

// dL/dx from dL/dy and the saved value v (x, or y when FROM_OUTPUT). The conventions at the
// kinks are PyTorch's: relu and leaky relu take the negative branch at 0; hardtanh-style clip and
// hard sigmoid pass the gradient only strictly inside the linear range; hard swish's gradient is
// x/3 + 1/2 on the closed interval [-3, 3].
fn unary_grad(g: f32, v: f32) -> f32 {
    switch OP {
        case RELU: { return select(0.0, g, v > 0.0); }
        case LEAKY_RELU: { return select(g * up.alpha, g, v > 0.0); }
        case SIGMOID: {
            var s = v;
            if FROM_OUTPUT == 0 { s = 1.0 / (1.0 + exp(-v)); }
            return g * s * (1.0 - s);
        }
        case HARD_SIGMOID: {
            var t = v;
            if FROM_OUTPUT == 0 { t = up.alpha * v + up.beta; }
            return select(0.0, g * up.alpha, t > 0.0 && t < 1.0);
        }
        case HARD_SWISH: {
            if v < -3.0 { return 0.0; }
            if v <= 3.0 { return g * (v / 3.0 + 0.5); }
            return g;
        }
        case LOG: { return g / v; }
        case EXP: {
            if FROM_OUTPUT == 0 { return g * exp(v); }
            return g * v;
        }
        case TANH: {
            var t = v;
            if FROM_OUTPUT == 0 { t = tanh_onnx(v); }
            return g * (1.0 - t * t);
        }
        // d erf/dx = 2/√π · e^(−x²).
        case ERF: { return g * 1.1283791670955126 * exp(-v * v); }
        case GELU: {
            if up.alpha == 0.0 {
                // Φ(x) + x·φ(x), φ(x) = e^(−x²/2)/√(2π).
                return g * (normal_cdf(v) + v * 0.3989422804014327 * exp(-0.5 * v * v));
            }
            // d/dx x·σ(2u) = σ + x·2σ(1 − σ)·u', u' = √(2/π)·(1 + 3·0.044715x²).
            let sg = gelu_tanh_gate(v);
            let du = 0.79788456080286536 * (1.0 + 0.134145 * v * v);
            return g * (sg + v * 2.0 * sg * (1.0 - sg) * du);
        }
        case SOFTPLUS: { return g * sigmoid(v); }
        case SOFTSIGN: {
            let d = 1.0 + abs(v);
            return g / (d * d);
        }
        // At 0 the negative branch (alpha·e^0 = alpha), as PyTorch's elu backward.
        case ELU: { return select(g, g * up.alpha * exp(v), v <= 0.0); }
        case SELU: { return up.beta * select(g, g * up.alpha * exp(v), v <= 0.0); }
        case RECIPROCAL: { return -g / (v * v); }
        case MISH: {
            let t = tanh_onnx(softplus(v));
            return g * (t + v * (1.0 - t * t) * sigmoid(v));
        }
        case NEG: { return -g; }
        // sign(0) = 0, as PyTorch's abs backward.
        case ABS: { return g * sign(v); }
        case SQRT: {
            var r = v;
            if FROM_OUTPUT == 0 { r = select(sqrt(v), f32_nan(), v < 0.0); }
            return g / (2.0 * r);
        }
        // Clip: min < v < max holds for x exactly when it holds for y = clamp(x, min, max).
        default: { return select(0.0, g, v > up.alpha && v < up.beta); }
    }
}

@compute @workgroup_size(256)
fn unary_backward_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if i >= up.n { return; }
    store_grad(i, unary_grad(gy[i], saved[i]));
}

// The gradient of one operand X of a broadcasting binary op: element j of X sums, over the output
// positions it was broadcast to, dy times the partial derivative. X's non-unit dims ("kept", in
// output order, row major) locate j; the dims X was broadcast along ("red") enumerate the sum.
// Each dim carries its stride in the output and in the other operand (0 where that one is
// broadcast).
struct GradParams {
    n: u32,
    n_red: u32,
    kept_rank: u32,
    red_rank: u32,
    // Sum kernels: 1 or -1 (Sub's B).
    scale: f32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
    kept0: vec4<u32>,
    kept1: vec4<u32>,
    kept_out0: vec4<u32>,
    kept_out1: vec4<u32>,
    kept_oth0: vec4<u32>,
    kept_oth1: vec4<u32>,
    red0: vec4<u32>,
    red1: vec4<u32>,
    red_out0: vec4<u32>,
    red_out1: vec4<u32>,
    red_oth0: vec4<u32>,
    red_oth1: vec4<u32>,
}

@group(0) @binding(0) var<uniform> gp_in: GradParams;
// Staged through workgroup memory at the top of every entry point that reads it (see
// runtime/src/gpu/params.rs): a uniform block, so it does not count against the 4 storage buffers
// per stage of downlevel (phone) limits, that lavapipe cannot inline.
var<workgroup> gp: GradParams;
// Product kernels bind dy, A, B, dX; sum kernels bind dy, dX.
@group(0) @binding(2) var<storage, read> ga: array<f32>;
@group(0) @binding(3) var<storage, read> gb: array<f32>;
@group(0) @binding(4) var<storage, read_write> gx4: array<f32>;
@group(0) @binding(2) var<storage, read_write> gx2: array<f32>;

// (output offset, other-operand offset) of gradient element j's first contribution.
fn kept_base(j: u32) -> vec2<u32> {
    var rem = j;
    var off = vec2<u32>(0u);
    for (var d = i32(gp.kept_rank) - 1; d >= 0; d--) {
        let du = u32(d);
        let s = lane(gp.kept0, gp.kept1, du);
        let idx = rem % s;
        rem = rem / s;
        off += idx * vec2<u32>(lane(gp.kept_out0, gp.kept_out1, du), lane(gp.kept_oth0, gp.kept_oth1, du));
    }
    return off;
}

// (output offset, other-operand offset) of the r-th broadcast position, relative to the base.
fn red_step(r: u32) -> vec2<u32> {
    var rem = r;
    var off = vec2<u32>(0u);
    for (var d = i32(gp.red_rank) - 1; d >= 0; d--) {
        let du = u32(d);
        let s = lane(gp.red0, gp.red1, du);
        let idx = rem % s;
        rem = rem / s;
        off += idx * vec2<u32>(lane(gp.red_out0, gp.red_out1, du), lane(gp.red_oth0, gp.red_oth1, du));
    }
    return off;
}

// dy times the partial derivative of OP with respect to the SIDE operand at (a, c). Conventions
// follow PyTorch: pow's d/da is 0 where the exponent is 0; d/db = a^b ln a only where a > 0
// (0 elsewhere); PRelu takes the slope branch at x = 0; Max and Min pass dy to the operand they
// chose and split it in halves on a tie (PyTorch's maximum/minimum).
fn binary_grad(g: f32, a: f32, c: f32) -> f32 {
    if OP == MAX || OP == MIN {
        let own = select(c, a, SIDE == 0);
        let other = select(a, c, SIDE == 0);
        if own == other { return 0.5 * g; }
        let wins = select((own < other), (own > other), OP == MAX);
        return select(0.0, g, wins);
    }
    if SIDE == 0 {
        switch OP {
            case MUL: { return g * c; }
            case DIV: { return g / c; }
            case POW: { return select(g * c * pow_onnx(a, c - 1.0), 0.0, c == 0.0); }
            default: { return select(g * c, g, a > 0.0); }
        }
    }
    switch OP {
        case MUL: { return g * a; }
        case DIV: { return -g * a / (c * c); }
        case POW: { return select(0.0, g * pow_onnx(a, c) * log(a), a > 0.0); }
        default: { return 0.0; }
    }
}

// Operand values at (own index j, other operand offset) as (a, b).
fn operands(j: u32, oth: u32) -> vec2<f32> {
    if SIDE == 0 { return vec2<f32>(ga[j], gb[oth]); }
    return vec2<f32>(ga[oth], gb[j]);
}

fn store_grad4(j: u32, v: f32) {
    if ACCUM == 1 {
        gx4[j] = gx4[j] + v;
    } else {
        gx4[j] = v;
    }
}

fn store_grad2(j: u32, v: f32) {
    if ACCUM == 1 {
        gx2[j] = gx2[j] + v;
    } else {
        gx2[j] = v;
    }
}

@compute @workgroup_size(256)
fn binary_grad_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        gp = gp_in;
    }
    workgroupBarrier();
    let j = flat(gid, nwg);
    if j >= gp.n { return; }
    let base = kept_base(j);
    var acc = 0.0;
    for (var r = 0u; r < gp.n_red; r++) {
        let off = base + red_step(r);
        let v = operands(j, off.y);
        acc += binary_grad(gy[off.x], v.x, v.y);
    }
    store_grad4(j, acc);
}

@compute @workgroup_size(256)
fn binary_grad_sum_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        gp = gp_in;
    }
    workgroupBarrier();
    let j = flat(gid, nwg);
    if j >= gp.n { return; }
    let base = kept_base(j).x;
    var acc = 0.0;
    for (var r = 0u; r < gp.n_red; r++) {
        acc += gy[base + red_step(r).x];
    }
    store_grad2(j, gp.scale * acc);
}

const GRAD_WG: u32 = 256u;
var<workgroup> partial: array<f32, 256>;

// Fixed-shape tree over the workgroup's partial sums; every invocation must call it.
fn tree_sum(t: u32, v: f32) -> f32 {
    partial[t] = v;
    workgroupBarrier();
    for (var s = GRAD_WG / 2u; s > 0u; s >>= 1u) {
        if t < s {
            partial[t] += partial[t + s];
        }
        workgroupBarrier();
    }
    return partial[0];
}

// Long broadcasts (a per-channel operand over N·H·W): one workgroup per gradient element.
@compute @workgroup_size(256)
fn binary_grad_wg_main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    if t == 0u {
        gp = gp_in;
    }
    workgroupBarrier();
    let j = wid.x + wid.y * nwg.x;
    // Uniform per workgroup, so the barriers in tree_sum stay in uniform control flow.
    if j >= gp.n { return; }
    let base = kept_base(j);
    var acc = 0.0;
    for (var r = t; r < gp.n_red; r += GRAD_WG) {
        let off = base + red_step(r);
        let v = operands(j, off.y);
        acc += binary_grad(gy[off.x], v.x, v.y);
    }
    let total = tree_sum(t, acc);
    if t == 0u { store_grad4(j, total); }
}

@compute @workgroup_size(256)
fn binary_grad_sum_wg_main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    if t == 0u {
        gp = gp_in;
    }
    workgroupBarrier();
    let j = wid.x + wid.y * nwg.x;
    if j >= gp.n { return; }
    let base = kept_base(j).x;
    var acc = 0.0;
    for (var r = t; r < gp.n_red; r += GRAD_WG) {
        acc += gy[base + red_step(r).x];
    }
    let total = tree_sum(t, acc);
    if t == 0u { store_grad2(j, gp.scale * total); }
}
