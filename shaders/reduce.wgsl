// ReduceMean, ReduceSum, ReduceMax and ReduceMin over any set of axes, in a fixed order
// (bit-reproducible, no atomics).
//
// The input's non-unit dims are split into kept dims (which index the output, row major) and
// reduced dims (which index the elements of one output's sum), each with its input strides.

struct ReduceParams {
    n_out: u32,
    n_red: u32,
    kept_rank: u32,
    red_rank: u32,
    kept0: vec4<u32>,
    kept1: vec4<u32>,
    kept_s0: vec4<u32>,
    kept_s1: vec4<u32>,
    red0: vec4<u32>,
    red1: vec4<u32>,
    red_s0: vec4<u32>,
    red_s1: vec4<u32>,
}

@group(0) @binding(0) var<storage, read> p: ReduceParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

fn lane(v0: vec4<u32>, v1: vec4<u32>, d: u32) -> u32 {
    if d < 4u { return v0[d]; }
    return v1[d - 4u];
}

// Input offset of the first element reduced into output `o`.
fn out_base(o: u32) -> u32 {
    var rem = o;
    var off = 0u;
    for (var d = i32(p.kept_rank) - 1; d >= 0; d--) {
        let du = u32(d);
        let s = lane(p.kept0, p.kept1, du);
        off += (rem % s) * lane(p.kept_s0, p.kept_s1, du);
        rem /= s;
    }
    return off;
}

// Offset of the `r`th reduced element relative to its output's base.
fn red_offset(r: u32) -> u32 {
    var rem = r;
    var off = 0u;
    for (var d = i32(p.red_rank) - 1; d >= 0; d--) {
        let du = u32(d);
        let s = lane(p.red0, p.red1, du);
        off += (rem % s) * lane(p.red_s0, p.red_s1, du);
        rem /= s;
    }
    return off;
}

// 1: ReduceSum (the sum itself); 0: ReduceMean (the sum divided by the count).
override SUM: i32 = 0;
// 0: a sum (SUM says which); 1: ReduceMax; 2: ReduceMin. Max and min propagate NaN, as the ONNX
// reference (numpy) does.
override MODE: i32 = 0;

fn start() -> f32 {
    if MODE == 0 { return 0.0; }
    // ±inf, the identity of max and min (built at run time: a constant inf is a shader error).
    return bitcast<f32>(0x7f800000u | (p.n_red & 0u)) * select(-1.0, 1.0, MODE == 2);
}

// Bit-wise: compilers may fold `v != v` to false (lavapipe's LLVM does).
fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

fn combine(acc: f32, v: f32) -> f32 {
    if MODE == 0 { return acc + v; }
    // NaN wins, the first one met.
    if is_nan(acc) { return acc; }
    if is_nan(v) { return v; }
    if MODE == 1 { return max(acc, v); }
    return min(acc, v);
}

fn finish(acc: f32) -> f32 {
    if MODE != 0 || SUM == 1 { return acc; }
    return acc / f32(p.n_red);
}

// Output `o`'s reduction (before `finish`), by one thread in element order.
fn reduce_serial(base: u32) -> f32 {
    var acc = start();
    for (var r = 0u; r < p.n_red; r++) {
        acc = combine(acc, x[base + red_offset(r)]);
    }
    return acc;
}

@compute @workgroup_size(256)
fn mean_thread_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let o = gid.x + gid.y * nwg.x * 256u;
    if o >= p.n_out { return; }
    y[o] = finish(reduce_serial(out_base(o)));
}

const WG: u32 = 256u;
var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn mean_wg_main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let o = wid.x + wid.y * nwg.x;
    // Uniform per workgroup, so the barriers below stay in uniform control flow.
    if o >= p.n_out { return; }
    let base = out_base(o);
    var acc = start();
    for (var r = t; r < p.n_red; r += WG) {
        acc = combine(acc, x[base + red_offset(r)]);
    }
    partial[t] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if t < s {
            partial[t] = combine(partial[t], partial[t + s]);
        }
        workgroupBarrier();
    }
    if t == 0u {
        y[o] = finish(partial[0]);
    }
}

// ------------------------------------------------------------------------------------------------
// Reverse pass: dX = dY / n_red broadcast back over the reduced dims, one thread per input
// element. The input's dims arrive merged into runs (unit dims dropped), each with its stride in
// dY: 0 for a reduced run, the row-major stride over the kept dims otherwise.
// ------------------------------------------------------------------------------------------------

// 1 to add into the gradient buffer, 0 to overwrite it.
override ACCUM: i32 = 0;

struct MeanGradParams {
    n: u32,
    rank: u32,
    n_red: u32,
    _p0: u32,
    shape0: vec4<u32>,
    shape1: vec4<u32>,
    dy_strides0: vec4<u32>,
    dy_strides1: vec4<u32>,
}

@group(0) @binding(0) var<storage, read> gp: MeanGradParams;
@group(0) @binding(1) var<storage, read> gy: array<f32>;
@group(0) @binding(2) var<storage, read_write> gx: array<f32>;

// The dY element input element `i` was reduced into.
fn dy_index(i: u32) -> u32 {
    var rem = i;
    var o = 0u;
    for (var d = i32(gp.rank) - 1; d >= 0; d--) {
        let du = u32(d);
        let s = lane(gp.shape0, gp.shape1, du);
        o += (rem % s) * lane(gp.dy_strides0, gp.dy_strides1, du);
        rem /= s;
    }
    return o;
}

@compute @workgroup_size(256)
fn mean_backward_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= gp.n { return; }
    let o = dy_index(i);
    // Divided, not multiplied by a reciprocal, as the forward divides its sum; ReduceSum's
    // gradient is dY itself.
    var v = gy[o];
    if SUM == 0 { v = v / f32(gp.n_red); }
    if ACCUM == 1 { v = gx[i] + v; }
    gx[i] = v;
}

// ------------------------------------------------------------------------------------------------
// Reverse pass of ReduceMax and ReduceMin (torch's amax/amin rule): dY is shared evenly among the
// elements equal to the extreme. Two passes with at most four storage buffers each (phone GPUs'
// limit): extreme_ties_main recomputes each output's extreme from X (one thread per output, the
// forward's order) and stores it with dY divided by the number of elements that reach it;
// extreme_backward_main gives each input element its share, or 0. A NaN extreme matches nothing.
// ------------------------------------------------------------------------------------------------

@group(0) @binding(2) var<storage, read> ties_dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> ties: array<f32>;

@compute @workgroup_size(256)
fn extreme_ties_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let o = gid.x + gid.y * nwg.x * 256u;
    if o >= p.n_out { return; }
    let base = out_base(o);
    let m = reduce_serial(base);
    var count = 0u;
    for (var r = 0u; r < p.n_red; r++) {
        if x[base + red_offset(r)] == m { count += 1u; }
    }
    ties[2u * o] = m;
    ties[2u * o + 1u] = select(0.0, ties_dy[o] / f32(count), count > 0u);
}

@group(0) @binding(1) var<storage, read> ex_x: array<f32>;
@group(0) @binding(2) var<storage, read> ex_ties: array<f32>;
@group(0) @binding(3) var<storage, read_write> ex_dx: array<f32>;

@compute @workgroup_size(256)
fn extreme_backward_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= gp.n { return; }
    let o = dy_index(i);
    var v = select(0.0, ex_ties[2u * o + 1u], ex_x[i] == ex_ties[2u * o]);
    if ACCUM == 1 { v = ex_dx[i] + v; }
    ex_dx[i] = v;
}
