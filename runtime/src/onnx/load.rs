//! Protobuf to [`RawModel`]: decoding, tensor conversion and validation.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use prost::Message;

use super::proto::{self, attribute_proto::AttributeType, tensor_proto};
use super::{Attr, DimSpec, OnnxError, RawGraph, RawModel, RawNode, ValueInfo};
use crate::tensor::{DType, Data, Tensor};

/// The most elements one tensor may declare (dense or sparse, inline or external): 2^29, i.e.
/// 2 GiB as `f32` (4 GiB as the `i64` host storage of integer tensors). Checked on the declared
/// shape before anything is allocated or read, because a few bytes of protobuf (or a sparse
/// external file) can declare any size. The bound is far above the largest weight of the
/// classifiers Acclimate runs, and a tensor past it could never reach the GPU anyway: a wgpu
/// storage binding is addressed by a `u32` byte count and WGSL indexes with 32-bit integers.
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 29;

/// Densifying a sparse initializer may not produce more elements than this (1 GiB of `f32`):
/// unlike dense tensors, whose size is bounded by the bytes in the file, a few bytes of sparse
/// tensor can ask for any size.
const MAX_SPARSE_DENSE_ELEMENTS: usize = 1 << 28;

/// Reads and decodes a model file. External tensor data is looked up relative to the file's
/// directory.
pub fn load_model(path: &Path) -> Result<RawModel, OnnxError> {
    let bytes = std::fs::read(path).map_err(|source| OnnxError::Io { path: path.to_path_buf(), source })?;
    let base_dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let model = proto::ModelProto::decode(bytes.as_slice())?;
    drop(bytes); // the decoded copy is all we need; keeps peak memory down on big models
    convert_model(&model, Some(&base_dir))
}

/// Decodes a serialized `ModelProto`. `base_dir` is where external tensor data lives; with
/// `None`, a model that uses external data is an error.
pub fn load_model_bytes(bytes: &[u8], base_dir: Option<&Path>) -> Result<RawModel, OnnxError> {
    let model = proto::ModelProto::decode(bytes)?;
    convert_model(&model, base_dir)
}

fn convert_model(model: &proto::ModelProto, base_dir: Option<&Path>) -> Result<RawModel, OnnxError> {
    let mut opset = None;
    for imp in &model.opset_import {
        let domain = imp.domain.as_deref().unwrap_or("");
        if domain.is_empty() || domain == "ai.onnx" {
            let version = imp.version.unwrap_or(0);
            match opset {
                Some(v) if v != version => return Err(OnnxError::ConflictingOpsets(v, version)),
                _ => opset = Some(version),
            }
        }
    }
    let opset = opset.ok_or(OnnxError::NoDefaultOpset)?;
    let graph = model.graph.as_ref().ok_or(OnnxError::NoGraph)?;

    let name = model.producer_name.as_deref().unwrap_or("").trim();
    let version = model.producer_version.as_deref().unwrap_or("").trim();
    let producer = if version.is_empty() { name.to_string() } else { format!("{name} {version}") };
    if !model.functions.is_empty() {
        log::debug!("model defines {} local functions; they are not expanded", model.functions.len());
    }

    Ok(RawModel {
        ir_version: model.ir_version.unwrap_or(0),
        opset,
        producer: producer.trim().to_string(),
        graph: convert_graph(graph, base_dir)?,
    })
}

fn convert_graph(g: &proto::GraphProto, base_dir: Option<&Path>) -> Result<RawGraph, OnnxError> {
    let mut initializers = Vec::with_capacity(g.initializer.len() + g.sparse_initializer.len());
    let mut init_names = HashSet::new();
    let mut add_init = |name: String, t: Tensor| {
        if name.is_empty() {
            return Err(OnnxError::Graph("an initializer has no name".into()));
        }
        if !init_names.insert(name.clone()) {
            return Err(OnnxError::Graph(format!("initializer '{name}' is defined twice")));
        }
        initializers.push((name, t));
        Ok(())
    };
    for t in &g.initializer {
        let name = t.name.clone().unwrap_or_default();
        let tensor = decode_tensor(t, &name, base_dir)?;
        add_init(name, tensor)?;
    }
    for s in &g.sparse_initializer {
        let name = s.values.as_ref().and_then(|v| v.name.clone()).unwrap_or_default();
        let tensor = densify(s, &name, base_dir)?;
        add_init(name, tensor)?;
    }

    let mut inputs = Vec::new();
    for vi in &g.input {
        let v = convert_value_info(vi)?;
        if !init_names.contains(&v.name) {
            inputs.push(v);
        }
    }
    let outputs = g.output.iter().map(convert_value_info).collect::<Result<Vec<_>, _>>()?;

    let nodes = g.node.iter().enumerate().map(|(i, n)| convert_node(i, n, base_dir)).collect::<Result<Vec<_>, _>>()?;

    Ok(RawGraph { name: g.name.clone().unwrap_or_default(), nodes, initializers, inputs, outputs })
}

