//! Forward-latency measurement of the GPU engine and the ONNX Runtime reference, in one run so
//! the numbers share a machine state.
//!
//! Besides latency every row reports the work done, so a number can be judged against the
//! adapter (JSON field names in brackets; they are stable):
//!
//! - **FLOPs and achieved GFLOP/s** [`flops`, `gflops`; with `--adapt`: `forward_flops`,
//!   `step_flops`, `forward_gflops`, `step_gflops`, and the split by op family in
//!   `*_flops_by_family`]: counted from the plan the GPU runs (`acclimate::ops::flops` has the
//!   convention: a multiply-add is 2 FLOPs, depthwise and grouped convolutions count only their
//!   taps, elementwise ops 1 per element, ...). A step counts what its program dispatches:
//!   forward with batch statistics, loss, the reverse pass through the layers that need it, the
//!   optimizer. GFLOP/s = FLOPs / median time.
//! - **The adapter's peak** [`peak_gflops`, details in `peak`]: a 1024³ MatMul through the same
//!   plan and kernel the models use (`shaders/matmul.wgsl`), after one warm-up run, timed as
//!   `peak.reps` runs recorded into one submit. Measured in the same run as the rows.
//! - **Dispatches** [`dispatches`; `forward_dispatches`, `step_dispatches`]: compute dispatches
//!   recorded per forward and per step.
//! - **Peak GPU memory** [`peak_bytes`; `forward_peak_bytes`, `step_peak_bytes`]: the bytes of
//!   the buffers the engine (forward) or the adaptation session (step) allocates: persistent
//!   buffers (weights, statistics, optimizer moments) plus the program's transient buffers
//!   (activations, saved tensors, gradients, scratch) after lifetime-based reuse. The uniform
//!   parameter buffer, readback staging buffers and the driver's own allocations are not counted.
//! - **Start** [`start.cold_ms`, `start.warm_ms`]: model load + plan + pipeline compilation of a
//!   fresh session (the step's plan too with `--adapt`), once with an empty pipeline cache and
//!   once with the cache the first start wrote (`acclimate::gpu` on the pipeline cache). Opening
//!   the device is not included. A driver's own shader cache (Mesa's
//!   `MESA_SHADER_CACHE_DISABLE`, NVIDIA's `__GL_SHADER_DISK_CACHE`) can make the cold start warm:
//!   disable it for an honest cold figure (`tools/bench_peers.sh` does).
//!
//! The GPU time is the whole [`Engine::run`]: input upload, one queue submit, and the blocking
//! readback of every output. That is what an application pays per call; timing the dispatches
//! alone would flatter the GPU on small batches where transfers dominate. Plans (pipelines,
//! buffers) are built before timing starts, as an application builds them once.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

use acclimate::engine::{Engine, Model};
use acclimate::error::Error;
use acclimate::gpu::GpuContext;
use acclimate::ir::Graph;
use acclimate::onnx::{self, DimSpec, ValueInfo};
use acclimate::ops::flops::FlopCount;
use acclimate::plan::profile::{Clock, Profile};
use acclimate::tensor::Tensor;

/// A backend that can be measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Acclimate's WGSL kernels through wgpu.
    Gpu,
    /// ONNX Runtime's CPU execution provider (feature `ort`).
    Ort,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Gpu => "gpu",
            Backend::Ort => "ort",
        })
    }
}

#[derive(Debug, Error)]
pub enum BenchError {
    #[error(transparent)]
    Model(#[from] Error),
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
    #[error("{0}")]
    Shape(String),
    #[error("{0}")]
    Config(String),
}

impl From<onnx::OnnxError> for BenchError {
    fn from(e: onnx::OnnxError) -> Self {
        BenchError::Model(e.into())
    }
}

impl From<acclimate::ir::IrError> for BenchError {
    fn from(e: acclimate::ir::IrError) -> Self {
        BenchError::Model(e.into())
    }
}

/// Summary of a latency sample, in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stats {
    pub iters: usize,
    pub median_ms: f64,
    pub p10_ms: f64,
    pub p90_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Sample standard deviation (n − 1); 0 for a single sample.
    pub stddev_ms: f64,
}

impl Stats {
    /// Summarises samples; `None` when there are none.
    pub fn from_samples(samples_ms: &[f64]) -> Option<Stats> {
        if samples_ms.is_empty() {
            return None;
        }
        let mut s = samples_ms.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        // Linear interpolation between closest ranks, so the median of an even sample is the mean
        // of the middle two.
        let q = |p: f64| {
            let x = p * (n - 1) as f64;
            let lo = x.floor() as usize;
            let hi = x.ceil() as usize;
            s[lo] + (s[hi] - s[lo]) * (x - lo as f64)
        };
        let mean = s.iter().sum::<f64>() / n as f64;
        let var = if n > 1 { s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
        Some(Stats {
            iters: n,
            median_ms: q(0.5),
            p10_ms: q(0.1),
            p90_ms: q(0.9),
            min_ms: s[0],
            max_ms: s[n - 1],
            mean_ms: mean,
            stddev_ms: var.sqrt(),
        })
    }
}

/// Calls `f` `warmup` times untimed, then `iters` times timed (at least once).
pub fn measure<E>(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<(), E>) -> Result<Stats, E> {
    for _ in 0..warmup {
        f()?;
    }
    let mut samples = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Stats::from_samples(&samples).unwrap_or_else(|| unreachable!("at least one sample was taken")))
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Runs of the peak GEMM timed in one submit; `None` skips the peak.
    pub peak_reps: Option<usize>,
    /// Measure cold and warm session start.
    pub start: bool,
    pub batches: Vec<usize>,
    pub backends: Vec<Backend>,
    pub warmup: usize,
    pub iters: usize,
    /// The non-batch dimensions of the input (e.g. `[3, 48, 192]`); required when the model
    /// declares any of them dynamic.
    pub shape: Option<Vec<usize>>,
    /// ONNX Runtime intra-op threads; `None` means one per logical core.
    pub ort_threads: Option<usize>,
    pub seed: u64,
    /// Time every dispatch alone this many times (GPU only; `None`: no profile).
    pub profile_runs: Option<usize>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            peak_reps: Some(DEFAULT_PEAK_REPS),
            start: true,
            batches: vec![1],
            backends: vec![Backend::Gpu, Backend::Ort],
            warmup: 3,
            iters: 20,
            shape: None,
            ort_threads: None,
            seed: 0x5eed,
            profile_runs: None,
        }
    }
}

