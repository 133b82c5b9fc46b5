// Data movement: one strided copy kernel (Transpose, Slice, Concat, Split) and Pad.
//
// Elements move as raw 32-bit words, so every float bit pattern (NaN payloads, -0.0) survives.
// Flat index: gid.x + gid.y * (num_workgroups.x * 256), so more than 65 535 workgroups fit
// (see gpu::grid_1d).

// Pad modes (override MODE).
const PAD_CONSTANT: i32 = 0;
const PAD_REFLECT: i32 = 1;
const PAD_EDGE: i32 = 2;

override MODE: i32 = 0;

// dst[dst_offset + Σ idx·dst_strides] = src[src_offset + Σ idx·src_strides] for every index of
// `shape`; source strides are signed (Slice with negative steps walks backwards).
struct CopyParams {
    n: u32,
    rank: u32,
    src_offset: i32,
    dst_offset: u32,
    shape0: vec4<u32>,
    shape1: vec4<u32>,
    src_strides0: vec4<i32>,
    src_strides1: vec4<i32>,
    dst_strides0: vec4<u32>,
    dst_strides1: vec4<u32>,
}

// Output coordinate o reads input coordinate o - begin; outside the input, MODE decides.
struct PadParams {
    n: u32,
    rank: u32,
    value: f32,
    _pad: u32,
    out_shape0: vec4<u32>,
    out_shape1: vec4<u32>,
    in_shape0: vec4<u32>,
    in_shape1: vec4<u32>,
    in_strides0: vec4<u32>,
    in_strides1: vec4<u32>,
    begin0: vec4<i32>,
    begin1: vec4<i32>,
}

@group(0) @binding(0) var<storage, read> cp: CopyParams;
@group(0) @binding(0) var<storage, read> pp: PadParams;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

fn lane_u(v0: vec4<u32>, v1: vec4<u32>, d: u32) -> u32 {
    if d < 4u { return v0[d]; }
    return v1[d - 4u];
}

fn lane_i(v0: vec4<i32>, v1: vec4<i32>, d: u32) -> i32 {
    if d < 4u { return v0[d]; }
    return v1[d - 4u];
}

@compute @workgroup_size(256)
fn copy_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if i >= cp.n { return; }
    var rem = i;
    var s = cp.src_offset;
    var d = cp.dst_offset;
    for (var k = i32(cp.rank) - 1; k >= 0; k--) {
        let ku = u32(k);
        let size = lane_u(cp.shape0, cp.shape1, ku);
        let idx = rem % size;
        rem = rem / size;
        s += i32(idx) * lane_i(cp.src_strides0, cp.src_strides1, ku);
        d += idx * lane_u(cp.dst_strides0, cp.dst_strides1, ku);
    }
    dst[d] = src[u32(s)];
}

// Source coordinate along one axis of size m, or -1 for the constant fill.
fn pad_coord(c: i32, m: i32) -> i32 {
    if c >= 0 && c < m { return c; }
    switch MODE {
        case PAD_REFLECT: {
            // Reflection without repeating the edge has period 2(m-1).
            if m == 1 { return 0; }
            let p = 2 * (m - 1);
            var r = c % p;
            if r < 0 { r += p; }
            return select(r, p - r, r >= m);
        }
        case PAD_EDGE: { return clamp(c, 0, m - 1); }
        default: { return -1; }
    }
}

@compute @workgroup_size(256)
fn pad_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if i >= pp.n { return; }
    var rem = i;
    var s = 0u;
    for (var k = i32(pp.rank) - 1; k >= 0; k--) {
        let ku = u32(k);
        let size = lane_u(pp.out_shape0, pp.out_shape1, ku);
        let o = rem % size;
        rem = rem / size;
        let m = i32(lane_u(pp.in_shape0, pp.in_shape1, ku));
        let c = pad_coord(i32(o) - lane_i(pp.begin0, pp.begin1, ku), m);
        if c < 0 {
            dst[i] = bitcast<u32>(pp.value);
            return;
        }
        s += u32(c) * lane_u(pp.in_strides0, pp.in_strides1, ku);
    }
    dst[i] = src[s];
}

// ------------------------------------------------------------------------------------------------
// Reverse pass. Transpose, Slice, Concat and Split run their forward copies backwards (dY read
// through the forward's destination strides, dX written through its source strides, which the
// lowering makes non-negative); no two threads of one dispatch write the same element. Pad is a
// gather per dX element: constant mode in one pass over all axes, reflect and edge one axis at a
// time, each folding the border gradients back onto the elements they were copied from.
// ------------------------------------------------------------------------------------------------

// 1 to add into the gradient buffer, 0 to overwrite it.
override ACCUM: i32 = 0;

@group(0) @binding(1) var<storage, read> gsrc: array<f32>;
@group(0) @binding(2) var<storage, read_write> gdst: array<f32>;
@group(0) @binding(1) var<storage, read_write> fill_dst: array<u32>;

fn store_grad(i: u32, v: f32) {
    if ACCUM == 1 {
        gdst[i] = gdst[i] + v;
    } else {
        gdst[i] = v;
    }
}

