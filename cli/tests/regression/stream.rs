// Regression tests of the stream area (spliced into tests/regression.rs's `regression` module).

/// Environment variable that turns `stream_memory_flat` into its measuring child process.
const STREAM_MEMORY_CHILD: &str = "ACCLIMATE_STREAM_MEMORY_CHILD";

/// The resident set size of this process in KiB.
fn stream_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// The child of the `*stream_memory_flat` tests: streams 400 MNIST-sized gray frames through the
/// tiny net with the adaptation `config` (and the source model's prediction of each frame when
/// `source`), and prints RSS and the preprocessor's bind-group count every 50 frames.
fn stream_memory_child(config: &str, source: bool) {
    use acclimate::adapt::config::AdaptConfig;
    use acclimate::stream::frame::Frame;
    use acclimate::stream::policy::{StreamOptions, StreamSession};
    let ctx = common::gpu().expect("adapter");
    let model = acclimate::Model::load(&common::repo_root().join("tests/fixtures/tta/tiny_tent_sgd/model.onnx"))
        .expect("tiny model");
    let cfg = AdaptConfig::from_toml_str(config).expect("config");
    let spec = "size=8,channels=3,mean=0.5/0.5/0.5,std=0.25/0.25/0.25".parse().expect("spec");
    let options = StreamOptions { top_k: 5, source_prediction: source };
    let mut stream = StreamSession::new(&ctx, model, cfg, spec, options).expect("stream");
    let frames: Vec<Frame> = (0..10)
        .map(|i| {
            let px = common::random_f32(28 * 28, 500 + i, 0.0, 255.0);
            Frame::gray8(28, 28, px.iter().map(|v| *v as u8).collect())
        })
        .collect();
    for i in 0..=400usize {
        stream.push(&frames[i % frames.len()]).expect("frame");
        if i % 50 == 0 {
            println!(
                "stream-memory frame {i} rss_kib {} bind_groups {}",
                stream_rss_kib(),
                stream.preprocessor().bind_groups_created()
            );
        }
    }
}

/// ETA in batches of 4, the configuration of `stream_memory_flat`.
const STREAM_ETA_BATCH: &str =
    "[adapt]\nmethod = \"eta\"\n[optimizer]\nkind = \"sgd\"\nlr = 0.01\n[stream]\nmode = \"batch\"\nbatch = 4\n";

