//! The start-up self-test: a tiny golden network run on the GPU against a CPU reference.
//!
//! Phone GPU drivers miscompile kernels more often than desktop ones (Adreno's private-array
//! indexing and SPIR-V-dependent pipeline bugs, see docs/mobile.md), and a wrong result there is
//! silent. The self-test runs Conv → BatchNormalization → Relu → GlobalAveragePool → Flatten →
//! Gemm → Softmax on a fixed input, every intermediate a graph output, plus one TENT step (SGD on
//! the BatchNormalization scale and bias, batch statistics), and compares each stage with a
//! straightforward f64 implementation here. An app that gets an error refuses the GPU (or falls
//! back to its own path) instead of adapting with wrong numbers.
//!
//! It costs a few milliseconds on a GPU (one small engine and one session, 2×2×5×5 input) and a
//! second or so on lavapipe, so it is opt-in: [`GpuContext::self_test`], or `[gpu] self_test =
//! true` in the config of a session or stream.

use crate::adapt::config::AdaptConfig;
use crate::adapt::session::Session;
use crate::gpu::{GpuContext, GpuError};
use crate::onnx::proto;
use crate::{Engine, Model, Tensor};

/// What the self-test compared: each stage and its largest error relative to the reference's
/// largest magnitude.
#[derive(Clone, Debug, PartialEq)]
pub struct SelfTestReport {
    /// The adapter it ran on.
    pub adapter: String,
    /// `(stage, max |gpu − cpu| / max(max |cpu|, 1e-2))` in the order they ran.
    pub stages: Vec<(String, f64)>,
    /// The tolerance every stage met.
    pub tolerance: f64,
}

/// f32 kernels against f64 arithmetic: rounding stays near 1e-6 here; a broken kernel is off by
/// far more than this.
pub const TOLERANCE: f64 = 1e-4;

const N: usize = 2;
const C_IN: usize = 2;
const C: usize = 3;
const HW: usize = 5;
const K: usize = 4;
const EPS: f64 = 1e-5;
const LR: f64 = 0.5;

/// Deterministic values in [lo, hi): a fixed linear congruential sequence, so the golden inputs
/// are the same on every machine.
fn golden(n: usize, seed: u32, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            // 24 bits, exact in f32.
            lo + (hi - lo) * ((s >> 8) as f32 / (1u32 << 24) as f32)
        })
        .collect()
}

struct Golden {
    x: Vec<f32>,
    conv_w: Vec<f32>,
    conv_b: Vec<f32>,
    scale: Vec<f32>,
    bias: Vec<f32>,
    mean: Vec<f32>,
    var: Vec<f32>,
    gemm_w: Vec<f32>,
    gemm_b: Vec<f32>,
}

impl Golden {
    fn new() -> Golden {
        Golden {
            x: golden(N * C_IN * HW * HW, 1, -1.0, 1.0),
            conv_w: golden(C * C_IN * 9, 2, -0.5, 0.5),
            conv_b: golden(C, 3, -0.2, 0.2),
            scale: golden(C, 4, 0.5, 1.5),
            bias: golden(C, 5, -0.3, 0.3),
            mean: golden(C, 6, -0.2, 0.2),
            var: golden(C, 7, 0.5, 1.5),
            gemm_w: golden(K * C, 8, -1.0, 1.0),
            gemm_b: golden(K, 9, -0.1, 0.1),
        }
    }