// copy_main's walk, adding instead of copying bits.
@compute @workgroup_size(256)
fn copy_add_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if i >= cp.n { return; }
    var rem = i;
    var s = cp.src_offset;
    var d = cp.dst_offset;
    for (var k = i32(cp.rank) - 1; k >= 0; k--) {
        let ku = u32(k);
        let size = lane_u(cp.shape0, cp.shape1, ku);
        let idx = rem % size;
        rem = rem / size;
        s += i32(idx) * lane_i(cp.src_strides0, cp.src_strides1, ku);
        d += idx * lane_u(cp.dst_strides0, cp.dst_strides1, ku);
    }
    gdst[d] = gdst[d] + gsrc[u32(s)];
}

struct FillParams {
    n: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<storage, read> zp: FillParams;

// Zeroes zp.n words (the gradient of elements no output gradient reaches).
@compute @workgroup_size(256)
fn fill_zero_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if i >= zp.n { return; }
    fill_dst[i] = 0u;
}

// Constant-mode Pad: dX element c reads dY at c + begin, or nothing where negative pads cropped
// it. Uses PadParams with n = dX's size, out = dY's shape, in = dX's shape, in_strides = dY's.
@compute @workgroup_size(256)
fn pad_backward_constant_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if i >= pp.n { return; }
    var rem = i;
    var s = 0u;
    var inside = true;
    for (var k = i32(pp.rank) - 1; k >= 0; k--) {
        let ku = u32(k);
        let m = lane_u(pp.in_shape0, pp.in_shape1, ku);
        let c = rem % m;
        rem = rem / m;
        let o = i32(c) + lane_i(pp.begin0, pp.begin1, ku);
        if o < 0 || o >= i32(lane_u(pp.out_shape0, pp.out_shape1, ku)) {
            inside = false;
        } else {
            s += u32(o) * lane_u(pp.in_strides0, pp.in_strides1, ku);
        }
    }
    var v = 0.0;
    if inside { v = gsrc[s]; }
    store_grad(i, v);
}

// One axis of a reflect / edge Pad's reverse: the tensor is [outer, out_len, inner] and becomes
// [outer, m, inner]; element c of the axis sums, in increasing output order, every output
// position whose source coordinate (pad_coord) is c. Only the border positions can map
// anywhere but c + begin, so only they are scanned.
struct FoldParams {
    n: u32,
    out_len: u32,
    m: u32,
    inner: u32,
    begin: i32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<storage, read> fp: FoldParams;

@compute @workgroup_size(256)
fn pad_fold_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if i >= fp.n { return; }
    let inner_i = i % fp.inner;
    let c = i32((i / fp.inner) % fp.m);
    let outer_i = i / (fp.inner * fp.m);
    let base = outer_i * fp.out_len * fp.inner + inner_i;
    let m = i32(fp.m);
    let out_len = i32(fp.out_len);
    // Output positions [0, begin) and [begin + m, out_len) are border; begin + c is the copy.
    let left_end = clamp(fp.begin, 0, out_len);
    let right_start = clamp(fp.begin + m, 0, out_len);
    var acc = 0.0;
    for (var o = 0; o < left_end; o++) {
        if pad_coord(o - fp.begin, m) == c { acc += gsrc[base + u32(o) * fp.inner]; }
    }
    let own = c + fp.begin;
    if own >= 0 && own < out_len { acc += gsrc[base + u32(own) * fp.inner]; }
    for (var o = right_start; o < out_len; o++) {
        if pad_coord(o - fp.begin, m) == c { acc += gsrc[base + u32(o) * fp.inner]; }
    }
    store_grad(i, acc);
}

// Packing for kernels over the downlevel budget of 4 storage buffers per stage (phone GPUs,
// `wgpu::Limits::downlevel_defaults()`): gather3 copies up to three small buffers into one at
// word offsets, scatter2 copies two ranges of one buffer out, so a kernel binds one packed buffer
// where it would bind several. Words move unchanged, so results stay bit-identical.
// A source with n = 0 is not read (bind any buffer there).
struct PackParams {
    n0: u32,
    n1: u32,
    n2: u32,
    _p0: u32,
    off0: u32,
    off1: u32,
    off2: u32,
    _p1: u32,
}

// Four storage buffers besides the block: it is a uniform block, staged through workgroup
// memory (see runtime/src/gpu/params.rs).
@group(0) @binding(0) var<uniform> kp_in: PackParams;
var<workgroup> kp: PackParams;
@group(0) @binding(1) var<storage, read> pk_a: array<u32>;
@group(0) @binding(2) var<storage, read> pk_b: array<u32>;
@group(0) @binding(3) var<storage, read> pk_c: array<u32>;
@group(0) @binding(4) var<storage, read_write> pk_dst: array<u32>;

@compute @workgroup_size(256)
fn gather3(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) pli: u32,
) {
    if pli == 0u {
        kp = kp_in;
    }
    workgroupBarrier();
    let i = flat(gid, nwg);
    if i < kp.n0 { pk_dst[kp.off0 + i] = pk_a[i]; }
    if i < kp.n1 { pk_dst[kp.off1 + i] = pk_b[i]; }
    if i < kp.n2 { pk_dst[kp.off2 + i] = pk_c[i]; }
}

