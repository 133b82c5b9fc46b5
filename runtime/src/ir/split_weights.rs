//! Weights too large for one storage binding, split across several.
//!
//! WebGPU guarantees 128 MiB per storage buffer binding (`max_storage_buffer_binding_size`; many
//! phones and lavapipe offer no more), and the classifier layers of AlexNet (a 9216 × 4096 Gemm,
//! 144 MiB) and VGG (25088 × 4096, 392 MiB) exceed it. A Gemm or MatMul whose constant B holds more
//! than [`MAX_WEIGHT_BYTES`] is rewritten into Gemms (MatMuls) over slices of B's output columns,
//! each with its slice of a per-column C, and a Concat of their outputs along the last axis: the
//! same arithmetic, column for column (each output element is the same dot product in the same
//! order), within the limit. The slices are new initializers `<B>/cols<i>`; B's data gradient is
//! never needed (weights are frozen), and the inputs' gradients add up over the slices.

use std::collections::HashMap;
use std::sync::Arc;

use super::Node;
use crate::ops::Op;
use crate::ops::layout::LayoutOp;
use crate::tensor::{DType, Tensor};

/// The largest weight a single Gemm or MatMul binds: WebGPU's default (and guaranteed)
/// `max_storage_buffer_binding_size`.
pub const MAX_WEIGHT_BYTES: usize = 128 << 20;

/// Splits every Gemm and MatMul whose constant 2-D B exceeds [`MAX_WEIGHT_BYTES`].
pub(super) fn split_large_weights(nodes: Vec<Node>, inits: &mut HashMap<String, Arc<Tensor>>) -> Vec<Node> {
    let mut out = Vec::with_capacity(nodes.len());
    let mut split_away = Vec::new();
    for n in nodes {
        match split(&n, inits) {
            Some(parts) => {
                split_away.push(n.inputs[1].clone());
                out.extend(parts);
            }
            None => out.push(n),
        }
    }
    // The whole weight is dropped once no node reads it (its pieces hold its values).
    for name in split_away {
        if !out.iter().any(|n| n.inputs.contains(&name)) {
            inits.remove(&name);
        }
    }
    out
}

