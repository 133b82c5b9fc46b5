//! The stream policy against an independent replay of what it must do: the frames preprocessed
//! on the CPU (`preprocess_cpu`) and fed to a plain `Session` in the documented order (frame
//! mode: predict each frame with the source-anchored frame statistics, a step on the window
//! every `adapt_every` frames; batch mode: a step per batch). Plus the threaded runner's latest-frame policy and a
//! bad frame in the middle of a stream.

mod common;

use acclimate::GpuContext;
use acclimate::adapt::config::AdaptConfig;
use acclimate::adapt::session::Session;
use acclimate::stream::frame::Frame;
use acclimate::stream::policy::{StreamError, StreamOptions, StreamRunner, StreamSession, frame_stats};
use acclimate::stream::preprocess::{PreprocessSpec, preprocess_cpu};
use acclimate::{Engine, Model, Tensor};
use acclimate_test_macros::gpu_test;

const SPEC: &str = "size=8,channels=3,mean=0.5/0.5/0.5,std=0.25/0.25/0.25";

fn model() -> Model {
    Model::load(&common::repo_root().join("tests/fixtures/tta/tiny_tent_sgd/model.onnx")).expect("tiny model")
}

fn config(extra: &str) -> AdaptConfig {
    AdaptConfig::from_toml_str(&format!(
        "[adapt]\nmethod = \"tent\"\n[optimizer]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n{extra}"
    ))
    .expect("config")
}

/// Odd-sized RGB frames with different content, so resize and every step matter.
fn frames(n: usize) -> Vec<Frame> {
    (0..n)
        .map(|i| {
            let (w, h) = (11 + (i % 3) as u32, 9 + (i % 2) as u32);
            let px = common::random_f32((w * h * 3) as usize, 100 + i as u64, 0.0, 255.0);
            Frame::rgb8(w, h, px.iter().map(|v| *v as u8).collect()).with_timestamp(1000 * i as i64)
        })
        .collect()
}

fn cpu_rows(fs: &[Frame]) -> Vec<Vec<f32>> {
    let spec: PreprocessSpec = SPEC.parse().unwrap();
    fs.iter().map(|f| preprocess_cpu(f, &spec).expect("cpu preprocess")).collect()
}

fn batch(rows: &[Vec<f32>]) -> Tensor {
    Tensor::f32(vec![rows.len(), 3, 8, 8], rows.concat())
}

