//! Running a hand-made list of dispatches over host arrays: the harness kernel tests use to check
//! one op's forward or reverse lowering (or a loss or optimizer kernel) without a whole graph.

use crate::gpu::{GpuContext, GpuError};
use crate::ops::{BufRef, Dispatch};

use super::read_buffer;

/// Uploads `values` (bound as [`BufRef::Value`]`(i)`), `weights` ([`BufRef::Weight`]`(i)`) and
/// zeroed `scratch` buffers of the given byte sizes, records every dispatch into one compute pass,
/// and reads every value back into `values`. Zero-workgroup dispatches are skipped, as in plans.
pub fn run_dispatches(
    ctx: &GpuContext,
    values: &mut [Vec<f32>],
    weights: &[Vec<f32>],
    scratch: &[u64],
    dispatches: &[Dispatch],
) -> Result<(), GpuError> {
    use wgpu::util::DeviceExt;
    let make = |label: &str, data: &[f32]| {
        let bytes: Vec<u8> = if data.is_empty() { vec![0; 4] } else { bytemuck::cast_slice(data).to_vec() };
        ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: &bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        })
    };
    let vbufs: Vec<wgpu::Buffer> = values.iter().map(|v| make("value", v)).collect();
    let wbufs: Vec<wgpu::Buffer> = weights.iter().map(|v| make("weight", v)).collect();
    let sbufs: Vec<wgpu::Buffer> =
        scratch.iter().map(|&b| make("scratch", &vec![0.0; (b as usize).div_ceil(4).max(1)])).collect();
    // One buffer of parameter blocks, bound as plans bind it (see `gpu::params`).
    let align = crate::gpu::params_offset_alignment(&ctx.limits()) as usize;
    let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let mut encoder = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("standalone") });
    let mut recorded = Vec::new();
    let mut params_bytes: Vec<u8> = Vec::new();
    let mut offsets = Vec::new();
    for d in dispatches {
        let off = params_bytes.len().div_ceil(align) * align;
        params_bytes.resize(off, 0);
        offsets.push(off as u64);
        params_bytes.extend_from_slice(&d.params.bytes());
    }
    params_bytes.resize(params_bytes.len().max(16), 0);
    let params = ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("params"),
        contents: &params_bytes,
        usage: crate::gpu::PARAMS_USAGE,
    });
    for (d, off) in dispatches.iter().zip(&offsets) {
        if d.workgroups.contains(&0) {
            continue;
        }
        let pipeline = ctx.pipeline(&d.key)?;
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &params,
                offset: *off,
                size: std::num::NonZeroU64::new(d.params.bytes().len() as u64),
            }),
        }];
        for (i, r) in d.buffers.iter().enumerate() {
            let b = match *r {
                BufRef::Value(v) => vbufs.get(v),
                BufRef::Weight(w) => wbufs.get(w),
                BufRef::Scratch(s) => sbufs.get(s),
            }
            .ok_or_else(|| GpuError::Validation {
                what: "standalone dispatch".into(),
                reason: format!("{r:?} is not bound"),
            })?;
            entries.push(wgpu::BindGroupEntry { binding: i as u32 + 1, resource: b.as_entire_binding() });
        }
        let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(d.key.entry),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        recorded.push((pipeline, bg, d.workgroups));
    }
    {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
        for (p, bg, wg) in &recorded {
            pass.set_pipeline(p);
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(wg[0], wg[1], wg[2]);
        }
    }
    let stagings: Vec<wgpu::Buffer> = vbufs
        .iter()
        .map(|b| {
            let s = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: b.size(),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            encoder.copy_buffer_to_buffer(b, 0, &s, 0, b.size());
            s
        })
        .collect();
    ctx.queue.submit([encoder.finish()]);
    if let Some(err) = pollster::block_on(scope.pop()) {
        return Err(GpuError::Validation { what: "standalone dispatches".into(), reason: err.to_string() });
    }
    for (v, s) in values.iter_mut().zip(&stagings) {
        let n = v.len();
        *v = read_buffer(ctx, s, n)?;
    }
    Ok(())
}
