//! The run report of a stream: one record per frame, a summary (accuracy of the adapted and the
//! source model, throughput, latency percentiles, per-segment numbers) and a self-contained
//! HTML page with inline SVG plots (no scripts, stylesheets or fonts from elsewhere), so the
//! file can be mailed or archived as it is.
//!
//! Percentages are in percent (0–100). Percentiles use linear interpolation between the closest
//! ranks, NumPy's default: on the ascending latencies `x[0..n]`, the p-quantile is
//! `x[⌊h⌋] + (h − ⌊h⌋)·(x[⌊h⌋+1] − x[⌊h⌋])` with `h = p·(n − 1)`; the median is the
//! 0.5-quantile (the mean of the two middle values for even n).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What happened to one frame of the stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The frame's position in the stream.
    pub index: usize,
    /// The producer's timestamp (microseconds).
    pub timestamp_us: i64,
    /// The true class, when known.
    pub label: Option<u32>,
    /// The adapted model's prediction.
    pub pred: u32,
    /// Its probability.
    pub prob: f32,
    /// The unadapted (source) model's prediction, when it ran.
    pub source_pred: Option<u32>,
    /// From the frame's arrival to its result.
    pub latency_ms: f32,
    /// The shift segment the frame belongs to.
    pub segment: String,
    /// The frame was dropped: it has no prediction and counts only as a drop.
    pub dropped: bool,
}

/// The numbers of one segment (frames in the same shift condition).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegmentSummary {
    pub name: String,
    /// Frames with a prediction.
    pub frames: usize,
    /// Accuracy of the adapted model (percent) over the labelled frames.
    pub accuracy: Option<f64>,
    /// Accuracy of the source model (percent) over the labelled frames where it ran.
    pub source_accuracy: Option<f64>,
    /// How often (percent) the adapted and the source model predict the same class.
    pub agreement: Option<f64>,
}

/// A whole run in numbers; the `--summary-json` of `acclimate stream`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Frames with a prediction (dropped frames not included).
    pub frames: usize,
    /// Accuracy of the adapted model (percent) over labelled frames; `None` without labels.
    pub accuracy: Option<f64>,
    /// Accuracy of the source model (percent) over labelled frames where it ran.
    pub source_accuracy: Option<f64>,
    /// Frames per second: frames / elapsed wall time.
    pub fps: f64,
    /// Frames dropped by the stream policy.
    pub drops: usize,
    /// Frames with a label.
    pub labelled: usize,
    /// How often (percent) the adapted and the source model agree, over frames where both ran.
    pub agreement: Option<f64>,
    /// Median latency (ms), linear interpolation between closest ranks.
    pub latency_median_ms: f64,
    /// 95th-percentile latency (ms), same rule.
    pub latency_p95_ms: f64,
    /// 99th-percentile latency (ms), same rule.
    #[serde(default)]
    pub latency_p99_ms: f64,
    /// The longest latency (ms).
    #[serde(default)]
    pub latency_max_ms: f64,
    /// Wall time of the run (seconds).
    pub elapsed_s: f64,
    /// Segments in order of first appearance.
    pub per_segment: Vec<SegmentSummary>,
    /// Adaptation method.
    pub method: String,
    /// Stream policy mode (frame, batch, ...), filled in by the caller.
    pub mode: String,
    /// Model file name.
    pub model: String,
    /// GPU adapter.
    pub device: String,
    /// Frames that failed (unreadable images, failed pushes), filled in by the caller.
    pub errors: usize,
    /// Adaptation steps taken, filled in by the caller.
    pub steps: u64,
    /// Updates the parameter guard refused (they would have written NaN or infinity), filled
    /// in by the caller.
    pub skipped_steps: u64,
    /// Method `auto`: what it decided over the run, filled in by the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<AutoSummary>,
}

