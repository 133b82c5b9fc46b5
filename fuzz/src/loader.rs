//! The ONNX loader target and its structure-aware mutator.
//!
//! Seeds are decoded once with prost; each input is a seed with 1–8 (mostly 1–2) field-level mutations
//! (dims, data types, raw/typed data lengths, attribute values and kinds, op types, node
//! inputs/outputs, opset versions, graph input shapes, external-data entries, sparse
//! initializers), re-encoded, and in one input of ten damaged at the byte level as well. Field
//! mutations keep the protobuf decodable, so they reach the tensor decoding, the external-data
//! reader, the IR builder and shape specialisation instead of stopping at the decoder.

use std::path::{Path, PathBuf};

use acclimate::onnx::proto::{
    self, AttributeProto, ModelProto, NodeProto, OperatorSetIdProto, SparseTensorProto, StringStringEntryProto,
    TensorProto, ValueInfoProto, tensor_shape_proto,
};
use prost::Message;
use rand::RngExt;
use rand::rngs::Xoshiro256PlusPlus;

use crate::interesting_i64;

/// Tensors at most this many elements take part in specialisation's constant folding: bigger
/// declared graph inputs are skipped, so an execution stays in the millisecond range.
const SPECIALIZE_MAX_INPUT_ELEMENTS: usize = 1 << 14;

/// Runs the loader on `data`, with external data resolved in `external_dir`, then the IR builder
/// and shape specialisation on what loads. Returns how far the input got: 0 refused by the
/// loader, 1 loaded, 2 a valid graph, 3 specialised to its declared shapes.
pub fn run(data: &[u8], external_dir: Option<&Path>) -> usize {
    let Ok(raw) = acclimate::onnx::load_model_bytes(data, external_dir) else { return 0 };
    let Ok(graph) = acclimate::ir::Graph::from_raw(raw) else { return 1 };
    let _ = graph.batch_norms();
    let _ = graph.parameter_count();
    let _ = graph.op_histogram();
    // Concrete shapes from the declared ones (symbolic and unknown dims as 1).
    let mut shapes = Vec::new();
    for input in &graph.inputs {
        let Some(dims) = &input.dims else { return 2 };
        let shape: Vec<usize> = dims
            .iter()
            .map(|d| match d {
                acclimate::ir::Dim::Fixed(n) => *n,
                acclimate::ir::Dim::Dynamic(_) => 1,
            })
            .collect();
        if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > SPECIALIZE_MAX_INPUT_ELEMENTS) {
            return 2;
        }
        shapes.push(shape);
    }
    if acclimate::plan::specialize::specialize(&graph, &shapes).is_ok() { 3 } else { 2 }
}

/// Seed models and the folder their external data is looked up in.
pub struct Loader {
    seeds: Vec<ModelProto>,
    /// Cumulative selection weights: small seeds are picked far more often (they are fast and
    /// every field mutation matters), the full-size models still now and then.
    weights: Vec<u64>,
    external: PathBuf,
}

/// Names the mutator puts in external-data `location`s: every kind of file the folder holds
/// (see [`Loader::new`]) and the lexical escapes.
const LOCATIONS: [&str; 14] = [
    "w.bin",
    "sub/w.bin",
    "sub\\w.bin",
    "fifo.bin",
    "dir",
    "link_out.bin",
    "link_dir/outside.bin",
    "link_in.bin",
    "null.bin",
    "missing.bin",
    "../outside.bin",
    "/etc/hostname",
    "",
    "C:w.bin",
];

