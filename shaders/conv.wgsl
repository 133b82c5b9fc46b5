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
//
// Reverse pass (data gradient through a frozen weight, a transposed convolution):
// conv_gemm_dx: per image and group, dX[ci, x] = sum over (co, tap) of W[co, ci, tap] *
//   dY[co, o] where x + pad - tap * dil = o * stride. With stride s only the taps with
//   tap * dil = x + pad (mod s) reach x, so the input positions are split into s^d phases by
//   r = (x + pad) mod s: within one phase the positions form a regular grid x = x0 + s * q, the
//   contributing taps another, tap = k0 + step * j (step = s / gcd(dil, s)), and
//   o = base + q - j * dil / gcd(dil, s) is affine in both, so each phase is a dense implicit GEMM
//   with M = Cin / group, N = positions of the phase, K = Cout / group * taps of the phase. Same
//   64x64x16 tiling as conv_gemm. Grid: x = ceil(max positions per phase / 64),
//   y = ceil(M / 64), z = N * group * s^d; workgroups beyond their phase's positions exit.
// conv_depthwise_dx: one invocation per input element, summing the channel multiplier's outputs
//   over the taps that reach it. Grid: grid_1d(N * Cin * P_in, 256).

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

@group(0) @binding(0) var<uniform> p_in: ConvParams;
// Staged through workgroup memory at the top of every entry point that reads it (see
// runtime/src/gpu/params.rs): a uniform block, so it does not count against the 4 storage buffers
// per stage of downlevel (phone) limits, that lavapipe cannot inline.
var<workgroup> p: ConvParams;
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
    if lidx == 0u {
        p = p_in;
    }
    workgroupBarrier();
    let row0 = wid.y * TILE;
    let col0 = wid.x * TILE;
    // in_dims.w: the first z workgroup of this piece of a dispatch split along z.
    let z = wid.z + p.in_dims.w;
    let img = z / p.groups;
    let g = z - img * p.groups;
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
        for (var j = 0u; j < 4u; j++) {
            let gn = col0 + lid.x * 4u + j;
            if gn >= p.p { break; }
            write_y(img, g * p.cout_g + gm, gn, acc[i][j]);
        }
    }
}

// Output channel oc at position pos of image img: acc plus the bias, through the fused tail
// when there is one (activation.wgsl; `bias` is then its block, the bias at the constants + 4).
fn write_y(img: u32, oc: u32, pos: u32, acc: f32) {
    let t = tail_base(p.cout);
    var b0 = 0.0;
    if HAS_BIAS != 0u {
        b0 = bias[select(oc, t + 4u + oc, fused())];
    }
    var v = acc + b0;
    if fused() {
        var bn = vec4<f32>(0.0);
        if FUSE_BN != 0u {
            bn = vec4<f32>(bias[oc], bias[p.cout + oc], bias[2u * p.cout + oc], bias[3u * p.cout + oc]);
        }
        v = fuse_tail(v, bn, vec3<f32>(bias[t], bias[t + 1u], bias[t + 2u]));
    }
    y[(img * p.cout + oc) * p.p + pos] = v;
}