/// Runs `test` (a test of this binary) again as a child process that streams with `config` (see
/// `stream_memory_child`), and asserts that the stream stayed flat: no bind group created after the
/// first frame, and RSS (measured in a process of its own, so other tests' allocations do not
/// count) within 10 % (or 8 MiB) between frames 100 and 400.
fn stream_memory_flat_case(test: &str, config: &str, source: bool) {
    if std::env::var_os(STREAM_MEMORY_CHILD).is_some() {
        stream_memory_child(config, source);
        return;
    }
    let Some(_ctx) = common::gpu() else { return };
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new(exe)
        .args(["--exact", &format!("regression::{test}"), "--nocapture", "--test-threads=1"])
        .env(STREAM_MEMORY_CHILD, "1")
        .output()
        .expect("child test process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // (frame, rss KiB, bind groups created)
    let samples: Vec<(u64, u64, u64)> = stdout
        .lines()
        .filter_map(|l| {
            // The harness prints "test ... " on the same line as the first sample.
            let w: Vec<&str> = l.split("stream-memory ").nth(1)?.split_whitespace().collect();
            Some((w.get(1)?.parse().ok()?, w.get(3)?.parse().ok()?, w.get(5)?.parse().ok()?))
        })
        .collect();
    assert_eq!(samples.len(), 9, "expected a sample every 50 frames:\n{stdout}");
    let at = |frame: u64| *samples.iter().find(|s| s.0 == frame).expect("sample");
    let (first, warm, end) = (at(0), at(100), at(400));
    assert_eq!(
        first.2, end.2,
        "the preprocessor created {} bind groups after the first frame (one per frame?):\n{stdout}",
        end.2 - first.2
    );
    let growth = end.1.saturating_sub(warm.1);
    assert!(
        growth <= (warm.1 / 10).max(8 * 1024),
        "{test}: RSS grew by {growth} KiB over 300 frames after warm-up ({} → {} KiB):\n{stdout}",
        warm.1,
        end.1
    );
}

/// `acclimate stream` grew by about 0.9 MB per frame (127 → 1,880 MB over 2,000 MNIST frames):
/// the preprocessing kernel (and ETA's selection kernel, once per step) took loop bounds from a
/// uniform block, and lavapipe compiles a new variant of such a shader, with the values inlined,
/// each time a submit binds it, keeping every one. A stream of a few hundred tiny frames must now
/// stay flat: no bind group created after the first frame, and RSS (measured in a child process
/// of its own, so other tests' allocations do not count) within 10 % (or 8 MiB) between frames
/// 100 and 400. The old code grew by about 260 MB here.
#[test]
fn stream_memory_flat() {
    stream_memory_flat_case("stream_memory_flat", STREAM_ETA_BATCH, true);
}

/// LAME in batch mode grew by about 2 MB per batch (144 → 229 MB over 1,000 MNIST frames of
/// `tools/soak.sh` in batches of 16 on the tiny net, 140 → 237 MB on the USPS net): its kernels
/// in shaders/output.wgsl loop over the batch's rows and classes up to bounds from a uniform
/// block. lavapipe recompiles a pipeline with the bound values inlined each time a command buffer
/// binds it, as long as that shrinks the shader by half, keeps every compilation, and stops
/// inlining that pipeline for good only the first time it does not pay off. A fixed batch size
/// pays off every time; frame mode (a window that fills up one frame at a time) did not. Every
/// kernel now reads its parameter block from a storage buffer, which is never inlined.
#[test]
fn lame_stream_memory_flat() {
    stream_memory_flat_case(
        "lame_stream_memory_flat",
        "[adapt]\nmethod = \"lame\"\n[stream]\nmode = \"batch\"\nbatch = 8\n",
        false,
    );
}

/// Copies the tiny TENT fixture's three batches into `dir` as `000.npy`, `002.npy`, `004.npy`.
fn stream_replay_batches(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let fx = common::repo_root().join("tests/fixtures/tta/tiny_tent_sgd/batches");
    std::fs::create_dir_all(dir).expect("scratch dir");
    ["000", "001", "002"]
        .iter()
        .zip(["000", "002", "004"])
        .map(|(from, to)| {
            let p = dir.join(format!("{to}.npy"));
            std::fs::copy(fx.join(format!("{from}.npy")), &p).expect("copy batch");
            p
        })
        .collect()
}

fn stream_replay(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_acclimate"))
        .arg("replay")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("spawn acclimate")
}

/// `acclimate replay` stopped at a NaN batch (exit 1, nothing written) while the message said the
/// batch was skipped. Bad batches (NaN, unreadable, a shape the model does not take) are now
/// recorded as skipped and the replay goes on: the good batches' steps are exactly those of a
/// replay without the bad ones, the summary counts the skipped, and the exit status is 0. A
/// folder of bad batches only is an error, with the reasons still written.
#[test]
fn replay_skips_nan_batch() {
    use acclimate::Tensor;
    let Some(_ctx) = common::gpu() else { return };
    let fx = common::repo_root().join("tests/fixtures/tta/tiny_tent_sgd");
    let (model, cfg) = (fx.join("model.onnx"), fx.join("config.toml"));
    let root = std::env::temp_dir().join(format!("acclimate-regression-replay-{}", std::process::id()));
    let (mixed, clean) = (root.join("mixed"), root.join("clean"));
    let _ = std::fs::remove_dir_all(&root);
    let good = stream_replay_batches(&mixed);
    stream_replay_batches(&clean);
    let x = acclimate::npy::read_f32(&good[0]).expect("batch");
    let mut data = x.to_f32_vec();
    data[5] = f32::NAN;
    data[77] = f32::INFINITY;
    acclimate::npy::write_f32(&mixed.join("001.npy"), &Tensor::f32(x.shape.clone(), data)).expect("write");
    std::fs::write(mixed.join("003.npy"), b"\x93NUMPY not really").expect("write");
    let wrong = Tensor::f32(vec![2, 3, 4, 4], vec![0.5; 2 * 3 * 4 * 4]);
    acclimate::npy::write_f32(&mixed.join("005.npy"), &wrong).expect("write");

    let s = |p: &std::path::Path| p.to_str().expect("utf-8").to_string();
    let run = |dir: &std::path::Path, out: &std::path::Path| {
        stream_replay(&[&s(&model), "--config", &s(&cfg), "--batches", &s(dir), "--out", &s(out)])
    };
    let (out_mixed, out_clean) = (root.join("mixed.json"), root.join("clean.json"));
    let o = run(&mixed, &out_mixed);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "replay over a folder with bad batches failed ({}):\n{err}", o.status);
    assert!(err.contains("replayed 3 of 6 batch(es) (3 skipped, 0 update(s) refused"), "{err}");
    assert!(run(&clean, &out_clean).status.success());
    let read = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).expect("record written")).expect("JSON")
    };
    let (log, want) = (read(&out_mixed), read(&out_clean));
    assert_eq!((log["batches"].as_u64(), log["skipped"].as_u64()), (Some(6), Some(3)), "{log}");
    assert!(log["stopped"].is_null(), "{log}");
    let steps = log["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 6, "one entry per batch file");
    for (i, step) in steps.iter().enumerate() {
        assert_eq!(step["batch"].as_u64(), Some(i as u64), "{step}");
        assert_eq!(step["file"].as_str(), Some(format!("{i:03}.npy").as_str()), "{step}");
    }
    let reason = |i: usize| steps[i]["skipped"].as_str().unwrap_or_else(|| panic!("batch {i} not skipped")).to_string();
    assert!(reason(1).contains("NaN"), "{}", reason(1));
    assert!(reason(3).contains("003.npy"), "{}", reason(3));
    assert!(reason(5).contains("[2, 3, 4, 4]"), "{}", reason(5));
    // The skipped batches touched nothing: the good ones step exactly as without them.
    let clean_steps = want["steps"].as_array().expect("steps");
    for (got, reference) in [0, 2, 4].iter().map(|&i| &steps[i]).zip(clean_steps) {
        assert!(got["skipped"].is_null(), "{got}");
        for key in ["logits", "loss", "params"] {
            assert_eq!(got[key], reference[key], "{key} of batch {} differs from the clean replay", got["batch"]);
        }
    }

    // Nothing usable: an error, but the reasons are still written.
    let bad = root.join("bad");
    std::fs::create_dir_all(&bad).expect("dir");
    std::fs::copy(mixed.join("001.npy"), bad.join("a.npy")).expect("copy");
    std::fs::copy(mixed.join("003.npy"), bad.join("b.npy")).expect("copy");
    let out_bad = root.join("bad.json");
    let o = run(&bad, &out_bad);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("every one of the 2 batch(es)") && !err.contains("panicked"), "{err}");
    assert_eq!(read(&out_bad)["skipped"].as_u64(), Some(2));
    let _ = std::fs::remove_dir_all(&root);
}