/// One measured (backend, batch) pair.
#[derive(Clone, Debug, Serialize)]
pub struct BenchCase {
    pub backend: Backend,
    pub batch: usize,
    pub input_shape: Vec<usize>,
    pub stats: Stats,
    /// Samples per second at the median latency.
    pub throughput: f64,
    /// FLOPs of one forward pass, counted from the plan (the same count for every backend);
    /// `None` when only ONNX Runtime ran a model Acclimate cannot plan.
    pub flops: Option<u64>,
    pub flops_by_family: Option<FlopCount>,
    /// `flops` / median time.
    pub gflops: Option<f64>,
    /// Compute dispatches per forward (GPU only).
    pub dispatches: Option<usize>,
    /// Bytes of the buffers the engine allocated for this batch size: weights + activations
    /// after reuse (GPU only).
    pub peak_bytes: Option<u64>,
    /// Every dispatch timed alone (GPU, `--profile`).
    pub profile: Option<Profile>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub input: String,
    pub declared_shape: String,
    /// The adapter's name, backend and device type, when the GPU was measured.
    pub gpu_adapter: Option<String>,
    /// What the GPU time covers.
    pub gpu_timing: Option<String>,
    pub ort_threads: Option<usize>,
    pub warmup: usize,
    pub iters: usize,
    /// The adapter's measured GEMM GFLOP/s (see [`PeakGemm`]); `None` when not measured.
    pub peak_gflops: Option<f64>,
    pub peak: Option<PeakGemm>,
    pub start: Option<StartTimes>,
    pub cases: Vec<BenchCase>,
}

const GPU_TIMING: &str = "full Engine::run: input upload + one queue submit + blocking readback of the outputs";

fn dim_string(d: &DimSpec) -> String {
    match d {
        DimSpec::Fixed(n) => n.to_string(),
        DimSpec::Sym(s) => s.clone(),
        DimSpec::Unknown => "?".into(),
    }
}

/// The declared shape of a graph input, symbolic dimensions by name.
pub fn declared_shape(info: &ValueInfo) -> String {
    match &info.shape {
        Some(d) => format!("[{}]", d.iter().map(dim_string).collect::<Vec<_>>().join(", ")),
        None => "[unknown]".into(),
    }
}

/// The concrete input shape for `batch`: the first dimension is the batch; the others come from
/// `shape` or, when fixed, from the model's declaration.
pub fn input_shape(info: &ValueInfo, batch: usize, shape: Option<&[usize]>) -> Result<Vec<usize>, BenchError> {
    let name = &info.name;
    let Some(dims) = &info.shape else {
        return match shape {
            Some(s) => Ok(std::iter::once(batch).chain(s.iter().copied()).collect()),
            None => Err(BenchError::Shape(format!(
                "input '{name}' declares no shape; give its non-batch dimensions with --shape (e.g. --shape 3,224,224)"
            ))),
        };
    };
    let Some((first, rest)) = dims.split_first() else {
        return Err(BenchError::Shape(format!("input '{name}' is a scalar; there is no batch dimension to vary")));
    };
    if let DimSpec::Fixed(n) = first
        && *n as usize != batch
    {
        return Err(BenchError::Shape(format!(
            "input '{name}' {} fixes the batch dimension to {n}; batch {batch} cannot run",
            declared_shape(info)
        )));
    }
    let mut out = vec![batch];
    match shape {
        Some(s) => {
            if s.len() != rest.len() {
                return Err(BenchError::Shape(format!(
                    "--shape gives {} dimension(s) but input '{name}' {} has {} besides the batch",
                    s.len(),
                    declared_shape(info),
                    rest.len()
                )));
            }
            for (i, (d, &v)) in rest.iter().zip(s).enumerate() {
                if let DimSpec::Fixed(n) = d
                    && *n as usize != v
                {
                    return Err(BenchError::Shape(format!(
                        "--shape sets dimension {} of input '{name}' to {v}, but the model fixes it to {n}",
                        i + 1
                    )));
                }
            }
            out.extend_from_slice(s);
        }
        None => {
            for (i, d) in rest.iter().enumerate() {
                match d {
                    DimSpec::Fixed(n) => out.push(*n as usize),
                    _ => {
                        return Err(BenchError::Shape(format!(
                            "input '{name}' {} has dynamic dimension {} ('{}'); give the non-batch dimensions \
                             with --shape (e.g. --shape 3,48,192)",
                            declared_shape(info),
                            i + 1,
                            dim_string(d)
                        )));
                    }
                }
            }
        }
    }
    if out.contains(&0) {
        return Err(BenchError::Shape(format!("input '{name}': shape {out:?} has a zero dimension")));
    }
    Ok(out)
}

