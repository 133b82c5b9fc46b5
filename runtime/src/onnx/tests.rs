use std::path::{Path, PathBuf};

use prost::Message;

use super::proto::{self, attribute_proto::AttributeType, tensor_proto::DataLocation};
use super::*;
use crate::tensor::{DType, Data, Tensor};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/onnx").join(name)
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("acclimate-onnx-{tag}-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// xorshift64*: a fixed-seed generator so fuzz-style tests are reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn entry(k: &str, v: &str) -> proto::StringStringEntryProto {
    proto::StringStringEntryProto { key: Some(k.into()), value: Some(v.into()) }
}

fn tensor_value_info(name: &str, elem: i32, dims: &[proto::tensor_shape_proto::Dimension]) -> proto::ValueInfoProto {
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
                elem_type: Some(elem),
                shape: Some(proto::TensorShapeProto { dim: dims.to_vec() }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

fn dim_value(v: i64) -> proto::tensor_shape_proto::Dimension {
    proto::tensor_shape_proto::Dimension {
        value: Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)),
        denotation: None,
    }
}

fn dim_param(p: &str) -> proto::tensor_shape_proto::Dimension {
    proto::tensor_shape_proto::Dimension {
        value: Some(proto::tensor_shape_proto::dimension::Value::DimParam(p.into())),
        denotation: None,
    }
}