/// A context on the test adapter whose device enforces the given limits (lower than the
/// adapter's), owned by the "application": Acclimate installs no handler on it, so any error
/// outside its error scopes would reach wgpu's default handler, which panics.
fn stream_limited_ctx(max_buffer_size: u64, max_storage_buffer_binding_size: u64) -> acclimate::GpuContext {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        force_fallback_adapter: false,
        compatible_surface: None,
        apply_limit_buckets: false,
    }))
    .expect("adapter");
    let info = adapter.get_info();
    let limits = wgpu::Limits { max_buffer_size, max_storage_buffer_binding_size, ..adapter.limits() };
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("limited"),
        required_features: wgpu::Features::empty(),
        required_limits: limits,
        experimental_features: wgpu::ExperimentalFeatures::disabled(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    }))
    .expect("device with lower limits");
    acclimate::GpuContext::from_device(device, queue).with_adapter_info(info)
}

/// The GPU error inside an engine error (the wrappers are `#[error(transparent)]`, so it is not
/// in the `source()` chain).
fn stream_engine_gpu(e: &acclimate::Error) -> Option<&acclimate::gpu::GpuError> {
    use acclimate::plan::PlanError;
    match e {
        acclimate::Error::Gpu(g) | acclimate::Error::Plan(PlanError::Gpu(g)) => Some(g),
        _ => None,
    }
}

