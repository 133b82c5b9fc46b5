//! `eta`, `eata` and `eata+woc` (Niu et al., ICML 2022; tta-methods.md §2): reliable and
//! non-redundant sample selection, entropy weights, and EATA's Fisher anchor (kernels in
//! `shaders/select.wgsl`).
//!
//! Everything the reference does on the host happens on the GPU without a readback: the
//! selection writes the per-sample loss coefficients w_i/|S| (0 for rejected samples) used by
//! the entropy loss, computes the next moving average m of selected probabilities (committed by
//! the parameter guard with the step), and closes the optimizer's gate when nothing is
//! selected, so that no step is taken at all (not even momentum). EATA's Fisher is computed once,
//! at set-up, by a pass over clean batches ([`FisherPass`]) or loaded from a file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{AdaptMethod, Host, Objective, Param, Section, StepCx, entropy_margin, mean_coefficients, ones, woc};
use crate::adapt::bn::StatsMode;
use crate::adapt::config::{AdaptConfig, Invalid, NormMode};
use crate::adapt::error::AdaptError;
use crate::adapt::loss;
use crate::adapt::reverse::bytes_of;
use crate::adapt::state;
use crate::gpu::{KernelKey, Params, Shader};
use crate::ir::Graph;
use crate::ops::layout::{gather, scatter};
use crate::ops::{BufRef, Dispatch};
use crate::plan::{PlanError, WeightInit};
use crate::tensor::Tensor;

/// The `[eata]` section (ETA and EATA; tta-methods.md §2).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EataSection {
    /// The entropy threshold E0 (absolute); `None`: 0.4·ln C.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e_margin: Option<f32>,
    /// ε of the redundancy filter |cos(m, p)| < ε.
    pub d_margin: f32,
    /// β of the Fisher penalty (EATA only).
    pub fisher_alpha: f32,
    /// A folder of clean float32 `.npy` batches the Fisher is computed from (EATA).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fisher_batches: Option<PathBuf>,
    /// A Fisher saved earlier (`Session::save_fisher`, `acclimate fisher`): a safetensors file
    /// with one tensor per adapted parameter, checked against the model's fingerprint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fisher_file: Option<PathBuf>,
}

impl Default for EataSection {
    fn default() -> Self {
        EataSection { e_margin: None, d_margin: 0.05, fisher_alpha: 2000.0, fisher_batches: None, fisher_file: None }
    }
}

impl Section for EataSection {
    fn validate(&self) -> Result<(), Invalid> {
        if let Some(e) = self.e_margin
            && !(e.is_finite() && e > 0.0)
        {
            return Err(Invalid::new("eata.e_margin", e, "must be a finite number > 0"));
        }
        if !(self.d_margin.is_finite() && self.d_margin > 0.0) {
            return Err(Invalid::new("eata.d_margin", self.d_margin, "must be a finite number > 0"));
        }
        if !(self.fisher_alpha.is_finite() && self.fisher_alpha >= 0.0) {
            return Err(Invalid::new("eata.fisher_alpha", self.fisher_alpha, "must be a finite number >= 0"));
        }
        if self.fisher_batches.is_some() && self.fisher_file.is_some() {
            return Err(Invalid::new(
                "eata.fisher_file",
                "(both set)",
                "give either fisher_batches or fisher_file, not both",
            ));
        }
        Ok(())
    }

    fn paths(&mut self) -> Vec<&mut PathBuf> {
        [&mut self.fisher_batches, &mut self.fisher_file].into_iter().flatten().collect()
    }
}

/// ETA/EATA settings resolved for a model with `classes` outputs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EataSpec {
    /// E0 (default 0.4·ln C).
    pub e_margin: f32,
    /// ε of the redundancy filter.
    pub d_margin: f32,
    /// β of the Fisher penalty; 0 for ETA.
    pub fisher_alpha: f32,
    /// eata+woc: the wisdom-of-crowds filter is ANDed into the selection.
    pub woc: bool,
}

/// One of the three: ETA (`fisher` false), EATA, and EATA with the WoC filter.
pub(crate) struct Eata {
    fisher: bool,
    woc: bool,
}

pub(crate) static ETA: Eata = Eata { fisher: false, woc: false };
pub(crate) static EATA: Eata = Eata { fisher: true, woc: false };
pub(crate) static EATA_WOC: Eata = Eata { fisher: true, woc: true };

/// Prefix of EATA's persistent buffers: `eata:m`, `eata:fisher:<param>`, `eata:anchor:<param>`.
const PREFIX: &str = "eata:";

fn fisher_name(param: &str) -> String {
    format!("eata:fisher:{param}")
}

impl AdaptMethod for Eata {
    fn default_norm(&self) -> NormMode {
        NormMode::Batch
    }

