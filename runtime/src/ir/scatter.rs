//! ScatterND with reduction none, expanded so that it also runs on run-time data.

use super::Node;
use super::layer_norm::part_node;
use crate::onnx::RawNode;
use crate::ops::shape::ShapeOp;
use crate::ops::{Op, OpReason, OpResult};

/// ScatterND with reduction none: `Y = Scatter(data, ScatterPositions(Shape(data), indices,
/// Shape(updates)), updates)`. The positions fold on the CPU once the plan fixes the shapes; the
/// copy and the scatter run on the GPU, with their backward, when data or updates are run-time
/// tensors (MViTv2's relative-position slice assignment), and fold to the CPU's ScatterND on
/// constants (Swin's attention masks). Other reductions stay CPU-only (`ShapeOp::ScatterNd`).
pub(super) fn expand_scatter_nd(n: &RawNode) -> OpResult<Vec<Node>> {
    let input = |i: usize, what: &str| {
        n.inputs
            .get(i)
            .filter(|s| !s.is_empty())
            .cloned()
            .ok_or_else(|| OpReason::MissingInput { index: i, what: what.into() })
    };
    let (data, indices, updates) = (input(0, "data")?, input(1, "indices")?, input(2, "updates")?);
    let y = n.outputs.first().filter(|s| !s.is_empty()).cloned().ok_or(OpReason::MissingOutput(0))?;
    let tmp = |what: &str| format!("{}/{what}", n.name);
    let node = |part: &'static str, op: Op, inputs: Vec<String>, out: String| part_node(n, part, op, inputs, out);
    let shape = || Op::Shape(ShapeOp::Shape { start: 0, end: None });
    Ok(vec![
        node("data_shape", shape(), vec![data.clone()], tmp("data_shape")),
        node("updates_shape", shape(), vec![updates.clone()], tmp("updates_shape")),
        node(
            "positions",
            Op::Shape(ShapeOp::ScatterPositions),
            vec![tmp("data_shape"), indices, tmp("updates_shape")],
            tmp("positions"),
        ),
        node("y", Op::Scatter, vec![data, tmp("positions"), updates], y),
    ])
}