// conv_gemm_direct: conv_gemm for CPU adapters, which the context compiles in its place
// (gpu::GpuContext::variant; matmul.wgsl's matmul_direct says why): the same grid, 64x64
// outputs per workgroup as 8x8 invocations of 8 output channels x 8 positions, X read straight
// from its buffer. The taps are walked as nested loops (channel, then d, h, w), which is k in
// order 0..K-1: each output sums in conv_gemm's order with one accumulator.
@compute @workgroup_size(8, 8)
fn conv_gemm_direct(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) lidx: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    if lidx == 0u {
        p = p_in;
    }
    workgroupBarrier();
    let z = wid.z + p.in_dims.w;
    let img = z / p.groups;
    let g = z - img * p.groups;
    let row0 = wid.y * TILE + lid.y * 8u;
    let col0 = wid.x * TILE + lid.x * 8u;
    if row0 >= p.cout_g || col0 >= p.p { return; }
    let in_plane = p.in_dims.x * p.in_dims.y * p.in_dims.z;
    let x_base = (img * p.cin + g * p.cin_g) * in_plane;
    var wrow: array<u32, 8>;
    var origin: array<vec3<i32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        wrow[i] = (g * p.cout_g + min(row0 + i, p.cout_g - 1u)) * p.k;
        origin[i] = window_origin(min(col0 + i, p.p - 1u));
    }
    var lo: array<vec4<f32>, 8>;
    var hi: array<vec4<f32>, 8>;
    var k = 0u;
    for (var ci = 0u; ci < p.cin_g; ci++) {
        let plane = x_base + ci * in_plane;
        for (var kd = 0u; kd < p.kernel.x; kd++) {
            for (var kh = 0u; kh < p.kernel.y; kh++) {
                for (var kw = 0u; kw < p.kernel.z; kw++) {
                    let off = vec3<i32>(i32(kd * p.dilations.x), i32(kh * p.dilations.y), i32(kw * p.dilations.z));
                    let b0 = vec4<f32>(
                        load_x(plane, origin[0] + off),
                        load_x(plane, origin[1] + off),
                        load_x(plane, origin[2] + off),
                        load_x(plane, origin[3] + off),
                    );
                    let b1 = vec4<f32>(
                        load_x(plane, origin[4] + off),
                        load_x(plane, origin[5] + off),
                        load_x(plane, origin[6] + off),
                        load_x(plane, origin[7] + off),
                    );
                    for (var i = 0u; i < 8u; i++) {
                        let av = w[wrow[i] + k];
                        lo[i] += av * b0;
                        hi[i] += av * b1;
                    }
                    k++;
                }
            }
        }
    }
    for (var i = 0u; i < 8u; i++) {
        let gm = row0 + i;
        if gm >= p.cout_g { break; }
        for (var j = 0u; j < 8u; j++) {
            let gn = col0 + j;
            if gn >= p.p { break; }
            write_y(img, g * p.cout_g + gm, gn, select(hi[i][j % 4u], lo[i][j], j < 4u));
        }
    }
}

