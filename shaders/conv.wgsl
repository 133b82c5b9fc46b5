// Convolution kernels. 1x1 convolutions with stride 1 and no padding do not come here: they are
// plain matrix products and run on matmul.wgsl.
//
// Spatial dims are always (d, h, w); 1-D and 2-D convolutions arrive with leading unit dims, and
// override DIMS lets the compiler drop the depth arithmetic when it is not needed.
//
// conv_gemm: implicit GEMM. Per image and group, out[m, p] = sum_k W[m, k] * col[k, p] with
//   M = Cout / group, N = P = Dout * Hout * Wout, K = Cin / group * kd * kh * kw.
//   The weight [Cout, Cin/g, kd, kh, kw] already is row-major [Cout, K]; the im2col matrix col is
//   never stored: its 16x64 slice is gathered straight from X (zeros in the padding) while filling
//   workgroup memory. Same tiling as matmul.wgsl: a 16x16 workgroup computes a 64x64 output tile,
//   4x4 per invocation, K in steps of 16, 8.5 KiB of workgroup memory. Bias is added at write-out.
//   Grid: x = ceil(P / 64), y = ceil(M / 64), z = N * group.
// conv_depthwise: group == Cin (one input channel per output channel, Cout = Cin * multiplier).
//   K is only kd * kh * kw, too small to tile, so one invocation computes one output directly.
//   Grid: grid_1d(N * Cout * P, 256).

const TILE: u32 = 64u;
const TILE_K: u32 = 16u;
const A_ROW: u32 = 17u;

// 1 when a bias is bound and added; 0 binds a dummy buffer that is never read.
override HAS_BIAS: u32 = 0u;
// Number of spatial dims (1, 2 or 3).
override DIMS: u32 = 2u;

struct ConvParams {
    groups: u32,
    // Input channels per group, output channels per group (M), and K = cin_g * kernel volume.
    cin_g: u32,
    cout_g: u32,
    k: u32,
    // Output positions per image (P) and the total channel counts.
    p: u32,
    cin: u32,
    cout: u32,
    // N * Cout * P, for the one-invocation-per-output depthwise kernel.
    total: u32,
    // (d, h, w, unused) of the input, output and kernel, the strides, dilations and begin pads.
    in_dims: vec4<u32>,
    out_dims: vec4<u32>,
    kernel: vec4<u32>,
    strides: vec4<u32>,
    dilations: vec4<u32>,
    pads: vec4<i32>,
}

@group(0) @binding(0) var<uniform> p: ConvParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

var<workgroup> a_tile: array<vec4<f32>, 272>;
var<workgroup> b_tile: array<vec4<f32>, 256>;

// Output position -> (d, h, w) of the first input tap, before dilation offsets.
fn window_origin(pos: u32) -> vec3<i32> {
    let hw = p.out_dims.y * p.out_dims.z;
    var od = 0u;
    var r = pos;
    if DIMS == 3u {
        od = pos / hw;
        r = pos - od * hw;
    }
    let oh = r / p.out_dims.z;
    let ow = r - oh * p.out_dims.z;
    return vec3<i32>(
        i32(od * p.strides.x) - p.pads.x,
        i32(oh * p.strides.y) - p.pads.y,
        i32(ow * p.strides.z) - p.pads.z,
    );
}

// Kernel tap index within one channel's window -> its (d, h, w) offset in the input.
fn tap_offset(t: u32) -> vec3<i32> {
    let khw = p.kernel.y * p.kernel.z;
    var kd = 0u;
    var r = t;
    if DIMS == 3u {
        kd = t / khw;
        r = t - kd * khw;
    }
    let kh = r / p.kernel.z;
    let kw = r - kh * p.kernel.z;
    return vec3<i32>(
        i32(kd * p.dilations.x),
        i32(kh * p.dilations.y),
        i32(kw * p.dilations.z),
    );
}