/// What method `auto` decided over a run (one decision per batch; frame mode: per window step).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AutoSummary {
    /// Batches (frame mode: window steps) it decided on.
    pub decisions: u64,
    /// Of those, judged label-correlated: no step, LAME smoothing over the source statistics.
    pub correlated: u64,
    /// Of those, judged label-shifted: no step, the source model corrected by the class prior.
    #[serde(default)]
    pub label_shift: u64,
    /// Of those, with an ETA step on the batch's statistics.
    pub stepped: u64,
    /// Of those, before any batch of 16 or more could be judged (no step, the source model).
    #[serde(default)]
    pub unjudged: u64,
    /// Of the correlated or label-shifted ones, with source predictions too uncertain for an
    /// output stage, or crowded by an uncorroborated source bias (returned as they are).
    #[serde(default)]
    pub uncertain: u64,
    /// Of the stepped ones, those whose inputs' shift dominated (the source statistics left the
    /// source model uncertain, the batch's own made it far more certain): a step with the
    /// batch's own statistics alone, whatever the labels looked like.
    #[serde(default)]
    pub dominated: u64,
    /// Of the stepped ones not dominated, those on which the source statistics biased the
    /// predictions (the source predictions' marginal skewed well beyond the batch-statistics
    /// view's): a step with the batch's own statistics alone.
    #[serde(default)]
    pub source_biased: u64,
    /// Of the stepped ones neither dominated nor biased, those whose source-statistics
    /// predictions diverged from the batch-statistics view's (their top-1 classes agreeing on
    /// under `view_agreement` of the batch, the view the more certain): a step with the batch's
    /// own statistics alone.
    #[serde(default)]
    pub diverged: u64,
    /// Of those, whose own statistics settled nothing (with them the model was vague, and they
    /// were close to the source's): no step, the source model's predictions.
    #[serde(default)]
    pub unsettled: u64,
    /// Collapse resets to the source.
    pub resets: u64,
    /// Mean share of a decision's batch predicted as the source statistics predict it.
    pub source_agreement: f64,
    /// Frame mode: frames whose top classes a class prior corrected (the latest decision judged
    /// the labels correlated or shifted: `FrameResult::prior_corrected`).
    #[serde(default)]
    pub prior_corrected_frames: u64,
    /// Mean covariate-shift score of the decisions that have one (a model with BatchNormalization).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covariate_shift: Option<f64>,
    /// Mean run excess of the source's top-1 classes in the decisions' order (`Diagnostics::run_excess`:
    /// 0 for an order that looks random, positive when classes come in runs), over the decisions
    /// that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_excess: Option<f64>,
    /// Every decision's scores, in stream order (the report's plot; the JSONL has them all).
    #[serde(skip)]
    pub timeline: Vec<AutoPoint>,
}

/// One decision of method `auto` on the report's plot.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoPoint {
    /// The stream position of the frame the decision was reported with.
    pub frame: usize,
    pub covariate_shift: Option<f32>,
    pub label_correlation: f32,
    pub label_skew: f32,
    pub batch_label_skew: f32,
    pub alpha: Option<f32>,
    pub source_agreement: f32,
    pub run_excess: Option<f32>,
}

impl AutoSummary {
    /// Adds one decision, reported with the frame at stream position `frame`.
    pub fn add(&mut self, frame: usize, d: &acclimate::adapt::methods::auto::Diagnostics) {
        self.source_agreement =
            (self.source_agreement * self.decisions as f64 + d.source_agreement as f64) / (self.decisions + 1) as f64;
        if let Some(k) = d.covariate_shift {
            let scored = self.timeline.iter().filter(|p| p.covariate_shift.is_some()).count() as f64;
            self.covariate_shift = Some((self.covariate_shift.unwrap_or(0.0) * scored + k as f64) / (scored + 1.0));
        }
        if let Some(r) = d.run_excess {
            let scored = self.timeline.iter().filter(|p| p.run_excess.is_some()).count() as f64;
            self.run_excess = Some((self.run_excess.unwrap_or(0.0) * scored + r as f64) / (scored + 1.0));
        }
        self.timeline.push(AutoPoint {
            frame,
            covariate_shift: d.covariate_shift,
            label_correlation: d.label_correlation_smoothed,
            label_skew: d.label_skew,
            batch_label_skew: d.batch_label_skew,
            alpha: d.alpha,
            source_agreement: d.source_agreement,
            run_excess: d.run_excess,
        });
        self.decisions += 1;
        self.correlated += d.correlated as u64;
        self.label_shift += d.label_shift as u64;
        self.stepped += d.stepped as u64;
        self.unjudged += d.unjudged as u64;
        self.uncertain += d.uncertain as u64;
        self.dominated += d.dominated as u64;
        self.source_biased += (d.source_biased && !d.dominated && d.alpha.is_some()) as u64;
        self.diverged += (d.diverged && !d.source_biased && !d.dominated && d.alpha.is_some()) as u64;
        self.unsettled += d.unsettled as u64;
        self.resets += d.reset as u64;
    }