@compute @workgroup_size(256)
fn conv_depthwise(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) pli: u32) {
    if pli == 0u {
        p = p_in;
    }
    workgroupBarrier();
    // One image per z workgroup (in_dims.w: the first z workgroup of this piece of a dispatch
    // split along z), so that a paced step can split the dispatch along the batch.
    let img = wid.z + p.in_dims.w;
    let j = gid.x + gid.y * nwg.x * 256u;
    let per_image = p.cout * p.p;
    if j >= per_image { return; }
    let i = img * per_image + j;
    if i >= p.total { return; }
    let pos = j % p.p;
    let oc = j / p.p;
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

// conv_depthwise_plain: conv_depthwise without a bias (a convolution BatchNorm follows), with its
// parameters in a storage block read in place: x, w, y and the parameters are its four storage
// buffers (downlevel limits), so it needs no uniform block staged through workgroup memory. That
// staging's barrier made lavapipe run every workgroup as coroutines (`acclimate bench
// --profile`). Same arithmetic in the same order as conv_depthwise, so the same values; the
// helpers below are window_origin and load_x reading the parameters they are given. A depthwise
// convolution with a fused tail (activation.wgsl) runs here too, bias or not: its weights and
// bias travel in the tail's block, bound as `w`.
@group(0) @binding(0) var<storage, read> dq: ConvParams;
@group(0) @binding(3) var<storage, read_write> dy_plain: array<f32>;

fn dw_origin(q: ConvParams, pos: u32) -> vec3<i32> {
    let hw = q.out_dims.y * q.out_dims.z;
    var od = 0u;
    var r = pos;
    if DIMS == 3u {
        od = pos / hw;
        r = pos - od * hw;
    }
    let oh = r / q.out_dims.z;
    let ow = r - oh * q.out_dims.z;
    return vec3<i32>(
        i32(od * q.strides.x) - q.pads.x,
        i32(oh * q.strides.y) - q.pads.y,
        i32(ow * q.strides.z) - q.pads.z,
    );
}

fn dw_load(q: ConvParams, plane: u32, at: vec3<i32>) -> f32 {
    let dims = vec3<i32>(q.in_dims.xyz);
    if any(at < vec3<i32>(0)) || any(at >= dims) {
        return 0.0;
    }
    let u = vec3<u32>(at);
    return x[plane + (u.x * q.in_dims.y + u.y) * q.in_dims.z + u.z];
}

@compute @workgroup_size(256)
fn conv_depthwise_plain(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = dq;
    let img = wid.z + q.in_dims.w;
    let j = gid.x + gid.y * nwg.x * 256u;
    let per_image = q.cout * q.p;
    if j >= per_image { return; }
    let i = img * per_image + j;
    if i >= q.total { return; }
    let pos = j % q.p;
    let oc = j / q.p;
    let ci = oc / q.cout_g;
    let in_plane = q.in_dims.x * q.in_dims.y * q.in_dims.z;
    let plane = (img * q.cin + ci) * in_plane;
    let origin = dw_origin(q, pos);
    let kvol = q.kernel.x * q.kernel.y * q.kernel.z;
    // With a fused tail (activation.wgsl) `w` is its block: [BN parameters, eps, lo, hi, 0,
    // bias (Cout), the weights].
    var t = oc * kvol;
    if fused() {
        t += tail_base(q.cout) + 4u + q.cout;
    }
    var acc = 0.0;
    // The taps in conv_depthwise's order (t ascending), walked as nested loops: no division per
    // tap to split t into (kd, kh, kw).
    for (var kd = 0u; kd < q.kernel.x; kd++) {
        for (var kh = 0u; kh < q.kernel.y; kh++) {
            for (var kw = 0u; kw < q.kernel.z; kw++) {
                let off = vec3<i32>(i32(kd * q.dilations.x), i32(kh * q.dilations.y), i32(kw * q.dilations.z));
                acc += w[t] * dw_load(q, plane, origin + off);
                t++;
            }
        }
    }
    dw_write(q, i, oc, acc);
}

// Output i (channel oc) of a plain depthwise convolution, through the fused tail if any.
fn dw_write(q: ConvParams, i: u32, oc: u32, sum: f32) {
    var acc = sum;
    if fused() {
        let tb = tail_base(q.cout);
        if HAS_BIAS != 0u {
            acc += w[tb + 4u + oc];
        }
        var bn = vec4<f32>(0.0);
        if FUSE_BN != 0u {
            bn = vec4<f32>(w[oc], w[q.cout + oc], w[2u * q.cout + oc], w[3u * q.cout + oc]);
        }
        acc = fuse_tail(acc, bn, vec3<f32>(w[tb], w[tb + 1u], w[tb + 2u]));
    }
    dy_plain[i] = acc;
}

// conv_depthwise_rows: conv_depthwise_plain for CPU adapters (the lowering picks it where the
// context runs CPU variants, ops::conv): DW_RUN consecutive outputs of one output row per
// invocation, so each tap's weight, window row and bounds are found once for all of them.
// Same taps in the same order into one accumulator per output: the same values.
// Grid: grid_1d(Cout * output rows (d, h) * ceil(Wout / DW_RUN), 256) per image, one image per z.
const DW_RUN: u32 = 4u;

@compute @workgroup_size(256)
fn conv_depthwise_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = dq;
    let img = wid.z + q.in_dims.w;
    let j = gid.x + gid.y * nwg.x * 256u;
    let runs = (q.out_dims.z + DW_RUN - 1u) / DW_RUN;
    let rows = q.out_dims.x * q.out_dims.y;
    if j >= q.cout * rows * runs || img * q.cout * q.p >= q.total { return; }
    let run = j % runs;
    let rc = j / runs;
    let row = rc % rows;
    let oc = rc / rows;
    let ci = oc / q.cout_g;
    let od = row / q.out_dims.y;
    let oh = row - od * q.out_dims.y;
    let ow0 = run * DW_RUN;
    let in_dims = vec3<i32>(q.in_dims.xyz);
    let plane = (img * q.cin + ci) * q.in_dims.x * q.in_dims.y * q.in_dims.z;
    let base = vec3<i32>(i32(od * q.strides.x), i32(oh * q.strides.y), i32(ow0 * q.strides.z)) - q.pads.xyz;
    var t = oc * q.kernel.x * q.kernel.y * q.kernel.z;
    if fused() {
        t += tail_base(q.cout) + 4u + q.cout;
    }
    var acc = vec4<f32>(0.0);
    for (var kd = 0u; kd < q.kernel.x; kd++) {
        let id = base.x + i32(kd * q.dilations.x);
        for (var kh = 0u; kh < q.kernel.y; kh++) {
            let ih = base.y + i32(kh * q.dilations.y);
            let row_ok = id >= 0 && id < in_dims.x && ih >= 0 && ih < in_dims.y;
            let row_base = plane + (u32(max(id, 0)) * q.in_dims.y + u32(max(ih, 0))) * q.in_dims.z;
            for (var kw = 0u; kw < q.kernel.z; kw++) {
                let wt = w[t];
                t++;
                let iw0 = base.z + i32(kw * q.dilations.z);
                var v = vec4<f32>(0.0);
                for (var o = 0u; o < DW_RUN; o++) {
                    let iw = iw0 + i32(o * q.strides.z);
                    if row_ok && iw >= 0 && iw < in_dims.z {
                        v[o] = x[row_base + u32(iw)];
                    }
                }
                acc += wt * v;
            }
        }
    }
    let out_base = (img * q.cout + oc) * q.p + row * q.out_dims.z;
    for (var o = 0u; o < DW_RUN; o++) {
        let ow = ow0 + o;
        if ow >= q.out_dims.z { break; }
        dw_write(q, out_base + ow, oc, acc[o]);
    }
}

