//! Conv (`shaders/conv.wgsl`, and `shaders/matmul.wgsl` for 1x1).
//!
//! 1 to 3 spatial dims, groups, strides, dilations, explicit or automatic padding and an optional
//! bias. Each convolution takes one of three kernels, picked at lowering time from its shapes:
//!
//! | route | when | kernel |
//! |---|---|---|
//! | [`ConvRoute::Matmul`] | every kernel dim 1, stride 1, no padding | `matmul_main`: out\[n\] = W[Cout, Cin] @ X[n][Cin, P] + bias, batched over images (and groups) with weight batch stride 0 |
//! | [`ConvRoute::Depthwise`] | group == Cin > 1 (one input channel per output channel) | `conv_depthwise`: one invocation per output, K = kernel volume is too small to tile |
//! | [`ConvRoute::ImplicitGemm`] | everything else | `conv_gemm`: 64x64 output tiles per image and group, im2col gathered into workgroup memory on the fly |
//!
//! A forward-only plan may give a convolution a [`Tail`]: the BatchNormalization with fixed
//! statistics and the Relu or Clip that follow it, applied in the write-out of the same three
//! kernels (a depthwise one always on `conv_depthwise_plain`, its weights in the tail's block), so
//! their passes over the tensor do not run. `plan::lower_forward` finds the chains.
//!
//! The reverse pass ([`backward`]) produces only the data gradient dL/dX (weights are frozen during
//! adaptation) as a transposed convolution on the same three routes: `matmul_main` with W
//! transposed by its strides, `conv_depthwise_dx`, and `conv_gemm_dx`, an implicit GEMM per stride
//! phase that visits only the kernel taps reaching each input position.

use super::matmul::{GemmDispatch, Operand2d};
use super::pool::AutoPad;
use super::{Attrs, BackwardLowering, BufRef, Input, Lowering, OpReason, OpResult, required};
use crate::gpu::{KernelKey, Params, Shader, grid_1d};
use crate::tensor::{DType, Tensor};

/// Spatial dims the kernels handle (d, h, w).
const MAX_SPATIAL: usize = 3;
/// Most workgroups a dispatch may have in one dimension on every wgpu backend.
const MAX_GROUPS: usize = 65535;
/// Outputs per invocation of `conv_depthwise_rows` (conv.wgsl's `DW_RUN`).
const DW_RUN: usize = 4;

#[derive(Clone, Debug, PartialEq)]
pub struct ConvAttrs {
    pub auto_pad: AutoPad,
    /// Per spatial dim; `None` means all 1 (the rank is only known once W's shape is).
    pub dilations: Option<Vec<usize>>,
    pub group: usize,
    /// Checked against W's spatial dims; W is authoritative.
    pub kernel_shape: Option<Vec<usize>>,
    /// Begin pads of every spatial dim, then end pads (the ONNX order).
    pub pads: Option<Vec<usize>>,
    pub strides: Option<Vec<usize>>,
}

fn positive_list(a: &Attrs<'_>, name: &str) -> OpResult<Option<Vec<usize>>> {
    a.ints(name)?
        .map(|v| {
            v.iter()
                .map(|&x| usize::try_from(x).ok().filter(|&x| x > 0))
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| OpReason::Attribute(format!("Conv {name} {v:?} must be positive")))
        })
        .transpose()
}