    /// One line for the terminal: what `auto` decided.
    pub fn line(&self) -> String {
        format!(
            "auto: {} decisions: {} adapted (ETA step, source-anchored statistics), {} label-correlated \
             (no step; LAME smoothing over the source model: {}), {} label-shifted (no step; prior correction \
             over the source model: {}), {} too small to judge (fewer than {} frames: \
             no step), {} collapse reset(s); agreement with the source model {:.1} %",
            self.decisions,
            self.stepped,
            self.correlated,
            if self.correlated > 0 { "on" } else { "never needed" },
            self.label_shift,
            if self.label_shift > 0 { "on" } else { "never needed" },
            self.unjudged,
            acclimate::adapt::methods::auto::MIN_CORRELATION_BATCH,
            self.resets,
            100.0 * self.source_agreement
        ) + &match self.dominated {
            0 => String::new(),
            n => format!(
                "; {n} of the adapted decision(s) on the batch's own statistics alone (the inputs' shift \
                 dominated: the batch statistics made the source model far more certain)"
            ),
        } + &match self.source_biased {
            0 => String::new(),
            n => format!(
                "; {n} of the adapted decision(s) on the batch's own statistics alone (the source statistics \
                 biased the predictions: their class marginal far more skewed than the batch statistics')"
            ),
        } + &match self.diverged {
            0 => String::new(),
            n => format!(
                "; {n} of the adapted decision(s) on the batch's own statistics alone (the source statistics' \
                 predictions diverged from the batch statistics': different classes for most of the batch)"
            ),
        } + &match self.unsettled {
            0 => String::new(),
            n => format!(
                "; {n} decision(s) took no step because the batch's own statistics settled nothing (with them \
                 the model was vague, and they were close to the source's): the source model's predictions"
            ),
        } + &match self.uncertain {
            0 => String::new(),
            n => format!(
                "; {n} of the correlated or label-shifted decision(s) returned the source model's predictions \
                 as they are (too uncertain, or possibly crowded by the source statistics, to smooth or correct)"
            ),
        } + &match self.prior_corrected_frames {
            0 => String::new(),
            n => format!(
                "; {n} frame(s) corrected by a class prior (the recent frames' classes when labels are \
                 correlated, the estimated class prior when they are shifted)"
            ),
        } + &match self.covariate_shift {
            Some(k) => format!("; covariate shift (mean KL of the BatchNorm statistics from the source's) {k:.3}"),
            None => String::new(),
        }
    }
}

/// Errors of writing the report.
#[derive(Debug, Error)]
pub enum ReportError {
    #[error("cannot write the report {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot draw the {what} plot: {reason}")]
    Plot { what: &'static str, reason: String },
}

/// The p-quantile (p in [0, 1]) of ascending `sorted` by linear interpolation between the
/// closest ranks (NumPy's default); 0 for an empty slice.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let h = p.clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = h.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
        }
    }
}

fn pct(hits: usize, total: usize) -> Option<f64> {
    (total > 0).then(|| 100.0 * hits as f64 / total as f64)
}

/// Counts of one group of records.
#[derive(Default)]
struct Tally {
    frames: usize,
    labelled: usize,
    correct: usize,
    source_labelled: usize,
    source_correct: usize,
    both: usize,
    agree: usize,
}

impl Tally {
    fn add(&mut self, r: &RunRecord) {
        self.frames += 1;
        if let Some(l) = r.label {
            self.labelled += 1;
            self.correct += (r.pred == l) as usize;
            if let Some(s) = r.source_pred {
                self.source_labelled += 1;
                self.source_correct += (s == l) as usize;
            }
        }
        if let Some(s) = r.source_pred {
            self.both += 1;
            self.agree += (s == r.pred) as usize;
        }
    }
}

