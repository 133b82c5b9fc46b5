// BatchNormalization (inference): y = (x - mean[c]) / sqrt(var[c] + eps) * scale[c] + bias[c].
//
// The four per-channel parameters are bound as buffers, not baked in, because test-time
// adaptation updates them on the GPU between runs.
//
// Flat index: gid.x + gid.y * (num_workgroups.x * 256) (see gpu::grid_1d).

struct BnParams {
    n: u32,
    channels: u32,
    // Elements per channel plane (product of the dims after C; 1 for a 2-D input).
    plane: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: BnParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> scale: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> mean: array<f32>;
@group(0) @binding(5) var<storage, read> variance: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn batchnorm_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.n { return; }
    let c = (i / p.plane) % p.channels;
    // sqrt then divide, not inverseSqrt: inverseSqrt may be an approximation on some drivers.
    let inv_std = 1.0 / sqrt(variance[c] + p.eps);
    y[i] = (x[i] - mean[c]) * inv_std * scale[c] + bias[c];
}
