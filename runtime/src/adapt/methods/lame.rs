//! `lame` (Boudiaf et al. 2022, fiveai/LAME; tta-methods.md §5): the source model unchanged,
//! its probabilities corrected by Laplacian smoothing over the batch's L2-normalised features
//! (fixed point Y ← softmax(log(P + 1e-10) + λ·W·Y)), on the GPU in the step's output stage
//! (`shaders/output.wgsl`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{AdaptMethod, Section, Stage, StageCx, output_dispatch, output_params, value_operand};
use crate::adapt::config::{AdaptConfig, Invalid, NormMode};
use crate::adapt::error::OutputError;
use crate::gpu::grid_1d;
use crate::ir::Graph;
use crate::ops::{BufRef, Dispatch, Op};
use crate::plan::Forward;

/// LAME's affinity between the L2-normalised features of a batch (tta-methods.md §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u32)]
pub enum Affinity {
    /// Dense exp(−d²/2σ²), σ the mean distance to the k-th nearest point counting the point itself.
    Rbf = 0,
    /// 1 for the k nearest other points of each row (self excluded, not symmetrised).
    Knn = 1,
    /// The Gram matrix Z·Zᵀ.
    Linear = 2,
}

crate::adapt::config::named_enum!(Affinity, "LAME affinity");

impl Affinity {
    pub const ALL: [Affinity; 3] = [Affinity::Rbf, Affinity::Knn, Affinity::Linear];

    pub fn name(self) -> &'static str {
        match self {
            Affinity::Rbf => "rbf",
            Affinity::Knn => "knn",
            Affinity::Linear => "linear",
        }
    }
}

/// The `[lame]` section (method `lame`; tta-methods.md §5).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LameSection {
    pub affinity: Affinity,
    /// k of the kNN affinity and of the rbf bandwidth.
    pub knn: usize,
    /// λ of the Laplacian term.
    pub lambda: f32,
    /// Most fixed-point iterations per batch.
    pub max_steps: u32,
    /// `"auto"`: the input of the graph's final Gemm/MatMul; otherwise a tensor name.
    pub features: String,
}

impl Default for LameSection {
    fn default() -> Self {
        LameSection { affinity: Affinity::Rbf, knn: 5, lambda: 1.0, max_steps: 100, features: "auto".into() }
    }
}

impl Section for LameSection {
    fn validate(&self) -> Result<(), Invalid> {
        if self.knn < 1 {
            return Err(Invalid::new("lame.knn", self.knn, "must be at least 1"));
        }
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(Invalid::new("lame.lambda", self.lambda, "must be a finite number >= 0"));
        }
        if self.max_steps < 1 {
            return Err(Invalid::new("lame.max_steps", self.max_steps, "must be at least 1"));
        }
        if self.features.is_empty() {
            return Err(Invalid::new("lame.features", "\"\"", "give a tensor name or \"auto\""));
        }
        Ok(())
    }
}

/// Storage buffers `lame_iterate` (`shaders/output.wgsl`) binds: within the 4 of
/// `wgpu::Limits::downlevel_defaults()` (its scratch and counters share one buffer, see
/// [`lame`]), so `auto` smooths on phone GPUs too; a device with fewer (WebGL2 offers none)
/// runs `auto` without LAME.
pub const STORAGE_BUFFERS: u32 = 4;

pub(crate) struct Lame;

pub(crate) static LAME: Lame = Lame;

impl AdaptMethod for Lame {
    fn default_norm(&self) -> NormMode {
        NormMode::Source
    }

    fn source_model(&self) -> bool {
        true
    }

    fn output_stage(&self, config: &AdaptConfig, graph: &Graph) -> Result<Option<Arc<dyn Stage>>, OutputError> {
        let l = &config.lame;
        let features = if l.features == "auto" { Features::Auto } else { Features::Named(l.features.clone()) };
        let spec = LameSpec { affinity: l.affinity, knn: l.knn, lambda: l.lambda, max_steps: l.max_steps, features };
        check_features(graph, &spec.features)?;
        Ok(Some(Arc::new(spec)))
    }
}

impl Stage for LameSpec {
    fn lower(&self, cx: &mut StageCx<'_>) -> Result<(), OutputError> {
        let (b, c) = (cx.b, cx.c);
        let bc = (b * c * 4) as u64;
        let (h, d) = lame_features(cx.graph, cx.fwd, &self.features, b).map_err(OutputError::Features)?;
        let y = cx.program.value(bc);
        let temps = [
            cx.temp((b * d * 4) as u64),
            cx.temp((b * b * 4) as u64),
            cx.temp((b * b * 4) as u64),
            cx.temp((lame_work_len(b, c) * 4) as u64),
        ];
        let ds = lame(self, BufRef::Value(h), cx.current, b, c, d, temps, BufRef::Value(y));
        cx.dispatches.extend(ds);
        cx.current = BufRef::Value(y);
        Ok(())
    }

    fn reads_named_tensor(&self) -> bool {
        matches!(self.features, Features::Named(_))
    }
}

