//! Layout ops (views, Transpose, Slice, Concat, Split, Pad) and the shape arithmetic that feeds
//! them, on the GPU against naive index-by-index CPU references.
//!
//! Data movement is exact, so outputs must equal the references bit for bit. The exporter-style
//! chains check that everything computed from shapes folds away on the CPU: the plan must hold
//! only the dispatches of the data-moving ops, whatever the batch size.

mod common;

use std::collections::BTreeMap;

use acclimate::ir::Graph;
use acclimate::onnx::{Attr, DimSpec, RawGraph, RawModel, RawNode, ValueInfo};
use acclimate::{DType, Engine, GpuContext, Model, Tensor};
use acclimate_test_macros::gpu_test;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

struct Builder {
    opset: i64,
    graph: RawGraph,
}

impl Builder {
    fn new(opset: i64) -> Builder {
        Builder {
            opset,
            graph: RawGraph {
                name: "ops_layout".into(),
                nodes: Vec::new(),
                initializers: Vec::new(),
                inputs: Vec::new(),
                outputs: Vec::new(),
            },
        }
    }

    fn input(&mut self, name: &str, dims: Vec<DimSpec>) -> &mut Builder {
        self.graph.inputs.push(ValueInfo { name: name.into(), dtype: Some(DType::F32), shape: Some(dims) });
        self
    }

    fn fixed_input(&mut self, name: &str, shape: &[usize]) -> &mut Builder {
        self.input(name, shape.iter().map(|&d| DimSpec::Fixed(d as u64)).collect())
    }

    fn init(&mut self, name: &str, t: Tensor) -> &mut Builder {
        self.graph.initializers.push((name.into(), t));
        self
    }

    fn node(&mut self, op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<(&str, Attr)>) -> &mut Builder {
        let n = self.graph.nodes.len();
        self.graph.nodes.push(RawNode {
            name: format!("{op}_{n}"),
            op_type: op.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<BTreeMap<_, _>>(),
        });
        self
    }

    fn output(&mut self, name: &str) -> &mut Builder {
        self.graph.outputs.push(ValueInfo { name: name.into(), dtype: Some(DType::F32), shape: None });
        self
    }

    fn engine(&self, ctx: &GpuContext) -> Result<Engine, String> {
        let raw =
            RawModel { ir_version: 8, opset: self.opset, producer: "ops_layout".into(), graph: self.graph.clone() };
        let graph = Graph::from_raw(raw).map_err(|e| e.to_string())?;
        Ok(Engine::new(ctx, Model::from_graph(graph)))
    }
}

fn ints(v: &[i64]) -> Attr {
    Attr::Ints(v.to_vec())
}

fn i64s(v: &[i64]) -> Tensor {
    Tensor::i64(vec![v.len()], v.to_vec())
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::f32(shape.to_vec(), common::random_f32(n, seed, -1.0, 1.0))
}

/// Exact comparison: data movement must not change a single bit.
fn check(case: &str, got: &Tensor, want_shape: &[usize], want: &[f32]) {
    assert_eq!(got.shape, want_shape, "{case}: output shape");
    let g = got.to_f32_vec();
    assert_eq!(g.len(), want.len(), "{case}: element count");
    for (i, (a, b)) in g.iter().zip(want).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{case}: element {i} is {a}, reference {b}");
    }
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Every multi-index of `shape` in row-major order.
fn indices(shape: &[usize]) -> Vec<Vec<usize>> {
    let n: usize = shape.iter().product();
    (0..n)
        .map(|mut f| {
            let mut idx = vec![0; shape.len()];
            for d in (0..shape.len()).rev() {
                idx[d] = f % shape[d];
                f /= shape[d];
            }
            idx
        })
        .collect()
}

fn at(x: &Tensor, idx: &[usize]) -> f32 {
    let s = strides(&x.shape);
    x.to_f32_vec()[idx.iter().zip(&s).map(|(i, s)| i * s).sum::<usize>()]
}

