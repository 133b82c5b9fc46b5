// Pooling: windowed MaxPool / AveragePool (one thread per output) and GlobalAveragePool (one
// workgroup per (n, c) plane, fixed-order tree reduction, so results are bit-reproducible).
//
// Windowed pools see 3 spatial dims (d, h, w); 1-D and 2-D inputs arrive with leading unit dims.
//
// NaN and infinities: sums propagate them by IEEE arithmetic (inf + -inf = NaN), as in ONNX
// Runtime. MaxPool is the maximum of the window's taps, NaN when any tap is NaN (tested bit-wise:
// GPU max may drop it), -inf for a window of -inf only, and -FLT_MAX (ONNX Runtime's start
// value) only for a window wholly in the padding. ONNX Runtime's CPU MaxPool has no rule for
// either case: MLAS's 1-D kernel skips NaN and starts from -FLT_MAX; its 2-D vector kernel starts
// from the window's first row, and keeps or drops a NaN depending on the NaN's row in the window
// and on whether the column falls in a 4-wide vector block (measured by tools/nan_reference.py);
// ARM's vmaxq propagates NaN. Wherever ONNX Runtime returns NaN this kernel does too; windows
// where it drops the NaN, or answers -FLT_MAX for -inf, are the documented differences.

// 1 for MaxPool, 0 for AveragePool.
override MAX: i32 = 0;

struct PoolParams {
    n: u32,
    // AveragePool: divide by the window clipped to the padded input rather than to the input.
    count_include_pad: u32,
    _p0: u32,
    _p1: u32,
    in_dims: vec4<u32>,
    out_dims: vec4<u32>,
    kernel: vec4<u32>,
    strides: vec4<u32>,
    dilations: vec4<u32>,
    pad_begin: vec4<u32>,
    pad_end: vec4<u32>,
}

struct GlobalParams {
    planes: u32,
    plane: u32,
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<storage, read> p: PoolParams;
@group(0) @binding(0) var<storage, read> gp: GlobalParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

// The most negative finite f32, ONNX Runtime's initial value for a max over an all-padding window.
const LOWEST: f32 = -3.40282347e38;

fn is_nan(v: f32) -> bool {
    let b = bitcast<u32>(v);
    return (b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu) != 0u;
}

// Number of window taps that land in [0, limit) along one dim, where tap k sits at start + k * dil.
fn taps_below(start: i32, k: u32, dil: u32, limit: i32) -> u32 {
    var c = 0u;
    for (var i = 0u; i < k; i++) {
        let pos = start + i32(i * dil);
        if pos >= 0 && pos < limit { c++; }
    }
    return c;
}

@compute @workgroup_size(256)
fn pool_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.n { return; }
    let ow = i % p.out_dims.z;
    let oh = (i / p.out_dims.z) % p.out_dims.y;
    let od = (i / (p.out_dims.z * p.out_dims.y)) % p.out_dims.x;
    let plane = i / (p.out_dims.z * p.out_dims.y * p.out_dims.x);
    let base = plane * p.in_dims.x * p.in_dims.y * p.in_dims.z;
    let sd = i32(od * p.strides.x) - i32(p.pad_begin.x);
    let sh = i32(oh * p.strides.y) - i32(p.pad_begin.y);
    let sw = i32(ow * p.strides.z) - i32(p.pad_begin.z);
    let ind = vec3<i32>(p.in_dims.xyz);

    var acc = 0.0;
    if MAX == 1 { acc = LOWEST; }
    // MaxPool starts from the first tap, so -inf survives; the first NaN is kept apart so that
    // no later max can drop it.
    var first = true;
    var nan_seen = false;
    var nan_v = 0.0;
    for (var kd = 0u; kd < p.kernel.x; kd++) {
        let zd = sd + i32(kd * p.dilations.x);
        if zd < 0 || zd >= ind.x { continue; }
        for (var kh = 0u; kh < p.kernel.y; kh++) {
            let zh = sh + i32(kh * p.dilations.y);
            if zh < 0 || zh >= ind.y { continue; }
            let row = base + (u32(zd) * p.in_dims.y + u32(zh)) * p.in_dims.z;
            for (var kw = 0u; kw < p.kernel.z; kw++) {
                let zw = sw + i32(kw * p.dilations.z);
                if zw < 0 || zw >= ind.z { continue; }
                let v = x[row + u32(zw)];
                if MAX == 1 {
                    if is_nan(v) && !nan_seen {
                        nan_seen = true;
                        nan_v = v;
                    }
                    acc = select(max(acc, v), v, first);
                    first = false;
                } else {
                    acc += v;
                }
            }
        }
    }
    if MAX == 1 {
        y[i] = select(acc, nan_v, nan_seen);
        return;
    }
    let count = avg_count(sd, sh, sw);
    y[i] = select(0.0, acc / f32(count), count > 0u);
}

