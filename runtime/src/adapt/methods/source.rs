//! `source`: the model as trained, with its running statistics; nothing adapts. The baseline
//! every method is measured against, and the model LAME corrects.

use super::AdaptMethod;
use crate::adapt::config::NormMode;

pub(crate) struct Source;

pub(crate) static SOURCE: Source = Source;

impl AdaptMethod for Source {
    fn default_norm(&self) -> NormMode {
        NormMode::Source
    }

    fn source_model(&self) -> bool {
        true
    }
}
