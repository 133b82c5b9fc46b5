//! Acclimate: run ONNX image classifiers on any GPU through WGSL compute shaders (wgpu), and keep
//! them accurate on the device with test-time adaptation.
//!
//! The layers, bottom up:
//! - [`onnx`]: protobuf decoding into a raw model (tensors, attributes, external data);
//! - [`ir`]: a validated graph of parsed [`ops`], with symbolic batch (and other) dimensions;
//! - [`plan`]: specialisation to concrete shapes, constant folding, lowering to WGSL dispatches,
//!   lifetime-based buffer reuse, one encoder per run;
//! - [`gpu`]: the wgpu device context and the pipeline cache; kernels live in `shaders/`;
//! - [`Engine`]: the facade that loads a model once and runs it on any batch size.
//!
//! ```no_run
//! let model = acclimate::Model::load("mobilenetv2.onnx".as_ref())?;
//! let ctx = acclimate::GpuContext::new()?;
//! let mut engine = acclimate::Engine::new(&ctx, model);
//! let x = acclimate::Tensor::f32(vec![1, 3, 224, 224], vec![0.0; 3 * 224 * 224]);
//! let logits = engine.run(&[x])?;
//! # Ok::<(), acclimate::Error>(())
//! ```

pub mod adapt;
pub mod bench;
#[cfg(feature = "cli")]
pub mod cli;
pub mod engine;
pub mod error;
pub mod gpu;
pub mod ir;
pub mod npy;
pub mod onnx;
pub mod ops;
pub mod plan;
#[cfg(feature = "ort")]
pub mod reference;
pub mod stream;
pub mod tensor;

pub use engine::{Engine, Model, NonFinite};
pub use error::{Error, ErrorKind, Result};
pub use gpu::GpuContext;
pub use tensor::{DType, Tensor};
