//! The `acclimate` command-line tool: `info`, `run`, `bench`, `replay`, `fisher`, `stream` and `demo`.
//!
//! Every failure ends as one `error: ...` line on stderr and a non-zero exit status (2 for bad
//! arguments, 1 for everything else), so scripts can rely on it; `RUST_LOG` turns on logging.

pub mod demo;
pub mod info;
pub mod replay;
pub mod stream;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use thiserror::Error;

use crate::bench::{self, BenchConfig, BenchError};
use acclimate::engine::{Engine, Model, NonFinite};
use acclimate::gpu::GpuContext;
use acclimate::npy::{self, NpyError};
use acclimate::onnx::OnnxError;
use acclimate::tensor::Tensor;

#[derive(Debug, Error)]
pub enum CliError {
    #[error(transparent)]
    Model(#[from] acclimate::Error),
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    #[error(transparent)]
    Npy(#[from] NpyError),
    #[error(transparent)]
    Bench(#[from] BenchError),
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
    #[error("{0}")]
    Usage(String),
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
    #[error("cannot serialise JSON: {0}")]
    Json(#[from] serde_json::Error),
}

#[derive(Debug, Parser)]
#[command(
    name = "acclimate",
    version,
    about = "Run ONNX image classifiers on any GPU through WGSL compute shaders",
    long_about = "Run ONNX image classifiers on any GPU through WGSL compute shaders (wgpu: Vulkan, Metal, \
                  software Vulkan), checked against ONNX Runtime.\n\n\
                  The ONNX Runtime backend loads the shared library named by ORT_DYLIB_PATH \
                  (libonnxruntime.so.1.31.1 from the pip wheel onnxruntime==1.31.1). \
                  Set RUST_LOG=info (or debug) for logs; WGPU_BACKEND and WGPU_ADAPTER_NAME pick the adapter."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where `run` executes the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// Acclimate's WGSL kernels on the GPU wgpu picks.
    Gpu,
    /// ONNX Runtime on the CPU (needs ORT_DYLIB_PATH).
    Ort,
}

/// What `run` does with NaN or infinite input values (the Engine's input policy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum NonFiniteArg {
    /// Refuse the input with one line naming the count and the first flat index.
    #[default]
    Refuse,
    /// Run it: NaN and infinities propagate as in ONNX Runtime.
    Propagate,
}

impl From<NonFiniteArg> for NonFinite {
    fn from(a: NonFiniteArg) -> Self {
        match a {
            NonFiniteArg::Refuse => NonFinite::Refuse,
            NonFiniteArg::Propagate => NonFinite::Propagate,
        }
    }
}

impl From<BackendArg> for bench::Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Gpu => bench::Backend::Gpu,
            BackendArg::Ort => bench::Backend::Ort,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Describe a model: inputs and outputs, opset, producer, op histogram, BatchNormalization
    /// layers and adaptable parameters, parameter count, unsupported ops.
    #[command(long_about = "Describe a model: inputs and outputs with their shapes (symbolic dimensions by \
                            name), opset, producer, a histogram of op types, the BatchNormalization layers and \
                            their adaptable parameters (scale + bias elements, what BN-based test-time \
                            adaptation updates), the total parameter count, and every op the GPU engine does \
                            not support (op type, node, opset and why). Works on models the engine cannot \
                            load.")]
    Info {
        /// The ONNX model file.
        model: PathBuf,
        /// Print machine-readable JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a model on one .npy input and save its first output as .npy.
    #[command(long_about = "Run a model on one input and save its first output.\n\n\
                            The input is a float32 .npy array in the model's input layout (e.g. N×3×H×W, \
                            already normalised), any batch size the model allows. The output file receives \
                            the model's first output as float32.")]
    Run {
        /// The ONNX model file.
        model: PathBuf,
        /// Float32 .npy input, in the model's input layout (e.g. N,3,224,224).
        #[arg(long, short)]
        input: PathBuf,
        /// Where to write the first output (float32 .npy).
        #[arg(long, short)]
        output: PathBuf,
        /// Which backend runs the model.
        #[arg(long, value_enum, default_value = "gpu")]
        backend: BackendArg,
        /// NaN or infinite input values: refuse them (the library's default), or propagate them
        /// through the model as ONNX Runtime does. Applies to both backends.
        #[arg(long, value_enum, default_value = "refuse")]
        non_finite: NonFiniteArg,
    },
    /// Measure forward latency of the GPU engine and ONNX Runtime on random inputs.
    #[command(long_about = "Measure forward latency on random inputs in [-2, 2): the median, 10th and 90th \
                            percentiles, min, max and standard deviation per backend and batch size, all in \
                            the same run.\n\n\
                            The GPU time covers the full Engine::run call (input upload, one queue submit, \
                            blocking readback); plans are built before timing. ONNX Runtime uses its CPU \
                            execution provider with --ort-threads intra-op threads (default: every logical \
                            core).\n\n\
                            Dynamic dimensions other than the batch (e.g. an OCR model's height and width) \
                            must be given with --shape.")]
    Bench {
        /// The ONNX model file.
        model: PathBuf,
        /// Batch sizes, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1")]
        batch: Vec<usize>,
        /// Backends, comma separated.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "gpu,ort")]
        backend: Vec<BackendArg>,
        /// Untimed iterations before measuring.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Timed iterations per backend and batch size.
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// The input's non-batch dimensions, comma separated (e.g. 3,48,192); required when the
        /// model declares any of them dynamic.
        #[arg(long, value_delimiter = ',')]
        shape: Option<Vec<usize>>,
        /// ONNX Runtime intra-op threads (default: every logical core).
        #[arg(long)]
        ort_threads: Option<usize>,
        /// Also measure one adaptation step of this method (e.g. tent) beside the forward pass:
        /// step time, step/forward ratio, and the step's GPU memory. GPU only.
        #[arg(long)]
        adapt: Option<String>,
        /// Skip measuring the adapter's peak (a 1024³ MatMul; seconds on a software GPU).
        #[arg(long)]
        no_peak: bool,
        /// Runs of the peak MatMul timed in one submit (more on a fast GPU, where one run is
        /// shorter than a submit's overhead).
        #[arg(long, default_value_t = bench::DEFAULT_PEAK_REPS)]
        peak_reps: usize,
        /// Skip measuring session start (cold and warm pipeline cache).
        #[arg(long)]
        no_start: bool,
        /// Also time every dispatch of the forward (and of the step with --adapt) alone, this
        /// many runs (default 3) each, and print where the time goes per kernel: GPU timestamps
        /// where the adapter has them, else host time around each dispatch submitted alone.
        #[arg(long, num_args = 0..=1, default_missing_value = "3", value_name = "RUNS")]
        profile: Option<usize>,
        /// Print machine-readable JSON instead of a table (field names in the README's
        /// performance section).
        #[arg(long)]
        json: bool,
    },
    /// Run an adaptation method (config TOML) over the float32 .npy batches of a folder, taken in
    /// lexicographic order of file name, and write per batch the returned (pre-update) logits, the
    /// loss and every adapted parameter after the batch as JSON.
    Replay {
        /// The ONNX model file.
        model: PathBuf,
        /// The adaptation config (TOML: [adapt], [optimizer]).
        #[arg(long)]
        config: PathBuf,
        /// Folder of float32 .npy batches in the model's input layout.
        #[arg(long)]
        batches: PathBuf,
        /// Where to write the JSON record.
        #[arg(long)]
        out: PathBuf,
        /// Save the adapted state (safetensors) after the last batch.
        #[arg(long)]
        save_state: Option<PathBuf>,
        /// Start from a saved state (made for the same model).
        #[arg(long)]
        load_state: Option<PathBuf>,
    },
    /// Compute EATA's Fisher information once from a folder of clean float32 .npy batches and
    /// save it (safetensors, tied to the model) for `[eata] fisher_file`.
    Fisher {
        /// The ONNX model file.
        model: PathBuf,
        /// Folder of clean float32 .npy batches in the model's input layout.
        #[arg(long)]
        batches: PathBuf,
        /// Where to write the Fisher.
        #[arg(long)]
        out: PathBuf,
        /// An adaptation config whose include/exclude select the adapted layers (default: all
        /// BatchNormalization layers).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Stream frames from a dataset or a video through a model that adapts as it goes: one
    /// prediction per frame (or per batch of frames), optional shifts applied on the fly, live
    /// progress with the running accuracy of the adapted and the source model.
    Stream {
        /// The ONNX model file.
        model: PathBuf,
        /// idx:IMAGES[,LABELS] (MNIST-style IDX, raw or gzip), dir:PATH (images; labels from
        /// sub-folders or labels.csv), video:PATH (Y4M natively; other containers via ffmpeg).
        #[arg(long)]
        source: String,
        /// How frames become the model's input, e.g.
        /// size=32,channels=3,mean=0.4377/0.4438/0.4728,std=0.1980/0.2010/0.1970 or
        /// resize=256,crop=224,mean=...,std=... (default: the config's [preprocess] spec)
        #[arg(long)]
        preprocess: Option<String>,
        /// Adaptation config (TOML: [adapt], [optimizer], method sections, [stream]).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Corruptions NAME:SEV[,NAME:SEV...] applied to the frames (the 15 ImageNet-C names, the
        /// extras gaussian_blur, speckle_noise, saturate and spatter, and low_light; `none` for a
        /// clean segment).
        #[arg(long)]
        corrupt: Option<String>,
        /// Switch to the next corruption every K frames (cycling).
        #[arg(long)]
        segment: Option<usize>,
        /// Label order: iid (the dataset's order), sorted, dirichlet:D (class-correlated).
        #[arg(long, default_value = "iid")]
        order: String,
        /// Stop after N frames.
        #[arg(long)]
        limit: Option<usize>,
        /// Seed of the shifts and the label order.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Write one JSON line per frame.
        #[arg(long)]
        jsonl: Option<PathBuf>,
        /// Write a self-contained HTML report with plots.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Write the summary as JSON.
        #[arg(long)]
        summary_json: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Do not run the unadapted model beside the adapted one (no source accuracy; measures
        /// the adapted stream's own throughput).
        #[arg(long)]
        no_source: bool,
        /// Hand the frames over at this rate, as a camera does (frames per second); the
        /// default hands each over as soon as the previous result is back.
        #[arg(long, value_parser = parse_fps)]
        fps: Option<f64>,
    },
    /// The demo on embedded defaults: the SVHN network adapting on MNIST digits through
    /// corruptions and a class-correlated segment; or MobileNetV2 on a video with --video.
    Demo {
        /// A video (Y4M, or anything ffmpeg reads) to run MobileNetV2 (or --model) on, frame by frame.
        #[arg(long)]
        video: Option<PathBuf>,
        /// The same clip without the distortion: report agreement with its predictions.
        #[arg(long, requires = "video")]
        clean: Option<PathBuf>,
        /// Run this ImageNet classifier on the video instead of the assets' MobileNetV2.
        #[arg(long, requires = "video")]
        model: Option<PathBuf>,
        /// How frames become the model's input (default: resize 256, crop 224, ImageNet mean and std).
        #[arg(long, requires = "video")]
        preprocess: Option<String>,
        /// Where the report, summary and per-frame lines go (default ./acclimate-demo).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace the embedded adaptation config.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Stop after N frames.
        #[arg(long)]
        limit: Option<usize>,
        /// The assets folder (default: found from the binary's location or ACCLIMATE_ASSETS).
        #[arg(long)]
        assets: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
}

fn print(s: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes()).and_then(|_| out.flush()).map_err(CliError::Stdout)
}

fn info(model: &Path, json: bool) -> Result<(), CliError> {
    let info = info::model_info(model)?;
    if json { print(&(serde_json::to_string_pretty(&info)? + "\n")) } else { print(&info.to_text()) }
}

/// Runs `model` on `x` with `backend`; returns the first output and a description of the backend.
/// Non-finite input values are refused or propagated as `non_finite` says, on either backend.
pub fn run_model(
    model: &Path,
    x: Tensor,
    backend: BackendArg,
    non_finite: NonFinite,
) -> Result<(String, Tensor, String), CliError> {
    match backend {
        BackendArg::Gpu => {
            let model = Model::load(model)?;
            let name = model.graph.outputs.first().map(|o| o.name.clone()).unwrap_or_default();
            let ctx = GpuContext::new()?;
            let desc = format!("gpu: {}", ctx.adapter_summary());
            let mut engine = Engine::new(&ctx, model);
            engine.set_non_finite_inputs(non_finite);
            let y = engine.run(std::slice::from_ref(&x))?;
            let first = y.into_iter().next().ok_or_else(|| CliError::Usage("the model produced no output".into()))?;
            Ok((name, first, desc))
        }
        BackendArg::Ort => {
            if non_finite == NonFinite::Refuse {
                // The same policy and message as the GPU path, so the backends answer alike.
                let raw = acclimate::onnx::load_model(model)?;
                let name = raw.graph.inputs.first().map(|i| i.name.clone()).unwrap_or_default();
                if let Some(data) = x.as_f32() {
                    acclimate::engine::check_finite(&name, &x.shape, data).map_err(acclimate::Error::from)?;
                }
            }
            run_ort(model, x)
        }
    }
}

fn run_ort(model: &Path, x: Tensor) -> Result<(String, Tensor, String), CliError> {
    use crate::reference::OrtSession;
    // Decoding first gives the same error as the GPU path for a missing or corrupt file, and the
    // output's name.
    let raw = acclimate::onnx::load_model(model)?;
    let name = raw.graph.outputs.first().map(|o| o.name.clone()).unwrap_or_default();
    let mut session = OrtSession::new(model)?;
    let y = session.run(std::slice::from_ref(&x))?;
    let first = y.into_iter().next().ok_or_else(|| CliError::Usage("the model produced no output".into()))?;
    Ok((name, first, "ort: ONNX Runtime CPU execution provider".into()))
}

fn run(
    model: &Path,
    input: &Path,
    output: &Path,
    backend: BackendArg,
    non_finite: NonFiniteArg,
) -> Result<(), CliError> {
    if !model.is_file() {
        return Err(OnnxError::Io {
            path: model.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        }
        .into());
    }
    let x = npy::read_f32(input)?;
    let (name, y, desc) = run_model(model, x, backend, non_finite.into())?;
    npy::write_f32(output, &y)?;
    print(&format!("wrote {}: output '{name}' {:?} float32 ({desc})\n", output.display(), y.shape))
}

fn bench_cmd(model: &Path, cfg: &BenchConfig, json: bool) -> Result<(), CliError> {
    let report = bench::run(model, cfg)?;
    if json { print(&(serde_json::to_string_pretty(&report)? + "\n")) } else { print(&report.to_table()) }
}

/// Executes a parsed command line.
pub fn execute(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Info { model, json } => info(&model, json),
        Command::Run { model, input, output, backend, non_finite } => run(&model, &input, &output, backend, non_finite),
        Command::Replay { model, config, batches, out, save_state, load_state } => {
            replay::replay_cmd(&model, &config, &batches, &out, save_state.as_deref(), load_state.as_deref())
        }
        Command::Stream {
            model,
            source,
            preprocess,
            config,
            corrupt,
            segment,
            order,
            limit,
            seed,
            jsonl,
            report,
            summary_json,
            quiet,
            no_source,
            fps,
        } => {
            let args = stream::StreamArgs {
                model,
                source,
                preprocess: preprocess.unwrap_or_default(),
                config,
                corrupt,
                segment,
                order,
                limit,
                seed,
                jsonl,
                report,
                summary_json,
                progress: !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
                source_prediction: !no_source,
                fps,
            };
            let run = stream::stream_cmd(&args)?;
            print(&stream::summary_text(&run.summary))
        }
        Command::Demo { video, clean, model, preprocess, out, config, limit, assets, quiet } => {
            let progress = !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
            let args = demo::DemoArgs { video, clean, model, preprocess, out, config, limit, assets, progress };
            print(&demo::demo_cmd(&args)?)
        }
        Command::Fisher { model, batches, out, config } => {
            replay::fisher_cmd(&model, &batches, &out, config.as_deref())
        }
        Command::Bench {
            model,
            batch,
            backend,
            warmup,
            iters,
            shape,
            ort_threads,
            adapt: Some(method),
            no_peak,
            peak_reps,
            no_start,
            profile,
            json,
        } => {
            let method: acclimate::adapt::Method = serde_json::from_value(serde_json::Value::String(method.clone()))
                .map_err(|_| CliError::Usage(format!("--adapt: unknown method '{method}'")))?;
            let cfg = BenchConfig {
                batches: batch,
                warmup,
                iters,
                shape,
                ort_threads,
                peak_reps: (!no_peak).then_some(peak_reps),
                start: !no_start,
                profile_runs: profile,
                ..BenchConfig::default()
            };
            let _ = backend;
            let report = bench::run_adapt(&model, method, &cfg)?;
            if json { print(&(serde_json::to_string_pretty(&report)? + "\n")) } else { print(&report.to_table()) }
        }
        Command::Bench {
            model,
            batch,
            backend,
            warmup,
            iters,
            shape,
            ort_threads,
            adapt: None,
            no_peak,
            peak_reps,
            no_start,
            profile,
            json,
        } => {
            let mut backends: Vec<bench::Backend> = Vec::new();
            for b in backend.into_iter().map(bench::Backend::from) {
                if !backends.contains(&b) {
                    backends.push(b);
                }
            }
            let cfg = BenchConfig {
                batches: batch,
                backends,
                warmup,
                iters,
                shape,
                ort_threads,
                peak_reps: (!no_peak).then_some(peak_reps),
                start: !no_start,
                profile_runs: profile,
                ..BenchConfig::default()
            };
            bench_cmd(&model, &cfg, json)
        }
    }
}

/// Error messages can span lines (wgpu validation, ONNX Runtime status); the contract is one.
pub fn one_line(msg: &str) -> String {
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The binary's entry point: logging, argument parsing, one-line errors, exit status.
pub fn main() -> ExitCode {
    ensure_runtime_dir();
    default_pipeline_cache();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("acclimate=warn")).init();
    std::panic::set_hook(Box::new(|info| {
        // A panic is a bug in acclimate; still one line, and no backtrace dump on the user.
        eprintln!("error: internal error (please report): {}", one_line(&info.to_string()));
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return ExitCode::from(2);
            }
            // clap's message is a paragraph (the error, then e.g. the missing arguments), then usage.
            let rendered = e.render().to_string();
            let paragraph: Vec<&str> =
                rendered.lines().skip_while(|l| l.trim().is_empty()).take_while(|l| !l.trim().is_empty()).collect();
            let msg = one_line(&paragraph.join(" "));
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
            eprintln!("error: {msg}; see 'acclimate --help'");
            return ExitCode::from(2);
        }
    };
    match std::panic::catch_unwind(|| execute(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {}", one_line(&e.to_string()));
            ExitCode::from(1)
        }
        Err(_) => ExitCode::from(101),
    }
}

/// Mesa's Vulkan drivers print "XDG_RUNTIME_DIR is invalid or not set" on stderr when the variable
/// is missing (CI, containers, ssh sessions), which would break the one-line error contract. Point
/// it at a private directory before any thread or GPU instance exists.
#[cfg(unix)]
fn ensure_runtime_dir() {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
        return;
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
    let dir = std::env::temp_dir().join(format!("acclimate-runtime-{user}"));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    // Only use it if it is private and readable by us (another user's 0700 directory of the same
    // name is not).
    let ok = std::fs::metadata(&dir).is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o077 == 0)
        && std::fs::read_dir(&dir).is_ok();
    if ok {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
    }
}

#[cfg(not(unix))]
fn ensure_runtime_dir() {}

/// The command-line tool keeps compiled pipelines under the user's cache directory (the library
/// leaves that to the application: `acclimate::gpu` explains why), unless
/// `ACCLIMATE_PIPELINE_CACHE` names another directory or `off`.
fn default_pipeline_cache() {
    if std::env::var_os(acclimate::gpu::PIPELINE_CACHE_ENV).is_some() {
        return;
    }
    if let Some(dir) = acclimate::gpu::default_pipeline_cache_dir() {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var(acclimate::gpu::PIPELINE_CACHE_ENV, dir) };
    }
}

/// `--fps`: a positive, finite rate.
fn parse_fps(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a frame rate (a positive number of frames per second)")),
    }
}
