//! Test-time adaptation on the GPU.
//!
//! The parts, composable: normalization statistics modes ([`bn`]), the reverse pass and the step
//! program ([`train`]), losses ([`loss`]), PyTorch-exact optimizers ([`optim`]), the config file
//! ([`config`]), saved state ([`state`]), the output stages (LAME, label-shift corrections:
//! [`output`]), and the facade that ties them together ([`Session`]).
//! Exact semantics follow `shared/docs/tta-methods.md`.

pub mod bn;
pub mod config;
pub mod eata;
pub mod loss;
pub mod optim;
pub mod output;
pub mod replay;
pub mod roid;
pub mod session;
pub mod state;
pub mod train;

pub use config::{AdaptConfig, Method, NormMode, OptimizerKind};
pub use session::{AdaptError, Prediction, Session};
