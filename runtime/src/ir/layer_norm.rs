//! Ops defined as functions of others, expanded into them: Sum, Max and Min (a chain of binary
//! ops, an Identity for one input), InstanceNormalization (the same statistics per sample and channel, over the dims
//! from 2 on: also what `torch.onnx.export` writes for GroupNorm, on a [N, groups, rest] view),
//! and LayerNormalization (opset 17) as the ONNX function body it is defined by: its statistics by
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
use crate::ops::shape::ShapeOp;
use crate::ops::{Attrs, Op, OpReason, OpResult};
use crate::tensor::Tensor;

/// The normalisation shared by LayerNormalization and InstanceNormalization: `mean` (named as
/// given) and `<node>/std` = √(mean of the squared centred values + eps) over the dims from
/// `axis` on, and `<node>/centered`.
fn statistics(n: &RawNode, x: String, axis: i64, mean: String, eps: String) -> Vec<Node> {
    let tmp = |what: &str| format!("{}/{what}", n.name);
    let stats = ReduceMeanAttrs {
        sum: false,
        extreme: None,
        keepdims: true,
        axes: None,
        axes_input: false,
        noop_with_empty_axes: false,
        from_axis: Some(axis),
    };
    let node = |part: &'static str, op: Op, inputs: Vec<String>, out: String| part_node(n, part, op, inputs, out);
    vec![
        node("mean", Op::ReduceMean(stats.clone()), vec![x.clone()], mean.clone()),
        node("centered", Op::Binary(BinaryKind::Sub), vec![x, mean], tmp("centered")),
        node("squared", Op::Binary(BinaryKind::Mul), vec![tmp("centered"), tmp("centered")], tmp("squared")),
        node("variance", Op::ReduceMean(stats), vec![tmp("squared")], tmp("variance")),
        node("variance_eps", Op::Binary(BinaryKind::Add), vec![tmp("variance"), eps], tmp("variance_eps")),
        node("std", Op::Unary(Unary::Sqrt), vec![tmp("variance_eps")], tmp("std")),
    ]
}

/// InstanceNormalization: `(x − mean)/√(var + eps)·scale + B` per sample and channel over the
/// dims from 2 on; scale and B ([C]) reshaped to [C, 1, …] by shape arithmetic that folds to a
/// constant once the input's rank is known.
pub(super) fn expand_instance_norm(n: &RawNode, inits: &mut HashMap<String, Arc<Tensor>>) -> OpResult<Vec<Node>> {
    let a = Attrs::new(&n.attrs);
    a.only(&["epsilon"])?;
    let eps = epsilon(&a, "InstanceNormalization")?;
    let input = |i: usize, what: &str| required(n, i, what);
    let (x, scale, bias) = (input(0, "input")?, input(1, "scale")?, input(2, "B")?);
    let y = n.outputs.first().filter(|s| !s.is_empty()).cloned().ok_or(OpReason::MissingOutput(0))?;
    let tmp = |what: &str| format!("{}/{what}", n.name);
    inits.insert(tmp("epsilon"), Arc::new(Tensor::f32(vec![], vec![eps])));
    let mut nodes = statistics(n, x.clone(), 2, tmp("mean"), tmp("epsilon"));
    nodes.push(part_node(
        n,
        "normalized",
        Op::Binary(BinaryKind::Div),
        vec![tmp("centered"), tmp("std")],
        tmp("normalized"),
    ));
    affine(n, &mut nodes, inits, &tmp("normalized"), &x, &scale, &bias, y);
    Ok(nodes)
}