fn attr(name: &str, ty: AttributeType) -> proto::AttributeProto {
    proto::AttributeProto { name: Some(name.into()), r#type: Some(ty as i32), ..Default::default() }
}

fn opset(domain: &str, version: i64) -> proto::OperatorSetIdProto {
    proto::OperatorSetIdProto { domain: Some(domain.into()), version: Some(version) }
}

/// A small model exercising every part of the conversion.
fn sample_model() -> proto::ModelProto {
    let w = Tensor::f32(vec![2, 3, 1, 1], vec![1.0, -2.0, 3.5, 0.25, 0.0, -0.5]);
    let bias = Tensor::f32(vec![2], vec![0.5, -0.5]);

    let mut conv = proto::NodeProto {
        input: vec!["x".into(), "W".into(), "B".into()],
        output: vec!["y".into()],
        op_type: Some("Conv".into()),
        ..Default::default()
    };
    let mut a = attr("strides", AttributeType::Ints);
    a.ints = vec![2, 2];
    conv.attribute.push(a);
    let mut a = attr("auto_pad", AttributeType::String);
    a.s = Some(b"NOTSET".to_vec());
    conv.attribute.push(a);
    let mut a = attr("group", AttributeType::Int);
    a.i = Some(1);
    conv.attribute.push(a);

    let mut clip = proto::NodeProto {
        input: vec!["y".into(), String::new(), "hi".into()],
        output: vec!["z".into()],
        op_type: Some("Clip".into()),
        name: Some("clip_node".into()),
        domain: Some("ai.onnx".into()),
        ..Default::default()
    };
    let mut a = attr("alpha", AttributeType::Float);
    a.f = Some(0.125);
    clip.attribute.push(a);
    let mut a = attr("scales", AttributeType::Floats);
    a.floats = vec![1.0, 2.5];
    clip.attribute.push(a);
    let mut a = attr("names", AttributeType::Strings);
    a.strings = vec![b"a".to_vec(), b"bc".to_vec()];
    clip.attribute.push(a);
    let mut a = attr("body", AttributeType::Graph);
    a.g = Some(proto::GraphProto::default());
    clip.attribute.push(a);

    let mut constant =
        proto::NodeProto { output: vec!["hi".into()], op_type: Some("Constant".into()), ..Default::default() };
    let mut a = attr("value", AttributeType::Tensor);
    a.t = Some(tensor_to_proto(&Tensor::f32(vec![], vec![6.0]), ""));
    constant.attribute.push(a);

    proto::ModelProto {
        ir_version: Some(8),
        opset_import: vec![opset("com.microsoft", 1), opset("", 13)],
        producer_name: Some("unit-test".into()),
        producer_version: Some("1.0".into()),
        graph: Some(proto::GraphProto {
            name: Some("g".into()),
            node: vec![constant, conv, clip],
            initializer: vec![tensor_to_proto(&w, "W"), tensor_to_proto(&bias, "B")],
            input: vec![
                tensor_value_info(
                    "x",
                    1,
                    &[dim_param("N"), dim_value(3), proto::tensor_shape_proto::Dimension::default(), dim_value(-1)],
                ),
                tensor_value_info("W", 1, &[dim_value(2), dim_value(3), dim_value(1), dim_value(1)]),
            ],
            output: vec![tensor_value_info("z", 1, &[dim_param("N"), dim_value(2)])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn tensor_err(t: &proto::TensorProto, base: Option<&Path>) -> String {
    match tensor_from_proto(t, base) {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Models
// ---------------------------------------------------------------------------------------------

#[test]
fn decodes_a_model_built_with_prost() {
    let bytes = sample_model().encode_to_vec();
    let m = load_model_bytes(&bytes, None).unwrap();
    assert_eq!(m.ir_version, 8);
    assert_eq!(m.opset, 13);
    assert_eq!(m.producer, "unit-test 1.0");
    assert_eq!(m.graph.name, "g");

    // "W" is an initializer, so it is not a graph input a caller must feed.
    assert_eq!(m.graph.inputs.len(), 1);
    let x = &m.graph.inputs[0];
    assert_eq!(x.name, "x");
    assert_eq!(x.dtype, Some(DType::F32));
    assert_eq!(x.shape, Some(vec![DimSpec::Sym("N".into()), DimSpec::Fixed(3), DimSpec::Unknown, DimSpec::Unknown]));
    assert_eq!(m.graph.outputs.len(), 1);
    assert_eq!(m.graph.outputs[0].shape, Some(vec![DimSpec::Sym("N".into()), DimSpec::Fixed(2)]));

    let names: Vec<_> = m.graph.initializers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["W", "B"]);
    assert_eq!(m.graph.initializers[0].1, Tensor::f32(vec![2, 3, 1, 1], vec![1.0, -2.0, 3.5, 0.25, 0.0, -0.5]));

    let nodes = &m.graph.nodes;
    assert_eq!(nodes.len(), 3);
    assert_eq!(nodes[0].name, "Constant_0");
    assert_eq!(nodes[0].attrs["value"], Attr::Tensor(Tensor::f32(vec![], vec![6.0])));
    assert_eq!(nodes[1].name, "Conv_1");
    assert_eq!(nodes[1].op_type, "Conv");
    assert_eq!(nodes[1].domain, "");
    assert_eq!(nodes[1].inputs, ["x", "W", "B"]);
    assert_eq!(nodes[1].attrs["strides"], Attr::Ints(vec![2, 2]));
    assert_eq!(nodes[1].attrs["auto_pad"], Attr::String("NOTSET".into()));
    assert_eq!(nodes[1].attrs["group"], Attr::Int(1));

    let clip = &nodes[2];
    assert_eq!(clip.name, "clip_node");
    assert_eq!(clip.domain, "ai.onnx");
    assert_eq!(clip.inputs, ["y", "", "hi"], "omitted optional inputs keep their slot");
    assert_eq!(clip.outputs, ["z"]);
    assert_eq!(clip.attrs["alpha"], Attr::Float(0.125));
    assert_eq!(clip.attrs["scales"], Attr::Floats(vec![1.0, 2.5]));
    assert_eq!(clip.attrs["names"], Attr::Strings(vec!["a".into(), "bc".into()]));
    assert_eq!(clip.attrs["body"], Attr::Other("graph"));
}

#[test]
fn opset_resolution() {
    let mut m = sample_model();
    m.opset_import = vec![opset("ai.onnx", 17)];
    assert_eq!(load_model_bytes(&m.encode_to_vec(), None).unwrap().opset, 17);

    m.opset_import = vec![opset("ai.onnx", 17), opset("", 17)];
    assert_eq!(load_model_bytes(&m.encode_to_vec(), None).unwrap().opset, 17);

    m.opset_import = vec![opset("ai.onnx", 17), opset("", 13)];
    let e = load_model_bytes(&m.encode_to_vec(), None).unwrap_err();
    assert!(matches!(e, OnnxError::ConflictingOpsets(17, 13)), "{e}");

    m.opset_import = vec![opset("com.microsoft", 1)];
    let e = load_model_bytes(&m.encode_to_vec(), None).unwrap_err();
    assert!(matches!(e, OnnxError::NoDefaultOpset), "{e}");

    let mut m = sample_model();
    m.graph = None;
    let e = load_model_bytes(&m.encode_to_vec(), None).unwrap_err();
    assert!(matches!(e, OnnxError::NoGraph), "{e}");
}

#[test]
fn graph_and_node_validation() {
    let mut m = sample_model();
    let g = m.graph.as_mut().unwrap();
    let dup = g.initializer[0].clone();
    g.initializer.push(dup);
    let e = load_model_bytes(&m.encode_to_vec(), None).unwrap_err();
    assert!(e.to_string().contains("initializer 'W' is defined twice"), "{e}");

    let mut m = sample_model();
    m.graph.as_mut().unwrap().node[1].op_type = None;
    let e = load_model_bytes(&m.encode_to_vec(), None).unwrap_err();
    assert!(matches!(e, OnnxError::Node { .. }), "{e}");

    let mut m = sample_model();
    let node = &mut m.graph.as_mut().unwrap().node[1];
    let again = node.attribute[0].clone();
    node.attribute.push(again);
    let e = load_model_bytes(&m.encode_to_vec(), None).unwrap_err();
    assert!(e.to_string().contains("'strides'") && e.to_string().contains("twice"), "{e}");

    let mut m = sample_model();
    m.graph.as_mut().unwrap().node[1].attribute[1].s = Some(vec![0xff, 0xfe]);
    let e = load_model_bytes(&m.encode_to_vec(), None).unwrap_err();
    assert!(e.to_string().contains("UTF-8"), "{e}");

    let mut m = sample_model();
    m.graph.as_mut().unwrap().node[1].attribute[0].r#type = Some(99);
    let e = load_model_bytes(&m.encode_to_vec(), None).unwrap_err();
    assert!(e.to_string().contains("unknown attribute type code 99"), "{e}");

    let mut m = sample_model();
    m.graph.as_mut().unwrap().node[1].attribute[0].ref_attr_name = Some("outer".into());
    assert!(load_model_bytes(&m.encode_to_vec(), None).is_err());
}

#[test]
fn attribute_kind_inferred_when_type_is_missing() {
    let mut m = sample_model();
    for a in &mut m.graph.as_mut().unwrap().node[1].attribute {
        a.r#type = None;
    }
    let raw = load_model_bytes(&m.encode_to_vec(), None).unwrap();
    let conv = &raw.graph.nodes[1];
    assert_eq!(conv.attrs["strides"], Attr::Ints(vec![2, 2]));
    assert_eq!(conv.attrs["auto_pad"], Attr::String("NOTSET".into()));
    assert_eq!(conv.attrs["group"], Attr::Int(1));

    let mut m = sample_model();
    m.graph.as_mut().unwrap().node[1]
        .attribute
        .push(proto::AttributeProto { name: Some("empty".into()), ..Default::default() });
    let e = load_model_bytes(&m.encode_to_vec(), None).unwrap_err();
    assert!(e.to_string().contains("neither a type nor a value"), "{e}");
}

#[test]
fn conv_fixture_from_the_onnx_test_suite() {
    let m = load_model(&fixture("conv_with_strides_padding.onnx")).unwrap();
    assert_eq!(m.ir_version, 10);
    assert_eq!(m.opset, 22);
    assert_eq!(m.producer, "backend-test");
    assert_eq!(m.graph.name, "test_conv_with_strides_padding");
    assert!(m.graph.initializers.is_empty());
    let fixed = |d: &[u64]| Some(d.iter().map(|&v| DimSpec::Fixed(v)).collect::<Vec<_>>());
    let ins: Vec<_> = m.graph.inputs.iter().map(|v| (v.name.as_str(), v.dtype, v.shape.clone())).collect();
    assert_eq!(ins, [("x", Some(DType::F32), fixed(&[1, 1, 7, 5])), ("W", Some(DType::F32), fixed(&[1, 1, 3, 3]))]);
    assert_eq!(m.graph.outputs.len(), 1);
    assert_eq!(m.graph.outputs[0].name, "y");
    assert_eq!(m.graph.outputs[0].shape, fixed(&[1, 1, 4, 3]));

    assert_eq!(m.graph.nodes.len(), 1);
    let n = &m.graph.nodes[0];
    assert_eq!(n.name, "Conv_0");
    assert_eq!(n.op_type, "Conv");
    assert_eq!(n.domain, "");
    assert_eq!(n.inputs, ["x", "W"]);
    assert_eq!(n.outputs, ["y"]);
    assert_eq!(n.attrs.len(), 3);
    assert_eq!(n.attrs["kernel_shape"], Attr::Ints(vec![3, 3]));
    assert_eq!(n.attrs["pads"], Attr::Ints(vec![1, 1, 1, 1]));
    assert_eq!(n.attrs["strides"], Attr::Ints(vec![2, 2]));

    // The matching weight tensor, as the ONNX tooling wrote it.
    let bytes = std::fs::read(fixture("conv_with_strides_padding_W.pb")).unwrap();
    let t = tensor_from_proto(&proto::TensorProto::decode(bytes.as_slice()).unwrap(), None).unwrap();
    assert_eq!(t, Tensor::f32(vec![1, 1, 3, 3], vec![1.0; 9]));
}

#[test]
fn missing_file_is_an_io_error() {
    let path = std::env::temp_dir().join("acclimate-onnx-no-such-model.onnx");
    let e = load_model(&path).unwrap_err();
    assert!(matches!(&e, OnnxError::Io { path: p, .. } if *p == path), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Tensors
// ---------------------------------------------------------------------------------------------

/// The same values of each dtype, as a host tensor and in the typed field the spec assigns.
fn typed_cases() -> Vec<(Tensor, proto::TensorProto)> {
    let mk = |dtype: DType, data: Data| Tensor { dtype, shape: vec![2, 2], data };
    let base = |dtype: DType| proto::TensorProto {
        dims: vec![2, 2],
        data_type: Some(dtype.to_onnx()),
        name: Some(format!("t_{dtype}")),
        ..Default::default()
    };
    let f = vec![1.5f32, -0.0, 65504.0, -3.25e-3];
    let bf = vec![1.5f32, -0.0, 3.140625, -123.5];
    let mut out = Vec::new();

    let mut p = base(DType::F32);
    p.float_data = f.clone();
    out.push((mk(DType::F32, Data::F32(f.clone())), p));

    let mut p = base(DType::F64);
    p.double_data = f.iter().map(|&x| f64::from(x)).collect();
    out.push((mk(DType::F64, Data::F32(f.clone())), p));

    // Exactly representable in f16 (-3.25e-3 is not, so use its rounded value).
    let h = vec![1.5f32, -0.0, 65504.0, f16_to_f32(f32_to_f16(-3.25e-3))];
    let mut p = base(DType::F16);
    p.int32_data = h.iter().map(|&x| i32::from(f32_to_f16(x))).collect();
    out.push((mk(DType::F16, Data::F32(h)), p));

    let mut p = base(DType::BF16);
    p.int32_data = bf.iter().map(|&x| i32::from(f32_to_bf16(x))).collect();
    out.push((mk(DType::BF16, Data::F32(bf)), p));

    let ints: [(DType, [i64; 4]); 7] = [
        (DType::I8, [-128, -1, 0, 127]),
        (DType::U8, [0, 1, 200, 255]),
        (DType::I16, [-32768, -2, 3, 32767]),
        (DType::U16, [0, 7, 40000, 65535]),
        (DType::I32, [i64::from(i32::MIN), -5, 6, i64::from(i32::MAX)]),
        (DType::Bool, [1, 0, 0, 1]),
        (DType::I64, [i64::MIN, -1, 1, i64::MAX]),
    ];
    for (dtype, v) in ints {
        let mut p = base(dtype);
        if dtype == DType::I64 {
            p.int64_data = v.to_vec();
        } else {
            // Narrow types are stored widened; uint8/uint16 as their non-negative value.
            p.int32_data = v.iter().map(|&x| x as i32).collect();
        }
        out.push((mk(dtype, Data::I64(v.to_vec())), p));
    }
    for (dtype, v) in
        [(DType::U32, [0i64, 1, 3_000_000_000, i64::from(u32::MAX)]), (DType::U64, [0, 1, 1 << 40, i64::MAX])]
    {
        let mut p = base(dtype);
        p.uint64_data = v.iter().map(|&x| x as u64).collect();
        out.push((mk(dtype, Data::I64(v.to_vec())), p));
    }
    out
}

#[test]
fn raw_and_typed_fields_give_the_same_tensor() {
    let cases = typed_cases();
    assert_eq!(cases.len(), 13, "one case per DType");
    for (expected, typed) in cases {
        let dtype = expected.dtype;
        let from_typed = tensor_from_proto(&typed, None).unwrap_or_else(|e| panic!("{dtype}: {e}"));
        assert_eq!(from_typed, expected, "{dtype} typed");
        let raw = tensor_to_proto(&expected, "r");
        assert_eq!(raw.raw_data.as_ref().map(Vec::len), Some(4 * dtype.size_of()), "{dtype}");
        let from_raw = tensor_from_proto(&raw, None).unwrap_or_else(|e| panic!("{dtype}: {e}"));
        assert_eq!(from_raw, expected, "{dtype} raw");
        // Bit-exact for floats too (e.g. -0.0 keeps its sign).
        if let (Data::F32(a), Data::F32(b)) = (&from_raw.data, &from_typed.data) {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(a), bits(b), "{dtype}");
        }
    }
}

#[test]
fn raw_data_is_little_endian() {
    let mk = |dtype: DType, raw: Vec<u8>, dims: Vec<i64>| proto::TensorProto {
        dims,
        data_type: Some(dtype.to_onnx()),
        raw_data: Some(raw),
        ..Default::default()
    };
    let t = tensor_from_proto(&mk(DType::F32, vec![0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0], vec![2]), None).unwrap();
    assert_eq!(t.data, Data::F32(vec![1.0, -2.0]));
    let t = tensor_from_proto(&mk(DType::I32, vec![0xfe, 0xff, 0xff, 0xff, 1, 2, 0, 0], vec![2]), None).unwrap();
    assert_eq!(t.data, Data::I64(vec![-2, 0x201]));
    let t = tensor_from_proto(&mk(DType::F16, vec![0x00, 0x3c, 0x00, 0xc0], vec![2]), None).unwrap();
    assert_eq!(t.data, Data::F32(vec![1.0, -2.0]));
    let t = tensor_from_proto(&mk(DType::BF16, vec![0x80, 0x3f, 0x49, 0x40], vec![2]), None).unwrap();
    assert_eq!(t.data, Data::F32(vec![1.0, 3.140625]));
    let t = tensor_from_proto(&mk(DType::Bool, vec![0, 1, 7], vec![3]), None).unwrap();
    assert_eq!(t.data, Data::I64(vec![0, 1, 1]));
    let t = tensor_from_proto(&mk(DType::U64, 5u64.to_le_bytes().to_vec(), vec![1]), None).unwrap();
    assert_eq!(t.data, Data::I64(vec![5]));
}

#[test]
fn scalar_and_empty_tensors() {
    let p = proto::TensorProto { data_type: Some(1), float_data: vec![2.5], ..Default::default() };
    let t = tensor_from_proto(&p, None).unwrap();
    assert_eq!(t.shape, Vec::<usize>::new());
    assert_eq!(t.data, Data::F32(vec![2.5]));

    let p =
        proto::TensorProto { data_type: Some(7), raw_data: Some(9i64.to_le_bytes().to_vec()), ..Default::default() };
    assert_eq!(tensor_from_proto(&p, None).unwrap(), Tensor::i64(vec![], vec![9]));

    // A scalar needs its one value.
    let p = proto::TensorProto { data_type: Some(1), ..Default::default() };
    assert!(tensor_from_proto(&p, None).is_err());

    // Zero elements: no data needed, either way.
    let p = proto::TensorProto { dims: vec![3, 0], data_type: Some(7), ..Default::default() };
    assert_eq!(tensor_from_proto(&p, None).unwrap(), Tensor::i64(vec![3, 0], vec![]));
    let p = proto::TensorProto { dims: vec![0], data_type: Some(1), raw_data: Some(vec![]), ..Default::default() };
    assert_eq!(tensor_from_proto(&p, None).unwrap(), Tensor::f32(vec![0], vec![]));
}

#[test]
fn half_precision_known_values() {
    let cases: [(u16, f32); 12] = [
        (0x0000, 0.0),
        (0x3c00, 1.0),
        (0xc000, -2.0),
        (0x3555, 0.333_251_95),
        (0x7bff, 65504.0),
        (0xfbff, -65504.0),
        (0x0400, 6.103_515_6e-5), // smallest normal, 2^-14
        (0x0001, 5.960_464_5e-8), // smallest subnormal, 2^-24
        (0x03ff, 6.097_555e-5),   // largest subnormal
        (0x8001, -5.960_464_5e-8),
        (0x7c00, f32::INFINITY),
        (0xfc00, f32::NEG_INFINITY),
    ];
    for (bits, v) in cases {
        assert_eq!(f16_to_f32(bits), v, "{bits:#06x}");
        assert_eq!(f32_to_f16(v), bits, "{v}");
    }
    assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
    assert!(f16_to_f32(0x7e00).is_nan());
    assert!(f16_to_f32(0x7c01).is_nan());
    assert_eq!(f32_to_f16(f32::NAN) & 0x7c00, 0x7c00);
    assert_ne!(f32_to_f16(f32::NAN) & 0x03ff, 0);

    // Rounding: nearest, ties to even; overflow to infinity; underflow to zero.
    assert_eq!(f32_to_f16(1.0 + 1.0 / 2048.0), 0x3c00); // tie, rounds down to even
    assert_eq!(f32_to_f16(1.0 + 3.0 / 2048.0), 0x3c02); // tie, rounds up to even
    assert_eq!(f32_to_f16(65520.0), 0x7c00);
    assert_eq!(f32_to_f16(65519.0), 0x7bff);
    assert_eq!(f32_to_f16(2.0f32.powi(-25)), 0x0000); // tie between 0 and the smallest subnormal
    assert_eq!(f32_to_f16(2.0f32.powi(-25) * 1.5), 0x0001);
    assert_eq!(f32_to_f16(1e-10), 0x0000);
    assert_eq!(f32_to_f16(-1e-10), 0x8000);

    // Every finite or infinite half survives the round trip through f32.
    for bits in 0..=u16::MAX {
        let v = f16_to_f32(bits);
        if v.is_nan() {
            assert!(f16_to_f32(f32_to_f16(v)).is_nan());
        } else {
            assert_eq!(f32_to_f16(v), bits, "{bits:#06x}");
        }
    }
}

#[test]
fn bfloat16_known_values() {
    let cases: [(u16, f32); 6] =
        [(0x0000, 0.0), (0x3f80, 1.0), (0xc000, -2.0), (0x4049, 3.140625), (0xc2f7, -123.5), (0x7f80, f32::INFINITY)];
    for (bits, v) in cases {
        assert_eq!(bf16_to_f32(bits), v, "{bits:#06x}");
        assert_eq!(f32_to_bf16(v), bits, "{v}");
    }
    assert_eq!(f32_to_bf16(std::f32::consts::PI), 0x4049); // 3.14159... rounds to 3.140625
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80); // tie to even
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82); // tie to even
    assert_eq!(f32_to_bf16(f32::MAX), 0x7f80);
    assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    for bits in 0..=u16::MAX {
        let v = bf16_to_f32(bits);
        if !v.is_nan() {
            assert_eq!(f32_to_bf16(v), bits);
        }
    }
}

#[test]
fn element_count_must_match_the_shape() {
    let mut p = tensor_to_proto(&Tensor::f32(vec![2, 3], vec![0.0; 6]), "short");
    p.raw_data.as_mut().unwrap().truncate(20);
    let e = tensor_err(&p, None);
    assert!(e.contains("'short'") && e.contains("20 bytes") && e.contains("24"), "{e}");

    let p = proto::TensorProto {
        name: Some("typed".into()),
        dims: vec![2, 2],
        data_type: Some(1),
        float_data: vec![1.0; 5],
        ..Default::default()
    };
    let e = tensor_err(&p, None);
    assert!(e.contains("'typed'") && e.contains("5 values") && e.contains("needs 4"), "{e}");

    let mut p = tensor_to_proto(&Tensor::i64(vec![4], vec![1, 2, 3, 4]), "dims");
    p.dims = vec![5];
    assert!(tensor_err(&p, None).contains("'dims'"));
}

#[test]
fn bad_shapes_and_storage_are_rejected() {
    // Product overflows usize.
    let p = proto::TensorProto {
        name: Some("huge".into()),
        dims: vec![i64::MAX, i64::MAX, 4],
        data_type: Some(1),
        raw_data: Some(vec![0; 16]),
        ..Default::default()
    };
    assert!(tensor_err(&p, None).contains("too many elements"));
    // Product fits usize but its byte size does not.
    let p = proto::TensorProto {
        dims: vec![1 << 62],
        data_type: Some(1),
        raw_data: Some(vec![0; 4]),
        ..Default::default()
    };
    assert!(tensor_from_proto(&p, None).is_err());

    let p =
        proto::TensorProto { name: Some("neg".into()), dims: vec![2, -1], data_type: Some(1), ..Default::default() };
    assert!(tensor_err(&p, None).contains("negative dimension -1"));

    // Two storages at once.
    let mut p = tensor_to_proto(&Tensor::f32(vec![1], vec![1.0]), "both");
    p.float_data = vec![1.0];
    assert!(tensor_err(&p, None).contains("more than one field"));

    // The wrong typed field for the dtype.
    let p = proto::TensorProto { dims: vec![1], data_type: Some(7), int32_data: vec![3], ..Default::default() };
    assert!(tensor_err(&p, None).contains("int64_data"));

    // uint64 beyond the i64 storage.
    let p =
        proto::TensorProto { dims: vec![1], data_type: Some(13), uint64_data: vec![u64::MAX], ..Default::default() };
    assert!(tensor_err(&p, None).contains("does not fit"));

    let p = proto::TensorProto {
        dims: vec![1],
        data_type: Some(1),
        float_data: vec![1.0],
        segment: Some(proto::tensor_proto::Segment { begin: Some(0), end: Some(1) }),
        ..Default::default()
    };
    assert!(tensor_err(&p, None).contains("segmented"));

    let mut p = tensor_to_proto(&Tensor::f32(vec![1], vec![1.0]), "loc");
    p.data_location = Some(7);
    assert!(tensor_err(&p, None).contains("unknown data_location"));
}

#[test]
fn unsupported_dtypes_name_tensor_and_code() {
    for (code, label) in
        [(8, "STRING"), (14, "COMPLEX64"), (15, "COMPLEX128"), (17, "FLOAT8E4M3FN"), (0, "UNDEFINED"), (77, "unknown")]
    {
        let p = proto::TensorProto {
            name: Some("odd".into()),
            dims: vec![1],
            data_type: Some(code),
            raw_data: Some(vec![0; 16]),
            ..Default::default()
        };
        let e = tensor_err(&p, None);
        assert!(e.contains("'odd'") && e.contains(label) && e.contains(&format!("code {code}")), "{e}");
    }
}

#[test]
fn sparse_initializers_are_made_dense() {
    let values = tensor_to_proto(&Tensor::f32(vec![2], vec![5.0, 7.0]), "S");
    let mut m = sample_model();
    let g = m.graph.as_mut().unwrap();
    g.sparse_initializer.push(proto::SparseTensorProto {
        values: Some(values.clone()),
        indices: Some(tensor_to_proto(&Tensor::i64(vec![2], vec![1, 5]), "")),
        dims: vec![2, 3],
    });
    g.sparse_initializer.push(proto::SparseTensorProto {
        values: Some(tensor_to_proto(&Tensor::f32(vec![2], vec![5.0, 7.0]), "S2")),
        indices: Some(tensor_to_proto(&Tensor::i64(vec![2, 2], vec![0, 1, 1, 2]), "")),
        dims: vec![2, 3],
    });
    g.sparse_initializer.push(proto::SparseTensorProto {
        values: Some(tensor_to_proto(&Tensor::i64(vec![1], vec![-4]), "S3")),
        indices: Some(tensor_to_proto(&Tensor::i64(vec![1, 0], vec![]), "")),
        dims: vec![],
    });
    let raw = load_model_bytes(&m.encode_to_vec(), None).unwrap();
    let inits = &raw.graph.initializers;
    assert_eq!(inits[4], ("S3".into(), Tensor::i64(vec![], vec![-4])));
    assert_eq!(inits[2], ("S".into(), Tensor::f32(vec![2, 3], vec![0.0, 5.0, 0.0, 0.0, 0.0, 7.0])));
    assert_eq!(inits[3], ("S2".into(), Tensor::f32(vec![2, 3], vec![0.0, 5.0, 0.0, 0.0, 0.0, 7.0])));

    for (indices, dims) in [
        (Tensor::i64(vec![2], vec![1, 6]), vec![2, 3]), // linear index out of range
        (Tensor::i64(vec![2, 2], vec![0, 1, 2, 0]), vec![2, 3]), // coordinate out of range
        (Tensor::i64(vec![3], vec![0, 1, 2]), vec![2, 3]), // wrong count
        (Tensor::i64(vec![2], vec![0, 1]), vec![1 << 20, 1 << 20]), // too large to densify
    ] {
        let mut m = sample_model();
        m.graph.as_mut().unwrap().sparse_initializer.push(proto::SparseTensorProto {
            values: Some(values.clone()),
            indices: Some(tensor_to_proto(&indices, "")),
            dims,
        });
        assert!(load_model_bytes(&m.encode_to_vec(), None).is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// External data
// ---------------------------------------------------------------------------------------------

fn external(name: &str, dtype: DType, dims: Vec<i64>, entries: &[(&str, &str)]) -> proto::TensorProto {
    proto::TensorProto {
        name: Some(name.into()),
        dims,
        data_type: Some(dtype.to_onnx()),
        data_location: Some(DataLocation::External as i32),
        external_data: entries.iter().map(|(k, v)| entry(k, v)).collect(),
        ..Default::default()
    }
}

#[test]
fn external_data_round_trip() {
    let dir = TempDir::new("ext");
    let w = Tensor::f32(vec![2, 3, 1, 1], vec![1.0, -2.0, 3.5, 0.25, 0.0, -0.5]);
    let b = Tensor { dtype: DType::F16, shape: vec![2], data: Data::F32(vec![0.5, -0.5]) };
    let w_raw = tensor_to_proto(&w, "W").raw_data.unwrap();
    let b_raw = tensor_to_proto(&b, "B").raw_data.unwrap();

    // One shared data file in a subdirectory: 3 junk bytes, W, then B.
    std::fs::create_dir_all(dir.0.join("weights")).unwrap();
    let mut blob = vec![0xaa, 0xbb, 0xcc];
    blob.extend_from_slice(&w_raw);
    let b_off = blob.len();
    blob.extend_from_slice(&b_raw);
    std::fs::write(dir.0.join("weights/model.bin"), &blob).unwrap();

    let mut m = sample_model();
    let g = m.graph.as_mut().unwrap();
    g.initializer = vec![
        external(
            "W",
            DType::F32,
            vec![2, 3, 1, 1],
            &[("location", "weights/model.bin"), ("offset", "3"), ("length", "24")],
        ),
        // Windows separators, no length: reads exactly what the shape needs.
        external(
            "B",
            DType::F16,
            vec![2],
            &[("location", "weights\\model.bin"), ("offset", &b_off.to_string()), ("checksum", "x")],
        ),
    ];
    let model_path = dir.0.join("model.onnx");
    std::fs::write(&model_path, m.encode_to_vec()).unwrap();

    let raw = load_model(&model_path).unwrap();
    assert_eq!(raw.graph.initializers[0], ("W".to_string(), w.clone()));
    assert_eq!(raw.graph.initializers[1], ("B".to_string(), b));

    // The same through the tensor API, and from bytes with an explicit base directory.
    assert_eq!(tensor_from_proto(&m.graph.as_ref().unwrap().initializer[0], Some(&dir.0)).unwrap(), w);
    assert!(load_model_bytes(&m.encode_to_vec(), Some(&dir.0)).is_ok());

    // Without a base directory, external data cannot be found.
    let e = load_model_bytes(&m.encode_to_vec(), None).unwrap_err();
    assert!(matches!(e, OnnxError::ExternalData { .. }), "{e}");
}

#[test]
fn external_data_errors() {
    let dir = TempDir::new("ext-err");
    std::fs::write(dir.0.join("d.bin"), [0u8; 16]).unwrap();
    let base = Some(dir.0.as_path());
    let check = |entries: &[(&str, &str)], want: &str| {
        let t = external("T", DType::F32, vec![2], entries);
        let e = tensor_from_proto(&t, base).unwrap_err();
        assert!(matches!(e, OnnxError::ExternalData { .. }), "{e}");
        assert!(e.to_string().contains(want), "{entries:?}: {e}");
    };
    check(&[("location", "d.bin"), ("length", "12")], "length is 12 bytes");
    check(&[("location", "d.bin"), ("offset", "12")], "beyond the end of the file");
    check(&[("location", "d.bin"), ("offset", &u64::MAX.to_string())], "beyond the end");
    check(&[("location", "d.bin"), ("offset", "-1")], "not a byte count");
    check(&[("location", "missing.bin")], "missing.bin");
    check(&[("offset", "0")], "empty");

    // Ok at the very end of the file.
    let t = external("T", DType::F32, vec![2], &[("location", "d.bin"), ("offset", "8"), ("length", "8")]);
    assert_eq!(tensor_from_proto(&t, base).unwrap(), Tensor::f32(vec![2], vec![0.0, 0.0]));

    // External data plus inline data is contradictory.
    let mut t = external("T", DType::F32, vec![2], &[("location", "d.bin")]);
    t.raw_data = Some(vec![0; 8]);
    assert!(tensor_from_proto(&t, base).unwrap_err().to_string().contains("also set"));
}

#[test]
fn external_data_path_traversal_is_rejected() {
    let root = TempDir::new("trav");
    let inner = root.0.join("model");
    std::fs::create_dir_all(&inner).unwrap();
    // A real file outside the model directory, so only the path check can stop it.
    std::fs::write(root.0.join("secret.bin"), [0u8; 8]).unwrap();
    let secret = root.0.join("secret.bin");
    let absolute = secret.to_string_lossy().into_owned();
    for location in [
        "../secret.bin",
        "..\\secret.bin",
        "./../secret.bin",
        "sub/../../secret.bin",
        "sub/..",
        "..",
        "/etc/passwd",
        "\\\\server\\share\\x.bin",
        "C:\\secret.bin",
        "C:secret.bin",
        absolute.as_str(),
        ".",
        "./",
    ] {
        let t = external("T", DType::F32, vec![2], &[("location", location)]);
        match tensor_from_proto(&t, Some(&inner)) {
            Err(OnnxError::ExternalData { .. }) => {}
            other => panic!("location {location:?} was not rejected: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Robustness: malformed bytes never panic
// ---------------------------------------------------------------------------------------------

#[test]
fn every_prefix_of_a_model_decodes_or_errors() {
    let bytes = sample_model().encode_to_vec();
    assert!(bytes.len() > 100);
    let mut errors = 0;
    for n in 0..bytes.len() {
        if load_model_bytes(&bytes[..n], None).is_err() {
            errors += 1;
        }
    }
    assert!(errors > 0);
    let e = load_model_bytes(&bytes[..bytes.len() / 2], None).unwrap_err();
    if matches!(e, OnnxError::Decode(_)) {
        assert!(e.to_string().starts_with("malformed or truncated ONNX protobuf: "), "{e}");
    }
}

#[test]
fn random_and_mutated_bytes_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..3000 {
        let len = rng.below(300);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let _ = load_model_bytes(&bytes, None);
        let _ = proto::TensorProto::decode(bytes.as_slice()).map(|t| tensor_from_proto(&t, None));
    }
    // Mutations of a valid model reach much deeper than random bytes.
    let model = sample_model().encode_to_vec();
    let mut decoded = 0usize;
    for _ in 0..5000 {
        let mut bytes = model.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(bytes.len());
            match rng.below(3) {
                0 => bytes[i] = rng.next() as u8,
                1 => bytes[i] ^= 1 << rng.below(8),
                _ => {
                    bytes.truncate(i);
                    if bytes.is_empty() {
                        break;
                    }
                }
            }
        }
        decoded += usize::from(load_model_bytes(&bytes, None).is_ok());
    }
    // Some mutants must survive decoding, or the conversion code was never exercised.
    assert!(decoded > 100, "only {decoded} mutants decoded");
}
