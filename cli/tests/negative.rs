//! Bad models and bad inputs end as errors that say what is wrong, never as panics.
//!
//! Each case asserts both that loading or running fails and what the message names, so a
//! regression to a generic message (or to a panic, which fails the test by itself) is caught.

mod common;

use acclimate::GpuContext;
use acclimate::onnx::proto;
use acclimate::ops::{OpReason, Stage};
use acclimate::{Engine, ErrorKind, Model, Tensor};
use acclimate_test_macros::gpu_test;
use prost::Message;

/// A float32 value with a fixed shape; a negative dimension becomes the symbolic "N".
fn value_info(name: &str, dims: &[i64]) -> proto::ValueInfoProto {
    use proto::tensor_shape_proto::{Dimension, dimension::Value};
    let dim = dims
        .iter()
        .map(|&d| Dimension {
            value: Some(if d < 0 { Value::DimParam("N".into()) } else { Value::DimValue(d) }),
            ..Default::default()
        })
        .collect();
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(proto::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> proto::NodeProto {
    proto::NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// An opset-13 model with input "x" [N, 4] and output "y" [N, 4].
fn model_bytes(nodes: Vec<proto::NodeProto>) -> Vec<u8> {
    proto::ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto { domain: Some(String::new()), version: Some(13) }],
        producer_name: Some("acclimate-negative-tests".into()),
        graph: Some(proto::GraphProto {
            name: Some("g".into()),
            node: nodes,
            input: vec![value_info("x", &[-1, 4])],
            output: vec![value_info("y", &[-1, 4])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// A 1-D int64 initializer (shapes, axes, repeats, pads).
fn i64_initializer(name: &str, v: &[i64]) -> proto::TensorProto {
    proto::TensorProto {
        name: Some(name.into()),
        dims: vec![v.len() as i64],
        data_type: Some(7),
        int64_data: v.to_vec(),
        ..Default::default()
    }
}

fn relu_model() -> Vec<u8> {
    model_bytes(vec![node("Relu", "relu0", &["x"], &["y"])])
}

fn load_err(bytes: &[u8]) -> String {
    match Model::from_bytes(bytes) {
        Ok(_) => panic!("a bad model ({} bytes) loaded", bytes.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_valid_tiny_model_loads() {
    // Guards the cases below: they must fail because of what they break, not because the builder
    // makes broken models.
    Model::from_bytes(&relu_model()).expect("the reference tiny model loads");
}

#[test]
fn truncated_models_are_errors() {
    let svhn = std::fs::read(common::asset("svhn.onnx")).expect("read svhn.onnx");
    for k in 1..7 {
        let cut = svhn.len() * k / 7;
        let msg = load_err(&svhn[..cut]);
        assert!(!msg.is_empty(), "svhn.onnx cut at {k}/7");
        println!("svhn.onnx cut at {k}/7 ({cut} bytes): {msg}");
    }
    // Every strict prefix of a small model: the graph is its last field, so none is complete.
    let tiny = relu_model();
    for cut in 0..tiny.len() {
        load_err(&tiny[..cut]);
    }
}

#[test]
fn random_bytes_are_errors() {
    for seed in 0..64u64 {
        let len = (seed as usize * 37) % 3000;
        let bytes: Vec<u8> = common::random_f32(len, seed, 0.0, 256.0).into_iter().map(|v| v as u8).collect();
        load_err(&bytes);
    }
}

#[test]
fn unsupported_op_is_named_with_node_and_opset() {
    // NonMaxSuppression (object detection) is not supported.
    let mut nms = node("NonMaxSuppression", "my_nms", &["x"], &["y"]);
    nms.attribute.push(proto::AttributeProto {
        name: Some("size".into()),
        r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
        i: Some(3),
        ..Default::default()
    });
    let msg = load_err(&model_bytes(vec![nms]));
    for part in ["NonMaxSuppression", "my_nms", "opset 13"] {
        assert!(msg.contains(part), "'{part}' missing from: {msg}");
    }
}

#[test]
fn unsupported_op_is_a_model_error_whose_op_error_names_op_node_and_opset() {
    let e = Model::from_bytes(&model_bytes(vec![node("NonMaxSuppression", "my_nms", &["x"], &["y"])]))
        .expect_err("a model with a NonMaxSuppression node loaded");
    assert_eq!(e.kind(), ErrorKind::Model, "{e}");
    let op = e.op_error().unwrap_or_else(|| panic!("no OpError behind: {e:?}"));
    assert_eq!((op.op.as_str(), op.node.as_str(), op.opset), ("NonMaxSuppression", "my_nms", 13));
    assert_eq!((op.stage, op.shapes.as_ref()), (Stage::Parse, None));
    assert_eq!(op.reason, OpReason::UnknownOp("NonMaxSuppression".into()));
    assert_eq!(
        e.to_string(),
        "unsupported op NonMaxSuppression (node 'my_nms', opset 13): unsupported op type NonMaxSuppression"
    );

    // An attribute value outside what the op supports: typed as such, still a model error.
    let mut pool = node("MaxPool", "pool0", &["x"], &["y"]);
    pool.attribute.push(proto::AttributeProto {
        name: Some("kernel_shape".into()),
        r#type: Some(proto::attribute_proto::AttributeType::Ints as i32),
        ints: vec![2],
        ..Default::default()
    });
    pool.attribute.push(proto::AttributeProto {
        name: Some("storage_order".into()),
        r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
        i: Some(1),
        ..Default::default()
    });
    let e = Model::from_bytes(&model_bytes(vec![pool])).expect_err("MaxPool storage_order=1 loaded");
    assert_eq!(e.kind(), ErrorKind::Model, "{e}");
    let op = e.op_error().expect("an OpError");
    assert_eq!((op.op.as_str(), op.node.as_str()), ("MaxPool", "pool0"));
    assert!(matches!(&op.reason, OpReason::Unsupported(r) if r.contains("storage_order=1")), "{:?}", op.reason);
}

#[test]
fn a_missing_model_file_is_an_io_error() {
    let e = Model::load(&std::env::temp_dir().join("acclimate-no-such-dir/missing.onnx")).expect_err("loaded");
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
}

#[test]
fn undefined_tensor_is_named() {
    let msg = load_err(&model_bytes(vec![node("Add", "adder", &["x", "ghost"], &["y"])]));
    for part in ["adder", "ghost"] {
        assert!(msg.contains(part), "'{part}' missing from: {msg}");
    }
}

#[test]
fn missing_file_is_named() {
    let path = std::env::temp_dir().join("acclimate-no-such-dir/missing.onnx");
    let msg = Model::load(&path).expect_err("a missing file loaded").to_string();
    assert!(msg.contains("missing.onnx"), "{msg}");
}

#[gpu_test]
fn wrong_inputs_are_errors(ctx: GpuContext) {
    let mut engine = Engine::new(&ctx, Model::load(&common::asset("svhn.onnx")).expect("load svhn.onnx"));
    let run_err = |engine: &mut Engine, inputs: &[Tensor]| match engine.run(inputs) {
        Ok(_) => panic!("ran with inputs {:?}", inputs.iter().map(|t| &t.shape).collect::<Vec<_>>()),
        Err(e) => e.to_string(),
    };
    let img = |shape: Vec<usize>| {
        let n = shape.iter().product();
        Tensor::f32(shape, common::random_f32(n, 1, -2.0, 2.0))
    };

    let rank = run_err(&mut engine, &[img(vec![3, 32, 32])]);
    assert!(rank.contains("input") && rank.contains("[3, 32, 32]"), "{rank}");
    let fixed = run_err(&mut engine, &[img(vec![2, 3, 32, 31])]);
    assert!(fixed.contains("input") && fixed.contains("[2, 3, 32, 31]"), "{fixed}");
    let channels = run_err(&mut engine, &[img(vec![1, 1, 32, 32])]);
    assert!(channels.contains("[1, 1, 32, 32]"), "{channels}");

    let ints = Tensor::i64(vec![1, 3, 32, 32], vec![0; 3 * 32 * 32]);
    let dtype = run_err(&mut engine, &[ints]);
    assert!(dtype.contains("int64") && dtype.contains("float32"), "{dtype}");

    let none = run_err(&mut engine, &[]);
    assert!(none.contains("1 input(s), 0 given"), "{none}");
    let two = run_err(&mut engine, &[img(vec![1, 3, 32, 32]), img(vec![1, 3, 32, 32])]);
    assert!(two.contains("1 input(s), 2 given"), "{two}");
    for msg in [&rank, &fixed, &channels, &dtype, &none, &two] {
        println!("{msg}");
    }
    // All of them are the caller's inputs, not the model's fault.
    for inputs in [vec![img(vec![3, 32, 32])], vec![Tensor::i64(vec![1, 3, 32, 32], vec![0; 3 * 32 * 32])], vec![]] {
        let e = engine.run(&inputs).expect_err("bad inputs ran");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    }

    // The engine is still usable after the errors.
    let y = engine.run(&[img(vec![2, 3, 32, 32])]).expect("a good input runs after bad ones");
    assert_eq!(y[0].shape, vec![2, 10]);
}

#[test]
fn reference_backend_errors_are_errors() {
    assert!(
        std::env::var_os("ORT_DYLIB_PATH").is_some(),
        "ORT_DYLIB_PATH is not set: point it at libonnxruntime.so.1.31.1 from the pip wheel onnxruntime==1.31.1 \
         (tools/test.sh sets it)"
    );
    use acclimate_cli::reference::OrtSession;
    let missing = OrtSession::new(&std::env::temp_dir().join("acclimate-no-such-dir/m.onnx"))
        .expect_err("a missing model loaded")
        .to_string();
    assert!(missing.contains("m.onnx"), "{missing}");

    let mut ort = OrtSession::new(&common::asset("svhn.onnx")).unwrap_or_else(|e| panic!("{e}"));
    let shape = ort.run(&[Tensor::f32(vec![1, 3, 32, 31], vec![0.0; 3 * 32 * 31])]);
    assert!(shape.is_err(), "ONNX Runtime accepted a [1, 3, 32, 31] input");
    let dtype = ort.run(&[Tensor::i64(vec![1, 3, 32, 32], vec![0; 3 * 32 * 32])]).expect_err("int64 input ran");
    assert!(dtype.to_string().contains("int64"), "{dtype}");
    let count = ort.run(&[]).expect_err("no input ran").to_string();
    assert!(count.contains("1 input") && count.contains("0 given"), "{count}");
}

/// LayerNormalization before opset 17 (where ONNX defines it), without its Scale, or with attribute
/// values ONNX does not define: a load error naming op and node, not a silently different graph.
#[test]
fn malformed_layer_normalization_is_named() {
    let int_attr = |name: &str, v: i64| proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    };
    let ln = |inputs: &[&str], attr: Option<proto::AttributeProto>| {
        let mut n = node("LayerNormalization", "my_ln", inputs, &["y"]);
        n.attribute.extend(attr);
        n
    };
    // Opset 13 (model_bytes): LayerNormalization does not exist there.
    let msg = load_err(&model_bytes(vec![ln(&["x", "x"], None)]));
    assert!(msg.contains("my_ln") && msg.contains("opset 17"), "{msg}");
    let at17 = |n: proto::NodeProto| {
        let mut m = proto::ModelProto::decode(model_bytes(vec![n]).as_slice()).unwrap();
        m.opset_import[0].version = Some(17);
        m.encode_to_vec()
    };
    Model::from_bytes(&at17(ln(&["x", "x"], None))).expect("a well-formed LayerNormalization loads at opset 17");
    let msg = load_err(&at17(ln(&["x"], None)));
    assert!(msg.contains("my_ln") && msg.contains("Scale"), "{msg}");
    let msg = load_err(&at17(ln(&["x", "x"], Some(int_attr("stash_type", 3)))));
    assert!(msg.contains("my_ln") && msg.contains("stash_type"), "{msg}");
}

/// Regression (found by the loader fuzzer, seed 2): an Expand to a shape whose element count
/// overflows reached a Transpose whose strides overflowed — a panic in plan specialisation. Such
/// a shape, a huge one, and a constant subgraph too large to fold on the CPU are errors naming
/// the node.
#[test]
fn tensors_larger_than_any_device_are_errors() {
    use acclimate::plan::specialize::specialize;
    let ints = i64_initializer;
    let model = |target: &[i64], input: &str| {
        let mut m = proto::ModelProto::decode(
            model_bytes(vec![
                node("Expand", "my_expand", &[input, "target"], &["big"]),
                node("Transpose", "after", &["big"], &["t"]),
                node("Flatten", "flat", &["t"], &["y"]),
            ])
            .as_slice(),
        )
        .unwrap();
        let g = m.graph.as_mut().unwrap();
        g.initializer.push(ints("target", target));
        if input == "c" {
            g.initializer.push(proto::TensorProto {
                name: Some("c".into()),
                dims: vec![1],
                data_type: Some(1),
                float_data: vec![1.0],
                ..Default::default()
            });
        }
        acclimate::ir::Graph::from_bytes(&m.encode_to_vec()).expect("the graph is well formed")
    };
    let plan_err = |g: &acclimate::ir::Graph| match specialize(g, &[vec![2, 4]]) {
        Ok(_) => panic!("specialised"),
        Err(e) => e.to_string(),
    };
    let overflow = plan_err(&model(&[1 << 40, 1 << 40, 1, 4], "x"));
    assert!(overflow.contains("my_expand") && overflow.contains("overflow"), "{overflow}");
    let huge = plan_err(&model(&[1 << 30, 1 << 20, 1, 4], "x"));
    assert!(huge.contains("my_expand") && huge.contains("larger than any device"), "{huge}");
    let folded = plan_err(&model(&[1 << 15, 1 << 15], "c"));
    assert!(folded.contains("my_expand") && folded.contains("constant subgraph"), "{folded}");
}

/// GroupNormalization before opset 21 (scale and bias per group, deprecated by ONNX) and without
/// num_groups: load errors naming the node and what to do.
#[test]
fn group_normalization_outside_opset_21_is_named() {
    let gn = |groups: Option<i64>| {
        let mut n = node("GroupNormalization", "my_gn", &["x", "s", "b"], &["y"]);
        n.attribute.extend(groups.map(|g| proto::AttributeProto {
            name: Some("num_groups".into()),
            r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
            i: Some(g),
            ..Default::default()
        }));
        n
    };
    let at = |opset: i64, n: proto::NodeProto| {
        let mut m = proto::ModelProto::decode(model_bytes(vec![n]).as_slice()).unwrap();
        m.opset_import[0].version = Some(opset);
        m.encode_to_vec()
    };
    let msg = load_err(&at(18, gn(Some(2))));
    assert!(msg.contains("my_gn") && msg.contains("opset 21"), "{msg}");
    let msg = load_err(&at(21, gn(None)));
    assert!(msg.contains("my_gn") && msg.contains("num_groups"), "{msg}");
    let msg = load_err(&at(21, gn(Some(0))));
    assert!(msg.contains("my_gn") && msg.contains("num_groups"), "{msg}");
}

/// Ops folded on the CPU only (Sin, Cos, Mod, ScatterND, …) on data that depends on the model
/// input: a plan error naming the node and why, not a panic or a wrong answer. Tile (which also
/// runs on the GPU) folds on constants, and huge repeats are refused naming the node.
#[test]
fn cpu_folded_ops_on_run_time_data_are_errors() {
    use acclimate::plan::specialize::specialize;
    let ints = i64_initializer;
    let model = |nodes: Vec<proto::NodeProto>, repeats: &[i64]| {
        let mut m = proto::ModelProto::decode(model_bytes(nodes).as_slice()).unwrap();
        let g = m.graph.as_mut().unwrap();
        g.initializer.push(ints("repeats", repeats));
        g.initializer.push(proto::TensorProto {
            name: Some("c".into()),
            dims: vec![1, 4],
            data_type: Some(1),
            float_data: vec![1.0, 2.0, 3.0, 4.0],
            ..Default::default()
        });
        acclimate::ir::Graph::from_bytes(&m.encode_to_vec()).expect("the graph is well formed")
    };
    let on_input = model(vec![node("Sin", "my_sin", &["x"], &["y"])], &[1, 1]);
    let e = specialize(&on_input, &[vec![2, 4]]).expect_err("Sin of the input").to_string();
    assert!(e.contains("my_sin") && e.contains("only on constant inputs"), "{e}");
    // Tile of a constant folds: [1, 4] repeated [2, 1] times, added to the input.
    let folded = model(
        vec![node("Tile", "t", &["c", "repeats"], &["tiled"]), node("Add", "add", &["x", "tiled"], &["y"])],
        &[2, 1],
    );
    let s = specialize(&folded, &[vec![2, 4]]).expect("a Tile of constants folds");
    let tiled = s.values["tiled"].konst.as_ref().expect("folded").to_f32_vec();
    assert_eq!(tiled, vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
    let huge = model(
        vec![node("Tile", "big_tile", &["c", "repeats"], &["t"]), node("Add", "a", &["x", "t"], &["y"])],
        &[1 << 40, 1],
    );
    let e = specialize(&huge, &[vec![2, 4]]).expect_err("huge repeats").to_string();
    assert!(e.contains("big_tile"), "{e}");
}

/// Regression (the loader fuzzer, seed 11): a Slice step near ±2^63 overflowed the length's
/// ceiling division and the stride's product — a panic in plan specialisation. Such steps take
/// one element (the first in the direction of the step), as numpy does.
#[test]
fn slice_steps_near_the_i64_limits_take_one_element() {
    use acclimate::plan::specialize::specialize;
    let ints = |name: &str, v: i64| i64_initializer(name, &[v]);
    for (start, end, step) in
        [(0, 4, i64::MAX), (0, i64::MAX, i64::MAX - 1), (3, -100, i64::MIN), (-1, i64::MIN, -i64::MAX)]
    {
        let mut m = proto::ModelProto::decode(
            model_bytes(vec![
                node("Slice", "my_slice", &["x", "starts", "ends", "axes", "steps"], &["s"]),
                node("Flatten", "flat", &["s"], &["y"]),
            ])
            .as_slice(),
        )
        .unwrap();
        let g = m.graph.as_mut().unwrap();
        g.initializer.extend([ints("starts", start), ints("ends", end), ints("axes", 1), ints("steps", step)]);
        let graph = acclimate::ir::Graph::from_bytes(&m.encode_to_vec()).expect("well formed");
        let s = specialize(&graph, &[vec![2, 4]]).unwrap_or_else(|e| panic!("step {step}: {e}"));
        assert_eq!(s.values["s"].shape, vec![2, 1], "start {start}, end {end}, step {step}");
    }
}