/// GroupNormalization (opset 21): X viewed as [N, groups, -1], each group normalised over its
/// channels and positions, viewed back, then scale and bias per channel. Opset 18's version (scale
/// and bias per group) is deprecated by ONNX and refused.
pub(super) fn expand_group_norm(
    n: &RawNode,
    opset: i64,
    inits: &mut HashMap<String, Arc<Tensor>>,
) -> OpResult<Vec<Node>> {
    if opset < 21 {
        return Err(OpReason::Unsupported(format!(
            "GroupNormalization before opset 21 (scale and bias per group, deprecated by ONNX) is not supported; the \
             model imports opset {opset}: export at opset 21, or below 18 (InstanceNormalization on a grouped view)"
        )));
    }
    let a = Attrs::new(&n.attrs);
    a.only(&["epsilon", "num_groups", "stash_type"])?;
    let eps = epsilon(&a, "GroupNormalization")?;
    let groups =
        a.opt_int("num_groups")?.ok_or(OpReason::MissingAttribute { op: "GroupNormalization", name: "num_groups" })?;
    if groups < 1 {
        return Err(OpReason::Attribute(format!("num_groups = {groups} (must be at least 1)")));
    }
    match a.int("stash_type", 1)? {
        0 | 1 => {}
        v => return Err(OpReason::Attribute(format!("stash_type = {v} (ONNX defines 0 and 1)"))),
    }
    let input = |i: usize, what: &str| required(n, i, what);
    let (x, scale, bias) = (input(0, "X")?, input(1, "scale")?, input(2, "bias")?);
    let y = n.outputs.first().filter(|s| !s.is_empty()).cloned().ok_or(OpReason::MissingOutput(0))?;
    let tmp = |what: &str| format!("{}/{what}", n.name);
    inits.insert(tmp("epsilon"), Arc::new(Tensor::f32(vec![], vec![eps])));
    inits.insert(tmp("grouped_shape"), Arc::new(Tensor::i64(vec![3], vec![0, groups, -1])));
    let reshape = || Op::Layout(LayoutOp::Reshape { allowzero: false });
    let mut nodes = vec![
        part_node(n, "x_shape", Op::Shape(ShapeOp::Shape { start: 0, end: None }), vec![x.clone()], tmp("x_shape")),
        part_node(n, "grouped", reshape(), vec![x.clone(), tmp("grouped_shape")], tmp("grouped")),
    ];
    nodes.extend(statistics(n, tmp("grouped"), 2, tmp("mean"), tmp("epsilon")));
    nodes.push(part_node(
        n,
        "normalized",
        Op::Binary(BinaryKind::Div),
        vec![tmp("centered"), tmp("std")],
        tmp("normalized"),
    ));
    nodes.push(part_node(n, "ungrouped", reshape(), vec![tmp("normalized"), tmp("x_shape")], tmp("ungrouped")));
    affine(n, &mut nodes, inits, &tmp("ungrouped"), &x, &scale, &bias, y);
    Ok(nodes)
}

/// `y = v·scale + bias` with scale and bias of shape [C] broadcast along axis 1 of `like` (same
/// rank as `v`): reshaped to [C, 1, …, 1] by Concat(Shape(scale), ones(rank − 2)), shape arithmetic
/// that folds to a constant.
#[allow(clippy::too_many_arguments)]
fn affine(
    n: &RawNode,
    nodes: &mut Vec<Node>,
    inits: &mut HashMap<String, Arc<Tensor>>,
    v: &str,
    like: &str,
    scale: &str,
    bias: &str,
    y: String,
) {
    let tmp = |what: &str| format!("{}/{what}", n.name);
    inits.insert(tmp("two"), Arc::new(Tensor::i64(vec![1], vec![2])));
    let shape = || Op::Shape(ShapeOp::Shape { start: 0, end: None });
    let reshape = || Op::Layout(LayoutOp::Reshape { allowzero: false });
    let one = Tensor::i64(vec![1], vec![1]);
    let parts = [
        ("like_shape", shape(), vec![like.to_string()], tmp("like_shape")),
        ("rank", shape(), vec![tmp("like_shape")], tmp("rank")),
        ("trailing", Op::Binary(BinaryKind::Sub), vec![tmp("rank"), tmp("two")], tmp("trailing")),
        ("ones", Op::Shape(ShapeOp::ConstantOfShape(one)), vec![tmp("trailing")], tmp("ones")),
        ("channels", shape(), vec![scale.to_string()], tmp("channels")),
        (
            "param_shape",
            Op::Layout(LayoutOp::Concat { axis: 0 }),
            vec![tmp("channels"), tmp("ones")],
            tmp("param_shape"),
        ),
        ("scale", reshape(), vec![scale.to_string(), tmp("param_shape")], tmp("scale")),
        ("bias", reshape(), vec![bias.to_string(), tmp("param_shape")], tmp("bias")),
        ("scaled", Op::Binary(BinaryKind::Mul), vec![v.to_string(), tmp("scale")], tmp("scaled")),
        ("y", Op::Binary(BinaryKind::Add), vec![tmp("scaled"), tmp("bias")], y),
    ];
    for (part, op, inputs, out) in parts {
        nodes.push(part_node(n, part, op, inputs, out));
    }
}