const WG: u32 = 256u;
var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn global_avg_main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let plane = wid.x + wid.y * nwg.x;
    // Uniform per workgroup, so returning here keeps the barriers below in uniform control flow.
    if plane >= gp.planes { return; }
    let base = plane * gp.plane;
    var acc = 0.0;
    for (var j = t; j < gp.plane; j += WG) {
        acc += x[base + j];
    }
    partial[t] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if t < s {
            partial[t] += partial[t + s];
        }
        workgroupBarrier();
    }
    if t == 0u {
        y[plane] = partial[0] / f32(gp.plane);
    }
}

// global_avg_lanes: global_avg_main for CPU adapters (ops/pool.rs picks it; the same values):
// one plane per invocation, 8 per workgroup, the main kernel's 256 strided partial sums and its
// tree in a private array, with no barrier (llvmpipe pays for each barrier with a switch through
// every invocation of the workgroup).
@compute @workgroup_size(8)
fn global_avg_lanes(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let plane = (wid.x + wid.y * nwg.x) * 8u + lane;
    if plane >= gp.planes { return; }
    let base = plane * gp.plane;
    var part: array<f32, 256>;
    for (var t = 0u; t < WG; t++) {
        var acc = 0.0;
        for (var j = t; j < gp.plane; j += WG) {
            acc += x[base + j];
        }
        part[t] = acc;
    }
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        for (var t = 0u; t < s; t++) {
            part[t] += part[t + s];
        }
    }
    y[plane] = part[0] / f32(gp.plane);
}

// ------------------------------------------------------------------------------------------------
// Reverse pass: gathers, one thread per input element, so no two threads write one gradient
// element and no atomics are needed; each thread sums its windows in a fixed order.
// ------------------------------------------------------------------------------------------------

// 1 to add into the gradient buffer, 0 to overwrite it.
override ACCUM: i32 = 0;

const NO_TAP: u32 = 0xffffffffu;

@group(0) @binding(2) var<storage, read_write> arg_out: array<u32>;
@group(0) @binding(1) var<storage, read> gy: array<f32>;
@group(0) @binding(2) var<storage, read> arg_in: array<u32>;
@group(0) @binding(3) var<storage, read_write> gx3: array<f32>;
@group(0) @binding(2) var<storage, read_write> gx2: array<f32>;

// MaxPool pass 1, one thread per output: the input offset of the window's first maximum in scan
// order (d, h, w), the element PyTorch and ONNX Runtime route the gradient to; NO_TAP for a
// window wholly in the padding.
@compute @workgroup_size(256)
fn maxpool_argmax_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.n { return; }
    let ow = i % p.out_dims.z;
    let oh = (i / p.out_dims.z) % p.out_dims.y;
    let od = (i / (p.out_dims.z * p.out_dims.y)) % p.out_dims.x;
    let plane = i / (p.out_dims.z * p.out_dims.y * p.out_dims.x);
    let base = plane * p.in_dims.x * p.in_dims.y * p.in_dims.z;
    let sd = i32(od * p.strides.x) - i32(p.pad_begin.x);
    let sh = i32(oh * p.strides.y) - i32(p.pad_begin.y);
    let sw = i32(ow * p.strides.z) - i32(p.pad_begin.z);
    let ind = vec3<i32>(p.in_dims.xyz);
    var best = 0.0;
    var at = NO_TAP;
    for (var kd = 0u; kd < p.kernel.x; kd++) {
        let zd = sd + i32(kd * p.dilations.x);
        if zd < 0 || zd >= ind.x { continue; }
        for (var kh = 0u; kh < p.kernel.y; kh++) {
            let zh = sh + i32(kh * p.dilations.y);
            if zh < 0 || zh >= ind.y { continue; }
            let row = base + (u32(zd) * p.in_dims.y + u32(zh)) * p.in_dims.z;
            for (var kw = 0u; kw < p.kernel.z; kw++) {
                let zw = sw + i32(kw * p.dilations.z);
                if zw < 0 || zw >= ind.z { continue; }
                let v = x[row + u32(zw)];
                // Strictly greater: a later equal value does not take over.
                if at == NO_TAP || v > best {
                    best = v;
                    at = row + u32(zw);
                }
            }
        }
    }
    arg_out[i] = at;
}

// The output index along one dim of the window whose tap k covers input coordinate z, or -1.
fn window_of(z: u32, k: u32, stride: u32, dil: u32, pad: u32, outs: u32) -> i32 {
    let t = i32(z + pad) - i32(k * dil);
    if t < 0 || (u32(t) % stride) != 0u { return -1; }
    let o = u32(t) / stride;
    return select(-1, i32(o), o < outs);
}

