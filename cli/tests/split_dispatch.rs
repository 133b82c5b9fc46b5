//! Paced steps (frame mode's background steps) split long dispatches along z
//! (`plan::Program::z_piece`): each piece runs the same kernel with its first z workgroup in the
//! parameter block (`Params::z_piece`). A piece must compute exactly what the whole dispatch
//! computes for those workgroups. Convolutions are checked end to end by
//! `stream_policy::background_steps_with_split_convolutions_match_the_session`; here the batched
//! matrix product (1×1 convolutions, MatMul), whose batch index spans several dims.

mod common;

use acclimate::GpuContext;
use acclimate::ops::matmul::{GemmDispatch, Operand2d};
use acclimate::ops::{BufRef, Dispatch};
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
