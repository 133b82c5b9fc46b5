//! The run report: summary numbers on hand-made records (counted by hand in the comments), the
//! percentile rule, the self-contained HTML page in its cases (labels, no labels, no frames) and
//! its atomic write.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use acclimate::AutoDiagnostics;
use acclimate_cli::stream::report::{AutoSummary, RunRecord, Summary, percentile, render_html, summarize, write_html};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "acclimate-stream-report-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rec(
    index: usize,
    label: Option<u32>,
    pred: u32,
    source_pred: Option<u32>,
    latency_ms: f32,
    segment: &str,
) -> RunRecord {
    RunRecord {
        index,
        timestamp_us: index as i64 * 1000,
        label,
        pred,
        prob: 0.5,
        source_pred,
        latency_ms,
        segment: segment.to_string(),
        dropped: false,
    }
}

/// Ten frames in two segments, one dropped.
fn records() -> Vec<RunRecord> {
    let mut r = vec![
        // segment "clean": labelled 4; adapted right 3 (0, 1, 3); source right 2 (0, 2).
        rec(0, Some(1), 1, Some(1), 4.0, "clean"),
        rec(1, Some(2), 2, Some(0), 1.0, "clean"),
        rec(2, Some(3), 0, Some(3), 3.0, "clean"),
        rec(3, Some(4), 4, Some(5), 2.0, "clean"),
        // segment "noise": labelled 3 (5, 6, 8); adapted right 1 (6); source ran on 5 and 6
        // only, right on 6; frame 7 unlabelled.
        rec(5, Some(0), 9, Some(9), 10.0, "noise"),
        rec(6, Some(7), 7, Some(7), 6.0, "noise"),
        rec(7, None, 3, Some(3), 8.0, "noise"),
        rec(8, Some(1), 2, None, 5.0, "noise"),
    ];
    // A dropped frame: no prediction, must not count anywhere but in the drops.
    let mut d = rec(4, Some(1), 0, Some(0), 1000.0, "clean");
    d.dropped = true;
    r.insert(4, d);
    r
}

#[test]
fn percentile_rule_is_linear_between_closest_ranks() {
    assert_eq!(percentile(&[], 0.5), 0.0);
    assert_eq!(percentile(&[7.0], 0.95), 7.0);
    assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.5);
    // h = 0.95·3 = 2.85: 3 + 0.85·(4 − 3).
    assert!((percentile(&[1.0, 2.0, 3.0, 4.0], 0.95) - 3.85).abs() < 1e-12);
    assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.5), 3.0);
    assert_eq!(percentile(&[1.0, 2.0, 3.0], 1.0), 3.0);
    assert_eq!(percentile(&[1.0, 2.0, 3.0], 0.0), 1.0);
}

#[test]
fn summarize_counts_by_hand() {
    let s = summarize(&records(), 2.0, 3, "tent", "svhn.onnx", "llvmpipe");
    assert_eq!(s.frames, 8);
    assert_eq!(s.drops, 3 + 1);
    assert_eq!(s.labelled, 7);
    assert_eq!(s.fps, 4.0);
    // Adapted: 4 right of 7 labelled. Source: 3 right of the 6 labelled frames where it ran.
    assert!((s.accuracy.unwrap() - 400.0 / 7.0).abs() < 1e-9);
    assert!((s.source_accuracy.unwrap() - 50.0).abs() < 1e-9);
    // Agreement over the 7 frames with a source prediction: frames 0, 5, 6, 7 agree.
    assert!((s.agreement.unwrap() - 400.0 / 7.0).abs() < 1e-9);
    // Latencies (dropped excluded) sorted: 1 2 3 4 5 6 8 10; median (4+5)/2; p95: h = 6.65,
    // 8 + 0.65·2.
    assert!((s.latency_median_ms - 4.5).abs() < 1e-9);
    assert!((s.latency_p95_ms - 9.3).abs() < 1e-9);
    // p99: h = 6.93, 8 + 0.93·2; the longest 10.
    assert!((s.latency_p99_ms - 9.86).abs() < 1e-9);
    assert_eq!(s.latency_max_ms, 10.0);
    assert_eq!(s.per_segment.len(), 2);
    let clean = &s.per_segment[0];
    assert_eq!((clean.name.as_str(), clean.frames), ("clean", 4));
    assert_eq!((clean.accuracy, clean.source_accuracy, clean.agreement), (Some(75.0), Some(50.0), Some(25.0)));
    let noise = &s.per_segment[1];
    assert_eq!((noise.name.as_str(), noise.frames), ("noise", 4));
    assert!((noise.accuracy.unwrap() - 100.0 / 3.0).abs() < 1e-9);
    assert_eq!(noise.source_accuracy, Some(50.0));
    assert_eq!(noise.agreement, Some(100.0));
    assert_eq!((s.method.as_str(), s.model.as_str(), s.device.as_str()), ("tent", "svhn.onnx", "llvmpipe"));

    // No labels: no accuracies, and nothing divides by zero.
    let unlabelled: Vec<RunRecord> = records().into_iter().map(|r| RunRecord { label: None, ..r }).collect();
    let s = summarize(&unlabelled, 0.0, 0, "norm", "m", "d");
    assert_eq!((s.accuracy, s.source_accuracy, s.labelled, s.fps), (None, None, 0, 0.0));
    assert!(s.per_segment.iter().all(|seg| seg.accuracy.is_none()));
}

