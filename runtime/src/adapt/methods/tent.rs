//! `tent` (Wang et al. 2021): batch statistics, and the mean entropy of the batch's predictions
//! minimised over every adapted BN scale and bias (tta-methods.md §1).

use std::sync::Arc;

use super::{AdaptMethod, Objective, StepCx, mean_coefficients};
use crate::adapt::config::{AdaptConfig, NormMode};
use crate::adapt::error::AdaptError;
use crate::ir::Graph;
use crate::ops::{BufRef, Dispatch};
use crate::plan::PlanError;

pub(crate) struct Tent;

pub(crate) static TENT: Tent = Tent;

impl AdaptMethod for Tent {
    fn default_norm(&self) -> NormMode {
        NormMode::Batch
    }

    fn updates_parameters(&self) -> bool {
        true
    }

    fn objective(&self, _config: &AdaptConfig, _graph: &Graph) -> Result<Option<Arc<dyn Objective>>, AdaptError> {
        Ok(Some(Arc::new(MeanEntropy)))
    }
}

/// The mean entropy over the batch: every sample's coefficient is 1/B.
#[derive(Debug)]
pub struct MeanEntropy;

impl Objective for MeanEntropy {
    fn select(&self, cx: &mut StepCx<'_>, _dispatches: &mut Vec<Dispatch>) -> Result<BufRef, PlanError> {
        Ok(mean_coefficients(cx.program, cx.b))
    }
}