fn softmax(row: &[f32]) -> Vec<f32> {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = row.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn assert_close(what: &str, got: &[(usize, f32)], want: &[f32]) {
    // The top classes must be the reference's, with their probabilities.
    for &(c, p) in got {
        assert!((p - want[c]).abs() <= 1e-4, "{what}: class {c} probability {p} vs reference {}", want[c]);
    }
    let best = want.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    assert!((got[0].1 - best).abs() <= 1e-4, "{what}: top-1 {:?} vs reference max {best}", got[0]);
}

/// Frame mode against the session API driven by hand, with both step timings: `inline` steps
/// right after the frame that makes one due (the next frame sees its update); `background` runs
/// that step beside the next frames and lands its update just before frame k + `adapt_every`
/// (the frames between see the parameters before it, exactly: the update waits for its gate).
fn frame_mode_against_the_session(ctx: &GpuContext, timing: &str, window: usize, every: usize, n: usize) {
    let cfg = config(&format!(
        "[stream]\nmode = \"frame\"\nwindow = {window}\nadapt_every = {every}\nsteps = \"{timing}\"\n"
    ));
    let background = timing == "background";
    let spec: PreprocessSpec = SPEC.parse().unwrap();
    let options = StreamOptions { top_k: 3, source_prediction: true };
    let mut stream = StreamSession::new(ctx, model(), cfg.clone(), spec, options).expect("stream");
    assert_eq!(stream.background_steps(), background);
    let fs = frames(n);
    let rows = cpu_rows(&fs);
    // The reference: the same session API, driven by hand.
    let mut reference = Session::new(ctx, model(), cfg).expect("session");
    let mut source = Engine::new(ctx, model());
    let mut ring: Vec<Vec<f32>> = Vec::new();
    let mut since = 0;
    let mut steps = 0;
    // Background: the step started at frame k, landing before frame `due`, with its window.
    let mut pending: Option<(usize, Vec<Vec<f32>>)> = None;
    for (i, f) in fs.iter().enumerate() {
        let got = stream.push(f).expect("push");
        assert_eq!(got.len(), 1, "frame mode returns one result per frame");
        let r = &got[0];
        assert_eq!((r.index, r.timestamp_us), (i as u64, 1000 * i as i64));
        let mut landed = None;
        if let Some((due, w)) = pending.take_if(|(due, _)| *due == i) {
            assert_eq!(due, i);
            landed = Some(reference.step(&batch(&w)).expect("step"));
        }
        let x = batch(&rows[i..=i]);
        let want = reference.predict_with(&x, frame_stats(window)).expect("predict");
        assert_close(&format!("{timing} frame {i}"), &r.top_k, &softmax(&want.logits.to_f32_vec()));
        let src = source.run(std::slice::from_ref(&x)).expect("source")[0].to_f32_vec();
        let sp = softmax(&src);
        let (sc, spv) = r.source_top.expect("source prediction");
        assert!((spv - sp[sc]).abs() <= 1e-4 && sp.iter().all(|&v| v <= spv + 1e-6), "frame {i} source");
        ring.push(rows[i].clone());
        if ring.len() > window {
            ring.remove(0);
        }
        since += 1;
        let step_due = since >= every && ring.len() >= 2;
        if step_due {
            since = 0;
            steps += 1;
            if background {
                pending = Some((i + every, ring.clone()));
            } else {
                landed = Some(reference.step(&batch(&ring)).expect("step"));
            }
        }
        assert_eq!(r.adapted, landed.is_some(), "{timing} frame {i}: step reported");
        if let Some(s) = landed {
            let (a, b) = (r.loss.unwrap(), s.loss.unwrap());
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{timing} frame {i}: loss {a} vs {b}");
        }
    }
    // The step still in flight lands with finish(), which reports it (regression: its outcome,
    // auto's decision included, was lost with no frame left to carry it).
    stream.finish().expect("finish");
    let at_end = stream.finished_step().cloned();
    match pending {
        Some((_, w)) => {
            let s = reference.step(&batch(&w)).expect("step");
            let l = at_end.expect("finish() reports the step it landed");
            let (a, b) = (l.loss.unwrap(), s.loss.unwrap());
            assert!(l.adapted && (a - b).abs() <= 1e-4 * b.abs().max(1.0), "{timing}: final step loss {a} vs {b}");
        }
        None => assert_eq!(at_end, None, "{timing}: no step was in flight at the end"),
    }
    assert_eq!(stream.steps(), steps);
    assert!(steps >= 3);
    // The adapted parameters ended where the reference's did.
    let (p, q) = (stream.session().parameters().unwrap(), reference.parameters().unwrap());
    for ((n, a), (_, b)) in p.iter().zip(&q) {
        for (x, y) in a.to_f32_vec().iter().zip(b.to_f32_vec()) {
            assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "{timing} {n}: {x} vs {y}");
        }
    }
}

#[gpu_test]
fn frame_mode_predicts_each_frame_and_steps_on_the_window(ctx: GpuContext) {
    frame_mode_against_the_session(&ctx, "inline", 3, 2, 9);
}

#[gpu_test]
fn frame_mode_background_steps_land_adapt_every_frames_later(ctx: GpuContext) {
    frame_mode_against_the_session(&ctx, "background", 3, 2, 9);
}

/// Windows of up to 9 frames: a paced step splits its convolutions along the batch into pieces
/// of `PACED_Z_PIECE` (4) images (9 = 4 + 4 + 1; the grouped, strided layer's reverse pass 9 × 2
/// groups × 4 stride phases), which must compute exactly what the whole dispatch does.
#[gpu_test]
fn background_steps_with_split_convolutions_match_the_session(ctx: GpuContext) {
    assert_eq!(acclimate::adapt::train::PACED_Z_PIECE, 4);
    frame_mode_against_the_session(&ctx, "background", 9, 4, 22);
}

#[gpu_test]
fn batch_mode_groups_frames_and_flushes_the_rest(ctx: GpuContext) {
    let cfg = config("[stream]\nmode = \"batch\"\nbatch = 4\n");
    let spec: PreprocessSpec = SPEC.parse().unwrap();
    let mut stream = StreamSession::new(&ctx, model(), cfg.clone(), spec, StreamOptions::default()).expect("stream");
    let fs = frames(10);
    let rows = cpu_rows(&fs);
    let mut reference = Session::new(&ctx, model(), cfg).expect("session");
    let mut results = Vec::new();
    for (i, f) in fs.iter().enumerate() {
        let got = stream.push(f).expect("push");
        let expect = if i % 4 == 3 { 4 } else { 0 };
        assert_eq!(got.len(), expect, "after frame {i}");
        results.extend(got);
    }
    let tail = stream.finish().expect("finish");
    assert_eq!(tail.len(), 2);
    results.extend(tail);
    assert_eq!(results.iter().map(|r| r.index).collect::<Vec<_>>(), (0..10).collect::<Vec<u64>>());
    for chunk in [0..4, 4..8, 8..10] {
        let want = reference.step(&batch(&rows[chunk.clone()])).expect("step");
        let logits = want.logits.to_f32_vec();
        let c = want.logits.shape[1];
        for (k, i) in chunk.enumerate() {
            assert_close(&format!("frame {i}"), &results[i].top_k, &softmax(&logits[k * c..(k + 1) * c]));
            assert!(results[i].adapted);
        }
    }
    assert_eq!(stream.steps(), 3);
}

