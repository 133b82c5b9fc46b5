//! Softmax and LogSoftmax (`shaders/softmax.wgsl`).
//!
//! Both opset semantics reduce to rows of `len` elements `inner` apart: from opset 13 a row runs
//! along the single axis (inner = product of the later dims); before 13 the input is coerced to
//! 2-D at `axis`, so a row is everything from `axis` on, contiguous (inner = 1).

use super::{Attrs, BackwardLowering, BufRef, Dispatch, Input, Lowering, OpReason, OpResult, norm_axis, required};
use crate::gpu::{KernelKey, Params, Shader, grid_1d};
use crate::tensor::DType;

/// Rows at least this long get a workgroup each instead of a thread.
const WORKGROUP_MIN: usize = 64;

#[derive(Clone, Debug, PartialEq)]
pub struct SoftmaxAttrs {
    pub axis: i64,
    pub log: bool,
    /// Opset < 13: coerce to 2-D at `axis` instead of normalising along that one axis.
    pub coerce_2d: bool,
}

impl SoftmaxAttrs {
    pub fn parse(op_type: &str, a: &Attrs<'_>, opset: i64) -> OpResult<SoftmaxAttrs> {
        a.only(&["axis"])?;
        let coerce_2d = opset < 13;
        Ok(SoftmaxAttrs {
            axis: a.int("axis", if coerce_2d { 1 } else { -1 })?,
            log: op_type == "LogSoftmax",
            coerce_2d,
        })
    }

    /// Whether the op normalises each sample's values together over an input of `shape`
    /// (`[N, C]` or `[N, C, 1, …, 1]`, the axis the classes): the softmax of a classifier's
    /// logits.
    pub fn normalises_rows(&self, shape: &[usize]) -> bool {
        let total: usize = shape.iter().product();
        matches!(self.layout(shape), Ok((outer, len, 1)) if shape.len() >= 2 && outer == shape[0] && outer * len == total)
    }

    /// (outer, len, inner): rows are `outer * inner`, each of `len` elements `inner` apart.
    fn layout(&self, shape: &[usize]) -> OpResult<(usize, usize, usize)> {
        let axis = norm_axis(self.axis, shape.len())?;
        let outer: usize = shape[..axis.min(shape.len())].iter().product();
        if self.coerce_2d {
            Ok((outer, shape[axis.min(shape.len())..].iter().product(), 1))
        } else {
            let len = shape.get(axis).copied().unwrap_or(1);
            Ok((outer, len, shape.get(axis + 1..).map_or(1, |s| s.iter().product())))
        }
    }
}

pub fn infer(a: &SoftmaxAttrs, inputs: &[Option<Input<'_>>]) -> OpResult<Vec<(Vec<usize>, DType)>> {
    let x = required(inputs, 0, "input")?;
    a.layout(x.shape)?;
    Ok(vec![(x.shape.to_vec(), x.dtype)])
}

pub fn lower(a: &SoftmaxAttrs, l: &mut Lowering) -> OpResult<()> {
    let x = l.input(0, "input")?.clone();
    let y = l.output(0)?.clone();
    let n = x.numel();
    if n > u32::MAX as usize {
        return Err(OpReason::TooLarge(format!("Softmax input has {n} elements, more than a 32-bit index covers")));
    }
    let (outer, len, inner) = a.layout(&x.shape)?;
    let rows = outer * inner;
    let params = Params::new().u32(rows as u32).u32(len as u32).u32(inner as u32);
    let key = |entry| KernelKey::new(Shader::Softmax, entry).with("LOG", a.log as i32);
    if len >= WORKGROUP_MIN {
        l.dispatch(key("softmax_wg_main"), params, vec![x.buf, y.buf], grid_1d(rows, 1));
    } else {
        l.dispatch(key("softmax_thread_main"), params, vec![x.buf, y.buf], grid_1d(rows, 256));
    }
    Ok(())
}

/// The row gradient from the saved output y: softmax dx = y (dy - Σ dy y); log-softmax
/// dx = dy - exp(y) Σ dy. Rows and kernels as in the forward.
pub fn backward(a: &SoftmaxAttrs, b: &mut BackwardLowering) -> OpResult<()> {
    let Some(gx) = b.grad_input(0).cloned() else { return Ok(()) };
    let dy = b.grad_output(0)?.clone();
    let y = b.output(0)?.clone();
    let n = y.numel();
    if n > u32::MAX as usize {
        return Err(OpReason::TooLarge(format!("Softmax input has {n} elements, more than a 32-bit index covers")));
    }
    if dy.shape != y.shape || gx.shape.iter().product::<usize>() != n {
        return Err(OpReason::Internal(format!(
            "Softmax gradient shapes disagree: Y {:?}, dY {:?}, dX {:?}",
            y.shape, dy.shape, gx.shape
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let (outer, len, inner) = a.layout(&y.shape)?;
    let rows = outer * inner;
    let params = Params::new().u32(rows as u32).u32(len as u32).u32(inner as u32);
    let key =
        |entry| KernelKey::new(Shader::Softmax, entry).with("LOG", a.log as i32).with("ACCUM", gx.accumulate as i32);
    let buffers = vec![y.buf, dy.buf, gx.buf];
    if len >= WORKGROUP_MIN {
        b.dispatch(key("softmax_backward_wg_main"), params, buffers, grid_1d(rows, 1));
    } else {
        b.dispatch(key("softmax_backward_thread_main"), params, buffers, grid_1d(rows, 256));
    }
    Ok(())
}

/// The `k` most probable classes of each of `rows` rows of `len` logits and their softmax
/// probabilities, written to `out` as [k class indices (as f32), k probabilities] per row
/// (`softmax_topk`; `k` is clamped to 1..=min(32, len)). What a stream's frame needs to read back.
pub fn top_k(logits: BufRef, out: BufRef, rows: usize, len: usize, k: usize) -> Dispatch {
    Dispatch {
        key: KernelKey::new(Shader::Softmax, "softmax_topk").with("LOG", 0),
        params: Params::new().u32(rows as u32).u32(len as u32).u32(1).u32(top_k_of(k, len) as u32),
        buffers: vec![logits, out],
        workgroups: grid_1d(rows, 1),
    }
}

/// The k [`top_k`] computes for a request of `k` over `len` classes.
pub fn top_k_of(k: usize, len: usize) -> usize {
    k.clamp(1, 32).min(len.max(1))
}
