//! The adaptation methods and output stages, one file each: its config section (struct,
//! defaults, validation), its lowering into the step program, and its logic between batches.
//!
//! The step program ([`super::train::StepPlan::build`]) is a generic driver: forward, the
//! objective's `after_forward` (ROID's returned logits), output stages, then, for a method that
//! adapts, the method's [`Objective`] (`select` → `loss` → the reverse pass → `gradients` →
//! `parameter`) and the guarded optimizer update (with the objective's `after_update` checks and
//! writes: ROID's ensembling). A method is an
//! `AdaptMethod` (normalization default, cross-section checks, objective, output stage, set-up,
//! per-session state), found through `Method::def`.
//!
//! # Adding a method
//!
//! 1. Write `methods/<name>.rs`: a `pub(crate) static` implementing `AdaptMethod` (override
//!    only the hooks it needs: `updates_parameters` + `objective` for a gradient method), its
//!    [`Objective`] if it takes steps (`select` returns the per-sample loss coefficients; the
//!    default `loss` is the entropy weighted by them), and, if it has a `[<name>]` section, the
//!    section struct with `#[serde(deny_unknown_fields, default)]`, a `Default` and a
//!    `Section` impl (`validate` names the key in every error).
//! 2. Add one line to `registry!` below: `Variant = <next discriminant>, "<name>",
//!    $crate::adapt::methods::<name>::<STATIC>;` under `methods`, plus `<name>:
//!    $crate::adapt::methods::<name>::<Section>,` under `sections` if it has one. That line
//!    creates the [`Method`](super::config::Method) variant (config name, C discriminant) and the
//!    `AdaptConfig` field, parses and validates the section, and dispatches to the hooks.
//! 3. Declare the module below (`pub mod <name>;`).
//! 4. Kernels go into a WGSL file under `shaders/` registered as every other; a reference
//!    fixture for the method goes into `tools/tta_reference.py` and `tests/tta_reference.rs`.
//!
//! Persistent buffers a method keeps between batches (weights created with `shared = true`) are
//! named `<prefix>:...`; list the prefix in `AdaptMethod::state_prefixes` so that saved states
//! carry them. Changes that need a new hook add it to the trait with a default that does
//! nothing, so that no other method changes.

pub mod adapter;
pub mod auto;
pub mod eata;
pub mod label_shift;
pub mod lame;
pub mod norm;
pub mod rbn;
pub mod roid;
pub mod sar;
pub mod source;
pub mod tent;
pub mod woc;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::bn::StatsMode;
use super::config::{AdaptConfig, Invalid, NormMode};
use super::error::AdaptError;
pub use super::error::OutputError;
use super::loss;
use super::optim::OptimizerSpec;
use super::reverse::AdaptedLayer;
use crate::gpu::GpuContext;
use crate::gpu::{KernelKey, Params, Shader};
use crate::ir::{Dim, Graph};
use crate::ops::{BufRef, Dispatch, Operand};
use crate::plan::{Forward, PlanError, Program, WeightInit};
use crate::tensor::Tensor;

