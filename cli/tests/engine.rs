//! Engine-level behaviour: an application's own device, plan caching per shape, buffer reuse.

mod common;

use acclimate::{Engine, GpuContext, Model, Tensor};
use acclimate_test_macros::gpu_test;

/// A device created by the application works exactly like one Acclimate opens itself.
#[gpu_test]
fn runs_on_an_application_owned_device(own: GpuContext) {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default())).unwrap();
    let info = adapter.get_info();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("application"),
        required_limits: adapter.limits(),
        ..Default::default()
    }))
    .unwrap();
    let app = GpuContext::from_device(device, queue).with_adapter_info(info);
    let model = Model::load(&common::asset("svhn.onnx")).unwrap();
    let x = Tensor::f32(vec![2, 3, 32, 32], common::random_f32(2 * 3 * 32 * 32, 7, -2.0, 2.0));
    let a = Engine::new(&app, model.clone()).run(std::slice::from_ref(&x)).unwrap();
    let b = Engine::new(&own, model).run(&[x]).unwrap();
    assert_eq!(a[0].shape, vec![2, 10]);
    assert_eq!(a[0].to_f32_vec(), b[0].to_f32_vec(), "same kernels, same inputs: bit-identical logits");
}

/// Plans are cached per input shape; pipelines are shared across nodes and plans; activation
/// buffers are reused by lifetime.
#[gpu_test]
fn plans_are_cached_and_buffers_reused(ctx: GpuContext) {
    let model = Model::load(&common::asset("svhn.onnx")).unwrap();
    let mut engine = Engine::new(&ctx, model);
    for batch in [1, 3, 1] {
        let x = Tensor::f32(vec![batch, 3, 32, 32], common::random_f32(batch * 3 * 32 * 32, batch as u64, -1.0, 1.0));
        let y = engine.run(&[x]).unwrap();
        assert_eq!(y[0].shape, vec![batch, 10]);
    }
    let pipelines = ctx.pipeline_count();
    let plan = engine.plan(&[vec![3, 3, 32, 32]]).unwrap();
    assert!(plan.activation_bytes < plan.activation_bytes_unshared, "lifetime-based reuse saves memory");
    // SVHN has 22 nodes but only a handful of kernel variants.
    assert!(pipelines <= 8, "{pipelines} pipelines for the SVHN network");
}

/// A profile times every dispatch of the plan once per run, names each one's kernel and item,
/// and leaves the plan's results as they were. Both clocks: GPU timestamps (a device Acclimate
/// opens asks for them where the adapter has them) and the host's; an application's device
/// without timestamp queries falls back to the host and refuses timestamps plainly.
#[gpu_test]
fn profiles_time_every_dispatch_on_either_clock(ctx: GpuContext) {
    use acclimate::plan::profile::Clock;
    let model = Model::load(&common::repo_root().join("tests/fixtures/tta/tiny_tent_adam/model.onnx")).unwrap();
    let x = Tensor::f32(vec![2, 3, 8, 8], common::random_f32(2 * 3 * 64, 11, -2.0, 2.0));
    let mut engine = Engine::new(&ctx, model.clone());
    let before = engine.run(std::slice::from_ref(&x)).unwrap();
    let data = x.to_f32_vec();
    let has_timestamps = ctx.device.features().contains(wgpu::Features::TIMESTAMP_QUERY);
    let shaders: Vec<&str> = acclimate::gpu::Shader::ALL.iter().map(|s| s.file_name()).collect();
    let plan = engine.plan(std::slice::from_ref(&x.shape)).unwrap();
    let n = plan.dispatch_count;
    let mut clocks = vec![Clock::Host];
    if has_timestamps {
        clocks.push(Clock::Timestamps);
    }
    for clock in clocks {
        let p = plan.profile(&ctx, &[&data], 3, Some(clock)).unwrap();
        assert_eq!((p.clock, p.runs, p.dispatches.len()), (clock, 3, n));
        for d in &p.dispatches {
            assert!(d.ms.is_finite() && d.ms >= 0.0, "{d:?}");
            let (file, entry) = d.kernel.split_once("::").expect("file::entry");
            assert!(shaders.contains(&file) && !entry.is_empty() && !d.item.is_empty(), "{d:?}");
        }
        // The tiny network's convolutions and its Gemm count their arithmetic.
        assert!(p.dispatches.iter().any(|d| d.flops.is_some_and(|f| f > 0)), "{p:?}");
        let kernels = p.by_kernel();
        assert_eq!(kernels.iter().map(|k| k.dispatches).sum::<usize>(), n);
        assert!((kernels.iter().map(|k| k.ms).sum::<f64>() - p.total_ms()).abs() < 1e-9);
        if p.total_ms() > 0.0 {
            assert!((kernels.iter().map(|k| k.share).sum::<f64>() - 1.0).abs() < 1e-9, "{kernels:?}");
        }
        assert!(kernels.windows(2).all(|w| w[0].ms >= w[1].ms), "{kernels:?}");
        let slowest = p.slowest(3);
        assert!(slowest.len() == 3.min(n) && slowest.windows(2).all(|w| w[0].ms >= w[1].ms));
    }
    let after = engine.run(std::slice::from_ref(&x)).unwrap();
    assert_eq!(before[0].to_f32_vec(), after[0].to_f32_vec(), "the profile changed the plan's results");

    // An application's device without timestamp queries.
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default())).unwrap();
    let (device, queue) = pollster::block_on(
        adapter.request_device(&wgpu::DeviceDescriptor { required_limits: adapter.limits(), ..Default::default() }),
    )
    .unwrap();
    let app = GpuContext::from_device(device, queue);
    let mut engine = Engine::new(&app, model);
    let plan = engine.plan(std::slice::from_ref(&x.shape)).unwrap();
    let p = plan.profile(&app, &[&data], 1, None).unwrap();
    assert_eq!((p.clock, p.dispatches.len()), (Clock::Host, n));
    let e = plan.profile(&app, &[&data], 1, Some(Clock::Timestamps)).unwrap_err().to_string();
    assert!(e.contains("no timestamp queries"), "{e}");
}
