//! ONNX Runtime as the CPU reference backend: what the GPU engine is checked against (parity
//! tests, `acclimate run --backend ort`) and measured against (`acclimate bench`).
//!
//! ONNX Runtime is loaded at run time from the shared library that the pip wheel
//! `onnxruntime==1.31.1` ships, named by `ORT_DYLIB_PATH`. Loading at run time keeps the build free
//! of native downloads (the `ort` crate's default features fetch binaries, which fails offline)
//! and lets mobile builds leave the backend out. A missing or wrong library is a
//! [`ReferenceError`], never a panic: `ort` only panics when its own environment variable lookup
//! fails lazily, which this module avoids by always loading through [`ort::init_from`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ort::logging::LogLevel;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};
use thiserror::Error;

use acclimate::tensor::{DType, Data, Tensor};

/// The environment variable that names the ONNX Runtime shared library.
pub const DYLIB_ENV: &str = "ORT_DYLIB_PATH";

const DYLIB_HINT: &str = "it should point at libonnxruntime.so.1.31.1 inside the pip wheel onnxruntime==1.31.1, \
     e.g. .venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 (tools/test.sh sets it)";

/// Why the reference backend could not load or run a model.
#[derive(Clone, Debug, Error)]
pub enum ReferenceError {
    #[error("ONNX Runtime is not available: {DYLIB_ENV} is not set; {DYLIB_HINT}")]
    DylibUnset,
    #[error("ONNX Runtime could not be loaded from {DYLIB_ENV}={}: {reason}; {DYLIB_HINT}", path.display())]
    DylibLoad { path: PathBuf, reason: String },
    #[error("ONNX Runtime environment: {0}")]
    Environment(String),
    #[error("ONNX Runtime cannot load {}: {reason}", path.display())]
    Session { path: PathBuf, reason: String },
    #[error("the model takes {expected} input(s), {got} given")]
    InputCount { expected: usize, got: usize },
    #[error("input '{name}': {reason}")]
    Input { name: String, reason: String },
    #[error("ONNX Runtime failed to run the model: {0}")]
    Run(String),
    #[error("output '{name}': {reason}")]
    Output { name: String, reason: String },
}

/// Options of a reference session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrtOptions {
    /// Intra-op threads; `None` lets ONNX Runtime choose (one per physical core).
    pub intra_threads: Option<usize>,
    /// Run the graph as written, without ONNX Runtime's graph rewrites. Its rewrites change the
    /// arithmetic where values are not finite: Conv+BatchNormalization fusion scales the weights
    /// before they meet the input (3e38 that overflows to NaN unfused stays finite fused), and the
    /// NCHWc convolution skips padded taps (a NaN weight no longer meets the padding's zeros).
    /// The runtime fuses nothing, so NaN semantics are compared against this mode.
    pub unoptimized: bool,
}

/// The library path from the value of `ORT_DYLIB_PATH`.
fn dylib_path(var: Option<std::ffi::OsString>) -> Result<PathBuf, ReferenceError> {
    match var {
        Some(v) if !v.is_empty() => {
            let path = PathBuf::from(v);
            // dlopen on a missing absolute path would search nothing else anyway, but its message
            // ("cannot open shared object file") hides which variable was wrong.
            if path.is_absolute() && !path.is_file() {
                return Err(ReferenceError::DylibLoad { path, reason: "no such file".into() });
            }
            Ok(path)
        }
        _ => Err(ReferenceError::DylibUnset),
    }
}

/// Loads the library and builds the process-wide environment, once. ONNX Runtime allows one
/// environment per process, so a failure is remembered too: retrying cannot succeed.
fn environment() -> Result<ort::environment::Environment, ReferenceError> {
    static ENV: OnceLock<Result<ort::environment::Environment, ReferenceError>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = dylib_path(std::env::var_os(DYLIB_ENV))?;
        let builder = ort::init_from(&path)
            .map_err(|e| ReferenceError::DylibLoad { path: path.clone(), reason: e.to_string() })?;
        // ONNX Runtime's own logger prints to stderr; routing it through `log` keeps the CLI's
        // stderr to its one error line unless RUST_LOG asks for more.
        let logger: ort::logging::LoggerFunction = Arc::new(|level, category, _id, location, message| {
            let lvl = match level {
                LogLevel::Fatal | LogLevel::Error => log::Level::Warn,
                LogLevel::Warning => log::Level::Info,
                LogLevel::Info => log::Level::Debug,
                LogLevel::Verbose => log::Level::Trace,
            };
            log::log!(target: "onnxruntime", lvl, "[{category}] {message} ({location})");
        });
        builder
            .with_name("acclimate-reference")
            .with_telemetry(false)
            .with_logger(logger)
            .build()
            .map_err(|e| ReferenceError::Environment(e.to_string()))
    })
    .clone()
}

/// A model loaded into ONNX Runtime's CPU execution provider.
pub struct OrtSession {
    session: Session,
    path: PathBuf,
    options: OrtOptions,
}

impl std::fmt::Debug for OrtSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtSession").field("path", &self.path).field("options", &self.options).finish()
    }
}

impl OrtSession {
    /// Loads `model_path` with ONNX Runtime's default threading.
    pub fn new(model_path: &Path) -> Result<Self, ReferenceError> {
        Self::with_options(model_path, OrtOptions::default())
    }

