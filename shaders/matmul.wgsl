// Batched, strided matrix product: out[b] = alpha * A[b] @ B[b] + beta * C[b].
//
// One kernel serves MatMul, Gemm and 1x1 convolutions. Every operand is addressed through
// strides, so transposes cost nothing (Gemm's transA/transB swap the row and column strides), a
// broadcast batch or bias dimension is a zero stride (a 1x1 convolution's weight has batch stride
// 0 across images; Gemm's C broadcasts with zero row or column strides), and the output is always
// contiguous [batch, M, N].
//
// Tiling: a 16x16 workgroup computes a 64x64 output tile, 4x4 outputs per invocation, walking K in
// steps of 16. Each step stages a 64x16 slice of A and a 16x64 slice of B in workgroup memory
// (8.5 KiB in all, inside the 16 KiB and 256 invocations that mobile GPUs guarantee); every
// invocation then reads one vec4 of A and one of B per k and does 16 FMAs. Loads outside the
// matrices read as zero, so M, N and K need not be multiples of the tile.
//
// Grid: x = ceil(N / 64), y = ceil(M / 64), z = batch.
//
// The reverse pass runs the same kernel on transposed views (dA = dY @ B^T is a stride swap) with
// ACCUM = 1 when the gradient must be added to what another consumer already wrote there.
//
// reduce_broadcast: dst[i] (+)= scale * sum over the broadcast dims of src, for gradients of
// operands that were broadcast in the forward pass (a batch-broadcast MatMul operand, Gemm's C).
// One invocation per destination element loops over the reduced entries in a fixed order, so the
// sum is bit-reproducible (no atomics). Grid: grid_1d(dst elements, 256).

const TILE: u32 = 64u;
const TILE_K: u32 = 16u;
// A's staging rows hold 16 vec4 (64 values of M) plus one vec4 of padding, so the 16 invocations
// that store consecutive k of one row hit different memory banks.
const A_ROW: u32 = 17u;

// 1 when C (bias) is bound and added; 0 binds a dummy buffer that is never read.
override HAS_BIAS: u32 = 0u;
// 1 adds the result into the destination instead of overwriting it.
override ACCUM: u32 = 0u;

struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    // Number of batch dims in use (0 to 4); the batch index is wid.z decomposed over them.
    batch_rank: u32,
    // Element strides of A along M and K, of B along K and N, of C along M and N.
    a_rs: u32,
    a_cs: u32,
    b_rs: u32,
    b_cs: u32,
    c_rs: u32,
    c_cs: u32,
    alpha: f32,
    beta: f32,
    batch_shape: vec4<u32>,
    // Per-batch-dim element strides, 0 on broadcast dims.
    a_bs: vec4<u32>,
    b_bs: vec4<u32>,
    c_bs: vec4<u32>,
    // The first batch index (z workgroup) of this piece of a dispatch split along z.
    z_base: u32,
}

@group(0) @binding(0) var<uniform> p_in: MatmulParams;
// Staged through workgroup memory at the top of every entry point that reads it (see
// runtime/src/gpu/params.rs): a uniform block, so it does not count against the 4 storage buffers
// per stage of downlevel (phone) limits, that lavapipe cannot inline.
var<workgroup> p: MatmulParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> c: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// a_tile[k * A_ROW + i] holds rows 4i..4i+3 of the A slice at k; b_tile[k * 16 + j] holds
// columns 4j..4j+3 of the B slice at k.
var<workgroup> a_tile: array<vec4<f32>, 272>;
var<workgroup> b_tile: array<vec4<f32>, 256>;

// The element offsets of batch z's A, B and C (z decomposed over the batch dims, last fastest).
fn batch_offsets(z: u32) -> vec3<u32> {
    var rem = z;
    var off = vec3<u32>(0u);
    for (var d = i32(p.batch_rank) - 1; d >= 0; d--) {
        let s = p.batch_shape[d];
        let i = rem % s;
        rem = rem / s;
        off += i * vec3<u32>(p.a_bs[d], p.b_bs[d], p.c_bs[d]);
    }
    return off;
}