#[gpu_test]
fn a_bad_frame_is_an_error_and_the_stream_goes_on(ctx: GpuContext) {
    let cfg = config("[stream]\nmode = \"frame\"\n");
    let spec: PreprocessSpec = SPEC.parse().unwrap();
    let mut stream = StreamSession::new(&ctx, model(), cfg, spec, StreamOptions::default()).expect("stream");
    let fs = frames(2);
    stream.push(&fs[0]).expect("first frame");
    let short = Frame::rgb8(12, 10, vec![0; 12 * 10 * 3 - 5]);
    match stream.push(&short) {
        Err(acclimate::Error::Stream(StreamError::Frame { index: 1, source })) => {
            let msg = source.to_string();
            assert!(msg.contains("355") && msg.contains("360"), "{msg}");
        }
        other => panic!("expected a frame error, got {other:?}"),
    }
    let r = stream.push(&fs[1]).expect("the stream goes on");
    assert_eq!(r[0].index, 2);
}

#[gpu_test]
fn a_model_that_takes_another_input_size_is_refused(ctx: GpuContext) {
    let spec: PreprocessSpec = "size=16,channels=3,mean=0.5/0.5/0.5,std=0.25/0.25/0.25".parse().unwrap();
    let err = StreamSession::new(&ctx, model(), config(""), spec, StreamOptions::default()).err().expect("refused");
    assert!(matches!(err, acclimate::Error::Stream(StreamError::Input { .. })), "{err}");
}

#[gpu_test]
fn the_runner_keeps_the_latest_frame_and_counts_drops(ctx: GpuContext) {
    let cfg = config("[stream]\nmode = \"frame\"\nwindow = 4\nadapt_every = 4\n");
    let spec: PreprocessSpec = SPEC.parse().unwrap();
    let stream = StreamSession::new(&ctx, model(), cfg, spec, StreamOptions::default()).expect("stream");
    let runner = StreamRunner::spawn(stream);
    let producer = runner.frames.clone();
    let fs = frames(40);
    let n = fs.len();
    // A producer far faster than the GPU: every frame pushed at once from another thread.
    let t = std::thread::spawn(move || {
        for f in fs {
            producer.push(f);
        }
        producer.drops()
    });
    let pushed_drops = t.join().unwrap();
    let drops = runner.frames.drops();
    assert!(drops >= pushed_drops);
    let results = runner.results;
    let frames_sender = runner.frames.clone();
    frames_sender.close();
    let mut got = Vec::new();
    for r in results.iter() {
        got.push(r.expect("result"));
    }
    // Every frame is either predicted or counted as dropped, indices increase, and the newest
    // frame always made it.
    assert_eq!(got.len() as u64 + frames_sender.drops(), n as u64, "{} results, {} drops", got.len(), drops);
    assert!(got.windows(2).all(|w| w[0].index < w[1].index));
    assert_eq!(got.last().unwrap().index, n as u64 - 1);
    assert!(frames_sender.drops() > 0, "a producer this fast must have dropped frames");
}

