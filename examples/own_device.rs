//! Running a model on a wgpu device the application already owns (for example the one its
//! renderer uses): Acclimate allocates on that device and submits on that queue.
//!
//! ```sh
//! cargo run --release --example own_device -- assets/mobilenetv2.onnx [input.npy]
//! ```
//! Without an input file it runs one random image. Prints the top-5 classes of each sample.

use std::path::PathBuf;

use acclimate::{Engine, GpuContext, Model, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model_path = PathBuf::from(args.next().ok_or("usage: own_device MODEL.onnx [INPUT.npy]")?);
    let model = Model::load(&model_path)?;

    // The application's own device and queue.
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))?;
    let info = adapter.get_info();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("application"),
        required_limits: adapter.limits(),
        ..Default::default()
    }))?;
    let ctx = GpuContext::from_device(device, queue).with_adapter_info(info);
    let mut engine = Engine::new(&ctx, model);

    let x = match args.next() {
        Some(p) => acclimate::npy::read_f32(p.as_ref())?,
        None => {
            let dims = engine.model().graph.inputs[0].dims.clone().ok_or("the model's input has no shape")?;
            let shape: Vec<usize> =
                dims.iter().map(|d| if let acclimate::ir::Dim::Fixed(n) = d { *n } else { 1 }).collect();
            let n: usize = shape.iter().product();
            Tensor::f32(shape, (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect())
        }
    };
    let out = engine.run(&[x])?;
    let logits = &out[0];
    let classes = *logits.shape.last().unwrap_or(&1);
    for (i, row) in logits.to_f32_vec().chunks(classes).enumerate() {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|a, b| row[*b].total_cmp(&row[*a]));
        let top: Vec<String> = idx.iter().take(5).map(|&c| format!("{c} ({:.3})", row[c])).collect();
        println!("sample {i}: top-5 {}", top.join(", "));
    }
    println!("ran on {} with {} compiled pipelines", ctx.adapter_summary(), ctx.pipeline_count());
    Ok(())
}