    fn updates_parameters(&self) -> bool {
        true
    }

    fn validate(&self, config: &AdaptConfig) -> Result<(), Invalid> {
        let e = &config.eata;
        if self.fisher && e.fisher_alpha > 0.0 && e.fisher_batches.is_none() && e.fisher_file.is_none() {
            return Err(Invalid::new(
                "eata.fisher_batches",
                "(missing)",
                "EATA needs the Fisher: give clean batches (fisher_batches) or a saved Fisher (fisher_file)",
            ));
        }
        Ok(())
    }

    fn objective(&self, config: &AdaptConfig, graph: &Graph) -> Result<Option<Arc<dyn Objective>>, AdaptError> {
        let spec = EataSpec {
            e_margin: entropy_margin(config.eata.e_margin, graph)?,
            d_margin: config.eata.d_margin,
            fisher_alpha: if self.fisher { config.eata.fisher_alpha } else { 0.0 },
            woc: self.woc,
        };
        Ok(Some(Arc::new(EataObjective(spec))))
    }

    fn state_prefixes(&self) -> &'static [&'static str] {
        &[PREFIX]
    }

    fn prepare(&self, host: &mut dyn Host, config: &AdaptConfig) -> Result<(), AdaptError> {
        if !self.fisher {
            return Ok(());
        }
        if let Some(dir) = &config.eata.fisher_batches {
            compute_fisher(host, dir)?;
        } else if let Some(file) = &config.eata.fisher_file {
            load_fisher(host, file)?;
        }
        Ok(())
    }
}

/// Weighted entropy over the selected samples, plus the Fisher penalty when `fisher_alpha` > 0;
/// no step when nothing is selected.
#[derive(Debug)]
pub struct EataObjective(pub EataSpec);

impl Objective for EataObjective {
    fn select(&self, cx: &mut StepCx<'_>, dispatches: &mut Vec<Dispatch>) -> Result<BufRef, PlanError> {
        let (b, c) = (cx.b, cx.c);
        // sel: [flags (B), weights (B), the next m (C + 1), coefficients (B)] (select.wgsl).
        let (probs, ent, coeff, sel) = (
            cx.program.value(bytes_of(cx.logits_shape)),
            cx.program.value(b as u64 * 4),
            cx.program.value(b as u64 * 4),
            cx.program.value((3 * b + c + 1) as u64 * 4),
        );
        // eata_select's packed inputs [entropy (B), m (C + 1), mask (B)].
        let packed = cx.program.value((2 * b + c + 1) as u64 * 4);
        let m = cx.program.weight("eata:m", || WeightInit::Zeros(c + 1), true);
        cx.deferred.push((sel, 2 * b, m, c + 1));
        dispatches.extend(loss::softmax_stats(
            BufRef::Value(cx.logits),
            b,
            c,
            BufRef::Value(probs),
            BufRef::Value(ent),
        ));
        let mask = if self.0.woc {
            // eata+woc: the WoC flags (the original model's class kept its confidence) gate
            // EATA's filters; EATA's loss and m follow the result.
            let logits0 = woc::original_logits(cx)?;
            let (probs0, ent0, coeff0, sel0) = (
                cx.program.value(bytes_of(cx.logits_shape)),
                cx.program.value(b as u64 * 4),
                cx.program.value(b as u64 * 4),
                cx.program.value(3 * b as u64 * 4),
            );
            dispatches.extend(loss::softmax_stats(
                BufRef::Value(logits0),
                b,
                c,
                BufRef::Value(probs0),
                BufRef::Value(ent0),
            ));
            dispatches.extend(woc::woc_select(
                BufRef::Value(probs),
                BufRef::Value(probs0),
                BufRef::Value(coeff0),
                BufRef::Value(sel0),
                BufRef::Weight(cx.state),
                b,
                c,
            ));
            BufRef::Value(sel0)
        } else {
            ones(cx.program, b)
        };
        dispatches.extend(select(
            &self.0,
            BufRef::Value(probs),
            BufRef::Value(ent),
            BufRef::Weight(m),
            BufRef::Value(coeff),
            BufRef::Value(sel),
            BufRef::Weight(cx.state),
            mask,
            BufRef::Value(packed),
            b,
            c,
        ));
        cx.program.pinned_end.push(sel);
        cx.selection = Some(sel);
        Ok(BufRef::Value(coeff))
    }