/// Method auto in frame mode: once a window step judges the labels correlated, each frame's
/// top classes are re-ranked by the recent frames' classes (p·r^γ, r ← m·r + (1 − m)·p̃ over
/// every frame's renormalised top classes), from the frame the decision is known at (inline:
/// the next; background: the frame the step lands before). Checked against the same stream with
/// the correction off (`frame_prior_power = 0`) and the rule applied here by hand; the first 16
/// frames are one image (a correlated window), the rest alternate among seven. The tiny model's
/// predictions are vague (0.49–0.70 of ln C): `uncertain_entropy = 1` keeps the output stage on.
fn frame_prior_against_the_uncorrected_stream(ctx: &GpuContext, timing: &str) {
    let model =
        || Model::load(&common::repo_root().join("tests/fixtures/tta/tiny_auto/model.onnx")).expect("tiny auto model");
    let cfg = |power: f32| {
        AdaptConfig::from_toml_str(&format!(
            "[adapt]\nmethod = \"auto\"\n[auto]\nframe_prior_power = {power}\nframe_prior_momentum = 0.5\n\
             uncertain_entropy = 1.0\n[stream]\nmode = \"frame\"\nwindow = 16\nadapt_every = 16\nsteps = \"{timing}\"\n"
        ))
        .expect("config")
    };
    let all = frames(8);
    let fs: Vec<&Frame> = (0..48).map(|i| if i < 16 { &all[0] } else { &all[1 + i % 7] }).collect();
    let spec: PreprocessSpec = SPEC.parse().unwrap();
    let options = StreamOptions { top_k: 5, source_prediction: false };
    let run = |power: f32| {
        let mut stream = StreamSession::new(ctx, model(), cfg(power), spec.clone(), options.clone()).expect("stream");
        assert_eq!(stream.background_steps(), timing == "background");
        fs.iter().map(|f| stream.push(f).expect("push").remove(0)).collect::<Vec<_>>()
    };
    let (plain, corrected) = (run(0.0), run(2.0));
    let mut r = [0.2f64; 5];
    let mut correlated = false;
    let mut changed = 0;
    for (i, (p, c)) in plain.iter().zip(&corrected).enumerate() {
        assert!(!p.prior_corrected, "frame {i}: nothing is corrected with the power at 0");
        if timing == "background"
            && let Some(d) = &p.auto
        {
            correlated = d.correlated && !d.unjudged;
        }
        assert_eq!(c.prior_corrected, correlated, "frame {i}");
        let total: f64 = p.top_k.iter().map(|t| t.1 as f64).sum();
        let mut want: Vec<(usize, f64)> = match correlated {
            true => {
                let w: Vec<f64> = p.top_k.iter().map(|&(k, q)| q as f64 * r[k] * r[k]).collect();
                let s: f64 = w.iter().sum();
                p.top_k.iter().zip(&w).map(|(&(k, _), &v)| (k, v / s * total)).collect()
            }
            false => p.top_k.iter().map(|&(k, q)| (k, q as f64)).collect(),
        };
        want.sort_by(|a, b| b.1.total_cmp(&a.1));
        assert_eq!(c.top_k.iter().map(|t| t.0).collect::<Vec<_>>(), want.iter().map(|t| t.0).collect::<Vec<_>>());
        for (got, w) in c.top_k.iter().zip(&want) {
            assert!((got.1 as f64 - w.1).abs() < 1e-6, "frame {i}: {:?} vs {want:?}", c.top_k);
        }
        changed += (c.top_k[0].0 != p.top_k[0].0) as usize;
        r.iter_mut().for_each(|v| *v *= 0.5);
        for &(k, q) in &p.top_k {
            r[k] += 0.5 * q as f64 / total;
        }
        if timing == "inline"
            && let Some(d) = &p.auto
        {
            correlated = d.correlated && !d.unjudged;
        }
    }
    assert!(plain[15].auto.as_ref().is_some_and(|d| d.correlated) || timing == "background");
    assert!(corrected.iter().filter(|c| c.prior_corrected).count() >= 16, "the correction never ran");
    assert!(changed > 0, "the correction changed no frame's class: the test shows nothing");
}

#[gpu_test]
fn auto_reranks_frames_by_the_recent_classes_when_labels_are_correlated(ctx: GpuContext) {
    frame_prior_against_the_uncorrected_stream(&ctx, "inline");
}

#[gpu_test]
fn auto_reranks_background_frames_from_the_landed_decision(ctx: GpuContext) {
    frame_prior_against_the_uncorrected_stream(&ctx, "background");
}