/// Every method and every method's config section, in the order of the config enum (its serde
/// variant list and `Method::ALL`) and of the `AdaptConfig` fields. Expanded by `config.rs`,
/// which defines `Method` and `AdaptConfig` from it.
macro_rules! registry {
    ($then:ident) => {
        $then! {
            methods {
                /// The source model, unchanged: running statistics, no updates.
                Source = 0, "source", $crate::adapt::methods::source::SOURCE;
                /// Test-batch normalization statistics, no parameter updates (BN-adapt, Schneider et al. 2020).
                Norm = 1, "norm", $crate::adapt::methods::norm::NORM;
                /// Robust BN (RoTTA): EMA of test statistics, no parameter updates.
                Rbn = 2, "rbn", $crate::adapt::methods::rbn::RBN;
                /// TENT: batch statistics, mean-entropy minimisation over the BN affine parameters.
                Tent = 3, "tent", $crate::adapt::methods::tent::TENT;
                /// ETA (Niu et al. 2022): TENT on reliable, non-redundant samples, weighted by exp(E0 − E).
                Eta = 4, "eta", $crate::adapt::methods::eata::ETA;
                /// EATA: ETA plus the Fisher-weighted anchor β·Σ F·(θ − θ*)².
                Eata = 5, "eata", $crate::adapt::methods::eata::EATA;
                /// Wisdom-of-crowds selection (Lee et al. 2023) with the diversity term.
                Woc = 6, "woc", $crate::adapt::methods::woc::WOC;
                /// SAR (Niu et al. 2023): entropy filter, sharpness-aware step, recovery by reset.
                Sar = 7, "sar", $crate::adapt::methods::sar::SAR;
                /// EATA with the wisdom-of-crowds filter ANDed into its sample selection (EATA's loss).
                EataWoc = 8, "eata+woc", $crate::adapt::methods::eata::EATA_WOC;
                /// LAME (Boudiaf et al. 2022): the source model unchanged, its probabilities corrected by
                /// Laplacian smoothing over the batch's features (see [`super::output`]).
                Lame = 9, "lame", $crate::adapt::methods::lame::LAME;
                /// ROID (Marsden et al. 2024): certainty- and diversity-weighted soft likelihood ratio,
                /// weight ensembling toward the source, prior-corrected outputs.
                Roid = 10, "roid", $crate::adapt::methods::roid::ROID;
                /// The default: per batch, from the stream's label correlation, an ETA step on the batch's
                /// statistics or LAME over the source statistics; a reset on collapse (see [`auto`](crate::adapt::methods::auto)).
                Auto = 11, "auto", $crate::adapt::methods::auto::AUTO;
            }
            sections {
                /// `[eata]`: ETA and EATA (and eata+woc).
                eata: $crate::adapt::methods::eata::EataSection,
                /// `[woc]`.
                woc: $crate::adapt::methods::woc::WocSection,
                /// `[sar]`.
                sar: $crate::adapt::methods::sar::SarSection,
                /// `[lame]`: method `lame`.
                lame: $crate::adapt::methods::lame::LameSection,
                /// `[roid]`.
                roid: $crate::adapt::methods::roid::RoidSection,
                /// `[auto]`.
                auto: $crate::adapt::methods::auto::AutoSection,
                /// `[label_shift]`: a correction of any method's output probabilities.
                label_shift: $crate::adapt::methods::label_shift::LabelShiftSection,
            }
        }
    };
}
pub(crate) use registry;

/// A config section owned by a method's file.
pub(crate) trait Section {
    /// The section's own checks; every error names its key.
    fn validate(&self) -> Result<(), Invalid>;
    /// The paths it holds, which a config file resolves against its own folder.
    fn paths(&mut self) -> Vec<&mut PathBuf> {
        Vec::new()
    }
}

/// An adaptation method: what `[adapt] method = "..."` selects.
pub(crate) trait AdaptMethod: Sync {
    /// The normalization statistics the method's reference implementation uses.
    fn default_norm(&self) -> NormMode;

    /// Whether the method takes gradient steps on parameters (and so needs an optimizer and an
    /// [`Objective`]).
    fn updates_parameters(&self) -> bool {
        false
    }

    /// Whether the method runs the source model (a model without BatchNormalization is then
    /// acceptable with source statistics).
    fn source_model(&self) -> bool {
        false
    }

    /// Checks across sections that hold only when this method is selected.
    fn validate(&self, _config: &AdaptConfig) -> Result<(), Invalid> {
        Ok(())
    }

    /// The step's objective for `graph`; `None` for a method without gradient steps.
    fn objective(&self, _config: &AdaptConfig, _graph: &Graph) -> Result<Option<Arc<dyn Objective>>, AdaptError> {
        Ok(None)
    }

    /// The output stage the method adds between the label-shift adapter and the prior
    /// correction (LAME), checked against `graph`.
    fn output_stage(&self, _config: &AdaptConfig, _graph: &Graph) -> Result<Option<Arc<dyn Stage>>, OutputError> {
        Ok(None)
    }

    /// Name prefixes of the persistent buffers the method keeps between batches (saved states
    /// carry them).
    fn state_prefixes(&self) -> &'static [&'static str] {
        &[]
    }

    /// The value a persistent buffer of the method (`len` floats) restarts from on
    /// [`Session::reset`](super::session::Session::reset); `None` leaves it as it is.
    fn reset_value(&self, _name: &str, _len: usize) -> Option<Vec<f32>> {
        None
    }

    /// Once, when the session is created (EATA's Fisher).
    fn prepare(&self, _host: &mut dyn Host, _config: &AdaptConfig) -> Result<(), AdaptError> {
        Ok(())
    }

    /// The method's state between batches, kept by the session, if it has one (SAR's EMA).
    fn after_batch(&self, _config: &AdaptConfig) -> Option<Box<dyn AfterBatch>> {
        None
    }
}