// ---------------------------------------------------------------------------------------------
// Reverse pass
// ---------------------------------------------------------------------------------------------

// 1 adds dX into the destination (a fanned-out tensor's other gradient is already there).
override ACCUM: u32 = 0u;
// 1 when every stride is 1 (conv_depthwise_dx): each tap's output position is its input
// offset itself, with no division or remainder per tap. The same taps in the same order.
override UNIT_STRIDE: u32 = 0u;

struct ConvDxParams {
    groups: u32,
    cin_g: u32,
    cout_g: u32,
    cin: u32,
    cout: u32,
    // Positions per input and per output image, N * Cin * p_in, and the stride phases (s^d).
    p_in: u32,
    p_out: u32,
    total: u32,
    phases: u32,
    in_dims: vec4<u32>,
    out_dims: vec4<u32>,
    kernel: vec4<u32>,
    strides: vec4<u32>,
    dilations: vec4<u32>,
    pads: vec4<i32>,
}

@group(0) @binding(0) var<storage, read> q: ConvDxParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;

// One spatial dim of one stride phase r (see the header).
struct DimPhase {
    // First input position of the phase and how many there are.
    x0: u32,
    n: u32,
    // First contributing tap, the tap step and how many taps contribute.
    k0: u32,
    step: u32,
    taps: u32,
    // o = base + q - j * c for position x0 + s * q and tap k0 + step * j.
    base: i32,
    c: i32,
}

fn gcd(a: u32, b: u32) -> u32 {
    var x = a;
    var y = b;
    loop {
        if y == 0u { break; }
        let t = x % y;
        x = y;
        y = t;
    }
    return x;
}

