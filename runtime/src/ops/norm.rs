//! BatchNormalization in inference form (`shaders/norm.wgsl`).
//!
//! The scale, bias, mean and variance stay in their own buffers and the kernel reads them on
//! every run: test-time adaptation rewrites those buffers on the GPU, so nothing here may fold
//! them into constants or into a neighbouring convolution's weights. A convolution right before
//! may still apply them in its write-out, reading the same buffers on every run
//! ([`super::conv::Tail`]); this pass then does not run.

use super::{Attrs, Input, Lowering, OpReason, OpResult, required};
use crate::gpu::{KernelKey, Params, Shader, grid_1d};
use crate::tensor::DType;

#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormAttrs {
    pub epsilon: f32,
}

impl BatchNormAttrs {
    /// `outputs` is the number of outputs the node declares.
    pub fn parse(a: &Attrs<'_>, outputs: usize) -> OpResult<BatchNormAttrs> {
        a.only(&["epsilon", "momentum", "spatial", "training_mode"])?;
        // In training mode Y is normalised with the batch's own statistics, not the running ones,
        // so treating it as inference would silently compute something else.
        if a.int("training_mode", 0)? != 0 {
            return Err(OpReason::Unsupported(format!(
                "BatchNormalization with training_mode=1 ({outputs} output(s) declared) normalises with batch \
                 statistics and updates running statistics; only inference (training_mode=0, one output Y) is supported"
            )));
        }
        // Before opset 14 the extra outputs (mean, var, saved_mean, saved_var) are what marks training mode.
        if outputs > 1 {
            return Err(OpReason::Unsupported(format!(
                "BatchNormalization declares {outputs} outputs: the running/saved statistics outputs exist only in \
                 training mode; only inference with the single output Y is supported"
            )));
        }
        let spatial = a.int("spatial", 1)?;
        if spatial != 1 {
            return Err(OpReason::Unsupported(format!(
                "BatchNormalization spatial={spatial} (per-activation statistics) is not supported; only spatial=1"
            )));
        }
        let epsilon = a.float("epsilon", 1e-5)?;
        if !(epsilon.is_finite() && epsilon >= 0.0) {
            return Err(OpReason::Attribute(format!(
                "BatchNormalization epsilon {epsilon} must be a finite non-negative number"
            )));
        }
        Ok(BatchNormAttrs { epsilon })
    }
}

/// Channel count of `x` (N, C, D1, ..., Dn) and the size of one channel's plane D1*...*Dn.
fn channels(x: &[usize]) -> OpResult<(usize, usize)> {
    if x.len() < 2 {
        return Err(OpReason::Shape(format!(
            "BatchNormalization input must have rank >= 2 (N, C, ...), got shape {x:?}"
        )));
    }
    Ok((x[1], x[2..].iter().product()))
}

pub fn infer(_a: &BatchNormAttrs, inputs: &[Option<Input<'_>>]) -> OpResult<Vec<(Vec<usize>, DType)>> {
    let x = required(inputs, 0, "X")?;
    let (c, _) = channels(x.shape)?;
    for (i, what) in [(1, "scale"), (2, "B"), (3, "input_mean"), (4, "input_var")] {
        let p = required(inputs, i, what)?;
        if p.shape != [c] {
            return Err(OpReason::Shape(format!(
                "{what} has shape {:?}, expected [{c}] (one value per channel)",
                p.shape
            )));
        }
        if !p.dtype.is_float() {
            return Err(OpReason::DType(format!("{what} is {}, expected a float tensor", p.dtype)));
        }
    }
    Ok(vec![(x.shape.to_vec(), x.dtype)])
}

pub fn lower(a: &BatchNormAttrs, l: &mut Lowering) -> OpResult<()> {
    let x = l.input(0, "X")?;
    let (xbuf, shape) = (x.buf, x.shape.clone());
    let (c, plane) = channels(&shape)?;
    let (scale, bias) = (l.input(1, "scale")?.buf, l.input(2, "B")?.buf);
    let (mean, var) = (l.input(3, "input_mean")?.buf, l.input(4, "input_var")?.buf);
    let y = l.output(0)?.buf;
    // Downlevel limits allow 4 storage buffers per kernel: the four parameters go in one, so the
    // parameter block can be a storage buffer too (norm.wgsl says why that matters).
    let packed = l.scratch(4 * c as u64 * 4);
    let pack = super::layout::gather(&[(scale, c), (bias, c), (mean, c)], packed, 0);
    l.dispatch(pack.key, pack.params, pack.buffers, pack.workgroups);
    let pack = super::layout::gather(&[(var, c)], packed, 3 * c);
    l.dispatch(pack.key, pack.params, pack.buffers, pack.workgroups);
    let n: usize = shape.iter().product();
    if n > u32::MAX as usize {
        return Err(OpReason::TooLarge(format!(
            "BatchNormalization input has {n} elements, more than a 32-bit index covers"
        )));
    }
    l.dispatch(
        KernelKey::new(Shader::Norm, "batchnorm_main"),
        Params::new().u32(n as u32).u32(c as u32).u32(plane as u32).f32(a.epsilon),
        vec![xbuf, packed, y],
        grid_1d(n, 256),
    );
    Ok(())
}
