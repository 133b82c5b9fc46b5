//! The `acclimate` command and the evaluation tooling around the [`acclimate`] library: stream
//! sources, shift schedules (corruptions, label orders), the run report, ONNX Runtime as the CPU
//! reference, and the benchmark. Nothing here is linked into an app: the library is what a phone
//! links; this crate is what a laptop or CI runs.

pub mod assets;
pub mod bench;
pub mod cli;
pub mod reference;
pub mod stream;
