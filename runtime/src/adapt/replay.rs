//! Replaying a method over recorded batches: the per-step record that `acclimate replay` writes
//! and the reference comparisons read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::session::Session;
use crate::gpu::GpuError;
pub use crate::npy::batch_files;
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
    /// SAR and auto: whether the model was reset to the source after the batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset: Option<bool>,
    /// Output stages (LAME, label shift): the returned probabilities, one row per sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probs: Option<Vec<Vec<f32>>>,
    /// Label shift: the estimate q̂ the batch was corrected with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prior: Option<Vec<f32>>,
    /// The parameter guard refused the batch's update (it would have written NaN or infinity:
    /// a batch that overflows inside the network); the session is as it was before the batch.
    pub step_refused: bool,
    /// Method `auto`: what it saw in the batch and what it decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto: Option<crate::adapt::methods::auto::Diagnostics>,
}

/// One batch file of the folder: its step, or why it was skipped.
#[derive(Clone, Debug, Serialize)]
pub struct BatchRecord {
    /// Position of the file in the folder's lexicographic order, from 0.
    pub batch: usize,
    /// The file's name.
    pub file: String,
    #[serde(flatten)]
    pub outcome: BatchOutcome,
}

/// What became of a batch.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum BatchOutcome {
    /// The method stepped on it.
    Step(Box<StepRecord>),
    /// It could not be used (unreadable `.npy`, not float32, a shape the model does not take,
    /// NaN or infinite values, too large for the device) and nothing was updated.
    Skipped { skipped: String },
}

/// The record of a replay: one entry per batch file, in order, so `steps[i]` is always the
/// folder's batch `i`.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayLog {
    /// Batch files found in the folder.
    pub batches: usize,
    /// Entries of `steps` that were skipped.
    pub skipped: usize,
    /// Entries whose update the parameter guard refused (`step_refused`).
    pub refused: usize,
    /// Why the replay stopped before the last batch (the device failed); `null` when it ran to
    /// the end. The entries before the one it stopped at are complete.
    pub stopped: Option<String>,
    pub steps: Vec<BatchRecord>,
}

impl ReplayLog {
    /// Batches the method stepped on.
    pub fn stepped(&self) -> usize {
        self.steps.iter().filter(|s| matches!(s.outcome, BatchOutcome::Step(_))).count()
    }
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    let data = t.to_f32_vec();
    let cols = t.shape.last().copied().unwrap_or(1).max(1);
    data.chunks(cols).map(|c| c.to_vec()).collect()
}

/// Errors of a replay that prevent it from starting.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Npy(#[from] NpyError),
    #[error("no .npy batches in {0}")]
    Empty(PathBuf),
}

/// Whether `e` says the device itself failed (lost, or a result that could not be read back), so
/// no later batch can run either; every other error belongs to the batch.
fn device_failure(e: &crate::Error) -> bool {
    let crate::Error::Gpu(gpu) = e else { return false };
    matches!(gpu, GpuError::DeviceLost { .. } | GpuError::Readback(_) | GpuError::Uncaptured(_))
}

/// Runs `session` over the batches in `dir` and records every step.
///
/// A batch that cannot be used (unreadable `.npy`, not float32, a shape the model does not take,
/// NaN or infinite values, too large for the device's limits) is recorded as skipped, with the
/// reason, and the replay goes on; the session's state is not touched by it. If the device fails
/// (lost, or a readback error), the replay stops there: the log holds the batches before it and
/// says why in `stopped`.
pub fn replay(session: &mut Session, dir: &Path) -> Result<ReplayLog, ReplayError> {
    let files = batch_files(dir)?;
    if files.is_empty() {
        return Err(ReplayError::Empty(dir.to_path_buf()));
    }
    let ema = session.updates_statistics();
    let sar = session.config().adapt.method == super::config::Method::Sar;
    let mut log = ReplayLog { batches: files.len(), skipped: 0, refused: 0, stopped: None, steps: Vec::new() };
    for (batch, f) in files.iter().enumerate() {
        let file = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let outcome = match npy::read_f32(f) {
            Err(e) => Err(e.to_string()),
            Ok(x) => match step_record(session, &x, ema, sar) {
                Ok(r) => Ok(r),
                Err(e) if device_failure(&e) => {
                    log.stopped = Some(format!("batch {batch} ({file}): {e}"));
                    break;
                }
                Err(e) => Err(e.to_string()),
            },
        };
        let outcome = match outcome {
            Ok(r) => {
                log.refused += r.step_refused as usize;
                BatchOutcome::Step(Box::new(r))
            }
            Err(reason) => {
                log.skipped += 1;
                BatchOutcome::Skipped { skipped: reason }
            }
        };
        log.steps.push(BatchRecord { batch, file, outcome });
    }
    Ok(log)
}

/// Steps on `x` and reads back what the record holds.
fn step_record(session: &mut Session, x: &Tensor, ema: bool, sar: bool) -> crate::Result<StepRecord> {
    let pred = session.step(x)?;
    let params = session.parameters()?.into_iter().map(|(n, t)| (n, t.to_f32_vec())).collect();
    let stats =
        if ema { Some(session.statistics()?.into_iter().map(|(n, t)| (n, t.to_f32_vec())).collect()) } else { None };
    let (selected, weights) = match pred.selected {
        Some(sel) => (Some(sel.samples), Some(sel.weights)),
        None => (None, None),
    };
    let (ema, reset) = match (sar, &pred.auto) {
        (true, _) => (Some(pred.ema), Some(pred.reset)),
        // auto: its collapse reset.
        (false, Some(_)) => (None, Some(pred.reset)),
        (false, None) => (None, None),
    };
    Ok(StepRecord {
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
        step_refused: pred.skipped,
        auto: pred.auto,
    })
}