/// Deterministic inputs in [-2, 2), the range of normalised image values (SplitMix64).
pub fn random_input(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed;
    let data = (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            -2.0 + 4.0 * ((z >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect();
    Tensor::f32(shape.to_vec(), data)
}

/// The measured backends, opened once.
struct Runners {
    gpu: Option<Engine>,
    ort: Option<crate::reference::OrtSession>,
}

/// Measures every (batch, backend) pair of `cfg` on the model at `path`.
pub fn run(path: &Path, cfg: &BenchConfig) -> Result<BenchReport, BenchError> {
    if cfg.backends.is_empty() {
        return Err(BenchError::Config("--backend needs at least one of gpu, ort".into()));
    }
    let (raw, input, shapes) = load_for_bench(path, cfg)?;
    // ONNX Runtime alone still measures a model Acclimate cannot load; it just gets no FLOPs.
    let graph = match Graph::from_raw(raw) {
        Ok(g) => Some(Arc::new(g)),
        Err(e) if !cfg.backends.contains(&Backend::Gpu) => {
            log::warn!("bench: no FLOP count: {e}");
            None
        }
        Err(e) => return Err(e.into()),
    };

    let mut runners = Runners { gpu: None, ort: None };
    let mut gpu_adapter = None;
    let mut ctx_opened = None;
    // ONNX Runtime first: a missing library should fail before the GPU is opened.
    let ort_threads =
        if cfg.backends.contains(&Backend::Ort) { Some(open_ort(path, cfg, &mut runners)?) } else { None };
    let mut start = None;
    if cfg.backends.contains(&Backend::Gpu) {
        if cfg.start {
            start = Some(measure_start(path, &shapes[0], None)?);
        }
        let ctx = GpuContext::new()?;
        gpu_adapter = Some(ctx.adapter_summary());
        let graph = graph.clone().ok_or_else(|| BenchError::Config("the GPU needs the model's graph".into()))?;
        let model = Model { graph, path: Some(path.to_path_buf()) };
        runners.gpu = Some(Engine::new(&ctx, model));
        ctx_opened = Some(ctx);
    }

    let mut cases = Vec::new();
    for (&batch, shape) in cfg.batches.iter().zip(&shapes) {
        let x = random_input(shape, cfg.seed ^ batch as u64);
        let counted = match &graph {
            Some(g) => Some(acclimate::plan::forward_flops(g, std::slice::from_ref(shape)).map_err(Error::from)?),
            None => None,
        };
        for &backend in &cfg.backends {
            let (stats, dispatches, peak_bytes, profile) = match backend {
                Backend::Gpu => {
                    let Some(engine) = runners.gpu.as_mut() else {
                        continue;
                    };
                    let plan = engine.plan(std::slice::from_ref(shape))?;
                    let (dispatches, activations) = (plan.dispatch_count, plan.activation_bytes);
                    log::info!("bench: gpu batch {batch}: plan built, measuring");
                    let inputs = std::slice::from_ref(&x);
                    let stats = measure(cfg.warmup, cfg.iters, || engine.run(inputs).map(drop))?;
                    let profile = match cfg.profile_runs {
                        Some(runs) => {
                            let ctx = engine.context().clone();
                            let data = x.to_f32_vec();
                            let plan = engine.plan(std::slice::from_ref(shape))?;
                            Some(plan.profile(&ctx, &[&data], runs, None).map_err(Error::from)?)
                        }
                        None => None,
                    };
                    (stats, Some(dispatches), Some(engine.resident_bytes() + activations), profile)
                }
                Backend::Ort => match measure_ort(&mut runners, &x, cfg)? {
                    Some(stats) => (stats, None, None, None),
                    None => continue,
                },
            };
            let throughput = batch as f64 / (stats.median_ms / 1e3);
            cases.push(BenchCase {
                backend,
                batch,
                input_shape: shape.clone(),
                flops: counted.map(|c| c.total()),
                flops_by_family: counted,
                gflops: counted.map(|c| gflops(c.total(), stats.median_ms)),
                stats,
                throughput,
                dispatches,
                peak_bytes,
                profile,
            });
        }
    }
    let peak = match (&ctx_opened, cfg.peak_reps) {
        (Some(ctx), Some(reps)) => Some(peak_gemm(ctx, reps)?),
        _ => None,
    };
    Ok(BenchReport {
        model: path.display().to_string(),
        input: input.name.clone(),
        declared_shape: declared_shape(&input),
        gpu_timing: gpu_adapter.as_ref().map(|_| GPU_TIMING.to_string()),
        gpu_adapter,
        ort_threads,
        warmup: cfg.warmup,
        iters: cfg.iters.max(1),
        peak_gflops: peak.as_ref().map(|p| p.gflops),
        peak,
        start,
        cases,
    })
}

/// Decodes the model and resolves the input shape of every batch size before anything is
/// opened, so a bad `--batch` or `--shape` fails fast.
fn load_for_bench(path: &Path, cfg: &BenchConfig) -> Result<(onnx::RawModel, ValueInfo, Vec<Vec<usize>>), BenchError> {
    if cfg.batches.is_empty() || cfg.batches.contains(&0) {
        return Err(BenchError::Config("--batch needs one or more positive batch sizes".into()));
    }
    let raw = onnx::load_model(path)?;
    let input = match raw.graph.inputs.as_slice() {
        [one] => one.clone(),
        other => {
            return Err(BenchError::Config(format!(
                "bench feeds models with exactly one input; this one has {}",
                other.len()
            )));
        }
    };
    let shapes = cfg.batches.iter().map(|&b| input_shape(&input, b, cfg.shape.as_deref())).collect::<Result<_, _>>()?;
    Ok((raw, input, shapes))
}

/// Opens the ONNX Runtime session; returns its intra-op thread count.
fn open_ort(path: &Path, cfg: &BenchConfig, runners: &mut Runners) -> Result<usize, BenchError> {
    let threads = cfg.ort_threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let opts = crate::reference::OrtOptions { intra_threads: Some(threads), ..Default::default() };
    runners.ort = Some(crate::reference::OrtSession::with_options(path, opts)?);
    Ok(threads)
}

fn measure_ort(runners: &mut Runners, x: &Tensor, cfg: &BenchConfig) -> Result<Option<Stats>, BenchError> {
    let Some(session) = runners.ort.as_mut() else {
        return Ok(None);
    };
    let inputs = std::slice::from_ref(x);
    Ok(Some(measure(cfg.warmup, cfg.iters, || session.run(inputs).map(drop))?))
}

impl BenchReport {
    /// A human-readable table.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("model: {}\ninput: '{}' {}\n", self.model, self.input, self.declared_shape));
        if let Some(a) = &self.gpu_adapter {
            s.push_str(&format!("gpu: {a}\n     time = {GPU_TIMING}\n"));
        }
        if let Some(t) = self.ort_threads {
            s.push_str(&format!("ort: ONNX Runtime CPU execution provider, {t} intra-op thread(s)\n"));
        }
        s.push_str(&format!(
            "{} warm-up + {} timed iterations per row, random inputs in [-2, 2)\n",
            self.warmup, self.iters
        ));
        s.push_str(&header_lines(self.peak.as_ref(), self.start.as_ref()));
        s.push('\n');
        s.push_str(&format!(
            "{:<7} {:>5}  {:>10} {:>10} {:>10} {:>10} {:>10} {:>9}  {:>10} {:>9} {:>8} {:>7} {:>10} {:>9}\n",
            "backend",
            "batch",
            "median ms",
            "p10 ms",
            "p90 ms",
            "min ms",
            "max ms",
            "stddev",
            "samples/s",
            "GFLOP",
            "GFLOP/s",
            "% peak",
            "dispatches",
            "peak MiB"
        ));
        for c in &self.cases {
            let t = &c.stats;
            s.push_str(&format!(
                "{:<7} {:>5}  {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>9.3}  {:>10.1} {:>9} {:>8} {:>7} {:>10} {:>9}\n",
                c.backend.to_string(),
                c.batch,
                t.median_ms,
                t.p10_ms,
                t.p90_ms,
                t.min_ms,
                t.max_ms,
                t.stddev_ms,
                c.throughput,
                c.flops.map_or("-".into(), |f| format!("{:.3}", f as f64 / 1e9)),
                c.gflops.map_or("-".into(), |g| format!("{g:.2}")),
                pct(c.gflops.unwrap_or(0.0), self.peak_gflops.filter(|_| c.backend == Backend::Gpu && c.gflops.is_some())),
                c.dispatches.map_or("-".into(), |d| d.to_string()),
                c.peak_bytes.map_or("-".into(), |b| format!("{:.2}", mib(b))),
            ));
        }
        for c in &self.cases {
            if let Some(p) = &c.profile {
                s.push_str(&profile_table(&format!("forward, batch {}", c.batch), p, c.stats.median_ms));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(dims: Vec<DimSpec>) -> ValueInfo {
        ValueInfo { name: "x".into(), dtype: Some(acclimate::tensor::DType::F32), shape: Some(dims) }
    }

    #[test]
    fn stats_of_a_known_sample() {
        let s = Stats::from_samples(&[4.0, 1.0, 3.0, 2.0, 5.0]).unwrap();
        assert_eq!((s.median_ms, s.min_ms, s.max_ms, s.mean_ms), (3.0, 1.0, 5.0, 3.0));
        assert!((s.p10_ms - 1.4).abs() < 1e-12 && (s.p90_ms - 4.6).abs() < 1e-12, "{s:?}");
        assert!((s.stddev_ms - 2.5f64.sqrt()).abs() < 1e-12);
        assert_eq!(Stats::from_samples(&[2.0, 4.0]).unwrap().median_ms, 3.0);
        assert!(Stats::from_samples(&[]).is_none());
    }

    #[test]
    fn shapes_from_declaration_and_override() {
        let fixed = info(vec![DimSpec::Sym("N".into()), DimSpec::Fixed(3), DimSpec::Fixed(32), DimSpec::Fixed(32)]);
        assert_eq!(input_shape(&fixed, 4, None).unwrap(), vec![4, 3, 32, 32]);
        assert!(input_shape(&fixed, 4, Some(&[3, 32, 31])).unwrap_err().to_string().contains("fixes it to 32"));
        assert!(input_shape(&fixed, 4, Some(&[3, 32])).is_err());

        let ocr = info(vec![DimSpec::Unknown, DimSpec::Fixed(3), DimSpec::Sym("?".into()), DimSpec::Sym("?".into())]);
        let e = input_shape(&ocr, 1, None).unwrap_err().to_string();
        assert!(e.contains("--shape") && e.contains("dimension 2"), "{e}");
        assert_eq!(input_shape(&ocr, 8, Some(&[3, 48, 192])).unwrap(), vec![8, 3, 48, 192]);

        let batch1 = info(vec![DimSpec::Fixed(1), DimSpec::Fixed(10)]);
        assert!(input_shape(&batch1, 16, None).unwrap_err().to_string().contains("batch 16"));
    }

    #[test]
    fn random_input_is_deterministic_and_in_range() {
        let a = random_input(&[2, 3], 7);
        assert_eq!(a, random_input(&[2, 3], 7));
        assert_ne!(a, random_input(&[2, 3], 8));
        assert!(a.to_f32_vec().iter().all(|v| (-2.0..2.0).contains(v)));
    }
}

/// One batch size of an adaptation benchmark.
#[derive(Clone, Debug, Serialize)]
pub struct AdaptCase {
    pub batch: usize,
    /// The plain forward pass (source statistics), as in [`run`].
    pub forward: Stats,
    /// One adaptation step: forward with the method's statistics, loss, reverse pass, optimizer
    /// update, readback of logits and loss.
    pub step: Stats,
    pub step_over_forward: f64,
    /// FLOPs of one forward and of one step, as their programs dispatch them.
    pub forward_flops: u64,
    pub step_flops: u64,
    pub forward_flops_by_family: FlopCount,
    pub step_flops_by_family: FlopCount,
    /// FLOPs / median time.
    pub forward_gflops: f64,
    pub step_gflops: f64,
    pub forward_dispatches: usize,
    pub step_dispatches: usize,
    /// Bytes of every buffer the forward needs: the engine's weights plus its activations after
    /// reuse.
    pub forward_peak_bytes: u64,
    /// Bytes of every buffer the step needs: the session's persistent buffers plus the step's
    /// transient ones.
    pub step_peak_bytes: u64,
    /// Transient GPU memory of the step program (activations kept for the reverse pass,
    /// gradients, scratch) after lifetime-based reuse.
    pub step_transient_bytes: u64,
    /// Persistent buffers of the session (weights, statistics, optimizer state).
    pub resident_bytes: u64,
    /// Transient memory of the forward plan, for comparison.
    pub forward_transient_bytes: u64,
    /// Every dispatch of the forward and of the step timed alone (`--profile`).
    pub forward_profile: Option<Profile>,
    pub step_profile: Option<Profile>,
    /// Batch 1: a frame as frame mode predicts it (what a phone runs per frame).
    pub frame: Option<FrameCase>,
}

/// One frame predicted as the stream's frame mode does: the frame statistics
/// ([`acclimate::stream::policy::frame_stats`], window 16), the session's parameters, no step;
/// `Session::predict_with`, the logits read back (the stream reads only the top classes).
#[derive(Clone, Debug, Serialize)]
pub struct FrameCase {
    pub latency: Stats,
    pub dispatches: usize,
    pub profile: Option<Profile>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AdaptReport {
    pub model: String,
    pub method: String,
    pub gpu_adapter: String,
    /// The driver as the adapter names it (e.g. "llvmpipe" / "Mesa 25.0.7-...").
    pub gpu_driver: String,
    pub warmup: usize,
    pub iters: usize,
    pub peak_gflops: Option<f64>,
    pub peak: Option<PeakGemm>,
    pub start: Option<StartTimes>,
    pub cases: Vec<AdaptCase>,
}

/// Measures an adaptation method's step beside the forward pass on the GPU. Steps run on random
/// inputs with the method's defaults (tent: SGD, lr 2.5e-4, momentum 0.9).
pub fn run_adapt(path: &Path, method: acclimate::adapt::Method, cfg: &BenchConfig) -> Result<AdaptReport, BenchError> {
    use acclimate::adapt::Session;
    let (raw, _, shapes) = load_for_bench(path, cfg)?;
    let start = if cfg.start { Some(measure_start(path, &shapes[0], Some(method))?) } else { None };
    let graph = Arc::new(Graph::from_raw(raw)?);
    let ctx = GpuContext::new()?;
    let model = Model { graph, path: Some(path.to_path_buf()) };
    let mut engine = Engine::new(&ctx, model.clone());
    let mut session = Session::new(&ctx, model, adapt_config(method)).map_err(|e| BenchError::Config(e.to_string()))?;
    let cfg_err = |e: Error| BenchError::Config(e.to_string());
    let mut cases = Vec::new();
    for (&batch, shape) in cfg.batches.iter().zip(&shapes) {
        let x = random_input(shape, cfg.seed ^ batch as u64);
        let plan = engine.plan(std::slice::from_ref(shape))?;
        let (forward_transient_bytes, forward_dispatches, fwd_flops) =
            (plan.activation_bytes, plan.dispatch_count, plan.flops);
        let forward_peak_bytes = engine.resident_bytes() + forward_transient_bytes;
        let inputs = std::slice::from_ref(&x);
        let forward = measure(cfg.warmup, cfg.iters, || engine.run(inputs).map(drop))?;
        let (step_transient_bytes, step_dispatches) = session.step_footprint(shape).map_err(cfg_err)?;
        let step_flops = session.step_flops(shape).map_err(cfg_err)?;
        let step = measure(cfg.warmup, cfg.iters, || session.step(&x).map(drop)).map_err(cfg_err)?;
        let frame = if batch == 1 {
            let mode = acclimate::stream::policy::frame_stats(16);
            let latency =
                measure(cfg.warmup, cfg.iters, || session.predict_with(&x, mode).map(drop)).map_err(cfg_err)?;
            let dispatches = session.predict_dispatch_count(shape, mode).unwrap_or(0);
            let profile = match cfg.profile_runs {
                Some(runs) => Some(session.profile_predict(&x, mode, runs).map_err(cfg_err)?),
                None => None,
            };
            Some(FrameCase { latency, dispatches, profile })
        } else {
            None
        };
        let resident_bytes = session.resident_bytes();
        let (forward_profile, step_profile) = match cfg.profile_runs {
            Some(runs) => {
                let data = x.to_f32_vec();
                let plan = engine.plan(std::slice::from_ref(shape))?;
                let forward = plan.profile(&ctx, &[&data], runs, None).map_err(Error::from)?;
                (Some(forward), Some(session.profile_step(&x, runs).map_err(cfg_err)?))
            }
            None => (None, None),
        };
        cases.push(AdaptCase {
            batch,
            step_over_forward: step.median_ms / forward.median_ms,
            forward_flops: fwd_flops.total(),
            step_flops: step_flops.total(),
            forward_flops_by_family: fwd_flops,
            step_flops_by_family: step_flops,
            forward_gflops: gflops(fwd_flops.total(), forward.median_ms),
            step_gflops: gflops(step_flops.total(), step.median_ms),
            forward,
            step,
            forward_dispatches,
            step_dispatches,
            forward_peak_bytes,
            step_peak_bytes: resident_bytes + step_transient_bytes,
            step_transient_bytes,
            resident_bytes,
            forward_transient_bytes,
            forward_profile,
            step_profile,
            frame,
        });
    }
    let peak = match cfg.peak_reps {
        Some(reps) => Some(peak_gemm(&ctx, reps)?),
        None => None,
    };
    Ok(AdaptReport {
        model: path.display().to_string(),
        method: method.name().to_string(),
        gpu_adapter: ctx.adapter_summary(),
        gpu_driver: driver_string(&ctx),
        warmup: cfg.warmup,
        iters: cfg.iters.max(1),
        peak_gflops: peak.as_ref().map(|p| p.gflops),
        peak,
        start,
        cases,
    })
}

fn adapt_config(method: acclimate::adapt::Method) -> acclimate::adapt::AdaptConfig {
    let mut config = acclimate::adapt::AdaptConfig::default();
    config.adapt.method = method;
    config
}

impl AdaptReport {
    pub fn to_table(&self) -> String {
        let mut s = format!(
            "model: {}\nmethod: {}\ngpu: {} [{}]\n     forward = Engine::run; step = Session::step (forward, loss, reverse pass, optimizer, readback)\n{} warm-up + {} timed iterations per row\n",
            self.model, self.method, self.gpu_adapter, self.gpu_driver, self.warmup, self.iters
        );
        s.push_str(&header_lines(self.peak.as_ref(), self.start.as_ref()));
        s.push('\n');
        s.push_str(&format!(
            "{:>5}  {:>11} {:>11} {:>9}  {:>9} {:>9} {:>7} {:>7}  {:>9} {:>9}  {:>9} {:>9} {:>9} {:>9}\n",
            "batch",
            "forward ms",
            "step ms",
            "step/fwd",
            "fwd GF/s",
            "step GF/s",
            "fwd %pk",
            "stp %pk",
            "fwd disp",
            "step disp",
            "fwd MiB",
            "step MiB",
            "fwd GFLOP",
            "stp GFLOP"
        ));
        for c in &self.cases {
            s.push_str(&format!(
                "{:>5}  {:>11.3} {:>11.3} {:>9.2}  {:>9.3} {:>9.3} {:>7} {:>7}  {:>9} {:>9}  {:>9.2} {:>9.2} {:>9.4} {:>9.4}\n",
                c.batch,
                c.forward.median_ms,
                c.step.median_ms,
                c.step_over_forward,
                c.forward_gflops,
                c.step_gflops,
                pct(c.forward_gflops, self.peak_gflops),
                pct(c.step_gflops, self.peak_gflops),
                c.forward_dispatches,
                c.step_dispatches,
                mib(c.forward_peak_bytes),
                mib(c.step_peak_bytes),
                c.forward_flops as f64 / 1e9,
                c.step_flops as f64 / 1e9,
            ));
        }
        s.push_str(
            "\nMiB = every buffer the engine (forward) or session (step) allocates: weights, statistics and optimizer \
             state plus transient buffers after reuse\n",
        );
        for c in &self.cases {
            if let Some(f) = &c.frame {
                s.push_str(&format!(
                    "frame mode, one frame (frame statistics, no step; Session::predict_with): {:.3} ms median ({:.3} – {:.3} p10–p90), {} dispatches\n",
                    f.latency.median_ms, f.latency.p10_ms, f.latency.p90_ms, f.dispatches
                ));
            }
        }
        for c in &self.cases {
            if let Some(p) = &c.forward_profile {
                s.push_str(&profile_table(&format!("forward, batch {}", c.batch), p, c.forward.median_ms));
            }
            if let Some(p) = &c.step_profile {
                s.push_str(&profile_table(&format!("{} step, batch {}", self.method, c.batch), p, c.step.median_ms));
            }
            if let Some((p, f)) = c.frame.as_ref().and_then(|f| f.profile.as_ref().map(|p| (p, f))) {
                s.push_str(&profile_table("frame mode, one frame", p, f.latency.median_ms));
            }
        }
        s
    }
}

/// Kernels shown per profile table, and the slowest dispatches listed after them.
const PROFILE_KERNELS: usize = 12;
const PROFILE_SLOWEST: usize = 8;

/// A profile as text: its clock, the sum of its dispatches against the measured `run_ms`, the
/// kernels by time and the slowest dispatches.
pub fn profile_table(title: &str, p: &Profile, run_ms: f64) -> String {
    let clock = match p.clock {
        Clock::Timestamps => "GPU timestamps around each dispatch",
        Clock::Host => "host time around each dispatch submitted alone (submission overhead included)",
    };
    let total = p.total_ms();
    let mut s = format!(
        "\nprofile, {title}: {} dispatches, {total:.3} ms summed (the whole run: {run_ms:.3} ms); {clock}; median of {} run(s)\n",
        p.dispatches.len(),
        p.runs
    );
    s.push_str(&format!("  {:<44} {:>6} {:>11} {:>7} {:>9}\n", "kernel", "count", "ms", "share", "GFLOP/s"));
    let kernels = p.by_kernel();
    for k in kernels.iter().take(PROFILE_KERNELS) {
        s.push_str(&format!(
            "  {:<44} {:>6} {:>11.3} {:>6.1}% {:>9}\n",
            k.kernel,
            k.dispatches,
            k.ms,
            100.0 * k.share,
            k.gflops.map_or("-".into(), |g| format!("{g:.2}"))
        ));
    }
    if kernels.len() > PROFILE_KERNELS {
        let rest: f64 = kernels[PROFILE_KERNELS..].iter().map(|k| k.ms).sum();
        s.push_str(&format!(
            "  {:<44} {:>6} {:>11.3}\n",
            format!("{} other kernels", kernels.len() - PROFILE_KERNELS),
            "",
            rest
        ));
    }
    s.push_str("  slowest dispatches:\n");
    for d in p.slowest(PROFILE_SLOWEST) {
        s.push_str(&format!("  {:>11.3} ms  {} {:?}  {}\n", d.ms, d.kernel, d.workgroups, d.item));
    }
    s
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Achieved GFLOP/s of `flops` done in `ms`.
pub fn gflops(flops: u64, ms: f64) -> f64 {
    if ms > 0.0 { flops as f64 / (ms * 1e6) } else { 0.0 }
}

fn pct(gflops: f64, peak: Option<f64>) -> String {
    match peak {
        Some(p) if p > 0.0 => format!("{:.1}", 100.0 * gflops / p),
        _ => "-".into(),
    }
}

fn header_lines(peak: Option<&PeakGemm>, start: Option<&StartTimes>) -> String {
    let mut s = String::new();
    if let Some(p) = peak {
        s.push_str(&format!(
            "peak: {:.3} GFLOP/s ({}³ MatMul, {}, {} runs in one submit after a warm-up: {:.3} ms each)\n",
            p.gflops, p.n, p.kernel, p.reps, p.ms_per_gemm
        ));
    }
    if let Some(t) = start {
        s.push_str(&format!(
            "start (batch {}, {}): cold {:.1} ms, warm {:.1} ms; {} pipelines, {}\n",
            t.batch,
            t.covers,
            t.cold_ms,
            t.warm_ms,
            t.pipelines,
            if t.cache_supported {
                format!("pipeline cache {} bytes", t.cache_bytes)
            } else {
                "no pipeline cache on this backend".into()
            }
        ));
    }
    s
}

/// The driver as the adapter reports it.
pub fn driver_string(ctx: &GpuContext) -> String {
    match &ctx.adapter_info {
        Some(i) if i.driver_info.is_empty() => i.driver.clone(),
        Some(i) => format!("{} {}", i.driver, i.driver_info),
        None => "unknown".into(),
    }
}

/// Edge of the square MatMul that measures the adapter's peak.
pub const PEAK_N: usize = 1024;
pub const DEFAULT_PEAK_REPS: usize = 8;

/// The adapter's GEMM ceiling as Acclimate reaches it.
#[derive(Clone, Debug, Serialize)]
pub struct PeakGemm {
    pub gflops: f64,
    pub n: usize,
    /// Runs timed (recorded into one command buffer, one submit, one wait).
    pub reps: usize,
    pub ms_per_gemm: f64,
    /// Which kernel ran.
    pub kernel: String,
}

/// A graph of one MatMul `[n, n] @ [n, n]` with a constant right operand, as a model's Gemm or
/// 1×1 convolution would run.
fn gemm_graph(n: usize) -> Result<Graph, BenchError> {
    use acclimate::onnx::{RawGraph, RawModel, RawNode};
    use acclimate::tensor::DType;
    let b = random_input(&[n, n], 0xb);
    let info =
        |name: &str, shape: Option<Vec<DimSpec>>| ValueInfo { name: name.into(), dtype: Some(DType::F32), shape };
    let square = vec![DimSpec::Fixed(n as u64), DimSpec::Fixed(n as u64)];
    let raw = RawModel {
        ir_version: 8,
        opset: 17,
        producer: "acclimate bench".into(),
        graph: RawGraph {
            name: "peak_gemm".into(),
            nodes: vec![RawNode {
                name: "gemm".into(),
                op_type: "MatMul".into(),
                domain: String::new(),
                inputs: vec!["a".into(), "b".into()],
                outputs: vec!["y".into()],
                attrs: Default::default(),
            }],
            initializers: vec![("b".into(), b)],
            inputs: vec![info("a", Some(square.clone()))],
            outputs: vec![info("y", Some(square))],
        },
    };
    Ok(Graph::from_raw(raw)?)
}

/// Times a 1024³ MatMul through the plan (so through the kernel the models' MatMul, Gemm and 1×1
/// convolutions use), after checking a few entries against a CPU dot product so a broken kernel
/// cannot report a fast peak.
pub fn peak_gemm(ctx: &GpuContext, reps: usize) -> Result<PeakGemm, BenchError> {
    let n = PEAK_N;
    let reps = reps.max(1);
    let graph = gemm_graph(n)?;
    let b = match graph.initializers.get("b") {
        Some(t) => t.to_f32_vec(),
        None => return Err(BenchError::Config("peak GEMM: the constant operand is missing".into())),
    };
    let mut engine = Engine::new(ctx, Model::from_graph(graph));
    let a = random_input(&[n, n], 0xa);
    let y = engine.run(std::slice::from_ref(&a))?.remove(0).to_f32_vec();
    let av = a.to_f32_vec();
    for (i, j) in [(0, 0), (1, 517), (511, 3), (1023, 1023), (700, 64)] {
        let want: f64 = (0..n).map(|k| av[i * n + k] as f64 * b[k * n + j] as f64).sum();
        let got = y[i * n + j] as f64;
        if (got - want).abs() > 1e-3 * (1.0 + want.abs()) {
            return Err(BenchError::Config(format!(
                "peak GEMM: the GPU's y[{i},{j}] = {got} but the CPU computes {want}; not timing a wrong kernel"
            )));
        }
    }
    let shapes = [vec![n, n]];
    let plan = engine.plan(&shapes)?;
    plan.write_inputs(ctx, &[av.as_slice()]).map_err(Error::from)?;
    let submit = |runs: usize| -> Result<f64, BenchError> {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        for _ in 0..runs {
            plan.record(&mut enc);
        }
        let t = Instant::now();
        ctx.queue.submit([enc.finish()]);
        ctx.device
            .poll(acclimate::wgpu::PollType::wait_indefinitely())
            .map_err(|e| BenchError::Config(format!("peak GEMM: waiting for the GPU failed: {e}")))?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    submit(1)?;
    let ms = submit(reps)?;
    ctx.check().map_err(Error::from)?;
    let ms_per_gemm = ms / reps as f64;
    Ok(PeakGemm {
        gflops: gflops(2 * (n as u64).pow(3), ms_per_gemm),
        n,
        reps,
        ms_per_gemm,
        kernel: format!("plan's MatMul: {} dispatch(es) of shaders/matmul.wgsl", plan.dispatch_count),
    })
}

/// Session start, cold and warm.
#[derive(Clone, Debug, Serialize)]
pub struct StartTimes {
    pub batch: usize,
    /// Model load + forward plan (+ the step's plan with `--adapt`), pipelines compiled, with an
    /// empty pipeline cache.
    pub cold_ms: f64,
    /// The same in a fresh device, with the pipeline cache the cold start wrote.
    pub warm_ms: f64,
    pub covers: String,
    /// Pipelines compiled by one start.
    pub pipelines: usize,
    /// Whether the backend persists pipelines (Vulkan).
    pub cache_supported: bool,
    /// Bytes of compiled pipelines the warm start loaded.
    pub cache_bytes: usize,
}

/// Starts a session twice on fresh devices: with an empty pipeline cache in a scratch directory,
/// then with the cache the first start left there.
pub fn measure_start(
    path: &Path,
    shape: &[usize],
    method: Option<acclimate::adapt::Method>,
) -> Result<StartTimes, BenchError> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("acclimate-bench-start-{}-{nanos}", std::process::id()));
    let once = || -> Result<(f64, usize, Option<acclimate::gpu::PipelineCacheStatus>), BenchError> {
        let ctx = GpuContext::new()?;
        let t = Instant::now();
        let status = ctx.enable_pipeline_cache(&dir);
        let model = Model::load(path)?;
        let mut engine = Engine::new(&ctx, model.clone());
        engine.plan(&[shape.to_vec()])?;
        if let Some(m) = method {
            let mut session = acclimate::adapt::Session::new(&ctx, model, adapt_config(m))
                .map_err(|e| BenchError::Config(e.to_string()))?;
            session.step_footprint(shape).map_err(|e| BenchError::Config(e.to_string()))?;
        }
        let ms = t.elapsed().as_secs_f64() * 1e3;
        ctx.save_pipeline_cache().map_err(Error::from)?;
        Ok((ms, ctx.pipeline_count(), status))
    };
    let result = once().and_then(|cold| Ok((cold, once()?)));
    std::fs::remove_dir_all(&dir).ok();
    let ((cold_ms, pipelines, status), (warm_ms, _, warm)) = result?;
    Ok(StartTimes {
        batch: shape[0],
        cold_ms,
        warm_ms,
        covers: if method.is_some() { "model load + forward and step plans" } else { "model load + forward plan" }
            .into(),
        pipelines,
        cache_supported: status.is_some(),
        cache_bytes: warm.map_or(0, |w| w.loaded_bytes),
    })
}
