//! Acclimate runs ONNX image classifiers on any GPU through WGSL compute shaders (wgpu: Vulkan,
//! Metal) and keeps them accurate on the device with test-time adaptation: the model adapts
//! online, on the stream of frames it classifies, when the camera's world shifts.
//!
//! # The facade
//!
//! An app needs a handful of names, all at the crate root:
//!
//! | name | what it is |
//! |---|---|
//! | [`GpuContext`] | the wgpu device and queue (opened by Acclimate, or the app's own: [`GpuContext::from_device`]) |
//! | [`LimitsProfile`], [`SelfTestReport`] | phone GPUs: [`GpuContext::with_limits`] opens the device with `wgpu::Limits::downlevel_defaults()` (or `ACCLIMATE_LIMITS=downlevel`); [`GpuContext::self_test`] checks the driver against a CPU reference |
//! | [`Model`] | a loaded, validated ONNX model: [`Model::input_shape`], [`Model::num_classes`], [`Model::batch_norms`] |
//! | [`Engine`] | plain inference: tensors in, logits out |
//! | [`Config`] | the adaptation config (the TOML file: `[adapt]`, `[optimizer]`, `[stream]`, `[preprocess]`, …) |
//! | [`Session`] | a model adapting on batches: [`Session::step`], [`Session::predict`], state, reset |
//! | [`Prediction`] | what a batch gives back (plain fields) |
//! | [`AutoDiagnostics`] | what the default method `auto` saw in a batch and decided ([`Prediction::auto`], [`FrameResult::auto`]) |
//! | [`Frame`], [`PixelFormat`], [`Plane`], [`Rotation`] | a camera frame as it arrives (RGBA/BGRA/RGB/gray, NV12/NV21/I420, strides, rotation) |
//! | [`Preprocess`] | how frames become the model's input (`"size=224,mean=…,std=…"`) |
//! | [`Stream`] | a model adapting on a stream of frames (the frame or batch protocol); [`FrameResult`] per frame |
//! | [`Tensor`] | a host tensor (shape + data) |
//! | [`Error`], [`ErrorKind`], [`Result`] | the one error type, a variant per layer; [`Error::kind`] says what to do about it |
//!
//! State (what adaptation learned) is saved and loaded with [`Session::save_state`] /
//! [`Session::load_state`] (a `Stream` through [`Stream::session_mut`]): a safetensors file bound
//! to the model's fingerprint and the method, refused when torn, foreign or non-finite.
//!
//! ## Inference
//! ```no_run
//! use acclimate::{Engine, GpuContext, Model, Tensor};
//!
//! let model = Model::load("mobilenetv2.onnx".as_ref())?;
//! let shape: Vec<usize> = model.input_shape().iter().map(|d| d.unwrap_or(1)).collect(); // [1, 3, 224, 224]
//! let ctx = GpuContext::new()?;
//! let mut engine = Engine::new(&ctx, model);
//! let x = Tensor::f32(shape.clone(), vec![0.0; shape.iter().product()]);
//! let logits = &engine.run(&[x])?[0];
//! println!("{:?}", logits.shape); // [1, 1000]
//! # Ok::<(), acclimate::Error>(())
//! ```
//!
//! ## Adapting on a stream of camera frames
//! ```no_run
//! use acclimate::{Config, Frame, GpuContext, Model, Preprocess, Stream, StreamOptions};
//!
//! let ctx = GpuContext::new()?;
//! let model = Model::load("mobilenetv2.onnx".as_ref())?;
//! let config = Config::default(); // or Config::from_toml_str(&std::fs::read_to_string("tta.toml")?)?
//! let pre: Preprocess = "size=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225".parse()?;
//! let mut stream = Stream::new(&ctx, model, config, pre, StreamOptions::default())?;
//! let rgba = vec![128u8; 640 * 480 * 4]; // from the camera
//! for result in stream.push(&Frame::rgba8(640, 480, rgba))? {
//!     println!("frame {}: class {} (p = {:.2})", result.index, result.class(), result.top_k[0].1);
//! }
//! stream.session().save_state("adapted.safetensors".as_ref())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `examples/facade.rs` runs both end to end. Everything below the facade (the ONNX decoder, the
//! IR, the plan, the kernels, the adaptation internals) is in hidden modules: reachable for the
//! CLI, the C ABI and the tests, not part of the API.

#[doc(hidden)]
pub mod adapt;
#[doc(hidden)]
pub mod engine;
#[doc(hidden)]
pub mod error;
#[doc(hidden)]
pub mod gpu;
#[doc(hidden)]
pub mod ir;
#[doc(hidden)]
pub mod npy;
#[doc(hidden)]
pub mod onnx;
#[doc(hidden)]
pub mod ops;
#[doc(hidden)]
pub mod plan;
#[doc(hidden)]
pub mod selftest;
#[doc(hidden)]
pub mod stream;
#[doc(hidden)]
pub mod tensor;

pub use adapt::config::AdaptConfig as Config;
pub use adapt::config::Method;
pub use adapt::methods::auto::Diagnostics as AutoDiagnostics;
pub use adapt::session::{Prediction, Selection, Session};
pub use engine::{Engine, Model, NonFinite};
pub use error::{Error, ErrorKind, Result};
pub use gpu::{GpuContext, LimitsProfile};
pub use ir::AffineNormInfo as AffineNorm;
pub use ir::BatchNormInfo as BatchNorm;
pub use selftest::SelfTestReport;
pub use stream::frame::{Frame, PixelFormat, Plane, Rotation};
pub use stream::policy::{FrameResult, LandedStep, StreamOptions, StreamSession as Stream};
pub use stream::preprocess::PreprocessSpec as Preprocess;
pub use tensor::{DType, Tensor};
/// The wgpu this crate is built on, for apps that hand their own device to
/// [`GpuContext::from_device`].
pub use wgpu;