/// The GPU error of a session's error: whichever layer hit it, the conversion into
/// `acclimate::Error` lifts it to `Error::Gpu`.
fn stream_adapt_gpu(e: &acclimate::Error) -> Option<&acclimate::gpu::GpuError> {
    match e {
        acclimate::Error::Gpu(g) => Some(g),
        _ => None,
    }
}

/// The fields of a `GpuError::TooLarge`.
fn stream_too_large(e: Option<&acclimate::gpu::GpuError>) -> Option<(String, u64, u64, &'static str)> {
    match e {
        Some(acclimate::gpu::GpuError::TooLarge { what, bytes, limit, limit_name }) => {
            Some((what.clone(), *bytes, *limit, limit_name))
        }
        _ => None,
    }
}

/// A batch too large for the device's buffer limits aborted the process (a buffer beyond
/// `max_buffer_size` is a wgpu validation error, and wgpu's default handler panics). It is now a
/// `GpuError::TooLarge` naming the input, its bytes, the limit and the limit's name, before
/// anything is allocated: for inference and for an adaptation step, on a device with lowered
/// limits and on the adapter's own limits (no host buffer of that size is ever made there).
#[test]
fn batch_too_large_for_buffer_limit() {
    use acclimate::adapt::config::AdaptConfig;
    use acclimate::adapt::session::Session;
    use acclimate::{Engine, Model, Tensor};
    let Some(ctx) = common::gpu() else { return };
    let model = Model::load(&common::repo_root().join("tests/fixtures/tta/tiny_tent_sgd/model.onnx")).expect("model");
    let cfg = || AdaptConfig::from_toml_str("[adapt]\nmethod = \"tent\"\n").expect("config");

    // 1 MiB buffers (2 MiB bindings): a batch of 2,000 8×8 RGB images is 1,536,000 bytes.
    let small = stream_limited_ctx(1 << 20, 2 << 20);
    let x = Tensor::f32(vec![2000, 3, 8, 8], vec![0.25; 2000 * 3 * 64]);
    let err = Engine::new(&small, model.clone()).run(std::slice::from_ref(&x)).expect_err("a batch over the limit");
    let (what, bytes, limit, name) =
        stream_too_large(stream_engine_gpu(&err)).unwrap_or_else(|| panic!("not TooLarge: {err}"));
    assert!(what.contains("input") && what.contains("[2000, 3, 8, 8]"), "{what}");
    assert_eq!((bytes, limit, name), (1_536_000, 1 << 20, "max_buffer_size"));
    let msg = err.to_string();
    assert!(msg.contains("1536000") && msg.contains("1048576") && msg.contains("max_buffer_size"), "{msg}");
    let mut session = Session::new(&small, model.clone(), cfg()).expect("session");
    let err = session.step(&x).expect_err("an adaptation batch over the limit");
    assert!(stream_too_large(stream_adapt_gpu(&err)).is_some_and(|t| t.1 == 1_536_000), "{err}");
    // The device is fine afterwards: a batch that fits runs.
    let ok = Tensor::f32(vec![4, 3, 8, 8], vec![0.25; 4 * 3 * 64]);
    session.step(&ok).expect("a batch within the limits");

    // The adapter's own limit, through plan building only.
    let binding = ctx.limits().max_storage_buffer_binding_size;
    let n = (binding / (3 * 64 * 4) + 1) as usize;
    let mut engine = Engine::new(&ctx, model.clone());
    let err = engine.plan(&[vec![n, 3, 8, 8]]).expect_err("a batch over the binding limit");
    let (what, bytes, limit, _) =
        stream_too_large(stream_engine_gpu(&err)).unwrap_or_else(|| panic!("not TooLarge: {err}"));
    assert!(what.contains(&format!("[{n}, 3, 8, 8]")) && bytes > limit && limit <= binding, "{err}");
    let mut session = Session::new(&ctx, model, cfg()).expect("session");
    let err = session.step_footprint(&[n, 3, 8, 8]).expect_err("a step over the binding limit");
    assert!(stream_too_large(stream_adapt_gpu(&err)).is_some(), "{err}");
}

