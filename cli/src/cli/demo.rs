//! `acclimate demo`: the product in one command, on embedded defaults.
//!
//! Without arguments: the SVHN digit network streams MNIST test digits (a real SVHN→MNIST shift)
//! through a schedule of corruptions and a class-correlated segment, adapting with the default
//! method, and prints the source-vs-adapted comparison and writes the report. With `--video`:
//! MobileNetV2 on a real clip, one prediction per frame, and with `--clean` the agreement of the
//! adapted and the unadapted model with the predictions on the clean clip.

use std::path::{Path, PathBuf};

use super::CliError;
use super::stream::{self, Planned, StreamArgs};
use crate::stream::schedule::{self, OrderSpec};
use crate::stream::source::Source;
use acclimate::adapt::config::AdaptConfig;
use acclimate::engine::{Engine, Model};
use acclimate::gpu::GpuContext;
use acclimate::stream::preprocess::{PreprocessSpec, Preprocessor};

/// The default preset of `acclimate demo` and of `acclimate stream` without `--config`.
pub use acclimate::adapt::config::DEFAULT_PRESET;
const DIGITS_CONFIG: &str = DEFAULT_PRESET;
const VIDEO_CONFIG: &str = include_str!("demo_video.toml");
const SVHN_SPEC: &str = "size=32,channels=3,mean=0.4377/0.4438/0.4728,std=0.1980/0.2010/0.1970";
const IMAGENET_SPEC: &str = "resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225";

/// The class-correlated segment takes its digits from a pool this many times its length.
const CORRELATED_POOL: usize = 10;

/// The digits demo's stream: (segment name, corruption, frames), two batches of 64 each, so that
/// no batch straddles two segments. The class-correlated segment is the start of a Dirichlet
/// (δ = 0.1) label order over the next [`CORRELATED_POOL`]·128 digits: a few classes, each for
/// tens of frames.
const DIGIT_SEGMENTS: [(&str, Option<&str>, usize); 4] = [
    ("clean", None, 128),
    ("gaussian_noise:3", Some("gaussian_noise:3"), 128),
    ("defocus_blur:2", Some("defocus_blur:2"), 128),
    ("class-correlated", None, 128),
];

/// What `acclimate demo` takes.
#[derive(Clone, Debug, Default)]
pub struct DemoArgs {
    pub video: Option<PathBuf>,
    pub clean: Option<PathBuf>,
    /// The video demo's classifier (default: the assets' MobileNetV2).
    pub model: Option<PathBuf>,
    /// The video demo's preprocessing spec (default: ImageNet's resize 256, crop 224, mean and std).
    pub preprocess: Option<String>,
    pub out: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub limit: Option<usize>,
    pub assets: Option<PathBuf>,
    pub progress: bool,
}

/// Where the assets built by `tools/setup.sh` are, from any working directory: `--assets`,
/// `ACCLIMATE_ASSETS`, next to the repository the binary was built in, or `./assets`.
pub fn find_assets(explicit: Option<&Path>) -> Result<PathBuf, CliError> {
    crate::assets::find_with(explicit, "svhn.onnx")
        .ok_or_else(|| CliError::Usage("no assets found: run `bash tools/setup.sh` (or pass --assets DIR)".into()))
}

fn config_or(path: Option<&Path>, embedded: &str) -> Result<AdaptConfig, CliError> {
    match path {
        Some(p) => AdaptConfig::from_file(p).map_err(|e| CliError::Usage(e.to_string())),
        None => AdaptConfig::from_toml_str(embedded).map_err(|e| CliError::Usage(format!("embedded config: {e}"))),
    }
}