const OP_TYPES: [&str; 71] = [
    "Conv",
    "BatchNormalization",
    "Relu",
    "Clip",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Gemm",
    "MatMul",
    "Add",
    "Mul",
    "Sub",
    "Div",
    "Reshape",
    "Flatten",
    "Transpose",
    "Concat",
    "Softmax",
    "LogSoftmax",
    "Constant",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Slice",
    "Pad",
    "ReduceMean",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Dropout",
    "Identity",
    "Cast",
    "ConstantOfShape",
    "Expand",
    "Split",
    "Resize",
    "Max",
    "Min",
    "NotAnOp",
    // Expanded into other ops by the IR builder, or added with them.
    "LayerNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "Sum",
    "Equal",
    "Where",
    "Erf",
    "Gelu",
    "Softplus",
    "Mish",
    "Elu",
    // Folded on the CPU (torchvision's ViT and Swin exports).
    "Mod",
    "Not",
    "ScatterND",
    "ReduceSum",
    "ReduceL2",
    "ReduceSumSquare",
    "Tile",
    "Sin",
    "Cos",
    "Einsum",
    "LRN",
    "Resize",
    "Upsample",
    "Floor",
    "Round",
    "CumSum",
    "Ceil",
    "ReduceMax",
    "ReduceMin",
    "GlobalMaxPool",
];

impl Loader {
    pub fn new(repo: &Path, work: &Path) -> Result<Loader, String> {
        let mut files: Vec<PathBuf> = Vec::new();
        // tests/fixtures: the transformer, ConvNeXt and GroupNorm fixtures (LayerNormalization,
        // InstanceNormalization, Expand, Gather of run-time data, Equal/Where folding).
        for dir in ["assets", "models", "tests/data/onnx", "tests/fixtures"] {
            let Ok(entries) = std::fs::read_dir(repo.join(dir)) else { continue };
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "onnx") {
                    files.push(p);
                }
            }
        }
        files.sort();
        let mut seeds = Vec::new();
        let mut weights = Vec::new();
        let mut total = 0u64;
        let mut push = |m: ModelProto, weight: u64| {
            total += weight;
            seeds.push(m);
            weights.push(total);
        };
        for f in &files {
            let bytes = std::fs::read(f).map_err(|e| format!("cannot read seed {}: {e}", f.display()))?;
            // Tens of megabytes per execution would make a run crawl; such seeds add nothing the
            // smaller models do not reach.
            if bytes.len() > 8 << 20 {
                continue;
            }
            let m = ModelProto::decode(bytes.as_slice()).map_err(|e| format!("seed {}: {e}", f.display()))?;
            let slim = slim(&m);
            if bytes.len() > 64 << 10 {
                push(m, 1);
                push(slim, 40);
            } else {
                push(m, 40);
            }
        }
        push(bn_model(), 40);
        if seeds.len() < 2 {
            return Err(format!("no seed models under {} (run tools/setup.sh for assets/)", repo.display()));
        }
        let external = work.join("external");
        make_external_dir(&external, work)?;
        Ok(Loader { seeds, weights, external })
    }

    pub fn seed_count(&self) -> usize {
        self.seeds.len()
    }

    pub fn external_dir(&self) -> &Path {
        &self.external
    }

    pub fn input(&self, rng: &mut Xoshiro256PlusPlus) -> Vec<u8> {
        let total = *self.weights.last().unwrap_or(&1);
        let pick = rng.random_range(0..total);
        let i = self.weights.iter().position(|&w| pick < w).unwrap_or(0);
        let mut m = self.seeds[i].clone();
        // Mostly one or two mutations: each one is likely to make the model invalid, and an
        // input refused at the first check exercises little; now and then a pile of them.
        let count = match rng.random_range(0..8) {
            0..=3 => 1,
            4..=5 => 2,
            6 => 3,
            _ => rng.random_range(4..=8),
        };
        for _ in 0..count {
            mutate(&mut m, rng);
        }
        let mut bytes = m.encode_to_vec();
        if rng.random_range(0..10) == 0 {
            damage(&mut bytes, rng);
        }
        bytes
    }
}