impl ConvAttrs {
    pub fn parse(a: &Attrs<'_>) -> OpResult<ConvAttrs> {
        a.only(&["auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"])?;
        let auto_pad = match a.string("auto_pad", "NOTSET")?.as_str() {
            "NOTSET" => AutoPad::NotSet,
            "VALID" => AutoPad::Valid,
            "SAME_UPPER" => AutoPad::SameUpper,
            "SAME_LOWER" => AutoPad::SameLower,
            other => {
                return Err(OpReason::Attribute(format!(
                    "auto_pad '{other}' is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER"
                )));
            }
        };
        let group = a.int("group", 1)?;
        let group = usize::try_from(group)
            .ok()
            .filter(|&g| g > 0)
            .ok_or_else(|| OpReason::Attribute(format!("Conv group={group} must be positive")))?;
        let pads = a
            .ints("pads")?
            .map(|v| {
                v.iter()
                    .map(|&x| usize::try_from(x).ok())
                    .collect::<Option<Vec<usize>>>()
                    .ok_or_else(|| OpReason::Attribute(format!("Conv pads {v:?} must be non-negative")))
            })
            .transpose()?;
        if let Some(p) = &pads {
            if p.len() % 2 != 0 {
                return Err(OpReason::Attribute(format!(
                    "Conv pads has {} values; it needs a begin and an end per spatial dim",
                    p.len()
                )));
            }
            if auto_pad != AutoPad::NotSet && p.iter().any(|&x| x != 0) {
                return Err(OpReason::Attribute(
                    "Conv: explicit pads cannot be combined with auto_pad other than NOTSET".into(),
                ));
            }
        }
        Ok(ConvAttrs {
            auto_pad,
            dilations: positive_list(a, "dilations")?,
            group,
            kernel_shape: positive_list(a, "kernel_shape")?,
            pads,
            strides: positive_list(a, "strides")?,
        })
    }
}

/// Which kernel a convolution runs on (see the module table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvRoute {
    /// A 1x1, stride-1, unpadded convolution is a matrix product per image (and group).
    Matmul,
    /// One input channel per output channel: direct, one invocation per output.
    Depthwise,
    /// Tiled implicit GEMM, the general case.
    ImplicitGemm,
}

/// Everything the kernels need about one convolution, resolved from the shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvGeometry {
    pub batch: usize,
    pub cin: usize,
    pub cout: usize,
    pub group: usize,
    pub input: Vec<usize>,
    pub output: Vec<usize>,
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    /// (begin, end) per spatial dim.
    pub pads: Vec<(usize, usize)>,
}

impl ConvGeometry {
    /// Validates X [N, Cin, spatial...], W [Cout, Cin/group, kernel...] and the attributes.
    pub fn new(a: &ConvAttrs, x: &[usize], w: &[usize]) -> OpResult<ConvGeometry> {
        if x.len() < 3 {
            return Err(OpReason::Shape(format!(
                "Conv input X must have rank >= 3 (N, C, spatial...), got shape {x:?}"
            )));
        }
        let k = x.len() - 2;
        if k > MAX_SPATIAL {
            return Err(OpReason::Unsupported(format!(
                "Conv over {k} spatial dims is not supported (1 to {MAX_SPATIAL})"
            )));
        }
        if w.len() != x.len() {
            return Err(OpReason::Shape(format!("Conv weight W {w:?} must have the rank of X {x:?}")));
        }
        let (batch, cin, input) = (x[0], x[1], x[2..].to_vec());
        let (cout, cin_g, kernel) = (w[0], w[1], w[2..].to_vec());
        let g = a.group;
        // Checked: group, dilations and pads are data from the model file (found by
        // tools/fuzz.sh: group = 2^62 overflowed here).
        if cin_g.checked_mul(g) != Some(cin) {
            return Err(OpReason::Shape(format!(
                "Conv with group={g}: X has {cin} channels but W {w:?} expects {} (W[1] * group)",
                cin_g.checked_mul(g).map_or_else(|| "more than usize::MAX".to_string(), |n| n.to_string())
            )));
        }
        if cout % g != 0 {
            return Err(OpReason::Shape(format!(
                "Conv with group={g}: output channels W[0]={cout} are not divisible by the group count"
            )));
        }
        if kernel.contains(&0) {
            return Err(OpReason::Shape(format!("Conv weight W {w:?} has an empty kernel dim")));
        }
        if let Some(ks) = &a.kernel_shape
            && *ks != kernel
        {
            return Err(OpReason::Shape(format!(
                "Conv kernel_shape {ks:?} does not match the weight's spatial dims {kernel:?}"
            )));
        }
        let per_dim = |v: &Option<Vec<usize>>, name: &str| -> OpResult<Vec<usize>> {
            match v {
                None => Ok(vec![1; k]),
                Some(v) if v.len() == k => Ok(v.clone()),
                Some(v) => {
                    Err(OpReason::Shape(format!("Conv {name} {v:?} has {} values for {k} spatial dims", v.len())))
                }
            }
        };
        let strides = per_dim(&a.strides, "strides")?;
        let dilations = per_dim(&a.dilations, "dilations")?;
        let explicit = match &a.pads {
            None => vec![0; 2 * k],
            Some(p) if p.len() == 2 * k => p.clone(),
            Some(p) => {
                return Err(OpReason::Shape(format!(
                    "Conv pads {p:?} has {} values for {k} spatial dims (need {})",
                    p.len(),
                    2 * k
                )));
            }
        };
        let mut output = Vec::with_capacity(k);
        let mut pads = Vec::with_capacity(k);
        for d in 0..k {
            let (inp, s) = (input[d], strides[d]);
            let overflow = || {
                OpReason::TooLarge(format!(
                    "Conv window (kernel {}, dilation {}, pads {:?}) overflows in spatial dim {d}",
                    kernel[d],
                    dilations[d],
                    (explicit[d], explicit[d + k])
                ))
            };
            let extent =
                (kernel[d] - 1).checked_mul(dilations[d]).and_then(|e| e.checked_add(1)).ok_or_else(overflow)?;
            let (pb, pe) = a.auto_pad.resolve(inp, s, extent, (explicit[d], explicit[d + k]));
            let padded = inp.checked_add(pb).and_then(|p| p.checked_add(pe)).ok_or_else(overflow)?;
            if padded < extent {
                return Err(OpReason::TooLarge(format!(
                    "Conv window of extent {extent} (kernel {} dilation {}) exceeds the padded input size {padded} in spatial dim {d}",
                    kernel[d], dilations[d]
                )));
            }
            output.push((padded - extent) / s + 1);
            pads.push((pb, pe));
        }
        Ok(ConvGeometry { batch, cin, cout, group: g, input, output, kernel, strides, dilations, pads })
    }

