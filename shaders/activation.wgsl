
// ---------------------------------------------------------------------------------------------
// activation.wgsl: appended to elementwise.wgsl, conv.wgsl, matmul.wgsl and norm.wgsl (gpu::Shader::source).
//
// NaN-aware activations (elementwise.wgsl's header says why every min, max and clamp is guarded)
// and the fused tail of a convolution: BatchNormalization with fixed statistics and a Relu or
// Clip, applied to each output at write-out instead of as passes of their own
// (runtime/src/ops/conv.rs, `Tail`).
//
// The tail's parameters come in one block, so the convolution still binds four storage buffers
// at most (downlevel limits): with FUSE_BN the four BatchNormalization parameters first,
// [scale (C), B (C), mean (C), var (C)], packed by layout.wgsl's gather3 on every run (adaptation
// rewrites them on the GPU), then the constants [eps, lo, hi, 0, conv bias (C), the depthwise
// weights] fixed at plan time. Same expressions in the same order as batchnorm_main and the Relu
// and Clip kernels: the same values as the unfused passes.
// ---------------------------------------------------------------------------------------------

// 1: BatchNormalization with the block's parameters.
override FUSE_BN: u32 = 0u;
// 0: none; 1: Relu; 2: Clip to [lo, hi].
override FUSE_ACT: u32 = 0u;

fn fused() -> bool {
    return FUSE_BN != 0u || FUSE_ACT != 0u;
}

// Where the constants start in a fused block of `cc` channels.
fn tail_base(cc: u32) -> u32 {
    return select(0u, 4u * cc, FUSE_BN != 0u);
}

fn is_nan(v: f32) -> bool {
    let b = bitcast<u32>(v);
    return (b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu) != 0u;
}

// r, unless v is NaN: then v itself (its payload kept, as ONNX Runtime's kernels keep it).
fn nan_or(v: f32, r: f32) -> f32 {
    return select(r, v, is_nan(v));
}

// ONNX Runtime's Clip is min(max(x, lo), hi) with comparisons that fail on a NaN bound, which
// leaves x unbounded on that side; min > max gives max.
fn clip_onnx(v: f32, lo: f32, hi: f32) -> f32 {
    var r = select(max(v, lo), v, is_nan(lo));
    r = select(min(r, hi), r, is_nan(hi));
    return nan_or(v, r);
}

// The tail on one value: `bn` = (scale, B, mean, var) of its channel, `k` = (eps, lo, hi).
fn fuse_tail(v: f32, bn: vec4<f32>, k: vec3<f32>) -> f32 {
    var r = v;
    if FUSE_BN != 0u {
        // sqrt then divide, not inverseSqrt, as batchnorm_main.
        let inv_std = 1.0 / sqrt(bn.w + k.x);
        r = (r - bn.z) * inv_std * bn.x + bn.y;
    }
    if FUSE_ACT == 1u {
        r = nan_or(r, max(r, 0.0));
    } else if FUSE_ACT == 2u {
        r = clip_onnx(r, k.y, k.z);
    }
    return r;
}