/// What a method decides after the steps on a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BatchEnd {
    /// The method's recovery signal after the batch (SAR's EMA of the second-pass loss).
    pub ema: Option<f32>,
    /// Return the session to the source now.
    pub reset: bool,
}

/// A method's state between batches and its after-batch logic.
pub(crate) trait AfterBatch: Send + Sync {
    /// After a batch's steps; `second` is the first step's second-pass loss and the number of
    /// samples that pass kept (SAR). The session resets (which does not touch this state) when
    /// the result says so.
    fn after_batch(&mut self, second: Option<(f32, usize)>) -> BatchEnd;
}

/// What a method's set-up may do to its session (implemented by the session).
pub(crate) trait Host {
    /// Names of the adapted parameters, scale then bias per layer.
    fn adapted_parameters(&self) -> Vec<String>;
    /// The adapted parameters' current values.
    fn parameters(&self) -> Result<Vec<(String, Tensor)>, AdaptError>;
    /// Named persistent buffers (the source values for a buffer no program created yet; absent
    /// names are left out).
    fn read(&self, names: &[String]) -> Result<Vec<(String, Tensor)>, AdaptError>;
    /// Whether a persistent buffer exists.
    fn has_buffer(&self, name: &str) -> bool;
    /// Overwrites a persistent buffer with zeros, if it exists.
    fn zero(&mut self, name: &str);
    /// Writes a persistent buffer, creating it if no program has yet.
    fn write(&mut self, name: &str, values: &[f32]);
    /// Submits the queued writes.
    fn flush(&mut self);
    /// The model's fingerprint (state files).
    fn fingerprint(&self) -> &str;
    /// Runs one step program with `objective` in `mode` on each batch as it comes (programs kept
    /// per shape until the call returns), without output stages. A batch the session refuses
    /// (dtype, rank, non-finite values) fails the pass with `rejected(file, why)`.
    fn run_pass(
        &mut self,
        mode: StatsMode,
        objective: Arc<dyn Objective>,
        batches: &mut dyn Iterator<Item = Result<(PathBuf, Tensor), AdaptError>>,
        rejected: &dyn Fn(&Path, AdaptError) -> AdaptError,
    ) -> Result<(), AdaptError>;
}

/// One adapted parameter as the update phase sees it.
#[derive(Clone, Copy, Debug)]
pub struct Param<'a> {
    /// The ONNX initializer name.
    pub name: &'a str,
    /// Its weight in the program.
    pub weight: usize,
    /// Its element count.
    pub n: usize,
    /// Its gradient value.
    pub grad: usize,
}

/// One tensor the optimizer updates, as [`Objective::after_update`] sees it: its weight, its
/// gradient value, and the weights of its moments (aliases of the parameter for the moments the
/// optimizer does not keep), with its element count.
#[derive(Clone, Copy, Debug)]
pub struct Updated {
    pub weight: usize,
    pub grad: usize,
    pub m: usize,
    pub v: usize,
    pub n: usize,
}

/// What [`Objective::after_forward`] adds to the step program.
#[derive(Clone, Debug, Default)]
pub struct AfterForward {
    /// The logits the step returns, and the output stages read, instead of the forward's [B, C].
    pub returned: Option<usize>,
    /// Values the objective's later phases read ([`StepCx::forwarded`]).
    pub values: Vec<usize>,
}

/// Method state computed ahead and committed by the parameter guard at the end of the program:
/// (value, offset in it, the weight it goes to, element count).
pub type Deferred = (usize, usize, usize, usize);

/// The step program under construction, as an [`Objective`] sees it.
pub struct StepCx<'a> {
    pub ctx: &'a GpuContext,
    pub graph: &'a Graph,
    /// The first forward pass.
    pub fwd: &'a Forward,
    /// The input shape.
    pub shape: &'a [usize],
    pub program: &'a mut Program,
    pub mode: StatsMode,
    pub adapted: &'a [AdaptedLayer],
    /// The logits value [B, C] of the first forward pass.
    pub logits: usize,
    /// The values [`Objective::after_forward`] handed on (ROID's probabilities and entropies).
    pub forwarded: &'a [usize],
    pub logits_shape: &'a [usize],
    pub b: usize,
    pub c: usize,
    /// The optimizer's state buffer (step count, gate, guard flag), a weight.
    pub state: usize,
    /// The loss value (one f32) and its gradient w.r.t. the logits.
    pub loss: usize,
    pub dlogits: usize,
    /// Method state the parameter guard commits at the end (EATA's m).
    pub deferred: &'a mut Vec<Deferred>,
    /// A selection read back with the step: [flags (B), weights (B)] (ETA/EATA, WoC).
    pub selection: Option<usize>,
    /// A second pass read back with the step: (its loss, [flags (B), |S|]) (SAR).
    pub second: Option<(usize, usize)>,
    /// A value the objective's `select` hands to its later phases (SAR's first selection).
    pub carried: Option<usize>,
}

