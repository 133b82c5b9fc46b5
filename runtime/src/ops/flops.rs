//! FLOP counts of ops, forward and reverse, from their shapes.
//!
//! The benchmark divides these by measured time to report achieved GFLOP/s, so the convention
//! matters more than the last percent. It follows the one papers and profilers use:
//!
//! - **Conv, Gemm, MatMul**: a multiply-add is 2 FLOPs. A convolution does
//!   `N·C_out·∏out_spatial · (C_in/group)·∏kernel` multiply-adds, so depthwise and grouped
//!   convolutions count only the taps they read; a bias adds 1 per output. Gemm adds 1 per
//!   output for C (alpha and beta scalings are not counted).
//! - **Elementwise** (activations, Clip, Add, Mul, ...): 1 per output element, whatever the
//!   function (an `exp` counts as 1, like an add).
//! - **BatchNormalization**: 2 per element (scale and shift with folded coefficients); batch
//!   statistics add 3 per element (sum, squared deviation) — see [`BN_BATCH_STATS`].
//! - **Pooling**: 1 per window tap per output (a compare or an add); a global average pool and
//!   ReduceMean 1 per input element.
//! - **Softmax / LogSoftmax**: 5 per element (max, subtract, exp, sum, divide).
//! - **Layout ops** (Transpose, Concat, Slice, Pad, views): 0, they only move data.
//!
//! Reverse pass (only the gradients the program asks for, see [`Op::backward_flops`]): a data or
//! weight gradient of Conv/Gemm/MatMul costs what the forward costs; an elementwise gradient 2
//! per element (the local derivative and the product with dY); pooling 1 per tap; softmax 4 per
//! element; a gradient that adds into another consumer's adds 1 per element of the input.
//! BatchNormalization's reverse pass and the loss and optimizer items are counted where the
//! adaptation lowers them, with the constants below.

use serde::Serialize;

use super::Op;

/// FLOPs of a program or a graph, split by op family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FlopCount {
    pub conv: u64,
    /// Gemm and MatMul.
    pub gemm: u64,
    pub norm: u64,
    pub pool: u64,
    pub elementwise: u64,
    /// Softmax, reductions, the adaptation loss and the optimizer.
    pub other: u64,
}

impl FlopCount {
    pub fn total(&self) -> u64 {
        self.conv + self.gemm + self.norm + self.pool + self.elementwise + self.other
    }
}

impl std::ops::AddAssign for FlopCount {
    fn add_assign(&mut self, o: FlopCount) {
        self.conv += o.conv;
        self.gemm += o.gemm;
        self.norm += o.norm;
        self.pool += o.pool;
        self.elementwise += o.elementwise;
        self.other += o.other;
    }
}

impl std::ops::Add for FlopCount {
    type Output = FlopCount;
    fn add(mut self, o: FlopCount) -> FlopCount {
        self += o;
        self
    }
}

/// Extra FLOPs per element of BatchNormalization with batch statistics (the mean's sum, the
/// variance's squared deviation and sum), on top of the 2 of the normalization itself.
pub const BN_BATCH_STATS: u64 = 3;
/// BatchNormalization's reverse pass per element: the two reductions `Σ dY` and `Σ dY·x̂`, with
/// `x̂` recomputed (5), plus 4 for `dX = γ/σ · (dY − mean(dY) − x̂·mean(dY·x̂))` when the input
/// gradient is needed.
pub const BN_BACKWARD_PARAMS: u64 = 5;
pub const BN_BACKWARD_DX: u64 = 4;
/// The adaptation loss per logit: softmax (5), entropy (log, product, sum: 3) and its gradient
/// (2). Objectives differ by a few FLOPs per logit, negligible beside the network.
pub const LOSS_PER_LOGIT: u64 = 10;

/// Optimizer FLOPs per adapted parameter element: SGD 2 (`p −= lr·g`), with momentum 4, Adam 12
/// (both moments, bias corrections, square root and division).
pub fn optimizer_per_param(moment_buffers: usize) -> u64 {
    match moment_buffers {
        0 => 2,
        1 => 4,
        _ => 12,
    }
}

fn numel(s: &[usize]) -> u64 {
    s.iter().map(|&d| d as u64).product()
}

