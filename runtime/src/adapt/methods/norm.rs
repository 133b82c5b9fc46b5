//! `norm` (BN-adapt, Schneider et al. 2020): every BatchNormalization layer normalises with the
//! current batch's statistics; no parameter changes. The statistics modes themselves live in
//! [`crate::adapt::bn`], since every method picks one (`[adapt] norm`).

use super::AdaptMethod;
use crate::adapt::config::NormMode;

pub(crate) struct Norm;

pub(crate) static NORM: Norm = Norm;

impl AdaptMethod for Norm {
    fn default_norm(&self) -> NormMode {
        NormMode::Batch
    }
}