fn dim_phase(r: u32, size: u32, s: u32, k: u32, dil: u32, pad: i32) -> DimPhase {
    var d: DimPhase;
    d.x0 = (r + s - u32(pad) % s) % s;
    d.n = 0u;
    if d.x0 < size {
        d.n = (size - d.x0 + s - 1u) / s;
    }
    let g = gcd(dil, s);
    d.step = s / g;
    d.c = i32(dil / g);
    d.k0 = 0u;
    d.taps = 0u;
    // tap * dil mod s repeats with period step, so the first solution (if any) is below it.
    let scan = min(k, d.step);
    for (var t = 0u; t < scan; t++) {
        if (t * dil) % s == r {
            d.k0 = t;
            d.taps = (k - t + d.step - 1u) / d.step;
            break;
        }
    }
    // Exact: x0 + pad - k0 * dil is a multiple of s whenever the phase has taps.
    d.base = (i32(d.x0) + pad - i32(d.k0 * dil)) / i32(s);
    return d;
}

// Flat index over a (_, h, w) grid -> (d, h, w).
fn split3(i: u32, h: u32, w: u32) -> vec3<u32> {
    let hw = h * w;
    let a = i / hw;
    let r = i - a * hw;
    let b = r / w;
    return vec3<u32>(a, b, r - b * w);
}