/// Input `i` of `n`, which must be given.
fn required(n: &RawNode, i: usize, what: &str) -> OpResult<String> {
    match n.inputs.get(i) {
        Some(s) if !s.is_empty() => Ok(s.clone()),
        _ => Err(OpReason::MissingInput { index: i, what: what.into() }),
    }
}

/// The `epsilon` attribute (default 1e-5), finite and not negative.
fn epsilon(a: &Attrs<'_>, op: &str) -> OpResult<f32> {
    let eps = a.float("epsilon", 1e-5)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(OpReason::Attribute(format!("epsilon = {eps} ({op} needs a finite epsilon >= 0)")));
    }
    Ok(eps)
}

/// One node of `n`'s expansion, named `<node>/<part>`, computing `out`.
pub(super) fn part_node(n: &RawNode, part: &'static str, op: Op, inputs: Vec<String>, out: String) -> Node {
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
    let eps = epsilon(&a, "LayerNormalization")?;
    match a.int("stash_type", 1)? {
        // Both compute float32 statistics of float32 inputs.
        0 | 1 => {}
        v => return Err(OpReason::Attribute(format!("stash_type = {v} (ONNX defines 0 and 1)"))),
    }
    let input = |i: usize, what: &str| required(n, i, what);
    let (x, scale) = (input(0, "X")?, input(1, "Scale")?);
    let bias = n.inputs.get(2).filter(|s| !s.is_empty()).cloned();
    let output = |i: usize| n.outputs.get(i).filter(|s| !s.is_empty()).cloned();
    let y = output(0).ok_or(OpReason::MissingOutput(0))?;
    let tmp = |what: &str| format!("{}/{what}", n.name);
    let mean = output(1).unwrap_or_else(|| tmp("mean"));
    let eps_name = tmp("epsilon");
    inits.insert(eps_name.clone(), Arc::new(Tensor::f32(vec![], vec![eps])));

    let mut nodes = statistics(n, x, axis, mean, eps_name);
    let mut push = |part: &'static str, op: Op, inputs: Vec<String>, out: String| {
        nodes.push(part_node(n, part, op, inputs, out));
    };
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

/// ReduceSumSquare (`ReduceSum(x·x)`) and ReduceL2 (`Sqrt(ReduceSum(x·x))`: `F.normalize`'s
/// norm), with the node's keepdims, noop_with_empty_axes and axes (an input from opset 18).
pub(super) fn expand_reduce_squares(n: &RawNode, opset: i64) -> OpResult<Vec<Node>> {
    let a = Attrs::new(&n.attrs);
    let attrs = ReduceMeanAttrs::parse_sum(&a, opset >= 18)?;
    let x = required(n, 0, "data")?;
    let y = n.outputs.first().filter(|s| !s.is_empty()).cloned().ok_or(OpReason::MissingOutput(0))?;
    let tmp = |what: &str| format!("{}/{what}", n.name);
    let mut sum_inputs = vec![tmp("squared")];
    if let Some(axes) = n.inputs.get(1).filter(|s| !s.is_empty()) {
        sum_inputs.push(axes.clone());
    }
    let l2 = n.op_type == "ReduceL2";
    let sum_out = if l2 { tmp("sum") } else { y.clone() };
    let mut nodes = vec![
        part_node(n, "squared", Op::Binary(BinaryKind::Mul), vec![x.clone(), x], tmp("squared")),
        part_node(n, "sum", Op::ReduceMean(attrs), sum_inputs, sum_out),
    ];
    if l2 {
        nodes.push(part_node(n, "y", Op::Unary(Unary::Sqrt), vec![tmp("sum")], y));
    }
    Ok(nodes)
}