// ---------------------------------------------------------------------------------------------
// References
// ---------------------------------------------------------------------------------------------

/// Source index lists per axis for one padded axis of size `n` (pads no wider than the axis).
fn pad_axis(n: usize, begin: usize, end: usize, mode: &str) -> Vec<Option<usize>> {
    let mut v: Vec<Option<usize>> = Vec::new();
    for k in (1..=begin).rev() {
        v.push(match mode {
            "reflect" => Some(k),
            "edge" => Some(0),
            _ => None,
        });
    }
    v.extend((0..n).map(Some));
    for k in 1..=end {
        v.push(match mode {
            "reflect" => Some(n - 1 - k),
            "edge" => Some(n - 1),
            _ => None,
        });
    }
    v
}

fn pad_ref(x: &Tensor, pads: &[(usize, usize)], mode: &str, value: f32) -> (Vec<usize>, Vec<f32>) {
    let maps: Vec<Vec<Option<usize>>> = x.shape.iter().zip(pads).map(|(&n, &(b, e))| pad_axis(n, b, e, mode)).collect();
    let out: Vec<usize> = maps.iter().map(|m| m.len()).collect();
    let vals = indices(&out)
        .iter()
        .map(|o| {
            let src: Option<Vec<usize>> = o.iter().zip(&maps).map(|(&i, m)| m[i]).collect();
            src.map_or(value, |s| at(x, &s))
        })
        .collect();
    (out, vals)
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// PyTorch's `F.pad` export (opset 13): the pads list is extended with ConstantOfShape zeros,
/// reshaped to pairs, reversed with a negative-step Slice, transposed and flattened; the result is
/// then flattened with a batch dimension read back through Shape → Gather → Unsqueeze → Concat.
/// All of it must fold, leaving one Pad dispatch, at batch 1 and 3 of the symbolic "N".
#[gpu_test]
fn pytorch_padding_chain_folds_to_a_static_plan(ctx: GpuContext) {
    let mut b = Builder::new(13);
    b.input("x", vec![DimSpec::Sym("N".into()), DimSpec::Fixed(2), DimSpec::Fixed(3), DimSpec::Fixed(4)])
        // F.pad(x, (1, 2, 2, 0)): last dim (left 1, right 2), third dim (top 2, bottom 0).
        .init("pad_list", i64s(&[1, 2, 2, 0]))
        .init("zeros_len", i64s(&[4]))
        .init("pairs", i64s(&[-1, 2]))
        .init("rev_start", i64s(&[-1]))
        .init("rev_end", i64s(&[-9223372036854775807]))
        .init("rev_axes", i64s(&[0]))
        .init("rev_steps", i64s(&[-1]))
        .init("flat", i64s(&[-1]))
        .init("zero_idx", Tensor::i64(vec![], vec![0]))
        .init("unsq_axes", i64s(&[0]))
        .init("minus_one", i64s(&[-1]))
        .init("fill", Tensor::f32(vec![], vec![0.25]))
        .node(
            "ConstantOfShape",
            &["zeros_len"],
            &["zeros"],
            vec![("value", Attr::Tensor(Tensor::i64(vec![1], vec![0])))],
        )
        .node("Concat", &["pad_list", "zeros"], &["pads8"], vec![("axis", Attr::Int(0))])
        .node("Reshape", &["pads8", "pairs"], &["pads42"], vec![])
        .node("Slice", &["pads42", "rev_start", "rev_end", "rev_axes", "rev_steps"], &["rev"], vec![])
        .node("Transpose", &["rev"], &["revt"], vec![("perm", ints(&[1, 0]))])
        .node("Reshape", &["revt", "flat"], &["pads_flat"], vec![])
        .node("Cast", &["pads_flat"], &["pads"], vec![("to", Attr::Int(7))])
        .node("Pad", &["x", "pads", "fill"], &["padded"], vec![("mode", Attr::String("constant".into()))])
        .node("Shape", &["padded"], &["shape"], vec![])
        .node("Gather", &["shape", "zero_idx"], &["batch"], vec![("axis", Attr::Int(0))])
        .node("Unsqueeze", &["batch", "unsq_axes"], &["batch1"], vec![])
        .node("Concat", &["batch1", "minus_one"], &["target"], vec![("axis", Attr::Int(0))])
        .node("Reshape", &["padded", "target"], &["y"], vec![])
        .output("y");
    let mut engine = b.engine(&ctx).expect("model builds");
    for batch in [1usize, 3] {
        let x = random(&[batch, 2, 3, 4], 7 + batch as u64);
        let plan = engine.plan(std::slice::from_ref(&x.shape)).expect("plan builds");
        assert_eq!(plan.dispatch_count, 1, "batch {batch}: only the Pad should run on the GPU");
        let y = engine.run(std::slice::from_ref(&x)).expect("runs");
        let (shape, want) = pad_ref(&x, &[(0, 0), (0, 0), (2, 0), (1, 2)], "constant", 0.25);
        assert_eq!(shape, vec![batch, 2, 5, 7]);
        check(&format!("padding chain, batch {batch}"), &y[0], &[batch, 2 * 5 * 7], &want);
    }
}

#[gpu_test]
fn transpose_rank5(ctx: GpuContext) {
    let shape = [2, 3, 1, 4, 5];
    let perm = [4usize, 1, 0, 3, 2];
    let mut b = Builder::new(17);
    b.fixed_input("x", &shape)
        .node("Transpose", &["x"], &["y"], vec![("perm", ints(&perm.map(|p| p as i64)))])
        .output("y");
    let x = random(&shape, 1);
    let y = b.engine(&ctx).unwrap().run(std::slice::from_ref(&x)).unwrap();
    let out: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let want: Vec<f32> = indices(&out)
        .iter()
        .map(|o| {
            let mut src = vec![0; 5];
            for (d, &p) in perm.iter().enumerate() {
                src[p] = o[d];
            }
            at(&x, &src)
        })
        .collect();
    check("transpose rank 5", &y[0], &out, &want);

    // Without perm the dimensions are reversed.
    let mut b = Builder::new(17);
    b.fixed_input("x", &shape).node("Transpose", &["x"], &["y"], vec![]).output("y");
    let y = b.engine(&ctx).unwrap().run(std::slice::from_ref(&x)).unwrap();
    let out = [5, 4, 1, 3, 2];
    let want: Vec<f32> = indices(&out).iter().map(|o| at(&x, &[o[4], o[3], o[2], o[1], o[0]])).collect();
    check("transpose default perm", &y[0], &out, &want);
}

#[gpu_test]
fn slice_negative_steps(ctx: GpuContext) {
    let shape = [5, 7, 6];
    let mut b = Builder::new(13);
    // Axis 0 reversed whole (end far below -dim), axis 2 from 5 down to (exclusive) 0 by -2, axis 1
    // forward from 1 by 3; axes given out of order and negative.
    b.fixed_input("x", &shape)
        .init("starts", i64s(&[-1, 5, 1]))
        .init("ends", i64s(&[i64::MIN, 0, 100]))
        .init("axes", i64s(&[0, -1, 1]))
        .init("steps", i64s(&[-1, -2, 3]))
        .node("Slice", &["x", "starts", "ends", "axes", "steps"], &["y"], vec![])
        .output("y");
    let x = random(&shape, 2);
    let y = b.engine(&ctx).unwrap().run(std::slice::from_ref(&x)).unwrap();
    let i0: Vec<usize> = (0..5).rev().collect();
    let i1: Vec<usize> = vec![1, 4];
    let i2: Vec<usize> = vec![5, 3, 1];
    let out = [i0.len(), i1.len(), i2.len()];
    let want: Vec<f32> = indices(&out).iter().map(|o| at(&x, &[i0[o[0]], i1[o[1]], i2[o[2]]])).collect();
    check("slice negative steps", &y[0], &out, &want);
}

#[gpu_test]
fn concat_three_inputs_axis1(ctx: GpuContext) {
    let shapes = [[2usize, 1, 3, 4], [2, 3, 3, 4], [2, 2, 3, 4]];
    let mut b = Builder::new(13);
    // Two run-time inputs and a constant in the middle (uploaded as a weight buffer).
    b.fixed_input("a", &shapes[0])
        .fixed_input("c", &shapes[2])
        .init("w", random(&shapes[1], 30))
        .node("Concat", &["a", "w", "c"], &["y"], vec![("axis", Attr::Int(-3))])
        .output("y");
    let a = random(&shapes[0], 10);
    let w = random(&shapes[1], 30);
    let c = random(&shapes[2], 20);
    let y = b.engine(&ctx).unwrap().run(&[a.clone(), c.clone()]).unwrap();
    let out = [2, 6, 3, 4];
    let want: Vec<f32> = indices(&out)
        .iter()
        .map(|o| {
            let (t, ch) = match o[1] {
                0 => (&a, 0),
                1..=3 => (&w, o[1] - 1),
                _ => (&c, o[1] - 4),
            };
            at(t, &[o[0], ch, o[2], o[3]])
        })
        .collect();
    check("concat axis 1", &y[0], &out, &want);
}

#[gpu_test]
fn reflect_and_edge_pad_4d(ctx: GpuContext) {
    let shape = [2, 3, 4, 5];
    let pads = [(0usize, 1usize), (1, 0), (2, 3), (4, 1)];
    let x = random(&shape, 3);
    for mode in ["reflect", "edge"] {
        let mut b = Builder::new(18);
        let begin: Vec<i64> = pads.iter().map(|p| p.0 as i64).collect();
        let end: Vec<i64> = pads.iter().map(|p| p.1 as i64).collect();
        b.fixed_input("x", &shape)
            .init("pads", i64s(&[begin, end].concat()))
            .node("Pad", &["x", "pads"], &["y"], vec![("mode", Attr::String(mode.into()))])
            .output("y");
        let y = b.engine(&ctx).unwrap().run(std::slice::from_ref(&x)).unwrap();
        let (out, want) = pad_ref(&x, &pads, mode, 0.0);
        check(&format!("{mode} pad"), &y[0], &out, &want);
    }
}

/// Opset 9 spells Slice, Pad, Split, Unsqueeze and Squeeze with attributes.
#[gpu_test]
fn attribute_forms_before_opset_10(ctx: GpuContext) {
    let shape = [2, 6, 5];
    let mut b = Builder::new(9);
    b.fixed_input("x", &shape)
        .node(
            "Slice",
            &["x"],
            &["s"],
            vec![("starts", ints(&[1, -4])), ("ends", ints(&[6, 1000])), ("axes", ints(&[2, 1]))],
        )
        .node("Unsqueeze", &["s"], &["u"], vec![("axes", ints(&[0]))])
        .node("Squeeze", &["u"], &["q"], vec![("axes", ints(&[0]))])
        .node("Pad", &["q"], &["p"], vec![("pads", ints(&[0, 1, 0, 0, 0, 2])), ("value", Attr::Float(-3.5))])
        .node("Split", &["p"], &["y0", "y1"], vec![("axis", Attr::Int(2)), ("split", ints(&[2, 4]))])
        .output("y0")
        .output("y1");
    let x = random(&shape, 4);
    let y = b.engine(&ctx).unwrap().run(std::slice::from_ref(&x)).unwrap();
    // s = x[:, 2:6, 1:5] → [2, 4, 4]; p pads axis 1 at the front by 1 and axis 2 at the end by 2.
    let p_shape = [2, 5, 6];
    let p: Vec<f32> = indices(&p_shape)
        .iter()
        .map(|o| if o[1] == 0 || o[2] >= 4 { -3.5 } else { at(&x, &[o[0], o[1] - 1 + 2, o[2] + 1]) })
        .collect();
    let p = Tensor::f32(p_shape.to_vec(), p);
    let part = |lo: usize, n: usize| -> Vec<f32> {
        indices(&[2, 5, n]).iter().map(|o| at(&p, &[o[0], o[1], o[2] + lo])).collect()
    };
    check("split 0", &y[0], &[2, 5, 2], &part(0, 2));
    check("split 1", &y[1], &[2, 5, 4], &part(2, 4));
}

#[gpu_test]
fn reshape_with_runtime_shape_is_an_error(ctx: GpuContext) {
    let mut b = Builder::new(13);
    b.fixed_input("x", &[2, 3]).fixed_input("s", &[2]).node("Reshape", &["x", "s"], &["y"], vec![]).output("y");
    let x = random(&[2, 3], 5);
    let s = Tensor::f32(vec![2], vec![3.0, 2.0]);
    let err = b.engine(&ctx).unwrap().run(&[x, s]).expect_err("a run-time Reshape shape must be rejected");
    let msg = err.to_string();
    assert!(msg.contains("Reshape") && msg.contains("constant"), "unexpected message: {msg}");
}

#[gpu_test]
fn dropout_is_a_view_and_its_mask_is_rejected(ctx: GpuContext) {
    let x = random(&[2, 3], 6);
    let mut b = Builder::new(13);
    b.fixed_input("x", &[2, 3])
        .init("ratio", Tensor::f32(vec![], vec![0.5]))
        .node("Dropout", &["x", "ratio"], &["d", "unused_mask"], vec![])
        .node("Relu", &["d"], &["y"], vec![])
        .output("y");
    let mut engine = b.engine(&ctx).unwrap();
    let y = engine.run(std::slice::from_ref(&x)).unwrap();
    let want: Vec<f32> = x.to_f32_vec().iter().map(|v| v.max(0.0)).collect();
    check("dropout + relu", &y[0], &[2, 3], &want);
    assert_eq!(engine.plan(&[vec![2, 3]]).unwrap().dispatch_count, 1, "Dropout must not dispatch");

    let mut b = Builder::new(13);
    b.fixed_input("x", &[2, 3]).node("Dropout", &["x"], &["d", "mask"], vec![]).output("d").output("mask");
    let err = b.engine(&ctx).unwrap().run(std::slice::from_ref(&x)).expect_err("a used mask must be rejected");
    assert!(err.to_string().contains("mask"), "unexpected message: {err}");

    let mut b = Builder::new(13);
    b.fixed_input("x", &[2, 3])
        .init("training", Tensor { dtype: DType::Bool, shape: vec![], data: acclimate::tensor::Data::I64(vec![1]) })
        .node("Dropout", &["x", "", "training"], &["d"], vec![])
        .output("d");
    let err = b.engine(&ctx).unwrap().run(std::slice::from_ref(&x)).expect_err("training mode must be rejected");
    assert!(err.to_string().contains("training"), "unexpected message: {err}");
}

/// Split's three spellings from opset 13 on, and an empty Slice result next to a non-empty one.
#[gpu_test]
fn split_forms_and_empty_outputs(ctx: GpuContext) {
    let x = random(&[3, 7], 8);
    let mut b = Builder::new(18);
    b.fixed_input("x", &[3, 7])
        .init("big", i64s(&[10]))
        .init("bigger", i64s(&[20]))
        .init("one", i64s(&[1]))
        .node("Split", &["x"], &["a", "b", "c", "d"], vec![("axis", Attr::Int(1)), ("num_outputs", Attr::Int(4))])
        .node("Slice", &["x", "big", "bigger", "one"], &["e"], vec![])
        .output("a")
        .output("d")
        .output("e");
    let y = b.engine(&ctx).unwrap().run(std::slice::from_ref(&x)).unwrap();
    let cols =
        |lo: usize, n: usize| -> Vec<f32> { indices(&[3, n]).iter().map(|o| at(&x, &[o[0], o[1] + lo])).collect() };
    check("split a", &y[0], &[3, 2], &cols(0, 2));
    check("split d", &y[1], &[3, 1], &cols(6, 1));
    check("empty slice", &y[2], &[3, 0], &[]);
}