fn convert_value_info(vi: &proto::ValueInfoProto) -> Result<ValueInfo, OnnxError> {
    use proto::tensor_shape_proto::dimension::Value as D;
    use proto::type_proto::Value;

    let name = vi.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(OnnxError::ValueInfo { name, reason: "the name is empty".into() });
    }
    let (dtype, shape) = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(Value::TensorType(tt)) => {
            let dtype = tt.elem_type.and_then(DType::from_onnx);
            let shape: Option<Vec<DimSpec>> = tt.shape.as_ref().map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(D::DimValue(v)) => u64::try_from(*v).map_or(DimSpec::Unknown, DimSpec::Fixed),
                        Some(D::DimParam(p)) if !p.is_empty() => DimSpec::Sym(p.clone()),
                        _ => DimSpec::Unknown,
                    })
                    .collect()
            });
            (dtype, shape)
        }
        _ => (None, None),
    };
    // Buffers are sized from declared shapes later on (engine plans, `info`, bench): the fixed
    // part of a shape gets the same bound as a tensor's.
    if let Some(dims) = &shape {
        let fixed = dims.iter().filter_map(|d| if let DimSpec::Fixed(n) = d { Some(*n) } else { None });
        if let Err(reason) = checked_numel(fixed) {
            return Err(OnnxError::ValueInfo { name, reason: format!("declared shape {dims:?}: {reason}") });
        }
    }
    Ok(ValueInfo { name, dtype, shape })
}

fn convert_node(index: usize, n: &proto::NodeProto, base_dir: Option<&Path>) -> Result<RawNode, OnnxError> {
    let op_type = n.op_type.clone().unwrap_or_default();
    let name = match n.name.as_deref() {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => format!("{op_type}_{index}"),
    };
    if op_type.is_empty() {
        return Err(OnnxError::Node { node: name, reason: "op_type is empty".into() });
    }
    let mut attrs = BTreeMap::new();
    for a in &n.attribute {
        let attr_name = a.name.clone().unwrap_or_default();
        if attr_name.is_empty() {
            return Err(OnnxError::Node { node: name, reason: "an attribute has no name".into() });
        }
        let value = convert_attr(a, &name, &attr_name, base_dir)?;
        if attrs.insert(attr_name.clone(), value).is_some() {
            return Err(OnnxError::Attribute { node: name, name: attr_name, reason: "given twice".into() });
        }
    }
    Ok(RawNode {
        name,
        op_type,
        domain: n.domain.clone().unwrap_or_default(),
        inputs: n.input.clone(),
        outputs: n.output.clone(),
        attrs,
    })
}

/// The attribute's kind: its `type` field, or for files that leave it out (IR version 1), the
/// first value field that is set.
fn attr_type(a: &proto::AttributeProto) -> Option<AttributeType> {
    match a.r#type.map(AttributeType::try_from) {
        Some(Ok(AttributeType::Undefined)) | None => {}
        Some(Ok(t)) => return Some(t),
        Some(Err(_)) => return None,
    }
    let t = if a.f.is_some() {
        AttributeType::Float
    } else if a.i.is_some() {
        AttributeType::Int
    } else if a.s.is_some() {
        AttributeType::String
    } else if a.t.is_some() {
        AttributeType::Tensor
    } else if a.g.is_some() {
        AttributeType::Graph
    } else if a.sparse_tensor.is_some() {
        AttributeType::SparseTensor
    } else if a.tp.is_some() {
        AttributeType::TypeProto
    } else if !a.floats.is_empty() {
        AttributeType::Floats
    } else if !a.ints.is_empty() {
        AttributeType::Ints
    } else if !a.strings.is_empty() {
        AttributeType::Strings
    } else if !a.tensors.is_empty() {
        AttributeType::Tensors
    } else if !a.graphs.is_empty() {
        AttributeType::Graphs
    } else if !a.sparse_tensors.is_empty() {
        AttributeType::SparseTensors
    } else if !a.type_protos.is_empty() {
        AttributeType::TypeProtos
    } else {
        return None;
    };
    Some(t)
}