@group(0) @binding(1) var<storage, read> sc_src: array<u32>;
@group(0) @binding(2) var<storage, read_write> sc_a: array<u32>;
@group(0) @binding(3) var<storage, read_write> sc_b: array<u32>;

@compute @workgroup_size(256)
fn scatter2(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) pli: u32,
) {
    if pli == 0u {
        kp = kp_in;
    }
    workgroupBarrier();
    let i = flat(gid, nwg);
    if i < kp.n0 { sc_a[i] = sc_src[kp.off0 + i]; }
    if i < kp.n1 { sc_b[i] = sc_src[kp.off1 + i]; }
}

// Gather along an axis by a list of indices (Gather of run-time data with constant indices, when
// they do not come in a few runs of consecutive values: a relative-position bias table read
// through its [N², heads] index): out[(o·count + i)·inner + j] = data[(o·dim + idx[i])·inner + j].
// The indices arrive as floats (exact below 2^24, which the lowering checks); negative ones count
// from the end of the axis.
struct GatherParams {
    n: u32,
    count: u32,
    dim: u32,
    inner: u32,
}

@group(0) @binding(0) var<storage, read> gp: GatherParams;
@group(0) @binding(1) var<storage, read> gather_data: array<u32>;
@group(0) @binding(2) var<storage, read> gather_idx: array<f32>;
@group(0) @binding(3) var<storage, read_write> gather_out: array<u32>;
@group(0) @binding(1) var<storage, read> gather_dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> gather_dx: array<f32>;

fn gather_row(i: u32) -> u32 {
    let v = i32(gather_idx[i]);
    if v < 0 { return u32(v + i32(gp.dim)); }
    return u32(v);
}

@compute @workgroup_size(256)
fn gather_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = flat(gid, nwg);
    if e >= gp.n { return; }
    let j = e % gp.inner;
    let t = e / gp.inner;
    let i = t % gp.count;
    let o = t / gp.count;
    gather_out[e] = gather_data[(o * gp.dim + gather_row(i)) * gp.inner + j];
}

// dData of that Gather, one invocation per data element (gp.n = outer·dim·inner): the sum, in
// index order, of the output gradients at every position whose index is this element's row, so
// repeated indices add without atomics.
fn gather_backward_sum(e: u32) -> f32 {
    let j = e % gp.inner;
    let t = e / gp.inner;
    let r = t % gp.dim;
    let o = t / gp.dim;
    var acc = 0.0;
    for (var i = 0u; i < gp.count; i++) {
        if gather_row(i) == r {
            acc += gather_dy[(o * gp.count + i) * gp.inner + j];
        }
    }
    return acc;
}

@compute @workgroup_size(256)
fn gather_backward_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = flat(gid, nwg);
    if e >= gp.n { return; }
    var v = gather_backward_sum(e);
    if ACCUM == 1 { v = gather_dx[e] + v; }
    gather_dx[e] = v;
}

// ScatterND (reduction none) on run-time data, with constant positions: the updates' element k
// lands at flat position pos[k] of the output (a copy of the data), or nowhere where pos[k] is
// -1 (a later index overwrites it). Positions arrive as exact floats (below 2^24).
struct ScatterParams {
    n: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<storage, read> sp: ScatterParams;
@group(0) @binding(1) var<storage, read> scatter_src: array<u32>;
@group(0) @binding(2) var<storage, read> scatter_pos: array<f32>;
@group(0) @binding(3) var<storage, read_write> scatter_dst: array<u32>;
@group(0) @binding(1) var<storage, read> scatter_zero_pos: array<f32>;
@group(0) @binding(2) var<storage, read_write> scatter_zero_dst: array<u32>;
@group(0) @binding(1) var<storage, read> scatter_dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> scatter_dupd: array<f32>;

// dst[pos[k]] = src[k] (the forward's updates).
@compute @workgroup_size(256)
fn scatter_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let k = flat(gid, nwg);
    if k >= sp.n { return; }
    let p = i32(scatter_pos[k]);
    if p >= 0 { scatter_dst[u32(p)] = scatter_src[k]; }
}

// dst[pos[k]] = 0: the data's gradient is dY except where an update overwrote the data.
@compute @workgroup_size(256)
fn scatter_zero_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let k = flat(gid, nwg);
    if k >= sp.n { return; }
    let p = i32(scatter_zero_pos[k]);
    if p >= 0 { scatter_zero_dst[u32(p)] = 0u; }
}

// The updates' gradient: dY at each update's position, 0 for an overwritten one.
@compute @workgroup_size(256)
fn scatter_grad_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let k = flat(gid, nwg);
    if k >= sp.n { return; }
    let p = i32(scatter_pos[k]);
    var v = 0.0;
    if p >= 0 { v = scatter_dy[u32(p)]; }
    if ACCUM == 1 { v = scatter_dupd[k] + v; }
    scatter_dupd[k] = v;
}