/// The summary of a run: `records` in stream order, `elapsed_s` its wall time, `drops` the
/// frames dropped without a record (records marked `dropped` are added to it).
pub fn summarize(
    records: &[RunRecord],
    elapsed_s: f64,
    drops: usize,
    method: &str,
    model: &str,
    device: &str,
) -> Summary {
    let mut total = Tally::default();
    let mut segments: Vec<(String, Tally)> = Vec::new();
    let mut latencies = Vec::with_capacity(records.len());
    let mut dropped = 0;
    for r in records {
        if r.dropped {
            dropped += 1;
            continue;
        }
        total.add(r);
        latencies.push(r.latency_ms as f64);
        match segments.iter_mut().find(|(n, _)| *n == r.segment) {
            Some((_, t)) => t.add(r),
            None => {
                let mut t = Tally::default();
                t.add(r);
                segments.push((r.segment.clone(), t));
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    Summary {
        frames: total.frames,
        accuracy: pct(total.correct, total.labelled),
        source_accuracy: pct(total.source_correct, total.source_labelled),
        fps: if elapsed_s > 0.0 { total.frames as f64 / elapsed_s } else { 0.0 },
        drops: drops + dropped,
        labelled: total.labelled,
        agreement: pct(total.agree, total.both),
        latency_median_ms: percentile(&latencies, 0.5),
        latency_p95_ms: percentile(&latencies, 0.95),
        latency_p99_ms: percentile(&latencies, 0.99),
        latency_max_ms: latencies.last().copied().unwrap_or(0.0),
        elapsed_s,
        per_segment: segments
            .into_iter()
            .map(|(name, t)| SegmentSummary {
                name,
                frames: t.frames,
                accuracy: pct(t.correct, t.labelled),
                source_accuracy: pct(t.source_correct, t.source_labelled),
                agreement: pct(t.agree, t.both),
            })
            .collect(),
        method: method.to_string(),
        mode: String::new(),
        model: model.to_string(),
        device: device.to_string(),
        errors: 0,
        steps: 0,
        skipped_steps: 0,
        auto: None,
    }
}

// ---------------------------------------------------------------------------------------------
// HTML

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn fmt_pct(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2} %")).unwrap_or_else(|| "—".into())
}

const ADAPTED: RGBColor = RGBColor(31, 119, 180);
const SOURCE: RGBColor = RGBColor(230, 120, 20);
const SIZE: (u32, u32) = (900, 340);
/// Plots are thinned to about this many points per line: the page stays small for long runs.
const MAX_POINTS: usize = 1500;

type DrawError = DrawingAreaErrorKind<std::io::Error>;

fn plot_err(what: &'static str) -> impl Fn(DrawError) -> ReportError {
    move |e| ReportError::Plot { what, reason: e.to_string() }
}

/// Whether the x position `i` of `n` is kept when thinning a line to about `MAX_POINTS`.
fn keep(i: usize, n: usize) -> bool {
    let step = n.div_ceil(MAX_POINTS).max(1);
    i.is_multiple_of(step) || i + 1 == n
}

/// What the accuracy plots compare: against labels, or (without labels) adapted vs source.
enum Target {
    Labels,
    Agreement,
}

/// Running and windowed hit rates (percent) of the adapted and the source model over the
/// frames that count for `target`, with their stream index.
struct Curves {
    x: Vec<f64>,
    running: [Vec<f64>; 2],
    windowed: [Vec<f64>; 2],
    window: usize,
    has_source: bool,
}

fn curves(records: &[&RunRecord], target: &Target) -> Curves {
    // (index, adapted hit, source hit) per counted frame.
    let hits: Vec<(usize, bool, Option<bool>)> = records
        .iter()
        .filter_map(|r| match target {
            Target::Labels => r.label.map(|l| (r.index, r.pred == l, r.source_pred.map(|s| s == l))),
            Target::Agreement => r.source_pred.map(|s| (r.index, r.pred == s, None)),
        })
        .collect();
    let n = hits.len();
    let window = (n / 20).clamp(10, 200);
    let has_source = hits.iter().any(|h| h.2.is_some());
    let mut c = Curves { x: vec![], running: [vec![], vec![]], windowed: [vec![], vec![]], window, has_source };
    let (mut sum, mut wsum) = ([0usize; 2], [0usize; 2]);
    let (mut seen_src, mut wsrc) = (0usize, 0usize);
    for (i, &(index, a, s)) in hits.iter().enumerate() {
        sum[0] += a as usize;
        wsum[0] += a as usize;
        if let Some(s) = s {
            seen_src += 1;
            sum[1] += s as usize;
            wsum[1] += s as usize;
            wsrc += 1;
        }
        if i >= window {
            let (_, a_old, s_old) = hits[i - window];
            wsum[0] -= a_old as usize;
            if let Some(s_old) = s_old {
                wsum[1] -= s_old as usize;
                wsrc -= 1;
            }
        }
        if keep(i, n) {
            let w = (i + 1).min(window);
            c.x.push(index as f64);
            c.running[0].push(100.0 * sum[0] as f64 / (i + 1) as f64);
            c.windowed[0].push(100.0 * wsum[0] as f64 / w as f64);
            c.running[1].push(if seen_src > 0 { 100.0 * sum[1] as f64 / seen_src as f64 } else { f64::NAN });
            c.windowed[1].push(if wsrc > 0 { 100.0 * wsum[1] as f64 / wsrc as f64 } else { f64::NAN });
        }
    }
    c
}

/// Where each segment starts: (first stream index, name), for segments after the first.
fn segment_starts(records: &[&RunRecord]) -> Vec<(f64, String)> {
    let mut out = Vec::new();
    for pair in records.windows(2) {
        if pair[0].segment != pair[1].segment {
            out.push((pair[1].index as f64, pair[1].segment.clone()));
        }
    }
    out
}

/// A line chart of percentages over the stream index. `lines`: (name, colour, ys).
fn line_chart(
    what: &'static str,
    caption: &str,
    y_desc: &str,
    x: &[f64],
    lines: &[(&str, RGBColor, &[f64])],
    starts: &[(f64, String)],
) -> Result<String, ReportError> {
    line_chart_to(what, caption, y_desc, 100.0, x, lines, starts)
}

/// [`line_chart`] with the y axis from 0 to `y_max`.
fn line_chart_to(
    what: &'static str,
    caption: &str,
    y_desc: &str,
    y_max: f64,
    x: &[f64],
    lines: &[(&str, RGBColor, &[f64])],
    starts: &[(f64, String)],
) -> Result<String, ReportError> {
    let err = plot_err(what);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let x0 = x.first().copied().unwrap_or(0.0);
        let x1 = x.last().copied().unwrap_or(1.0).max(x0 + 1.0);
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .caption(caption, ("sans-serif", 17))
            .x_label_area_size(38)
            .y_label_area_size(48)
            .build_cartesian_2d(x0..x1, 0f64..y_max)
            .map_err(&err)?;
        let decimals = if y_max >= 20.0 { 0 } else { 2 };
        chart
            .configure_mesh()
            .x_desc("frame")
            .y_desc(y_desc)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.decimals$}"))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(&err)?;
        for (xs, name) in starts {
            chart
                .draw_series(std::iter::once(PathElement::new(vec![(*xs, 0.0), (*xs, y_max)], BLACK.mix(0.35))))
                .map_err(&err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    name.clone(),
                    (*xs, 0.99 * y_max),
                    ("sans-serif", 11).into_font(),
                )))
                .map_err(&err)?;
        }
        for &(name, colour, ys) in lines {
            // NaN (nothing counted yet) splits nothing: those points are simply left out.
            let pts: Vec<(f64, f64)> = x.iter().zip(ys).filter(|(_, y)| y.is_finite()).map(|(&a, &b)| (a, b)).collect();
            chart
                .draw_series(LineSeries::new(pts, colour.stroke_width(2)))
                .map_err(&err)?
                .label(name)
                .legend(move |(lx, ly)| PathElement::new(vec![(lx, ly), (lx + 20, ly)], colour.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(&err)?;
        root.present().map_err(&err)?;
    }
    Ok(svg)
}

/// Which number of a segment a bar shows.
type Pick = fn(&SegmentSummary) -> Option<f64>;

/// Grouped bars per segment: adapted and source (percent).
fn segment_chart(summary: &Summary, target: &Target) -> Result<String, ReportError> {
    let err = plot_err("per-segment");
    let segs = &summary.per_segment;
    let n = segs.len();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let caption = match target {
            Target::Labels => "Accuracy per segment",
            Target::Agreement => "Agreement with the source model per segment",
        };
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .caption(caption, ("sans-serif", 17))
            .x_label_area_size(38)
            .y_label_area_size(48)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..100f64)
            .map_err(&err)?;
        let names: Vec<String> = segs.iter().map(|s| s.name.clone()).collect();
        let label = move |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&label)
            .y_desc("%")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(&err)?;
        let bars = |pick: Pick, lo: f64, hi: f64, colour: RGBColor| {
            segs.iter()
                .enumerate()
                .filter_map(move |(i, s)| pick(s).map(|v| (i as f64, v)))
                .map(move |(i, v)| Rectangle::new([(i + lo, 0.0), (i + hi, v)], colour.filled()))
                .collect::<Vec<_>>()
        };
        let (adapted, source): (Pick, Option<Pick>) = match target {
            Target::Labels => (|s| s.accuracy, Some(|s| s.source_accuracy)),
            Target::Agreement => (|s| s.agreement, None),
        };
        chart
            .draw_series(bars(adapted, -0.4, if source.is_some() { 0.0 } else { 0.4 }, ADAPTED))
            .map_err(&err)?
            .label(match target {
                Target::Labels => "adapted",
                Target::Agreement => "adapted = source",
            })
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], ADAPTED.filled()));
        if let Some(source) = source {
            chart
                .draw_series(bars(source, 0.0, 0.4, SOURCE))
                .map_err(&err)?
                .label("source")
                .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], SOURCE.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(&err)?;
        root.present().map_err(&err)?;
    }
    Ok(svg)
}