fn convert_attr(a: &proto::AttributeProto, node: &str, name: &str, base_dir: Option<&Path>) -> Result<Attr, OnnxError> {
    let err = |reason: String| OnnxError::Attribute { node: node.to_string(), name: name.to_string(), reason };
    if a.ref_attr_name.as_deref().is_some_and(|r| !r.is_empty()) {
        return Err(err("refers to a function attribute outside a function".into()));
    }
    let utf8 = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| err("string value is not valid UTF-8".into()));
    let Some(ty) = attr_type(a) else {
        return Err(match a.r#type {
            Some(code) if AttributeType::try_from(code).is_err() => err(format!("unknown attribute type code {code}")),
            _ => err("has neither a type nor a value".into()),
        });
    };
    Ok(match ty {
        AttributeType::Float => Attr::Float(a.f.unwrap_or(0.0)),
        AttributeType::Int => Attr::Int(a.i.unwrap_or(0)),
        AttributeType::String => Attr::String(utf8(a.s.as_deref().unwrap_or(&[]))?),
        AttributeType::Tensor => {
            let t = a.t.as_ref().ok_or_else(|| err("declared as a tensor but holds none".into()))?;
            let tname = match t.name.as_deref() {
                Some(s) if !s.is_empty() => s.to_string(),
                _ => format!("{node}.{name}"),
            };
            Attr::Tensor(decode_tensor(t, &tname, base_dir)?)
        }
        AttributeType::Floats => Attr::Floats(a.floats.clone()),
        AttributeType::Ints => Attr::Ints(a.ints.clone()),
        AttributeType::Strings => Attr::Strings(a.strings.iter().map(|s| utf8(s)).collect::<Result<Vec<_>, _>>()?),
        AttributeType::Tensors => Attr::Other("tensors"),
        AttributeType::Graph => Attr::Other("graph"),
        AttributeType::Graphs => Attr::Other("graphs"),
        AttributeType::SparseTensor => Attr::Other("sparse_tensor"),
        AttributeType::SparseTensors => Attr::Other("sparse_tensors"),
        AttributeType::TypeProto => Attr::Other("type_proto"),
        AttributeType::TypeProtos => Attr::Other("type_protos"),
        AttributeType::Undefined => return Err(err("has neither a type nor a value".into())),
    })
}

// ---------------------------------------------------------------------------------------------
// Tensors
// ---------------------------------------------------------------------------------------------

/// Converts a `TensorProto` into a host tensor. External data is resolved against `base_dir`.
pub fn tensor_from_proto(t: &proto::TensorProto, base_dir: Option<&Path>) -> Result<Tensor, OnnxError> {
    let name = match t.name.as_deref() {
        Some(s) if !s.is_empty() => s,
        _ => "<unnamed>",
    };
    decode_tensor(t, name, base_dir)
}

fn dtype_name(code: i32) -> String {
    match tensor_proto::DataType::try_from(code) {
        Ok(d) => d.as_str_name().to_string(),
        Err(_) => "unknown".to_string(),
    }
}

/// The element count of `dims`, in checked arithmetic, refused past [`MAX_TENSOR_ELEMENTS`].
/// The non-zero dims are bounded even when a zero makes the tensor empty: later code multiplies
/// dims (strides, partial products) without knowing that one of them is zero.
fn checked_numel(dims: impl Iterator<Item = u64>) -> Result<usize, String> {
    let mut nonzero: u64 = 1;
    let mut empty = false;
    for d in dims {
        if d == 0 {
            empty = true;
            continue;
        }
        nonzero = nonzero
            .checked_mul(d)
            .ok_or_else(|| "too many elements: the product of its dimensions overflows".to_string())?;
    }
    match usize::try_from(nonzero) {
        Ok(n) if n <= MAX_TENSOR_ELEMENTS => Ok(if empty { 0 } else { n }),
        _ => Err(format!("{nonzero} elements exceed the limit of {MAX_TENSOR_ELEMENTS} elements per tensor")),
    }
}

