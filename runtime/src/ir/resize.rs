//! Resize (opset 10+) and Upsample (7–9) as two MatMuls with interpolation matrices:
//! `Y = M_h · (X · M_wᵀ)`, the matrices computed on the CPU from `Shape(X)` and the node's roi,
//! scales or sizes once the plan fixes the input shape (`ops/resize.rs` has the semantics).
//! `tf_crop_and_resize` with a non-zero `extrapolation_value` adds the extrapolated positions'
//! constant. The MatMuls carry the backward (`M_hᵀ · dY · M_w`).

use super::Node;
use super::layer_norm::part_node;
use crate::onnx::RawNode;
use crate::ops::elementwise::BinaryKind;
use crate::ops::resize::{Part, ResizeAttrs};
use crate::ops::shape::ShapeOp;
use crate::ops::{Attrs, Op, OpReason, OpResult};

pub(super) fn expand(n: &RawNode, opset: i64) -> OpResult<Vec<Node>> {
    let attrs = ResizeAttrs::parse(&n.op_type, &Attrs::new(&n.attrs), opset)?;
    let input = |i: usize| n.inputs.get(i).filter(|s| !s.is_empty()).cloned();
    let x = input(0).ok_or(OpReason::MissingInput { index: 0, what: "X".into() })?;
    let y = n.outputs.first().filter(|s| !s.is_empty()).cloned().ok_or(OpReason::MissingOutput(0))?;
    // The matrix nodes read [Shape(X), roi, scales, sizes].
    let (roi, scales, sizes) = match (n.op_type.as_str(), opset) {
        ("Upsample", o) if o < 9 => (None, None, None),
        ("Upsample", _) | ("Resize", 0..=10) => {
            (None, Some(input(1).ok_or(OpReason::MissingInput { index: 1, what: "scales".into() })?), None)
        }
        _ => (input(1), input(2), input(3)),
    };
    let tmp = |what: &str| format!("{}/{what}", n.name);
    let params: Vec<String> =
        [Some(tmp("x_shape")), roi, scales, sizes].into_iter().map(|s| s.unwrap_or_default()).collect();
    let matrix = |part| Op::Shape(ShapeOp::Resize { attrs: Box::new(attrs.clone()), part });
    let node = |part: &'static str, op: Op, inputs: Vec<String>, out: String| part_node(n, part, op, inputs, out);
    let extrapolates = attrs.adds_extrapolation();
    let product = if extrapolates { tmp("interpolated") } else { y.clone() };
    let mut nodes = vec![
        node("x_shape", Op::Shape(ShapeOp::Shape { start: 0, end: None }), vec![x.clone()], tmp("x_shape")),
        node("columns", matrix(Part::ColumnsT), params.clone(), tmp("columns")),
        node("width", Op::MatMul, vec![x, tmp("columns")], tmp("width")),
        node("rows", matrix(Part::Rows), params.clone(), tmp("rows")),
        node("y", Op::MatMul, vec![tmp("rows"), tmp("width")], product.clone()),
    ];
    if extrapolates {
        nodes.push(node("extrapolated", matrix(Part::Extrapolated), params, tmp("extrapolated")));
        nodes.push(node("y_extrapolated", Op::Binary(BinaryKind::Add), vec![product, tmp("extrapolated")], y));
    }
    Ok(nodes)
}
