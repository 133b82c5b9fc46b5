// Camera frame preprocessing, one dispatch per frame: unpack the frame's bytes (uploaded as u32
// words), convert the colour (YUV with the frame's matrix and range), rotate and mirror, resize
// the shorter side with bilinear sampling and centre-crop (or stretch each axis), normalise, and write the NCHW row of
// the model's input. `runtime/src/stream/preprocess.rs` holds the host side and the CPU reference
// with the same semantics.
//
// Sampling is PyTorch's `interpolate(mode="bilinear", align_corners=False, antialias=False)`:
// source = (dst + 0.5) * scale - 0.5, negative positions clamped to 0, the far neighbour clamped
// to the last pixel. It happens in the upright (rotated, mirrored) pixel grid; each tap is mapped
// back to a stored pixel by an integer index map, which is exact because rotations by 90° and
// mirrors are symmetries of the pixel lattice.

const KIND_PACKED: u32 = 0u; // RGBA8, BGRA8, RGB8: channel byte offsets r_off, g_off, b_off
const KIND_GRAY: u32 = 1u;
const KIND_YUV: u32 = 2u; // NV12, NV21, I420: planes 0 (Y), 1 (U), 2 (V) with their own strides

struct Params {
    kind: u32,
    width: u32,
    height: u32,
    rotation: u32, // clockwise quarter turns
    mirror: u32,
    up_w: u32, // upright size
    up_h: u32,
    out_w: u32, // the output's width (the crop's, or the stretched size's)
    channels: u32,
    dst_offset: u32, // first element of this frame's row in the bound destination range
    crop_left: u32, // crop position in the resized image
    crop_top: u32,
    r_off: u32,
    g_off: u32,
    b_off: u32,
    scale_x: f32, // upright size / resized size, per axis
    scale_y: f32,
    value_scale: f32, // 1/255 unless the spec says otherwise
    luma_offset: f32, // Y' -> Y: (Y' - luma_offset) * luma_gain (16 and 255/219 in video range)
    luma_gain: f32,
    nhwc: u32, // 1: channels last ([H, W, C] per frame), 0: [C, H, W]
    out_h: u32, // the output's height
    offsets: vec4<u32>, // byte offsets of the planes in the bound words
    row_strides: vec4<u32>,
    pixel_strides: vec4<u32>,
    chroma: vec4<f32>, // R += x*V, G -= y*U + z*V, B += w*U (range gain folded in)
    mean: vec4<f32>,
    inv_std: vec4<f32>,
}

// A storage buffer, not a uniform one: lavapipe (Mesa 22.3) inlines uniform values used in
// branches and loop bounds into a new compilation of the shader each time a command buffer binds
// the uniform block, and keeps every compilation until the pipeline dies: about 0.9 MB per frame
// (the stream leak of issue #11). Storage reads are not inlined.
@group(0) @binding(0) var<storage, read> p: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

// Bytes are packed little-endian into the words, as the host's byte buffer is copied as is.
fn byte_at(off: u32) -> f32 {
    let w = src[off >> 2u];
    return f32((w >> ((off & 3u) << 3u)) & 0xffu);
}

fn sample_offset(plane: u32, x: u32, y: u32) -> u32 {
    return p.offsets[plane] + y * p.row_strides[plane] + x * p.pixel_strides[plane];
}

// The stored pixel (x, y) in 0..255 units: RGB, or luma replicated when one channel is wanted.
fn texel(x: u32, y: u32) -> vec3<f32> {
    if p.kind == KIND_YUV {
        let l = (byte_at(sample_offset(0u, x, y)) - p.luma_offset) * p.luma_gain;
        if p.channels == 1u {
            return vec3<f32>(clamp(l, 0.0, 255.0));
        }
        // 4:2:0 chroma without interpolation: each chroma sample covers a 2x2 block of luma.
        let u = byte_at(sample_offset(1u, x >> 1u, y >> 1u)) - 128.0;
        let v = byte_at(sample_offset(2u, x >> 1u, y >> 1u)) - 128.0;
        let rgb = vec3<f32>(l + p.chroma.x * v, l - p.chroma.y * u - p.chroma.z * v, l + p.chroma.w * u);
        return clamp(rgb, vec3<f32>(0.0), vec3<f32>(255.0));
    }
    let base = sample_offset(0u, x, y);
    if p.kind == KIND_GRAY {
        return vec3<f32>(byte_at(base));
    }
    let rgb = vec3<f32>(byte_at(base + p.r_off), byte_at(base + p.g_off), byte_at(base + p.b_off));
    if p.channels == 1u {
        return vec3<f32>(0.299 * rgb.x + 0.587 * rgb.y + 0.114 * rgb.z);
    }
    return rgb;
}

// The upright pixel (u, v) (after rotation, then mirror) as a stored pixel.
fn upright_texel(u: u32, v: u32) -> vec3<f32> {
    var m = u;
    if p.mirror != 0u {
        m = p.up_w - 1u - u;
    }
    switch p.rotation {
        case 1u: {
            return texel(v, p.height - 1u - m);
        }
        case 2u: {
            return texel(p.width - 1u - m, p.height - 1u - v);
        }
        case 3u: {
            return texel(p.width - 1u - v, m);
        }
        default: {
            return texel(m, v);
        }
    }
}

@compute @workgroup_size(64)
fn preprocess(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * (nwg.x * 64u);
    let plane = p.out_w * p.out_h;
    if i >= plane {
        return;
    }
    let ox = i % p.out_w;
    let oy = i / p.out_w;
    let sx = max((f32(ox + p.crop_left) + 0.5) * p.scale_x - 0.5, 0.0);
    let sy = max((f32(oy + p.crop_top) + 0.5) * p.scale_y - 0.5, 0.0);
    let x0 = min(u32(floor(sx)), p.up_w - 1u);
    let y0 = min(u32(floor(sy)), p.up_h - 1u);
    let x1 = min(x0 + 1u, p.up_w - 1u);
    let y1 = min(y0 + 1u, p.up_h - 1u);
    let fx = sx - f32(x0);
    let fy = sy - f32(y0);
    let top = upright_texel(x0, y0) * (1.0 - fx) + upright_texel(x1, y0) * fx;
    let bottom = upright_texel(x0, y1) * (1.0 - fx) + upright_texel(x1, y1) * fx;
    let value = top * (1.0 - fy) + bottom * fy;
    for (var c = 0u; c < p.channels; c++) {
        let at = select(c * plane + i, i * p.channels + c, p.nhwc != 0u);
        dst[p.dst_offset + at] = (value[c] * p.value_scale - p.mean[c]) * p.inv_std[c];
    }
}