/// Shape as `usize`s and the element count, with negative dims, overflow and sizes past
/// [`MAX_TENSOR_ELEMENTS`] rejected before anything is allocated for the values.
fn shape_of(dims: &[i64], name: &str) -> Result<(Vec<usize>, usize), OnnxError> {
    let terr = |reason: String| OnnxError::Tensor { name: name.to_string(), reason };
    let mut shape = Vec::with_capacity(dims.len().min(64));
    for &d in dims {
        let d = usize::try_from(d).map_err(|_| terr(format!("negative dimension {d} in shape {dims:?}")))?;
        shape.push(d);
    }
    let numel = checked_numel(shape.iter().map(|&d| d as u64)).map_err(|r| terr(format!("shape {dims:?}: {r}")))?;
    Ok((shape, numel))
}

fn decode_tensor(t: &proto::TensorProto, name: &str, base_dir: Option<&Path>) -> Result<Tensor, OnnxError> {
    let terr = |reason: String| OnnxError::Tensor { name: name.to_string(), reason };
    let code = t.data_type.unwrap_or(0);
    let dtype = DType::from_onnx(code)
        .ok_or_else(|| terr(format!("unsupported data type {} (code {code})", dtype_name(code))))?;
    if t.segment.is_some() {
        return Err(terr("segmented tensors are not supported".into()));
    }
    let (shape, numel) = shape_of(&t.dims, name).map_err(|e| match (e, external_location(t)) {
        // An external tensor's error names the file too.
        (OnnxError::Tensor { name, reason }, Some(location)) => {
            OnnxError::ExternalData { name, path: PathBuf::from(location), reason }
        }
        (e, _) => e,
    })?;

    // Which storage holds the values. ONNX allows exactly one.
    let mut present: Vec<&'static str> = Vec::new();
    if t.raw_data.is_some() {
        present.push("raw_data");
    }
    for (field, n) in [
        ("float_data", t.float_data.len()),
        ("int32_data", t.int32_data.len()),
        ("string_data", t.string_data.len()),
        ("int64_data", t.int64_data.len()),
        ("double_data", t.double_data.len()),
        ("uint64_data", t.uint64_data.len()),
    ] {
        if n > 0 {
            present.push(field);
        }
    }
    let external = match t.data_location.map(tensor_proto::DataLocation::try_from) {
        None | Some(Ok(tensor_proto::DataLocation::Default)) => false,
        Some(Ok(tensor_proto::DataLocation::External)) => true,
        Some(Err(_)) => return Err(terr(format!("unknown data_location {:?}", t.data_location))),
    };
    if external {
        if !present.is_empty() {
            return Err(terr(format!("data is external but {} is also set", present.join(" and "))));
        }
        let raw = read_external(t, name, dtype, numel, base_dir)?;
        let data = decode_raw(&raw, dtype, numel, name)?;
        return Ok(Tensor { dtype, shape, data });
    }
    if present.len() > 1 {
        return Err(terr(format!("values given in more than one field: {}", present.join(", "))));
    }

    let data = match present.first().copied() {
        None if numel == 0 => empty_data(dtype),
        None => {
            return Err(terr(format!("no values for a {dtype} tensor of shape {shape:?}")));
        }
        Some("raw_data") => decode_raw(t.raw_data.as_deref().unwrap_or(&[]), dtype, numel, name)?,
        Some(field) => {
            let expected = typed_field(dtype);
            if field != expected {
                return Err(terr(format!("a {dtype} tensor must keep its values in {expected}, not {field}")));
            }
            let held = typed_len(t, field);
            if held != numel {
                return Err(terr(format!("{field} holds {held} values but shape {shape:?} needs {numel}")));
            }
            decode_typed(t, dtype, name)?
        }
    };
    Ok(Tensor { dtype, shape, data })
}

/// The `location` entry of a tensor stored externally.
fn external_location(t: &proto::TensorProto) -> Option<&str> {
    if t.data_location != Some(tensor_proto::DataLocation::External as i32) {
        return None;
    }
    t.external_data.iter().find(|e| e.key.as_deref() == Some("location")).and_then(|e| e.value.as_deref())
}