    fn parameter(
        &self,
        cx: &mut StepCx<'_>,
        param: Param<'_>,
        dispatches: &mut Vec<Dispatch>,
        scratch: &mut Vec<u64>,
    ) -> Result<(), PlanError> {
        if self.0.fisher_alpha <= 0.0 {
            return Ok(());
        }
        // β·Σ F·(θ − θ*)², θ* the source values, in the same backward.
        let Param { name, weight: p, n, grad } = param;
        let f = cx.program.weight(&fisher_name(name), || WeightInit::Zeros(n), true);
        let init = cx.program.weights[p].init.clone();
        let anchor = cx.program.weight(&format!("eata:anchor:{name}"), || init, true);
        dispatches.extend(loss::ewc_penalty(
            BufRef::Weight(p),
            BufRef::Weight(anchor),
            BufRef::Weight(f),
            self.0.fisher_alpha,
            n,
            BufRef::Value(cx.loss),
            BufRef::Value(grad),
            true,
            scratch,
        ));
        Ok(())
    }
}

/// The EATA Fisher pass: cross-entropy with argmax pseudo-labels, averaged over the batch; the
/// gradient's square is added to the Fisher buffers and no parameter changes.
#[derive(Debug)]
pub struct FisherPass;

impl Objective for FisherPass {
    fn select(&self, cx: &mut StepCx<'_>, _dispatches: &mut Vec<Dispatch>) -> Result<BufRef, PlanError> {
        Ok(mean_coefficients(cx.program, cx.b))
    }

    fn loss(
        &self,
        cx: &mut StepCx<'_>,
        coeff: BufRef,
        dispatches: &mut Vec<Dispatch>,
        scratch: &mut Vec<u64>,
    ) -> Result<(), PlanError> {
        let (b, c) = (cx.b, cx.c);
        let labels = cx.program.value(b as u64 * 4);
        dispatches.push(argmax_rows(BufRef::Value(cx.logits), BufRef::Value(labels), b, c));
        dispatches.extend(loss::cross_entropy_loss(
            BufRef::Value(cx.logits),
            BufRef::Value(labels),
            coeff,
            b,
            c,
            BufRef::Value(cx.loss),
            BufRef::Value(cx.dlogits),
            false,
            scratch,
        ));
        Ok(())
    }

    fn parameter(
        &self,
        cx: &mut StepCx<'_>,
        param: Param<'_>,
        dispatches: &mut Vec<Dispatch>,
        _scratch: &mut Vec<u64>,
    ) -> Result<(), PlanError> {
        let f = cx.program.weight(&fisher_name(param.name), || WeightInit::Zeros(param.n), true);
        dispatches.push(fisher_accumulate(BufRef::Value(param.grad), BufRef::Weight(f), param.n));
        Ok(())
    }

    fn updates(&self) -> bool {
        false
    }
}

/// EATA's Fisher information, once, before adaptation (tta-methods.md §2): on clean batches,
/// in batch-statistics mode, the square of each batch-mean cross-entropy gradient with argmax
/// pseudo-labels, averaged over the batches. Parameters do not change.
pub(crate) fn compute_fisher(host: &mut dyn Host, dir: &Path) -> Result<(), AdaptError> {
    let files = crate::npy::batch_files(dir).map_err(|e| AdaptError::Fisher(e.to_string()))?;
    if files.is_empty() {
        return Err(AdaptError::Fisher(format!("no .npy batches in {}", dir.display())));
    }
    let names: Vec<String> = host.adapted_parameters().iter().map(|n| fisher_name(n)).collect();
    // Start from zero: the pass accumulates squared gradients into the Fisher buffers.
    for name in &names {
        host.zero(name);
    }
    let mut batches = files
        .iter()
        .map(|f| crate::npy::read_f32(f).map(|x| (f.clone(), x)).map_err(|e| AdaptError::Fisher(e.to_string())));
    let rejected = |f: &Path, e: AdaptError| AdaptError::Fisher(format!("{}: {e}", f.display()));
    host.run_pass(StatsMode::Batch, Arc::new(FisherPass), &mut batches, &rejected)?;
    // Average over the batches (the reference divides the sum once, after the last batch).
    let scale = 1.0 / files.len() as f32;
    let fisher = host.read(&names)?;
    // A batch that overflows inside the network leaves NaN or infinity in the squared
    // gradients; EATA's penalty would then poison every step. Refuse it here, at set-up.
    for (name, t) in &fisher {
        let bad = t.to_f32_vec().iter().filter(|v| !(*v * scale).is_finite()).count();
        if bad > 0 {
            for n in &names {
                host.zero(n);
            }
            host.flush();
            return Err(AdaptError::Fisher(format!(
                "the Fisher of {} has {bad} NaN or infinite value(s): a batch in {} overflows inside the network",
                name.trim_start_matches("eata:fisher:"),
                dir.display()
            )));
        }
    }
    for (name, t) in fisher {
        if host.has_buffer(&name) {
            let v: Vec<f32> = t.to_f32_vec().iter().map(|x| x * scale).collect();
            host.write(&name, &v);
        }
    }
    host.flush();
    Ok(())
}