    /// The network with every stage a graph output (`stages`), or ending at the logits, the one
    /// output a session adapts on.
    fn model(&self, stages: bool) -> crate::Result<Model> {
        use prost::Message;
        let vi = crate::onnx::float_value_info;
        let init = |name: &str, dims: &[i64], v: &[f32]| proto::TensorProto {
            name: Some(name.into()),
            dims: dims.to_vec(),
            data_type: Some(1),
            float_data: v.to_vec(),
            ..Default::default()
        };
        let ints = |name: &str, v: &[i64]| proto::AttributeProto {
            name: Some(name.into()),
            r#type: Some(proto::attribute_proto::AttributeType::Ints as i32),
            ints: v.to_vec(),
            ..Default::default()
        };
        let int = |name: &str, v: i64| proto::AttributeProto {
            name: Some(name.into()),
            r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
            i: Some(v),
            ..Default::default()
        };
        let node = |op: &str, name: &str, inputs: &[&str], output: &str, attribute: Vec<proto::AttributeProto>| {
            proto::NodeProto {
                op_type: Some(op.into()),
                name: Some(name.into()),
                input: inputs.iter().map(|s| s.to_string()).collect(),
                output: vec![output.into()],
                attribute,
                ..Default::default()
            }
        };
        let (n, c, k, hw) = (N as i64, C as i64, K as i64, HW as i64);
        let bytes = proto::ModelProto {
            ir_version: Some(8),
            opset_import: vec![proto::OperatorSetIdProto { domain: Some(String::new()), version: Some(13) }],
            graph: Some(proto::GraphProto {
                name: Some("acclimate-self-test".into()),
                node: [
                    node("Conv", "conv", &["x", "conv.w", "conv.b"], "conv", vec![ints("pads", &[1, 1, 1, 1])]),
                    node(
                        "BatchNormalization",
                        "bn",
                        &["conv", "bn.weight", "bn.bias", "bn.mean", "bn.var"],
                        "bn",
                        vec![],
                    ),
                    node("Relu", "relu", &["bn"], "relu", vec![]),
                    node("GlobalAveragePool", "pool", &["relu"], "pool", vec![]),
                    node("Flatten", "flatten", &["pool"], "flat", vec![]),
                    node("Gemm", "gemm", &["flat", "fc.w", "fc.b"], "logits", vec![int("transB", 1)]),
                    node("Softmax", "softmax", &["logits"], "probs", vec![int("axis", 1)]),
                ]
                .into_iter()
                .take(if stages { 7 } else { 6 })
                .collect(),
                initializer: vec![
                    init("conv.w", &[c, C_IN as i64, 3, 3], &self.conv_w),
                    init("conv.b", &[c], &self.conv_b),
                    init("bn.weight", &[c], &self.scale),
                    init("bn.bias", &[c], &self.bias),
                    init("bn.mean", &[c], &self.mean),
                    init("bn.var", &[c], &self.var),
                    init("fc.w", &[k, c], &self.gemm_w),
                    init("fc.b", &[k], &self.gemm_b),
                ],
                input: vec![vi("x", &[n, C_IN as i64, hw, hw])],
                output: if stages {
                    vec![
                        vi("probs", &[n, k]),
                        vi("conv", &[n, c, hw, hw]),
                        vi("bn", &[n, c, hw, hw]),
                        vi("relu", &[n, c, hw, hw]),
                        vi("pool", &[n, c, 1, 1]),
                        vi("logits", &[n, k]),
                    ]
                } else {
                    vec![vi("logits", &[n, k])]
                },
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec();
        Model::from_bytes(&bytes)
    }
}

/// The CPU reference of every stage, in f64.
struct Reference {
    conv: Vec<f64>,
    bn: Vec<f64>,
    relu: Vec<f64>,
    pool: Vec<f64>,
    logits: Vec<f64>,
    probs: Vec<f64>,
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn conv(g: &Golden) -> Vec<f64> {
    let (x, w) = (f64s(&g.x), f64s(&g.conv_w));
    let mut y = vec![0.0; N * C * HW * HW];
    for n in 0..N {
        for co in 0..C {
            for oy in 0..HW {
                for ox in 0..HW {
                    let mut s = g.conv_b[co] as f64;
                    for ci in 0..C_IN {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) = (oy as isize + ky as isize - 1, ox as isize + kx as isize - 1);
                                if iy < 0 || ix < 0 || iy >= HW as isize || ix >= HW as isize {
                                    continue;
                                }
                                s += x[((n * C_IN + ci) * HW + iy as usize) * HW + ix as usize]
                                    * w[((co * C_IN + ci) * 3 + ky) * 3 + kx];
                            }
                        }
                    }
                    y[((n * C + co) * HW + oy) * HW + ox] = s;
                }
            }
        }
    }
    y
}

/// The rest of the network from the convolution's output, normalising with `mean`/`var` and the
/// affine `scale`/`bias`.
fn head(g: &Golden, conv: Vec<f64>, stats: (&[f64], &[f64]), affine: (&[f64], &[f64])) -> Reference {
    let plane = HW * HW;
    let bn: Vec<f64> = conv
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = (i / plane) % C;
            (v - stats.0[c]) / (stats.1[c] + EPS).sqrt() * affine.0[c] + affine.1[c]
        })
        .collect();
    let relu: Vec<f64> = bn.iter().map(|&v| v.max(0.0)).collect();
    let pool: Vec<f64> =
        (0..N * C).map(|i| relu[i * plane..(i + 1) * plane].iter().sum::<f64>() / plane as f64).collect();
    let mut logits = vec![0.0; N * K];
    for n in 0..N {
        for k in 0..K {
            logits[n * K + k] =
                g.gemm_b[k] as f64 + (0..C).map(|c| pool[n * C + c] * g.gemm_w[k * C + c] as f64).sum::<f64>();
        }
    }
    let mut probs = vec![0.0; N * K];
    for n in 0..N {
        let row = &logits[n * K..(n + 1) * K];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
        for k in 0..K {
            probs[n * K + k] = (row[k] - m).exp() / s;
        }
    }
    Reference { conv, bn, relu, pool, logits, probs }
}