fn empty_data(dtype: DType) -> Data {
    if dtype.is_float() { Data::F32(Vec::new()) } else { Data::I64(Vec::new()) }
}

/// The typed field the ONNX spec assigns to each element type.
fn typed_field(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float_data",
        DType::F64 => "double_data",
        DType::I64 => "int64_data",
        DType::U32 | DType::U64 => "uint64_data",
        DType::F16 | DType::BF16 | DType::I8 | DType::I16 | DType::I32 | DType::U8 | DType::U16 | DType::Bool => {
            "int32_data"
        }
    }
}

/// How many values the typed field `field` holds (checked before anything is converted).
fn typed_len(t: &proto::TensorProto, field: &str) -> usize {
    match field {
        "float_data" => t.float_data.len(),
        "int32_data" => t.int32_data.len(),
        "string_data" => t.string_data.len(),
        "int64_data" => t.int64_data.len(),
        "double_data" => t.double_data.len(),
        _ => t.uint64_data.len(),
    }
}

fn decode_typed(t: &proto::TensorProto, dtype: DType, name: &str) -> Result<Data, OnnxError> {
    let i32s = &t.int32_data;
    Ok(match dtype {
        DType::F32 => Data::F32(t.float_data.clone()),
        DType::F64 => Data::F32(t.double_data.iter().map(|&v| v as f32).collect()),
        // Half floats keep their bit pattern in the low 16 bits.
        DType::F16 => Data::F32(i32s.iter().map(|&v| f16_to_f32(v as u16)).collect()),
        DType::BF16 => Data::F32(i32s.iter().map(|&v| bf16_to_f32(v as u16)).collect()),
        // Narrow integers are stored widened to int32; take the low bits as the C++ runtime does.
        DType::I8 => Data::I64(i32s.iter().map(|&v| i64::from(v as i8)).collect()),
        DType::I16 => Data::I64(i32s.iter().map(|&v| i64::from(v as i16)).collect()),
        DType::I32 => Data::I64(i32s.iter().map(|&v| i64::from(v)).collect()),
        DType::U8 => Data::I64(i32s.iter().map(|&v| i64::from(v as u8)).collect()),
        DType::U16 => Data::I64(i32s.iter().map(|&v| i64::from(v as u16)).collect()),
        DType::Bool => Data::I64(i32s.iter().map(|&v| i64::from(v != 0)).collect()),
        DType::I64 => Data::I64(t.int64_data.clone()),
        DType::U32 => Data::I64(t.uint64_data.iter().map(|&v| i64::from(v as u32)).collect()),
        DType::U64 => Data::I64(t.uint64_data.iter().map(|&v| u64_to_i64(v, name)).collect::<Result<Vec<_>, _>>()?),
    })
}

fn u64_to_i64(v: u64, name: &str) -> Result<i64, OnnxError> {
    i64::try_from(v).map_err(|_| OnnxError::Tensor {
        name: name.to_string(),
        reason: format!("uint64 value {v} does not fit the int64 storage"),
    })
}

/// Decodes little-endian element bytes; `raw` must hold exactly `numel` elements.
fn decode_raw(raw: &[u8], dtype: DType, numel: usize, name: &str) -> Result<Data, OnnxError> {
    let size = dtype.size_of();
    let expected = numel.checked_mul(size);
    if expected != Some(raw.len()) {
        return Err(OnnxError::Tensor {
            name: name.to_string(),
            reason: format!(
                "raw data is {} bytes but {numel} {dtype} elements need {}",
                raw.len(),
                expected.map_or_else(|| "more than usize::MAX".to_string(), |e| e.to_string())
            ),
        });
    }
    fn le<const N: usize, T>(raw: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        raw.as_chunks::<N>().0.iter().map(|&c| f(c)).collect()
    }
    Ok(match dtype {
        DType::F32 => Data::F32(le(raw, f32::from_le_bytes)),
        DType::F64 => Data::F32(le(raw, |b| f64::from_le_bytes(b) as f32)),
        DType::F16 => Data::F32(le(raw, |b| f16_to_f32(u16::from_le_bytes(b)))),
        DType::BF16 => Data::F32(le(raw, |b| bf16_to_f32(u16::from_le_bytes(b)))),
        DType::I8 => Data::I64(le(raw, |b| i64::from(i8::from_le_bytes(b)))),
        DType::U8 => Data::I64(le(raw, |b: [u8; 1]| i64::from(b[0]))),
        DType::Bool => Data::I64(le(raw, |b: [u8; 1]| i64::from(b[0] != 0))),
        DType::I16 => Data::I64(le(raw, |b| i64::from(i16::from_le_bytes(b)))),
        DType::U16 => Data::I64(le(raw, |b| i64::from(u16::from_le_bytes(b)))),
        DType::I32 => Data::I64(le(raw, |b| i64::from(i32::from_le_bytes(b)))),
        DType::U32 => Data::I64(le(raw, |b| i64::from(u32::from_le_bytes(b)))),
        DType::I64 => Data::I64(le(raw, i64::from_le_bytes)),
        DType::U64 => {
            Data::I64(le(raw, u64::from_le_bytes).into_iter().map(|v| u64_to_i64(v, name)).collect::<Result<_, _>>()?)
        }
    })
}

