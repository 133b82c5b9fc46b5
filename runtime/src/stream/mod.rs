//! Streams of camera frames: GPU preprocessing of raw frames into the model's input and the
//! per-frame and batched stream policies. Frame sources, shift schedules and the run report are
//! evaluation tooling and live in the `acclimate-cli` crate.
pub mod frame;
pub mod policy;
pub mod preprocess;
