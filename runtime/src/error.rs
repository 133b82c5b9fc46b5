//! The library's error: one variant per layer, each carrying that layer's error unchanged, and
//! [`ErrorKind`], the coarse classification an embedder (the C ABI's status codes) acts on.
//!
//! A layer's error that only passes another layer's error through (`AdaptError::Gpu`,
//! `PlanError::Gpu`, `IrError::Onnx`, ...) is lifted to that layer's variant on conversion, so a
//! GPU failure is `Error::Gpu` whether the engine, a session or a frame upload hit it. Variants
//! that add context (the frame index of `StreamError::Frame`, the node of `PlanError::Node`) stay
//! where they are.

use thiserror::Error;

use crate::adapt::AdaptError;
use crate::adapt::config::ConfigError;
use crate::adapt::output::OutputError;
use crate::adapt::replay::ReplayError;
use crate::adapt::state::StateError;
use crate::gpu::GpuError;
use crate::ir::IrError;
use crate::npy::NpyError;
use crate::onnx::OnnxError;
use crate::ops::OpError;
use crate::plan::PlanError;
use crate::stream::frame::FrameError;
use crate::stream::policy::StreamError;
use crate::stream::preprocess::SpecError;

/// `Result` with the library's [`Error`](enum@Error).
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure of the library. Match on [`Error::kind`] to decide what to do; match on the
/// variant for the layer's own detail (an [`OpError`] names op, node, opset and input shapes).
///
/// ```
/// let err = acclimate::Model::from_bytes(b"not a model").unwrap_err();
/// assert_eq!(err.kind(), acclimate::ErrorKind::Model);
/// ```
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    #[error(transparent)]
    Ir(IrError),
    #[error(transparent)]
    Plan(PlanError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Npy(#[from] NpyError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Adapt(AdaptError),
    #[error(transparent)]
    Replay(ReplayError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Frame(FrameError),
    #[error(transparent)]
    Stream(#[from] StreamError),
}

/// What kind of failure an [`Error`](enum@Error) is: what the caller got wrong, or what went wrong around it.
/// The C ABI returns one status code per kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The caller passed something unusable: an input of the wrong shape, type or count, a NaN
    /// input that was not allowed, a data file of the wrong element type.
    InvalidArgument,
    /// The model cannot be run: malformed ONNX, an unsupported op or attribute, shapes that do
    /// not fit its ops.
    Model,
    /// The config (or a preprocessing spec, or a file it names) is malformed or does not fit the
    /// model: the method cannot adapt it, a key has a bad value.
    Config,
    /// A frame or batch cannot be used: bad planes or strides, non-finite values, empty.
    Frame,
    /// A saved state is torn, foreign (another model or format version), non-finite, or does not
    /// fit the session.
    State,
    /// The GPU failed: no adapter, out of memory, a lost device, a size beyond its limits.
    Gpu,
    /// A file could not be read or written (missing, permissions, disk full).
    Io,
    /// Acclimate itself is at fault (an invariant between its layers broke): a bug to report.
    Internal,
}

impl Error {
    /// The kind of this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Onnx(e) => onnx_kind(e),
            Error::Ir(e) => ir_kind(e),
            Error::Plan(e) => plan_kind(e),
            Error::Gpu(_) => ErrorKind::Gpu,
            Error::Npy(e) => npy_kind(e),
            Error::Config(e) => config_kind(e),
            Error::State(e) => state_kind(e),
            Error::Output(_) => ErrorKind::Config,
            Error::Adapt(e) => adapt_kind(e),
            Error::Replay(e) => replay_kind(e),
            Error::Spec(_) => ErrorKind::Config,
            Error::Frame(e) => frame_kind(e),
            Error::Stream(e) => stream_kind(e),
        }
    }

    /// The op failure behind this error, if an op failed (at load, specialisation, lowering or
    /// in an adaptation step's reverse pass), whichever layer reported it.
    pub fn op_error(&self) -> Option<&OpError> {
        fn of_plan(e: &PlanError) -> Option<&OpError> {
            if let PlanError::Node(op) = e { Some(op) } else { None }
        }
        fn of_adapt(e: &AdaptError) -> Option<&OpError> {
            if let AdaptError::Plan(p) = e { of_plan(p) } else { None }
        }
        match self {
            Error::Ir(IrError::UnsupportedOp(op)) => Some(op),
            Error::Plan(p) => of_plan(p),
            Error::Adapt(a) => of_adapt(a),
            Error::Stream(StreamError::Adapt { source, .. }) => source.op_error(),
            Error::Stream(StreamError::Source(e)) => e.op_error(),
            _ => None,
        }
    }
}

fn onnx_kind(e: &OnnxError) -> ErrorKind {
    match e {
        OnnxError::Io { .. } => ErrorKind::Io,
        _ => ErrorKind::Model,
    }
}

fn op_kind(e: &OpError) -> ErrorKind {
    if e.is_internal() { ErrorKind::Internal } else { ErrorKind::Model }
}

