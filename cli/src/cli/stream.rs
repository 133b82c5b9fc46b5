//! `acclimate stream` and `acclimate demo`: frames from a dataset or a video, an optional shift
//! schedule (corruptions, label order), the stream policy, live progress, and the outputs
//! (per-frame JSON lines, a summary, an HTML report).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::CliError;
use crate::stream::corrupt;
use crate::stream::report::{self, RunRecord, Summary};
use crate::stream::schedule::{self, OrderSpec, Schedule};
use crate::stream::source::Source;
use acclimate::adapt::config::AdaptConfig;
use acclimate::engine::Model;
use acclimate::gpu::GpuContext;
use acclimate::stream::frame::{Frame, PixelFormat};
use acclimate::stream::policy::{FrameResult, StreamOptions, StreamSession};
use acclimate::stream::preprocess::PreprocessSpec;

/// Everything `acclimate stream` takes.
#[derive(Clone, Debug)]
pub struct StreamArgs {
    pub model: PathBuf,
    pub source: String,
    /// The preprocessing spec; empty: the config's `[preprocess]`.
    pub preprocess: String,
    pub config: Option<PathBuf>,
    pub corrupt: Option<String>,
    pub segment: Option<usize>,
    pub order: String,
    pub limit: Option<usize>,
    pub seed: u64,
    pub jsonl: Option<PathBuf>,
    pub report: Option<PathBuf>,
    pub summary_json: Option<PathBuf>,
    /// Show the progress bar (off for tests and pipes).
    pub progress: bool,
    /// Also run the unadapted model on every frame (the source accuracy); off for throughput
    /// measurements of the adapted model alone.
    pub source_prediction: bool,
    /// Hand frames over at this rate (a camera's), each at its time or at once when the stream
    /// is behind; `None`: back to back.
    pub fps: Option<f64>,
}

/// One planned frame of the stream: which sample (`None`: the next frame of a video), which
/// shift, which segment.
pub struct Planned {
    pub index: Option<usize>,
    pub segment: String,
    pub shift: Option<(corrupt::Corruption, u8)>,
}

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError::Usage(e.to_string())
}