/// The folder external data is resolved in: a regular file (also in a subfolder), a FIFO, a
/// directory, links leading out of the folder and one staying inside, a link to /dev/null.
fn make_external_dir(dir: &Path, work: &Path) -> Result<(), String> {
    let io = |e: std::io::Error| format!("{}: {e}", dir.display());
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("sub")).map_err(io)?;
    std::fs::create_dir_all(dir.join("dir")).map_err(io)?;
    let bytes: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(dir.join("w.bin"), &bytes).map_err(io)?;
    std::fs::write(dir.join("sub/w.bin"), &bytes[..256]).map_err(io)?;
    std::fs::write(work.join("outside.bin"), &bytes).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::symlink;
        let status = std::process::Command::new("mkfifo").arg(dir.join("fifo.bin")).status().map_err(io)?;
        if !status.success() {
            return Err("mkfifo failed".into());
        }
        symlink(work.join("outside.bin"), dir.join("link_out.bin")).map_err(io)?;
        symlink(work, dir.join("link_dir")).map_err(io)?;
        symlink("w.bin", dir.join("link_in.bin")).map_err(io)?;
        symlink("/dev/null", dir.join("null.bin")).map_err(io)?;
    }
    Ok(())
}

/// A copy of `m` whose large initializers keep their rank but shrink every dim to at most 2
/// (values regenerated): the graph's structure, attributes and opsets stay, at a size where an
/// execution takes microseconds.
fn slim(m: &ModelProto) -> ModelProto {
    let mut m = m.clone();
    if let Some(g) = m.graph.as_mut() {
        for t in &mut g.initializer {
            let numel: i64 = t.dims.iter().product();
            if numel <= 64 || t.data_location.is_some_and(|l| l != 0) {
                continue;
            }
            let size = elem_size(t.data_type.unwrap_or(1));
            for d in &mut t.dims {
                *d = (*d).min(2);
            }
            let n = t.dims.iter().product::<i64>().max(0) as usize;
            t.float_data.clear();
            t.int32_data.clear();
            t.int64_data.clear();
            t.double_data.clear();
            t.uint64_data.clear();
            t.raw_data = Some((0..n * size).map(|i| (i * 37 % 251) as u8).collect());
        }
    }
    m
}

fn elem_size(code: i32) -> usize {
    match code {
        2 | 3 | 9 => 1,
        4 | 5 | 10 | 16 => 2,
        7 | 11 | 13 => 8,
        _ => 4,
    }
}