/// What a gradient step minimises, lowered into the step program.
pub trait Objective: fmt::Debug + Send + Sync {
    /// Right after the forward pass, ahead of the output stages (its own items): values the
    /// later phases read, and the logits the step returns instead of the forward's (ROID's
    /// prior correction).
    fn after_forward(
        &self,
        _program: &mut Program,
        _logits: usize,
        _logits_shape: &[usize],
    ) -> Result<AfterForward, PlanError> {
        Ok(AfterForward::default())
    }

    /// Dispatches ahead of the loss (in the step's `loss` item): softmax statistics, sample
    /// filters, another forward pass. Returns the per-sample coefficients of the loss \[B\].
    fn select(&self, cx: &mut StepCx<'_>, dispatches: &mut Vec<Dispatch>) -> Result<BufRef, PlanError>;

    /// The loss and dL/dlogits into `cx.loss` and `cx.dlogits`: by default the entropy of each
    /// sample times its coefficient, summed.
    fn loss(
        &self,
        cx: &mut StepCx<'_>,
        coeff: BufRef,
        dispatches: &mut Vec<Dispatch>,
        scratch: &mut Vec<u64>,
    ) -> Result<(), PlanError> {
        dispatches.extend(loss::entropy_loss(
            BufRef::Value(cx.logits),
            coeff,
            cx.b,
            cx.c,
            BufRef::Value(cx.loss),
            BufRef::Value(cx.dlogits),
            false,
            scratch,
        ));
        Ok(())
    }

    /// After the reverse pass: the gradients the update uses, by parameter (SAR replaces them
    /// with those at its perturbed point).
    fn gradients(&self, _cx: &mut StepCx<'_>, grads: Vec<(String, usize)>) -> Result<Vec<(String, usize)>, PlanError> {
        Ok(grads)
    }

    /// Per adapted parameter, in the update item ahead of the optimizer (EATA's anchor penalty,
    /// the Fisher accumulation).
    fn parameter(
        &self,
        _cx: &mut StepCx<'_>,
        _param: Param<'_>,
        _dispatches: &mut Vec<Dispatch>,
        _scratch: &mut Vec<u64>,
    ) -> Result<(), PlanError> {
        Ok(())
    }

    /// Given every tensor the optimizer updates: guard checks, recorded with the optimizer's before
    /// anything is written, and writes, recorded after its updates (ROID's ensembling toward the
    /// source). Each write must be a no-op when the guard's flag is up.
    fn after_update(
        &self,
        _cx: &mut StepCx<'_>,
        _optimizer: &OptimizerSpec,
        _updated: &[Updated],
    ) -> Result<(Vec<Dispatch>, Vec<Dispatch>), PlanError> {
        Ok((Vec::new(), Vec::new()))
    }

    /// Whether the optimizer applies the gradients (false for a pass that only measures them).
    fn updates(&self) -> bool {
        true
    }
}

/// The output stage under construction: the probabilities so far and what the stage chain
/// reads back and commits.
pub struct StageCx<'a> {
    pub ctx: &'a GpuContext,
    pub graph: &'a Graph,
    pub fwd: &'a Forward,
    pub program: &'a mut Program,
    /// The logits value [B, C] and its softmax (the unmodulated probabilities).
    pub logits: usize,
    pub probs0: usize,
    pub b: usize,
    pub c: usize,
    /// p_s \[C\], normalised.
    pub source_prior: &'a [f32],
    /// The dispatches of the stage's last item, and its scratch sizes.
    pub dispatches: Vec<Dispatch>,
    pub scratch: Vec<u64>,
    /// The probabilities the next stage acts on.
    pub current: BufRef,
    /// The estimate q̂ the batch was corrected with \[C\].
    pub prior: Option<usize>,
    /// The gate of a running estimate (weight id).
    pub gate: Option<usize>,
    /// A running estimate's next value, committed by the parameter guard.
    pub deferred: Option<Deferred>,
}