#[test]
fn summary_json_keys() {
    let s = summarize(&records(), 1.0, 0, "tent", "m.onnx", "gpu");
    let v = serde_json::to_value(&s).unwrap();
    for key in [
        "frames",
        "accuracy",
        "source_accuracy",
        "fps",
        "drops",
        "latency_median_ms",
        "latency_p95_ms",
        "latency_p99_ms",
        "latency_max_ms",
        "per_segment",
        "method",
        "model",
        "device",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert_eq!(v["per_segment"][1]["name"], "noise");
    let back: Summary = serde_json::from_value(v).unwrap();
    assert_eq!(back, s);
}

/// No external resources: nothing fetched by `src`, `href`, `url(...)` or `@import`, no scripts.
fn assert_self_contained(html: &str) {
    let lower = html.to_ascii_lowercase();
    for bad in ["src=", "href=", "url(", "@import", "<script", "<link", "<img", "<iframe"] {
        assert!(!lower.contains(bad), "the page contains {bad}");
    }
    assert!(lower.starts_with("<!doctype html>"));
    assert!(lower.trim_end().ends_with("</html>"));
}

#[test]
fn html_with_labels_has_all_plots() {
    let recs = records();
    let s = summarize(&recs, 2.0, 0, "tent", "svhn<1>.onnx", "llvmpipe & co");
    let html = render_html(&s, &recs, "Run <1> & \"two\"").unwrap();
    assert_self_contained(&html);
    // Running accuracy, windowed accuracy, per-segment bars, latency histogram.
    assert_eq!(html.matches("<svg").count(), 4, "{html}");
    assert_eq!(html.matches("</svg>").count(), 4);
    assert!(html.contains("Running accuracy"));
    assert!(html.contains("Accuracy over the last 10 frames"));
    assert!(html.contains("Accuracy per segment"));
    assert!(html.contains("Latency per frame"));
    // Escaped user text; the summary table's numbers.
    assert!(html.contains("<title>Run &lt;1&gt; &amp; &quot;two&quot;</title>"));
    assert!(html.contains("svhn&lt;1&gt;.onnx") && html.contains("llvmpipe &amp; co"));
    assert!(!html.contains("svhn<1>"));
    assert!(html.contains("57.14 %") && html.contains("50.00 %"));
    assert!(html.contains("<td>noise</td><td>4</td><td>33.33 %</td><td>50.00 %</td><td>100.00 %</td>"));
    // The segment boundary is drawn with its name on both line plots, and names the bars.
    assert_eq!(html.matches(">\nnoise\n</text>").count(), 3, "{html}");
    assert_eq!(html.matches(">\nclean\n</text>").count(), 1);
}

#[test]
fn html_without_labels_plots_agreement() {
    let recs: Vec<RunRecord> = records().into_iter().map(|r| RunRecord { label: None, ..r }).collect();
    let s = summarize(&recs, 1.0, 0, "tent", "m", "d");
    let html = render_html(&s, &recs, "no labels").unwrap();
    assert_self_contained(&html);
    assert!(html.contains("have no labels"));
    assert!(html.contains("Running agreement with the source model"));
    assert!(html.contains("Agreement with the source model per segment"));
    assert_eq!(html.matches("<svg").count(), 4);

    // Neither labels nor source predictions: only the latency plot.
    let bare: Vec<RunRecord> = recs.into_iter().map(|r| RunRecord { source_pred: None, ..r }).collect();
    let s = summarize(&bare, 1.0, 0, "tent", "m", "d");
    let html = render_html(&s, &bare, "bare").unwrap();
    assert_self_contained(&html);
    assert!(html.contains("no accuracy to plot"));
    assert_eq!(html.matches("<svg").count(), 1);
}

fn diagnostics(stepped: bool, covariate_shift: Option<f32>) -> AutoDiagnostics {
    AutoDiagnostics {
        label_correlation: Some(0.1),
        label_correlation_smoothed: 0.05,
        correlated: false,
        label_skew: 0.02,
        label_shift: false,
        unjudged: false,
        stepped,
        source_agreement: 0.75,
        mean_entropy: 0.9,
        source_mean_entropy: 0.95,
        top_share: 0.2,
        source_entropy: 0.1,
        uncertain: false,
        reset: false,
        batch_label_skew: 0.01,
        batch_entropy: Some(0.2),
        dominated: false,
        source_biased: false,
        diverged: false,
        unsettled: false,
        view_agreement: Some(0.8),
        run_length: Some(2.0),
        run_excess: covariate_shift.map(|k| k * 0.5),
        alpha: stepped.then_some(0.1),
        covariate_shift,
    }
}

/// Method auto's decisions: the tally (the covariate-shift mean over the decisions that have a
/// score) and, on the page, its line and both plots of the scores.
#[test]
fn html_shows_what_auto_decided() {
    let recs = records();
    let mut s = summarize(&recs, 2.0, 0, "auto", "m", "d");
    let mut a = AutoSummary::default();
    a.add(0, &diagnostics(true, Some(0.5)));
    a.add(4, &diagnostics(false, Some(1.5)));
    a.add(8, &diagnostics(true, None));
    assert_eq!((a.decisions, a.stepped, a.covariate_shift), (3, 2, Some(1.0)));
    assert!(a.line().contains("covariate shift (mean KL of the BatchNorm statistics from the source's) 1.000"));
    assert!(!a.line().contains("class prior") && !a.line().contains("dominated"));
    // A step the inputs' shift dominated is counted and said.
    a.add(9, &AutoDiagnostics { dominated: true, alpha: Some(1.0), ..diagnostics(true, Some(1.0)) });
    assert_eq!((a.decisions, a.stepped, a.dominated), (4, 3, 1));
    assert!(a.line().contains("1 of the adapted decision(s) on the batch's own statistics alone"), "{}", a.line());
    // So is one on which the source statistics biased the predictions (a dominated one is
    // counted once, as dominated; a batch that did not step is not counted).
    a.add(10, &AutoDiagnostics { source_biased: true, alpha: Some(1.0), ..diagnostics(true, Some(1.0)) });
    a.add(
        11,
        &AutoDiagnostics { source_biased: true, dominated: true, alpha: Some(1.0), ..diagnostics(true, Some(1.0)) },
    );
    a.add(12, &AutoDiagnostics { source_biased: true, ..diagnostics(false, Some(1.0)) });
    assert_eq!((a.decisions, a.stepped, a.dominated, a.source_biased), (7, 5, 2, 1));
    assert!(
        a.line().contains("1 of the adapted decision(s) on the batch's own statistics alone (the source statistics")
    );
    // And one whose source-statistics predictions diverged from the batch statistics' (counted
    // once, as biased, when it is both).
    a.add(13, &AutoDiagnostics { diverged: true, alpha: Some(1.0), ..diagnostics(true, Some(1.0)) });
    a.add(
        14,
        &AutoDiagnostics { diverged: true, source_biased: true, alpha: Some(1.0), ..diagnostics(true, Some(1.0)) },
    );
    assert_eq!((a.decisions, a.stepped, a.dominated, a.source_biased, a.diverged), (9, 7, 2, 2, 1));
    assert!(a.line().contains("1 of the adapted decision(s) on the batch's own statistics alone (the source statistics' predictions diverged"), "{}", a.line());
    // One whose own statistics settled nothing: no step, counted and said.
    assert!(!a.line().contains("settled nothing"));
    a.add(15, &AutoDiagnostics { unsettled: true, ..diagnostics(false, Some(1.0)) });
    assert_eq!((a.decisions, a.stepped, a.unsettled), (10, 7, 1));
    assert!(
        a.line().contains("1 decision(s) took no step because the batch's own statistics settled nothing"),
        "{}",
        a.line()
    );
    a.prior_corrected_frames = 7;
    assert!(a.line().contains("7 frame(s) corrected by a class prior"), "{}", a.line());
    s.auto = Some(a.clone());
    let html = render_html(&s, &recs, "auto").unwrap();
    assert_self_contained(&html);
    assert!(html.contains("<h2>Method auto</h2>") && html.contains("7 adapted"), "{html}");
    assert!(html.contains("Method auto: scores per decision") && html.contains("label skew, batch statistics"));
    assert!(html.contains("Covariate shift: mean KL"));
    assert_eq!(html.matches("<svg").count(), 6);
    // The timeline is not part of the summary's JSON.
    let json = serde_json::to_string(&a).unwrap();
    assert!(!json.contains("timeline") && json.contains("\"covariate_shift\":1.0"), "{json}");
    // The run excess is averaged over the decisions that have one (0.25, 0.75 and four 0.5).
    assert_eq!(a.run_excess, Some(0.5));
    assert!(json.contains("\"run_excess\":0.5"), "{json}");

    // Without a BatchNorm layer there is no covariate-shift score, and no plot of it.
    let mut a = AutoSummary::default();
    a.add(0, &diagnostics(false, None));
    assert!(a.covariate_shift.is_none() && !a.line().contains("covariate shift"));
    assert!(a.run_excess.is_none());
    s.auto = Some(a);
    let html = render_html(&s, &recs, "auto").unwrap();
    assert!(html.contains("Method auto: scores per decision") && !html.contains("Covariate shift: mean KL"));
}

#[test]
fn html_with_zero_frames_says_so() {
    let s = summarize(&[], 0.0, 0, "tent", "m", "d");
    assert_eq!((s.frames, s.accuracy, s.latency_median_ms, s.fps), (0, None, 0.0, 0.0));
    let html = render_html(&s, &[], "empty").unwrap();
    assert_self_contained(&html);
    assert!(html.contains("No frames were processed"));
    assert!(!html.contains("<svg"));
    // Only dropped frames: the same.
    let mut d = records();
    d.iter_mut().for_each(|r| r.dropped = true);
    let s = summarize(&d, 1.0, 0, "tent", "m", "d");
    assert_eq!((s.frames, s.drops), (0, 9));
    assert!(render_html(&s, &d, "dropped").unwrap().contains("No frames were processed"));
}

#[test]
fn long_runs_stay_small_and_identical_latencies_plot() {
    let recs: Vec<RunRecord> =
        (0..20_000).map(|i| rec(i, Some((i % 10) as u32), (i % 7) as u32, Some((i % 10) as u32), 2.0, "s")).collect();
    let s = summarize(&recs, 10.0, 0, "tent", "m", "d");
    assert_eq!(s.source_accuracy, Some(100.0));
    assert_eq!((s.latency_median_ms, s.latency_p95_ms), (2.0, 2.0));
    let html = render_html(&s, &recs, "long").unwrap();
    assert_eq!(html.matches("<svg").count(), 4);
    assert!(html.contains("over the last 200 frames"));
    // Lines are thinned to about 1500 points each: the page stays well under a megabyte.
    assert!(html.len() < 1_000_000, "{} bytes", html.len());
}

#[test]
fn write_html_is_atomic() {
    let d = TempDir::new("atomic");
    let path = d.0.join("report.html");
    let recs = records();
    let s = summarize(&recs, 1.0, 0, "tent", "m", "d");
    std::fs::write(&path, "old").unwrap();
    write_html(&path, &s, &recs, "atomic").unwrap();
    let html = std::fs::read_to_string(&path).unwrap();
    assert_eq!(html, render_html(&s, &recs, "atomic").unwrap());
    // Only the report is left: the temporary file was renamed onto it.
    let names: Vec<String> =
        std::fs::read_dir(&d.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["report.html"]);
    // A path whose folder does not exist: an error naming it, and nothing written anywhere.
    let bad = d.0.join("missing/report.html");
    let e = write_html(&bad, &s, &recs, "x").unwrap_err().to_string();
    assert!(e.contains("cannot write the report") && e.contains("missing/report.html"), "{e}");
    assert!(!d.0.join("missing").exists());
    // A folder in the way of the rename: the error leaves no temporary file behind.
    std::fs::create_dir_all(d.0.join("dir.html/inner")).unwrap();
    assert!(write_html(&d.0.join("dir.html"), &s, &recs, "x").is_err());
    let mut names: Vec<String> =
        std::fs::read_dir(&d.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["dir.html", "report.html"]);
}