/// Multiply-adds of a Conv (`out` [N, C_out, spatial...], `w` [C_out, C_in/group, kernel...]),
/// or of a Gemm/MatMul as `out` elements times the reduced length.
fn conv_macs(out: &[usize], w: &[usize]) -> u64 {
    numel(out) * numel(w.get(1..).unwrap_or(&[]))
}

/// The reduced length K of a MatMul whose A operand has shape `a`.
fn matmul_k(a: &[usize]) -> u64 {
    a.last().copied().unwrap_or(1) as u64
}

fn gemm_k(trans_a: bool, a: &[usize]) -> u64 {
    match (a, trans_a) {
        ([k, _], true) | ([_, k], false) => *k as u64,
        _ => 1,
    }
}

impl Op {
    /// FLOPs of the forward op, from its input and output shapes (`None` for an omitted
    /// optional input).
    pub fn flops(&self, inputs: &[Option<&[usize]>], outputs: &[&[usize]]) -> FlopCount {
        let input = |i: usize| inputs.get(i).copied().flatten();
        let out = outputs.first().copied().unwrap_or(&[]);
        let x = input(0).unwrap_or(&[]);
        let mut f = FlopCount::default();
        match self {
            Op::Unary(_) | Op::ClipInputs | Op::Binary(_) => f.elementwise = numel(out),
            Op::Conv(_) => {
                let w = input(1).unwrap_or(&[]);
                f.conv = 2 * conv_macs(out, w) + if input(2).is_some() { numel(out) } else { 0 };
            }
            Op::Gemm(a) => {
                f.gemm = 2 * numel(out) * gemm_k(a.trans_a, x) + if input(2).is_some() { numel(out) } else { 0 };
            }
            Op::MatMul => f.gemm = 2 * numel(out) * matmul_k(x),
            Op::BatchNorm(_) => f.norm = 2 * numel(x),
            Op::Pool(p) => f.pool = numel(out) * numel(&p.kernel),
            Op::GlobalAveragePool => f.pool = numel(x),
            Op::ReduceMean(_) => f.other = numel(x),
            Op::Softmax(_) => f.other = 5 * numel(x),
            Op::Layout(_) | Op::Shape(_) | Op::Scatter => {}
        }
        f
    }