/// A model whose weight does not fit the device's buffers aborted the process the same way. It
/// is now a `GpuError::TooLarge` naming the initializer.
#[test]
fn model_too_large_for_buffer_limit() {
    use acclimate::onnx::proto;
    use acclimate::{Engine, Model, Tensor};
    use prost::Message;
    let Some(_ctx) = common::gpu() else { return };
    // y = x · W with W [4, 70000]: 1,120,000 bytes of weight behind a 4-float input.
    let k = 70_000i64;
    let vi = acclimate::onnx::float_value_info;
    let bytes = proto::ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto { domain: Some(String::new()), version: Some(13) }],
        graph: Some(proto::GraphProto {
            name: Some("big".into()),
            node: vec![proto::NodeProto {
                op_type: Some("MatMul".into()),
                name: Some("matmul0".into()),
                input: vec!["x".into(), "W".into()],
                output: vec!["y".into()],
                ..Default::default()
            }],
            initializer: vec![proto::TensorProto {
                name: Some("W".into()),
                dims: vec![4, k],
                data_type: Some(1),
                float_data: vec![0.5; 4 * k as usize],
                ..Default::default()
            }],
            input: vec![vi("x", &[1, 4])],
            output: vec![vi("y", &[1, k])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let model = Model::from_bytes(&bytes).expect("model");
    let small = stream_limited_ctx(1 << 20, 1 << 20);
    let x = Tensor::f32(vec![1, 4], vec![1.0; 4]);
    let err = Engine::new(&small, model.clone()).run(std::slice::from_ref(&x)).expect_err("a weight over the limit");
    let (what, bytes, limit, _) =
        stream_too_large(stream_engine_gpu(&err)).unwrap_or_else(|| panic!("not TooLarge: {err}"));
    assert!(what.contains("weight 'W'"), "{what}");
    assert_eq!((bytes, limit), (1_120_000, 1 << 20));
    // With room for it, the same model runs (the check is not in the way).
    let roomy = stream_limited_ctx(2 << 20, 2 << 20);
    let y = Engine::new(&roomy, model).run(&[x]).expect("fits");
    assert_eq!(y[0].shape, vec![1, k as usize]);
    assert!(y[0].to_f32_vec().iter().all(|&v| v == 2.0));
}

/// A lost device is an error the caller can act on (`GpuError::DeviceLost`, from every later
/// call), not a panic: `device.destroy()` marks it lost, as a driver reset would.
#[test]
fn device_lost_is_an_error() {
    use acclimate::adapt::config::AdaptConfig;
    use acclimate::adapt::session::Session;
    use acclimate::gpu::GpuError;
    use acclimate::{Engine, Model, Tensor};
    let Some(ctx) = common::gpu() else { return };
    let model = Model::load(&common::repo_root().join("tests/fixtures/tta/tiny_tent_sgd/model.onnx")).expect("model");
    let cfg = AdaptConfig::from_toml_str("[adapt]\nmethod = \"tent\"\n").expect("config");
    let x = Tensor::f32(vec![2, 3, 8, 8], vec![0.25; 2 * 3 * 64]);
    let mut engine = Engine::new(&ctx, model.clone());
    let mut session = Session::new(&ctx, model, cfg).expect("session");
    engine.run(std::slice::from_ref(&x)).expect("runs before the loss");
    session.step(&x).expect("steps before the loss");
    ctx.device.destroy();
    let lost = |g: Option<&GpuError>| matches!(g, Some(GpuError::DeviceLost { .. }));
    let e = engine.run(std::slice::from_ref(&x)).expect_err("a run on a lost device");
    assert!(lost(stream_engine_gpu(&e)), "{e}");
    assert!(e.to_string().contains("destroyed"), "{e}");
    let e = session.step(&x).expect_err("a step on a lost device");
    assert!(lost(stream_adapt_gpu(&e)), "{e}");
    // A plan built after the loss: the same error, not a validation panic.
    let y = Tensor::f32(vec![3, 3, 8, 8], vec![0.25; 3 * 3 * 64]);
    let e = engine.run(&[y]).expect_err("a new plan on a lost device");
    assert!(lost(stream_engine_gpu(&e)), "{e}");
    assert!(ctx.is_lost());
}

/// Frame mode with RBN and no gradient step moved MobileNetV2 from the source's class at frame 0
/// of the clean carphone clip to near-uniform outputs (top-1 probability 0.01–0.03) by frame 9:
/// the EMA of single frames' statistics became the scene's own statistics and normalised its
/// content away. Each of the first 10 frames must keep the unadapted model's class.
#[test]
fn frame_mode_rbn_keeps_source_class_on_clean_clip() {
    use acclimate::adapt::config::AdaptConfig;
    use acclimate::stream::policy::{StreamOptions, StreamSession};
    use acclimate_cli::stream::source::Source;
    let Some(ctx) = common::gpu() else { return };
    let model = acclimate::Model::load(&common::asset("mobilenetv2.onnx")).expect("mobilenetv2");
    let cfg = AdaptConfig::from_toml_str("[adapt]\nmethod = \"rbn\"\n[stream]\nmode = \"frame\"\nwindow = 8\n")
        .expect("config");
    let spec = "resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225".parse().expect("spec");
    let options = StreamOptions { top_k: 1, source_prediction: true };
    let mut stream = StreamSession::new(&ctx, model, cfg, spec, options).expect("stream");
    let clip = common::asset("video/carphone_pristine.y4m");
    let mut source = Source::open(&format!("video:{}", clip.display())).expect("clip");
    for i in 0..10 {
        let frame = source.next_frame().expect("10 frames").expect("frame").frame;
        let r = stream.push(&frame).expect("push").remove(0);
        let (class, p) = r.source_top.expect("source prediction");
        assert_eq!(r.class(), class, "frame {i}: adapted class {:?} vs unadapted {class} ({p:.3})", r.top_k[0]);
        assert!(
            r.top_k[0].1 >= 0.5 * p,
            "frame {i}: top-1 probability {:.3} collapsed (unadapted {p:.3})",
            r.top_k[0].1
        );
    }
}

/// The default preset's frame-mode step on MobileNetV2 (a window of 32 frames: one activation
/// [32, 96, 112, 112] is 154 MB, over lavapipe's 128 MiB binding limit) stopped the stream with
/// an error at frame 31. A window whose step does not fit now steps on the most recent frames that
/// do, exactly as a stream whose window is that cap would.
#[test]
fn frame_step_over_the_binding_limit_steps_on_fewer_frames() {
    use acclimate::adapt::config::AdaptConfig;
    use acclimate::stream::frame::Frame;
    use acclimate::stream::policy::{StreamOptions, StreamSession};
    use acclimate::{Model, Preprocess};
    let Some(ctx) = common::gpu() else { return };
    let model = Model::load(&common::repo_root().join("tests/fixtures/tta/tiny_tent_sgd/model.onnx")).expect("model");
    let spec: Preprocess = "size=8,channels=3,mean=0.5/0.5/0.5,std=0.25/0.25/0.25".parse().expect("spec");
    let config = |window: usize, timing: &str| {
        AdaptConfig::from_toml_str(&format!(
            "[adapt]\nmethod = \"tent\"\n[stream]\nmode = \"frame\"\nwindow = {window}\nadapt_every = 32\nsteps = \"{timing}\"\n"
        ))
        .expect("config")
    };
    let frames: Vec<Frame> = (0..40)
        .map(|i| {
            let px = common::random_f32(8 * 8 * 3, 1000 + i, 0.0, 255.0);
            Frame::rgb8(8, 8, px.into_iter().map(|v| v as u8).collect())
        })
        .collect();
    let run = |ctx: &acclimate::GpuContext, window: usize, timing: &str| {
        let mut s =
            StreamSession::new(ctx, model.clone(), config(window, timing), spec.clone(), StreamOptions::default())
                .expect("stream");
        let mut stepped = Vec::new();
        for f in &frames {
            for r in s.push(f).expect("every frame is predicted") {
                if r.adapted {
                    stepped.push(r.index);
                }
            }
        }
        // A background step still in flight lands.
        s.finish().expect("finish");
        (s.session().parameters().expect("parameters"), s.step_frames_cap(), stepped, s.steps(), s.background_steps())
    };
    // 16 KiB buffers: a step on 32 frames needs a 24,576-byte input (and more), so it cannot run.
    let small = stream_limited_ctx(16 << 10, 16 << 10);
    // Background steps keep the window in one GPU buffer: on the 16 KiB device it does not fit
    // and the steps run inline. 30 KiB holds the window (24,576 bytes) but not the step's first
    // activation at 32 frames ([32, 4, 8, 8]: 32,768 bytes): the background step, reading its
    // frames from the GPU snapshot, is capped the same way.
    let medium = stream_limited_ctx(30 << 10, 30 << 10);
    for (device, timing, background) in [(&small, "inline", false), (&small, "background", false), (&medium, "background", true)] {
        let (params, cap, stepped, steps, bg) = run(device, 32, timing);
        assert_eq!(bg, background, "{timing}: background steps");
        assert_eq!(steps, 1, "{timing}: the step due at frame 31 ran");
        if !bg {
            assert_eq!(stepped, vec![31], "the step at frame 31 ran with it");
        }
        let cap = cap.expect("the window was capped");
        assert!((2..32).contains(&cap), "cap {cap}");
        // The same stream with a window of `cap` frames, on the unlimited device.
        let (want, none, _, _, _) = run(&ctx, cap, timing);
        assert_eq!(none, None);
        for ((name, got), (_, want)) in params.iter().zip(&want) {
            let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
            let worst = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 1e-6, "{timing}: {name}: parameters differ by {worst} from the stream whose window is {cap}");
        }
    }
}

/// `acclimate stream` without `--config` (batch mode, batches of 64) on MobileNetV2 lost every
/// frame on lavapipe: a batch's [64, 96, 112, 112] activation is over the 128 MiB binding limit,
/// so each batch was an error. A batch that does not fit the device is now predicted and adapted
/// on in parts that do (halving), exactly as a stream whose batch is that size; the source
/// model's comparison too.
#[test]
fn batch_over_the_binding_limit_runs_in_parts() {
    use acclimate::adapt::config::AdaptConfig;
    use acclimate::stream::frame::Frame;
    use acclimate::stream::policy::{StreamOptions, StreamSession};
    use acclimate::{Model, Preprocess};
    let Some(ctx) = common::gpu() else { return };
    let model = Model::load(&common::repo_root().join("tests/fixtures/tta/tiny_tent_sgd/model.onnx")).expect("model");
    let spec: Preprocess = "size=8,channels=3,mean=0.5/0.5/0.5,std=0.25/0.25/0.25".parse().expect("spec");
    let config = |batch: usize| {
        AdaptConfig::from_toml_str(&format!("[adapt]\nmethod = \"tent\"\n[stream]\nmode = \"batch\"\nbatch = {batch}\n"))
            .expect("config")
    };
    let frames: Vec<Frame> = (0..40)
        .map(|i| {
            let px = common::random_f32(8 * 8 * 3, 2000 + i, 0.0, 255.0);
            Frame::rgb8(8, 8, px.into_iter().map(|v| v as u8).collect())
        })
        .collect();
    let run = |ctx: &acclimate::GpuContext, batch: usize| {
        let options = StreamOptions { top_k: 3, source_prediction: true };
        let mut s = StreamSession::new(ctx, model.clone(), config(batch), spec.clone(), options).expect("stream");
        let mut results = Vec::new();
        for f in &frames {
            results.extend(s.push(f).expect("every batch is predicted"));
        }
        results.extend(s.finish().expect("finish"));
        (s.session().parameters().expect("parameters"), s.batch_frames_cap(), results, s.steps())
    };
    // 16 KiB buffers: a batch of 32 needs a 24,576-byte input (and more).
    let small = stream_limited_ctx(16 << 10, 16 << 10);
    let (params, cap, results, steps) = run(&small, 32);
    let cap = cap.expect("the batch was split");
    assert!((1..32).contains(&cap), "cap {cap}");
    assert_eq!(results.iter().map(|r| r.index).collect::<Vec<_>>(), (0..40).collect::<Vec<u64>>());
    assert!(results.iter().all(|r| r.source_top.is_some()), "the source model ran on every part");
    // The same stream with batches of `cap` frames, on the unlimited device.
    let (want, none, want_results, want_steps) = run(&ctx, cap);
    assert_eq!((none, steps), (None, want_steps));
    for (a, b) in results.iter().zip(&want_results) {
        assert_eq!((a.top_k[0].0, a.source_top.map(|s| s.0)), (b.top_k[0].0, b.source_top.map(|s| s.0)), "frame {}", a.index);
    }
    for ((name, got), (_, want)) in params.iter().zip(&want) {
        let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
        let worst = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-6, "{name}: parameters differ by {worst} from the stream whose batch is {cap}");
    }
}
