//! Replaying a method over recorded batches: the per-step record that `acclimate replay` writes
//! and the reference comparisons read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::session::{AdaptError, Session};
use crate::npy::{self, NpyError};
use crate::tensor::Tensor;

/// One batch's record.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    /// The returned (pre-update) logits, one row per sample.
    pub logits: Vec<Vec<f32>>,
    /// The loss of the batch's first step; `null` for methods without one.
    pub loss: Option<f32>,
    /// Every adapted parameter after the batch, by ONNX initializer name.
    pub params: BTreeMap<String, Vec<f32>>,
    /// Running statistics after the batch, for methods that update them (`ema`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<BTreeMap<String, Vec<f32>>>,
    /// ETA/EATA: indices of the samples the filters kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selected: Option<Vec<usize>>,
    /// ETA/EATA: their weights exp(E0 − E).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<f32>>,
    /// SAR: the EMA of the second-pass loss after the batch (`null` until a sample is kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ema: Option<Option<f32>>,
    /// SAR: whether the model was reset to the source after the batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset: Option<bool>,
    /// Output stages (LAME, label shift): the returned probabilities, one row per sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probs: Option<Vec<Vec<f32>>>,
    /// Label shift: the estimate q̂ the batch was corrected with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prior: Option<Vec<f32>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplayLog {
    pub steps: Vec<StepRecord>,
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    let data = t.to_f32_vec();
    let cols = t.shape.last().copied().unwrap_or(1).max(1);
    data.chunks(cols).map(|c| c.to_vec()).collect()
}

/// The `.npy` files of `dir` in lexicographic order of file name.
pub fn batch_files(dir: &Path) -> Result<Vec<PathBuf>, NpyError> {
    let read_err = |source| NpyError::Read { path: dir.to_path_buf(), source };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "npy"))
        .collect();
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Errors of a replay: reading a batch or adapting on it.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Npy(#[from] NpyError),
    #[error("batch {file}: {source}")]
    Step { file: String, source: AdaptError },
    #[error(transparent)]
    Adapt(#[from] AdaptError),
    #[error("no .npy batches in {0}")]
    Empty(PathBuf),
}

/// Runs `session` over the batches in `dir` and records every step.
pub fn replay(session: &mut Session, dir: &Path) -> Result<ReplayLog, ReplayError> {
    let files = batch_files(dir)?;
    if files.is_empty() {
        return Err(ReplayError::Empty(dir.to_path_buf()));
    }
    let ema = session.updates_statistics();
    let mut steps = Vec::new();
    for f in files {
        let x = npy::read_f32(&f)?;
        let file = f.display().to_string();
        let pred = session.step(&x).map_err(|source| ReplayError::Step { file: file.clone(), source })?;
        let params = session.parameters()?.into_iter().map(|(n, t)| (n, t.to_f32_vec())).collect();
        let stats = if ema {
            Some(session.statistics()?.into_iter().map(|(n, t)| (n, t.to_f32_vec())).collect())
        } else {
            None
        };
        let (selected, weights) = match pred.selected {
            Some((s, w)) => (Some(s), Some(w)),
            None => (None, None),
        };
        let sar = session.config().adapt.method == super::config::Method::Sar;
        let (ema, reset) = if sar { (Some(pred.ema), Some(pred.reset)) } else { (None, None) };
        steps.push(StepRecord {
            logits: rows(&pred.logits),
            loss: pred.loss,
            params,
            stats,
            selected,
            weights,
            ema,
            reset,
            probs: pred.probs.as_ref().map(rows),
            prior: pred.prior,
        });
    }
    Ok(ReplayLog { steps })
}