/// The node's replacement, when its B is a large 2-D float32 initializer and its C (Gemm) is
/// absent, a scalar or one value per output column.
fn split(n: &Node, inits: &mut HashMap<String, Arc<Tensor>>) -> Option<Vec<Node>> {
    let trans_b = match &n.op {
        Op::Gemm(a) => a.trans_b,
        Op::MatMul => false,
        _ => return None,
    };
    let b_name = n.inputs.get(1)?;
    let b = inits.get(b_name)?.clone();
    if b.dtype != DType::F32 || b.shape.len() != 2 || b.numel() * 4 <= MAX_WEIGHT_BYTES {
        return None;
    }
    let (k, cols) = if trans_b { (b.shape[1], b.shape[0]) } else { (b.shape[0], b.shape[1]) };
    // C: none, a scalar, [N] or [1, N] (sliced with the columns); anything else stays whole.
    let c = match n.inputs.get(2).filter(|s| !s.is_empty()) {
        None => None,
        Some(name) => {
            let c = inits.get(name)?.clone();
            let per_column = matches!(c.shape.as_slice(), [x] | [1, x] if *x == cols);
            if c.dtype != DType::F32 || !(c.numel() == 1 || per_column) {
                return None;
            }
            Some((name.clone(), c, per_column))
        }
    };
    let per_piece = (MAX_WEIGHT_BYTES / 4 / k.max(1)).max(1);
    let pieces = cols.div_ceil(per_piece);
    let values = b.as_f32()?;
    let y = n.outputs.first()?.clone();
    let mut parts = Vec::with_capacity(pieces + 1);
    let mut piece_outputs = Vec::with_capacity(pieces);
    for p in 0..pieces {
        let (c0, c1) = (p * per_piece, ((p + 1) * per_piece).min(cols));
        let w = c1 - c0;
        let slice = if trans_b {
            // [N, K]: rows c0..c1, contiguous.
            Tensor::f32(vec![w, k], values[c0 * k..c1 * k].to_vec())
        } else {
            // [K, N]: columns c0..c1 of every row.
            let mut v = Vec::with_capacity(k * w);
            for r in 0..k {
                v.extend_from_slice(&values[r * cols + c0..r * cols + c1]);
            }
            Tensor::f32(vec![k, w], v)
        };
        let b_piece = format!("{b_name}/cols{p}");
        inits.insert(b_piece.clone(), Arc::new(slice));
        let mut inputs = vec![n.inputs[0].clone(), b_piece];
        if let Some((c_name, c, per_column)) = &c {
            if *per_column {
                let cv = c.as_f32()?;
                let shape = if c.shape.len() == 1 { vec![w] } else { vec![1, w] };
                let c_piece = format!("{c_name}/cols{p}");
                inits.insert(c_piece.clone(), Arc::new(Tensor::f32(shape, cv[c0..c1].to_vec())));
                inputs.push(c_piece);
            } else {
                inputs.push(c_name.clone());
            }
        }
        let out = format!("{y}/cols{p}");
        parts.push(Node {
            name: format!("{}/cols{p}", n.name),
            op_type: n.op_type.clone(),
            op: n.op.clone(),
            inputs,
            outputs: vec![out.clone()],
            part: Some("columns"),
        });
        piece_outputs.push(out);
    }
    parts.push(Node {
        name: format!("{}/concat", n.name),
        op_type: n.op_type.clone(),
        op: Op::Layout(LayoutOp::Concat { axis: -1 }),
        inputs: piece_outputs,
        outputs: vec![y],
        part: Some("concat"),
    });
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::matmul::GemmAttrs;

    fn gemm(trans_b: bool) -> Node {
        Node {
            name: "fc".into(),
            op_type: "Gemm".into(),
            op: Op::Gemm(GemmAttrs { alpha: 1.0, beta: 1.0, trans_a: false, trans_b }),
            inputs: vec!["x".into(), "w".into(), "b".into()],
            outputs: vec!["y".into()],
            part: None,
        }
    }

    /// The pieces' columns, concatenated, are B's columns; C goes with them.
    #[test]
    fn pieces_hold_the_columns_in_order() {
        let (k, n) = (1024usize, 32 * 1024 + 7);
        for trans_b in [false, true] {
            let shape = if trans_b { vec![n, k] } else { vec![k, n] };
            let w: Vec<f32> = (0..k * n).map(|i| i as f32).collect();
            let mut inits: HashMap<String, Arc<Tensor>> = HashMap::from([
                ("w".to_string(), Arc::new(Tensor::f32(shape, w.clone()))),
                ("b".to_string(), Arc::new(Tensor::f32(vec![n], (0..n).map(|i| i as f32).collect()))),
            ]);
            let parts = split(&gemm(trans_b), &mut inits).expect("split");
            let pieces = &parts[..parts.len() - 1];
            assert_eq!(pieces.len(), 2, "{} MiB in pieces of at most 128 MiB", (k * n * 4) >> 20);
            let mut col = 0;
            for p in pieces {
                let piece = &inits[&p.inputs[1]];
                let c = &inits[&p.inputs[2]];
                let width = if trans_b { piece.shape[0] } else { piece.shape[1] };
                assert!(piece.numel() * 4 <= MAX_WEIGHT_BYTES);
                let v = piece.as_f32().unwrap();
                for j in [0, width - 1] {
                    for r in [0, k - 1] {
                        let (got, want) = if trans_b {
                            (v[j * k + r], w[(col + j) * k + r])
                        } else {
                            (v[r * width + j], w[r * n + col + j])
                        };
                        assert_eq!(got, want);
                    }
                    assert_eq!(c.as_f32().unwrap()[j], (col + j) as f32);
                }
                col += width;
            }
            assert_eq!(col, n);
            let concat = parts.last().unwrap();
            assert_eq!(concat.outputs, vec!["y".to_string()]);
            assert_eq!(concat.inputs.len(), 2);
        }
    }

    /// Weights within the limit, and a C of another shape, are left alone.
    #[test]
    fn small_weights_and_full_c_stay_whole() {
        let mut inits: HashMap<String, Arc<Tensor>> =
            HashMap::from([("w".to_string(), Arc::new(Tensor::f32(vec![4, 4], vec![0.0; 16])))]);
        assert!(split(&gemm(false), &mut inits).is_none());
        let (k, n) = (1024usize, 32 * 1024 + 7);
        inits.insert("w".into(), Arc::new(Tensor::f32(vec![k, n], vec![0.0; k * n])));
        inits.insert("b".into(), Arc::new(Tensor::f32(vec![2, n], vec![0.0; 2 * n])));
        assert!(split(&gemm(false), &mut inits).is_none());
    }
}