/// Turns an external-data `location` into a path under `base`, refusing anything that could
/// leave it: absolute paths, drive prefixes, `..`. Both `/` and `\` count as separators so files
/// written on Windows load elsewhere.
fn safe_join(base: &Path, location: &str) -> Result<PathBuf, String> {
    if location.is_empty() {
        return Err("the location is empty".into());
    }
    if location.starts_with('/') || location.starts_with('\\') || location.contains(':') {
        return Err("absolute paths are not allowed".into());
    }
    let mut path = base.to_path_buf();
    let mut parts = 0;
    for part in location.split(['/', '\\']) {
        match part {
            "" | "." => continue,
            ".." => return Err("'..' is not allowed".into()),
            _ => {}
        }
        // Each part must be one plain component on this platform as well.
        let mut comps = Path::new(part).components();
        match (comps.next(), comps.next()) {
            (Some(Component::Normal(_)), None) => path.push(part),
            _ => return Err(format!("'{part}' is not a plain file or directory name")),
        }
        parts += 1;
    }
    if parts == 0 {
        return Err("the location names no file".into());
    }
    Ok(path)
}

fn read_external(
    t: &proto::TensorProto,
    name: &str,
    dtype: DType,
    numel: usize,
    base_dir: Option<&Path>,
) -> Result<Vec<u8>, OnnxError> {
    let mut location = None;
    let mut offset = None;
    let mut length = None;
    for e in &t.external_data {
        let key = e.key.as_deref().unwrap_or("");
        let value = e.value.as_deref().unwrap_or("");
        match key {
            "location" => location = Some(value),
            "offset" => offset = Some(value),
            "length" => length = Some(value),
            _ => {} // "checksum" and anything newer: not verified.
        }
    }
    let location = location.unwrap_or("");
    let xerr = |path: &Path, reason: String| OnnxError::ExternalData {
        name: name.to_string(),
        path: path.to_path_buf(),
        reason,
    };
    let Some(base) = base_dir else {
        return Err(xerr(Path::new(location), "the model was loaded from bytes, with no base directory".into()));
    };
    let path = safe_join(base, location).map_err(|r| xerr(Path::new(location), r))?;
    let parse = |key: &str, v: Option<&str>| -> Result<Option<u64>, OnnxError> {
        v.map(|s| s.trim().parse::<u64>().map_err(|_| xerr(&path, format!("{key} '{s}' is not a byte count"))))
            .transpose()
    };
    let offset = parse("offset", offset)?.unwrap_or(0);
    let length = parse("length", length)?;

    let expected = numel
        .checked_mul(dtype.size_of())
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| xerr(&path, format!("{numel} {dtype} elements are too many bytes")))?;
    if let Some(len) = length
        && len != expected
    {
        return Err(xerr(&path, format!("length is {len} bytes but {numel} {dtype} elements need {expected}")));
    }

    let (mut file, file_len) = open_confined(base, &path).map_err(|r| xerr(&path, r))?;
    offset.checked_add(expected).filter(|&end| end <= file_len).ok_or_else(|| {
        xerr(&path, format!("bytes {offset}..{offset}+{expected} lie beyond the end of the file ({file_len} bytes)"))
    })?;
    let count = usize::try_from(expected).map_err(|_| xerr(&path, "too large for this platform".into()))?;
    file.seek(SeekFrom::Start(offset)).map_err(|e| xerr(&path, e.to_string()))?;
    let mut buf = vec![0u8; count];
    file.read_exact(&mut buf).map_err(|e| xerr(&path, e.to_string()))?;
    Ok(buf)
}