@compute @workgroup_size(16, 16)
fn conv_gemm_dx(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) lidx: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    let row0 = wid.y * TILE;
    let col0 = wid.x * TILE;
    // in_dims.w: the first z workgroup of this piece of a dispatch split along z.
    let z = wid.z + q.in_dims.w;
    let ph = z % q.phases;
    let ig = z / q.phases;
    let img = ig / q.groups;
    let g = ig - img * q.groups;
    let r = split3(ph, q.strides.y, q.strides.z);
    let fd = dim_phase(r.x, q.in_dims.x, q.strides.x, q.kernel.x, q.dilations.x, q.pads.x);
    let fh = dim_phase(r.y, q.in_dims.y, q.strides.y, q.kernel.y, q.dilations.y, q.pads.y);
    let fw = dim_phase(r.z, q.in_dims.z, q.strides.z, q.kernel.z, q.dilations.z, q.pads.z);
    let np = fd.n * fh.n * fw.n;
    // Phases differ in size by at most one position per dim; the grid covers the widest.
    if col0 >= np { return; }
    let tvol = fd.taps * fh.taps * fw.taps;
    let kdim = q.cout_g * tvol;
    let kvol = q.kernel.x * q.kernel.y * q.kernel.z;
    let first_tap = vec3<u32>(fd.k0, fh.k0, fw.k0);
    let tap_step = vec3<u32>(fd.step, fh.step, fw.step);
    let o_step = vec3<i32>(fd.c, fh.c, fw.c);
    let w_base = g * q.cout_g * q.cin_g * kvol;
    let dy_base = (img * q.cout + g * q.cout_g) * q.p_out;
    let o_max = vec3<i32>(q.out_dims.xyz);

    let a_k = lidx % TILE_K;
    let a_m = lidx / TILE_K;
    // Each invocation gathers the dY column of one fixed input position.
    let b_n = lidx % TILE;
    let b_k = lidx / TILE;
    let col = col0 + b_n;
    let col_ok = col < np;
    let o_base = vec3<i32>(fd.base, fh.base, fw.base) + vec3<i32>(split3(col, fh.n, fw.n));

    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < kdim; k0 += TILE_K) {
        // A = W viewed as [ci, (co, phase tap)]: one (co, tap) per invocation, 4 rows of ci.
        let gk = k0 + a_k;
        let k_ok = gk < kdim;
        var w_off = 0u;
        if k_ok {
            let co = gk / tvol;
            let tap = first_tap + split3(gk - co * tvol, fh.taps, fw.taps) * tap_step;
            w_off = w_base + co * q.cin_g * kvol + (tap.x * q.kernel.y + tap.y) * q.kernel.z + tap.z;
        }
        for (var i = 0u; i < 4u; i++) {
            let mm = a_m + i * 16u;
            let gm = row0 + mm;
            var v = 0.0;
            if k_ok && gm < q.cin_g {
                v = w[w_off + gm * kvol];
            }
            a_tile[a_k * A_ROW + mm / 4u][mm % 4u] = v;
        }
        for (var i = 0u; i < 4u; i++) {
            let kk = b_k + i * 4u;
            let gkb = k0 + kk;
            var v = 0.0;
            if col_ok && gkb < kdim {
                let co = gkb / tvol;
                let j = split3(gkb - co * tvol, fh.taps, fw.taps);
                let o = o_base - vec3<i32>(j) * o_step;
                if all(o >= vec3<i32>(0)) && all(o < o_max) {
                    let u = vec3<u32>(o);
                    v = dy[dy_base + co * q.p_out + (u.x * q.out_dims.y + u.y) * q.out_dims.z + u.z];
                }
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

    // Every input position belongs to exactly one phase, so each dX element is written once
    // (zero when no tap reaches its phase).
    let x0 = vec3<u32>(fd.x0, fh.x0, fw.x0);
    for (var i = 0u; i < 4u; i++) {
        let gm = row0 + lid.y * 4u + i;
        if gm >= q.cin_g { break; }
        let plane = (img * q.cin + g * q.cin_g + gm) * q.p_in;
        for (var j = 0u; j < 4u; j++) {
            let gn = col0 + lid.x * 4u + j;
            if gn >= np { break; }
            let at = x0 + split3(gn, fh.n, fw.n) * q.strides.xyz;
            let idx = plane + (at.x * q.in_dims.y + at.y) * q.in_dims.z + at.z;
            var v = acc[i][j];
            if ACCUM != 0u {
                v += dx[idx];
            }
            dx[idx] = v;
        }
    }
}

// conv_gemm_dx_direct: conv_gemm_dx for CPU adapters, which the context compiles in its place
// (gpu::GpuContext::variant; matmul.wgsl's matmul_direct says why): the same grid and phases,
// 64x64 outputs per workgroup as 8x8 invocations of 8 input channels x 8 positions of the phase,
// W and dY read straight from their buffers. (co, phase tap) is walked as nested loops in
// conv_gemm_dx's k order, one accumulator per output: the same sums in the same order.
@compute @workgroup_size(8, 8)
fn conv_gemm_dx_direct(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    let z = wid.z + q.in_dims.w;
    let ph = z % q.phases;
    let ig = z / q.phases;
    let img = ig / q.groups;
    let g = ig - img * q.groups;
    let r = split3(ph, q.strides.y, q.strides.z);
    let fd = dim_phase(r.x, q.in_dims.x, q.strides.x, q.kernel.x, q.dilations.x, q.pads.x);
    let fh = dim_phase(r.y, q.in_dims.y, q.strides.y, q.kernel.y, q.dilations.y, q.pads.y);
    let fw = dim_phase(r.z, q.in_dims.z, q.strides.z, q.kernel.z, q.dilations.z, q.pads.z);
    let np = fd.n * fh.n * fw.n;
    let row0 = wid.y * TILE + lid.y * 8u;
    let col0 = wid.x * TILE + lid.x * 8u;
    if col0 >= np || row0 >= q.cin_g { return; }
    let kvol = q.kernel.x * q.kernel.y * q.kernel.z;
    let first_tap = vec3<u32>(fd.k0, fh.k0, fw.k0);
    let tap_step = vec3<u32>(fd.step, fh.step, fw.step);
    let o_step = vec3<i32>(fd.c, fh.c, fw.c);
    let w_base = g * q.cout_g * q.cin_g * kvol;
    let dy_base = (img * q.cout + g * q.cout_g) * q.p_out;
    let o_max = vec3<i32>(q.out_dims.xyz);
    var wrow: array<u32, 8>;
    var o_base: array<vec3<i32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        wrow[i] = w_base + min(row0 + i, q.cin_g - 1u) * kvol;
        o_base[i] = vec3<i32>(fd.base, fh.base, fw.base) + vec3<i32>(split3(min(col0 + i, np - 1u), fh.n, fw.n));
    }
    var lo: array<vec4<f32>, 8>;
    var hi: array<vec4<f32>, 8>;
    for (var co = 0u; co < q.cout_g; co++) {
        let w_co = co * q.cin_g * kvol;
        let dy_co = dy_base + co * q.p_out;
        for (var jd = 0u; jd < fd.taps; jd++) {
            for (var jh = 0u; jh < fh.taps; jh++) {
                for (var jw = 0u; jw < fw.taps; jw++) {
                    let j = vec3<u32>(jd, jh, jw);
                    let tap = first_tap + j * tap_step;
                    let w_off = w_co + (tap.x * q.kernel.y + tap.y) * q.kernel.z + tap.z;
                    var bv: array<f32, 8>;
                    for (var c = 0u; c < 8u; c++) {
                        let o = o_base[c] - vec3<i32>(j) * o_step;
                        var v = 0.0;
                        if all(o >= vec3<i32>(0)) && all(o < o_max) {
                            let u = vec3<u32>(o);
                            v = dy[dy_co + (u.x * q.out_dims.y + u.y) * q.out_dims.z + u.z];
                        }
                        bv[c] = v;
                    }
                    let b0 = vec4<f32>(bv[0], bv[1], bv[2], bv[3]);
                    let b1 = vec4<f32>(bv[4], bv[5], bv[6], bv[7]);
                    for (var i = 0u; i < 8u; i++) {
                        let av = w[wrow[i] + w_off];
                        lo[i] += av * b0;
                        hi[i] += av * b1;
                    }
                }
            }
        }
    }
    let x0 = vec3<u32>(fd.x0, fh.x0, fw.x0);
    for (var i = 0u; i < 8u; i++) {
        let gm = row0 + i;
        if gm >= q.cin_g { break; }
        let plane = (img * q.cin + g * q.cin_g + gm) * q.p_in;
        for (var j = 0u; j < 8u; j++) {
            let gn = col0 + j;
            if gn >= np { break; }
            let at = x0 + split3(gn, fh.n, fw.n) * q.strides.xyz;
            let idx = plane + (at.x * q.in_dims.y + at.y) * q.in_dims.z + at.z;
            var v = select(hi[i][j % 4u], lo[i][j], j < 4u);
            if ACCUM != 0u {
                v += dx[idx];
            }
            dx[idx] = v;
        }
    }
}

// The output index a tap reaches along one dim, from n = x + pad - tap * dilation (n >= 0), or
// -1 where it reaches none (n not a multiple of the stride, or past the output's size).
fn tap_reach(n: i32, s: u32, size: u32) -> i32 {
    var o = u32(n);
    if UNIT_STRIDE == 0u {
        if o % s != 0u { return -1; }
        o = o / s;
    }
    return select(i32(o), -1, o >= size);
}

@compute @workgroup_size(256)
fn conv_depthwise_dx(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    // One image per z workgroup (in_dims.w: the first z workgroup of this piece of a dispatch
    // split along z).
    let img = wid.z + q.in_dims.w;
    let j = gid.x + gid.y * nwg.x * 256u;
    let per_image = q.cin * q.p_in;
    if j >= per_image { return; }
    let i = img * per_image + j;
    if i >= q.total { return; }
    let pos = j % q.p_in;
    let ci = j / q.p_in;
    // Input channel ci feeds output channels ci * mult .. ci * mult + mult - 1.
    let mult = q.cout_g;
    let at = vec3<i32>(split3(pos, q.in_dims.y, q.in_dims.z)) + q.pads.xyz;
    let kvol = q.kernel.x * q.kernel.y * q.kernel.z;
    let w_base = ci * mult * kvol;
    let dy_base = (img * q.cout + ci * mult) * q.p_out;
    let s = q.strides.xyz;
    var acc = 0.0;
    // x + pad - tap * dil falls as the tap grows: once negative, no later tap reaches x.
    for (var kd = 0u; kd < q.kernel.x; kd++) {
        let nd = at.x - i32(kd * q.dilations.x);
        if nd < 0 { break; }
        let od = tap_reach(nd, s.x, q.out_dims.x);
        if od < 0 { continue; }
        for (var kh = 0u; kh < q.kernel.y; kh++) {
            let nh = at.y - i32(kh * q.dilations.y);
            if nh < 0 { break; }
            let oh = tap_reach(nh, s.y, q.out_dims.y);
            if oh < 0 { continue; }
            for (var kw = 0u; kw < q.kernel.z; kw++) {
                let nw = at.z - i32(kw * q.dilations.z);
                if nw < 0 { break; }
                let ow = tap_reach(nw, s.z, q.out_dims.z);
                if ow < 0 { continue; }
                let opos = (u32(od) * q.out_dims.y + u32(oh)) * q.out_dims.z + u32(ow);
                let tap = (kd * q.kernel.y + kh) * q.kernel.z + kw;
                for (var m = 0u; m < mult; m++) {
                    acc += w[w_base + m * kvol + tap] * dy[dy_base + m * q.p_out + opos];
                }
            }
        }
    }
    if ACCUM != 0u {
        acc += dx[i];
    }
    dx[i] = acc;
}

// conv_depthwise_dx_rows: conv_depthwise_dx for CPU adapters (the lowering picks it where the
// context runs CPU variants, ops::conv): DW_RUN consecutive input positions of one input row per
// invocation, so each (d, h) tap row's reach and each tap's index are found once for all of
// them. Each position adds the taps that reach it in conv_depthwise_dx's order: the same values.
// Grid: grid_1d(Cin * input rows (d, h) * ceil(Win / DW_RUN), 256) per image, one image per z.
@compute @workgroup_size(256)
fn conv_depthwise_dx_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let img = wid.z + q.in_dims.w;
    let j = gid.x + gid.y * nwg.x * 256u;
    let runs = (q.in_dims.z + DW_RUN - 1u) / DW_RUN;
    let rows = q.in_dims.x * q.in_dims.y;
    if j >= q.cin * rows * runs || img * q.cin * q.p_in >= q.total { return; }
    let run = j % runs;
    let rc = j / runs;
    let row = rc % rows;
    let ci = rc / rows;
    let iw0 = run * DW_RUN;
    let at = vec3<i32>(vec3<u32>(row / q.in_dims.y, row % q.in_dims.y, iw0)) + q.pads.xyz;
    let mult = q.cout_g;
    let kvol = q.kernel.x * q.kernel.y * q.kernel.z;
    let w_base = ci * mult * kvol;
    let dy_base = (img * q.cout + ci * mult) * q.p_out;
    let s = q.strides.xyz;
    var acc = vec4<f32>(0.0);
    for (var kd = 0u; kd < q.kernel.x; kd++) {
        let nd = at.x - i32(kd * q.dilations.x);
        if nd < 0 { break; }
        let od = tap_reach(nd, s.x, q.out_dims.x);
        if od < 0 { continue; }
        for (var kh = 0u; kh < q.kernel.y; kh++) {
            let nh = at.y - i32(kh * q.dilations.y);
            if nh < 0 { break; }
            let oh = tap_reach(nh, s.y, q.out_dims.y);
            if oh < 0 { continue; }
            let orow = (u32(od) * q.out_dims.y + u32(oh)) * q.out_dims.z;
            for (var kw = 0u; kw < q.kernel.z; kw++) {
                let tap = (kd * q.kernel.y + kh) * q.kernel.z + kw;
                for (var o = 0u; o < DW_RUN; o++) {
                    let nw = at.z + i32(o) - i32(kw * q.dilations.z);
                    let ow = tap_reach(max(nw, 0), s.z, q.out_dims.z);
                    if nw >= 0 && ow >= 0 {
                        for (var m = 0u; m < mult; m++) {
                            acc[o] += w[w_base + m * kvol + tap] * dy[dy_base + m * q.p_out + orow + u32(ow)];
                        }
                    }
                }
            }
        }
    }
    let base = (img * q.cin + ci) * q.p_in + row * q.in_dims.z;
    for (var o = 0u; o < DW_RUN; o++) {
        if iw0 + o >= q.in_dims.z { break; }
        var v = acc[o];
        if ACCUM != 0u {
            v += dx[base + iw0 + o];
        }
        dx[base + iw0 + o] = v;
    }
}
