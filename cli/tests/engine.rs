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
