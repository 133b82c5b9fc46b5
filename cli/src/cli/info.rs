//! `acclimate info`: what a model is made of, and whether Acclimate can run and adapt it.
//!
//! Works on models the engine cannot load: the protobuf is decoded and every node parsed on its
//! own, so all unsupported ops are listed at once instead of only the first.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use acclimate::ir::Graph;
use acclimate::onnx::{self, Attr, DimSpec, OnnxError, RawModel, ValueInfo};

/// Stated when a model has nothing for BN-based test-time adaptation to update.
pub const NO_BN: &str = "no BatchNormalization layers: BN-based adaptation cannot be applied to this model";
/// What the default method does with such a model.
pub const NO_BN_AUTO: &str = "the default method (auto) runs only its output stages on it (LAME smoothing, label-shift \
                              correction) and takes no gradient step";

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum JsonDim {
    Fixed(u64),
    Named(String),
}

#[derive(Clone, Debug, Serialize)]
pub struct IoInfo {
    pub name: String,
    /// `None` when the file declares no (supported) element type.
    pub dtype: Option<String>,
    /// `None` when the file declares no shape; symbolic dimensions by name, "?" when unnamed.
    pub shape: Option<Vec<JsonDim>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct OpCount {
    pub op: String,
    pub count: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct BatchNormSummary {
    /// BatchNormalization nodes.
    pub layers: usize,
    /// Those whose scale, bias, mean and variance are all initializers: what adaptation updates.
    pub adaptable_layers: usize,
    /// Scale + bias elements of the adaptable layers.
    pub adaptable_parameters: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct AffineNormSummary {
    /// Layers found by `Graph::affine_norms`.
    pub layers: usize,
    /// Their scale + bias elements.
    pub parameters: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Unsupported {
    pub op: String,
    pub node: String,
    pub opset: i64,
    pub reason: String,
}

/// Everything `info` reports.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub path: String,
    pub producer: String,
    pub ir_version: i64,
    pub opset: i64,
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
    pub nodes: usize,
    /// In order of first appearance.
    pub ops: Vec<OpCount>,
    /// Constant tensors: initializers and Constant nodes holding a tensor.
    pub constants: usize,
    /// Elements of all constant tensors.
    pub parameters: usize,
    pub batch_norm: BatchNormSummary,
    /// LayerNorm, GroupNorm and InstanceNorm layers with constant affine parameters
    /// (`Graph::affine_norms`; counted when the model loads): what gradient methods adapt besides
    /// BatchNorm.
    pub affine_norm: AffineNormSummary,
    pub unsupported: Vec<Unsupported>,
    /// Whether the GPU engine accepts the model (every op supported, graph well formed).
    pub loadable: bool,
    /// Why not, when it does not.
    pub load_error: Option<String>,
}

fn io_info(v: &ValueInfo) -> IoInfo {
    IoInfo {
        name: v.name.clone(),
        dtype: v.dtype.map(|d| d.to_string()),
        shape: v.shape.as_ref().map(|dims| {
            dims.iter()
                .map(|d| match d {
                    DimSpec::Fixed(n) => JsonDim::Fixed(*n),
                    DimSpec::Sym(s) => JsonDim::Named(s.clone()),
                    DimSpec::Unknown => JsonDim::Named("?".into()),
                })
                .collect()
        }),
    }
}

/// Reads and describes the model at `path`. Only an unreadable or undecodable file is an error.
pub fn model_info(path: &Path) -> Result<ModelInfo, OnnxError> {
    let raw = onnx::load_model(path)?;
    Ok(describe(path, raw))
}

fn describe(path: &Path, raw: RawModel) -> ModelInfo {
    let g = &raw.graph;
    let mut ops: Vec<OpCount> = Vec::new();
    let mut unsupported = Vec::new();
    for n in &g.nodes {
        match ops.iter_mut().find(|c| c.op == n.op_type) {
            Some(c) => c.count += 1,
            None => ops.push(OpCount { op: n.op_type.clone(), count: 1 }),
        }
        if let Err(reason) = acclimate::ir::check_node(n, raw.opset) {
            unsupported.push(Unsupported {
                op: n.op_type.clone(),
                node: n.name.clone(),
                opset: raw.opset,
                reason: reason.to_string(),
            });
        }
    }
    // Weights are initializers, or (Paddle exports such as the RapidOCR models) Constant nodes
    // holding a tensor: both are constants adaptation can update.
    let mut constants: HashMap<&str, usize> = g.initializers.iter().map(|(n, t)| (n.as_str(), t.numel())).collect();
    for n in g.nodes.iter().filter(|n| n.op_type == "Constant") {
        if let (Some(Attr::Tensor(t)), Some(out)) = (n.attrs.get("value"), n.outputs.first()) {
            constants.insert(out.as_str(), t.numel());
        }
    }
    // An Identity of a constant is a copy of it (torch's exporter deduplicates equal initializers
    // behind Identities; `Graph::from_raw` gives each reader its own copy back).
    let is_output = |name: &str| g.outputs.iter().any(|o| o.name == name);
    for n in g.nodes.iter().filter(|n| n.op_type == "Identity") {
        if let (Some(src), Some(out)) = (n.inputs.first(), n.outputs.first())
            && let Some(&numel) = constants.get(src.as_str())
            && !out.is_empty()
            && !is_output(out)
            && !g.inputs.iter().any(|i| &i.name == src)
        {
            constants.insert(out.as_str(), numel);
        }
    }
    // The rule of `Graph::batch_norms`: scale, bias, mean and variance all constant.
    let mut bn = BatchNormSummary { layers: 0, adaptable_layers: 0, adaptable_parameters: 0 };
    // Training-mode ones (BiT's weight standardisation) fold when the model loads: not layers.
    let training = |n: &&acclimate::onnx::RawNode| matches!(n.attrs.get("training_mode"), Some(Attr::Int(1)));
    for n in g.nodes.iter().filter(|n| n.op_type == "BatchNormalization" && !training(n)) {
        bn.layers += 1;
        let params: Vec<Option<usize>> =
            (1..=4).map(|i| n.inputs.get(i).and_then(|p| constants.get(p.as_str())).copied()).collect();
        if let [Some(scale), Some(bias), Some(_), Some(_)] = params[..] {
            bn.adaptable_layers += 1;
            bn.adaptable_parameters += scale + bias;
        }
    }
    let initializers = constants.len();
    let parameters = constants.values().sum();
    let (inputs, outputs, nodes) =
        (g.inputs.iter().map(io_info).collect(), g.outputs.iter().map(io_info).collect(), g.nodes.len());
    let (producer, ir_version, opset) = (raw.producer.clone(), raw.ir_version, raw.opset);
    let (load_error, affine_norm) = match Graph::from_raw(raw) {
        Ok(graph) => {
            let layers = graph.affine_norms();
            let numel = |n: &str| graph.initializers.get(n).map_or(0, |t| t.numel());
            let parameters = layers.iter().map(|a| numel(&a.scale) + a.bias.as_deref().map_or(0, numel)).sum();
            (None, AffineNormSummary { layers: layers.len(), parameters })
        }
        Err(e) => (Some(e.to_string()), AffineNormSummary { layers: 0, parameters: 0 }),
    };
    ModelInfo {
        path: path.display().to_string(),
        producer,
        ir_version,
        opset,
        inputs,
        outputs,
        nodes,
        ops,
        constants: initializers,
        parameters,
        batch_norm: bn,
        affine_norm,
        unsupported,
        loadable: load_error.is_none(),
        load_error,
    }
}

fn shape_text(io: &IoInfo) -> String {
    match &io.shape {
        Some(dims) => {
            let d: Vec<String> = dims
                .iter()
                .map(|d| match d {
                    JsonDim::Fixed(n) => n.to_string(),
                    JsonDim::Named(s) => s.clone(),
                })
                .collect();
            format!("[{}]", d.join(", "))
        }
        None => "[shape not declared]".into(),
    }
}

/// Thousands separators, for parameter counts.
fn grouped(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl ModelInfo {
    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let producer = if self.producer.is_empty() { "unknown producer" } else { &self.producer };
        let _ = writeln!(s, "model:      {}", self.path);
        let _ = writeln!(s, "producer:   {producer}; opset {}, IR version {}", self.opset, self.ir_version);
        for (title, list) in [("inputs:", &self.inputs), ("outputs:", &self.outputs)] {
            let _ = writeln!(s, "{title}");
            let w = list.iter().map(|i| i.name.len()).max().unwrap_or(0);
            for io in list {
                let dt = io.dtype.as_deref().unwrap_or("unknown type");
                let _ = writeln!(s, "  {:<w$}  {dt:<8} {}", io.name, shape_text(io));
            }
        }
        let _ = writeln!(s, "nodes:      {} ({} op types)", self.nodes, self.ops.len());
        let w = self.ops.iter().map(|o| o.op.len()).max().unwrap_or(0);
        for o in &self.ops {
            let _ = writeln!(s, "  {:<w$}  {:>5}", o.op, o.count);
        }
        let _ = writeln!(
            s,
            "parameters: {} in {} constant tensors (initializers and Constant nodes)",
            grouped(self.parameters),
            self.constants
        );
        let bn = &self.batch_norm;
        if bn.layers == 0 {
            let _ = writeln!(s, "{NO_BN}");
            let _ = writeln!(s, "{NO_BN_AUTO}");
        } else {
            let _ = writeln!(
                s,
                "BatchNormalization: {} layers, {} adaptable (constant scale, bias, mean, variance), \
                 {} adaptable parameters (scale + bias)",
                bn.layers,
                bn.adaptable_layers,
                grouped(bn.adaptable_parameters)
            );
            if bn.adaptable_layers == 0 {
                let _ = writeln!(
                    s,
                    "no BatchNormalization layer has constant parameters: BN-based adaptation cannot be applied"
                );
            }
        }
        let affine = &self.affine_norm;
        if affine.layers > 0 {
            let _ = writeln!(
                s,
                "LayerNorm/GroupNorm/InstanceNorm: {} layers with constant affine parameters, {} parameters (scale + \
                 bias): gradient methods (tent, eta, eata, sar, woc, roid) adapt them too",
                affine.layers,
                grouped(affine.parameters)
            );
        }
        if self.unsupported.is_empty() {
            let _ = writeln!(s, "unsupported ops: none");
        } else {
            let _ = writeln!(s, "unsupported ops: {} node(s)", self.unsupported.len());
            for u in &self.unsupported {
                let _ = writeln!(s, "  {} (node '{}', opset {}): {}", u.op, u.node, u.opset, u.reason);
            }
        }
        match &self.load_error {
            None => {
                let _ = writeln!(s, "GPU engine:  loads this model");
            }
            Some(e) => {
                let _ = writeln!(s, "GPU engine:  cannot load this model: {e}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::grouped;

    #[test]
    fn thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(3504872), "3,504,872");
    }
}
