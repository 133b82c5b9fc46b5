//! The errors of adaptation: a session's ([`AdaptError`]) and an output stage's set-up
//! ([`OutputError`]). Below every other adaptation module, so that the methods, the step driver
//! and the session share them without depending on each other.

use std::path::PathBuf;

use thiserror::Error;

use super::state::StateError;
use crate::gpu::GpuError;
use crate::plan::PlanError;
use crate::tensor::DType;

/// Errors of an adaptation session.
#[derive(Debug, Error)]
pub enum AdaptError {
    #[error(
        "the model has no BatchNormalization layers with constant parameters (nor, for a gradient method, LayerNormalization, GroupNormalization or InstanceNormalization ones): method '{0}' cannot adapt it"
    )]
    NoBatchNorm(String),
    #[error("no normalization layer is left to adapt after include/exclude ({0})")]
    NothingAdapted(String),
    #[error(
        "batch of shape {shape:?} contains {count} NaN or infinite value(s) (first at flat index {first}); the batch was skipped and nothing was updated"
    )]
    NonFinite { shape: Vec<usize>, count: usize, first: usize },
    #[error(
        "batch of shape {0:?} is empty: a step needs at least one sample (the batch statistics of an empty batch are NaN)"
    )]
    EmptyBatch(Vec<usize>),
    #[error("the model's output does not declare a fixed class count: set eata.e_margin explicitly")]
    Classes,
    #[error("Fisher batches: {0}")]
    Fisher(String),
    #[error("the batch is {0}; adaptation takes float32")]
    DType(DType),
    #[error("the model takes one input of rank {expected}, the batch has shape {got:?}")]
    Rank { expected: usize, got: Vec<usize> },
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// Why an output stage cannot be set up.
#[derive(Debug, Error)]
pub enum OutputError {
    #[error("lame.features: {0}")]
    Features(String),
    #[error("label_shift.adapter {}: {reason}", path.display())]
    Adapter { path: PathBuf, reason: String },
    #[error("label_shift.confusion {}: {reason}", path.display())]
    Confusion { path: PathBuf, reason: String },
    #[error("label_shift.source_prior: {0}")]
    SourcePrior(String),
    #[error("output stage: {0}")]
    Plan(String),
}