/// X[1,2,2,2] → BatchNormalization → Relu → Y, with a Constant node, a sparse initializer and an
/// external scale: a small seed that holds every storage kind the loader reads.
fn bn_model() -> ModelProto {
    let f32_tensor = |name: &str, dims: Vec<i64>, v: Vec<f32>| TensorProto {
        name: Some(name.into()),
        dims,
        data_type: Some(1),
        raw_data: Some(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ..Default::default()
    };
    let mut scale = f32_tensor("scale", vec![2], vec![]);
    scale.raw_data = None;
    scale.data_location = Some(proto::tensor_proto::DataLocation::External as i32);
    scale.external_data = vec![entry("location", "w.bin"), entry("offset", "16"), entry("length", "8")];
    let sparse = SparseTensorProto {
        values: Some(f32_tensor("mean", vec![1], vec![0.5])),
        indices: Some(TensorProto {
            name: Some("mean_idx".into()),
            dims: vec![1],
            data_type: Some(7),
            int64_data: vec![1],
            ..Default::default()
        }),
        dims: vec![2],
    };
    let attr_f = |name: &str, f: f32| AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Float as i32),
        f: Some(f),
        ..Default::default()
    };
    let konst = AttributeProto {
        name: Some("value".into()),
        r#type: Some(proto::attribute_proto::AttributeType::Tensor as i32),
        t: Some(f32_tensor("var_value", vec![2], vec![1.0, 2.0])),
        ..Default::default()
    };
    let node = |op: &str, ins: &[&str], outs: &[&str], attrs: Vec<AttributeProto>| NodeProto {
        name: Some(format!("{op}_node")),
        op_type: Some(op.into()),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: outs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    };
    ModelProto {
        ir_version: Some(8),
        producer_name: Some("acclimate-fuzz".into()),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        graph: Some(proto::GraphProto {
            name: Some("bn".into()),
            node: vec![
                node("Constant", &[], &["var"], vec![konst]),
                node(
                    "BatchNormalization",
                    &["X", "scale", "bias", "mean", "var"],
                    &["B"],
                    vec![attr_f("epsilon", 1e-5)],
                ),
                node("Relu", &["B"], &["Y"], vec![]),
            ],
            initializer: vec![scale, f32_tensor("bias", vec![2], vec![0.0, 0.1])],
            sparse_initializer: vec![sparse],
            input: vec![value_info("X", &[1, 2, 2, 2])],
            output: vec![value_info("Y", &[1, 2, 2, 2])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn entry(k: &str, v: &str) -> StringStringEntryProto {
    StringStringEntryProto { key: Some(k.into()), value: Some(v.into()) }
}

fn value_info(name: &str, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(proto::TensorShapeProto { dim: dims.iter().map(|&d| dim(d)).collect() }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn dim(v: i64) -> tensor_shape_proto::Dimension {
    tensor_shape_proto::Dimension {
        value: Some(tensor_shape_proto::dimension::Value::DimValue(v)),
        ..Default::default()
    }
}

/// Byte-level damage after encoding: flips, overwrites, truncation, duplicated spans.
fn damage(bytes: &mut Vec<u8>, rng: &mut Xoshiro256PlusPlus) {
    for _ in 0..rng.random_range(1..=4) {
        if bytes.is_empty() {
            return;
        }
        let i = rng.random_range(0..bytes.len());
        match rng.random_range(0..4) {
            0 => bytes[i] ^= 1 << rng.random_range(0..8),
            1 => bytes[i] = rng.random(),
            2 => bytes.truncate(i),
            _ => {
                let end = (i + rng.random_range(1..64)).min(bytes.len());
                let span = bytes[i..end].to_vec();
                let at = rng.random_range(0..=bytes.len());
                bytes.splice(at..at, span);
            }
        }
    }
}

/// Every tensor in the model the loader decodes: initializers, sparse values and indices,
/// attribute tensors.
fn tensors(m: &mut ModelProto) -> Vec<&mut TensorProto> {
    let mut out = Vec::new();
    if let Some(g) = m.graph.as_mut() {
        out.extend(g.initializer.iter_mut());
        for s in &mut g.sparse_initializer {
            out.extend(s.values.as_mut());
            out.extend(s.indices.as_mut());
        }
        for n in &mut g.node {
            for a in &mut n.attribute {
                out.extend(a.t.as_mut());
            }
        }
    }
    out
}

fn pick<'a, T>(v: &'a mut [T], rng: &mut Xoshiro256PlusPlus) -> Option<&'a mut T> {
    if v.is_empty() {
        return None;
    }
    let i = rng.random_range(0..v.len());
    v.get_mut(i)
}

/// A value name already used in the graph, or a fresh one, or empty.
fn some_name(m: &ModelProto, rng: &mut Xoshiro256PlusPlus) -> String {
    let Some(g) = m.graph.as_ref() else { return String::new() };
    let mut names: Vec<&str> = g.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
    names.extend(g.input.iter().filter_map(|v| v.name.as_deref()));
    names.extend(g.output.iter().filter_map(|v| v.name.as_deref()));
    for n in &g.node {
        names.extend(n.input.iter().map(String::as_str));
        names.extend(n.output.iter().map(String::as_str));
    }
    match rng.random_range(0..8) {
        0 => String::new(),
        1 => format!("fresh_{}", rng.random_range(0..4)),
        _ if !names.is_empty() => names[rng.random_range(0..names.len())].to_string(),
        _ => "x".into(),
    }
}

fn random_bytes(rng: &mut Xoshiro256PlusPlus, max: usize) -> Vec<u8> {
    let n = rng.random_range(0..=max);
    (0..n).map(|_| rng.random()).collect()
}

/// One field-level mutation.
fn mutate(m: &mut ModelProto, rng: &mut Xoshiro256PlusPlus) {
    match rng.random_range(0..16) {
        0 => mutate_dims(m, rng),
        1 => {
            let code = *[-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 23, 25, 99]
                .get(rng.random_range(0..22))
                .unwrap_or(&1);
            if let Some(t) = pick(&mut tensors(m), rng) {
                t.data_type = Some(code);
            }
        }
        2 => mutate_storage(m, rng),
        3 | 4 => mutate_attribute(m, rng),
        5 => {
            let op = OP_TYPES[rng.random_range(0..OP_TYPES.len())];
            if let Some(n) = m.graph.as_mut().and_then(|g| pick(&mut g.node, rng)) {
                match rng.random_range(0..6) {
                    0 => n.domain = Some(["", "ai.onnx", "com.microsoft", "ai.onnx.ml"][rng.random_range(0..4)].into()),
                    1 => n.op_type = None,
                    _ => n.op_type = Some(op.into()),
                }
            }
        }
        6 | 7 => mutate_wiring(m, rng),
        8 => {
            let v = interesting_i64(rng);
            match rng.random_range(0..5) {
                0 => m.opset_import.push(OperatorSetIdProto { domain: Some("ai.onnx".into()), version: Some(v) }),
                1 => m.opset_import.clear(),
                2 => m.ir_version = Some(v),
                _ => {
                    let v = if rng.random_bool(0.5) { rng.random_range(1..30) } else { v };
                    if let Some(o) = pick(&mut m.opset_import, rng) {
                        o.version = Some(v);
                    }
                }
            }
        }
        9 | 10 => mutate_external(m, rng),
        11 => mutate_value_info(m, rng),
        12 => {
            // A sparse initializer with random indices, values and dense shape.
            let n = rng.random_range(0..4);
            let dims: Vec<i64> = (0..rng.random_range(0..3)).map(|_| interesting_i64(rng).rem_euclid(9)).collect();
            let rank = if rng.random_bool(0.5) { dims.len() as i64 } else { rng.random_range(0..3) };
            let idx_shape = if rng.random_bool(0.5) { vec![n] } else { vec![n, rank] };
            let idx_count = idx_shape.iter().product::<i64>().max(0) as usize;
            let s = SparseTensorProto {
                values: Some(TensorProto {
                    name: Some(some_name(m, rng)),
                    dims: vec![n],
                    data_type: Some(if rng.random_bool(0.8) { 1 } else { 7 }),
                    float_data: (0..n).map(|i| i as f32).collect(),
                    ..Default::default()
                }),
                indices: Some(TensorProto {
                    dims: idx_shape,
                    data_type: Some(7),
                    int64_data: (0..idx_count).map(|_| interesting_i64(rng).rem_euclid(12) - 1).collect(),
                    ..Default::default()
                }),
                dims,
            };
            if let Some(g) = m.graph.as_mut() {
                g.sparse_initializer.push(s);
            }
        }
        13 => {
            if let Some(t) = pick(&mut tensors(m), rng) {
                t.segment = Some(proto::tensor_proto::Segment { begin: Some(0), end: Some(interesting_i64(rng)) });
            }
        }
        14 => {
            // Nodes: delete, duplicate, swap (order matters: ONNX requires topological order).
            if let Some(g) = m.graph.as_mut()
                && !g.node.is_empty()
            {
                let i = rng.random_range(0..g.node.len());
                let j = rng.random_range(0..g.node.len());
                match rng.random_range(0..3) {
                    0 => {
                        g.node.remove(i);
                    }
                    1 => {
                        let n = g.node[i].clone();
                        g.node.insert(j, n);
                    }
                    _ => g.node.swap(i, j),
                }
            }
        }
        _ => {
            // Initializers: delete, duplicate (a name defined twice), rename.
            let name = some_name(m, rng);
            if let Some(g) = m.graph.as_mut()
                && !g.initializer.is_empty()
            {
                let i = rng.random_range(0..g.initializer.len());
                match rng.random_range(0..3) {
                    0 => {
                        g.initializer.remove(i);
                    }
                    1 => {
                        let t = g.initializer[i].clone();
                        g.initializer.push(t);
                    }
                    _ => g.initializer[i].name = Some(name),
                }
            }
        }
    }
}

fn mutate_dims(m: &mut ModelProto, rng: &mut Xoshiro256PlusPlus) {
    let v = interesting_i64(rng);
    let mut all = tensors(m);
    let Some(t) = pick(&mut all, rng) else { return };
    match rng.random_range(0..5) {
        0 => t.dims.push(v),
        1 => {
            t.dims.pop();
        }
        2 => t.dims.clear(),
        3 => t.dims = vec![1 << 32, 1 << 32],
        _ => {
            if let Some(d) = pick(&mut t.dims, rng) {
                *d = v;
            }
        }
    }
}

/// Moves, resizes or replaces where a tensor keeps its values.
fn mutate_storage(m: &mut ModelProto, rng: &mut Xoshiro256PlusPlus) {
    let choice = rng.random_range(0..9);
    let extra = rng.random_range(1..9);
    let bytes = random_bytes(rng, 64);
    let mut all = tensors(m);
    let Some(t) = pick(&mut all, rng) else { return };
    match choice {
        0 => t.raw_data = None,
        1 => t.raw_data = Some(bytes),
        2 => {
            if let Some(r) = t.raw_data.as_mut() {
                let n = r.len().saturating_sub(extra);
                r.truncate(n);
            }
        }
        3 => {
            if let Some(r) = t.raw_data.as_mut() {
                r.extend(std::iter::repeat_n(0xff, extra));
            }
        }
        4 => t.float_data.extend(bytes.iter().map(|&b| f32::from(b) - 128.0)),
        5 => t.int32_data.extend(bytes.iter().map(|&b| i32::from(b) << 20)),
        6 => t.int64_data.extend(bytes.iter().map(|&b| i64::from(b) << 56)),
        7 => {
            t.double_data.extend(bytes.iter().map(|&b| f64::from(b) * 1e300));
            t.uint64_data.extend(bytes.iter().map(|&b| u64::from(b) << 56));
        }
        _ => t.string_data.push(bytes),
    }
}

fn mutate_attribute(m: &mut ModelProto, rng: &mut Xoshiro256PlusPlus) {
    use proto::attribute_proto::AttributeType as A;
    let v = interesting_i64(rng);
    let f = [0.0, -0.0, 1.0, -1.0, 1e-30, 1e30, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, 0.5]
        [rng.random_range(0..11)];
    let Some(n) = m.graph.as_mut().and_then(|g| pick(&mut g.node, rng)) else { return };
    const NAMES: [&str; 16] = [
        "axis",
        "axes",
        "perm",
        "kernel_shape",
        "strides",
        "pads",
        "dilations",
        "group",
        "epsilon",
        "momentum",
        "alpha",
        "beta",
        "transB",
        "mode",
        "value",
        "to",
    ];
    if n.attribute.is_empty() || rng.random_range(0..4) == 0 {
        n.attribute
            .push(AttributeProto { name: Some(NAMES[rng.random_range(0..NAMES.len())].into()), ..Default::default() });
    }
    let Some(a) = pick(&mut n.attribute, rng) else { return };
    let len = rng.random_range(0..6);
    match rng.random_range(0..12) {
        0 => a.r#type = Some(rng.random_range(-1..16)),
        1 => a.i = Some(v),
        2 => a.f = Some(f),
        3 => a.ints = (0..len).map(|_| interesting_i64(&mut *rng)).collect(),
        4 => a.floats = vec![f; len],
        5 => a.s = Some(if rng.random_bool(0.5) { vec![0xff, 0xfe] } else { b"constant".to_vec() }),
        6 => a.strings = vec![b"a".to_vec(), vec![0xc3]],
        7 => {
            a.r#type = Some(A::Tensor as i32);
            a.t = Some(TensorProto {
                dims: (0..len).map(|_| interesting_i64(&mut *rng).rem_euclid(5)).collect(),
                data_type: Some(rng.random_range(0..17)),
                raw_data: Some(random_bytes(rng, 32)),
                ..Default::default()
            });
        }
        8 => {
            a.r#type = Some(A::Graph as i32);
            a.g = Some(proto::GraphProto::default());
        }
        9 => a.name = Some(NAMES[rng.random_range(0..NAMES.len())].into()),
        10 => a.ref_attr_name = Some("outer".into()),
        _ => {
            // The value of another kind than the type says.
            a.r#type =
                Some([A::Int, A::Ints, A::Float, A::Floats, A::String, A::Tensor][rng.random_range(0..6)] as i32);
            a.i = None;
            a.ints.clear();
            a.f = None;
            a.t = None;
        }
    }
}

fn mutate_wiring(m: &mut ModelProto, rng: &mut Xoshiro256PlusPlus) {
    let name = some_name(m, rng);
    let Some(g) = m.graph.as_mut() else { return };
    let Some(n) = pick(&mut g.node, rng) else { return };
    let list = if rng.random_bool(0.5) { &mut n.input } else { &mut n.output };
    match rng.random_range(0..5) {
        0 => list.push(name),
        1 => {
            list.pop();
        }
        2 => list.clear(),
        3 => {
            if !list.is_empty() {
                let i = rng.random_range(0..list.len());
                let j = rng.random_range(0..list.len());
                list.swap(i, j);
            }
        }
        _ => {
            if let Some(s) = pick(list, rng) {
                *s = name;
            }
        }
    }
}

/// Turns a tensor's storage into (or edits) external-data entries.
fn mutate_external(m: &mut ModelProto, rng: &mut Xoshiro256PlusPlus) {
    let location = LOCATIONS[rng.random_range(0..LOCATIONS.len())];
    let num = |rng: &mut Xoshiro256PlusPlus| match rng.random_range(0..4) {
        0 => interesting_i64(rng).to_string(),
        1 => "abc".to_string(),
        _ => rng.random_range(0..5000).to_string(),
    };
    let offset = num(rng);
    let length = num(rng);
    let choice = rng.random_range(0..6);
    let mut all = tensors(m);
    let Some(t) = pick(&mut all, rng) else { return };
    match choice {
        0 => t.data_location = Some(rng.random_range(-1..3)),
        1 => t.external_data.push(entry("checksum", "0")),
        _ => {
            // The size the tensor needs, often exactly, so the reader gets to the file.
            let need = t
                .dims
                .iter()
                .try_fold(1i64, |a, &d| a.checked_mul(d))
                .unwrap_or(0)
                .max(0)
                .saturating_mul(elem_size(t.data_type.unwrap_or(1)) as i64);
            t.raw_data = None;
            t.float_data.clear();
            t.int64_data.clear();
            t.int32_data.clear();
            t.data_location = Some(proto::tensor_proto::DataLocation::External as i32);
            t.external_data = vec![entry("location", location)];
            if choice != 2 {
                t.external_data.push(entry("offset", &offset));
            }
            match choice {
                3 => t.external_data.push(entry("length", &length)),
                4 => t.external_data.push(entry("length", &need.to_string())),
                _ => {}
            }
        }
    }
}

fn mutate_value_info(m: &mut ModelProto, rng: &mut Xoshiro256PlusPlus) {
    use proto::type_proto::Value;
    let v = interesting_i64(rng);
    let choice = rng.random_range(0..7);
    let Some(g) = m.graph.as_mut() else { return };
    let list = if rng.random_bool(0.7) { &mut g.input } else { &mut g.output };
    if choice == 0 {
        list.push(value_info(&format!("in_{}", rng.random_range(0..3)), &[1, 3, v.rem_euclid(40)]));
        return;
    }
    if choice == 1 {
        list.pop();
        return;
    }
    let Some(vi) = pick(list, rng) else { return };
    if choice == 2 {
        vi.r#type = None;
        return;
    }
    let Some(Value::TensorType(tt)) = vi.r#type.as_mut().and_then(|t| t.value.as_mut()) else { return };
    match choice {
        3 => tt.elem_type = Some(rng.random_range(0..17)),
        4 => tt.shape = None,
        5 => {
            if let Some(s) = tt.shape.as_mut() {
                s.dim.push(dim(v));
            }
        }
        _ => {
            if let Some(d) = tt.shape.as_mut().and_then(|s| pick(&mut s.dim, rng)) {
                d.value = Some(if rng.random_bool(0.3) {
                    tensor_shape_proto::dimension::Value::DimParam("N".into())
                } else {
                    tensor_shape_proto::dimension::Value::DimValue(v)
                });
            }
        }
    }
}
