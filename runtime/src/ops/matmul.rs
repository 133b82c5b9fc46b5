//! Gemm and MatMul (`shaders/matmul.wgsl`).
//!
//! Both lower to one tiled kernel that computes `out[b] = alpha * A[b] @ B[b] + beta * C[b]` with
//! every operand addressed through strides: transposes swap strides, broadcast dims get stride 0,
//! and the output is contiguous. [`crate::ops::conv`] routes 1x1 convolutions here too, through
//! [`GemmDispatch`].

use super::{Attrs, BufRef, Input, Lowering, OpResult, broadcast_shapes, broadcast_strides, f32_out, required};
use crate::gpu::{KernelKey, Params, Shader};
use crate::tensor::DType;

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
    u32::try_from(v).map_err(|_| format!("{what} ({v}) exceeds the kernel's 32-bit indexing"))
}

impl GemmDispatch {
    /// Appends the dispatch to `l`.
    pub fn emit(&self, l: &mut Lowering) -> OpResult<()> {
        let mut strides = vec![self.a.batch_strides.clone(), self.b.batch_strides.clone()];
        if let Some(c) = &self.c {
            strides.push(c.batch_strides.clone());
        }
        if strides.iter().any(|s| s.len() != self.batch_shape.len()) {
            return Err("matmul: batch strides do not match the batch rank".into());
        }
        let (batch_shape, bs) = merge_batch_dims(&self.batch_shape, &strides);
        if batch_shape.len() > MAX_BATCH_DIMS {
            return Err(format!(
                "matmul batch shape {:?} needs {} independent batch dims after merging; the kernel supports {MAX_BATCH_DIMS}",
                self.batch_shape,
                batch_shape.len()
            ));
        }
        let batch: usize = batch_shape.iter().product();
        if batch > MAX_GROUPS {
            return Err(format!(
                "matmul batch of {batch} matrices exceeds the {MAX_GROUPS} workgroups of one dispatch"
            ));
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
            .vec4u(&to_u32s(&c_bs)?);
        l.dispatch(
            KernelKey::new(Shader::Matmul, "matmul_main").with("HAS_BIAS", self.c.is_some() as i32),
            params,
            vec![self.a.buf, self.b.buf, c.buf, self.out],
            [self.n.div_ceil(TILE) as u32, self.m.div_ceil(TILE) as u32, batch as u32],
        );
        Ok(())
    }
}

fn to_u32s(v: &[usize]) -> OpResult<Vec<u32>> {
    v.iter().map(|&x| u32_checked(x, "batch stride")).collect()
}

/// Gemm's A, B (and optional C) shapes into (M, K, N), checking they agree.
fn gemm_dims(a: &GemmAttrs, sa: &[usize], sb: &[usize]) -> OpResult<(usize, usize, usize)> {
    if sa.len() != 2 || sb.len() != 2 {
        return Err(format!("Gemm needs 2-D A and B, got shapes {sa:?} and {sb:?}"));
    }
    let (m, k) = if a.trans_a { (sa[1], sa[0]) } else { (sa[0], sa[1]) };
    let (kb, n) = if a.trans_b { (sb[1], sb[0]) } else { (sb[0], sb[1]) };
    if k != kb {
        return Err(format!(
            "Gemm inner dimensions differ: A {sa:?} (transA={}) and B {sb:?} (transB={})",
            a.trans_a as u8, a.trans_b as u8
        ));
    }
    Ok((m, k, n))
}

fn check_f32(x: &Input<'_>, what: &str) -> OpResult<()> {
    if !x.dtype.is_float() {
        return Err(format!("{what} has element type {}; only floating-point inputs are supported", x.dtype));
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
            return Err(format!("Gemm C of shape {:?} does not broadcast to ({m}, {n})", c.shape));
        }
    }
    Ok(f32_out(vec![m, n]))
}

/// MatMul's operand shapes with numpy's 1-D promotion: (batch dims of A, M, K), (batch of B, K, N).
fn matmul_dims(sa: &[usize], sb: &[usize]) -> OpResult<(Vec<usize>, usize, usize, usize)> {
    if sa.is_empty() || sb.is_empty() {
        return Err(format!("MatMul operands must have rank 1 or more, got shapes {sa:?} and {sb:?}"));
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
        return Err(format!("MatMul inner dimensions differ: A {sa:?} and B {sb:?}"));
    }
    let batch = broadcast_shapes(a_batch, b_batch)
        .map_err(|_| format!("MatMul batch dims of A {sa:?} and B {sb:?} do not broadcast"))?;
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
    }
    .emit(l)
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