/// An axis label with as many decimals as a span of `span` needs.
fn tick(v: f64, span: f64) -> String {
    let decimals = if span >= 20.0 {
        0
    } else if span >= 2.0 {
        1
    } else {
        2
    };
    format!("{v:.decimals$}")
}

/// A histogram of frame latencies with the median and p95 marked.
fn latency_chart(records: &[&RunRecord], summary: &Summary) -> Result<String, ReportError> {
    let err = plot_err("latency");
    let lat: Vec<f64> = records.iter().map(|r| r.latency_ms as f64).filter(|v| v.is_finite()).collect();
    let lo = lat.iter().copied().fold(f64::INFINITY, f64::min).min(summary.latency_median_ms);
    let hi = lat.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lat.is_empty() { (0.0, 1.0) } else { (lo, if hi - lo > 1e-9 { hi } else { lo + 1.0 }) };
    let bins = ((lat.len() as f64).sqrt().ceil() as usize).clamp(1, 40);
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0usize; bins];
    for v in &lat {
        counts[(((v - lo) / width) as usize).min(bins - 1)] += 1;
    }
    // Headroom for the legend above the tallest bar.
    let top = counts.iter().copied().max().unwrap_or(0).max(1) as f64 * 1.35;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .caption("Latency per frame", ("sans-serif", 17))
            .x_label_area_size(38)
            .y_label_area_size(48)
            .build_cartesian_2d(lo..hi, 0f64..top)
            .map_err(&err)?;
        chart
            .configure_mesh()
            .x_desc("latency (ms)")
            .y_desc("frames")
            .x_label_formatter(&|v| tick(*v, hi - lo))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(&err)?;
        chart
            .draw_series(counts.iter().enumerate().map(|(i, &c)| {
                let x0 = lo + i as f64 * width;
                Rectangle::new([(x0 + 0.04 * width, 0.0), (x0 + 0.96 * width, c as f64)], ADAPTED.filled())
            }))
            .map_err(&err)?;
        for (name, v, colour) in [("median", summary.latency_median_ms, BLACK), ("p95", summary.latency_p95_ms, SOURCE)]
        {
            chart
                .draw_series(std::iter::once(PathElement::new(vec![(v, 0.0), (v, top)], colour.stroke_width(2))))
                .map_err(&err)?
                .label(format!("{name} {v:.2} ms"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(&err)?;
        root.present().map_err(&err)?;
    }
    Ok(svg)
}

fn summary_table(s: &Summary) -> String {
    let rows: Vec<(&str, String)> = vec![
        ("method", s.method.clone()),
        ("stream mode", if s.mode.is_empty() { "—".into() } else { s.mode.clone() }),
        ("model", s.model.clone()),
        ("device", s.device.clone()),
        ("frames", s.frames.to_string()),
        ("labelled frames", s.labelled.to_string()),
        ("frames per second", format!("{:.2}", s.fps)),
        ("dropped frames", s.drops.to_string()),
        ("frame errors", s.errors.to_string()),
        ("adaptation steps", s.steps.to_string()),
        ("steps refused by the parameter guard (non-finite)", s.skipped_steps.to_string()),
        ("accuracy, adapted", fmt_pct(s.accuracy)),
        ("accuracy, source", fmt_pct(s.source_accuracy)),
        ("agreement adapted = source", fmt_pct(s.agreement)),
        ("latency median", format!("{:.2} ms", s.latency_median_ms)),
        ("latency p95", format!("{:.2} ms", s.latency_p95_ms)),
        ("latency p99 / max", format!("{:.2} / {:.2} ms", s.latency_p99_ms, s.latency_max_ms)),
        ("wall time", format!("{:.2} s", s.elapsed_s)),
    ];
    let mut t = String::from("<table class=\"summary\">\n");
    for (k, v) in rows {
        t += &format!("<tr><th>{}</th><td>{}</td></tr>\n", escape(k), escape(&v));
    }
    t + "</table>\n"
}

fn segment_table(s: &Summary) -> String {
    let mut t = String::from(
        "<table>\n<tr><th>segment</th><th>frames</th><th>adapted</th><th>source</th><th>agreement</th></tr>\n",
    );
    for seg in &s.per_segment {
        t += &format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            escape(&seg.name),
            seg.frames,
            fmt_pct(seg.accuracy),
            fmt_pct(seg.source_accuracy),
            fmt_pct(seg.agreement)
        );
    }
    t + "</table>\n"
}