/// Which tensor LAME reads its features from.
#[derive(Clone, Debug, PartialEq)]
pub enum Features {
    /// The input of the graph's final Gemm/MatMul (the penultimate features).
    Auto,
    /// A computed tensor, by name (flattened per sample).
    Named(String),
}

/// LAME's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct LameSpec {
    pub affinity: Affinity,
    pub knn: usize,
    pub lambda: f32,
    pub max_steps: u32,
    pub features: Features,
}

/// The graph-level check of `lame.features`: the named tensor is computed by a node (or is the
/// input); "auto" needs a Gemm or MatMul.
fn check_features(graph: &Graph, features: &Features) -> Result<(), OutputError> {
    match features {
        Features::Auto => {
            if !graph.nodes.iter().any(|n| matches!(n.op, Op::Gemm(_) | Op::MatMul)) {
                return Err(OutputError::Features(
                    "\"auto\" takes the input of the graph's final Gemm/MatMul, and this graph has none: name the features tensor instead".into(),
                ));
            }
        }
        Features::Named(name) => {
            if graph.initializers.contains_key(name) {
                return Err(OutputError::Features(format!(
                    "'{name}' is a constant of the model, not a computed tensor"
                )));
            }
            let computed = graph.nodes.iter().any(|n| n.outputs.iter().any(|o| o == name))
                || graph.inputs.iter().any(|i| &i.name == name);
            if !computed {
                return Err(OutputError::Features(format!("the model computes no tensor named '{name}'")));
            }
        }
    }
    Ok(())
}

/// LAME's features: value id and per-sample dimension.
fn lame_features(graph: &Graph, fwd: &Forward, features: &Features, b: usize) -> Result<(usize, usize), String> {
    let (v, shape, what) = match features {
        Features::Auto => {
            let ln = fwd
                .nodes
                .iter()
                .rev()
                .find(|ln| matches!(graph.nodes[ln.node].op, Op::Gemm(_) | Op::MatMul))
                .ok_or("\"auto\": the graph has no Gemm or MatMul left after constant folding")?;
            let node = &graph.nodes[ln.node];
            if let Op::Gemm(a) = &node.op
                && a.trans_a
            {
                return Err(format!(
                    "\"auto\": the final Gemm '{}' has transA = 1, so its input is not [batch, features]; name the features tensor",
                    node.name
                ));
            }
            let (v, shape) = value_operand(&ln.inputs[0])
                .ok_or_else(|| format!("\"auto\": the first input of '{}' is a constant", node.name))?;
            (v, shape, format!("the input of '{}'", node.name))
        }
        Features::Named(name) => {
            let info =
                fwd.spec.values.get(name).ok_or_else(|| format!("the model computes no tensor named '{name}'"))?;
            if info.konst.is_some() {
                return Err(format!("'{name}' is a constant for this input shape, not a per-sample tensor"));
            }
            let v = *fwd.value_of.get(name).ok_or_else(|| format!("'{name}' has no buffer in the step"))?;
            (v, info.shape.clone(), format!("'{name}'"))
        }
    };
    if shape.first() != Some(&b) || shape.iter().product::<usize>() == 0 {
        return Err(format!("{what} has shape {shape:?}; features need the batch ({b}) as their first dimension"));
    }
    Ok((v, shape.iter().skip(1).product()))
}

/// Floats in LAME's `work` buffer for `n` samples and `c` classes: [pair N·C | lp N·C | iterations
/// run, final energy] (one buffer: `lame_iterate` stays within the 4 storage buffers of
/// `wgpu::Limits::downlevel_defaults()`).
pub fn lame_work_len(n: usize, c: usize) -> usize {
    2 * n * c + 2
}

/// LAME on `probs` [N, C] with features `h` [N, D]: writes `y` [N, C]. `z` [N·D], `dmat` [N·N],
/// `w` [N·N] and `work` [[`lame_work_len`]] are temporaries; `work` ends with the iterations run
/// and the final energy (at 2·N·C and 2·N·C + 1).
#[allow(clippy::too_many_arguments)]
pub fn lame(
    spec: &LameSpec,
    h: BufRef,
    probs: BufRef,
    n: usize,
    c: usize,
    d: usize,
    temps: [BufRef; 4],
    y: BufRef,
) -> Vec<Dispatch> {
    let [z, dmat, w, work] = temps;
    let flag = spec.affinity as u32;
    vec![
        output_dispatch(
            "lame_normalize",
            output_params(n, c, d, 0, 0, 0.0, 0.0),
            vec![h, z],
            [n.div_ceil(64) as u32, 1, 1],
        ),
        output_dispatch("lame_affinity", output_params(n, c, d, 0, flag, 0.0, 0.0), vec![z, dmat], grid_1d(n * n, 64)),
        output_dispatch("lame_kernel", output_params(n, c, d, spec.knn, flag, 0.0, 0.0), vec![dmat, w], [1, 1, 1]),
        output_dispatch(
            "lame_iterate",
            output_params(n, c, d, spec.max_steps as usize, 0, spec.lambda, 0.0),
            vec![probs, w, y, work],
            [1, 1, 1],
        ),
    ]
}