    pub fn out_shape(&self) -> Vec<usize> {
        let mut s = vec![self.batch, self.cout];
        s.extend(&self.output);
        s
    }

    pub fn route(&self) -> ConvRoute {
        let pointwise = self.kernel.iter().all(|&k| k == 1)
            && self.strides.iter().all(|&s| s == 1)
            && self.pads.iter().all(|&(b, e)| b == 0 && e == 0);
        if self.group > 1 && self.group == self.cin {
            ConvRoute::Depthwise
        } else if pointwise {
            ConvRoute::Matmul
        } else {
            ConvRoute::ImplicitGemm
        }
    }
}

pub fn infer(a: &ConvAttrs, inputs: &[Option<Input<'_>>]) -> OpResult<Vec<(Vec<usize>, DType)>> {
    let x = required(inputs, 0, "X")?;
    let w = required(inputs, 1, "W")?;
    for (t, what) in [(x, "X"), (w, "W")] {
        if !t.dtype.is_float() {
            return Err(OpReason::DType(format!(
                "Conv {what} has element type {}; only floating-point inputs are supported",
                t.dtype
            )));
        }
    }
    let geo = ConvGeometry::new(a, x.shape, w.shape)?;
    if let Some(Some(b)) = inputs.get(2)
        && b.shape != [geo.cout]
    {
        return Err(OpReason::Shape(format!(
            "Conv bias B has shape {:?}, expected [{}] (one per output channel)",
            b.shape, geo.cout
        )));
    }
    Ok(vec![(geo.out_shape(), x.dtype)])
}

/// Left-pads per-dim values to the kernels' 3 spatial dims.
fn lanes3(v: &[usize], fill: usize) -> OpResult<Vec<u32>> {
    let mut out = vec![fill as u32; MAX_SPATIAL - v.len()];
    for &x in v {
        out.push(u32::try_from(x).map_err(|_| OpReason::TooLarge(format!("Conv dimension {x} exceeds 32 bits")))?);
    }
    Ok(out)
}

fn check_u32(what: &str, n: usize) -> OpResult<u32> {
    u32::try_from(n).map_err(|_| {
        OpReason::TooLarge(format!("Conv {what} has {n} elements, more than the kernels' 32-bit indexing covers"))
    })
}

/// The depthwise kernels' grid: `per_image` invocations (flat, as [`grid_1d`]) per image, one
/// image per z workgroup, so that a paced step can split the dispatch along the batch.
fn per_image_grid(per_image: usize, batch: usize) -> OpResult<[u32; 3]> {
    if batch > MAX_GROUPS {
        return Err(OpReason::TooLarge(format!(
            "a depthwise Conv on a batch of {batch} exceeds the {MAX_GROUPS} workgroups of one dispatch"
        )));
    }
    let [x, y, _] = grid_1d(per_image, 256);
    Ok([x, y, batch.max(1) as u32])
}

/// The activation of a fused [`Tail`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TailAct {
    None,
    Relu,
    /// Clip to [min, max] (ONNX Runtime's comparisons: a NaN bound bounds nothing).
    Clip {
        min: f32,
        max: f32,
    },
}