const STYLE: &str = "body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}\
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 10px;text-align:left}\
table.summary th{background:#f4f4f4}p.note{color:#555}svg{display:block;margin:1em 0}";

/// The report page as a string (see [`write_html`]).
pub fn render_html(summary: &Summary, records: &[RunRecord], title: &str) -> Result<String, ReportError> {
    let mut body = format!("<h1>{}</h1>\n<h2>Summary</h2>\n{}", escape(title), summary_table(summary));
    let mut kept: Vec<&RunRecord> = records.iter().filter(|r| !r.dropped).collect();
    kept.sort_by_key(|r| r.index);
    if kept.is_empty() {
        body += "<p class=\"note\">No frames were processed: there is nothing to plot.</p>\n";
    } else {
        let target = if kept.iter().any(|r| r.label.is_some()) {
            Some(Target::Labels)
        } else if kept.iter().any(|r| r.source_pred.is_some()) {
            Some(Target::Agreement)
        } else {
            None
        };
        let starts = segment_starts(&kept);
        match &target {
            Some(t) => {
                let c = curves(&kept, t);
                let (y_desc, what) = match t {
                    Target::Labels => ("accuracy (%)", "accuracy"),
                    Target::Agreement => ("agreement (%)", "agreement with the source model"),
                };
                body += "<h2>Over the stream</h2>\n";
                if matches!(t, Target::Agreement) {
                    body += "<p class=\"note\">The frames have no labels: the plots show how often the adapted \
                             model predicts the source model's class.</p>\n";
                }
                let mut lines: Vec<(&str, RGBColor, &[f64])> = vec![("adapted", ADAPTED, &c.running[0])];
                if c.has_source {
                    lines.push(("source", SOURCE, &c.running[1]));
                }
                body += &line_chart("running", &format!("Running {what}"), y_desc, &c.x, &lines, &starts)?;
                let mut lines: Vec<(&str, RGBColor, &[f64])> = vec![("adapted", ADAPTED, &c.windowed[0])];
                if c.has_source {
                    lines.push(("source", SOURCE, &c.windowed[1]));
                }
                let caption = format!("{} over the last {} frames", capitalise(what), c.window);
                body += &line_chart("windowed", &caption, y_desc, &c.x, &lines, &starts)?;
            }
            None => {
                body += "<p class=\"note\">The frames have no labels and the source model did not run: there \
                         is no accuracy to plot.</p>\n";
            }
        }
        body += "<h2>Segments</h2>\n";
        if let Some(t) = &target {
            body += &segment_chart(summary, t)?;
        }
        body += &segment_table(summary);
        body += "<h2>Latency</h2>\n";
        body += &latency_chart(&kept, summary)?;
        if let Some(a) = &summary.auto {
            body += &auto_section(a, &starts)?;
        }
    }
    Ok(format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>{STYLE}</style>\n\
         </head>\n<body>\n{body}</body>\n</html>\n",
        escape(title)
    ))
}