// Output (gm, gn) of the batch at out_off: alpha * sum, plus beta * C (HAS_BIAS), plus what is
// there (ACCUM). A 1x1 convolution with a fused tail (activation.wgsl) binds its block as C:
// row gm is output channel gm, its bias at the block's constants + 4.
fn write_out(out_off: u32, c_off: u32, gm: u32, gn: u32, sum: f32) {
    var v = p.alpha * sum;
    if fused() {
        let t = tail_base(p.m);
        if HAS_BIAS != 0u {
            v += p.beta * c[t + 4u + gm];
        }
        var bn = vec4<f32>(0.0);
        if FUSE_BN != 0u {
            bn = vec4<f32>(c[gm], c[p.m + gm], c[2u * p.m + gm], c[3u * p.m + gm]);
        }
        out[out_off + gm * p.n + gn] = fuse_tail(v, bn, vec3<f32>(c[t], c[t + 1u], c[t + 2u]));
        return;
    }
    if HAS_BIAS != 0u {
        v += p.beta * c[c_off + gm * p.c_rs + gn * p.c_cs];
    }
    let o = out_off + gm * p.n + gn;
    if ACCUM != 0u {
        v += out[o];
    }
    out[o] = v;
}

@compute @workgroup_size(16, 16)
fn matmul_main(
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

    let z = wid.z + p.z_base;
    let offs = batch_offsets(z);
    let a_off = offs.x;
    let b_off = offs.y;
    let c_off = offs.z;

    // A loads walk K fastest (contiguous for row-major A); B loads walk N fastest.
    let a_k = lidx % TILE_K;
    let a_m = lidx / TILE_K;
    let b_n = lidx % TILE;
    let b_k = lidx / TILE;

    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < p.k; k0 += TILE_K) {
        let gk = k0 + a_k;
        for (var r = 0u; r < 4u; r++) {
            let mm = a_m + r * 16u;
            let gm = row0 + mm;
            var v = 0.0;
            if gm < p.m && gk < p.k {
                v = a[a_off + gm * p.a_rs + gk * p.a_cs];
            }
            a_tile[a_k * A_ROW + mm / 4u][mm % 4u] = v;
        }
        let gn = col0 + b_n;
        for (var r = 0u; r < 4u; r++) {
            let kk = b_k + r * 4u;
            let gkb = k0 + kk;
            var v = 0.0;
            if gn < p.n && gkb < p.k {
                v = b[b_off + gkb * p.b_rs + gn * p.b_cs];
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

    let out_off = z * p.m * p.n;
    for (var i = 0u; i < 4u; i++) {
        let gm = row0 + lid.y * 4u + i;
        if gm >= p.m { break; }
        for (var j = 0u; j < 4u; j++) {
            let gn = col0 + lid.x * 4u + j;
            if gn >= p.n { break; }
            write_out(out_off, c_off, gm, gn, acc[i][j]);
        }
    }
}

// matmul_rows: the same product for a few rows of A (M <= 16: a classifier at a small batch,
// the reverse pass of one), where a 64x64 tile would compute up to 64 times the outputs it
// writes. One invocation per output column n computes every row; ROWS = M, fixed per pipeline
// so the row loop unrolls. Each output sums over k in order 0..K-1 with one accumulator, as
// matmul_main's does, so both kernels give the same values.
//
// Grid: x = ceil(N / 256), y = 1, z = batch.
override ROWS: u32 = 1u;
const MAX_ROWS: u32 = 16u;

@compute @workgroup_size(256)
fn matmul_rows(
    @builtin(local_invocation_index) lidx: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    if lidx == 0u {
        p = p_in;
    }
    workgroupBarrier();
    let z = wid.z + p.z_base;
    let offs = batch_offsets(z);
    let a_off = offs.x;
    let b_off = offs.y;
    let c_off = offs.z;
    let gn = wid.x * 256u + lidx;
    if gn >= p.n { return; }
    var acc: array<f32, MAX_ROWS>;
    for (var k = 0u; k < p.k; k++) {
        let bv = b[b_off + k * p.b_rs + gn * p.b_cs];
        for (var r = 0u; r < ROWS; r++) {
            acc[r] += a[a_off + r * p.a_rs + k * p.a_cs] * bv;
        }
    }
    let out_off = z * p.m * p.n;
    for (var r = 0u; r < ROWS; r++) {
        write_out(out_off, c_off, r, gn, acc[r]);
    }
}

struct ReduceParams {
    // Destination elements, the unreduced trailing block carried along, the number of leading
    // dims described below, and the number of entries summed per destination element.
    total: u32,
    inner: u32,
    rank: u32,
    rcount: u32,
    scale: f32,
    // Per leading dim (8 lanes as two vec4): the destination's size (1 where reduced), the
    // reduced size (1 where kept), and the source's element stride.
    kept0: vec4<u32>,
    kept1: vec4<u32>,
    red0: vec4<u32>,
    red1: vec4<u32>,
    stride0: vec4<u32>,
    stride1: vec4<u32>,
}

@group(0) @binding(0) var<storage, read> rp: ReduceParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

fn lane8(lo: vec4<u32>, hi: vec4<u32>, d: u32) -> u32 {
    if d < 4u {
        return lo[d];
    }
    return hi[d - 4u];
}

@compute @workgroup_size(256)
fn reduce_broadcast(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= rp.total { return; }
    let within = i % rp.inner;
    var rem = i / rp.inner;
    var base = within;
    for (var d = i32(rp.rank) - 1; d >= 0; d--) {
        let s = lane8(rp.kept0, rp.kept1, u32(d));
        base += (rem % s) * lane8(rp.stride0, rp.stride1, u32(d));
        rem = rem / s;
    }
    var acc = 0.0;
    // A zero scale (Gemm with beta = 0, whose C never reached the output) gives exact zeros
    // rather than 0 * dY, which an infinite dY would turn into NaN.
    if rp.scale != 0.0 {
        for (var r = 0u; r < rp.rcount; r++) {
            var rr = r;
            var off = base;
            for (var d = i32(rp.rank) - 1; d >= 0; d--) {
                let s = lane8(rp.red0, rp.red1, u32(d));
                off += (rr % s) * lane8(rp.stride0, rp.stride1, u32(d));
                rr = rr / s;
            }
            acc += src[off];
        }
    }
    var v = rp.scale * acc;
    if ACCUM != 0u {
        v += dst[i];
    }
    dst[i] = v;
}

// matmul_direct: matmul_main for CPU adapters (lavapipe, SwiftShader, WARP), which the context
// compiles in its place (gpu::GpuContext::variant): same grid, 64x64 outputs per workgroup, as
// 8x8 invocations of 8x8 outputs each, reading A and B straight from their buffers. A CPU
// "GPU" has caches where workgroup memory would help, and pays for each workgroupBarrier by
// switching between the invocations it runs as coroutines: matmul_main's two barriers per 16 of
// K ran MobileNetV2's 1x1 convolutions at 2.1 GFLOP/s on llvmpipe, this kernel at 3.8 (`acclimate
// bench --profile`; 4x4 outputs per invocation: 3.1). Each output sums over k in order 0..K-1
// with one accumulator, as matmul_main's does. The one barrier left stages the parameters.
@compute @workgroup_size(8, 8)
fn matmul_direct(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) lidx: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    if lidx == 0u {
        p = p_in;
    }
    workgroupBarrier();
    let z = wid.z + p.z_base;
    let offs = batch_offsets(z);
    let row0 = wid.y * TILE + lid.y * 8u;
    let col0 = wid.x * TILE + lid.x * 8u;
    if row0 >= p.m || col0 >= p.n { return; }
    var ra: array<u32, 8>;
    var cb: array<u32, 8>;
    for (var i = 0u; i < 8u; i++) {
        ra[i] = offs.x + min(row0 + i, p.m - 1u) * p.a_rs;
        cb[i] = offs.y + min(col0 + i, p.n - 1u) * p.b_cs;
    }
    var lo: array<vec4<f32>, 8>;
    var hi: array<vec4<f32>, 8>;
    for (var k = 0u; k < p.k; k++) {
        let ak = k * p.a_cs;
        let bk = k * p.b_rs;
        let b0 = vec4<f32>(b[cb[0] + bk], b[cb[1] + bk], b[cb[2] + bk], b[cb[3] + bk]);
        let b1 = vec4<f32>(b[cb[4] + bk], b[cb[5] + bk], b[cb[6] + bk], b[cb[7] + bk]);
        for (var i = 0u; i < 8u; i++) {
            let av = a[ra[i] + ak];
            lo[i] += av * b0;
            hi[i] += av * b1;
        }
    }
    let out_off = z * p.m * p.n;
    for (var i = 0u; i < 8u; i++) {
        let gm = row0 + i;
        if gm >= p.m { break; }
        for (var j = 0u; j < 8u; j++) {
            let gn = col0 + j;
            if gn >= p.n { break; }
            write_out(out_off, offs.z, gm, gn, select(hi[i][j % 4u], lo[i][j], j < 4u));
        }
    }
}