    /// FLOPs of the reverse pass that produces the input gradients marked in `wanted` (one entry
    /// per input: `None` when not produced, `Some(accumulate)` when produced, `accumulate` when it
    /// adds into a gradient another consumer already wrote). BatchNormalization's reverse pass is
    /// the adaptation's own lowering and is counted there.
    pub fn backward_flops(
        &self,
        inputs: &[Option<&[usize]>],
        outputs: &[&[usize]],
        wanted: &[Option<bool>],
    ) -> FlopCount {
        let input = |i: usize| inputs.get(i).copied().flatten().unwrap_or(&[]);
        let out = outputs.first().copied().unwrap_or(&[]);
        let mut f = FlopCount::default();
        let mut accumulate = 0;
        for (i, w) in wanted.iter().enumerate() {
            if *w == Some(true) {
                accumulate += numel(input(i));
            }
        }
        let want = |i: usize| wanted.get(i).copied().flatten().is_some();
        let produced = (0..wanted.len()).filter(|&i| want(i)).count() as u64;
        match self {
            Op::Unary(_) | Op::ClipInputs => f.elementwise = if want(0) { 2 * numel(out) } else { 0 },
            Op::Binary(_) => f.elementwise = produced * numel(out),
            Op::Conv(_) => {
                let macs = conv_macs(out, input(1));
                f.conv = 2 * macs * (want(0) as u64 + want(1) as u64) + if want(2) { numel(out) } else { 0 };
            }
            Op::Gemm(a) => {
                let mnk = numel(out) * gemm_k(a.trans_a, input(0));
                f.gemm = 2 * mnk * (want(0) as u64 + want(1) as u64) + if want(2) { numel(out) } else { 0 };
            }
            Op::MatMul => f.gemm = 2 * numel(out) * matmul_k(input(0)) * (want(0) as u64 + want(1) as u64),
            Op::BatchNorm(_) => {}
            Op::Pool(p) => f.pool = if want(0) { numel(out) * numel(&p.kernel) } else { 0 },
            Op::GlobalAveragePool => f.pool = if want(0) { numel(input(0)) } else { 0 },
            Op::ReduceMean(_) => f.other = if want(0) { numel(input(0)) } else { 0 },
            Op::Softmax(_) => f.other = if want(0) { 4 * numel(out) } else { 0 },
            Op::Layout(_) | Op::Shape(_) | Op::Scatter => {}
        }
        f.elementwise += accumulate;
        f
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ir::Graph;
    use crate::onnx::{Attr, DimSpec, RawGraph, RawModel, RawNode, ValueInfo};
    use crate::plan::forward_flops;
    use crate::tensor::{DType, Tensor};

    type NodeSpec<'a> = (&'a str, &'a [&'a str], &'a str, Vec<(&'a str, Attr)>);

    /// A one-input graph: `x` of `shape`, constants `inits`, nodes `(op, inputs, output, attrs)`.
    fn graph(shape: &[usize], inits: &[(&str, Vec<usize>)], nodes: Vec<NodeSpec<'_>>) -> Graph {
        let last = nodes.last().map(|n| n.2.to_string()).unwrap_or_default();
        let raw = RawModel {
            ir_version: 8,
            opset: 17,
            producer: "flops test".into(),
            graph: RawGraph {
                name: "g".into(),
                nodes: nodes
                    .into_iter()
                    .enumerate()
                    .map(|(i, (op, ins, out, attrs))| RawNode {
                        name: format!("n{i}"),
                        op_type: op.into(),
                        domain: String::new(),
                        inputs: ins.iter().map(|s| s.to_string()).collect(),
                        outputs: vec![out.into()],
                        attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<BTreeMap<_, _>>(),
                    })
                    .collect(),
                initializers: inits
                    .iter()
                    .map(|(n, s)| {
                        let numel = s.iter().product();
                        (n.to_string(), Tensor::f32(s.clone(), vec![0.5; numel]))
                    })
                    .collect(),
                inputs: vec![ValueInfo {
                    name: "x".into(),
                    dtype: Some(DType::F32),
                    shape: Some(shape.iter().map(|&d| DimSpec::Fixed(d as u64)).collect()),
                }],
                outputs: vec![ValueInfo { name: last, dtype: Some(DType::F32), shape: None }],
            },
        };
        Graph::from_raw(raw).expect("test graph")
    }

    fn ints(v: &[i64]) -> Attr {
        Attr::Ints(v.to_vec())
    }

    fn count(g: &Graph, shape: &[usize]) -> FlopCount {
        forward_flops(g, &[shape.to_vec()]).expect("flops")
    }

    #[test]
    fn conv_counts_every_tap_and_the_bias() {
        // [2,3,8,8] * [4,3,3,3], pad 1: 2·4·8·8 = 512 outputs of 27 multiply-adds, + 512 bias adds.
        let g = graph(
            &[2, 3, 8, 8],
            &[("w", vec![4, 3, 3, 3]), ("b", vec![4])],
            vec![("Conv", &["x", "w", "b"], "y", vec![("pads", ints(&[1, 1, 1, 1]))])],
        );
        assert_eq!(count(&g, &[2, 3, 8, 8]), FlopCount { conv: 2 * 512 * 27 + 512, ..Default::default() });
    }

    #[test]
    fn depthwise_and_grouped_conv_count_only_their_taps() {
        // Depthwise, stride 2: [1,8,6,6] → [1,8,3,3] = 72 outputs of 9 taps each.
        let dw = graph(
            &[1, 8, 6, 6],
            &[("w", vec![8, 1, 3, 3])],
            vec![(
                "Conv",
                &["x", "w"],
                "y",
                vec![("group", Attr::Int(8)), ("pads", ints(&[1, 1, 1, 1])), ("strides", ints(&[2, 2]))],
            )],
        );
        assert_eq!(count(&dw, &[1, 8, 6, 6]).conv, 2 * 72 * 9);
        // Two groups of a 1×1 conv: [1,4,5,5] → [1,6,5,5] = 150 outputs of 2 taps each.
        let grouped = graph(
            &[1, 4, 5, 5],
            &[("w", vec![6, 2, 1, 1])],
            vec![("Conv", &["x", "w"], "y", vec![("group", Attr::Int(2))])],
        );
        assert_eq!(count(&grouped, &[1, 4, 5, 5]).conv, 2 * 150 * 2);
    }

    #[test]
    fn gemm_counts_k_from_the_transposed_operand() {
        // [3,5] @ [4,5]^T + C: 12 outputs of 5 multiply-adds, + 12 bias adds.
        let g = graph(
            &[3, 5],
            &[("w", vec![4, 5]), ("c", vec![4])],
            vec![("Gemm", &["x", "w", "c"], "y", vec![("transB", Attr::Int(1))])],
        );
        assert_eq!(count(&g, &[3, 5]), FlopCount { gemm: 2 * 12 * 5 + 12, ..Default::default() });
        // transA: A is [5,3], K is still 5.
        let t = graph(&[5, 3], &[("w", vec![5, 4])], vec![("Gemm", &["x", "w"], "y", vec![("transA", Attr::Int(1))])]);
        assert_eq!(count(&t, &[5, 3]).gemm, 2 * 12 * 5);
        let mm = graph(&[2, 3, 7], &[("w", vec![7, 4])], vec![("MatMul", &["x", "w"], "y", vec![])]);
        assert_eq!(count(&mm, &[2, 3, 7]).gemm, 2 * (2 * 3 * 4) * 7);
    }

    #[test]
    fn a_small_network_by_family() {
        // conv [1,2,4,4] → [1,3,4,4] (48 outputs × 18 taps), BN, ReLU, 2×2 max pool → [1,3,2,2],
        // global average pool (12 inputs), flatten (a view), Gemm [1,3] → [1,5] with bias.
        let g = graph(
            &[1, 2, 4, 4],
            &[
                ("w", vec![3, 2, 3, 3]),
                ("s", vec![3]),
                ("bb", vec![3]),
                ("m", vec![3]),
                ("v", vec![3]),
                ("fw", vec![5, 3]),
                ("fb", vec![5]),
            ],
            vec![
                ("Conv", &["x", "w"], "c", vec![("pads", ints(&[1, 1, 1, 1]))]),
                ("BatchNormalization", &["c", "s", "bb", "m", "v"], "b", vec![]),
                ("Relu", &["b"], "r", vec![]),
                ("MaxPool", &["r"], "p", vec![("kernel_shape", ints(&[2, 2])), ("strides", ints(&[2, 2]))]),
                ("GlobalAveragePool", &["p"], "g", vec![]),
                ("Flatten", &["g"], "f", vec![]),
                ("Gemm", &["f", "fw", "fb"], "y", vec![("transB", Attr::Int(1))]),
            ],
        );
        let want = FlopCount {
            conv: 2 * 48 * 18,
            norm: 2 * 48,
            elementwise: 48,
            pool: 12 * 4 + 12,
            gemm: 2 * 5 * 3 + 5,
            other: 0,
        };
        let got = count(&g, &[1, 2, 4, 4]);
        assert_eq!(got, want);
        assert_eq!(got.total(), 1728 + 96 + 48 + 60 + 35);
    }

    #[test]
    fn reverse_pass_counts_only_the_gradients_asked_for() {
        let conv = Op::Conv(crate::ops::conv::ConvAttrs {
            auto_pad: crate::ops::pool::AutoPad::NotSet,
            dilations: None,
            group: 1,
            kernel_shape: None,
            pads: None,
            strides: None,
        });
        let (x, w, y): (&[usize], &[usize], &[usize]) = (&[1, 2, 3, 3], &[4, 2, 1, 1], &[1, 4, 3, 3]);
        let ins = [Some(x), Some(w)];
        // Frozen weights (TENT): the data gradient only, as many FLOPs as the forward.
        assert_eq!(conv.backward_flops(&ins, &[y], &[Some(false), None]).conv, 2 * 36 * 2);
        // Adding into another consumer's gradient costs one add per input element.
        assert_eq!(
            conv.backward_flops(&ins, &[y], &[Some(true), None]),
            FlopCount { conv: 2 * 36 * 2, elementwise: 18, ..Default::default() }
        );
        // Data and weight gradients: twice the forward.
        assert_eq!(conv.backward_flops(&ins, &[y], &[Some(false), Some(false)]).conv, 4 * 36 * 2);
        assert_eq!(conv.backward_flops(&ins, &[y], &[None, None]).total(), 0);
    }
}
