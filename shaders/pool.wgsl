// Pooling: windowed MaxPool / AveragePool (one thread per output) and GlobalAveragePool (one
// workgroup per (n, c) plane, fixed-order tree reduction, so results are bit-reproducible).
//
// Windowed pools see 3 spatial dims (d, h, w); 1-D and 2-D inputs arrive with leading unit dims.

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

@group(0) @binding(0) var<uniform> p: PoolParams;
@group(0) @binding(0) var<uniform> gp: GlobalParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

// The most negative finite f32, ONNX Runtime's initial value for a max over an all-padding window.
const LOWEST: f32 = -3.40282347e38;

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
                if MAX == 1 { acc = max(acc, v); } else { acc += v; }
            }
        }
    }
    if MAX == 1 {
        y[i] = acc;
        return;
    }
    // The window is a box, so its tap count is the product of the per-dim counts. Counting the
    // padding means counting taps inside [-pad_begin, in + pad_end): with ceil_mode a window can
    // run past the end padding, and those taps never count.
    var lim = ind;
    var org = vec3<i32>(0);
    if p.count_include_pad != 0u {
        lim = ind + vec3<i32>(p.pad_end.xyz);
        org = vec3<i32>(p.pad_begin.xyz);
    }
    let count = taps_below(sd + org.x, p.kernel.x, p.dilations.x, lim.x + org.x)
        * taps_below(sh + org.y, p.kernel.y, p.dilations.y, lim.y + org.y)
        * taps_below(sw + org.z, p.kernel.z, p.dilations.z, lim.z + org.z);
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
