//! Programs: an ordered list of dispatch groups over abstract buffers, and their compilation to
//! wgpu objects.
//!
//! Both the forward plan and the adaptation step are programs. A value's buffer is live from the
//! first item that references it to the last one (inputs from the start, outputs to the end), and
//! a buffer returns to the pool after its last reader to serve a later value of at most its size
//! (best fit, never more than twice as large). Aliases (Reshape, Flatten, ...) share their source's
//! storage. Weights (model constants, normalization statistics, optimizer moments) live in the
//! engine's [`WeightStore`], shared by every program of the engine, and are never reused.

use std::collections::HashMap;
use std::sync::Arc;

use crate::gpu::{GpuContext, GpuError};
use crate::ops::flops::FlopCount;
use crate::ops::{BufRef, Dispatch};
use crate::tensor::Tensor;

use super::PlanError;

/// A transient buffer of the program.
#[derive(Clone, Debug)]
pub struct ValueDecl {
    pub bytes: u64,
    /// Shares the storage of this earlier value (a view).
    pub alias_of: Option<usize>,
}

/// How a weight buffer is first filled.
#[derive(Clone, Debug)]
pub enum WeightInit {
    Tensor(Arc<Tensor>),
    Zeros(usize),
}

/// A persistent buffer.
#[derive(Clone, Debug)]
pub struct WeightDecl {
    pub name: String,
    pub init: WeightInit,
    /// Kept in the engine's store under `name` (same for every plan); otherwise private to this
    /// program (constants folded from the input shapes).
    pub shared: bool,
}

/// A group of dispatches (one node's forward or backward, a loss, an optimizer step).
#[derive(Clone, Debug, Default)]
pub struct Item {
    pub label: String,
    pub dispatches: Vec<Dispatch>,
    /// Byte sizes of this item's scratch buffers ([`BufRef::Scratch`] indexes this).
    pub scratch: Vec<u64>,
}

/// Abstract program: values, weights and items.
#[derive(Clone, Debug, Default)]
pub struct Program {
    pub values: Vec<ValueDecl>,
    pub weights: Vec<WeightDecl>,
    pub items: Vec<Item>,
    /// Values written before the first item (graph inputs).
    pub pinned_start: Vec<usize>,
    /// Values read after the last item (outputs).
    pub pinned_end: Vec<usize>,
    /// FLOPs of the items, added by whoever lowers them ([`crate::ops::flops`] has the
    /// convention); the benchmark's achieved GFLOP/s divide this by time.
    pub flops: FlopCount,
    /// When not 0: dispatches that may be split along z ([`crate::gpu::Params::splits_along_z`])
    /// with more z workgroups than this are recorded as pieces of at most this many, so that a
    /// paced step (frame mode's background steps) has no long single dispatch for a prediction
    /// to wait behind.
    pub z_piece: u32,
}

impl Program {
    pub fn value(&mut self, bytes: u64) -> usize {
        self.values.push(ValueDecl { bytes: bytes.max(4), alias_of: None });
        self.values.len() - 1
    }

    pub fn alias(&mut self, of: usize) -> usize {
        let bytes = self.values[of].bytes;
        self.values.push(ValueDecl { bytes, alias_of: Some(of) });
        self.values.len() - 1
    }

    /// The id of weight `name`, declaring it on first use.
    pub fn weight(&mut self, name: &str, init: impl FnOnce() -> WeightInit, shared: bool) -> usize {
        if let Some(i) = self.weights.iter().position(|w| w.name == name) {
            return i;
        }
        self.weights.push(WeightDecl { name: name.to_string(), init: init(), shared });
        self.weights.len() - 1
    }
}

/// Weights uploaded once per engine and shared by all its programs, keyed by name.
#[derive(Default)]
pub struct WeightStore {
    pub buffers: HashMap<String, wgpu::Buffer>,
}

impl WeightStore {
    fn get_or_create(&mut self, ctx: &GpuContext, name: &str, init: &WeightInit) -> Result<wgpu::Buffer, GpuError> {
        if let Some(b) = self.buffers.get(name) {
            return Ok(b.clone());
        }
        let b = create_weight(ctx, name, init)?;
        self.buffers.insert(name.to_string(), b.clone());
        Ok(b)
    }

    pub fn get(&self, name: &str) -> Option<&wgpu::Buffer> {
        self.buffers.get(name)
    }
}