fn ir_kind(e: &IrError) -> ErrorKind {
    match e {
        IrError::Onnx(e) => onnx_kind(e),
        IrError::UnsupportedOp(op) => op_kind(op),
        _ => ErrorKind::Model,
    }
}

fn plan_kind(e: &PlanError) -> ErrorKind {
    match e {
        PlanError::Node(op) => op_kind(op),
        PlanError::InputCount { .. }
        | PlanError::InputShape { .. }
        | PlanError::InputDType { .. }
        | PlanError::NonFiniteInput { .. }
        | PlanError::InputData { .. } => ErrorKind::InvalidArgument,
        PlanError::Program(_) => ErrorKind::Internal,
        PlanError::Gpu(_) => ErrorKind::Gpu,
    }
}

fn npy_kind(e: &NpyError) -> ErrorKind {
    match e {
        NpyError::Read { .. } | NpyError::Write { .. } => ErrorKind::Io,
        NpyError::DType { .. } | NpyError::Fortran { .. } | NpyError::Shape { .. } => ErrorKind::InvalidArgument,
    }
}

fn config_kind(e: &ConfigError) -> ErrorKind {
    match e {
        ConfigError::Read { .. } => ErrorKind::Io,
        ConfigError::Parse { .. } | ConfigError::Invalid { .. } => ErrorKind::Config,
    }
}

fn state_kind(e: &StateError) -> ErrorKind {
    match e {
        // A missing or unreadable file, a full disk: the state itself may be fine.
        StateError::Read { .. } | StateError::Write { .. } => ErrorKind::Io,
        // Torn, foreign, non-finite or not fitting the session (save_state refuses non-finite
        // values as `Invalid`).
        StateError::Corrupt { .. }
        | StateError::Version { .. }
        | StateError::Fingerprint { .. }
        | StateError::Missing { .. }
        | StateError::Tensor { .. }
        | StateError::Invalid(_)
        | StateError::Mismatch(_) => ErrorKind::State,
    }
}

fn adapt_kind(e: &AdaptError) -> ErrorKind {
    match e {
        // The method cannot adapt this model, or the config names files that do not fit it.
        AdaptError::NoBatchNorm(_)
        | AdaptError::NothingAdapted(_)
        | AdaptError::Classes
        | AdaptError::Fisher(_)
        | AdaptError::Output(_) => ErrorKind::Config,
        // The model's input rank and the batches a stream makes of its frames disagree.
        AdaptError::Rank { .. } => ErrorKind::Model,
        AdaptError::NonFinite { .. } | AdaptError::EmptyBatch(_) | AdaptError::DType(_) => ErrorKind::Frame,
        AdaptError::Plan(e) => plan_kind(e),
        AdaptError::Gpu(_) => ErrorKind::Gpu,
        AdaptError::State(e) => state_kind(e),
    }
}

fn replay_kind(e: &ReplayError) -> ErrorKind {
    match e {
        ReplayError::Npy(e) => npy_kind(e),
        ReplayError::Empty(_) => ErrorKind::InvalidArgument,
    }
}

fn frame_kind(e: &FrameError) -> ErrorKind {
    match e {
        FrameError::Gpu(_) => ErrorKind::Gpu,
        FrameError::Batch { source, .. } => frame_kind(source),
        FrameError::ZeroSize { .. }
        | FrameError::PlaneCount { .. }
        | FrameError::Stride { .. }
        | FrameError::ShortBuffer { .. }
        | FrameError::TooLarge { .. }
        | FrameError::Destination(_) => ErrorKind::Frame,
    }
}

fn stream_kind(e: &StreamError) -> ErrorKind {
    match e {
        StreamError::Frame { source, .. } => frame_kind(source),
        StreamError::Adapt { source, .. } => source.kind(),
        StreamError::Source(e) => e.kind(),
        // The [preprocess] spec makes frames of another shape than the model takes.
        StreamError::Input { .. } => ErrorKind::Config,
        StreamError::NoOutput => ErrorKind::Model,
        StreamError::Worker => ErrorKind::Internal,
    }
}

impl From<IrError> for Error {
    fn from(e: IrError) -> Error {
        match e {
            IrError::Onnx(e) => Error::Onnx(e),
            e => Error::Ir(e),
        }
    }
}

impl From<PlanError> for Error {
    fn from(e: PlanError) -> Error {
        match e {
            PlanError::Gpu(e) => Error::Gpu(e),
            e => Error::Plan(e),
        }
    }
}

impl From<AdaptError> for Error {
    fn from(e: AdaptError) -> Error {
        match e {
            AdaptError::Plan(e) => e.into(),
            AdaptError::Gpu(e) => Error::Gpu(e),
            AdaptError::State(e) => Error::State(e),
            AdaptError::Output(e) => Error::Output(e),
            e => Error::Adapt(e),
        }
    }
}

impl From<ReplayError> for Error {
    fn from(e: ReplayError) -> Error {
        match e {
            ReplayError::Npy(e) => Error::Npy(e),
            e => Error::Replay(e),
        }
    }
}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Error {
        match e {
            FrameError::Gpu(e) => Error::Gpu(e),
            e => Error::Frame(e),
        }
    }
}