/// Regression: the recent-class prior and the latest decision are part of a stream's saved
/// state (version 2 on), so a stream loaded mid-way re-ranks the next frames exactly as the one that
/// saved it (without them the loaded stream predicted uncorrected frames until the next window
/// step). `uncertain_entropy = 1`: the tiny model's predictions are vague.
#[gpu_test]
fn a_loaded_stream_keeps_the_recent_class_prior(ctx: GpuContext) {
    let model =
        || Model::load(&common::repo_root().join("tests/fixtures/tta/tiny_auto/model.onnx")).expect("tiny auto model");
    let cfg = AdaptConfig::from_toml_str(
        "[adapt]\nmethod = \"auto\"\n[auto]\nuncertain_entropy = 1.0\n\
         [stream]\nmode = \"frame\"\nwindow = 16\nadapt_every = 16\nsteps = \"inline\"\n",
    )
    .expect("config");
    let all = frames(8);
    let fs: Vec<&Frame> = (0..28).map(|i| if i < 16 { &all[0] } else { &all[1 + i % 7] }).collect();
    let spec: PreprocessSpec = SPEC.parse().unwrap();
    let options = StreamOptions { top_k: 3, source_prediction: false };
    let mut a = StreamSession::new(&ctx, model(), cfg.clone(), spec.clone(), options.clone()).expect("stream");
    for f in &fs[..20] {
        a.push(f).expect("push");
    }
    let path = std::env::temp_dir().join(format!("acclimate-frame-prior-{}.state", std::process::id()));
    a.save_state(&path).expect("save");
    let mut b = StreamSession::new(&ctx, model(), cfg, spec, options).expect("stream");
    b.load_state(&path).expect("load");
    let _ = std::fs::remove_file(&path);
    for (i, f) in fs.iter().enumerate().skip(20) {
        let (ra, rb) = (a.push(f).expect("push").remove(0), b.push(f).expect("push").remove(0));
        assert!(ra.prior_corrected, "frame {i}: the window of one image was judged correlated");
        assert_eq!((ra.top_k, ra.prior_corrected), (rb.top_k, rb.prior_corrected), "frame {i}");
    }
}

/// Method auto in frame mode on a label-shifted stream (60 % of the digits are ones, the rest
/// spread over the other classes, in no order): once a window step judges the labels shifted,
/// each frame's top classes are corrected by auto's class-prior estimate q̂ (p·q̂ over the top
/// classes, their total kept), as a label-shifted batch is. The MNIST network has no
/// BatchNormalization, so no step ever runs and every frame's uncorrected prediction is the
/// unadapted model's, computed here with the engine; q̂ is the session's after each decision.
#[gpu_test]
fn auto_corrects_frames_by_the_class_prior_when_labels_are_shifted(ctx: GpuContext) {
    use acclimate_cli::stream::source::Source;
    let images = common::asset("mnist/t10k-images-idx3-ubyte");
    let labels = common::asset("mnist/t10k-labels-idx1-ubyte");
    let mut source = Source::open(&format!("idx:{},{}", images.display(), labels.display())).expect("MNIST");
    let (mut ones, mut others) = (Vec::new(), Vec::new());
    while let Some(s) = source.next_frame() {
        let s = s.expect("digit");
        match s.label {
            Some(1) if ones.len() < 120 => ones.push(s.frame),
            Some(l) if l != 1 && others.len() < 80 => others.push(s.frame),
            _ => {}
        }
        if ones.len() == 120 && others.len() == 80 {
            break;
        }
    }
    // 3 ones, 2 others, repeated: every window of 16 holds about the stream's own mix.
    let fs: Vec<Frame> = (0..200)
        .map(|i| if i % 5 < 3 { ones[3 * (i / 5) + i % 5].clone() } else { others[2 * (i / 5) + i % 5 - 3].clone() })
        .collect();
    let spec: PreprocessSpec = "size=28,channels=1,mean=0.1307,std=0.3081".parse().unwrap();
    let model = Model::load(&common::asset("mnist.onnx")).expect("MNIST network");
    let cfg = AdaptConfig::from_toml_str(
        "[adapt]\nmethod = \"auto\"\n[auto]\nprior_samples = 1.0\n\
         [stream]\nmode = \"frame\"\nwindow = 16\nadapt_every = 16\nsteps = \"inline\"\n",
    )
    .expect("config");
    let options = StreamOptions { top_k: 5, source_prediction: false };
    let mut stream = StreamSession::new(&ctx, model.clone(), cfg, spec.clone(), options).expect("stream");
    let mut engine = Engine::new(&ctx, model);
    let mut q: Option<Vec<f64>> = None;
    let (mut corrected, mut changed) = (0, 0);
    for (i, f) in fs.iter().enumerate() {
        let r = stream.push(f).expect("push").remove(0);
        let x = preprocess_cpu(f, &spec).expect("preprocess");
        let logits = engine.run(&[Tensor::f32(vec![1, 1, 28, 28], x)]).expect("forward").remove(0).to_f32_vec();
        let p = softmax(&logits);
        let mut plain: Vec<(usize, f32)> = p.iter().copied().enumerate().collect();
        plain.sort_by(|a, b| b.1.total_cmp(&a.1));
        plain.truncate(5);
        assert_eq!(r.prior_corrected, q.is_some(), "frame {i}");
        let want: Vec<(usize, f64)> = match &q {
            Some(q) => {
                let total: f64 = plain.iter().map(|t| t.1 as f64).sum();
                let w: Vec<f64> = plain.iter().map(|&(k, v)| v as f64 * q[k]).collect();
                let s: f64 = w.iter().sum();
                let mut out: Vec<(usize, f64)> = plain.iter().zip(&w).map(|(&(k, _), &v)| (k, v / s * total)).collect();
                out.sort_by(|a, b| b.1.total_cmp(&a.1));
                out
            }
            None => plain.iter().map(|&(k, v)| (k, v as f64)).collect(),
        };
        assert_eq!(
            r.top_k.iter().map(|t| t.0).collect::<Vec<_>>(),
            want.iter().map(|t| t.0).collect::<Vec<_>>(),
            "frame {i}"
        );
        for (got, w) in r.top_k.iter().zip(&want) {
            assert!((got.1 as f64 - w.1).abs() < 1e-4, "frame {i}: {:?} vs {want:?}", r.top_k);
        }
        corrected += r.prior_corrected as usize;
        changed += (r.top_k[0].0 != plain[0].0) as usize;
        if let Some(d) = &r.auto {
            assert!(!d.stepped && !d.correlated, "frame {i}: {d:?}");
            q = d.label_shift.then(|| stream.session().auto_label_prior().expect("q̂"));
        }
    }
    assert!(corrected >= 50, "only {corrected} frames corrected: the stream was not judged label-shifted in time");
    eprintln!("{corrected} frames corrected, {changed} changed class");
}