/// Uploads a weight, after checking that it fits one storage binding of the device (a weight
/// beyond the limit would be a validation error, which wgpu's default handler turns into a panic).
fn create_weight(ctx: &GpuContext, label: &str, init: &WeightInit) -> Result<wgpu::Buffer, GpuError> {
    use wgpu::util::DeviceExt;
    let numel = match init {
        WeightInit::Tensor(t) => t.numel(),
        WeightInit::Zeros(n) => *n,
    };
    let bytes = (numel as u64).saturating_mul(4).max(4);
    ctx.check_buffer(|| format!("weight '{label}' ({numel} values)"), bytes, true)?;
    let data: Vec<f32> = match init {
        WeightInit::Tensor(t) => t.to_f32_vec(),
        WeightInit::Zeros(n) => vec![0.0; *n],
    };
    let bytes: &[u8] = if data.is_empty() { &[0u8; 4] } else { bytemuck::cast_slice(&data) };
    Ok(ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
    }))
}

/// One recorded dispatch.
pub(crate) struct Recorded {
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
    /// The program item it belongs to.
    item: usize,
    /// A piece of a dispatch split along z ([`Program::z_piece`]).
    piece: bool,
    /// Its arithmetic, or 256 per workgroup where the lowering gave none.
    work: u64,
    /// Its arithmetic where the lowering gave it.
    flops: Option<u64>,
    /// `file.wgsl::entry` (profiles).
    kernel: String,
}

/// A compiled program: pipelines, bind groups and buffers, ready to record.
pub struct Compiled {
    dispatches: Vec<Recorded>,
    /// The labels of the program's items (what [`Compiled::first_dispatch_of`] looks for).
    item_labels: Vec<String>,
    value_buffers: Vec<wgpu::Buffer>,
    pub weight_buffers: Vec<wgpu::Buffer>,
    /// Bytes of transient buffers after lifetime-based reuse (values and scratch).
    pub transient_bytes: u64,
    /// What the same values would take with one buffer each.
    pub transient_bytes_unshared: u64,
    /// The parameter blocks' buffer, and the byte offsets of BN-α coefficients in it with their
    /// values per channel ([`Compiled::set_bn_alpha`]).
    params: wgpu::Buffer,
    alpha_slots: Vec<(u64, u32)>,
    /// Byte offsets of the frame statistics' weights ([`Compiled::set_frame_alpha`]).
    frame_slots: Vec<u64>,
}

const ALIGN: u64 = 256;

/// Names a transient buffer for an error: the value or scratch buffer and the item that first
/// uses it.
fn describe_storage(program: &Program, root: &[usize], key: usize, first: usize) -> String {
    let item = |k: usize| program.items.get(k.wrapping_sub(1)).map(|i| i.label.as_str());
    if key >= program.values.len() {
        return format!("a scratch buffer of '{}'", item(first).unwrap_or("?"));
    }
    let aliases = root.iter().filter(|&&r| r == key).count();
    let view = if aliases > 1 { format!(" (with {} views of it)", aliases - 1) } else { String::new() };
    match (first, item(first)) {
        (0, _) => format!("value {key}{view}, a graph input"),
        (_, Some(label)) => format!("value {key}{view}, first used by '{label}'"),
        _ => format!("value {key}{view}, an output"),
    }
}

fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

struct Storage {
    bytes: u64,
    first: usize,
    last: usize,
    buffer: usize,
}

impl Compiled {
    /// Assigns buffers, uploads the weights and creates the bind groups. Every buffer is checked
    /// against the device's limits first ([`GpuError::TooLarge`]), and the creation runs in error
    /// scopes, so running out of GPU memory is an error value too.
    pub fn compile(ctx: &GpuContext, program: &Program, store: &mut WeightStore) -> Result<Compiled, PlanError> {
        let what = format!("creating the buffers of a program of {} items", program.items.len());
        ctx.scoped(&what, || Self::compile_unscoped(ctx, program, store))?
    }

