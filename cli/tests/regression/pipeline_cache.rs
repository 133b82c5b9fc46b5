// Regression tests of the pipeline cache (spliced into tests/regression.rs's `regression` module).
//
// wgpu checks the device and driver a pipeline cache came from, not its bytes, and turns a cache
// from another adapter into a validation error instead of falling back. Both would reach the
// driver or fail the next run; a damaged or foreign file must be ignored with a warning
// (`PipelineCacheStatus::ignored`), pipelines compiled afresh and the file rewritten.

/// A fresh, empty folder under the system temp dir.
fn pipeline_cache_tempdir(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "acclimate-regression-pipeline-cache-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fresh device with the cache in `dir` (`None` where the backend has no pipeline cache),
/// and the tiny fixture network run once on it: its logits.
fn pipeline_cache_open_and_run(
    dir: &std::path::Path,
) -> Option<(acclimate::GpuContext, acclimate::gpu::PipelineCacheStatus, Vec<f32>)> {
    let ctx = acclimate::GpuContext::new().expect("GPU");
    let status = ctx.enable_pipeline_cache(dir);
    if status.is_none() {
        let backend = ctx.adapter_info.as_ref().map(|i| i.backend);
        assert_ne!(backend, Some(acclimate::wgpu::Backend::Vulkan), "Vulkan has a pipeline cache");
        return None;
    }
    let model = common::repo_root().join("tests/fixtures/tta/tiny_tent_adam/model.onnx");
    let mut engine = acclimate::Engine::new(&ctx, acclimate::Model::load(&model).expect("model"));
    let x = acclimate::Tensor::f32(vec![2, 3, 8, 8], common::random_f32(2 * 3 * 64, 7, -1.0, 1.0));
    let y = engine.run(&[x]).expect("a run through the cache").remove(0).to_f32_vec();
    ctx.check().expect("no GPU error outside a scope");
    Some((ctx, status?, y))
}

/// The file wrapped as the cache writes it: magic, payload length, FNV-1a 64 of the payload.
fn pipeline_cache_wrap(payload: &[u8]) -> Vec<u8> {
    let sum = payload.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3));
    let mut out = b"ACCLPC1\n".to_vec();
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

#[gpu_test]
fn pipeline_cache_is_written_and_reused(_ctx: acclimate::GpuContext) {
    let dir = pipeline_cache_tempdir("reuse");
    let Some((ctx, first, y1)) = pipeline_cache_open_and_run(&dir) else { return };
    assert_eq!((first.loaded_bytes, first.ignored.clone()), (0, None), "{first:?}");
    assert!(!first.path.exists(), "written before any save: {first:?}");
    assert_eq!(ctx.save_pipeline_cache().expect("save").as_ref(), Some(&first.path));
    let written = std::fs::read(&first.path).expect("the cache file");
    assert!(written.len() > 24, "{} bytes", written.len());
    drop(ctx);

    let (ctx, second, y2) = pipeline_cache_open_and_run(&dir).expect("a cache again");
    assert_eq!(second.path, first.path);
    assert_eq!((second.loaded_bytes, second.ignored.clone()), (written.len() - 24, None), "{second:?}");
    assert_eq!(y1, y2, "the same kernels, the same logits");
    drop(ctx);

    // Without an explicit save, dropping the last clone writes the file.
    let other = pipeline_cache_tempdir("drop");
    let (ctx, status, _) = pipeline_cache_open_and_run(&other).expect("a cache");
    let clone = ctx.clone();
    drop(ctx);
    assert!(!status.path.exists(), "written while a clone of the context lives");
    drop(clone);
    assert!(status.path.exists(), "not written when the context went away");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&other);
}

