//! Paced steps (frame mode's background steps) split long dispatches along z
//! (`plan::Program::z_piece`): each piece runs the same kernel with its first z workgroup in the
//! parameter block (`Params::z_piece`). A piece must compute exactly what the whole dispatch
//! computes for those workgroups. Convolutions are checked end to end by
//! `stream_policy::background_steps_with_split_convolutions_match_the_session`, and every Conv
//! reverse-pass case of `backward_conv` runs split too; here the batched matrix product (1×1
//! convolutions, MatMul), whose batch index spans several dims, and the depthwise forward (one
//! image per z workgroup).

mod common;

use acclimate::GpuContext;
use acclimate::ops::matmul::{GemmDispatch, Operand2d};
use acclimate::ops::{Attrs, BufRef, Dispatch, Lowering, Operand};
use acclimate::plan::standalone::run_dispatches;
use acclimate_test_macros::gpu_test;
use common::random_f32;

/// The dispatch split into pieces of `piece` z workgroups, as `Compiled` records them.
fn split(d: &Dispatch, piece: u32) -> Vec<Dispatch> {
    let z = d.workgroups[2];
    assert!(d.params.splits_along_z(), "{} cannot be split", d.key.entry);
    (0..z.div_ceil(piece))
        .map(|i| {
            let (base, zs) = (i * piece, piece.min(z - i * piece));
            let mut part = d.clone();
            part.params = d.params.z_piece(base, zs, z);
            part.workgroups[2] = zs;
            part
        })
        .collect()
}

#[gpu_test]
fn a_batched_matmul_split_along_z_computes_what_the_whole_dispatch_does(ctx: GpuContext) {
    // out[b0, b1] = A[b1] · B[b0, b1] + C[b0]: A broadcast over b0, C over b1, z = 2 × 5.
    let (m, n, k, b0, b1) = (6, 7, 5, 2, 5);
    let gemm = GemmDispatch {
        m,
        n,
        k,
        batch_shape: vec![b0, b1],
        a: Operand2d { buf: BufRef::Value(0), row_stride: k, col_stride: 1, batch_strides: vec![0, m * k] },
        b: Operand2d { buf: BufRef::Value(1), row_stride: n, col_stride: 1, batch_strides: vec![b1 * k * n, k * n] },
        c: Some(Operand2d { buf: BufRef::Value(2), row_stride: 1, col_stride: 0, batch_strides: vec![m, 0] }),
        alpha: 1.0,
        beta: 1.0,
        out: BufRef::Value(3),
        accumulate: false,
    };
    let d = gemm.build().expect("dispatch");
    assert_eq!(d.workgroups[2], (b0 * b1) as u32);
    let inputs = vec![
        random_f32(b1 * m * k, 1, -1.0, 1.0),
        random_f32(b0 * b1 * k * n, 2, -1.0, 1.0),
        random_f32(b0 * m, 3, -1.0, 1.0),
        vec![f32::NAN; b0 * b1 * m * n],
    ];
    let mut whole = inputs.clone();
    run_dispatches(&ctx, &mut whole, &[], &[], std::slice::from_ref(&d)).expect("whole");
    assert!(whole[3].iter().all(|v| v.is_finite()), "every output written");
    for piece in [1, 3, 4, 10] {
        let mut parts = inputs.clone();
        run_dispatches(&ctx, &mut parts, &[], &[], &split(&d, piece)).expect("pieces");
        assert_eq!(parts[3], whole[3], "pieces of {piece}");
    }
    // The pieces' work adds up to the dispatch's (what the pacer balances chunks by).
    let pieces = split(&d, 4);
    let total: u64 = pieces.iter().map(|p| p.params.work().unwrap()).sum();
    assert_eq!(d.params.work(), Some(2 * (b0 * b1 * m * n * k) as u64));
    assert!(total.abs_diff(d.params.work().unwrap()) <= pieces.len() as u64, "{total}");
}