// X at (channel plane base, position) or 0 in the padding.
fn load_x(plane: u32, at: vec3<i32>) -> f32 {
    let dims = vec3<i32>(p.in_dims.xyz);
    if any(at < vec3<i32>(0)) || any(at >= dims) {
        return 0.0;
    }
    let u = vec3<u32>(at);
    return x[plane + (u.x * p.in_dims.y + u.y) * p.in_dims.z + u.z];
}

@compute @workgroup_size(16, 16)
fn conv_gemm(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) lidx: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    let row0 = wid.y * TILE;
    let col0 = wid.x * TILE;
    let img = wid.z / p.groups;
    let g = wid.z - img * p.groups;
    let kvol = p.kernel.x * p.kernel.y * p.kernel.z;
    let in_plane = p.in_dims.x * p.in_dims.y * p.in_dims.z;
    let x_base = (img * p.cin + g * p.cin_g) * in_plane;
    let w_base = g * p.cout_g * p.k;

    let a_k = lidx % TILE_K;
    let a_m = lidx / TILE_K;
    // Each invocation gathers the im2col column of one fixed output position: its window origin
    // is computed once, outside the K loop.
    let b_n = lidx % TILE;
    let b_k = lidx / TILE;
    let pos = col0 + b_n;
    let pos_ok = pos < p.p;
    let origin = window_origin(pos);

    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < p.k; k0 += TILE_K) {
        let gk = k0 + a_k;
        for (var r = 0u; r < 4u; r++) {
            let mm = a_m + r * 16u;
            let gm = row0 + mm;
            var v = 0.0;
            if gm < p.cout_g && gk < p.k {
                v = w[w_base + gm * p.k + gk];
            }
            a_tile[a_k * A_ROW + mm / 4u][mm % 4u] = v;
        }
        for (var r = 0u; r < 4u; r++) {
            let kk = b_k + r * 4u;
            let gkb = k0 + kk;
            var v = 0.0;
            if pos_ok && gkb < p.k {
                let ci = gkb / kvol;
                let t = gkb - ci * kvol;
                v = load_x(x_base + ci * in_plane, origin + tap_offset(t));
            }
            b_tile[kk * 16u + b_n / 4u][b_n % 4u] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TILE_K; kk++) {
            let av = a_tile[kk * A_ROW + lid.y];
            let bv = b_tile[kk * 16u + lid.x];
            acc[0] += av.x * bv;
            acc[1] += av.y * bv;
            acc[2] += av.z * bv;
            acc[3] += av.w * bv;
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < 4u; i++) {
        let gm = row0 + lid.y * 4u + i;
        if gm >= p.cout_g { break; }
        let oc = g * p.cout_g + gm;
        var b0 = 0.0;
        if HAS_BIAS != 0u {
            b0 = bias[oc];
        }
        let out_base = (img * p.cout + oc) * p.p;
        for (var j = 0u; j < 4u; j++) {
            let gn = col0 + lid.x * 4u + j;
            if gn >= p.p { break; }
            y[out_base + gn] = acc[i][j] + b0;
        }
    }
}

@compute @workgroup_size(256)
fn conv_depthwise(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.total { return; }
    let pos = i % p.p;
    let nc = i / p.p;
    let oc = nc % p.cout;
    let img = nc / p.cout;
    // Output channel oc reads input channel oc / multiplier.
    let ci = oc / p.cout_g;
    let in_plane = p.in_dims.x * p.in_dims.y * p.in_dims.z;
    let plane = (img * p.cin + ci) * in_plane;
    let origin = window_origin(pos);
    let kvol = p.kernel.x * p.kernel.y * p.kernel.z;
    let w_base = oc * kvol;
    var acc = 0.0;
    for (var t = 0u; t < kvol; t++) {
        acc += w[w_base + t] * load_x(plane, origin + tap_offset(t));
    }
    if HAS_BIAS != 0u {
        acc += bias[oc];
    }
    y[i] = acc;
}
