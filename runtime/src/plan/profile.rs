//! Where a compiled program's GPU time goes: every dispatch timed alone
//! (`acclimate bench --profile`).
//!
//! With the device's timestamp queries (`wgpu::Features::TIMESTAMP_QUERY`, requested by
//! [`crate::GpuContext::new`] where the adapter has it), each dispatch gets its own compute pass
//! whose beginning and end the GPU stamps: the time between is the dispatch's own, without the
//! host. Without them, each dispatch is submitted alone and waited for on the host, so every
//! time includes a submission's overhead (tens of microseconds on lavapipe); [`Profile::clock`]
//! says which. Either way the dispatches run one after another, as they do in a program's single
//! pass, and the run writes what the program writes (a step's profile is a step).

use serde::Serialize;

use super::program::Compiled;
use crate::gpu::{GpuContext, GpuError};

/// How a [`Profile`] was timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Clock {
    /// GPU timestamps at each dispatch's pass boundaries.
    Timestamps,
    /// Host time around a submission of each dispatch alone (its overhead included).
    Host,
}

/// One dispatch's time: the median over the profile's runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DispatchTime {
    /// The program item it belongs to (the node, or the step's stage: "loss", "update", ...).
    pub item: String,
    /// The kernel: WGSL file and entry point (`conv.wgsl::conv2d`).
    pub kernel: String,
    pub workgroups: [u32; 3],
    /// Its floating-point operations where the lowering counts them (convolutions, matrix
    /// products); `None` for the others.
    pub flops: Option<u64>,
    pub ms: f64,
}

/// A kernel's dispatches summed ([`Profile::by_kernel`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KernelTime {
    pub kernel: String,
    pub dispatches: usize,
    pub ms: f64,
    /// Of the profile's total.
    pub share: f64,
    /// Over the dispatches whose FLOPs are counted (`None`: none are).
    pub gflops: Option<f64>,
}

/// Every dispatch of a program, timed alone.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Profile {
    pub clock: Clock,
    /// Runs each time is the median of.
    pub runs: usize,
    /// In program order.
    pub dispatches: Vec<DispatchTime>,
}

impl Profile {
    /// The sum of the dispatches' times (ms).
    pub fn total_ms(&self) -> f64 {
        self.dispatches.iter().map(|d| d.ms).sum()
    }

    /// The dispatches summed per kernel, the most expensive first.
    pub fn by_kernel(&self) -> Vec<KernelTime> {
        let total = self.total_ms();
        let mut out: Vec<KernelTime> = Vec::new();
        let mut counted: Vec<(u64, f64)> = Vec::new();
        for d in &self.dispatches {
            let i = match out.iter().position(|k| k.kernel == d.kernel) {
                Some(i) => i,
                None => {
                    out.push(KernelTime { kernel: d.kernel.clone(), dispatches: 0, ms: 0.0, share: 0.0, gflops: None });
                    counted.push((0, 0.0));
                    out.len() - 1
                }
            };
            out[i].dispatches += 1;
            out[i].ms += d.ms;
            if let Some(f) = d.flops {
                counted[i].0 += f;
                counted[i].1 += d.ms;
            }
        }
        for (k, &(flops, ms)) in out.iter_mut().zip(&counted) {
            k.share = if total > 0.0 { k.ms / total } else { 0.0 };
            k.gflops = (flops > 0 && ms > 0.0).then(|| flops as f64 / (ms * 1e6));
        }
        out.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        out
    }

    /// The `n` slowest dispatches, slowest first.
    pub fn slowest(&self, n: usize) -> Vec<DispatchTime> {
        let mut v = self.dispatches.clone();
        v.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        v.truncate(n);
        v
    }
}

/// Dispatches per command buffer on the timestamp clock (two queries each; wgpu allows 4,096
/// queries per set).
const TIMESTAMP_CHUNK: usize = 1024;

impl Compiled {
    /// Times every dispatch alone `runs` times (at least once) and keeps each one's median, on
    /// `clock` (`None`: timestamps where the device has them, else the host). Asking for
    /// timestamps on a device without them is an error.
    pub fn profile(&self, ctx: &GpuContext, runs: usize, clock: Option<Clock>) -> Result<Profile, GpuError> {
        let runs = runs.max(1);
        let available = ctx.device.features().contains(wgpu::Features::TIMESTAMP_QUERY);
        let timestamps = match clock {
            None => available,
            Some(Clock::Host) => false,
            Some(Clock::Timestamps) if available => true,
            Some(Clock::Timestamps) => {
                return Err(GpuError::Validation {
                    what: "a profile on GPU timestamps".into(),
                    reason: format!("{} has no timestamp queries", ctx.adapter_summary()),
                });
            }
        };
        let n = self.dispatch_count();
        let mut samples = vec![Vec::with_capacity(runs); n];
        for _ in 0..runs {
            let times = if timestamps { self.time_with_timestamps(ctx)? } else { self.time_on_host(ctx)? };
            for (s, t) in samples.iter_mut().zip(times) {
                s.push(t);
            }
        }
        let dispatches = samples
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                s.sort_by(f64::total_cmp);
                let (item, kernel, workgroups, flops) = self.dispatch_info(i);
                DispatchTime { item, kernel, workgroups, flops, ms: s[s.len() / 2] }
            })
            .collect();
        Ok(Profile { clock: if timestamps { Clock::Timestamps } else { Clock::Host }, runs, dispatches })
    }

    fn time_on_host(&self, ctx: &GpuContext) -> Result<Vec<f64>, GpuError> {
        let mut out = Vec::with_capacity(self.dispatch_count());
        for i in 0..self.dispatch_count() {
            let t = std::time::Instant::now();
            let mut encoder =
                ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("profile") });
            self.record_range(&mut encoder, "profile", i..i + 1);
            let index = ctx.queue.submit([encoder.finish()]);
            ctx.device
                .poll(wgpu::PollType::Wait { submission_index: Some(index), timeout: None })
                .map_err(|e| ctx.check().err().unwrap_or(GpuError::Readback(format!("a profiled dispatch: {e}"))))?;
            out.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ctx.check()?;
        Ok(out)
    }

    fn time_with_timestamps(&self, ctx: &GpuContext) -> Result<Vec<f64>, GpuError> {
        let period_ns = ctx.queue.get_timestamp_period() as f64;
        let mut out = Vec::with_capacity(self.dispatch_count());
        let mut start = 0;
        while start < self.dispatch_count() {
            let end = (start + TIMESTAMP_CHUNK).min(self.dispatch_count());
            let queries = 2 * (end - start) as u32;
            let set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile"),
                ty: wgpu::QueryType::Timestamp,
                count: queries,
            });
            let bytes = queries as u64 * 8;
            let resolved = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile timestamps"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile timestamps readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut encoder =
                ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("profile") });
            for (q, i) in (start..end).enumerate() {
                let writes = wgpu::ComputePassTimestampWrites {
                    query_set: &set,
                    beginning_of_pass_write_index: Some(2 * q as u32),
                    end_of_pass_write_index: Some(2 * q as u32 + 1),
                };
                self.record_one_timed(&mut encoder, i, writes);
            }
            encoder.resolve_query_set(&set, 0..queries, &resolved, 0);
            encoder.copy_buffer_to_buffer(&resolved, 0, &staging, 0, bytes);
            ctx.queue.submit([encoder.finish()]);
            let stamps: Vec<u64> = super::read_mapped(ctx, &staging, queries as usize)?;
            out.extend(stamps.chunks(2).map(|p| p[1].saturating_sub(p[0]) as f64 * period_ns / 1e6));
            start = end;
        }
        Ok(out)
    }
}