/// What a non-regular file is, for the error message.
fn file_kind(ft: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_socket() {
            return "a socket";
        }
        if ft.is_block_device() || ft.is_char_device() {
            return "a device";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// Opens external data at `path` (already lexically under `base`) only if, with every link
/// resolved, it is a regular file inside `base`. Returns the open file and its size.
///
/// The lexical check alone is not enough: a symlink inside the model folder can point anywhere,
/// and a FIFO or device there blocks `open` (or a read) forever. So the target is canonicalized
/// and its type checked before opening; the open itself does not block (`O_NONBLOCK`, which
/// changes nothing for regular files), and the opened file must be the very file that was
/// checked (same device and inode), so swapping the path between check and open is caught.
fn open_confined(base: &Path, path: &Path) -> Result<(File, u64), String> {
    let base_real =
        base.canonicalize().map_err(|e| format!("cannot resolve the model's folder {}: {e}", base.display()))?;
    let real = path.canonicalize().map_err(|e| e.to_string())?;
    if !real.starts_with(&base_real) {
        return Err(format!(
            "resolves to {}, outside the model's folder {} (through a symbolic link)",
            real.display(),
            base_real.display()
        ));
    }
    let before = std::fs::metadata(&real).map_err(|e| e.to_string())?;
    if !before.is_file() {
        return Err(format!("is {}, not a regular file", file_kind(&before.file_type())));
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW);
    }
    let file = options.open(&real).map_err(|e| e.to_string())?;
    let after = file.metadata().map_err(|e| e.to_string())?;
    if !after.is_file() {
        return Err(format!("is {}, not a regular file", file_kind(&after.file_type())));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if (before.dev(), before.ino()) != (after.dev(), after.ino()) {
            return Err("changed while it was being opened".into());
        }
    }
    Ok((file, after.len()))
}

/// Makes a sparse initializer dense. Indices are either `[nnz]` linear offsets or `[nnz, rank]`
/// coordinates, as the spec allows.
fn densify(s: &proto::SparseTensorProto, name: &str, base_dir: Option<&Path>) -> Result<Tensor, OnnxError> {
    let terr = |reason: String| OnnxError::Tensor { name: name.to_string(), reason };
    let values = s.values.as_ref().ok_or_else(|| terr("sparse tensor has no values".into()))?;
    let values = decode_tensor(values, name, base_dir)?;
    let indices = match s.indices.as_ref() {
        Some(i) => decode_tensor(i, &format!("{name} (indices)"), base_dir)?,
        None => Tensor::i64(vec![0], Vec::new()),
    };
    let (shape, numel) = shape_of(&s.dims, name)?;
    if numel > MAX_SPARSE_DENSE_ELEMENTS {
        return Err(terr(format!("dense shape {shape:?} is too large for a sparse initializer")));
    }
    let nnz = values.numel();
    if values.shape.len() != 1 {
        return Err(terr(format!("sparse values must be 1-D, got shape {:?}", values.shape)));
    }
    let idx = match &indices.data {
        Data::I64(v) if indices.dtype == DType::I64 => v,
        _ => return Err(terr("sparse indices must be int64".into())),
    };
    let rank = shape.len();
    let linear: Vec<usize> = match indices.shape.as_slice() {
        [n] if *n == nnz => idx
            .iter()
            .map(|&i| usize::try_from(i).ok().filter(|&i| i < numel))
            .collect::<Option<_>>()
            .ok_or_else(|| terr("a sparse index is out of range".into()))?,
        // A scalar dense shape: every coordinate tuple is empty and names the one element.
        [n, 0] if *n == nnz && rank == 0 => vec![0; nnz],
        [n, r] if *n == nnz && *r == rank => {
            let mut out = Vec::with_capacity(nnz);
            for coords in idx.chunks_exact(rank) {
                let mut lin = 0usize;
                for (&c, &d) in coords.iter().zip(&shape) {
                    let c = usize::try_from(c)
                        .ok()
                        .filter(|&c| c < d)
                        .ok_or_else(|| terr(format!("sparse coordinate {coords:?} is outside shape {shape:?}")))?;
                    // lin < product of dims so far, which is <= numel: no overflow.
                    lin = lin * d + c;
                }
                out.push(lin);
            }
            out
        }
        other => {
            return Err(terr(format!("sparse indices shape {other:?} fits neither [{nnz}] nor [{nnz}, {rank}]")));
        }
    };
    let data = match &values.data {
        Data::F32(v) => {
            let mut d = vec![0f32; numel];
            for (&i, &x) in linear.iter().zip(v) {
                if let Some(slot) = d.get_mut(i) {
                    *slot = x;
                }
            }
            Data::F32(d)
        }
        Data::I64(v) => {
            let mut d = vec![0i64; numel];
            for (&i, &x) in linear.iter().zip(v) {
                if let Some(slot) = d.get_mut(i) {
                    *slot = x;
                }
            }
            Data::I64(d)
        }
    };
    Ok(Tensor { dtype: values.dtype, shape, data })
}

/// Encodes a host tensor as a `TensorProto` with `raw_data`, in the tensor's declared dtype.
/// Floats are rounded to nearest-even for f16/bf16; integers are truncated to the dtype's
/// width, as a cast would.
pub fn tensor_to_proto(t: &Tensor, name: &str) -> proto::TensorProto {
    let mut raw = Vec::with_capacity(t.numel().saturating_mul(t.dtype.size_of()));
    if t.dtype.is_float() {
        for x in t.to_f32_vec() {
            match t.dtype {
                DType::F64 => raw.extend_from_slice(&f64::from(x).to_le_bytes()),
                DType::F16 => raw.extend_from_slice(&f32_to_f16(x).to_le_bytes()),
                DType::BF16 => raw.extend_from_slice(&f32_to_bf16(x).to_le_bytes()),
                _ => raw.extend_from_slice(&x.to_le_bytes()),
            }
        }
    } else {
        for v in t.to_i64_vec() {
            match t.dtype {
                DType::I8 => raw.extend_from_slice(&(v as i8).to_le_bytes()),
                DType::U8 => raw.extend_from_slice(&(v as u8).to_le_bytes()),
                DType::Bool => raw.push(u8::from(v != 0)),
                DType::I16 => raw.extend_from_slice(&(v as i16).to_le_bytes()),
                DType::U16 => raw.extend_from_slice(&(v as u16).to_le_bytes()),
                DType::I32 => raw.extend_from_slice(&(v as i32).to_le_bytes()),
                DType::U32 => raw.extend_from_slice(&(v as u32).to_le_bytes()),
                _ => raw.extend_from_slice(&v.to_le_bytes()),
            }
        }
    }
    proto::TensorProto {
        dims: t.shape.iter().map(|&d| d as i64).collect(),
        data_type: Some(t.dtype.to_onnx()),
        name: Some(name.to_string()),
        raw_data: Some(raw),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Half-precision conversions
// ---------------------------------------------------------------------------------------------

/// IEEE binary16 bits to `f32` (exact: every half value is an `f32` value).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match exp {
        0 if man == 0 => sign,
        0 => {
            // Subnormal: man * 2^-24, exact in f32.
            let v = man as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -v } else { v };
        }
        0x1f => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// bfloat16 bits to `f32` (exact: bfloat16 is the top half of an `f32`).
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// `f32` to IEEE binary16 bits, rounding to nearest-even; overflow gives infinity and NaN stays
/// NaN.
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x007f_ffff;
    if exp == 0xff {
        let nan = if man != 0 { 0x0200 | (man >> 13) as u16 } else { 0 };
        return sign | 0x7c00 | nan;
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        // Subnormal half: the value in units of 2^-24 is m >> (14 - e), rounded.
        let m = man | 0x0080_0000;
        let shift = (14 - e) as u32;
        let half = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let halfway = 1 << (shift - 1);
        let r = if rem > halfway || (rem == halfway && half & 1 == 1) { half + 1 } else { half };
        return sign | r as u16;
    }
    let mut h = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && h & 1 == 1) {
        h += 1; // a carry into the exponent rounds up to the next binade or to infinity
    }
    sign | h as u16
}

/// `f32` to bfloat16 bits, rounding to nearest-even; NaN stays NaN.
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x0040) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}