/// One TENT step (mean entropy of the softmax, batch statistics, plain SGD on the BN scale and
/// bias): the logits it reports (before the update), its loss and the updated parameters.
fn tent_step(g: &Golden) -> (Vec<f64>, f64, Vec<f64>, Vec<f64>) {
    let conv = conv(g);
    let plane = HW * HW;
    let m = (N * plane) as f64;
    let mut mean = vec![0.0; C];
    let mut var = vec![0.0; C];
    for (i, &v) in conv.iter().enumerate() {
        mean[(i / plane) % C] += v / m;
    }
    for (i, &v) in conv.iter().enumerate() {
        let c = (i / plane) % C;
        var[c] += (v - mean[c]) * (v - mean[c]) / m;
    }
    let (scale, bias) = (f64s(&g.scale), f64s(&g.bias));
    let r = head(g, conv.clone(), (&mean, &var), (&scale, &bias));
    // L = mean_i H_i, H_i = -Σ p log p; dL/dz_ij = -p_ij (log p_ij + H_i) / N.
    let mut loss = 0.0;
    let mut dz = [0.0; N * K];
    for n in 0..N {
        let p = &r.probs[n * K..(n + 1) * K];
        let h: f64 = -p.iter().map(|&v| v * v.ln()).sum::<f64>();
        loss += h / N as f64;
        for k in 0..K {
            dz[n * K + k] = -p[k] * (p[k].ln() + h) / N as f64;
        }
    }
    let (mut dscale, mut dbias) = (vec![0.0; C], vec![0.0; C]);
    for (i, &x) in conv.iter().enumerate() {
        let (n, c) = (i / (C * plane), (i / plane) % C);
        if r.bn[i] <= 0.0 {
            continue;
        }
        let dpool: f64 = (0..K).map(|k| dz[n * K + k] * g.gemm_w[k * C + c] as f64).sum();
        let dy = dpool / plane as f64;
        dscale[c] += dy * (x - mean[c]) / (var[c] + EPS).sqrt();
        dbias[c] += dy;
    }
    let new_scale = (0..C).map(|c| scale[c] - LR * dscale[c]).collect();
    let new_bias = (0..C).map(|c| bias[c] - LR * dbias[c]).collect();
    (r.logits, loss, new_scale, new_bias)
}

/// max |got − want| / max(max |want|, 1e-2) for one stage, or the error naming it when that is
/// over `tolerance` (or a value is not finite, or the sizes differ).
pub fn compare_stage(stage: &str, got: &[f32], want: &[f64], tolerance: f64) -> Result<f64, GpuError> {
    if got.len() != want.len() {
        return Err(GpuError::SelfTest {
            stage: stage.to_string(),
            detail: format!("{} values, the reference has {}", got.len(), want.len()),
        });
    }
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-2);
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g as f64 - w).abs();
        // A NaN or an infinity is always the worst.
        let e = if e.is_finite() { e } else { f64::INFINITY };
        if e > worst.0 {
            worst = (e, i);
        }
    }
    let rel = worst.0 / scale;
    if rel > tolerance {
        return Err(GpuError::SelfTest {
            stage: stage.to_string(),
            detail: format!(
                "max error {rel:.3e} relative (> {tolerance:.0e}) at element {}: GPU {} vs CPU {:.6e}",
                worst.1, got[worst.1], want[worst.1]
            ),
        });
    }
    Ok(rel)
}

