//! Test-time adaptation on the GPU.
//!
//! The parts, composable: normalization statistics modes ([`bn`]), the reverse pass
//! ([`reverse`]) and the step program ([`train`]), losses ([`loss`]), PyTorch-exact optimizers
//! ([`optim`]), the config file ([`config`]), the methods and output stages, one file each
//! ([`methods`]), the output-stage chain ([`output`]), saved state ([`state`]), and the facade that
//! ties them together ([`Session`]); [`replay`] runs a session over recorded batches.
//!
//! Dependencies run one way: `error` and the building blocks (`bn`, `loss`, `optim`, `reverse`,
//! `state`) under `methods`, `methods` under `output` and `train`, those under `session`, and
//! `replay` over `session`.
//! Exact semantics follow `shared/docs/tta-methods.md`.

pub mod bn;
pub mod config;
pub mod error;
pub mod loss;
pub mod methods;
pub mod optim;
pub mod output;
pub mod replay;
pub mod reverse;
pub mod session;
pub mod state;
pub mod train;

pub use config::{AdaptConfig, Method, NormMode, OptimizerKind};
pub use session::{AdaptError, Prediction, Session, StepWarmer};