/// Regression (issue 15): the first step of each window size compiled its shaders on the step's
/// thread, and the frame that step lands before waited for them (~7 s of lavapipe time at
/// MobileNetV2's first step). The stream now compiles the steps' pipelines when it is made: the
/// steps on every window size (9, 18 and 24 frames here; paced, their convolutions split along the
/// batch) compile no pipeline of their own.
#[gpu_test]
fn background_steps_find_their_pipelines_compiled_ahead(ctx: GpuContext) {
    let frame = "[stream]\nmode = \"frame\"\nwindow = 24\nadapt_every = 9\n";
    let auto = AdaptConfig::from_toml_str(&format!("[adapt]\nmethod = \"auto\"\n{frame}")).expect("auto");
    // TENT steps on every window; auto judges each window with its own program first.
    for (name, cfg) in [("tent", config(frame)), ("auto", auto)] {
        let ctx = if name == "tent" { ctx.clone() } else { common::gpu().expect("a second context") };
        let spec: PreprocessSpec = SPEC.parse().unwrap();
        let mut stream = StreamSession::new(&ctx, model(), cfg, spec, StreamOptions::default()).expect("stream");
        let warmed = stream.warmed_pipelines().expect("a background frame stream warms its steps up");
        assert!(warmed > 0 && warmed == ctx.pipeline_count(), "{name}: {warmed} pipelines");
        let fs = frames(40);
        stream.push(&fs[0]).expect("first frame");
        let before = ctx.pipeline_count();
        for f in &fs[1..] {
            stream.push(f).expect("push");
        }
        stream.finish().expect("finish");
        if name == "tent" {
            assert_eq!(stream.steps(), 4, "steps on 9, 18, 24 and 24 frames");
        }
        assert_eq!(ctx.pipeline_count(), before, "{name}: a step compiled a pipeline the warm-up did not");
    }
}

/// Regression (frame mode lost to the unadapted SVHN network on zoom blur 3, glass blur 3 and low
/// light 3: each frame stepped on window/adapt_every times at the learning rate chosen for one
/// step per batch): a frame-mode `auto` stream's session steps at `auto.lr · √(adapt_every /
/// window)`; a batch-mode one, or one whose windows do not overlap, at `auto.lr`; other methods
/// at their optimizer's rate.
#[gpu_test]
fn auto_frame_windows_step_at_the_learning_rate_scaled_by_their_overlap(ctx: GpuContext) {
    let spec: PreprocessSpec = SPEC.parse().unwrap();
    for (extra, want) in [
        ("[stream]\nwindow = 72\nadapt_every = 8\n", 0.02 / 3.0),
        ("", 0.02 / 2.0),
        ("[stream]\nwindow = 16\nadapt_every = 16\n", 0.02),
        ("[stream]\nmode = \"batch\"\nbatch = 16\n", 0.02),
    ] {
        let cfg =
            AdaptConfig::from_toml_str(&format!("[adapt]\nmethod = \"auto\"\n[auto]\nlr = 0.02\n{extra}")).unwrap();
        let stream = StreamSession::new(&ctx, model(), cfg, spec.clone(), StreamOptions::default()).unwrap();
        let lr = stream.session().config().auto.lr;
        assert!((lr - want).abs() < 1e-12, "{extra:?}: lr {lr}, want {want}");
    }
    let stream = StreamSession::new(&ctx, model(), config(""), spec, StreamOptions::default()).unwrap();
    assert_eq!(stream.session().config().optimizer.lr, 0.05, "tent keeps its optimizer's rate");
}

