//! Streams of camera frames: GPU preprocessing of raw frames into the model's input, frame
//! sources for the CLI (IDX, image folders, video), shift schedules (corruptions, label orders),
//! the per-frame and batched stream policies, and the run report.
pub mod frame;