/// EATA's Fisher information by adapted parameter name (zeros before it was computed or
/// loaded).
pub(crate) fn fisher(host: &dyn Host) -> Result<Vec<(String, Tensor)>, AdaptError> {
    let mut out = Vec::new();
    for (name, p) in host.parameters()? {
        let key = fisher_name(&name);
        let values = match host.has_buffer(&key) {
            true => host
                .read(std::slice::from_ref(&key))?
                .pop()
                .map(|(_, t)| t.to_f32_vec())
                .unwrap_or_else(|| vec![0.0; p.numel()]),
            false => vec![0.0; p.numel()],
        };
        out.push((name, Tensor::f32(p.shape.clone(), values[..p.numel().min(values.len())].to_vec())));
    }
    Ok(out)
}

/// Saves the Fisher (one tensor per adapted parameter) as a safetensors file tied to the
/// model's fingerprint, for `eata.fisher_file`.
pub(crate) fn save_fisher(host: &dyn Host, path: &Path) -> Result<(), AdaptError> {
    let tensors: Vec<(String, Tensor)> = fisher(host)?.into_iter().map(|(n, t)| (fisher_name(&n), t)).collect();
    let meta = vec![("content".to_string(), "eata-fisher".to_string())];
    state::save_state(path, host.fingerprint(), &tensors, &meta)?;
    Ok(())
}

/// Loads a Fisher saved by [`save_fisher`] for the same model. Every adapted parameter must be
/// present with its size; on any error nothing changes.
pub(crate) fn load_fisher(host: &mut dyn Host, path: &Path) -> Result<(), AdaptError> {
    let fp = host.fingerprint().to_string();
    let loaded = state::load_state(path, &fp)?;
    if loaded.metadata.get("content").map(String::as_str) != Some("eata-fisher") {
        return Err(AdaptError::Fisher(format!(
            "{} is not a saved Fisher (save one with save_fisher)",
            path.display()
        )));
    }
    let mut writes = Vec::new();
    for (name, p) in host.parameters()? {
        let key = fisher_name(&name);
        let t = loaded.get(&key).ok_or_else(|| {
            AdaptError::Fisher(format!("{} has no Fisher for the adapted parameter {name}", path.display()))
        })?;
        if t.numel() != p.numel() {
            return Err(AdaptError::Fisher(format!(
                "{}: the Fisher of {name} has {} values, the parameter {}",
                path.display(),
                t.numel(),
                p.numel()
            )));
        }
        writes.push((key, t.to_f32_vec()));
    }
    for (key, v) in writes {
        host.write(&key, &v);
    }
    host.flush();
    Ok(())
}

/// Selection over `probs` [B, C] and `entropy` \[B\] among the samples whose `mask` \[B\] is nonzero:
/// writes `coeff` \[B\], `sel` [3B + C + 1] (flags, weights, the next [m, validity flag] from the
/// selected samples, coefficients), and sets the optimizer gate. Downlevel limits allow 4 storage
/// buffers per kernel, so entropy, `mstate` [C + 1] and mask are first packed into `packed`
/// [2B + C + 1], and the coefficients go through `sel` to `coeff`.
#[allow(clippy::too_many_arguments)]
pub fn select(
    spec: &EataSpec,
    probs: BufRef,
    entropy: BufRef,
    mstate: BufRef,
    coeff: BufRef,
    sel: BufRef,
    opt_state: BufRef,
    mask: BufRef,
    packed: BufRef,
    b: usize,
    c: usize,
) -> Vec<Dispatch> {
    vec![
        gather(&[(entropy, b), (mstate, c + 1), (mask, b)], packed, 0),
        Dispatch {
            key: KernelKey::new(Shader::Select, "eata_select"),
            params: Params::new().u32(b as u32).u32(c as u32).f32(spec.e_margin).f32(spec.d_margin),
            buffers: vec![probs, packed, sel, opt_state],
            workgroups: [1, 1, 1],
        },
        scatter(sel, (coeff, 2 * b + c + 1, b), (coeff, 0, 0)),
    ]
}

/// Pseudo-labels: the first argmax of each row of `logits` [B, C], as f32 class indices.
pub fn argmax_rows(logits: BufRef, labels: BufRef, b: usize, c: usize) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Select, "argmax_rows"),
        params: Params::new().u32(b as u32).u32(c as u32).f32(0.0).f32(0.0),
        buffers: vec![logits, labels],
        workgroups: [b.div_ceil(64) as u32, 1, 1],
    }
}

/// `fisher += grad²` over `n` values.
pub fn fisher_accumulate(grad: BufRef, fisher: BufRef, n: usize) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Select, "fisher_accumulate"),
        params: Params::new().u32(n as u32).f32(1.0),
        buffers: vec![grad, fisher],
        workgroups: [n.div_ceil(64) as u32, 1, 1],
    }
}
