//! Gemm and MatMul (`shaders/matmul.wgsl`).
//!
//! Both lower to one tiled kernel that computes `out[b] = alpha * A[b] @ B[b] + beta * C[b]` with
//! every operand addressed through strides: transposes swap strides, broadcast dims get stride 0,
//! and the output is contiguous. [`crate::ops::conv`] routes 1x1 convolutions here too, through
//! [`GemmDispatch`].
//!
//! The reverse pass reuses the same kernel: every data gradient of a matrix product is another
//! matrix product of strided views (dA = dY @ Bᵀ, dB = Aᵀ @ dY), and a transposed view is just
//! swapped strides. Gradients of operands that were broadcast over batch dims (and Gemm's C) are
//! summed over those dims by `reduce_broadcast`, a fixed-order loop per output element, so the
//! result is bit-reproducible.

use super::{
    Attrs, BackwardLowering, BufRef, Dispatch, GradInput, Input, Lowering, OpReason, OpResult, broadcast_shapes,
    broadcast_strides, contiguous_strides, f32_out, required,
};
use crate::gpu::{KernelKey, Params, Shader, grid_1d};
use crate::tensor::DType;

/// Products with at most this many rows (M) run `matmul_rows` (`MAX_ROWS` in matmul.wgsl).
pub const ROWS_KERNEL_MAX: usize = 16;
/// Columns per workgroup of `matmul_rows`.
const ROWS_GROUP: usize = 256;

/// Output tile edge of `matmul_main` (and of `conv.wgsl`'s `conv_gemm`).
pub const TILE: usize = 64;

/// Batch dims the kernel decomposes `workgroup_id.z` over; more are merged where their strides
/// allow it.
pub const MAX_BATCH_DIMS: usize = 4;

/// Most workgroups a dispatch may have in one dimension on every wgpu backend.
const MAX_GROUPS: usize = 65535;

#[derive(Clone, Debug, PartialEq)]
pub struct GemmAttrs {
    pub alpha: f32,
    pub beta: f32,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl GemmAttrs {
    pub fn parse(a: &Attrs<'_>) -> OpResult<GemmAttrs> {
        a.only(&["alpha", "beta", "transA", "transB", "broadcast"])?;
        // Opset 6 and earlier spelled C's unidirectional broadcasting as an attribute; broadcast=0
        // demanded C of exactly (M, N), which the broadcasting path also computes correctly.
        Ok(GemmAttrs {
            alpha: a.float("alpha", 1.0)?,
            beta: a.float("beta", 1.0)?,
            trans_a: a.int("transA", 0)? != 0,
            trans_b: a.int("transB", 0)? != 0,
        })
    }
}

/// One strided matrix operand: element strides along its rows and columns and per batch dim.
#[derive(Clone, Debug, PartialEq)]
pub struct Operand2d {
    pub buf: BufRef,
    pub row_stride: usize,
    pub col_stride: usize,
    /// One stride per batch dim of the dispatch (0 where the operand is broadcast).
    pub batch_strides: Vec<usize>,
}

/// A batched strided matrix product for `matmul_main`; `out` is contiguous `[batch..., m, n]`.
#[derive(Clone, Debug)]
pub struct GemmDispatch {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch_shape: Vec<usize>,
    pub a: Operand2d,
    pub b: Operand2d,
    /// The bias, scaled by `beta`; its strides may be 0 to broadcast.
    pub c: Option<Operand2d>,
    pub alpha: f32,
    pub beta: f32,
    pub out: BufRef,
    /// Add the product into `out` instead of overwriting it (gradient accumulation).
    pub accumulate: bool,
}

/// Merges adjacent batch dims that every operand walks contiguously (and drops unit dims), so
/// deep batch shapes fit the kernel's four.
fn merge_batch_dims(shape: &[usize], strides: &[Vec<usize>]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut out_shape: Vec<usize> = Vec::new();
    let mut out_strides: Vec<Vec<usize>> = vec![Vec::new(); strides.len()];
    for (d, &s) in shape.iter().enumerate() {
        if s == 1 {
            continue;
        }
        let mergeable = match out_shape.last() {
            Some(_) => strides.iter().zip(&out_strides).all(|(st, os)| os.last() == Some(&(st[d] * s))),
            None => false,
        };
        if mergeable {
            if let Some(last) = out_shape.last_mut() {
                *last *= s;
            }
            for (st, os) in strides.iter().zip(out_strides.iter_mut()) {
                if let Some(last) = os.last_mut() {
                    *last = st[d];
                }
            }
        } else {
            out_shape.push(s);
            for (st, os) in strides.iter().zip(out_strides.iter_mut()) {
                os.push(st[d]);
            }
        }
    }
    (out_shape, out_strides)
}

fn u32_checked(v: usize, what: &str) -> OpResult<u32> {
    u32::try_from(v).map_err(|_| OpReason::TooLarge(format!("{what} ({v}) exceeds the kernel's 32-bit indexing")))
}

impl GemmDispatch {
    /// Appends the dispatch to a forward lowering.
    pub fn emit(&self, l: &mut Lowering) -> OpResult<()> {
        l.dispatches.push(self.build()?);
        Ok(())
    }