/// Regression: depthwise convolutions (MobileNetV2's) ran as one flat dispatch over the whole
/// batch, which a paced step could not split, so a frame waited behind the whole layer. They now
/// run one image per z workgroup; split into pieces they must write every output exactly as the
/// whole dispatch does.
#[gpu_test]
fn a_depthwise_conv_split_along_the_batch_computes_what_the_whole_dispatch_does(ctx: GpuContext) {
    depthwise_split_case(&ctx, true, false);
    // Without a bias: conv_depthwise_plain, whose parameters (the z base among them) are read in
    // place from a storage block.
    depthwise_split_case(&ctx, false, false);
    // The same on a CPU adapter's lowering: conv_depthwise_rows, a run of outputs per invocation.
    depthwise_split_case(&ctx, false, true);
}

fn depthwise_split_case(ctx: &GpuContext, with_bias: bool, cpu_kernels: bool) {
    use acclimate::onnx::Attr;
    use acclimate::ops::conv::{ConvAttrs, lower};
    let (x_shape, w_shape) = ([5usize, 6, 9, 8], [12usize, 1, 3, 3]);
    let mut attrs = std::collections::BTreeMap::new();
    attrs.insert("group".to_string(), Attr::Int(6));
    attrs.insert("strides".to_string(), Attr::Ints(vec![2, 2]));
    attrs.insert("pads".to_string(), Attr::Ints(vec![1, 1, 1, 1]));
    let a = ConvAttrs::parse(&Attrs::new(&attrs)).expect("attrs");
    let y_shape = vec![5usize, 12, 5, 4];
    let mut l = Lowering {
        node: "depthwise".into(),
        inputs: vec![
            Some(Operand { buf: BufRef::Value(0), shape: x_shape.to_vec(), value: None }),
            Some(Operand { buf: BufRef::Weight(0), shape: w_shape.to_vec(), value: None }),
            with_bias.then(|| Operand { buf: BufRef::Weight(1), shape: vec![12], value: None }),
        ],
        outputs: vec![Operand { buf: BufRef::Value(1), shape: y_shape.clone(), value: None }],
        dispatches: Vec::new(),
        scratch: Vec::new(),
        max_workgroup_storage: 16384,
        max_invocations: 256,
        cpu_kernels,
    };
    lower(&a, &mut l).expect("lowers");
    assert_eq!(l.dispatches.len(), 1);
    let d = &l.dispatches[0];
    let entry = match (with_bias, cpu_kernels) {
        (true, _) => "conv_depthwise",
        (false, false) => "conv_depthwise_plain",
        (false, true) => "conv_depthwise_rows",
    };
    assert_eq!((d.key.entry, d.workgroups[2]), (entry, 5), "one image per z workgroup");
    let inputs = vec![random_f32(x_shape.iter().product(), 4, -1.0, 1.0), vec![f32::NAN; y_shape.iter().product()]];
    let weights = vec![random_f32(w_shape.iter().product(), 5, -1.0, 1.0), random_f32(12, 6, -1.0, 1.0)];
    let mut whole = inputs.clone();
    run_dispatches(ctx, &mut whole, &weights, &l.scratch, std::slice::from_ref(d)).expect("whole");
    assert!(whole[1].iter().all(|v| v.is_finite()), "every output written");
    // Output (image 4, channel 7, row 2, column 3) by hand: channel 7 reads input channel 3.
    let (x, w, b) = (&inputs[0], &weights[0], &weights[1]);
    let mut want = if with_bias { b[7] as f64 } else { 0.0 };
    for kh in 0..3 {
        for kw in 0..3 {
            let (ih, iw) = (2 * 2 + kh as i64 - 1, 3 * 2 + kw as i64 - 1);
            if (0..9).contains(&ih) && (0..8).contains(&iw) {
                want += w[7 * 9 + kh * 3 + kw] as f64 * x[((4 * 6 + 3) * 9 + ih as usize) * 8 + iw as usize] as f64;
            }
        }
    }
    let got = whole[1][((4 * 12 + 7) * 5 + 2) * 4 + 3] as f64;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    for piece in [1, 2, 4] {
        let mut parts = inputs.clone();
        run_dispatches(ctx, &mut parts, &weights, &l.scratch, &split(d, piece)).expect("pieces");
        assert_eq!(parts[1], whole[1], "pieces of {piece} (bias: {with_bias})");
    }
}
