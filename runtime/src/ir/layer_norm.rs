//! Ops defined as functions of others, expanded into them: Sum (a chain of Adds, an Identity for
//! one input), and LayerNormalization (opset 17) as the ONNX function body it is defined by: its statistics by
//! ReduceMean over the dims from `axis` on, then Sub, Mul, Add, Sqrt, Div, Mul and Add. Each part
//! runs on kernels that already have their backward, so a model with LayerNorm both predicts and
//! passes gradients to the layers before it. The variance is the mean of the squared centred values
//! (two passes: no E[x²] − E[x]² cancellation).

use std::collections::HashMap;
use std::sync::Arc;

use super::Node;
use crate::onnx::RawNode;
use crate::ops::elementwise::{BinaryKind, Unary};
use crate::ops::layout::LayoutOp;
use crate::ops::reduce::ReduceMeanAttrs;
use crate::ops::{Attrs, Op, OpReason, OpResult};
use crate::tensor::Tensor;

/// One node of `n`'s expansion, named `<node>/<part>`, computing `out`.
fn part_node(n: &RawNode, part: &'static str, op: Op, inputs: Vec<String>, out: String) -> Node {
    Node {
        name: format!("{}/{part}", n.name),
        op_type: n.op_type.clone(),
        op,
        inputs,
        outputs: vec![out],
        part: Some(part),
    }
}

/// The nodes computing `n`'s outputs; its epsilon (and 1 for InvStdDev) become initializers.
pub(super) fn expand(n: &RawNode, opset: i64, inits: &mut HashMap<String, Arc<Tensor>>) -> OpResult<Vec<Node>> {
    if opset < 17 {
        return Err(OpReason::Unsupported(format!(
            "LayerNormalization is defined from opset 17; the model imports opset {opset}"
        )));
    }
    let a = Attrs::new(&n.attrs);
    a.only(&["axis", "epsilon", "stash_type"])?;
    let axis = a.int("axis", -1)?;
    let eps = a.float("epsilon", 1e-5)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(OpReason::Attribute(format!("epsilon = {eps} (LayerNormalization needs a finite epsilon >= 0)")));
    }
    match a.int("stash_type", 1)? {
        // Both compute float32 statistics of float32 inputs.
        0 | 1 => {}
        v => return Err(OpReason::Attribute(format!("stash_type = {v} (ONNX defines 0 and 1)"))),
    }
    let input = |i: usize, what: &str| -> OpResult<String> {
        match n.inputs.get(i) {
            Some(s) if !s.is_empty() => Ok(s.clone()),
            _ => Err(OpReason::MissingInput { index: i, what: what.into() }),
        }
    };
    let (x, scale) = (input(0, "X")?, input(1, "Scale")?);
    let bias = n.inputs.get(2).filter(|s| !s.is_empty()).cloned();
    let output = |i: usize| n.outputs.get(i).filter(|s| !s.is_empty()).cloned();
    let y = output(0).ok_or(OpReason::MissingOutput(0))?;
    let tmp = |what: &str| format!("{}/{what}", n.name);
    let mean = output(1).unwrap_or_else(|| tmp("mean"));
    let eps_name = tmp("epsilon");
    inits.insert(eps_name.clone(), Arc::new(Tensor::f32(vec![], vec![eps])));

    let stats = ReduceMeanAttrs {
        keepdims: true,
        axes: None,
        axes_input: false,
        noop_with_empty_axes: false,
        from_axis: Some(axis),
    };
    let mut nodes = Vec::new();
    let mut push = |part: &'static str, op: Op, inputs: Vec<String>, out: String| {
        nodes.push(part_node(n, part, op, inputs, out));
    };
    push("mean", Op::ReduceMean(stats.clone()), vec![x.clone()], mean.clone());
    push("centered", Op::Binary(BinaryKind::Sub), vec![x, mean], tmp("centered"));
    push("squared", Op::Binary(BinaryKind::Mul), vec![tmp("centered"), tmp("centered")], tmp("squared"));
    push("variance", Op::ReduceMean(stats), vec![tmp("squared")], tmp("variance"));
    push("variance_eps", Op::Binary(BinaryKind::Add), vec![tmp("variance"), eps_name], tmp("variance_eps"));
    push("std", Op::Unary(Unary::Sqrt), vec![tmp("variance_eps")], tmp("std"));
    if let Some(inv) = output(2) {
        let one = tmp("one");
        inits.insert(one.clone(), Arc::new(Tensor::f32(vec![], vec![1.0])));
        push("inv_std", Op::Binary(BinaryKind::Div), vec![one, tmp("std")], inv);
    }
    push("normalized", Op::Binary(BinaryKind::Div), vec![tmp("centered"), tmp("std")], tmp("normalized"));
    match bias {
        Some(b) => {
            push("scaled", Op::Binary(BinaryKind::Mul), vec![tmp("normalized"), scale], tmp("scaled"));
            push("y", Op::Binary(BinaryKind::Add), vec![tmp("scaled"), b], y);
        }
        None => push("y", Op::Binary(BinaryKind::Mul), vec![tmp("normalized"), scale], y),
    }
    Ok(nodes)
}

/// Sum of one or more inputs (numpy broadcasting): `((a + b) + c) + …`, in input order.
pub(super) fn expand_sum(n: &RawNode) -> OpResult<Vec<Node>> {
    Attrs::new(&n.attrs).only(&[])?;
    if let Some(i) = n.inputs.iter().position(|s| s.is_empty()) {
        return Err(OpReason::MissingInput { index: i, what: "data_0…".into() });
    }
    let y = n.outputs.first().filter(|s| !s.is_empty()).cloned().ok_or(OpReason::MissingOutput(0))?;
    let node = |part: &'static str, op: Op, inputs: Vec<String>, out: String| part_node(n, part, op, inputs, out);
    match n.inputs.as_slice() {
        [] => Err(OpReason::MissingInput { index: 0, what: "data_0".into() }),
        [a] => Ok(vec![node("y", Op::Layout(LayoutOp::Identity), vec![a.clone()], y)]),
        [first, rest @ ..] => {
            let mut nodes = Vec::new();
            let mut acc = first.clone();
            for (k, b) in rest.iter().enumerate() {
                let last = k + 1 == rest.len();
                let out = if last { y.clone() } else { format!("{}/partial{k}", n.name) };
                nodes.push(node(
                    if last { "y" } else { "partial" },
                    Op::Binary(BinaryKind::Add),
                    vec![acc, b.clone()],
                    out.clone(),
                ));
                acc = out;
            }
            Ok(nodes)
        }
    }
}
