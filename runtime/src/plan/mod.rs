//! Execution plans: a specialised graph lowered to dispatches, with buffers assigned.
//!
//! A plan is built once per set of input shapes and cached by the [`crate::Engine`]. Building it:
//! 1. [`specialize`] fixes every shape and folds constant subgraphs;
//! 2. each remaining node is lowered to dispatches by its op family;
//! 3. buffers are assigned by lifetime: aliases (Reshape, Flatten, ...) share their source's
//!    storage, and a storage's buffer returns to a pool after its last reader, to be reused by a
//!    later tensor of at most that size;
//! 4. bind groups and the uniform block of every dispatch are created up front.
//!
//! Running it is then: write the inputs, record every dispatch into one compute pass of one
//! command encoder, copy the outputs to staging buffers, submit once, read back.

pub mod specialize;

use std::collections::HashMap;
use std::sync::Arc;

use thiserror::Error;

use crate::gpu::{GpuContext, GpuError};
use crate::ir::Graph;
use crate::ops::{BufRef, Dispatch, Lowering, Operand};
use crate::tensor::Tensor;
pub use specialize::{Specialized, specialize};

/// Errors raised while building or running a plan.
#[derive(Debug, Error)]
pub enum PlanError {
    #[error("node '{node}' ({op}) with input shapes {shapes:?}: {reason}")]
    Node { node: String, op: String, shapes: Vec<Vec<usize>>, reason: String },
    #[error("the model takes {expected} input(s), {got} given")]
    InputCount { expected: usize, got: usize },
    #[error("input '{name}' should have shape {expected}, got {got:?}")]
    InputShape { name: String, expected: String, got: Vec<usize> },
    #[error("input '{name}' is {dtype}; the model takes float32")]
    InputDType { name: String, dtype: crate::tensor::DType },
    #[error("input '{name}': {len} values do not fill shape {shape:?}")]
    InputData { name: String, shape: Vec<usize>, len: usize },
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

/// Weights uploaded once per engine and shared by all its plans, keyed by tensor name.
#[derive(Default)]
pub struct WeightStore {
    pub buffers: HashMap<String, wgpu::Buffer>,
}

impl WeightStore {
    /// The buffer of constant `name`, uploading `t` on first use.
    pub fn get_or_upload(&mut self, ctx: &GpuContext, name: &str, t: &Tensor) -> wgpu::Buffer {
        if let Some(b) = self.buffers.get(name) {
            return b.clone();
        }
        let data = t.to_f32_vec();
        let b = upload(ctx, name, &data);
        self.buffers.insert(name.to_string(), b.clone());
        b
    }
}

fn upload(ctx: &GpuContext, label: &str, data: &[f32]) -> wgpu::Buffer {
    use wgpu::util::DeviceExt;
    let bytes: &[u8] = if data.is_empty() { &[0u8; 4] } else { bytemuck::cast_slice(data) };
    ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
    })
}

/// Where a graph output comes from.
#[derive(Debug)]
enum OutputSource {
    /// Folded to a constant at plan time.
    Const(Arc<Tensor>),
    /// A GPU value: its buffer, element count and shape, and the staging buffer it is copied to.
    Gpu { buffer: wgpu::Buffer, shape: Vec<usize>, staging: wgpu::Buffer },
}

/// One recorded dispatch.
struct Recorded {
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
}

/// A plan for one set of input shapes.
pub struct Plan {
    pub input_shapes: Vec<Vec<usize>>,
    inputs: Vec<(String, wgpu::Buffer)>,
    outputs: Vec<(String, OutputSource)>,
    dispatches: Vec<Recorded>,
    /// Bytes of activation buffers after lifetime-based reuse (inputs, outputs, scratch included).
    pub activation_bytes: u64,
    /// Bytes the same activations would take with one buffer each.
    pub activation_bytes_unshared: u64,
    pub dispatch_count: usize,
    /// Node names and output shapes for diagnostics (`--verbose`).
    pub node_count: usize,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("input_shapes", &self.input_shapes)
            .field("dispatches", &self.dispatch_count)
            .field("activation_bytes", &self.activation_bytes)
            .finish()
    }
}