    fn compile_unscoped(ctx: &GpuContext, program: &Program, store: &mut WeightStore) -> Result<Compiled, PlanError> {
        let limits = ctx.limits();
        let n_items = program.items.len();
        // Storage of each value (aliases resolved to their root).
        let mut root: Vec<usize> = Vec::with_capacity(program.values.len());
        for (i, v) in program.values.iter().enumerate() {
            root.push(match v.alias_of {
                Some(a) => root[a],
                None => i,
            });
        }
        let mut storages: HashMap<usize, Storage> = HashMap::new();
        let touch = |storages: &mut HashMap<usize, Storage>, r: usize, at: usize, bytes: u64| {
            let s = storages.entry(r).or_insert(Storage { bytes, first: at, last: at, buffer: usize::MAX });
            s.bytes = s.bytes.max(bytes);
            s.first = s.first.min(at);
            s.last = s.last.max(at);
        };
        // Items are numbered from 1; 0 is "before the program", n+1 "after it".
        for &v in &program.pinned_start {
            touch(&mut storages, root[v], 0, program.values[v].bytes);
        }
        for (k, item) in program.items.iter().enumerate() {
            for d in &item.dispatches {
                for b in &d.buffers {
                    if let BufRef::Value(v) = *b {
                        let decl = program
                            .values
                            .get(v)
                            .ok_or_else(|| PlanError::Program(format!("{}: value {v} is not declared", item.label)))?;
                        touch(&mut storages, root[v], k + 1, decl.bytes);
                    }
                }
            }
        }
        for &v in &program.pinned_end {
            touch(&mut storages, root[v], n_items + 1, program.values[v].bytes);
        }
        // Values declared but never referenced (unread outputs of skipped work) still get a
        // buffer so that any binding of them is valid.
        for (v, decl) in program.values.iter().enumerate() {
            if !storages.contains_key(&root[v]) {
                touch(&mut storages, root[v], n_items + 1, decl.bytes);
            }
        }
        // Scratch: live exactly during its item. Keyed after the values.
        let mut scratch_key: Vec<Vec<usize>> = Vec::new();
        let mut next_key = program.values.len();
        for (k, item) in program.items.iter().enumerate() {
            let mut keys = Vec::new();
            for &b in &item.scratch {
                storages.insert(next_key, Storage { bytes: b.max(4), first: k + 1, last: k + 1, buffer: usize::MAX });
                keys.push(next_key);
                next_key += 1;
            }
            scratch_key.push(keys);
        }
        let mut order: Vec<usize> = storages.keys().copied().collect();
        order.sort_by_key(|k| (storages[k].first, *k));
        let mut buffers: Vec<(u64, usize, wgpu::Buffer)> = Vec::new(); // size, busy until, buffer
        let mut unshared = 0u64;
        for key in order {
            let (need, first, last) = {
                let s = &storages[&key];
                (round_up(s.bytes, ALIGN), s.first, s.last)
            };
            ctx.check_buffer(|| describe_storage(program, &root, key, first), need, true)?;
            unshared += need;
            let mut best: Option<usize> = None;
            for (bi, (size, busy, _)) in buffers.iter().enumerate() {
                if *busy < first
                    && *size >= need
                    && *size <= need.saturating_mul(2)
                    && best.is_none_or(|b| buffers[b].0 > *size)
                {
                    best = Some(bi);
                }
            }
            let bi = match best {
                Some(b) => b,
                None => {
                    let buf = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("transient"),
                        size: need,
                        usage: wgpu::BufferUsages::STORAGE
                            | wgpu::BufferUsages::COPY_DST
                            | wgpu::BufferUsages::COPY_SRC,
                        mapped_at_creation: false,
                    });
                    buffers.push((need, 0, buf));
                    buffers.len() - 1
                }
            };
            buffers[bi].1 = last;
            if let Some(s) = storages.get_mut(&key) {
                s.buffer = bi;
            }
        }
        let transient_bytes = buffers.iter().map(|b| b.0).sum();
        let value_buffers: Vec<wgpu::Buffer> =
            (0..program.values.len()).map(|v| buffers[storages[&root[v]].buffer].2.clone()).collect();

        let weight_buffers: Vec<wgpu::Buffer> = program
            .weights
            .iter()
            .map(|w| {
                if w.shared { store.get_or_create(ctx, &w.name, &w.init) } else { create_weight(ctx, &w.name, &w.init) }
            })
            .collect::<Result<_, GpuError>>()?;

        // Parameter blocks and bind groups. The blocks go into one buffer bound at binding 0 of
        // every dispatch as a read-only storage buffer (a uniform block only for kernels at the
        // storage-buffer limit): lavapipe compiles a new variant of a kernel, per submit and kept
        // for the pipeline's life, when its loops or branches read a uniform block (see
        // `gpu::params` for the rule and its check).
        let align = crate::gpu::params_offset_alignment(&limits);
        let piece = program.z_piece;
        let all: Vec<(usize, Dispatch, bool)> = program
            .items
            .iter()
            .enumerate()
            .flat_map(|(k, it)| it.dispatches.iter().map(move |d| (k, d)))
            .filter(|(_, d)| d.workgroups.iter().all(|&w| w > 0))
            .flat_map(|(k, d)| {
                let z = d.workgroups[2];
                if piece == 0 || z <= piece || !d.params.splits_along_z() {
                    return vec![(k, d.clone(), false)];
                }
                (0..z.div_ceil(piece))
                    .map(|i| {
                        let base = i * piece;
                        let mut part = d.clone();
                        let zs = piece.min(z - base);
                        part.params = d.params.z_piece(base, zs, z);
                        part.workgroups[2] = zs;
                        (k, part, true)
                    })
                    .collect()
            })
            .collect();
        let mut params_bytes: Vec<u8> = Vec::new();
        let mut offsets = Vec::with_capacity(all.len());
        let mut alpha_slots = Vec::new();
        let mut frame_slots = Vec::new();
        for (_, d, _) in &all {
            let off = round_up(params_bytes.len() as u64, align);
            params_bytes.resize(off as usize, 0);
            offsets.push(off);
            if let Some((word, m)) = d.params.alpha_slot() {
                alpha_slots.push((off + 4 * word as u64, m));
            }
            if let Some(word) = d.params.frame_slot() {
                frame_slots.push(off + 4 * word as u64);
            }
            params_bytes.extend_from_slice(&d.params.bytes());
        }
        params_bytes.resize(params_bytes.len().max(16), 0);
        ctx.check_buffer(
            || format!("the parameter block of {} dispatches", all.len()),
            params_bytes.len() as u64,
            false,
        )?;
        let params = {
            use wgpu::util::DeviceExt;
            ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: &params_bytes,
                // BN-α and frame-statistics blocks are written again between runs
                // (`set_bn_alpha`, `set_frame_alpha`).
                usage: if alpha_slots.is_empty() && frame_slots.is_empty() {
                    crate::gpu::PARAMS_USAGE
                } else {
                    crate::gpu::PARAMS_USAGE | wgpu::BufferUsages::COPY_DST
                },
            })
        };
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut recorded = Vec::with_capacity(all.len());
        let max_wg = limits.max_compute_workgroups_per_dimension;
        for ((k, d, piece), off) in all.iter().zip(&offsets) {
            let item = &program.items[*k];
            if let Some(w) = d.workgroups.iter().find(|&&w| w > max_wg) {
                return Err(PlanError::Program(format!(
                    "{}: dispatch {} needs {w} workgroups in one dimension, the device allows {max_wg}",
                    item.label, d.key.entry
                )));
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
            let mut bound: Vec<(wgpu::Buffer, u64)> = Vec::new();
            for r in &d.buffers {
                bound.push(match *r {
                    BufRef::Value(v) => (value_buffers[v].clone(), program.values[v].bytes),
                    BufRef::Weight(w) => {
                        let b = weight_buffers
                            .get(w)
                            .ok_or_else(|| PlanError::Program(format!("{}: weight {w} is not declared", item.label)))?;
                        (b.clone(), b.size())
                    }
                    BufRef::Scratch(s) => {
                        let key = scratch_key[*k].get(s).copied().ok_or_else(|| {
                            PlanError::Program(format!("{}: scratch buffer {s} was never requested", item.label))
                        })?;
                        let st = &storages[&key];
                        (buffers[st.buffer].2.clone(), st.bytes)
                    }
                });
            }
            for (i, (b, size)) in bound.iter().enumerate() {
                entries.push(wgpu::BindGroupEntry {
                    binding: i as u32 + 1,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: b,
                        offset: 0,
                        size: std::num::NonZeroU64::new(*size),
                    }),
                });
            }
            let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(&item.label),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
            let groups: u64 = d.workgroups.iter().map(|&w| w as u64).product();
            let flops = d.params.work();
            let work = flops.unwrap_or(groups * 256);
            let kernel = format!("{}::{}", d.key.shader.file_name(), ctx.variant(&d.key).entry);
            recorded.push(Recorded {
                pipeline,
                bind_group,
                workgroups: d.workgroups,
                item: *k,
                piece: *piece,
                work,
                flops,
                kernel,
            });
        }
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Validation { what: "program bind groups".into(), reason: err.to_string() }.into());
        }
        Ok(Compiled {
            dispatches: recorded,
            item_labels: program.items.iter().map(|i| i.label.clone()).collect(),
            value_buffers,
            weight_buffers,
            transient_bytes,
            transient_bytes_unshared: unshared,
            params,
            alpha_slots,
            frame_slots,
        })
    }

    /// Sets the weight of the recent frames' evidence in every frame-statistics dispatch
    /// (`bn_frame`: mean and variance move from the source's toward the evidence by `alpha`) for
    /// the next submissions; returns how many blocks it wrote. Layers kept at the source
    /// (`FRAME_MIN_PLANE`) have no slot.
    pub fn set_frame_alpha(&self, queue: &wgpu::Queue, alpha: f32) -> usize {
        for &off in &self.frame_slots {
            queue.write_buffer(&self.params, off, bytemuck::cast_slice(&[alpha, 0.0, alpha, 0.0]));
        }
        self.frame_slots.len()
    }

    /// Sets α of every BN-α dispatch (forward statistics, normalisation and reverse pass) for
    /// the next submissions; returns how many blocks it wrote. Programs without BN-α: 0.
    pub fn set_bn_alpha(&self, queue: &wgpu::Queue, alpha: f32) -> usize {
        for &(off, m) in &self.alpha_slots {
            let c = crate::adapt::bn::alpha_coefficients(alpha, m);
            queue.write_buffer(&self.params, off, bytemuck::cast_slice(&c));
        }
        self.alpha_slots.len()
    }

    pub fn dispatch_count(&self) -> usize {
        self.dispatches.len()
    }

    pub fn value_buffer(&self, v: usize) -> &wgpu::Buffer {
        &self.value_buffers[v]
    }

    /// Records every dispatch into one compute pass of `encoder`.
    pub fn record(&self, encoder: &mut wgpu::CommandEncoder, label: &str) {
        self.record_range(encoder, label, 0..self.dispatches.len());
    }

    /// The index of the first dispatch of the first item whose label `is` accepts.
    pub fn first_dispatch_of(&self, is: impl Fn(&str) -> bool) -> Option<usize> {
        self.dispatches.iter().position(|d| is(&self.item_labels[d.item]))
    }

    /// A proxy of each dispatch's GPU work: its arithmetic where the lowering gave it
    /// (convolutions, matrix products), else 256 per workgroup (for splitting a program into
    /// submissions of about equal work; see `adapt::train::Pacer`).
    pub fn dispatch_work(&self) -> Vec<u64> {
        self.dispatches.iter().map(|d| d.work).collect()
    }

    /// The items and workgroups of the dispatches `range` (for logs).
    pub fn describe(&self, range: std::ops::Range<usize>) -> String {
        self.dispatches[range]
            .iter()
            .map(|d| format!("{} {:?}", self.item_labels[d.item], d.workgroups))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether each dispatch is a piece of one split along z (a long dispatch: pieces are
    /// submitted alone when paced).
    pub fn dispatch_pieces(&self) -> Vec<bool> {
        self.dispatches.iter().map(|d| d.piece).collect()
    }

    /// Dispatch `i`'s item label, kernel, workgroups and counted arithmetic (profiles).
    pub(crate) fn dispatch_info(&self, i: usize) -> (String, String, [u32; 3], Option<u64>) {
        let d = &self.dispatches[i];
        (self.item_labels[d.item].clone(), d.kernel.clone(), d.workgroups, d.flops)
    }

    /// Records dispatch `i` alone in a compute pass stamped by `writes` (profiles).
    pub(crate) fn record_one_timed(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        i: usize,
        writes: wgpu::ComputePassTimestampWrites<'_>,
    ) {
        let d = &self.dispatches[i];
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("profile"),
            timestamp_writes: Some(writes),
        });
        pass.set_pipeline(&d.pipeline);
        pass.set_bind_group(0, &d.bind_group, &[]);
        pass.dispatch_workgroups(d.workgroups[0], d.workgroups[1], d.workgroups[2]);
    }

    /// Records the dispatches `range` into one compute pass of `encoder`.
    pub fn record_range(&self, encoder: &mut wgpu::CommandEncoder, label: &str, range: std::ops::Range<usize>) {
        let mut pass =
            encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(label), timestamp_writes: None });
        for d in &self.dispatches[range] {
            pass.set_pipeline(&d.pipeline);
            pass.set_bind_group(0, &d.bind_group, &[]);
            pass.dispatch_workgroups(d.workgroups[0], d.workgroups[1], d.workgroups[2]);
        }
    }
}