/// Method `auto`'s decisions: the tally, and its scores over the stream.
fn auto_section(a: &AutoSummary, starts: &[(f64, String)]) -> Result<String, ReportError> {
    let mut out = format!("<h2>Method auto</h2>\n<p>{}</p>\n", escape(&a.line()));
    if a.timeline.is_empty() {
        return Ok(out);
    }
    // Thinned as the accuracy curves are: the page stays small on long runs.
    let n = a.timeline.len();
    let points: Vec<&AutoPoint> = a.timeline.iter().enumerate().filter(|(i, _)| keep(*i, n)).map(|(_, p)| p).collect();
    let x: Vec<f64> = points.iter().map(|p| p.frame as f64).collect();
    let pct = |f: fn(&AutoPoint) -> Option<f32>| -> Vec<f64> {
        points.iter().map(|p| f(p).map_or(f64::NAN, |v| 100.0 * v as f64)).collect()
    };
    let (rho, skew, batch_skew, alpha, agree) = (
        pct(|p| Some(p.label_correlation)),
        pct(|p| Some(p.label_skew)),
        pct(|p| Some(p.batch_label_skew)),
        pct(|p| p.alpha),
        pct(|p| Some(p.source_agreement)),
    );
    let lines: Vec<(&str, RGBColor, &[f64])> = vec![
        ("label correlation (smoothed)", RGBColor(214, 39, 40), &rho),
        ("label skew", RGBColor(148, 103, 189), &skew),
        ("label skew, batch statistics", RGBColor(140, 86, 75), &batch_skew),
        ("BN-α α of the step", RGBColor(44, 160, 44), &alpha),
        ("agreement with the source model", ADAPTED, &agree),
    ];
    out += "<p class=\"note\">One point per decision (a batch, or a window step in frame mode). Labels are \
            judged correlated above the correlation threshold and shifted when both skews are above the skew \
            threshold; a step normalises with α of the batch's own statistics.</p>\n";
    out += &line_chart("auto scores", "Method auto: scores per decision", "%", &x, &lines, starts)?;
    let shift: Vec<f64> = points.iter().map(|p| p.covariate_shift.map_or(f64::NAN, |v| v as f64)).collect();
    let top = shift.iter().copied().filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    if top > 0.0 {
        let lines: Vec<(&str, RGBColor, &[f64])> = vec![("covariate shift", SOURCE, &shift)];
        out += &line_chart_to(
            "covariate shift",
            "Covariate shift: mean KL of the BatchNorm statistics from the source's",
            "KL (nats)",
            1.1 * top,
            &x,
            &lines,
            starts,
        )?;
    }
    Ok(out)
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().collect::<String>() + c.as_str()).unwrap_or_default()
}

/// Writes the self-contained HTML report to `path` atomically (a temporary file next to it,
/// synced, then renamed): a reader never sees a half-written page.
pub fn write_html(path: &Path, summary: &Summary, records: &[RunRecord], title: &str) -> Result<(), ReportError> {
    let page = render_html(summary, records, title)?;
    write_atomic(path, page.as_bytes())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    let io = |source| ReportError::Io { path: path.to_path_buf(), source };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "report".into());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}
