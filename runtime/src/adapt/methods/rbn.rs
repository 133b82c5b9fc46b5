//! `rbn` (robust BN as in RoTTA): the running statistics follow an EMA of the test batches'
//! (`[adapt] norm_momentum`) and the layers normalise with the updated values; no parameter
//! changes. The statistics are committed by the parameter guard, so a batch that overflows
//! leaves them as they were.

use super::AdaptMethod;
use crate::adapt::config::NormMode;

pub(crate) struct Rbn;

pub(crate) static RBN: Rbn = Rbn;

impl AdaptMethod for Rbn {
    fn default_norm(&self) -> NormMode {
        NormMode::Ema
    }
}
