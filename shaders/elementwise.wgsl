// Elementwise kernels: activations (one pipeline per op code) and broadcasting binary ops.
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

// Binary op codes (override OP).
const ADD: i32 = 0;
const SUB: i32 = 1;
const MUL: i32 = 2;
const DIV: i32 = 3;
const POW: i32 = 4;
const PRELU: i32 = 5;

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

@group(0) @binding(0) var<uniform> up: UnaryParams;
@group(0) @binding(0) var<uniform> bp: BinaryParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

fn unary(v: f32) -> f32 {
    switch OP {
        case 0: { return max(v, 0.0); }
        case 1: { return select(v, v * up.alpha, v < 0.0); }
        case 2: { return 1.0 / (1.0 + exp(-v)); }
        case 3: { return clamp(up.alpha * v + up.beta, 0.0, 1.0); }
        case 4: { return v * clamp(v / 6.0 + 0.5, 0.0, 1.0); }
        default: { return clamp(v, up.alpha, up.beta); }
    }
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
        default: { return select(a, a * c, a < 0.0); }
    }
}

// pow() in WGSL is undefined for a negative base; ONNX follows C's pow, which is defined for
// integral exponents (and NaN otherwise).
fn pow_onnx(a: f32, c: f32) -> f32 {
    if a >= 0.0 { return pow(a, c); }
    if c != floor(c) { return bitcast<f32>(0x7fc00000u); }
    let m = pow(-a, c);
    if (abs(c) % 2.0) == 1.0 { return -m; }
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