    /// Appends the dispatch to a reverse-pass lowering.
    pub fn emit_backward(&self, b: &mut BackwardLowering) -> OpResult<()> {
        b.dispatches.push(self.build()?);
        Ok(())
    }

    /// The dispatch of `matmul_main` for this product.
    pub fn build(&self) -> OpResult<Dispatch> {
        let mut strides = vec![self.a.batch_strides.clone(), self.b.batch_strides.clone()];
        if let Some(c) = &self.c {
            strides.push(c.batch_strides.clone());
        }
        if strides.iter().any(|s| s.len() != self.batch_shape.len()) {
            return Err(OpReason::Internal("matmul: batch strides do not match the batch rank".into()));
        }
        let (batch_shape, bs) = merge_batch_dims(&self.batch_shape, &strides);
        if batch_shape.len() > MAX_BATCH_DIMS {
            return Err(OpReason::Shape(format!(
                "matmul batch shape {:?} needs {} independent batch dims after merging; the kernel supports {MAX_BATCH_DIMS}",
                self.batch_shape,
                batch_shape.len()
            )));
        }
        let batch: usize = batch_shape.iter().product();
        if batch > MAX_GROUPS {
            return Err(OpReason::TooLarge(format!(
                "matmul batch of {batch} matrices exceeds the {MAX_GROUPS} workgroups of one dispatch"
            )));
        }
        let total = batch * self.m * self.n;
        u32_checked(total, "matmul output size")?;
        let c_bs = bs.get(2).cloned().unwrap_or_default();
        let zero = Operand2d { buf: self.a.buf, row_stride: 0, col_stride: 0, batch_strides: vec![] };
        let c = self.c.as_ref().unwrap_or(&zero);
        let params = Params::new()
            .u32(u32_checked(self.m, "M")?)
            .u32(u32_checked(self.n, "N")?)
            .u32(u32_checked(self.k, "K")?)
            .u32(batch_shape.len() as u32)
            .u32(u32_checked(self.a.row_stride, "stride")?)
            .u32(u32_checked(self.a.col_stride, "stride")?)
            .u32(u32_checked(self.b.row_stride, "stride")?)
            .u32(u32_checked(self.b.col_stride, "stride")?)
            .u32(u32_checked(c.row_stride, "stride")?)
            .u32(u32_checked(c.col_stride, "stride")?)
            .f32(self.alpha)
            .f32(self.beta)
            .vec4u(&to_u32s(&batch_shape)?)
            .vec4u(&to_u32s(&bs[0])?)
            .vec4u(&to_u32s(&bs[1])?)
            .vec4u(&to_u32s(&c_bs)?)
            .u32(0)
            .z_base_in_last_word()
            .work_hint(&[batch, self.m, self.n, self.k]);
        // A few rows: one invocation per column computes all of them (`matmul_rows`) instead of
        // 64×64 tiles that compute up to 64× the outputs they write.
        let rows = self.m <= ROWS_KERNEL_MAX;
        let mut key = if rows {
            KernelKey::new(Shader::Matmul, "matmul_rows").with("ROWS", self.m as i32)
        } else {
            KernelKey::new(Shader::Matmul, "matmul_main")
        }
        .with("HAS_BIAS", self.c.is_some() as i32);
        // Only the reverse pass accumulates; forward pipelines keep their override-free key.
        if self.accumulate {
            key = key.with("ACCUM", 1);
        }
        let workgroups = if rows {
            [u32_checked(self.n.div_ceil(ROWS_GROUP), "matmul workgroups")?, 1, batch as u32]
        } else {
            [self.n.div_ceil(TILE) as u32, self.m.div_ceil(TILE) as u32, batch as u32]
        };
        Ok(Dispatch { key, params, buffers: vec![self.a.buf, self.b.buf, c.buf, self.out], workgroups })
    }
}

fn to_u32s(v: &[usize]) -> OpResult<Vec<u32>> {
    v.iter().map(|&x| u32_checked(x, "batch stride")).collect()
}

/// Gemm's A, B (and optional C) shapes into (M, K, N), checking they agree.
fn gemm_dims(a: &GemmAttrs, sa: &[usize], sb: &[usize]) -> OpResult<(usize, usize, usize)> {
    if sa.len() != 2 || sb.len() != 2 {
        return Err(OpReason::Shape(format!("Gemm needs 2-D A and B, got shapes {sa:?} and {sb:?}")));
    }
    let (m, k) = if a.trans_a { (sa[1], sa[0]) } else { (sa[0], sa[1]) };
    let (kb, n) = if a.trans_b { (sb[1], sb[0]) } else { (sb[0], sb[1]) };
    if k != kb {
        return Err(OpReason::Shape(format!(
            "Gemm inner dimensions differ: A {sa:?} (transA={}) and B {sb:?} (transB={})",
            a.trans_a as u8, a.trans_b as u8
        )));
    }
    Ok((m, k, n))
}

fn check_f32(x: &Input<'_>, what: &str) -> OpResult<()> {
    if !x.dtype.is_float() {
        return Err(OpReason::DType(format!(
            "{what} has element type {}; only floating-point inputs are supported",
            x.dtype
        )));
    }
    Ok(())
}

pub fn infer_gemm(a: &GemmAttrs, inputs: &[Option<Input<'_>>]) -> OpResult<Vec<(Vec<usize>, DType)>> {
    let ia = required(inputs, 0, "A")?;
    let ib = required(inputs, 1, "B")?;
    check_f32(ia, "A")?;
    check_f32(ib, "B")?;
    let (m, _, n) = gemm_dims(a, ia.shape, ib.shape)?;
    if let Some(Some(c)) = inputs.get(2) {
        check_f32(c, "C")?;
        if c.shape.len() > 2 || broadcast_shapes(c.shape, &[m, n]).ok().as_deref() != Some(&[m, n][..]) {
            return Err(OpReason::Shape(format!("Gemm C of shape {:?} does not broadcast to ({m}, {n})", c.shape)));
        }
    }
    Ok(f32_out(vec![m, n]))
}

/// MatMul's operand shapes with numpy's 1-D promotion: (batch dims of A, M, K), (batch of B, K, N).
fn matmul_dims(sa: &[usize], sb: &[usize]) -> OpResult<(Vec<usize>, usize, usize, usize)> {
    if sa.is_empty() || sb.is_empty() {
        return Err(OpReason::Shape(format!("MatMul operands must have rank 1 or more, got shapes {sa:?} and {sb:?}")));
    }
    let (a_batch, m, k) = match sa.len() {
        1 => (&sa[..0], 1, sa[0]),
        r => (&sa[..r - 2], sa[r - 2], sa[r - 1]),
    };
    let (b_batch, kb, n) = match sb.len() {
        1 => (&sb[..0], sb[0], 1),
        r => (&sb[..r - 2], sb[r - 2], sb[r - 1]),
    };
    if k != kb {
        return Err(OpReason::Shape(format!("MatMul inner dimensions differ: A {sa:?} and B {sb:?}")));
    }
    let batch = broadcast_shapes(a_batch, b_batch)
        .map_err(|_| OpReason::Shape(format!("MatMul batch dims of A {sa:?} and B {sb:?} do not broadcast")))?;
    Ok((batch, m, k, n))
}

pub fn infer_matmul(inputs: &[Option<Input<'_>>]) -> OpResult<Vec<(Vec<usize>, DType)>> {
    let ia = required(inputs, 0, "A")?;
    let ib = required(inputs, 1, "B")?;
    check_f32(ia, "A")?;
    check_f32(ib, "B")?;
    let (mut out, m, _, n) = matmul_dims(ia.shape, ib.shape)?;
    if ia.shape.len() > 1 {
        out.push(m);
    }
    if ib.shape.len() > 1 {
        out.push(n);
    }
    Ok(f32_out(out))
}

pub fn lower_gemm(attrs: &GemmAttrs, l: &mut Lowering) -> OpResult<()> {
    let a = l.input(0, "A")?.clone();
    let b = l.input(1, "B")?.clone();
    let out = l.output(0)?.buf;
    let (m, k, n) = gemm_dims(attrs, &a.shape, &b.shape)?;
    // Row-major A is [M, K] or, transposed, [K, M]; likewise B is [K, N] or [N, K].
    let (a_rs, a_cs) = if attrs.trans_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if attrs.trans_b { (1, k) } else { (n, 1) };
    // beta = 0 drops C entirely (as ONNX Runtime does), so an Inf or NaN in C cannot leak in.
    let c = match l.inputs.get(2).and_then(|x| x.as_ref()) {
        Some(c) if attrs.beta != 0.0 => {
            let s = broadcast_strides(&c.shape, &[m, n]);
            Some(Operand2d { buf: c.buf, row_stride: s[0], col_stride: s[1], batch_strides: vec![] })
        }
        _ => None,
    };
    GemmDispatch {
        m,
        n,
        k,
        batch_shape: vec![],
        a: Operand2d { buf: a.buf, row_stride: a_rs, col_stride: a_cs, batch_strides: vec![] },
        b: Operand2d { buf: b.buf, row_stride: b_rs, col_stride: b_cs, batch_strides: vec![] },
        c,
        alpha: attrs.alpha,
        beta: attrs.beta,
        out,
        accumulate: false,
    }
    .emit(l)
}

pub fn lower_matmul(l: &mut Lowering) -> OpResult<()> {
    let a = l.input(0, "A")?.clone();
    let b = l.input(1, "B")?.clone();
    let out = l.output(0)?.buf;
    let (batch, m, k, n) = matmul_dims(&a.shape, &b.shape)?;
    // Batch strides of a contiguous operand with batch dims `own` seen from the output's batch.
    let batch_strides = |shape: &[usize], own_rank: usize, mat: usize| -> Vec<usize> {
        broadcast_strides(&shape[..own_rank], &batch).into_iter().map(|s| s * mat).collect()
    };
    let a_rank = a.shape.len().saturating_sub(2);
    let b_rank = b.shape.len().saturating_sub(2);
    GemmDispatch {
        m,
        n,
        k,
        a: Operand2d {
            buf: a.buf,
            row_stride: k,
            col_stride: 1,
            batch_strides: batch_strides(&a.shape, a_rank, m * k),
        },
        b: Operand2d {
            buf: b.buf,
            row_stride: n,
            col_stride: 1,
            batch_strides: batch_strides(&b.shape, b_rank, k * n),
        },
        batch_shape: batch,
        c: None,
        alpha: 1.0,
        beta: 0.0,
        out,
        accumulate: false,
    }
    .emit(l)
}

// ------------------------------------------------------------------------------------------------
// Reverse pass
// ------------------------------------------------------------------------------------------------

/// A strided matrix view: element (i, j) of batch entry `b` sits at
/// `Σ b_d * batch_strides[d] + i * row_stride + j * col_stride`.
#[derive(Clone, Debug)]
struct View {
    buf: BufRef,
    row_stride: usize,
    col_stride: usize,
    batch_strides: Vec<usize>,
}

impl View {
    /// The transposed view: same bytes, swapped strides.
    fn t(&self) -> View {
        View { row_stride: self.col_stride, col_stride: self.row_stride, ..self.clone() }
    }

    fn operand(&self) -> Operand2d {
        Operand2d {
            buf: self.buf,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
            batch_strides: self.batch_strides.clone(),
        }
    }
}

/// `lhs @ rhs` (each `[rows, inner]` / `[inner, cols]` per batch entry), scaled by `alpha`, into
/// the contiguous `out`.
#[allow(clippy::too_many_arguments)]
fn product(
    b: &mut BackwardLowering,
    batch_shape: &[usize],
    rows: usize,
    cols: usize,
    inner: usize,
    lhs: &View,
    rhs: &View,
    alpha: f32,
    out: BufRef,
    accumulate: bool,
) -> OpResult<()> {
    GemmDispatch {
        m: rows,
        n: cols,
        k: inner,
        batch_shape: batch_shape.to_vec(),
        a: lhs.operand(),
        b: rhs.operand(),
        c: None,
        alpha,
        beta: 0.0,
        out,
        accumulate,
    }
    .emit_backward(b)
}

/// Sums the contiguous `src` of shape `full` over the dims where `target` (right-aligned to
/// `full`, unit or missing dims broadcast) is smaller, times `scale`, into `out` (of `target`'s
/// element count). The trailing `inner` elements of every entry are carried along unreduced, so
/// `full` lists only the dims that may be reduced.
fn reduce_broadcast(
    b: &mut BackwardLowering,
    src: BufRef,
    full: &[usize],
    target: &[usize],
    inner: usize,
    scale: f32,
    out: &GradInput,
) -> OpResult<()> {
    if target.len() > full.len() || full.len() > super::MAX_RANK {
        return Err(OpReason::Unsupported(format!(
            "gradient reduction from {full:?} to {target:?} is not supported (rank above {})",
            super::MAX_RANK
        )));
    }
    let lead = full.len() - target.len();
    let kept: Vec<usize> = (0..full.len()).map(|d| if d < lead { 1 } else { target[d - lead] }).collect();
    let reduced: Vec<usize> = full.iter().zip(&kept).map(|(&f, &k)| if k == f { 1 } else { f }).collect();
    if kept.iter().zip(full).any(|(&k, &f)| k != f && k != 1) {
        return Err(OpReason::Internal(format!("gradient reduction: {target:?} does not broadcast to {full:?}")));
    }
    let strides: Vec<usize> = contiguous_strides(full).into_iter().map(|s| s * inner).collect();
    let total = u32_checked(kept.iter().product::<usize>() * inner, "gradient size")?;
    let rcount = u32_checked(reduced.iter().product(), "reduction count")?;
    u32_checked(full.iter().product::<usize>() * inner, "reduction source size")?;
    let params = Params::new()
        .u32(total)
        .u32(u32_checked(inner, "inner size")?)
        .u32(full.len() as u32)
        .u32(rcount)
        .f32(scale)
        .vec8u(&to_u32s(&kept)?)
        .vec8u(&to_u32s(&reduced)?)
        .vec8u(&to_u32s(&strides)?);
    b.dispatch(
        KernelKey::new(Shader::Matmul, "reduce_broadcast").with("ACCUM", out.accumulate as i32),
        params,
        vec![src, out.buf],
        grid_1d(total as usize, 256),
    );
    Ok(())
}

fn check_grad_shape(g: &GradInput, want: &[usize], what: &str) -> OpResult<()> {
    if g.shape != want {
        return Err(OpReason::Internal(format!(
            "gradient buffer of {what} has shape {:?}, expected {want:?}",
            g.shape
        )));
    }
    Ok(())
}

/// Gemm's reverse pass. With op(A) [M, K], op(B) [K, N] and Y = alpha op(A) op(B) + beta C:
/// d op(A) = alpha dY op(B)ᵀ, d op(B) = alpha op(A)ᵀ dY, dC = beta dY summed over C's broadcast
/// dims. A transposed operand's gradient is the transposed product (dA = alpha op(B) dYᵀ when
/// transA), which costs nothing but swapped strides.
pub fn backward_gemm(attrs: &GemmAttrs, b: &mut BackwardLowering) -> OpResult<()> {
    let a = b.input(0, "A")?.clone();
    let bm = b.input(1, "B")?.clone();
    let dy = b.grad_output(0)?.clone();
    let (m, k, n) = gemm_dims(attrs, &a.shape, &bm.shape)?;
    if dy.shape != [m, n] {
        return Err(OpReason::Internal(format!("Gemm output gradient has shape {:?}, expected [{m}, {n}]", dy.shape)));
    }
    let (a_rs, a_cs) = if attrs.trans_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if attrs.trans_b { (1, k) } else { (n, 1) };
    let op_a = View { buf: a.buf, row_stride: a_rs, col_stride: a_cs, batch_strides: vec![] };
    let op_b = View { buf: bm.buf, row_stride: b_rs, col_stride: b_cs, batch_strides: vec![] };
    let dyv = View { buf: dy.buf, row_stride: n, col_stride: 1, batch_strides: vec![] };
    if let Some(g) = b.grad_input(0).cloned() {
        check_grad_shape(&g, &a.shape, "Gemm A")?;
        if attrs.trans_a {
            product(b, &[], k, m, n, &op_b, &dyv.t(), attrs.alpha, g.buf, g.accumulate)?;
        } else {
            product(b, &[], m, k, n, &dyv, &op_b.t(), attrs.alpha, g.buf, g.accumulate)?;
        }
    }
    if let Some(g) = b.grad_input(1).cloned() {
        check_grad_shape(&g, &bm.shape, "Gemm B")?;
        if attrs.trans_b {
            product(b, &[], n, k, m, &dyv.t(), &op_a, attrs.alpha, g.buf, g.accumulate)?;
        } else {
            product(b, &[], k, n, m, &op_a.t(), &dyv, attrs.alpha, g.buf, g.accumulate)?;
        }
    }
    if let Some(g) = b.grad_input(2).cloned() {
        let c = b.input(2, "C")?.clone();
        check_grad_shape(&g, &c.shape, "Gemm C")?;
        // beta = 0 drops C from the forward pass; `reduce_broadcast` then writes exact zeros.
        reduce_broadcast(b, dy.buf, &[m, n], &c.shape, 1, attrs.beta, &g)?;
    }
    Ok(())
}

/// MatMul's reverse pass: dA = dY @ Bᵀ, dB = Aᵀ @ dY per output batch entry (1-D operands
/// promoted as in the forward pass). An operand broadcast over batch dims gets the sum over those
/// dims: the per-entry products go to scratch and `reduce_broadcast` sums them in a fixed order,
/// except for the common weight case (a 2-D B times a batched A), where the batch dims simply
/// join the contraction: dB = A_flatᵀ @ dY_flat.
pub fn backward_matmul(b: &mut BackwardLowering) -> OpResult<()> {
    let a = b.input(0, "A")?.clone();
    let bm = b.input(1, "B")?.clone();
    let dy = b.grad_output(0)?.clone();
    let (batch, m, k, n) = matmul_dims(&a.shape, &bm.shape)?;
    let mut out_shape = batch.clone();
    if a.shape.len() > 1 {
        out_shape.push(m);
    }
    if bm.shape.len() > 1 {
        out_shape.push(n);
    }
    if dy.shape != out_shape {
        return Err(OpReason::Internal(format!(
            "MatMul output gradient has shape {:?}, expected {out_shape:?}",
            dy.shape
        )));
    }
    let entries: usize = batch.iter().product();
    let a_rank = a.shape.len().saturating_sub(2);
    let b_rank = bm.shape.len().saturating_sub(2);
    // An operand's own batch dims right-aligned to the output's (1 where it has none).
    let aligned = |shape: &[usize], own_rank: usize| -> Vec<usize> {
        let own = &shape[..own_rank];
        (0..batch.len())
            .map(|d| if d + own.len() >= batch.len() { own[d + own.len() - batch.len()] } else { 1 })
            .collect()
    };
    let a_batch = aligned(&a.shape, a_rank);
    let b_batch = aligned(&bm.shape, b_rank);
    let strides_of = |own: &[usize], mat: usize| -> Vec<usize> {
        broadcast_strides(own, &batch).into_iter().map(|s| s * mat).collect()
    };
    let av = View { buf: a.buf, row_stride: k, col_stride: 1, batch_strides: strides_of(&a_batch, m * k) };
    let bv = View { buf: bm.buf, row_stride: n, col_stride: 1, batch_strides: strides_of(&b_batch, k * n) };
    let dyv = View {
        buf: dy.buf,
        row_stride: n,
        col_stride: 1,
        batch_strides: contiguous_strides(&batch).into_iter().map(|s| s * m * n).collect(),
    };

    if let Some(g) = b.grad_input(0).cloned() {
        check_grad_shape(&g, &a.shape, "MatMul A")?;
        if a_batch == batch {
            product(b, &batch, m, k, n, &dyv, &bv.t(), 1.0, g.buf, g.accumulate)?;
        } else {
            let tmp = b.scratch((entries * m * k * 4) as u64);
            product(b, &batch, m, k, n, &dyv, &bv.t(), 1.0, tmp, false)?;
            reduce_broadcast(b, tmp, &batch, &a_batch, m * k, 1.0, &g)?;
        }
    }
    if let Some(g) = b.grad_input(1).cloned() {
        check_grad_shape(&g, &bm.shape, "MatMul B")?;
        if b_batch == batch {
            product(b, &batch, k, n, m, &av.t(), &dyv, 1.0, g.buf, g.accumulate)?;
        } else if b_batch.iter().all(|&d| d == 1) && a_batch == batch {
            // A and dY are contiguous [entries * M, K] and [entries * M, N].
            let a_flat = View { buf: a.buf, row_stride: k, col_stride: 1, batch_strides: vec![] };
            let dy_flat = View { buf: dy.buf, row_stride: n, col_stride: 1, batch_strides: vec![] };
            product(b, &[], k, n, entries * m, &a_flat.t(), &dy_flat, 1.0, g.buf, g.accumulate)?;
        } else {
            let tmp = b.scratch((entries * k * n * 4) as u64);
            product(b, &batch, k, n, m, &av.t(), &dyv, 1.0, tmp, false)?;
            reduce_broadcast(b, tmp, &batch, &b_batch, k * n, 1.0, &g)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_contiguous_batch_dims_and_keeps_broadcast_ones_apart() {
        // A [2, 3, 4, 5] walks both batch dims contiguously; B [3, 5, 6] broadcasts over the first.
        let (shape, strides) = merge_batch_dims(&[2, 3], &[vec![60, 20], vec![0, 30]]);
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(strides, vec![vec![60, 20], vec![0, 30]]);
        let (shape, strides) = merge_batch_dims(&[2, 1, 3, 4], &[vec![240, 0, 80, 20], vec![0, 0, 0, 0]]);
        assert_eq!(shape, vec![24]);
        assert_eq!(strides, vec![vec![20], vec![0]]);
    }

    #[test]
    fn numpy_promotion_of_1d_operands() {
        assert_eq!(matmul_dims(&[4], &[4]).unwrap(), (vec![], 1, 4, 1));
        assert_eq!(matmul_dims(&[2, 3, 4], &[4]).unwrap(), (vec![2], 3, 4, 1));
        assert_eq!(matmul_dims(&[4], &[2, 4, 5]).unwrap(), (vec![2], 1, 4, 5));
        assert!(matmul_dims(&[2, 3], &[4, 5]).is_err());
        assert!(matmul_dims(&[2, 3, 4], &[3, 4, 5]).is_err());
    }
}