/// What follows a convolution and runs in its write-out instead of as passes of its own
/// (`shaders/activation.wgsl`): BatchNormalization with fixed statistics, then a Relu or Clip.
/// The BatchNormalization parameters stay in their own buffers and are read on every run, so an
/// adapted scale, bias or statistic is used as it is; nothing is folded into the weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Tail {
    /// The BatchNormalization's scale, B, mean and var buffers, and its epsilon.
    pub bn: Option<([BufRef; 4], f32)>,
    pub act: TailAct,
}

impl Tail {
    /// The `FUSE_BN` and `FUSE_ACT` overrides.
    fn overrides(&self) -> (i32, i32) {
        let act = match self.act {
            TailAct::None => 0,
            TailAct::Relu => 1,
            TailAct::Clip { .. } => 2,
        };
        (self.bn.is_some() as i32, act)
    }
}

/// The constants of a fused tail's block for this convolution, [eps, lo, hi, 0, bias (Cout), the
/// depthwise weights], or `None` where the convolution cannot take a tail: a grouped 1x1
/// convolution (its rows are not the output channels), a bias or a depthwise weight (it travels
/// in the block) that is not a constant. `bias`: `None` without one, `Some(None)` for one computed
/// at run time.
pub fn tail_constants(
    a: &ConvAttrs,
    x: &[usize],
    w: &[usize],
    w_value: Option<&Tensor>,
    bias: Option<Option<&Tensor>>,
    bn_eps: Option<f32>,
    act: TailAct,
) -> Option<Vec<f32>> {
    let geo = ConvGeometry::new(a, x, w).ok()?;
    let route = geo.route();
    if route == ConvRoute::Matmul && geo.group > 1 {
        return None;
    }
    let (lo, hi) = match act {
        TailAct::Clip { min, max } => (min, max),
        _ => (0.0, 0.0),
    };
    let mut block = vec![bn_eps.unwrap_or(0.0), lo, hi, 0.0];
    match bias {
        Some(b) => block.extend(b?.to_f32_vec()),
        None => block.extend(std::iter::repeat_n(0.0, geo.cout)),
    }
    if route == ConvRoute::Depthwise {
        block.extend(w_value?.to_f32_vec());
    }
    Some(block)
}

pub fn lower(a: &ConvAttrs, l: &mut Lowering) -> OpResult<()> {
    lower_with_tail(a, l, None)
}