/// RGB8 pixels of a frame at its own size (for the corruptions, which work on RGB images).
fn to_rgb(frame: &Frame) -> Result<Vec<u8>, CliError> {
    let (w, h) = (frame.width as usize, frame.height as usize);
    let mut out = vec![0u8; w * h * 3];
    let p = |i: usize| frame.planes.get(i).copied().ok_or_else(|| usage("frame without its planes"));
    let byte = |off: usize| frame.data.get(off).copied().ok_or_else(|| usage("frame buffer shorter than its planes"));
    match frame.format {
        PixelFormat::Rgb8 | PixelFormat::Rgba8 | PixelFormat::Bgra8 | PixelFormat::Gray8 => {
            let pl = p(0)?;
            for y in 0..h {
                for x in 0..w {
                    let o = pl.offset + y * pl.row_stride + x * pl.pixel_stride;
                    let rgb = match frame.format {
                        PixelFormat::Gray8 => {
                            let g = byte(o)?;
                            [g, g, g]
                        }
                        PixelFormat::Bgra8 => [byte(o + 2)?, byte(o + 1)?, byte(o)?],
                        _ => [byte(o)?, byte(o + 1)?, byte(o + 2)?],
                    };
                    out[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&rgb);
                }
            }
        }
        PixelFormat::I420 | PixelFormat::Nv12 | PixelFormat::Nv21 => {
            // BT.601 video range, what Y4M clips and cameras deliver.
            let (py, pu, pv) = match frame.format {
                PixelFormat::I420 => (p(0)?, p(1)?, p(2)?),
                PixelFormat::Nv12 => {
                    let uv = p(1)?;
                    (p(0)?, uv, acclimate::stream::frame::Plane { offset: uv.offset + 1, ..uv })
                }
                _ => {
                    let vu = p(1)?;
                    (p(0)?, acclimate::stream::frame::Plane { offset: vu.offset + 1, ..vu }, vu)
                }
            };
            for y in 0..h {
                for x in 0..w {
                    let yy = byte(py.offset + y * py.row_stride + x * py.pixel_stride)? as f32;
                    let u = byte(pu.offset + (y / 2) * pu.row_stride + (x / 2) * pu.pixel_stride)? as f32 - 128.0;
                    let v = byte(pv.offset + (y / 2) * pv.row_stride + (x / 2) * pv.pixel_stride)? as f32 - 128.0;
                    let c = 1.164_383_6 * (yy - 16.0);
                    let rgb = [c + 1.596_026_8 * v, c - 0.391_762_3 * u - 0.812_968 * v, c + 2.017_232_2 * u];
                    for (k, v) in rgb.iter().enumerate() {
                        out[(y * w + x) * 3 + k] = v.round().clamp(0.0, 255.0) as u8;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The frame as an RGB image the corruptions accept: frames smaller than
/// [`corrupt::MIN_SIDE`] (MNIST's 28×28 digits) are first resized bilinearly so their shorter
/// side is that size, as the accuracy tables' datasets are (digits at 32×32 RGB).
fn corruptible(frame: &Frame) -> Result<corrupt::RgbImage, CliError> {
    let (w, h) = (frame.width, frame.height);
    let rgb = to_rgb(frame)?;
    let short = w.min(h);
    if short >= corrupt::MIN_SIDE {
        return corrupt::RgbImage::new(w, h, rgb).map_err(usage);
    }
    let img = image::RgbImage::from_raw(w, h, rgb).ok_or_else(|| usage("frame buffer size mismatch"))?;
    let (nw, nh) = (
        (w as u64 * corrupt::MIN_SIDE as u64).div_ceil(short as u64) as u32,
        (h as u64 * corrupt::MIN_SIDE as u64).div_ceil(short as u64) as u32,
    );
    let big = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
    Ok(corrupt::RgbImage::from(big))
}

/// Counters shown while the stream runs.
#[derive(Default)]
struct Running {
    frames: usize,
    labelled: usize,
    correct: usize,
    source_correct: usize,
}

impl Running {
    fn accuracy(&self) -> Option<f64> {
        (self.labelled > 0).then(|| 100.0 * self.correct as f64 / self.labelled as f64)
    }
    fn source_accuracy(&self) -> Option<f64> {
        (self.labelled > 0).then(|| 100.0 * self.source_correct as f64 / self.labelled as f64)
    }
}

/// The outcome of a stream run.
pub struct StreamRun {
    pub summary: Summary,
    pub records: Vec<RunRecord>,
}

/// What to say about a missing preprocessing spec for a model whose input declares `dims`: a
/// spec of its size and channels to start from (the mean and std are the model's training data's,
/// which the file does not say).
pub fn preprocess_hint(dims: &[Option<usize>]) -> String {
    let example = |c: usize, h: usize, w: usize, layout: &str| {
        let (mean, std, whose) = match c {
            1 => ("0.5", "0.5", "0.5 and 0.5 stand in for them"),
            _ => ("0.485/0.456/0.406", "0.229/0.224/0.225", "these are ImageNet's"),
        };
        let size = match (h, w) {
            (224, 224) => "resize=256,crop=224".to_string(),
            _ if h == w => format!("size={h}"),
            // Not square: each axis scaled to the input's (or resize=R,crop=WxH for a centre crop).
            _ => format!("size={w}x{h}"),
        };
        format!(
            "; the model takes {}: e.g. --preprocess {size},channels={c},mean={mean},std={std}{layout} with the mean \
             and std of its training data ({whose})",
            shape_text(dims)
        )
    };
    match dims {
        [_, Some(c @ (1 | 3)), Some(h), Some(w)] => example(*c, *h, *w, ""),
        [_, Some(h), Some(w), Some(c @ (1 | 3))] => example(*c, *h, *w, ",layout=nhwc"),
        _ => String::new(),
    }
}

fn shape_text(dims: &[Option<usize>]) -> String {
    let d: Vec<String> = dims.iter().map(|d| d.map_or("N".to_string(), |n| n.to_string())).collect();
    format!("[{}]", d.join(", "))
}

/// Runs a stream as `args` say, writing the requested outputs; returns the summary.
pub fn stream_cmd(args: &StreamArgs) -> Result<StreamRun, CliError> {
    let mut config = match &args.config {
        Some(p) => AdaptConfig::from_file(p).map_err(usage)?,
        // The default preset: the method that did best on the SVHN→MNIST shift (docs/accuracy.md).
        None => AdaptConfig::from_toml_str(acclimate::adapt::config::DEFAULT_PRESET).map_err(usage)?,
    };
    config.validate().map_err(usage)?;
    let spec: PreprocessSpec = match (args.preprocess.is_empty(), &config.preprocess) {
        (true, Some(section)) => section.spec.clone(),
        (true, None) => {
            let hint =
                acclimate::Model::load(&args.model).map(|m| preprocess_hint(&m.input_shape())).unwrap_or_default();
            return Err(usage(format!(
                "give --preprocess SPEC, or a [preprocess] section with spec = \"...\" in --config{hint}"
            )));
        }
        (false, _) => args.preprocess.parse().map_err(|e| usage(format!("--preprocess: {e}")))?,
    };
    let mut source = Source::open(&args.source).map_err(usage)?;
    let order: OrderSpec = args.order.parse().map_err(|e| usage(format!("--order: {e}")))?;
    let plan = plan_frames(&source, &order, args)?;
    run_planned(args, &mut config, spec, &mut source, plan, args.model.as_path())
}

fn plan_frames(source: &Source, order: &OrderSpec, args: &StreamArgs) -> Result<Vec<Planned>, CliError> {
    let indices: Vec<Option<usize>> = match source.len() {
        Some(n) => {
            let labels = source.labels();
            let perm = match (&labels, order) {
                (Some(l), o) => schedule::order(l, o, args.seed),
                (None, o) if *o == OrderSpec::Iid => (0..n).collect(),
                (None, _) => {
                    return Err(usage("--order sorted/dirichlet needs labels (idx:IMAGES,LABELS or labelled folders)"));
                }
            };
            perm.into_iter().map(Some).collect()
        }
        None => {
            if *order != OrderSpec::Iid {
                return Err(usage("--order applies to datasets (idx:, dir:); a video plays in its own order"));
            }
            // A video: frames come sequentially; the plan covers up to --limit (or grows).
            vec![None; args.limit.unwrap_or(usize::MAX).min(1 << 20)]
        }
    };
    let n = args.limit.map_or(indices.len(), |l| l.min(indices.len()));
    let schedule = match &args.corrupt {
        Some(c) => Some(Schedule::parse(c, args.segment, n).map_err(|e| usage(format!("--corrupt: {e}")))?),
        None => None,
    };
    // Several corruptions split the stream evenly unless --segment says how long each lasts; a
    // video's length is not known in advance. One corruption covers every frame either way.
    let several = schedule.as_ref().is_some_and(|s| s.segments().len() > 1);
    if source.len().is_none() && args.limit.is_none() && several && args.segment.is_none() {
        return Err(usage(
            "a video's length is unknown in advance: give --segment K (or --limit N) with several --corrupt entries",
        ));
    }
    Ok(indices
        .into_iter()
        .take(n)
        .enumerate()
        .map(|(pos, index)| {
            let shift = schedule.as_ref().and_then(|s| s.at(pos));
            let segment = schedule.as_ref().map(|s| s.segment_name(pos)).unwrap_or_else(|| "stream".to_string());
            Planned { index, segment, shift }
        })
        .collect())
}

/// Streams the planned frames of `source`.
pub fn run_planned(
    args: &StreamArgs,
    config: &mut AdaptConfig,
    spec: PreprocessSpec,
    source: &mut Source,
    plan: Vec<Planned>,
    model_path: &Path,
) -> Result<StreamRun, CliError> {
    run_planned_with_labels(args, config, spec, source, plan, model_path, None)
}

/// As [`run_planned`], with labels by stream position that replace the source's (the video
/// demo's predictions on the clean clip).
pub fn run_planned_with_labels(
    args: &StreamArgs,
    config: &mut AdaptConfig,
    spec: PreprocessSpec,
    source: &mut Source,
    plan: Vec<Planned>,
    model_path: &Path,
    labels: Option<&[u32]>,
) -> Result<StreamRun, CliError> {
    let model = Model::load(model_path)?;
    let ctx = GpuContext::new()?;
    let device = ctx.adapter_summary();
    let method = config.adapt.method.name().to_string();
    let mode = format!("{:?}", config.stream.mode).to_lowercase();
    let options = StreamOptions { top_k: 5, source_prediction: args.source_prediction };
    let mut stream = StreamSession::new(&ctx, model, config.clone(), spec, options).map_err(usage)?;
    let mut jsonl = match &args.jsonl {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| usage(format!("cannot write {}: {e}", p.display())))?,
        )),
        None => None,
    };
    let bar = progress_bar(args.progress, plan.len(), source.len().is_none());
    // Per stream position: the sample's label and segment, until its result arrives.
    let mut meta: Vec<(Option<u32>, String)> = Vec::with_capacity(plan.len());
    let mut records = Vec::with_capacity(plan.len());
    let mut running = Running::default();
    let started = Instant::now();
    let mut errors = 0usize;
    let mut auto_tally: Option<report::AutoSummary> = None;
    let mut handle = |results: Vec<FrameResult>,
                      meta: &[(Option<u32>, String)],
                      records: &mut Vec<RunRecord>,
                      running: &mut Running|
     -> Result<(), CliError> {
        // One decision of method auto per batch (frame mode: per window step). Every frame of a
        // batch carries its batch's decision, and a batch too large for the device comes back
        // decided in parts: a decision starts wherever the diagnostics change.
        for (k, r) in results.iter().enumerate() {
            if let Some(d) = &r.auto
                && (k == 0 || results[k - 1].auto.as_ref() != Some(d))
            {
                auto_tally.get_or_insert_with(Default::default).add(r.index as usize, d);
            }
        }
        let corrected = results.iter().filter(|r| r.prior_corrected).count() as u64;
        if corrected > 0 {
            auto_tally.get_or_insert_with(Default::default).prior_corrected_frames += corrected;
        }
        for r in results {
            let (label, segment) = meta.get(r.index as usize).cloned().unwrap_or((None, String::new()));
            let (pred, prob) = r.top_k.first().copied().unwrap_or((0, 0.0));
            let source_pred = r.source_top.map(|s| s.0 as u32);
            running.frames += 1;
            if let Some(l) = label {
                running.labelled += 1;
                running.correct += (pred as u32 == l) as usize;
                running.source_correct += (source_pred == Some(l)) as usize;
            }
            let rec = RunRecord {
                index: r.index as usize,
                timestamp_us: r.timestamp_us,
                label,
                pred: pred as u32,
                prob,
                source_pred,
                latency_ms: r.latency_ms,
                segment,
                dropped: false,
            };
            if let Some(w) = jsonl.as_mut() {
                let line = serde_json::json!({
                    "index": r.index,
                    "timestamp_us": r.timestamp_us,
                    "label": label,
                    "pred": pred,
                    "prob": prob,
                    "top_k": r.top_k,
                    "source_pred": source_pred,
                    "latency_ms": r.latency_ms,
                    "segment": rec.segment,
                    "adapted": r.adapted,
                    "loss": r.loss,
                    "skipped": r.skipped,
                    "auto": r.auto,
                    "prior_corrected": r.prior_corrected,
                });
                writeln!(w, "{line}").map_err(|e| usage(format!("cannot write --jsonl: {e}")))?;
            }
            records.push(rec);
        }
        if let Some(b) = &bar {
            b.set_position(running.frames as u64);
            let fps = running.frames as f64 / started.elapsed().as_secs_f64().max(1e-9);
            let acc = match (running.accuracy(), running.source_accuracy()) {
                (Some(a), Some(s)) => format!(" | adapted {a:.1}% | source {s:.1}%"),
                _ => String::new(),
            };
            b.set_message(format!("{fps:.1} frames/s{acc}"));
        }
        Ok(())
    };
    for (pos, planned) in plan.iter().enumerate() {
        let sample = match planned.index {
            Some(i) => source.get(i).map_err(usage),
            None => match source.next_frame() {
                Some(s) => s.map_err(usage),
                None => break,
            },
        };
        let mut sample = match sample {
            Ok(s) => s,
            Err(e) => {
                // A bad frame is reported and skipped; the stream goes on.
                errors += 1;
                log_line(&bar, &format!("warning: frame {pos}: {e}"));
                meta.push((None, planned.segment.clone()));
                stream.skip();
                continue;
            }
        };
        let label = match labels {
            Some(l) => l.get(pos).copied(),
            None => sample.label,
        };
        meta.push((label, planned.segment.clone()));
        if let Some((c, sev)) = planned.shift {
            let img = corruptible(&sample.frame)?;
            // Seeded per frame: a run is reproducible whatever the threading.
            let out = corrupt::apply(&img, c, sev, &mut schedule::frame_rng(args.seed, pos as u64)).map_err(usage)?;
            let ts = sample.frame.timestamp_us;
            sample.frame = Frame::rgb8(out.width(), out.height(), out.into_raw()).with_timestamp(ts);
        }
        if let Some(fps) = args.fps {
            // A camera: frame `pos` exists from pos / fps on (latency counts from then).
            let at = started + std::time::Duration::from_secs_f64(pos as f64 / fps);
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        match stream.push(&sample.frame) {
            Ok(rs) => handle(rs, &meta, &mut records, &mut running)?,
            Err(e) => {
                errors += 1;
                log_line(&bar, &format!("warning: {e}"));
            }
        }
    }
    match stream.finish() {
        Ok(rs) => handle(rs, &meta, &mut records, &mut running)?,
        Err(e) => {
            errors += 1;
            log_line(&bar, &format!("warning: {e}"));
        }
    }
    // The step the end of the stream landed: no frame reports it, its decision still counts.
    if let Some(d) = stream.finished_step().and_then(|l| l.auto.as_ref()) {
        auto_tally.get_or_insert_with(Default::default).add(records.len(), d);
    }
    if let Some(b) = &bar {
        b.finish();
    }
    if let Some(mut w) = jsonl.take() {
        w.flush().map_err(|e| usage(format!("cannot write --jsonl: {e}")))?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let model_name = model_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut summary = report::summarize(&records, elapsed, 0, &method, &model_name, &device);
    summary.mode = mode;
    summary.errors = errors;
    summary.steps = stream.steps();
    summary.skipped_steps = stream.skipped_steps();
    summary.auto = auto_tally;
    if let Some(p) = &args.summary_json {
        write_atomic(p, serde_json::to_string_pretty(&summary)?.as_bytes())?;
    }
    if let Some(p) = &args.report {
        let title = format!("Acclimate: {method} on {model_name}");
        report::write_html(p, &summary, &records, &title).map_err(usage)?;
    }
    Ok(StreamRun { summary, records })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        usage(format!("cannot write {}: {e}", path.display()))
    })
}

fn progress_bar(show: bool, len: usize, unbounded: bool) -> Option<indicatif::ProgressBar> {
    if !show {
        return None;
    }
    let bar = if unbounded { indicatif::ProgressBar::new_spinner() } else { indicatif::ProgressBar::new(len as u64) };
    let style = indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    Some(bar)
}

fn log_line(bar: &Option<indicatif::ProgressBar>, msg: &str) {
    match bar {
        Some(b) => b.println(msg),
        None => eprintln!("{msg}"),
    }
}

/// A human-readable summary for the terminal.
pub fn summary_text(s: &Summary) -> String {
    let pct = |v: Option<f64>| v.map(|v| format!("{v:.2} %")).unwrap_or_else(|| "—".into());
    let mut out = format!(
        "frames {}  ({:.1} frames/s, {} dropped, latency median {:.1} ms, p95 {:.1} ms, max {:.1} ms)\n",
        s.frames, s.fps, s.drops, s.latency_median_ms, s.latency_p95_ms, s.latency_max_ms
    );
    out += &format!("accuracy: adapted ({}) {}   source {}\n", s.method, pct(s.accuracy), pct(s.source_accuracy));
    if s.per_segment.len() > 1 {
        out += &format!("{:<24} {:>7} {:>10} {:>10}\n", "segment", "frames", "adapted", "source");
        for seg in &s.per_segment {
            out += &format!(
                "{:<24} {:>7} {:>10} {:>10}\n",
                seg.name,
                seg.frames,
                pct(seg.accuracy),
                pct(seg.source_accuracy)
            );
        }
    }
    if let Some(a) = &s.auto {
        out += &a.line();
        out.push('\n');
    }
    if s.skipped_steps > 0 {
        out += &format!(
            "parameter guard: {} update(s) refused (they would have written NaN or infinity; the model kept its state)\n",
            s.skipped_steps
        );
    }
    out
}