fn out_dir(args: &DemoArgs) -> Result<PathBuf, CliError> {
    let dir = args.out.clone().unwrap_or_else(|| PathBuf::from("acclimate-demo"));
    std::fs::create_dir_all(&dir).map_err(|e| CliError::Usage(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}

/// Runs the demo; returns the text it printed.
pub fn demo_cmd(args: &DemoArgs) -> Result<String, CliError> {
    let assets = find_assets(args.assets.as_deref())?;
    match &args.video {
        Some(v) => video_demo(args, &assets, v),
        None => digits_demo(args, &assets),
    }
}

fn digits_demo(args: &DemoArgs, assets: &Path) -> Result<String, CliError> {
    let dir = out_dir(args)?;
    let mut config = config_or(args.config.as_deref(), DIGITS_CONFIG)?;
    let images = assets.join("mnist/t10k-images-idx3-ubyte");
    let labels = assets.join("mnist/t10k-labels-idx1-ubyte");
    let spec_src = format!("idx:{},{}", images.display(), labels.display());
    let mut source = Source::open(&spec_src).map_err(|e| CliError::Usage(e.to_string()))?;
    let all_labels = source.labels().ok_or_else(|| CliError::Usage("the MNIST labels are missing".into()))?;
    let mut plan = Vec::new();
    let mut next = 0usize;
    for (name, shift, n) in DIGIT_SEGMENTS {
        let shift = match shift {
            Some(s) => s.parse::<schedule::Segment>().map_err(|e| CliError::Usage(e.to_string()))?.shift,
            None => None,
        };
        let (indices, used): (Vec<usize>, usize) = if name == "class-correlated" {
            // A camera that sees a few classes for a while: the first n digits of a Dirichlet
            // (δ = 0.1) order over 10·n digits, so that a class lasts tens of frames.
            let pool = (CORRELATED_POOL * n).min(all_labels.len().saturating_sub(next));
            let sub: Vec<u32> = all_labels[next..next + pool].to_vec();
            let order: OrderSpec = "dirichlet:0.1".parse().map_err(|e| CliError::Usage(format!("{e}")))?;
            (schedule::order(&sub, &order, 7).into_iter().take(n).map(|i| next + i).collect(), pool)
        } else {
            ((next..next + n).collect(), n)
        };
        next += used;
        for i in indices {
            plan.push(Planned { index: Some(i), segment: name.to_string(), shift });
        }
    }
    if let Some(l) = args.limit {
        plan.truncate(l);
    }
    let stream_args = StreamArgs {
        model: assets.join("svhn.onnx"),
        source: spec_src,
        preprocess: SVHN_SPEC.to_string(),
        config: None,
        corrupt: None,
        segment: None,
        order: "iid".into(),
        limit: None,
        seed: 0,
        jsonl: Some(dir.join("frames.jsonl")),
        report: Some(dir.join("report.html")),
        summary_json: Some(dir.join("summary.json")),
        progress: args.progress,
        source_prediction: true,
        fps: None,
    };
    let spec: PreprocessSpec = SVHN_SPEC.parse().map_err(|e| CliError::Usage(format!("{e}")))?;
    let run = stream::run_planned(&stream_args, &mut config, spec, &mut source, plan, &stream_args.model)?;
    let mut text = String::from(
        "Acclimate demo: the SVHN digit network on MNIST test digits (a real SVHN→MNIST shift), through\n\
         clean digits, Gaussian noise, defocus blur and a class-correlated segment, batches of 64.\n\n",
    );
    text += &stream::summary_text(&run.summary);
    text += &format!("\nreport: {}\n", dir.join("report.html").display());
    Ok(text)
}

fn video_demo(args: &DemoArgs, assets: &Path, video: &Path) -> Result<String, CliError> {
    let dir = out_dir(args)?;
    let mut config = config_or(args.config.as_deref(), VIDEO_CONFIG)?;
    let model_path = args.model.clone().unwrap_or_else(|| assets.join("mobilenetv2.onnx"));
    let model_name =
        model_path.file_name().map_or_else(|| model_path.display().to_string(), |n| n.to_string_lossy().into());
    let spec_text = args.preprocess.clone().unwrap_or_else(|| IMAGENET_SPEC.to_string());
    let spec: PreprocessSpec = spec_text.parse().map_err(|e| CliError::Usage(format!("--preprocess: {e}")))?;
    let limit = args.limit.unwrap_or(usize::MAX);
    // With a clean clip, the source model's top-1 on each clean frame is that frame's "label":
    // the accuracy columns then read as agreement with the clean predictions.
    let clean_labels: Option<Vec<u32>> = match &args.clean {
        Some(clean) => {
            let ctx = GpuContext::new()?;
            let mut engine = Engine::new(&ctx, Model::load(&model_path)?);
            let mut pre = Preprocessor::new(&ctx, spec.clone());
            let mut src =
                Source::open(&format!("video:{}", clean.display())).map_err(|e| CliError::Usage(e.to_string()))?;
            let mut labels = Vec::new();
            while labels.len() < limit {
                let Some(s) = src.next_frame() else { break };
                let s = s.map_err(|e| CliError::Usage(e.to_string()))?;
                let x = pre.run(std::slice::from_ref(&s.frame)).map_err(|e| CliError::Usage(e.to_string()))?;
                let y = engine.run(&[x])?;
                let row = y.first().map(|t| t.to_f32_vec()).unwrap_or_default();
                let arg =
                    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |m, (i, &v)| if v > m.1 { (i, v) } else { m });
                labels.push(arg.0 as u32);
            }
            Some(labels)
        }
        None => None,
    };
    let stream_args = StreamArgs {
        model: model_path.clone(),
        source: format!("video:{}", video.display()),
        preprocess: spec_text,
        config: None,
        corrupt: None,
        segment: None,
        order: "iid".into(),
        limit: args.limit,
        seed: 0,
        jsonl: Some(dir.join("frames.jsonl")),
        report: Some(dir.join("report.html")),
        summary_json: Some(dir.join("summary.json")),
        progress: args.progress,
        source_prediction: true,
        fps: None,
    };
    let mut source = Source::open(&stream_args.source).map_err(|e| CliError::Usage(e.to_string()))?;
    let n = clean_labels.as_ref().map_or(limit.min(1 << 20), |l| l.len());
    let plan: Vec<Planned> = (0..n).map(|_| Planned { index: None, segment: "video".into(), shift: None }).collect();
    let run = stream::run_planned_with_labels(
        &stream_args,
        &mut config,
        spec,
        &mut source,
        plan,
        &model_path,
        clean_labels.as_deref(),
    )?;
    let mut text = format!("Acclimate demo: {model_name} on {} ({} frames)\n", video.display(), run.summary.frames);
    for r in run.records.iter().step_by((run.records.len() / 12).max(1)) {
        text += &format!(
            "  frame {:>4}: class {:>4} ({:.2}){}\n",
            r.index,
            r.pred,
            r.prob,
            r.source_pred.map(|s| format!("   source {s:>4}")).unwrap_or_default()
        );
    }
    text += "\n";
    if clean_labels.is_some() {
        text += "agreement with the predictions on the clean clip:\n";
    }
    text += &stream::summary_text(&run.summary);
    text += &format!("\nreport: {}\n", dir.join("report.html").display());
    Ok(text)
}
