// Regression tests of the loader area (spliced into tests/regression.rs's `regression` module).
//
// Each test builds its model with the prost types in a fresh folder under the system temp dir:
// one BatchNormalization whose four statistics are the initializers under test.

/// A fresh, empty folder under the system temp dir (removed by `loader_cleanup`).
fn loader_tempdir(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "acclimate-regression-loader-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn loader_cleanup(dir: &std::path::Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// An f32 initializer of shape `dims` whose values live in external data with these entries.
fn loader_external(name: &str, dims: &[i64], entries: &[(&str, &str)]) -> acclimate::onnx::proto::TensorProto {
    use acclimate::onnx::proto;
    proto::TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(proto::tensor_proto::DataType::Float as i32),
        data_location: Some(proto::tensor_proto::DataLocation::External as i32),
        external_data: entries
            .iter()
            .map(|(k, v)| proto::StringStringEntryProto { key: Some((*k).into()), value: Some((*v).into()) })
            .collect(),
        ..Default::default()
    }
}

/// X[1,2,1,1] -> BatchNormalization(scale, bias, mean, var) -> Y, with `scale` replaced by `scale`
/// and the other statistics inline.
fn loader_bn_model(scale: acclimate::onnx::proto::TensorProto) -> acclimate::onnx::proto::ModelProto {
    use acclimate::onnx::proto;
    let vi = |name: &str| proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
                elem_type: Some(proto::tensor_proto::DataType::Float as i32),
                shape: Some(proto::TensorShapeProto {
                    dim: [1, 2, 1, 1]
                        .iter()
                        .map(|&v| proto::tensor_shape_proto::Dimension {
                            value: Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let inline = |name: &str, v: [f32; 2]| proto::TensorProto {
        name: Some(name.into()),
        dims: vec![2],
        data_type: Some(proto::tensor_proto::DataType::Float as i32),
        float_data: v.to_vec(),
        ..Default::default()
    };
    proto::ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        graph: Some(proto::GraphProto {
            name: Some("bn".into()),
            node: vec![proto::NodeProto {
                name: Some("bn".into()),
                op_type: Some("BatchNormalization".into()),
                input: ["X", "scale", "bias", "mean", "var"].iter().map(|s| s.to_string()).collect(),
                output: vec!["Y".into()],
                ..Default::default()
            }],
            initializer: vec![scale, inline("bias", [0.0, 0.0]), inline("mean", [0.0, 0.0]), inline("var", [1.0, 1.0])],
            input: vec![vi("X")],
            output: vec![vi("Y")],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Writes `model` as `<dir>/model.onnx` and loads it on a thread: a load that blocks (the bug
/// this area fixes) fails the test after `secs` instead of hanging the suite.
fn loader_load_within(
    dir: &std::path::Path,
    model: &acclimate::onnx::proto::ModelProto,
    secs: u64,
) -> Result<acclimate::onnx::RawModel, String> {
    use prost::Message;
    let path = dir.join("model.onnx");
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(acclimate::onnx::load_model(&path).map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(r) => r,
        Err(_) => panic!("loading the model did not finish within {secs} s (blocked on external data?)"),
    }
}

#[test]
fn fifo_external_data() {
    let dir = loader_tempdir("fifo");
    let fifo = dir.join("weights.bin");
    let status = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
    assert!(status.success(), "mkfifo failed");
    let model = loader_bn_model(loader_external("scale", &[2], &[("location", "weights.bin")]));
    let err = loader_load_within(&dir, &model, 10).expect_err("a FIFO is not tensor data");
    assert!(err.contains("'scale'") && err.contains("weights.bin"), "{err}");
    assert!(err.contains("a FIFO, not a regular file"), "{err}");
    // Graph::load (info, run) goes through the same path.
    let g = acclimate::ir::Graph::load(&dir.join("model.onnx")).unwrap_err().to_string();
    assert!(g.contains("not a regular file"), "{g}");
    loader_cleanup(&dir);
}

#[test]
fn symlink_escape_external_data() {
    let root = loader_tempdir("symlink");
    let folder = root.join("model");
    std::fs::create_dir_all(&folder).unwrap();
    // A readable file outside the model folder, with exactly the 8 bytes the tensor needs: only
    // the confinement check can refuse it.
    let outside = root.join("secret.bin");
    std::fs::write(&outside, 1.5f32.to_le_bytes().repeat(2)).unwrap();
    std::os::unix::fs::symlink(&outside, folder.join("weights.bin")).unwrap();
    // A link to a folder outside, then a plain name inside it: canonicalization must see it too.
    std::os::unix::fs::symlink(&root, folder.join("up")).unwrap();
    for location in ["weights.bin", "up/secret.bin"] {
        let model = loader_bn_model(loader_external("scale", &[2], &[("location", location)]));
        let err = loader_load_within(&folder, &model, 10).expect_err("a link leaving the folder must be refused");
        assert!(err.contains("'scale'") && err.contains(location), "{err}");
        assert!(err.contains("outside the model's folder"), "{location}: {err}");
    }
    // A link that stays inside the folder is fine.
    std::fs::write(folder.join("real.bin"), 2.0f32.to_le_bytes().repeat(2)).unwrap();
    std::os::unix::fs::symlink("real.bin", folder.join("alias.bin")).unwrap();
    let model = loader_bn_model(loader_external("scale", &[2], &[("location", "alias.bin")]));
    let raw = loader_load_within(&folder, &model, 10).unwrap();
    let scale = &raw.graph.initializers.iter().find(|(n, _)| n == "scale").unwrap().1;
    assert_eq!(scale.to_f32_vec(), vec![2.0, 2.0]);
    loader_cleanup(&root);
}

#[test]
fn directory_as_external_data() {
    let dir = loader_tempdir("dir");
    std::fs::create_dir_all(dir.join("weights")).unwrap();
    let model = loader_bn_model(loader_external("scale", &[2], &[("location", "weights")]));
    let err = loader_load_within(&dir, &model, 10).expect_err("a directory is not tensor data");
    assert!(err.contains("'scale'") && err.contains("weights"), "{err}");
    assert!(err.contains("a directory, not a regular file"), "{err}");
    loader_cleanup(&dir);
}

#[test]
fn external_data_length_mismatch() {
    let dir = loader_tempdir("length");
    std::fs::write(dir.join("w.bin"), [0u8; 64]).unwrap();
    // Each declared (offset, length) disagrees with the 8 bytes a [2] f32 tensor has, or with the
    // 64-byte file; each must be refused before reading, naming the tensor, the path and sizes.
    for (entries, want) in [
        (vec![("location", "w.bin"), ("length", "64")], "length is 64 bytes but 2 float32 elements need 8"),
        (vec![("location", "w.bin"), ("length", "4")], "length is 4 bytes"),
        (vec![("location", "w.bin"), ("offset", "60")], "beyond the end of the file (64 bytes)"),
        (vec![("location", "w.bin"), ("offset", "18446744073709551615")], "beyond the end of the file"),
    ] {
        let model = loader_bn_model(loader_external("scale", &[2], &entries));
        let err = loader_load_within(&dir, &model, 10).expect_err("mismatched sizes");
        assert!(err.contains("'scale'") && err.contains("w.bin"), "{err}");
        assert!(err.contains(want), "{entries:?}: {err}");
    }
    loader_cleanup(&dir);
}

#[test]
fn element_count_overflow() {
    use acclimate::onnx::proto;
    use prost::Message;
    // 2^32 · 2^32 overflows u64 and usize; with a zero in front the tensor would be empty, but
    // later code multiplies the other dims, so it is refused as well.
    for dims in [vec![1i64 << 32, 1 << 32], vec![0, 1 << 32, 1 << 32], vec![3, i64::MAX, 3]] {
        let mut t = loader_external("scale", &dims, &[]);
        t.data_location = None;
        t.raw_data = Some(Vec::new());
        let err = acclimate::onnx::load_model_bytes(&loader_bn_model(t).encode_to_vec(), None).unwrap_err().to_string();
        assert!(err.contains("'scale'"), "{err}");
        assert!(err.contains("overflows"), "{dims:?}: {err}");
    }
    // A graph input whose declared shape overflows is refused the same way (its shape sizes
    // buffers later).
    let mut m = loader_bn_model(loader_external("scale", &[2], &[]));
    {
        let g = m.graph.as_mut().unwrap();
        g.initializer[0].data_location = None;
        g.initializer[0].float_data = vec![1.0, 1.0];
        let Some(proto::type_proto::Value::TensorType(tt)) = g.input[0].r#type.as_mut().unwrap().value.as_mut() else {
            unreachable!()
        };
        for d in &mut tt.shape.as_mut().unwrap().dim {
            d.value = Some(proto::tensor_shape_proto::dimension::Value::DimValue(1 << 40));
        }
    }
    let err = acclimate::onnx::load_model_bytes(&m.encode_to_vec(), None).unwrap_err().to_string();
    assert!(err.contains("'X'") && err.contains("overflows"), "{err}");
}

#[test]
fn huge_declared_tensor_refused_before_allocation() {
    use prost::Message;
    let limit = acclimate::onnx::MAX_TENSOR_ELEMENTS;
    let dims = [2i64, limit as i64]; // twice the bound; no overflow anywhere
    let want = format!("exceed the limit of {limit} elements per tensor");

    // Inline: raw_data, then each typed field, declare more elements than the bound.
    let mut t = loader_external("scale", &dims, &[]);
    t.data_location = None;
    t.raw_data = Some(vec![0; 8]);
    let err = acclimate::onnx::load_model_bytes(&loader_bn_model(t.clone()).encode_to_vec(), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("'scale'") && err.contains(&want), "{err}");
    t.raw_data = None;
    t.float_data = vec![0.0; 2];
    let err = acclimate::onnx::load_model_bytes(&loader_bn_model(t).encode_to_vec(), None).unwrap_err().to_string();
    assert!(err.contains("'scale'") && err.contains(&want), "{err}");

    // External: a sparse file as long as the declaration says, so only the bound stops a 4 GiB
    // allocation and read (without it this test would take many seconds and gigabytes).
    let dir = loader_tempdir("huge");
    let bytes = 2 * limit as u64 * 4;
    std::fs::File::create(dir.join("big.bin")).unwrap().set_len(bytes).unwrap();
    let length = bytes.to_string();
    let model = loader_bn_model(loader_external("scale", &dims, &[("location", "big.bin"), ("length", &length)]));
    let start = std::time::Instant::now();
    let err = loader_load_within(&dir, &model, 10).expect_err("past the bound");
    assert!(err.contains("'scale'") && err.contains("big.bin") && err.contains(&want), "{err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(2), "refused only after {:?}", start.elapsed());
    loader_cleanup(&dir);
}

// Found by tools/fuzz.sh (target frame, seed 1): the frame validator multiplied caller-given
// strides unchecked, so a pixel stride near usize::MAX panicked (debug) or wrapped (release)
// instead of being refused; `plane_extent` of an empty frame underflowed.

#[test]
fn frame_pixel_stride_overflow() {
    use acclimate::stream::frame::{Frame, PixelFormat, Plane};
    for (format, planes) in [
        (PixelFormat::Rgba8, vec![Plane::new(0, 32, usize::MAX / 2)]),
        (PixelFormat::Gray8, vec![Plane::new(0, 8, usize::MAX)]),
        // The chroma plane: 4 samples per row at a stride of usize::MAX / 2.
        (PixelFormat::Nv12, vec![Plane::new(0, 8, 1), Plane::new(32, 8, usize::MAX / 2)]),
    ] {
        let frame = Frame::new(8, 4, format, planes, vec![0; 128]);
        let err = frame.validate().expect_err("an overflowing stride cannot be valid").to_string();
        assert!(err.contains("overflow"), "{format:?}: {err}");
    }
}

#[test]
fn frame_plane_extent_of_empty_frame() {
    use acclimate::stream::frame::{Frame, PixelFormat, Plane};
    for (w, h) in [(0, 4), (4, 0), (0, 0)] {
        let frame = Frame::new(w, h, PixelFormat::Gray8, vec![Plane::new(0, 4, 1)], vec![0; 16]);
        assert_eq!(frame.plane_extent(0), None, "{w}x{h}");
        assert!(frame.validate().is_err());
    }
}

// Found by tools/fuzz.sh (target loader, seed 1, execution 49532): a Reshape whose constant
// target shape has a huge dimension overflowed the element count during shape inference.
#[test]
fn reshape_target_product_overflow() {
    use acclimate::ops::layout::reshape_shape;
    for target in [vec![1i64 << 62, 4], vec![-1, 1 << 62, 8], vec![i64::MAX, i64::MAX]] {
        let err = reshape_shape(&[2, 4], &target, false).expect_err("cannot hold 8 elements").to_string();
        assert!(err.contains("too many elements") || err.contains("cannot reshape"), "{target:?}: {err}");
    }
    assert_eq!(reshape_shape(&[2, 4], &[-1, 2], false).unwrap(), vec![4, 2]);
}

// Found by tools/fuzz.sh (target loader, seed 2, execution 14206): a Conv whose `group`
// attribute is huge overflowed `W[1] * group` during shape inference; huge dilations and pads
// overflowed the window arithmetic the same way.
#[test]
fn conv_attribute_overflow() {
    use acclimate::ops::conv::{ConvAttrs, ConvGeometry};
    use acclimate::ops::pool::AutoPad;
    let base = ConvAttrs {
        auto_pad: AutoPad::NotSet,
        dilations: None,
        group: 1,
        kernel_shape: None,
        pads: None,
        strides: None,
    };
    let (x, w) = ([1usize, 4, 8, 8], [4usize, 4, 3, 3]);
    assert!(ConvGeometry::new(&base, &x, &w).is_ok());
    for (what, a) in [
        ("group", ConvAttrs { group: 1 << 62, ..base.clone() }),
        ("dilations", ConvAttrs { dilations: Some(vec![usize::MAX, 1]), ..base.clone() }),
        ("pads", ConvAttrs { pads: Some(vec![usize::MAX, 0, 1, 1]), ..base.clone() }),
    ] {
        let err = ConvGeometry::new(&a, &x, &w).expect_err(what).to_string();
        assert!(err.contains("overflow") || err.contains("more than usize::MAX"), "{what}: {err}");
    }
    // SAME padding of a window near usize::MAX wide: absurd but representable; no panic.
    let same = ConvAttrs { auto_pad: AutoPad::SameUpper, dilations: Some(vec![usize::MAX / 2, 1]), ..base };
    let _ = ConvGeometry::new(&same, &x, &w);
}

/// `torch.onnx.export` deduplicates initializers with equal values and gives each reader an
/// Identity of the one it kept: every BatchNorm of a freshly initialised network (timm's HRNet,
/// random weights) read its scale, bias, mean and variance through Identities of one layer's,
/// so `Graph::batch_norms` found none adaptable (HRNet: 91 layers, 0 adaptable) — and had they
/// been, all layers would have shared one buffer. Each Identity of an initializer now becomes a
/// copy: the deduplicated model adapts exactly as the one with three separate copies.
#[gpu_test]
fn identity_deduplicated_batch_norm_parameters_adapt_per_layer(ctx: acclimate::GpuContext) {
    use acclimate::onnx::proto;
    use prost::Message;
    let bytes = std::fs::read(common::repo_root().join("tests/fixtures/interp_tiny.onnx")).unwrap();
    let base = proto::ModelProto::decode(bytes.as_slice()).unwrap();
    let graph = |m: &proto::ModelProto| m.graph.clone().unwrap();
    let bns: Vec<Vec<String>> = graph(&base)
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("BatchNormalization"))
        .map(|n| n.input[1..5].to_vec())
        .collect();
    assert_eq!(bns.len(), 3);
    // Copies: layers 1 and 2 hold layer 0's values in initializers of their own.
    let mut copies = base.clone();
    let g = copies.graph.as_mut().unwrap();
    for layer in &bns[1..] {
        for (slot, name) in layer.iter().enumerate() {
            let src = g.initializer.iter().find(|t| t.name.as_deref() == Some(bns[0][slot].as_str())).unwrap().clone();
            let dst = g.initializer.iter_mut().find(|t| t.name.as_ref() == Some(name)).unwrap();
            *dst = proto::TensorProto { name: Some(name.clone()), ..src };
        }
    }
    // Deduplicated: layers 1 and 2 read Identities of layer 0's initializers, as torch writes it.
    let mut dedup = base.clone();
    let g = dedup.graph.as_mut().unwrap();
    let mut identities = Vec::new();
    for layer in &bns[1..] {
        for (slot, name) in layer.iter().enumerate() {
            g.initializer.retain(|t| t.name.as_ref() != Some(name));
            identities.push(proto::NodeProto {
                input: vec![bns[0][slot].clone()],
                output: vec![name.clone()],
                name: Some(format!("Identity_{name}")),
                op_type: Some("Identity".into()),
                ..Default::default()
            });
        }
    }
    g.node.splice(0..0, identities);
    let cfg = || acclimate::adapt::AdaptConfig::from_toml_str("[adapt]\nmethod = \"tent\"\n").unwrap();
    let model = |m: &proto::ModelProto| acclimate::Model::from_bytes(&m.encode_to_vec()).unwrap();
    let mut a = acclimate::adapt::Session::new(&ctx, model(&dedup), cfg()).unwrap();
    let mut b = acclimate::adapt::Session::new(&ctx, model(&copies), cfg()).unwrap();
    assert_eq!(a.adapted_parameters().len(), 6, "every layer adaptable: {:?}", a.adapted_parameters());
    for seed in [50, 51] {
        let x = acclimate::Tensor::f32(vec![4, 3, 12, 12], common::random_f32(4 * 3 * 144, seed, -2.0, 2.0));
        let (pa, pb) = (a.step(&x).unwrap(), b.step(&x).unwrap());
        assert_eq!(pa.logits.to_f32_vec(), pb.logits.to_f32_vec());
    }
    let (pa, pb) = (a.parameters().unwrap(), b.parameters().unwrap());
    assert_eq!(pa.len(), pb.len());
    for ((na, ta), (nb, tb)) in pa.iter().zip(&pb) {
        assert_eq!((na, ta.to_f32_vec()), (nb, tb.to_f32_vec()));
    }
    // The layers moved apart from the values they shared.
    let get = |n: &str| pa.iter().find(|(k, _)| k == n).unwrap().1.to_f32_vec();
    assert_ne!(get(&bns[0][0]), get(&bns[1][0]));
}

/// `x.float()` in a model's forward (timm's EfficientViT runs its attention in float32 under
/// autocast) exports as Cast(to = FLOAT) on run-time data, which the plan refused as a CPU-only
/// shape op ("an input depends on the model input"). A cast to float32 of the GPU's float32
/// tensors is a view: with a Cast inserted after the first Relu of `interp_tiny`, predictions
/// and TENT's steps are those of the model without it.
#[gpu_test]
fn cast_to_float_of_run_time_data_is_a_view(ctx: acclimate::GpuContext) {
    use acclimate::onnx::proto;
    use prost::Message;
    let bytes = std::fs::read(common::repo_root().join("tests/fixtures/interp_tiny.onnx")).unwrap();
    let base = proto::ModelProto::decode(bytes.as_slice()).unwrap();
    let mut cast = base.clone();
    let g = cast.graph.as_mut().unwrap();
    let at = g.node.iter().position(|n| n.op_type.as_deref() == Some("Relu")).unwrap();
    let relu = g.node[at].output[0].clone();
    let casted = format!("{relu}_as_float");
    for n in &mut g.node {
        for i in n.input.iter_mut().filter(|i| **i == relu) {
            *i = casted.clone();
        }
    }
    let to = proto::AttributeProto {
        name: Some("to".into()),
        i: Some(1),
        r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
        ..Default::default()
    };
    let node = proto::NodeProto {
        input: vec![relu],
        output: vec![casted],
        name: Some("Cast_to_float".into()),
        op_type: Some("Cast".into()),
        attribute: vec![to],
        ..Default::default()
    };
    g.node.insert(at + 1, node);
    let cfg = || acclimate::adapt::AdaptConfig::from_toml_str("[adapt]\nmethod = \"tent\"\n").unwrap();
    let model = |m: &proto::ModelProto| acclimate::Model::from_bytes(&m.encode_to_vec()).unwrap();
    let mut a = acclimate::adapt::Session::new(&ctx, model(&cast), cfg()).unwrap();
    let mut b = acclimate::adapt::Session::new(&ctx, model(&base), cfg()).unwrap();
    for seed in [60, 61] {
        let x = acclimate::Tensor::f32(vec![4, 3, 12, 12], common::random_f32(4 * 3 * 144, seed, -2.0, 2.0));
        let (pa, pb) = (a.step(&x).unwrap(), b.step(&x).unwrap());
        assert_eq!(pa.logits.to_f32_vec(), pb.logits.to_f32_vec());
    }
    for ((na, ta), (nb, tb)) in a.parameters().unwrap().iter().zip(&b.parameters().unwrap()) {
        assert_eq!((na, ta.to_f32_vec()), (nb, tb.to_f32_vec()));
    }
}

/// A relative-position bias read through its index (timm's `vit_relpos_small_patch16_224`:
/// Gather of a [729, 6] table by a [196, 196] index) was lowered as one strided copy per run of
/// consecutive indices: ~38,000 dispatches and bind groups per Gather, and lavapipe crashed the
/// process (SIGSEGV) allocating their descriptors. Scattered indices now run as one indexed
/// kernel (a dispatch or two, where the copies were one per index here); the result matches the
/// CPU's gather.
#[gpu_test]
fn scattered_gather_indices_run_as_one_kernel(ctx: acclimate::GpuContext) {
    use acclimate::onnx::proto;
    use prost::Message;
    let (rows, width, side) = (729usize, 6usize, 196usize);
    let idx: Vec<i64> = (0..side * side).map(|k| ((k / side) as i64 * 27 + (k % side) as i64 * 13) % rows as i64).collect();
    let dims = |v: &[usize]| proto::TensorShapeProto {
        dim: v
            .iter()
            .map(|&d| proto::tensor_shape_proto::Dimension {
                value: Some(proto::tensor_shape_proto::dimension::Value::DimValue(d as i64)),
                ..Default::default()
            })
            .collect(),
    };
    let vi = |name: &str, shape: &[usize]| proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(dims(shape)),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let axis = proto::AttributeProto {
        name: Some("axis".into()),
        i: Some(0),
        r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
        ..Default::default()
    };
    let model = proto::ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        graph: Some(proto::GraphProto {
            name: Some("relpos".into()),
            node: vec![proto::NodeProto {
                input: vec!["table".into(), "index".into()],
                output: vec!["bias".into()],
                name: Some("Gather_relpos".into()),
                op_type: Some("Gather".into()),
                attribute: vec![axis],
                ..Default::default()
            }],
            initializer: vec![proto::TensorProto {
                name: Some("index".into()),
                dims: vec![side as i64, side as i64],
                data_type: Some(7),
                int64_data: idx.clone(),
                ..Default::default()
            }],
            input: vec![vi("table", &[rows, width])],
            output: vec![vi("bias", &[side, side, width])],
            ..Default::default()
        }),
        ..Default::default()
    };
    let m = acclimate::Model::from_bytes(&model.encode_to_vec()).unwrap();
    let mut engine = acclimate::Engine::new(&ctx, m);
    let plan = engine.plan(&[vec![rows, width]]).unwrap();
    assert!(plan.dispatch_count <= 2, "{} dispatches for one Gather", plan.dispatch_count);
    let table = common::random_f32(rows * width, 70, -1.0, 1.0);
    let out = engine.run(&[acclimate::Tensor::f32(vec![rows, width], table.clone())]).unwrap();
    let want: Vec<f32> = idx.iter().flat_map(|&r| table[r as usize * width..(r as usize + 1) * width].to_vec()).collect();
    assert_eq!(out[0].shape, vec![side, side, width]);
    assert_eq!(out[0].to_f32_vec(), want);
}