    pub fn with_options(model_path: &Path, options: OrtOptions) -> Result<Self, ReferenceError> {
        let err = |e: String| ReferenceError::Session { path: model_path.to_path_buf(), reason: e };
        if !model_path.is_file() {
            return Err(err("no such file".into()));
        }
        let env = environment()?;
        let mut builder = Session::builder(&env)
            .map_err(|e| err(e.to_string()))?
            .with_optimization_level(if options.unoptimized {
                GraphOptimizationLevel::Disable
            } else {
                GraphOptimizationLevel::All
            })
            .map_err(|e| err(e.to_string()))?
            // Verbose session logs would all cross the FFI boundary into our logger; warnings suffice.
            .with_log_level(LogLevel::Warning)
            .map_err(|e| err(e.to_string()))?;
        if let Some(n) = options.intra_threads {
            builder = builder.with_intra_threads(n.max(1)).map_err(|e| err(e.to_string()))?;
        }
        let session = builder.commit_from_file(model_path).map_err(|e| err(one_line(&e.to_string())))?;
        Ok(OrtSession { session, path: model_path.to_path_buf(), options })
    }

    pub fn options(&self) -> OrtOptions {
        self.options
    }

    /// Names of the inputs the caller feeds, in order.
    pub fn input_names(&self) -> Vec<String> {
        self.session.inputs().iter().map(|o| o.name().to_string()).collect()
    }

    /// Runs the model; one tensor per model input, in order; returns every output in order.
    /// Float outputs come back as float32 and integer outputs as int64.
    pub fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ReferenceError> {
        let specs: Vec<(String, Option<TensorElementType>)> =
            self.session.inputs().iter().map(|o| (o.name().to_string(), o.dtype().tensor_type())).collect();
        if specs.len() != inputs.len() {
            return Err(ReferenceError::InputCount { expected: specs.len(), got: inputs.len() });
        }
        let mut feed: Vec<(String, ort::session::SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
        for ((name, ty), t) in specs.into_iter().zip(inputs) {
            let input_err = |reason: String| ReferenceError::Input { name: name.clone(), reason };
            if t.shape.iter().product::<usize>() != t.numel() {
                return Err(input_err(format!("{} values do not fill shape {:?}", t.numel(), t.shape)));
            }
            let value: ort::session::SessionInputValue<'_> = match (ty, &t.data) {
                (Some(TensorElementType::Float32), Data::F32(v)) if t.dtype == DType::F32 => {
                    TensorRef::from_array_view((t.shape.clone(), v.as_slice()))
                        .map_err(|e| input_err(e.to_string()))?
                        .into()
                }
                (Some(TensorElementType::Int64), Data::I64(v)) if t.dtype == DType::I64 => {
                    TensorRef::from_array_view((t.shape.clone(), v.as_slice()))
                        .map_err(|e| input_err(e.to_string()))?
                        .into()
                }
                (Some(expected), _) => {
                    return Err(input_err(format!("the model takes {expected:?}, got a {} tensor", t.dtype)));
                }
                (None, _) => return Err(input_err("the model input is not a tensor".into())),
            };
            feed.push((name, value));
        }
        let names: Vec<String> = self.session.outputs().iter().map(|o| o.name().to_string()).collect();
        let outputs = self.session.run(feed).map_err(|e| ReferenceError::Run(one_line(&e.to_string())))?;
        let mut result = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            result
                .push(to_tensor(&outputs[i]).map_err(|reason| ReferenceError::Output { name: name.clone(), reason })?);
        }
        Ok(result)
    }
}

fn to_tensor(value: &DynValue) -> Result<Tensor, String> {
    let ty = match value.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => return Err(format!("is a {other:?}, not a tensor")),
    };
    fn dims(shape: &[i64]) -> Result<Vec<usize>, String> {
        shape.iter().map(|&d| usize::try_from(d).map_err(|_| format!("negative dimension in {shape:?}"))).collect()
    }
    let e = |e: ort::Error| e.to_string();
    Ok(match ty {
        TensorElementType::Float32 => {
            let (s, d) = value.try_extract_tensor::<f32>().map_err(e)?;
            Tensor { dtype: DType::F32, shape: dims(s)?, data: Data::F32(d.to_vec()) }
        }
        TensorElementType::Float64 => {
            let (s, d) = value.try_extract_tensor::<f64>().map_err(e)?;
            Tensor { dtype: DType::F64, shape: dims(s)?, data: Data::F32(d.iter().map(|&x| x as f32).collect()) }
        }
        TensorElementType::Int64 => {
            let (s, d) = value.try_extract_tensor::<i64>().map_err(e)?;
            Tensor { dtype: DType::I64, shape: dims(s)?, data: Data::I64(d.to_vec()) }
        }
        TensorElementType::Int32 => {
            let (s, d) = value.try_extract_tensor::<i32>().map_err(e)?;
            Tensor { dtype: DType::I32, shape: dims(s)?, data: Data::I64(d.iter().map(|&x| x as i64).collect()) }
        }
        other => {
            return Err(format!("element type {other:?} is not read back (float32, float64, int32, int64 are)"));
        }
    })
}

/// ONNX Runtime's messages span lines (status code, file and line); the CLI prints one.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_path_names_the_variable_and_the_wheel() {
        let msg = dylib_path(None).unwrap_err().to_string();
        assert!(msg.contains("ORT_DYLIB_PATH"), "{msg}");
        assert!(msg.contains("onnxruntime==1.31.1"), "{msg}");
        assert!(msg.contains("libonnxruntime.so.1.31.1"), "{msg}");
        assert!(matches!(dylib_path(Some("".into())), Err(ReferenceError::DylibUnset)));
    }

    #[test]
    fn missing_library_is_an_error() {
        let msg = dylib_path(Some("/nonexistent/libonnxruntime.so.1.31.1".into())).unwrap_err().to_string();
        assert!(msg.contains("ORT_DYLIB_PATH=/nonexistent/libonnxruntime.so.1.31.1"), "{msg}");
        assert!(msg.contains("no such file"), "{msg}");
    }
}