#[gpu_test]
fn pipeline_cache_damaged_or_foreign_file_is_ignored_not_an_error(_ctx: acclimate::GpuContext) {
    let dir = pipeline_cache_tempdir("damaged");
    let Some((ctx, first, y)) = pipeline_cache_open_and_run(&dir) else { return };
    ctx.save_pipeline_cache().expect("save");
    drop(ctx);
    let good = std::fs::read(&first.path).expect("the cache file");
    let payload = &good[24..];
    // wgpu's own header: magic (8), version (4), ABI (4), backend (1), then the adapter key.
    let mut foreign = payload.to_vec();
    foreign[17] ^= 0xff;
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 0x55;
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("garbage", b"not a pipeline cache at all".to_vec(), Some("header")),
        ("empty", Vec::new(), Some("header")),
        ("truncated", good[..good.len() - 3].to_vec(), Some("truncated")),
        ("a flipped byte", flipped, Some("checksum")),
        // Our checksum holds, wgpu's header does not: wgpu falls back to an empty cache itself.
        ("wgpu garbage", pipeline_cache_wrap(&[0x5a; 200]), None),
        // Another adapter's cache: wgpu raises a validation error instead of falling back.
        ("another adapter", pipeline_cache_wrap(&foreign), Some("refused")),
    ];
    for (what, bytes, reason) in cases {
        std::fs::write(&first.path, &bytes).unwrap();
        let (ctx, status, y2) = pipeline_cache_open_and_run(&dir).unwrap_or_else(|| panic!("{what}: no cache"));
        match reason {
            Some(r) => {
                let why = status.ignored.clone().unwrap_or_else(|| panic!("{what}: not ignored: {status:?}"));
                assert!(why.contains(r), "{what}: {why}");
                assert_eq!(status.loaded_bytes, 0, "{what}: {status:?}");
            }
            None => assert!(status.ignored.is_none(), "{what}: {status:?}"),
        }
        assert_eq!(y2, y, "{what}: different logits");
        drop(ctx);
        // The file is good again: the next device loads it.
        let (_ctx, again, _) = pipeline_cache_open_and_run(&dir).expect("a cache");
        assert!(again.ignored.is_none() && again.loaded_bytes > 0, "{what}: not rewritten: {again:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Threads compiling the same kernel at once (a background step warmer beside the frame path,
/// two sessions on one context) all get the one pipeline the context keeps. Before the fix the
/// last compiled replaced the first in the context's map: a session that had cached bind groups
/// made from the first one's automatic layout then dispatched them with the second, a validation
/// error ("Exclusive pipelines don't match", CI's `states_with_nan_or_of_another_model_are_refused`
/// in ffi/tests/abi.rs, which runs two sessions beside other tests on one device).
#[gpu_test]
fn concurrent_compiles_of_one_kernel_hand_out_one_pipeline(ctx: acclimate::GpuContext) {
    use acclimate::gpu::{KernelKey, Shader};
    use std::sync::{Arc, Barrier};
    const THREADS: usize = 8;
    // A kernel never compiled on this fresh context: every thread misses.
    let key = KernelKey::new(Shader::Preprocess, "preprocess");
    {
        let barrier = Arc::new(Barrier::new(THREADS));
        let got: Vec<acclimate::wgpu::ComputePipeline> = (0..THREADS)
            .map(|_| {
                let (ctx, key, barrier) = (ctx.clone(), key.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    ctx.pipeline(&key).expect("pipeline")
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        let kept = ctx.pipeline(&key).expect("pipeline");
        for (i, p) in got.iter().enumerate() {
            assert!(*p == kept, "thread {i} got a pipeline the context does not hand out for preprocess");
        }
        // And what breaks otherwise: a bind group from the kept pipeline's layout, dispatched
        // with every thread's pipeline, raises no validation error.
        let layout = kept.get_bind_group_layout(0);
        let buffer = |size: u64| {
            ctx.device.create_buffer(&acclimate::wgpu::BufferDescriptor {
                label: None,
                size,
                usage: acclimate::wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        let (a, b, c) = (buffer(256), buffer(256), buffer(256));
        let bg = ctx.device.create_bind_group(&acclimate::wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout,
            entries: &[
                acclimate::wgpu::BindGroupEntry { binding: 0, resource: a.as_entire_binding() },
                acclimate::wgpu::BindGroupEntry { binding: 1, resource: b.as_entire_binding() },
                acclimate::wgpu::BindGroupEntry { binding: 2, resource: c.as_entire_binding() },
            ],
        });
        let scope = ctx.device.push_error_scope(acclimate::wgpu::ErrorFilter::Validation);
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        for p in &got {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(p);
            pass.set_bind_group(0, &bg, &[]);
            // Zero workgroups: validated, nothing runs.
            pass.dispatch_workgroups(0, 1, 1);
        }
        drop(encoder.finish());
        let err = pollster::block_on(scope.pop());
        assert!(err.is_none(), "{err:?}");
    }
}