impl StageCx<'_> {
    /// A scratch buffer of the current item.
    pub fn temp(&mut self, bytes: u64) -> BufRef {
        self.scratch.push(bytes.max(4));
        BufRef::Scratch(self.scratch.len() - 1)
    }

    /// p_s, declared where a kernel reads it; private to the program (a constant of the config).
    pub fn source_prior_weight(&mut self) -> BufRef {
        let (c, ps) = (self.c, self.source_prior.to_vec());
        BufRef::Weight(self.program.weight(
            "ls:source_prior",
            || WeightInit::Tensor(Arc::new(Tensor::f32(vec![c], ps))),
            false,
        ))
    }
}

/// One stage of the output chain (label-shift adapter, LAME, prior correction), in the order
/// [`super::output`] describes.
pub trait Stage: fmt::Debug + Send + Sync {
    fn lower(&self, cx: &mut StageCx<'_>) -> Result<(), OutputError>;

    /// The stage reads a tensor the config names (LAME's `features`): the forward must compute
    /// it as its own value (no activation fused into the node that writes it).
    fn reads_named_tensor(&self) -> bool {
        false
    }
}

/// The weight of `b` ones [B] (a selection that keeps every sample).
pub(crate) fn ones(program: &mut Program, b: usize) -> BufRef {
    BufRef::Weight(program.weight(
        &format!("adapt:ones:{b}"),
        || WeightInit::Tensor(Arc::new(Tensor::f32(vec![b], vec![1.0; b]))),
        true,
    ))
}

/// The weight of `b` values 1/B [B] (the mean over the batch).
pub(crate) fn mean_coefficients(program: &mut Program, b: usize) -> BufRef {
    BufRef::Weight(program.weight(
        &format!("adapt:mean_coeff:{b}"),
        || WeightInit::Tensor(Arc::new(Tensor::f32(vec![b], vec![1.0 / b as f32; b]))),
        true,
    ))
}

/// An entropy margin E0: the configured one, else 0.4·ln C from the model's declared classes.
pub(crate) fn entropy_margin(configured: Option<f32>, graph: &Graph) -> Result<f32, AdaptError> {
    if let Some(e) = configured {
        return Ok(e);
    }
    let classes = graph
        .outputs
        .first()
        .and_then(|o| o.dims.as_ref())
        .and_then(|d| d.last())
        .and_then(|d| if let Dim::Fixed(n) = d { Some(*n) } else { None })
        .ok_or(AdaptError::Classes)?;
    Ok(0.4 * (classes as f32).ln())
}

/// The parameter block of the output-stage kernels (`shaders/output.wgsl`).
pub(crate) fn output_params(n: usize, c: usize, d: usize, k: usize, flag: u32, x: f32, y: f32) -> Params {
    Params::new().u32(n as u32).u32(c as u32).u32(d as u32).u32(k as u32).u32(flag).f32(x).f32(y).f32(0.0)
}

/// A dispatch of an output-stage kernel.
pub(crate) fn output_dispatch(
    entry: &'static str,
    params: Params,
    buffers: Vec<BufRef>,
    workgroups: [u32; 3],
) -> Dispatch {
    Dispatch { key: KernelKey::new(Shader::Output, entry), params, buffers, workgroups }
}

/// The value id and shape of an operand computed by the program (not a constant).
pub(crate) fn value_operand(o: &Option<Operand>) -> Option<(usize, Vec<usize>)> {
    match o {
        Some(Operand { buf: BufRef::Value(v), shape, .. }) => Some((*v, shape.clone())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapt::config::Method;

    #[test]
    fn registry_discriminants_are_dense_and_names_unique() {
        for (i, m) in Method::ALL.iter().enumerate() {
            assert_eq!(*m as u32 as usize, i, "{m}: the C ABI passes methods by discriminant");
        }
        let mut names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Method::ALL.len());
    }

    #[test]
    fn a_method_that_updates_parameters_has_an_objective_and_the_others_none() {
        // A graph whose output declares 10 classes, so that the default E0 resolves.
        let graph = Graph {
            opset: 13,
            producer: String::new(),
            nodes: Vec::new(),
            initializers: Default::default(),
            inputs: Vec::new(),
            outputs: vec![crate::ir::TensorInfo {
                name: "y".into(),
                dtype: None,
                dims: Some(vec![Dim::Fixed(1), Dim::Fixed(10)]),
            }],
        };
        for m in Method::ALL {
            let mut config = AdaptConfig::default();
            config.adapt.method = m;
            let objective = m.def().objective(&config, &graph).unwrap_or_else(|e| panic!("{m}: {e}"));
            assert_eq!(objective.is_some(), m.updates_parameters(), "{m}");
        }
    }
}
