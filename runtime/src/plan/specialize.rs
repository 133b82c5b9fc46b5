//! Specialisation: concrete input shapes in, every tensor's shape known and every constant
//! subgraph folded out.
//!
//! Exporters emit shape arithmetic (Shape → Gather → Unsqueeze → Concat → Reshape, or the
//! ConstantOfShape/Slice chains behind PyTorch's padding). Once the input shapes are fixed all of
//! it is constant, so it is evaluated here on the CPU and the GPU only ever sees float tensors
//! with static shapes.

use std::collections::HashMap;
use std::sync::Arc;

use super::PlanError;
use crate::ir::{Dim, Graph};
use crate::ops::{Input, Op, OpReason, Stage};
use crate::tensor::{DType, Tensor};

/// Elements of the largest tensor a plan may describe: far beyond any device (2^40 floats are
/// 4 TiB), small enough that strides and byte sizes never overflow.
const MAX_TENSOR_ELEMENTS: usize = 1 << 40;
/// Elements of the largest tensor a constant subgraph may create on the CPU (as shape ops').
const MAX_FOLDED_OUTPUT: usize = 1 << 28;

/// What is known about a tensor after specialisation.
#[derive(Clone, Debug)]
pub struct ValueInfo {
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// Set for constants (initializers and folded results).
    pub konst: Option<Arc<Tensor>>,
    /// A constant derived from the input shapes (through Shape): it may differ between plans,
    /// so it cannot be shared through the engine's weight store.
    pub shape_dependent: bool,
    /// A float32 constant that is a view (Reshape, Flatten, Squeeze, Unsqueeze, Identity) of
    /// this initializer: the same values in the same order. Plans bind the initializer's own
    /// buffer, so that an adapted parameter reshaped for broadcasting (InstanceNormalization's
    /// and GroupNormalization's per-channel scale and bias) is the parameter.
    pub view_of: Option<String>,
}

