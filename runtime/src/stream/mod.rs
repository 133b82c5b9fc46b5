//! Streams of camera frames: GPU preprocessing of raw frames into the model's input, frame
//! sources for the CLI (IDX, image folders, video), shift schedules (corruptions, label orders),
//! the per-frame and batched stream policies, and the run report.
#[cfg(feature = "cli")]
pub mod corrupt;
pub mod frame;
pub mod policy;
pub mod preprocess;
#[cfg(feature = "cli")]
pub mod report;
#[cfg(feature = "cli")]
pub mod schedule;
#[cfg(feature = "cli")]
pub mod source;