/// Runs the self-test; `perturb` names a stage whose CPU reference is moved (tests only: it must
/// then fail on that stage).
pub(crate) fn run(ctx: &GpuContext, perturb: Option<&str>) -> crate::Result<SelfTestReport> {
    let g = Golden::new();
    let model = g.model(true)?;
    let x = Tensor::f32(vec![N, C_IN, HW, HW], g.x.clone());
    let mut stages = Vec::new();
    let mut check = |stage: &str, got: &[f32], mut want: Vec<f64>| -> crate::Result<()> {
        if perturb == Some(stage) {
            want[0] += 0.5;
        }
        stages.push((stage.to_string(), compare_stage(stage, got, &want, TOLERANCE)?));
        Ok(())
    };
    // Inference: the stored statistics.
    let outs = Engine::new(ctx, model).run(std::slice::from_ref(&x))?;
    let r = head(&g, conv(&g), (&f64s(&g.mean), &f64s(&g.var)), (&f64s(&g.scale), &f64s(&g.bias)));
    let names = ["softmax", "conv", "batchnorm", "relu", "global pool", "gemm"];
    let wants = [r.probs, r.conv, r.bn, r.relu, r.pool, r.logits];
    if outs.len() != names.len() {
        return Err(crate::Error::Gpu(GpuError::SelfTest {
            stage: "outputs".into(),
            detail: format!("{} graph outputs, expected {}", outs.len(), names.len()),
        }));
    }
    // Stage order, so the first wrong stage is the one named.
    for i in [1, 2, 3, 4, 5, 0] {
        check(names[i], &outs[i].to_f32_vec(), wants[i].clone())?;
    }
    // One TENT step: the logits under batch statistics, the loss and the updated parameters.
    let config = AdaptConfig::from_toml_str(&format!(
        "[adapt]\nmethod = \"tent\"\n[optimizer]\nkind = \"sgd\"\nlr = {LR}\nmomentum = 0.0\n"
    ))?;
    let mut session = Session::new(ctx, g.model(false)?, config)?;
    let step = session.step(&x)?;
    let (logits, loss, scale, bias) = tent_step(&g);
    check("tent forward (batch statistics)", &step.logits.to_f32_vec(), logits)?;
    check("tent loss", &[step.loss.unwrap_or(f32::NAN)], vec![loss])?;
    let params = session.parameters()?;
    for (name, want) in [("bn.weight", scale), ("bn.bias", bias)] {
        let got = params.iter().find(|(n, _)| n == name).map(|(_, t)| t.to_f32_vec()).unwrap_or_default();
        check(&format!("tent step {name}"), &got, want)?;
    }
    Ok(SelfTestReport { adapter: ctx.adapter_summary(), stages, tolerance: TOLERANCE })
}

impl GpuContext {
    /// Runs the self-test on this context's GPU: a tiny golden network (convolution, batch
    /// normalization, ReLU, global pooling, Gemm, softmax) and one TENT gradient step, each
    /// stage compared with a CPU reference in f64. A GPU whose driver computes a stage wrong
    /// gives an error of kind [`crate::ErrorKind::Gpu`] that names the stage and its error.
    ///
    /// ```no_run
    /// let ctx = acclimate::GpuContext::new()?;
    /// let report = ctx.self_test()?; // Err: refuse this GPU
    /// println!("{} passed on {}", report.stages.len(), report.adapter);
    /// # Ok::<(), acclimate::Error>(())
    /// ```
    pub fn self_test(&self) -> crate::Result<SelfTestReport> {
        run(self, None)
    }

    /// Runs the self-test unless it already passed on this context (what `[gpu] self_test =
    /// true` in a session's or stream's config does before the session opens).
    pub fn self_test_once(&self) -> crate::Result<()> {
        let mut done = self.self_tested().lock().unwrap_or_else(|e| e.into_inner());
        if !*done {
            let report = run(self, None)?;
            log::info!("GPU self-test passed on {} ({} stages)", report.adapter, report.stages.len());
            *done = true;
        }
        Ok(())
    }

    /// The self-test with the CPU reference of `stage` moved, so that it must fail there: how
    /// tests check that the self-test can fail. Not for applications.
    #[doc(hidden)]
    pub fn self_test_perturbed(&self, stage: &str) -> crate::Result<SelfTestReport> {
        run(self, Some(stage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_off_by_more_than_the_tolerance_is_named() {
        let want = vec![1.0, -2.0, 0.5];
        assert!(compare_stage("gemm", &[1.0, -2.0, 0.5], &want, TOLERANCE).unwrap() == 0.0);
        let err = compare_stage("gemm", &[1.0, -2.001, 0.5], &want, TOLERANCE).unwrap_err().to_string();
        assert!(err.contains("gemm") && err.contains("element 1") && err.contains("5.000e-4"), "{err}");
        let err = compare_stage("relu", &[1.0, f32::NAN, 0.5], &want, TOLERANCE).unwrap_err().to_string();
        assert!(err.contains("relu") && err.contains("element 1"), "{err}");
        assert!(compare_stage("pool", &[1.0], &want, TOLERANCE).is_err());
    }

    #[test]
    fn the_cpu_reference_step_lowers_the_entropy() {
        // A step against the entropy's gradient lowers it (a check of the reference's signs).
        let mut g = Golden::new();
        let (_, before, scale, bias) = tent_step(&g);
        g.scale = scale.iter().map(|&v| v as f32).collect();
        g.bias = bias.iter().map(|&v| v as f32).collect();
        let (_, after, _, _) = tent_step(&g);
        assert!(after < before, "{after} !< {before}");
    }
}