const ALIGN: u64 = 256;

fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Registers a value; a new storage unless it aliases `storage`.
#[allow(clippy::too_many_arguments)]
fn new_value(
    value_ids: &mut HashMap<String, usize>,
    value_storage: &mut Vec<usize>,
    value_shape: &mut Vec<Vec<usize>>,
    storages: &mut Vec<Storage>,
    name: &str,
    shape: &[usize],
    storage: Option<usize>,
    at: usize,
) {
    let bytes = (shape.iter().product::<usize>() as u64 * 4).max(4);
    let s = match storage {
        Some(s) => s,
        None => {
            storages.push(Storage { bytes, first: at, last: at, buffer: None });
            storages.len() - 1
        }
    };
    value_ids.insert(name.to_string(), value_storage.len());
    value_storage.push(s);
    value_shape.push(shape.to_vec());
}

/// A storage (one buffer's worth of bytes) shared by a value and its aliases.
#[derive(Debug)]
struct Storage {
    bytes: u64,
    first: usize,
    last: usize,
    buffer: Option<usize>,
}

impl Plan {
    /// Builds the plan for `shapes` (one per graph input).
    pub fn build(
        ctx: &GpuContext,
        graph: &Graph,
        weights: &mut WeightStore,
        shapes: &[Vec<usize>],
    ) -> Result<Plan, PlanError> {
        let spec = specialize(graph, shapes)?;
        let limits = ctx.limits();
        let max_binding = limits.max_storage_buffer_binding_size;

        // --- values and storages -------------------------------------------------------------
        let mut value_ids: HashMap<String, usize> = HashMap::new();
        let mut value_storage: Vec<usize> = Vec::new();
        let mut value_shape: Vec<Vec<usize>> = Vec::new();
        let mut storages: Vec<Storage> = Vec::new();
        let end = spec.steps.len() + 1;
        for (name, shape) in spec.input_names.iter().zip(shapes) {
            new_value(&mut value_ids, &mut value_storage, &mut value_shape, &mut storages, name, shape, None, 0);
        }

        let mut lowered: Vec<(usize, Lowering)> = Vec::new();
        // (name, value, shareable across plans)
        let mut weight_refs: Vec<(String, Arc<Tensor>, bool)> = Vec::new();
        let mut weight_ids: HashMap<String, usize> = HashMap::new();
        for (si, step) in spec.steps.iter().enumerate() {
            let at = si + 1;
            let node = &graph.nodes[step.node];
            let mut inputs = Vec::new();
            for name in &step.inputs {
                if name.is_empty() {
                    inputs.push(None);
                    continue;
                }
                let info = &spec.values[name];
                if let Some(k) = &info.konst {
                    let id = *weight_ids.entry(name.clone()).or_insert_with(|| {
                        weight_refs.push((name.clone(), k.clone(), !info.shape_dependent));
                        weight_refs.len() - 1
                    });
                    inputs.push(Some(Operand { buf: BufRef::Weight(id), shape: info.shape.clone(), value: Some(k.clone()) }));
                } else {
                    let vid = value_ids[name];
                    let st = &mut storages[value_storage[vid]];
                    st.last = st.last.max(at);
                    inputs.push(Some(Operand { buf: BufRef::Value(vid), shape: info.shape.clone(), value: None }));
                }
            }
            let alias = node.op.is_alias();
            let mut outputs = Vec::new();
            for (oi, name) in step.outputs.iter().enumerate() {
                let shape = spec.values.get(name).map(|v| v.shape.clone()).unwrap_or_default();
                let storage = if alias && oi == 0 {
                    match inputs.first() {
                        Some(Some(Operand { buf: BufRef::Value(v), .. })) => Some(value_storage[*v]),
                        _ => None,
                    }
                } else {
                    None
                };
                new_value(&mut value_ids, &mut value_storage, &mut value_shape, &mut storages, name, &shape, storage, at);
                let vid = value_ids[name];
                outputs.push(Operand { buf: BufRef::Value(vid), shape, value: None });
            }
            let mut l = Lowering {
                node: node.name.clone(),
                inputs,
                outputs,
                dispatches: Vec::new(),
                scratch: Vec::new(),
                max_workgroup_storage: limits.max_compute_workgroup_storage_size,
                max_invocations: limits.max_compute_invocations_per_workgroup,
            };
            // An alias whose source is a constant (Reshape of a folded tensor that is not itself
            // foldable cannot happen) or a graph input needs no dispatch either.
            if !alias {
                node.op.lower(&mut l).map_err(|reason| PlanError::Node {
                    node: node.name.clone(),
                    op: node.op_type.clone(),
                    shapes: step.inputs.iter().map(|n| spec.values.get(n).map(|v| v.shape.clone()).unwrap_or_default()).collect(),
                    reason,
                })?;
            } else if !matches!(l.inputs.first(), Some(Some(Operand { buf: BufRef::Value(_), .. }))) {
                return Err(PlanError::Node {
                    node: node.name.clone(),
                    op: node.op_type.clone(),
                    shapes: vec![],
                    reason: "a view of a constant should have been folded".into(),
                });
            }
            lowered.push((at, l));
        }

        // Graph outputs live to the end.
        let mut outputs_src: Vec<(String, Option<usize>, Option<Arc<Tensor>>)> = Vec::new();
        for name in &spec.output_names {
            if let Some(&vid) = value_ids.get(name) {
                storages[value_storage[vid]].last = end;
                outputs_src.push((name.clone(), Some(vid), None));
            } else if let Some(k) = spec.values.get(name).and_then(|v| v.konst.clone()) {
                outputs_src.push((name.clone(), None, Some(k)));
            } else {
                return Err(PlanError::Node {
                    node: String::new(),
                    op: String::new(),
                    shapes: vec![],
                    reason: format!("graph output '{name}' was not computed"),
                });
            }
        }
        // Graph inputs are written before the pass starts and must not be overwritten by an
        // earlier reuse: they are live from step 0.
        for s in &storages {
            if s.bytes > max_binding {
                return Err(GpuError::BindingTooLarge { what: "an activation".into(), needed: s.bytes, limit: max_binding }.into());
            }
        }

        // --- buffer assignment by lifetime -----------------------------------------------------
        // Scratch buffers live exactly during their node.
        let mut scratch_storage: Vec<Vec<usize>> = Vec::new();
        for (at, l) in &lowered {
            let ids = l
                .scratch
                .iter()
                .map(|&b| {
                    storages.push(Storage { bytes: b, first: *at, last: *at, buffer: None });
                    storages.len() - 1
                })
                .collect();
            scratch_storage.push(ids);
        }
        let mut order: Vec<usize> = (0..storages.len()).collect();
        order.sort_by_key(|&i| (storages[i].first, i));
        let mut buffers: Vec<(u64, wgpu::Buffer)> = Vec::new();
        let mut busy_until: Vec<usize> = Vec::new();
        let mut unshared = 0u64;
        for &si in &order {
            let need = round_up(storages[si].bytes, ALIGN);
            unshared += need;
            let first = storages[si].first;
            // Best fit among buffers whose last reader ran strictly before this tensor is written.
            let mut best: Option<usize> = None;
            for (bi, (size, _)) in buffers.iter().enumerate() {
                if busy_until[bi] < first && *size >= need && best.is_none_or(|b| buffers[b].0 > *size) {
                    best = Some(bi);
                }
            }
            let bi = match best {
                Some(b) if buffers[b].0 <= need.saturating_mul(2) => b,
                _ => {
                    let buf = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("activation"),
                        size: need,
                        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                        mapped_at_creation: false,
                    });
                    buffers.push((need, buf));
                    busy_until.push(0);
                    buffers.len() - 1
                }
            };
            busy_until[bi] = storages[si].last;
            storages[si].buffer = Some(bi);
        }
        let activation_bytes = buffers.iter().map(|(s, _)| *s).sum();

        // --- weights -------------------------------------------------------------------------------
        let mut weight_bufs: Vec<Option<wgpu::Buffer>> = vec![None; weight_refs.len()];
        let mut weight_buf = |id: usize, weights: &mut WeightStore| -> wgpu::Buffer {
            if let Some(b) = &weight_bufs[id] {
                return b.clone();
            }
            let (name, t, shareable) = &weight_refs[id];
            // Initializers and constants folded from them alone (e.g. PaddlePaddle's Constant
            // nodes) are the same for every plan: upload them once per engine.
            let b = if *shareable {
                weights.get_or_upload(ctx, name, t)
            } else {
                upload(ctx, name, &t.to_f32_vec())
            };
            weight_bufs[id] = Some(b.clone());
            b
        };

        // --- uniform block and bind groups -----------------------------------------------------------
        let align = limits.min_uniform_buffer_offset_alignment.max(16) as u64;
        let all: Vec<(usize, &Dispatch)> = lowered
            .iter()
            .enumerate()
            .flat_map(|(li, (_, l))| l.dispatches.iter().map(move |d| (li, d)))
            .filter(|(_, d)| d.workgroups.iter().all(|&w| w > 0))
            .collect();
        let mut uniform_bytes: Vec<u8> = Vec::new();
        let mut offsets = Vec::new();
        for (_, d) in &all {
            let off = round_up(uniform_bytes.len() as u64, align);
            uniform_bytes.resize(off as usize, 0);
            offsets.push(off);
            uniform_bytes.extend_from_slice(&d.params.bytes());
        }
        if uniform_bytes.is_empty() {
            uniform_bytes.resize(16, 0);
        }
        let uniform = {
            use wgpu::util::DeviceExt;
            ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: &uniform_bytes,
                usage: wgpu::BufferUsages::UNIFORM,
            })
        };

        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut dispatches = Vec::with_capacity(all.len());
        for ((li, d), off) in all.iter().zip(&offsets) {
            let (_, l) = &lowered[*li];
            for (i, &w) in d.workgroups.iter().enumerate() {
                let max = limits.max_compute_workgroups_per_dimension;
                if w > max {
                    return Err(PlanError::Node {
                        node: l.node.clone(),
                        op: d.key.entry.to_string(),
                        shapes: vec![],
                        reason: format!("dispatch needs {w} workgroups in dimension {i}, the device allows {max}"),
                    });
                }
            }
            let pipeline = ctx.pipeline(&d.key)?;
            let layout = pipeline.get_bind_group_layout(0);
            let mut bufs: Vec<(wgpu::Buffer, u64)> = Vec::new();
            for r in &d.buffers {
                let (b, size) = match *r {
                    BufRef::Value(v) => {
                        let st = &storages[value_storage[v]];
                        let bytes = (value_shape[v].iter().product::<usize>() as u64 * 4).max(4);
                        (buffers[st.buffer.unwrap_or(0)].1.clone(), bytes)
                    }
                    BufRef::Weight(w) => {
                        let b = weight_buf(w, weights);
                        let size = b.size();
                        (b, size)
                    }
                    BufRef::Scratch(s) => {
                        let sid = scratch_storage[*li].get(s).copied().ok_or_else(|| PlanError::Node {
                            node: l.node.clone(),
                            op: d.key.entry.to_string(),
                            shapes: vec![],
                            reason: format!("scratch buffer {s} was never requested"),
                        })?;
                        let st = &storages[sid];
                        (buffers[st.buffer.unwrap_or(0)].1.clone(), st.bytes)
                    }
                };
                bufs.push((b, size));
            }
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &uniform,
                    offset: *off,
                    size: std::num::NonZeroU64::new(d.params.bytes().len() as u64),
                }),
            }];
            for (i, (b, size)) in bufs.iter().enumerate() {
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
                label: Some(&l.node),
                layout: &layout,
                entries: &entries,
            });
            dispatches.push(Recorded { pipeline, bind_group, workgroups: d.workgroups });
        }
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Validation { what: "plan bind groups".into(), reason: err.to_string() }.into());
        }

        let storage_buffer = |vid: usize| buffers[storages[value_storage[vid]].buffer.unwrap_or(0)].1.clone();
        let inputs = spec.input_names.iter().map(|n| (n.clone(), storage_buffer(value_ids[n]))).collect();
        let outputs = outputs_src
            .into_iter()
            .map(|(name, vid, k)| {
                let src = match (vid, k) {
                    (Some(v), _) => {
                        let bytes = (value_shape[v].iter().product::<usize>() as u64 * 4).max(4);
                        OutputSource::Gpu {
                            buffer: storage_buffer(v),
                            shape: value_shape[v].clone(),
                            staging: ctx.device.create_buffer(&wgpu::BufferDescriptor {
                                label: Some("readback"),
                                size: round_up(bytes, 4),
                                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                                mapped_at_creation: false,
                            }),
                        }
                    }
                    (None, Some(k)) => OutputSource::Const(k),
                    (None, None) => unreachable!("checked above"),
                };
                (name, src)
            })
            .collect();
        Ok(Plan {
            input_shapes: shapes.to_vec(),
            inputs,
            outputs,
            dispatch_count: dispatches.len(),
            dispatches,
            activation_bytes,
            activation_bytes_unshared: unshared,
            node_count: spec.steps.len(),
        })
    }

    /// Records the whole forward pass into `encoder` (one compute pass), after the inputs have
    /// been written. Used by [`Plan::run`] and by callers that add their own work to the encoder.
    pub fn record(&self, encoder: &mut wgpu::CommandEncoder) {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("forward"), timestamp_writes: None });
        for d in &self.dispatches {
            pass.set_pipeline(&d.pipeline);
            pass.set_bind_group(0, &d.bind_group, &[]);
            pass.dispatch_workgroups(d.workgroups[0], d.workgroups[1], d.workgroups[2]);
        }
    }

    /// Runs the plan: inputs in (one per graph input, matching the plan's shapes), outputs back.
    pub fn run(&self, ctx: &GpuContext, inputs: &[&[f32]]) -> Result<Vec<Tensor>, PlanError> {
        if inputs.len() != self.inputs.len() {
            return Err(PlanError::InputCount { expected: self.inputs.len(), got: inputs.len() });
        }
        for ((name, buf), (data, shape)) in self.inputs.iter().zip(inputs.iter().zip(&self.input_shapes)) {
            if data.len() != shape.iter().product::<usize>() {
                return Err(PlanError::InputData { name: name.clone(), shape: shape.clone(), len: data.len() });
            }
            ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(data));
        }
        let mut encoder = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("run") });
        self.record(&mut encoder);
        for (_, o) in &self.outputs {
            if let OutputSource::Gpu { buffer, shape, staging } = o {
                let bytes = (shape.iter().product::<usize>() as u64 * 4).max(4);
                encoder.copy_buffer_to_buffer(buffer, 0, staging, 0, round_up(bytes, 4));
            }
        }
        ctx.queue.submit([encoder.finish()]);
        let mut result = Vec::new();
        for (_, o) in &self.outputs {
            match o {
                OutputSource::Const(k) => result.push(Tensor::f32(k.shape.clone(), k.to_f32_vec())),
                OutputSource::Gpu { shape, staging, .. } => {
                    let n: usize = shape.iter().product();
                    let data = read_buffer(ctx, staging, n)?;
                    result.push(Tensor::f32(shape.clone(), data));
                }
            }
        }
        Ok(result)
    }

    /// Output names in graph order.
    pub fn output_names(&self) -> Vec<String> {
        self.outputs.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// Maps `staging` and reads `n` floats (waits for the queue).
pub fn read_buffer(ctx: &GpuContext, staging: &wgpu::Buffer, n: usize) -> Result<Vec<f32>, GpuError> {
    let slice = staging.slice(..);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    ctx.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| GpuError::Readback(e.to_string()))?;
    rx.recv()
        .map_err(|e| GpuError::Readback(e.to_string()))?
        .map_err(|e| GpuError::Readback(e.to_string()))?;
    let out = {
        let view = slice.get_mapped_range().map_err(|e| GpuError::Readback(e.to_string()))?;
        let all: &[f32] = bytemuck::cast_slice(&view);
        all[..n].to_vec()
    };
    staging.unmap();
    Ok(out)
}
