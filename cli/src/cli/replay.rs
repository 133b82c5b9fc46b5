//! `acclimate replay`: run an adaptation method over a folder of batches, write every step; and
//! `acclimate fisher`: compute and save EATA's Fisher.

use std::path::Path;

use super::CliError;
use acclimate::adapt::config::AdaptConfig;
use acclimate::adapt::replay::{BatchOutcome, replay};
use acclimate::adapt::session::Session;
use acclimate::{GpuContext, Model};

/// Replays `batches` and writes the record to `out`. Skipped batches are warned about and
/// recorded; the exit status is an error only when every batch was skipped or the device failed
/// (the record is written first in both cases, and the state is then not saved).
pub fn replay_cmd(
    model: &Path,
    config: &Path,
    batches: &Path,
    out: &Path,
    save_state: Option<&Path>,
    load_state: Option<&Path>,
) -> Result<(), CliError> {
    let cfg = AdaptConfig::from_file(config).map_err(|e| CliError::Usage(e.to_string()))?;
    let model = Model::load(model)?;
    let ctx = GpuContext::new()?;
    let mut session = Session::new(&ctx, model, cfg).map_err(|e| CliError::Usage(e.to_string()))?;
    if let Some(p) = load_state {
        session.load_state(p).map_err(|e| CliError::Usage(e.to_string()))?;
    }
    let log = replay(&mut session, batches).map_err(|e| CliError::Usage(e.to_string()))?;
    for b in &log.steps {
        if let BatchOutcome::Skipped { skipped } = &b.outcome {
            eprintln!("warning: batch {} ({}) skipped: {skipped}", b.batch, b.file);
        }
    }
    let json = serde_json::to_string(&log)?;
    // Temporary file + rename: an interrupted run never leaves a half-written record in place of
    // an earlier one.
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    std::fs::write(&tmp, json).and_then(|_| std::fs::rename(&tmp, out)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        CliError::Usage(format!("cannot write {}: {e}", out.display()))
    })?;
    let stepped = log.stepped();
    if let Some(why) = &log.stopped {
        return Err(CliError::Usage(format!(
            "replay stopped at {why}; the {stepped} batch(es) stepped on before it and {} skipped are in {}{}",
            log.skipped,
            out.display(),
            if save_state.is_some() { "; the state was not saved" } else { "" }
        )));
    }
    if stepped == 0 {
        return Err(CliError::Usage(format!(
            "every one of the {} batch(es) in {} was skipped (the reasons are in {}); nothing was adapted{}",
            log.batches,
            batches.display(),
            out.display(),
            if save_state.is_some() { " and the state was not saved" } else { "" }
        )));
    }
    if let Some(p) = save_state {
        session.save_state(p).map_err(|e| CliError::Usage(e.to_string()))?;
    }
    eprintln!(
        "replayed {stepped} of {} batch(es) ({} skipped, {} update(s) refused by the parameter guard) with {}; wrote {}",
        log.batches,
        log.skipped,
        log.refused,
        ctx.adapter_summary(),
        out.display()
    );
    Ok(())
}

pub fn fisher_cmd(model: &Path, batches: &Path, out: &Path, config: Option<&Path>) -> Result<(), CliError> {
    let mut cfg = match config {
        Some(p) => AdaptConfig::from_file(p).map_err(|e| CliError::Usage(e.to_string()))?,
        None => AdaptConfig::default(),
    };
    cfg.adapt.method = acclimate::adapt::config::Method::Eata;
    cfg.eata.fisher_batches = Some(batches.to_path_buf());
    cfg.eata.fisher_file = None;
    let model = Model::load(model)?;
    let ctx = GpuContext::new()?;
    let session = Session::new(&ctx, model, cfg).map_err(|e| CliError::Usage(e.to_string()))?;
    session.save_fisher(out).map_err(|e| CliError::Usage(e.to_string()))?;
    eprintln!("wrote the Fisher of {} parameters to {}", session.adapted_parameters().len(), out.display());
    Ok(())
}