/// Regression: classifiers with the heads and inputs real models have. Logits of shape [N, C, 1, 1]
/// had each class read as a row of one class by the stream (top-k, the source comparison) and
/// stopped `auto` with a shape error; a model ending in the softmax of its logits had its
/// probabilities normalised again (the source comparison's probabilities nearly uniform) and was
/// adapted on them; a model taking its image channels last ([N, H, W, C], TensorFlow/Keras
/// exports) was refused (the frames were NCHW only). Frame mode (background steps) and batch mode, with the default method and
/// the source comparison, must report what they report for the plain model (the source's
/// probabilities from the model's own softmax, to rounding).
#[gpu_test]
fn classifier_heads_stream_as_the_plain_logits(ctx: GpuContext) {
    let dir = common::repo_root().join("tests/fixtures/tta/tiny_auto");
    let spec: PreprocessSpec = SPEC.parse().unwrap();
    let options = StreamOptions { top_k: 3, source_prediction: true };
    for extra in ["[stream]\nwindow = 16\nadapt_every = 8\n", "[stream]\nmode = \"batch\"\nbatch = 16\n"] {
        let cfg = AdaptConfig::from_toml_str(extra).unwrap();
        let run = |file: &str| {
            let model = Model::load(&dir.join(file)).unwrap();
            let mut stream = StreamSession::new(&ctx, model, cfg.clone(), spec.clone(), options.clone()).unwrap();
            let mut out = Vec::new();
            for f in frames(40) {
                out.extend(stream.push(&f).unwrap());
            }
            out.extend(stream.finish().unwrap());
            (out, stream.steps())
        };
        let (flat, steps) = run("model.onnx");
        assert_eq!(flat.len(), 40);
        for file in ["model_logits_nc11.onnx", "model_probs.onnx", "model_nhwc.onnx"] {
            let (head, head_steps) = run(file);
            assert_eq!(steps, head_steps, "{file} {extra}");
            for (a, b) in flat.iter().zip(&head) {
                let at = format!("{file} {extra} frame {}", a.index);
                assert_eq!((&a.top_k, &a.auto), (&b.top_k, &b.auto), "{at}");
                assert_eq!(b.top_k.len(), 3, "{at}: three classes per frame");
                let ((ca, pa), (cb, pb)) = (a.source_top.unwrap(), b.source_top.unwrap());
                assert!(ca == cb && (pa - pb).abs() <= 1e-6, "{at}: source {:?} vs {:?}", a.source_top, b.source_top);
            }
        }
    }
}

/// A vision transformer (`tools/vit_fixture.py`: LayerNorm, attention, Erf GELU, the class
/// token's Expand and Gather, a BatchNorm stem) streams with the library's default (`auto`) in
/// frame and batch mode, and ETA steps on it: every frame gets finite probabilities, and the
/// steps change the adapted model's outputs.
#[gpu_test]
fn a_vision_transformer_streams_and_adapts(ctx: GpuContext) {
    let path = common::repo_root().join("tests/fixtures/vit_tiny.onnx");
    let spec: PreprocessSpec = SPEC.parse().unwrap();
    let options = StreamOptions { top_k: 3, source_prediction: true };
    for extra in [
        "[stream]\nwindow = 16\nadapt_every = 8\n",
        "[stream]\nmode = \"batch\"\nbatch = 16\n",
        "[adapt]\nmethod = \"eta\"\n[stream]\nmode = \"batch\"\nbatch = 16\n",
    ] {
        let cfg = AdaptConfig::from_toml_str(extra).unwrap();
        let mut stream =
            StreamSession::new(&ctx, Model::load(&path).unwrap(), cfg, spec.clone(), options.clone()).unwrap();
        let mut out = Vec::new();
        for f in frames(40) {
            out.extend(stream.push(&f).unwrap());
        }
        out.extend(stream.finish().unwrap());
        assert_eq!(out.len(), 40, "{extra}");
        for r in &out {
            assert_eq!(r.top_k.len(), 3, "{extra} frame {}", r.index);
            let sum: f32 = r.top_k.iter().map(|p| p.1).sum();
            assert!(r.top_k.iter().all(|p| p.1.is_finite() && p.1 >= 0.0) && sum <= 1.0 + 1e-5, "{extra}: {r:?}");
        }
        if extra.contains("eta") {
            assert!(stream.steps() > 0, "ETA stepped on the transformer");
            let moved = out.iter().any(|r| (r.top_k[0].1 - r.source_top.unwrap().1).abs() > 1e-6);
            assert!(moved, "the steps changed the adapted model's outputs");
        }
    }
}