// AveragePool's divisor for the window starting at (sd, sh, sw), shared by the forward and the
// reverse pass. The window is a box, so its tap count is the product of the per-dim counts.
// Counting the padding means counting taps inside [-pad_begin, in + pad_end): with ceil_mode a
// window can run past the end padding, and those taps never count.
fn avg_count(sd: i32, sh: i32, sw: i32) -> u32 {
    let ind = vec3<i32>(p.in_dims.xyz);
    var lim = ind;
    var org = vec3<i32>(0);
    if p.count_include_pad != 0u {
        lim = ind + vec3<i32>(p.pad_end.xyz);
        org = vec3<i32>(p.pad_begin.xyz);
    }
    return taps_below(sd + org.x, p.kernel.x, p.dilations.x, lim.x + org.x)
        * taps_below(sh + org.y, p.kernel.y, p.dilations.y, lim.y + org.y)
        * taps_below(sw + org.z, p.kernel.z, p.dilations.z, lim.z + org.z);
}

// (plane, d, h, w) of input element i.
fn input_coords(i: u32) -> vec4<u32> {
    let zw = i % p.in_dims.z;
    let zh = (i / p.in_dims.z) % p.in_dims.y;
    let zd = (i / (p.in_dims.z * p.in_dims.y)) % p.in_dims.x;
    return vec4<u32>(i / (p.in_dims.z * p.in_dims.y * p.in_dims.x), zd, zh, zw);
}

// MaxPool pass 2, one thread per input element: the sum of dy over the windows whose first
// maximum this element is. Buffers: dy, the argmax offsets, dX.
@compute @workgroup_size(256)
fn maxpool_backward_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.n { return; }
    let z = input_coords(i);
    let obase = z.x * p.out_dims.x * p.out_dims.y * p.out_dims.z;
    var acc = 0.0;
    for (var kd = 0u; kd < p.kernel.x; kd++) {
        let od = window_of(z.y, kd, p.strides.x, p.dilations.x, p.pad_begin.x, p.out_dims.x);
        if od < 0 { continue; }
        for (var kh = 0u; kh < p.kernel.y; kh++) {
            let oh = window_of(z.z, kh, p.strides.y, p.dilations.y, p.pad_begin.y, p.out_dims.y);
            if oh < 0 { continue; }
            for (var kw = 0u; kw < p.kernel.z; kw++) {
                let ow = window_of(z.w, kw, p.strides.z, p.dilations.z, p.pad_begin.z, p.out_dims.z);
                if ow < 0 { continue; }
                let o = obase + (u32(od) * p.out_dims.y + u32(oh)) * p.out_dims.z + u32(ow);
                if arg_in[o] == i { acc += gy[o]; }
            }
        }
    }
    if ACCUM == 1 { acc = gx3[i] + acc; }
    gx3[i] = acc;
}

// AveragePool, one thread per input element: the sum of dy / count over the windows that cover
// it (padding taps never cover an input element, whatever count_include_pad says about the
// divisor). Buffers: dy, dX.
@compute @workgroup_size(256)
fn avgpool_backward_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.n { return; }
    let z = input_coords(i);
    let obase = z.x * p.out_dims.x * p.out_dims.y * p.out_dims.z;
    var acc = 0.0;
    for (var kd = 0u; kd < p.kernel.x; kd++) {
        let od = window_of(z.y, kd, p.strides.x, p.dilations.x, p.pad_begin.x, p.out_dims.x);
        if od < 0 { continue; }
        let sd = od * i32(p.strides.x) - i32(p.pad_begin.x);
        for (var kh = 0u; kh < p.kernel.y; kh++) {
            let oh = window_of(z.z, kh, p.strides.y, p.dilations.y, p.pad_begin.y, p.out_dims.y);
            if oh < 0 { continue; }
            let sh = oh * i32(p.strides.y) - i32(p.pad_begin.y);
            for (var kw = 0u; kw < p.kernel.z; kw++) {
                let ow = window_of(z.w, kw, p.strides.z, p.dilations.z, p.pad_begin.z, p.out_dims.z);
                if ow < 0 { continue; }
                let sw = ow * i32(p.strides.z) - i32(p.pad_begin.z);
                let o = obase + (u32(od) * p.out_dims.y + u32(oh)) * p.out_dims.z + u32(ow);
                acc += gy[o] / f32(avg_count(sd, sh, sw));
            }
        }
    }
    if ACCUM == 1 { acc = gx2[i] + acc; }
    gx2[i] = acc;
}

// GlobalAveragePool: dX = dy / plane, broadcast over the plane. Buffers: dy, dX.
@compute @workgroup_size(256)
fn global_avg_backward_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= gp.planes * gp.plane { return; }
    var v = gy[i / gp.plane] / f32(gp.plane);
    if ACCUM == 1 { v = gx2[i] + v; }
    gx2[i] = v;
}