/// LRN (local response normalization across channels, AlexNet's and GoogLeNet's):
/// `y = x / (bias + alpha/size · Σ_{window} x²)^beta`, the window `size` channels around each
/// channel, zero beyond the edges. The channel sums are an AveragePool (count_include_pad, so the
/// mean is the zero-padded sum over `size`) over x² viewed as [N, 1, C, -1], by a
/// [size, 1] kernel: `alpha · mean` is `alpha/size · sum`. Every part has its backward.
pub(super) fn expand_lrn(n: &RawNode, inits: &mut HashMap<String, Arc<Tensor>>) -> OpResult<Vec<Node>> {
    let a = Attrs::new(&n.attrs);
    a.only(&["alpha", "beta", "bias", "size"])?;
    let (alpha, beta, bias) = (a.float("alpha", 1e-4)?, a.float("beta", 0.75)?, a.float("bias", 1.0)?);
    let size = a.opt_int("size")?.ok_or(OpReason::MissingAttribute { op: "LRN", name: "size" })?;
    if !(1..=1 << 16).contains(&size) {
        return Err(OpReason::Attribute(format!("LRN size = {size} (must be between 1 and 65536)")));
    }
    if ![alpha, beta, bias].iter().all(|v| v.is_finite()) {
        return Err(OpReason::Attribute(format!("LRN alpha {alpha}, beta {beta}, bias {bias}: must be finite")));
    }
    let size = size as usize;
    let x = required(n, 0, "X")?;
    let y = n.outputs.first().filter(|s| !s.is_empty()).cloned().ok_or(OpReason::MissingOutput(0))?;
    let tmp = |what: &str| format!("{}/{what}", n.name);
    let scalar = |v: f32| Arc::new(Tensor::f32(vec![], vec![v]));
    inits.insert(tmp("alpha"), scalar(alpha));
    inits.insert(tmp("beta"), scalar(beta));
    inits.insert(tmp("bias"), scalar(bias));
    inits.insert(tmp("dim0"), Arc::new(Tensor::i64(vec![1], vec![0])));
    inits.insert(tmp("dim1"), Arc::new(Tensor::i64(vec![1], vec![1])));
    inits.insert(tmp("one"), Arc::new(Tensor::i64(vec![1], vec![1])));
    inits.insert(tmp("rest"), Arc::new(Tensor::i64(vec![1], vec![-1])));
    let pool = crate::ops::pool::PoolAttrs {
        max: false,
        kernel: vec![size, 1],
        strides: vec![1, 1],
        dilations: vec![1, 1],
        pads: vec![(size - 1) / 2, 0, size - 1 - (size - 1) / 2, 0],
        auto_pad: crate::ops::pool::AutoPad::NotSet,
        ceil_mode: false,
        count_include_pad: true,
    };
    let gather = || Op::Shape(ShapeOp::Gather { axis: 0 });
    let parts = [
        ("x_shape", Op::Shape(ShapeOp::Shape { start: 0, end: None }), vec![x.clone()], tmp("x_shape")),
        ("batch", gather(), vec![tmp("x_shape"), tmp("dim0")], tmp("batch")),
        ("channels", gather(), vec![tmp("x_shape"), tmp("dim1")], tmp("channels")),
        (
            "view_shape",
            Op::Layout(LayoutOp::Concat { axis: 0 }),
            vec![tmp("batch"), tmp("one"), tmp("channels"), tmp("rest")],
            tmp("view_shape"),
        ),
        ("squared", Op::Binary(BinaryKind::Mul), vec![x.clone(), x.clone()], tmp("squared")),
        (
            "view",
            Op::Layout(LayoutOp::Reshape { allowzero: false }),
            vec![tmp("squared"), tmp("view_shape")],
            tmp("view"),
        ),
        ("window_mean", Op::Pool(pool), vec![tmp("view")], tmp("window_mean")),
        (
            "unview",
            Op::Layout(LayoutOp::Reshape { allowzero: false }),
            vec![tmp("window_mean"), tmp("x_shape")],
            tmp("unview"),
        ),
        ("scaled", Op::Binary(BinaryKind::Mul), vec![tmp("unview"), tmp("alpha")], tmp("scaled")),
        ("base", Op::Binary(BinaryKind::Add), vec![tmp("scaled"), tmp("bias")], tmp("base")),
        ("denominator", Op::Binary(BinaryKind::Pow), vec![tmp("base"), tmp("beta")], tmp("denominator")),
        ("y", Op::Binary(BinaryKind::Div), vec![x, tmp("denominator")], y),
    ];
    Ok(parts.into_iter().map(|(part, op, inputs, out)| part_node(n, part, op, inputs, out)).collect())
}

/// Sum, Max or Min of one or more inputs (numpy broadcasting): `((a ∘ b) ∘ c) ∘ …`, in input
/// order; one input is its Identity.
pub(super) fn expand_variadic(n: &RawNode, kind: BinaryKind) -> OpResult<Vec<Node>> {
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
                    Op::Binary(kind),
                    vec![acc, b.clone()],
                    out.clone(),
                ));
                acc = out;
            }
            Ok(nodes)
        }
    }
}