/// A node that runs on the GPU, with its inputs and outputs by name.
#[derive(Clone, Debug)]
pub struct Step {
    pub node: usize,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// The graph for one set of input shapes.
#[derive(Clone, Debug)]
pub struct Specialized {
    pub values: HashMap<String, ValueInfo>,
    pub steps: Vec<Step>,
    pub input_names: Vec<String>,
    pub output_names: Vec<String>,
}

fn node_err(graph: &Graph, idx: usize, shapes: Vec<Vec<usize>>, reason: OpReason) -> PlanError {
    PlanError::Node(Box::new(graph.op_error(idx, Stage::Infer, shapes, reason)))
}

/// Checks `shape` against the declared dims of a graph input.
pub fn check_input_shape(name: &str, dims: &Option<Vec<Dim>>, shape: &[usize]) -> Result<(), PlanError> {
    if let Some(dims) = dims {
        let ok = dims.len() == shape.len()
            && dims.iter().zip(shape).all(|(d, &s)| match d {
                Dim::Fixed(n) => *n == s,
                Dim::Dynamic(_) => true,
            });
        if !ok {
            let expected = format!("[{}]", dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "));
            return Err(PlanError::InputShape { name: name.to_string(), expected, got: shape.to_vec() });
        }
    }
    Ok(())
}

/// Specialises `graph` to `shapes` (one per graph input, in order).
pub fn specialize(graph: &Graph, shapes: &[Vec<usize>]) -> Result<Specialized, PlanError> {
    if shapes.len() != graph.inputs.len() {
        return Err(PlanError::InputCount { expected: graph.inputs.len(), got: shapes.len() });
    }
    let mut values: HashMap<String, ValueInfo> = HashMap::new();
    for (name, t) in &graph.initializers {
        values.insert(
            name.clone(),
            ValueInfo {
                shape: t.shape.clone(),
                dtype: t.dtype,
                konst: Some(t.clone()),
                shape_dependent: false,
                view_of: None,
            },
        );
    }
    for (info, shape) in graph.inputs.iter().zip(shapes) {
        check_input_shape(&info.name, &info.dims, shape)?;
        values.insert(
            info.name.clone(),
            ValueInfo { shape: shape.clone(), dtype: DType::F32, konst: None, shape_dependent: false, view_of: None },
        );
    }

    // Liveness first: nodes none of whose outputs reach a graph output are skipped entirely
    // (dead branches), and unread outputs (BN's training outputs, Dropout's boolean mask) are
    // neither type-checked nor kept.
    let output_names: Vec<String> = graph.outputs.iter().map(|o| o.name.clone()).collect();
    let mut needed: std::collections::HashSet<&str> = output_names.iter().map(|s| s.as_str()).collect();
    let mut live = vec![false; graph.nodes.len()];
    for (i, n) in graph.nodes.iter().enumerate().rev() {
        if n.outputs.iter().any(|o| needed.contains(o.as_str())) {
            live[i] = true;
            needed.extend(n.inputs.iter().filter(|s| !s.is_empty()).map(|s| s.as_str()));
        }
    }

    let mut steps = Vec::new();
    for (idx, node) in graph.nodes.iter().enumerate() {
        if !live[idx] {
            continue;
        }
        let infos: Vec<Option<ValueInfo>> =
            node.inputs.iter().map(|n| if n.is_empty() { None } else { values.get(n).cloned() }).collect();
        let shapes_of =
            || infos.iter().map(|i| i.as_ref().map(|v| v.shape.clone()).unwrap_or_default()).collect::<Vec<_>>();
        for (name, info) in node.inputs.iter().zip(&infos) {
            if !name.is_empty() && info.is_none() {
                return Err(node_err(graph, idx, shapes_of(), OpReason::UndefinedInput(name.clone())));
            }
        }
        let ins: Vec<Option<Input<'_>>> = infos
            .iter()
            .map(|i| i.as_ref().map(|v| Input { shape: &v.shape, dtype: v.dtype, value: v.konst.as_deref() }))
            .collect();
        let all_const = infos.iter().all(|i| i.as_ref().is_none_or(|v| v.konst.is_some()));

        // Shape only looks at its input's shape, so it is constant even on a runtime tensor.
        if let Op::Shape(s) = &node.op
            && let Some(t) = s.shape_of(&ins)
        {
            let t = t.map_err(|r| node_err(graph, idx, shapes_of(), r))?;
            let out = &node.outputs[0];
            let info = ValueInfo {
                shape: t.shape.clone(),
                dtype: t.dtype,
                konst: Some(Arc::new(t)),
                shape_dependent: true,
                view_of: None,
            };
            values.insert(out.clone(), info);
            continue;
        }

        let inferred = node.op.infer(&ins).map_err(|r| node_err(graph, idx, shapes_of(), r))?;
        // An output whose element count does not fit in memory (a fuzzed Expand to 2^40 × 2^40)
        // is an error here, before a later node computes its strides.
        for (shape, _) in &inferred {
            if shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).is_none_or(|n| n > MAX_TENSOR_ELEMENTS) {
                let reason =
                    OpReason::TooLarge(format!("an output of shape {shape:?} is larger than any device holds"));
                return Err(node_err(graph, idx, shapes_of(), reason));
            }
        }
        let folded_too_large = inferred.iter().any(|(shape, _)| shape.iter().product::<usize>() > MAX_FOLDED_OUTPUT);
        if all_const && folded_too_large {
            let reason = OpReason::TooLarge(format!(
                "a constant subgraph would create a tensor of shape {:?}, more than {MAX_FOLDED_OUTPUT} elements",
                inferred.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>()
            ));
            return Err(node_err(graph, idx, shapes_of(), reason));
        }
        if all_const && let Some(res) = node.op.eval(&ins.iter().map(|i| i.and_then(|x| x.value)).collect::<Vec<_>>()) {
            let outs = res.map_err(|r| node_err(graph, idx, shapes_of(), r))?;
            let shape_dependent = infos.iter().flatten().any(|v| v.shape_dependent);
            // A view of a float32 initializer (or of a view of one) keeps pointing at it.
            let view_of = match (node.op.is_alias(), node.inputs.first(), infos.first()) {
                (true, Some(src), Some(Some(info))) if info.dtype == DType::F32 => {
                    info.view_of.clone().or_else(|| graph.initializers.contains_key(src).then(|| src.clone()))
                }
                _ => None,
            };
            for (name, t) in node.outputs.iter().zip(outs) {
                if !name.is_empty() {
                    let info = ValueInfo {
                        shape: t.shape.clone(),
                        dtype: t.dtype,
                        konst: Some(Arc::new(t)),
                        shape_dependent,
                        view_of: view_of.clone(),
                    };
                    values.insert(name.clone(), info);
                }
            }
            continue;
        }
        if node.op.cpu_only() {
            return Err(node_err(
                graph,
                idx,
                shapes_of(),
                OpReason::Unsupported(
                    "this op is supported only on constant inputs (folded on the CPU when the plan is built: shape \
                     arithmetic, position encodings, weight standardisation), but an input depends on the model input"
                        .into(),
                ),
            ));
        }
        for (name, info) in node.inputs.iter().zip(&infos) {
            if let Some(v) = info
                && v.konst.is_none()
                && v.dtype != DType::F32
            {
                return Err(node_err(
                    graph,
                    idx,
                    shapes_of(),
                    OpReason::DType(format!("input '{name}' is {} at run time; only float32 runs on the GPU", v.dtype)),
                ));
            }
        }
        for (name, (shape, dtype)) in node.outputs.iter().zip(inferred) {
            if name.is_empty() {
                continue;
            }
            if !needed.contains(name.as_str()) {
                // Unread: the kernel may still write it, so it gets a buffer, but its type is moot.
                values.insert(
                    name.clone(),
                    ValueInfo { shape, dtype: DType::F32, konst: None, shape_dependent: false, view_of: None },
                );
                continue;
            }
            if dtype != DType::F32 {
                return Err(node_err(
                    graph,
                    idx,
                    shapes_of(),
                    OpReason::DType(format!(
                        "output '{name}' would be {dtype} at run time; only float32 runs on the GPU"
                    )),
                ));
            }
            values.insert(name.clone(), ValueInfo { shape, dtype, konst: None, shape_dependent: false, view_of: None });
        }
        steps.push(Step { node: idx, inputs: node.inputs.clone(), outputs: node.outputs.clone() });
    }

    Ok(Specialized { values, steps, input_names: graph.inputs.iter().map(|i| i.name.clone()).collect(), output_names })
}