/// [`lower`] with a fused tail whose constants ([`tail_constants`]) are in `consts`.
pub fn lower_with_tail(a: &ConvAttrs, l: &mut Lowering, tail: Option<(&Tail, BufRef)>) -> OpResult<()> {
    let x = l.input(0, "X")?.clone();
    let w = l.input(1, "W")?.clone();
    let bias = l.inputs.get(2).and_then(|b| b.clone());
    let y = l.output(0)?.buf;
    let geo = ConvGeometry::new(a, &x.shape, &w.shape)?;
    // The tail's block: the BatchNormalization parameters packed ahead of the constants (every
    // run: adaptation rewrites them), or the constants alone.
    let tail = match tail {
        None => None,
        Some((t, consts)) => {
            let block = match t.bn {
                None => consts,
                Some(([scale, b, mean, var], _)) => {
                    let c = geo.cout;
                    let len = match geo.route() {
                        ConvRoute::Depthwise => 4 + c + w.numel(),
                        _ => 4 + c,
                    };
                    let packed = l.scratch((4 * c + len) as u64 * 4);
                    for d in [
                        super::layout::gather(&[(scale, c), (b, c), (mean, c)], packed, 0),
                        super::layout::gather(&[(var, c), (consts, len)], packed, 3 * c),
                    ] {
                        l.dispatches.push(d);
                    }
                    packed
                }
            };
            Some((t.overrides(), block))
        }
    };
    check_u32("input", x.numel())?;
    check_u32("weight", w.numel())?;
    let total = check_u32("output", geo.out_shape().iter().product())?;
    let g = geo.group;
    let (cin_g, cout_g) = (geo.cin / g, geo.cout / g);
    let p: usize = geo.output.iter().product();
    let kvol: usize = geo.kernel.iter().product();

    if geo.route() == ConvRoute::Matmul {
        // Batch dims (image, group): W's group g is rows g*cout_g.., X's is channels g*cin_g..;
        // the output [N, G, cout_g, P] is exactly [N, Cout, P].
        let gemm = GemmDispatch {
            m: cout_g,
            n: p,
            k: cin_g,
            batch_shape: vec![geo.batch, g],
            a: Operand2d { buf: w.buf, row_stride: cin_g, col_stride: 1, batch_strides: vec![0, cout_g * cin_g] },
            b: Operand2d { buf: x.buf, row_stride: p, col_stride: 1, batch_strides: vec![geo.cin * p, cin_g * p] },
            c: bias.as_ref().map(|b| Operand2d {
                buf: b.buf,
                row_stride: 1,
                col_stride: 0,
                batch_strides: vec![0, cout_g],
            }),
            alpha: 1.0,
            beta: 1.0,
            out: y,
            accumulate: false,
        };
        let Some(((bn, act), block)) = tail else {
            return gemm.emit(l);
        };
        if g > 1 {
            return Err(OpReason::Internal("a grouped 1x1 convolution cannot take a fused tail".into()));
        }
        let mut d = gemm.build()?;
        // The block in C's binding; the kernel finds the bias in it (HAS_BIAS as set).
        d.buffers[2] = block;
        d.key = d.key.with("FUSE_BN", bn).with("FUSE_ACT", act);
        l.dispatches.push(d);
        return Ok(());
    }

    let begin: Vec<usize> = geo.pads.iter().map(|p| p.0).collect();
    let pads: Vec<i32> = lanes3(&begin, 0)?.into_iter().map(|v| v as i32).collect();
    if pads.iter().any(|&v| v < 0) {
        return Err(OpReason::TooLarge(format!("Conv pads {begin:?} exceed the kernels' 31-bit range")));
    }
    let params = Params::new()
        .u32(g as u32)
        .u32(cin_g as u32)
        .u32(cout_g as u32)
        .u32(check_u32("im2col depth (Cin/group * kernel volume)", cin_g * kvol)?)
        .u32(p as u32)
        .u32(geo.cin as u32)
        .u32(geo.cout as u32)
        .u32(total)
        .vec4u(&lanes3(&geo.input, 1)?)
        .z_base_in_last_word()
        .vec4u(&lanes3(&geo.output, 1)?)
        .vec4u(&lanes3(&geo.kernel, 1)?)
        .vec4u(&lanes3(&geo.strides, 1)?)
        .vec4u(&lanes3(&geo.dilations, 1)?)
        .vec4i(&pads)
        .work_hint(&[geo.batch, geo.cout, p, cin_g, kvol]);
    // Without a bias the binding still has to hold a buffer: W is read-only in this dispatch too.
    let bias_buf = bias.as_ref().map(|b| b.buf).unwrap_or(w.buf);
    let (entry, groups) = match geo.route() {
        ConvRoute::Depthwise => ("conv_depthwise", per_image_grid(geo.cout * p, geo.batch)?),
        _ => {
            let z = geo.batch * g;
            if z > MAX_GROUPS {
                return Err(OpReason::TooLarge(format!(
                    "Conv batch {} x group {g} = {z} exceeds the {MAX_GROUPS} workgroups of one dispatch",
                    geo.batch
                )));
            }
            (
                "conv_gemm",
                [p.div_ceil(super::matmul::TILE) as u32, cout_g.div_ceil(super::matmul::TILE) as u32, z as u32],
            )
        }
    };
    // The plain depthwise kernel, or on a CPU adapter its variant with a run of outputs per
    // invocation (conv.wgsl's conv_depthwise_rows) and its own grid.
    let plain = || -> OpResult<(&'static str, [u32; 3])> {
        if !l.cpu_kernels {
            return Ok(("conv_depthwise_plain", groups));
        }
        let rows: usize = geo.output[..geo.output.len() - 1].iter().product();
        let runs = geo.output[geo.output.len() - 1].div_ceil(DW_RUN);
        Ok(("conv_depthwise_rows", per_image_grid(geo.cout * rows * runs, geo.batch)?))
    };
    if let Some(((bn, act), block)) = tail {
        // The block replaces the bias: the depthwise weights travel in it too, so the plain
        // kernel (parameters read in place) serves every fused depthwise convolution.
        let (entry, buffers, groups) = match entry {
            "conv_depthwise" => {
                let (entry, groups) = plain()?;
                (entry, vec![x.buf, block, y], groups)
            }
            _ => (entry, vec![x.buf, w.buf, block, y], groups),
        };
        l.dispatch(
            KernelKey::new(Shader::Conv, entry)
                .with("HAS_BIAS", bias.is_some() as i32)
                .with("DIMS", geo.input.len() as i32)
                .with("FUSE_BN", bn)
                .with("FUSE_ACT", act),
            params,
            buffers,
            groups,
        );
        return Ok(());
    }
    // A depthwise convolution without a bias binds three buffers and reads its parameters in place
    // (conv.wgsl's conv_depthwise_plain says why).
    if entry == "conv_depthwise" && bias.is_none() {
        let (entry, groups) = plain()?;
        l.dispatch(
            KernelKey::new(Shader::Conv, entry).with("DIMS", geo.input.len() as i32),
            params,
            vec![x.buf, w.buf, y],
            groups,
        );
        return Ok(());
    }
    l.dispatch(
        KernelKey::new(Shader::Conv, entry)
            .with("HAS_BIAS", bias.is_some() as i32)
            .with("DIMS", geo.input.len() as i32),
        params,
        vec![x.buf, w.buf, bias_buf, y],
        groups,
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Reverse pass
// ------------------------------------------------------------------------------------------------

/// Conv's reverse pass: the data gradient dL/dX, a transposed convolution of dY with the frozen
/// weight. The route mirrors the forward one:
///
/// | forward route | dX kernel |
/// |---|---|
/// | [`ConvRoute::Matmul`] | `matmul_main` with W transposed by its strides: dX[n, g] = W\[g\]ᵀ @ dY[n, g] |
/// | [`ConvRoute::Depthwise`] | `conv_depthwise_dx`: one invocation per input element, visiting only the taps that reach it |
/// | [`ConvRoute::ImplicitGemm`] | `conv_gemm_dx`: per image, group and stride phase, dX[ci, x] = Σ W[co, ci, tap] dY[co, o(x, tap)] as a tiled GEMM |
///
/// Only X's gradient exists: W and B are frozen during adaptation, so a request for theirs is an
/// error rather than a silently missing update.
pub fn backward(a: &ConvAttrs, b: &mut BackwardLowering) -> OpResult<()> {
    for (i, what) in [(1, "weight W"), (2, "bias B")] {
        if b.grad_input(i).is_some() {
            return Err(OpReason::Internal(format!(
                "Conv: a gradient for the {what} was requested, but weight gradients are not supported \
                 (Conv weights are frozen; only the data gradient dL/dX flows through Conv)"
            )));
        }
    }
    let Some(gx) = b.grad_input(0).cloned() else {
        return Ok(());
    };
    // X's values are not needed (W is frozen), only its shape.
    let x_shape = b.input(0, "X")?.shape.clone();
    let w = b.input(1, "W")?.clone();
    let dy = b.grad_output(0)?.clone();
    let geo = ConvGeometry::new(a, &x_shape, &w.shape)?;
    if dy.shape != geo.out_shape() {
        return Err(OpReason::Internal(format!(
            "Conv output gradient has shape {:?}, expected {:?}",
            dy.shape,
            geo.out_shape()
        )));
    }
    if gx.shape != x_shape {
        return Err(OpReason::Internal(format!(
            "Conv input gradient buffer has shape {:?}, expected {x_shape:?}",
            gx.shape
        )));
    }
    let total = check_u32("input", x_shape.iter().product())?;
    check_u32("weight", w.numel())?;
    check_u32("output", dy.numel())?;
    let g = geo.group;
    let (cin_g, cout_g) = (geo.cin / g, geo.cout / g);
    let p_in: usize = geo.input.iter().product();
    let p_out: usize = geo.output.iter().product();

    if geo.route() == ConvRoute::Matmul {
        // dX[n, g] [cin_g, P] = W[g]ᵀ [cin_g, cout_g] @ dY[n, g] [cout_g, P]; W[g] is row-major
        // [cout_g, cin_g], so its transpose walks rows with stride 1 and columns with stride cin_g.
        return GemmDispatch {
            m: cin_g,
            n: p_in,
            k: cout_g,
            batch_shape: vec![geo.batch, g],
            a: Operand2d { buf: w.buf, row_stride: 1, col_stride: cin_g, batch_strides: vec![0, cout_g * cin_g] },
            b: Operand2d {
                buf: dy.buf,
                row_stride: p_out,
                col_stride: 1,
                batch_strides: vec![geo.cout * p_out, cout_g * p_out],
            },
            c: None,
            alpha: 1.0,
            beta: 0.0,
            out: gx.buf,
            accumulate: gx.accumulate,
        }
        .emit_backward(b);
    }

    let begin: Vec<usize> = geo.pads.iter().map(|p| p.0).collect();
    let pads: Vec<i32> = lanes3(&begin, 0)?.into_iter().map(|v| v as i32).collect();
    if pads.iter().any(|&v| v < 0) {
        return Err(OpReason::TooLarge(format!("Conv pads {begin:?} exceed the kernels' 31-bit range")));
    }
    let phases: usize = geo.strides.iter().product();
    let params = Params::new()
        .u32(g as u32)
        .u32(cin_g as u32)
        .u32(cout_g as u32)
        .u32(geo.cin as u32)
        .u32(geo.cout as u32)
        .u32(p_in as u32)
        .u32(p_out as u32)
        .u32(total)
        .u32(check_u32("stride phases", phases)?)
        .vec4u(&lanes3(&geo.input, 1)?)
        .z_base_in_last_word()
        .vec4u(&lanes3(&geo.output, 1)?)
        .vec4u(&lanes3(&geo.kernel, 1)?)
        .vec4u(&lanes3(&geo.strides, 1)?)
        .vec4u(&lanes3(&geo.dilations, 1)?)
        .vec4i(&pads)
        .work_hint(&[geo.batch, geo.cout, p_out, cin_g, geo.kernel.iter().product()]);
    let (entry, groups) = match geo.route() {
        // On a CPU adapter a run of input positions per invocation (conv.wgsl's
        // conv_depthwise_dx_rows).
        ConvRoute::Depthwise if b.cpu_kernels => {
            let rows: usize = geo.input[..geo.input.len() - 1].iter().product();
            let runs = geo.input[geo.input.len() - 1].div_ceil(DW_RUN);
            ("conv_depthwise_dx_rows", per_image_grid(geo.cin * rows * runs, geo.batch)?)
        }
        ConvRoute::Depthwise => ("conv_depthwise_dx", per_image_grid(geo.cin * p_in, geo.batch)?),
        _ => {
            // Input positions split into stride phases (x + pad ≡ r mod s per dim); each phase
            // only meets the taps with tap * dilation ≡ r, so no tap is visited in vain.
            let z = geo.batch * g * phases;
            if z > MAX_GROUPS {
                return Err(OpReason::TooLarge(format!(
                    "Conv reverse pass: batch {} x group {g} x stride phases {phases} = {z} exceeds the \
                     {MAX_GROUPS} workgroups of one dispatch",
                    geo.batch
                )));
            }
            let widest: usize = geo.input.iter().zip(&geo.strides).map(|(&i, &s)| i.div_ceil(s)).product();
            let tile = super::matmul::TILE;
            let (tiles_x, tiles_y) = (widest.div_ceil(tile), cin_g.div_ceil(tile));
            if tiles_x.max(tiles_y) > MAX_GROUPS {
                return Err(OpReason::TooLarge(format!(
                    "Conv reverse pass: {widest} positions per phase exceed one dispatch"
                )));
            }
            ("conv_gemm_dx", [tiles_x as u32, tiles_y as u32, z as u32])
        }
    };
    let mut key = KernelKey::new(Shader::Conv, entry).with("ACCUM", gx.accumulate as i32);
    if entry.starts_with("conv_depthwise_dx") && geo.strides.iter().all(|&s| s == 1) {
        key = key.with("UNIT_STRIDE", 1);
    }
    b.dispatch(key, params, vec![dy.buf, w.buf, gx.buf], groups);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::Attr;
    use std::collections::BTreeMap;

    fn parse(kv: &[(&str, Attr)]) -> OpResult<ConvAttrs> {
        let m: BTreeMap<String, Attr> = kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        ConvAttrs::parse(&Attrs::new(&m))
    }

    #[test]
    fn same_padding_splits_odd_totals_by_auto_pad() {
        let up =
            parse(&[("auto_pad", Attr::String("SAME_UPPER".into())), ("strides", Attr::Ints(vec![2, 2]))]).unwrap();
        let g = ConvGeometry::new(&up, &[1, 1, 6, 7], &[1, 1, 4, 3]).unwrap();
        assert_eq!(g.output, vec![3, 4]);
        // dim 0: total = 2*2 + 4 - 6 = 2; dim 1: total = 3*2 + 3 - 7 = 2.
        assert_eq!(g.pads, vec![(1, 1), (1, 1)]);
        let lo = parse(&[("auto_pad", Attr::String("SAME_LOWER".into()))]).unwrap();
        let g = ConvGeometry::new(&lo, &[1, 1, 5], &[1, 1, 2]).unwrap();
        assert_eq!((g.output.clone(), g.pads.clone()), (vec![5], vec![(1, 0)]));
        let up = parse(&[("auto_pad", Attr::String("SAME_UPPER".into()))]).unwrap();
        assert_eq!(ConvGeometry::new(&up, &[1, 1, 5], &[1, 1, 2]).unwrap().pads, vec![(0, 1)]);
    }

    #[test]
    fn routes_by_shape() {
        let plain = parse(&[]).unwrap();
        let g = ConvGeometry::new(&plain, &[2, 8, 5, 5], &[4, 8, 1, 1]).unwrap();
        assert_eq!(g.route(), ConvRoute::Matmul);
        let strided = parse(&[("strides", Attr::Ints(vec![2, 2]))]).unwrap();
        assert_eq!(ConvGeometry::new(&strided, &[2, 8, 5, 5], &[4, 8, 1, 1]).unwrap().route(), ConvRoute::ImplicitGemm);
        let dw = parse(&[("group", Attr::Int(8))]).unwrap();
        assert_eq!(ConvGeometry::new(&dw, &[2, 8, 5, 5], &[16, 1, 3, 3]).unwrap().route(), ConvRoute::Depthwise);
        let grouped = parse(&[("group", Attr::Int(2))]).unwrap();
        assert_eq!(ConvGeometry::new(&grouped, &[2, 8, 5, 5], &[4, 4, 3, 3]).unwrap().route(), ConvRoute::ImplicitGemm);
    }

    #[test]
    fn rejects_inconsistent_shapes_and_attributes() {
        let plain = parse(&[]).unwrap();
        assert!(ConvGeometry::new(&plain, &[1, 3, 5, 5], &[4, 2, 3, 3]).unwrap_err().to_string().contains("channels"));
        let ks = parse(&[("kernel_shape", Attr::Ints(vec![2, 2]))]).unwrap();
        assert!(ConvGeometry::new(&ks, &[1, 3, 5, 5], &[4, 3, 3, 3]).unwrap_err().to_string().contains("kernel_shape"));
        assert!(ConvGeometry::new(&plain, &[1, 3, 2, 2], &[4, 3, 3, 3]).unwrap_err().to_string().contains("exceeds"));
        assert!(
            ConvGeometry::new(&plain, &[1, 1, 2, 2, 2, 2], &[1, 1, 1, 1, 1, 1])
                .unwrap_err()
                .to_string()
                .contains("spatial")
        );
        assert!(parse(&[("auto_pad", Attr::String("SAME".into()))]).is_err());
        assert!(parse(&[("group", Attr::Int(0))]).is_err());
        assert!(parse(&[("auto_pad", Attr::String("VALID".into())), ("pads", Attr::Ints(vec![1, 1]))]).is_err());
    }
}