/// Regression: after a window the inputs' shift dominated, method auto normalises the frames
/// with the recent frames' statistics, and that is part of a saved stream state (version 3): a
/// stream loaded mid-way predicts the next frames exactly as the one that saved it. Without the
/// flag the loaded stream predicted with the source statistics until the next window step. The
/// USPS network on contrast-reduced MNIST digits, whose windows are all dominated.
#[gpu_test]
fn a_loaded_stream_keeps_normalising_with_the_window_when_the_shift_dominates(ctx: GpuContext) {
    use acclimate_cli::stream::source::Source;
    use sha2::Digest;
    let images = common::asset("mnist/t10k-images-idx3-ubyte");
    let labels = common::asset("mnist/t10k-labels-idx1-ubyte");
    let mut source = Source::open(&format!("idx:{},{}", images.display(), labels.display())).expect("MNIST");
    // ImageNet-C's contrast at severity 3 on each digit: (x − mean)·0.2 + mean.
    let fs: Vec<Frame> = (0..72)
        .map(|_| {
            let mut f = source.next_frame().expect("a digit").expect("digit").frame;
            let mean = f.data.iter().map(|&v| v as f64).sum::<f64>() / f.data.len() as f64;
            f.data.iter_mut().for_each(|v| *v = ((*v as f64 - mean) * 0.2 + mean).round().clamp(0.0, 255.0) as u8);
            f
        })
        .collect();
    let model = || Model::load(&common::asset("usps.onnx")).expect("USPS network");
    let spec: PreprocessSpec = "size=16,channels=1,mean=0.2471,std=0.2994".parse().unwrap();
    let cfg = AdaptConfig::from_toml_str(
        "[adapt]\nmethod = \"auto\"\n[stream]\nmode = \"frame\"\nwindow = 32\nadapt_every = 16\nsteps = \"inline\"\n",
    )
    .expect("config");
    let options = StreamOptions { top_k: 3, source_prediction: false };
    let mut a = StreamSession::new(&ctx, model(), cfg.clone(), spec.clone(), options.clone()).expect("stream");
    let mut dominated = 0;
    for f in &fs[..40] {
        for r in a.push(f).expect("push") {
            dominated += r.auto.as_ref().is_some_and(|d| d.dominated && d.stepped && d.alpha == Some(1.0)) as usize;
        }
    }
    assert!(dominated >= 1, "no window was dominated: the test shows nothing");
    let path = std::env::temp_dir().join(format!("acclimate-dominated-{}.state", std::process::id()));
    a.save_state(&path).expect("save");
    let mut b = StreamSession::new(&ctx, model(), cfg.clone(), spec.clone(), options.clone()).expect("stream");
    b.load_state(&path).expect("load");
    // The same file with the flag cleared (bit 1 of the word after the window; the header's
    // 52 bytes hold the session's length and the window's size), resealed: that stream predicts
    // with the source statistics, and the frames must differ from it or the check shows nothing.
    let mut bytes = std::fs::read(&path).unwrap();
    let word = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    let session_len = u64::from_le_bytes(bytes[44..52].try_into().unwrap()) as usize;
    let flags_at = 52 + session_len + word(&bytes, 40) * word(&bytes, 36) * 4;
    assert_eq!(word(&bytes, flags_at) & 2, 2, "saved as dominated");
    bytes[flags_at] &= !2;
    let body = bytes.len() - 32;
    let digest = sha2::Sha256::digest(&bytes[..body]);
    bytes[body..].copy_from_slice(&digest);
    let cleared = path.with_extension("cleared");
    std::fs::write(&cleared, &bytes).unwrap();
    let mut plain = StreamSession::new(&ctx, model(), cfg, spec, options).expect("stream");
    plain.load_state(&cleared).expect("load");
    let _ = (std::fs::remove_file(&path), std::fs::remove_file(&cleared));
    let mut differ = 0;
    for (i, f) in fs.iter().enumerate().skip(40).take(7) {
        let (ra, rb, rp) = (
            a.push(f).expect("push").remove(0),
            b.push(f).expect("push").remove(0),
            plain.push(f).expect("push").remove(0),
        );
        assert_eq!(ra.top_k, rb.top_k, "frame {i}");
        differ += (ra.top_k != rp.top_k) as usize;
    }
    assert!(differ > 0, "the window statistics changed no frame's prediction");
}
