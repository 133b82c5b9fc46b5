//! The frame protocol on real video: MobileNetV2 (and, with the library's default preset,
//! EfficientNet-Lite0: a second ImageNet network with other normalisation, BN eps and padding) on
//! the carphone clip, clean and heavily compressed (`assets/video/`), one prediction per frame,
//! against the unadapted model computed here on the same frames (issue 14, item 5):
//! - on the clean clip the adapted model agrees with the unadapted one on >= 90 % of frames;
//! - on the compressed clip it agrees with the clean clip's unadapted predictions at least as
//!   often as the unadapted model does.
//!
//! The frames: every third of the clip's 120 (40 frames, the clip at 10 fps, as a phone that
//! keeps only the latest camera frame delivers it). They span the whole clip, so every stretch
//! of it is in the stream — the unadapted model's classes on the clean clip change along it
//! (Windsor tie, seat belt, neck brace) and the compressed clip agrees with them on 23.3 % of
//! all 120 frames — and the window of the methods that step (8 frames) spans 24 frames of the
//! clip, so the window is still one scene. MobileNetV2 costs ~0.35 s a forward on lavapipe: 40
//! frames keep each clip under a minute for the predict-only methods.

mod common;

use std::sync::OnceLock;

use acclimate::adapt::config::{AdaptConfig, DEFAULT_PRESET, StreamMode};
use acclimate::stream::frame::Frame;
use acclimate::stream::policy::{StreamOptions, StreamSession};
use acclimate::stream::preprocess::{PreprocessSpec, Preprocessor};
use acclimate::{Engine, GpuContext, Model};
use acclimate_cli::stream::source::Source;
use acclimate_test_macros::gpu_test;

/// A network and how frames become its input.
struct Net {
    file: &'static str,
    spec: &'static str,
}

const MOBILENETV2: Net =
    Net { file: "mobilenetv2.onnx", spec: "resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225" };
/// (x − 127) / 128 of 0..255 pixels.
const EFFICIENTNET_LITE0: Net = Net {
    file: "efficientnet_lite0.onnx",
    spec: "resize=256,crop=224,mean=0.498039/0.498039/0.498039,std=0.501961/0.501961/0.501961",
};
const VIDEO_DEMO: &str = include_str!("../src/cli/demo_video.toml");
const STRIDE: usize = 3;

fn frames(clip: &str) -> Vec<Frame> {
    let path = common::asset(&format!("video/{clip}"));
    let mut source = Source::open(&format!("video:{}", path.display())).expect("clip");
    let mut out = Vec::new();
    while let Some(s) = source.next_frame() {
        let s = s.expect("frame");
        if s.index % STRIDE == 0 {
            out.push(s.frame);
        }
    }
    assert_eq!(out.len(), 120 / STRIDE, "{clip}: the carphone clip has 120 frames");
    out
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0
}

/// The unadapted model's class of every clean and every compressed frame.
fn unadapted(ctx: &GpuContext, net: &Net) -> &'static (Vec<usize>, Vec<usize>) {
    static MOBILENET: OnceLock<(Vec<usize>, Vec<usize>)> = OnceLock::new();
    static LITE: OnceLock<(Vec<usize>, Vec<usize>)> = OnceLock::new();
    let once = if net.file == MOBILENETV2.file { &MOBILENET } else { &LITE };
    once.get_or_init(|| {
        let mut engine = Engine::new(ctx, Model::load(&common::asset(net.file)).expect("model"));
        let mut pre = Preprocessor::new(ctx, net.spec.parse::<PreprocessSpec>().expect("spec"));
        let mut classes = |clip: &str| -> Vec<usize> {
            frames(clip)
                .iter()
                .map(|f| {
                    let x = pre.run(std::slice::from_ref(f)).expect("preprocess");
                    argmax(&engine.run(&[x]).expect("forward")[0].to_f32_vec())
                })
                .collect()
        };
        (classes("carphone_pristine.y4m"), classes("carphone_distorted.y4m"))
    })
}

fn adapted(ctx: &GpuContext, net: &Net, cfg: &AdaptConfig, clip: &str) -> Vec<usize> {
    let model = Model::load(&common::asset(net.file)).expect("model");
    let options = StreamOptions { top_k: 1, source_prediction: false };
    let spec: PreprocessSpec = net.spec.parse().expect("spec");
    let mut stream = StreamSession::new(ctx, model, cfg.clone(), spec, options).expect("stream");
    frames(clip).iter().map(|f| stream.push(f).expect("push").remove(0).class()).collect()
}

fn agreement(a: &[usize], b: &[usize]) -> f64 {
    100.0 * a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

/// Runs `cfg` in frame mode on both clips with MobileNetV2 and checks both targets.
fn check(ctx: &GpuContext, name: &str, cfg: &AdaptConfig) {
    check_net(ctx, &MOBILENETV2, name, cfg);
}

fn check_net(ctx: &GpuContext, net: &Net, name: &str, cfg: &AdaptConfig) {
    assert_eq!(cfg.stream.mode, StreamMode::Frame, "{name}: a frame-mode config");
    let (clean_src, dist_src) = unadapted(ctx, net);
    let clean = adapted(ctx, net, cfg, "carphone_pristine.y4m");
    let dist = adapted(ctx, net, cfg, "carphone_distorted.y4m");
    let name = format!("{} {name}", net.file);
    let (keep, ours, base) =
        (agreement(&clean, clean_src), agreement(&dist, clean_src), agreement(dist_src, clean_src));
    println!(
        "{name}: clean clip agrees with unadapted {keep:.1} %; compressed agrees with clean {ours:.1} % (unadapted {base:.1} %)"
    );
    assert!(
        keep >= 90.0,
        "{name}: on the clean clip the adapted model agrees with the unadapted one on {keep:.1} % of frames"
    );
    assert!(
        ours >= base,
        "{name}: on the compressed clip {ours:.1} % agreement with the clean predictions, the unadapted model {base:.1} %"
    );
}

fn config(text: &str) -> AdaptConfig {
    AdaptConfig::from_toml_str(text).expect("config")
}

/// The preset `acclimate stream` and the C ABI use by default; the ABI runs it in frame mode
/// (window 64, a step every 16 frames).
///
/// Its step at frame 31 runs on a window of 32 MobileNetV2 frames at 224 px, whose first
/// expanded activation ([32, 96, 112, 112], 154 MB) exceeds lavapipe's 128 MiB
/// `max_storage_buffer_binding_size`: the stream errored there until frame-mode steps were capped
/// to the most recent frames that fit (`regression::frame_step_over_the_binding_limit_steps_on_fewer_frames`).
/// The preset is `auto`: the clip is one scene, so its windows are judged label-correlated and no
/// gradient step runs (about 85 s on lavapipe here: the judging forwards on the windows). It was
/// ignored while the default stepped on every window (minutes of MobileNetV2 steps).
#[gpu_test]
fn frame_protocol_holds_for_the_default_preset(ctx: GpuContext) {
    let mut cfg = config(DEFAULT_PRESET);
    cfg.stream.mode = StreamMode::Frame;
    check(&ctx, "default preset", &cfg);
}

/// `acclimate demo --video`'s embedded config (`auto`, a window of 16 judged every 16 frames: the
/// single-scene clip's windows are label-correlated, so no step runs and the frames are re-ranked
/// by the recent classes). Regression: judging every 8 frames lost one frame of these 40 to the
/// unadapted model (22.5 % against 25.0 %).
/// The library's default on a network it was not tuned on: EfficientNet-Lite0 (TensorFlow's
/// asymmetric padding, BN eps 1e-3, inputs scaled to about [-1, 1]).
#[gpu_test]
fn frame_protocol_holds_for_the_default_preset_on_efficientnet_lite0(ctx: GpuContext) {
    let mut cfg = config(DEFAULT_PRESET);
    cfg.stream.mode = StreamMode::Frame;
    check_net(&ctx, &EFFICIENTNET_LITE0, "default preset", &cfg);
}

#[gpu_test]
fn frame_protocol_holds_for_the_video_demo_config(ctx: GpuContext) {
    check(&ctx, "demo_video.toml", &config(VIDEO_DEMO));
}

#[gpu_test]
fn frame_protocol_holds_for_rbn_and_norm(ctx: GpuContext) {
    for method in ["rbn", "norm"] {
        let cfg = config(&format!("[adapt]\nmethod = \"{method}\"\n[stream]\nmode = \"frame\"\nwindow = 8\n"));
        check(&ctx, method, &cfg);
    }
}

fn stepping(method: &str) -> AdaptConfig {
    config(&format!(
        "[adapt]\nmethod = \"{method}\"\n[optimizer]\nkind = \"sgd\"\nlr = 0.00025\nmomentum = 0.9\n\
         [stream]\nmode = \"frame\"\nwindow = 8\nadapt_every = 8\n"
    ))
}

/// Ignored by default: minutes on lavapipe (it passed on the 2-core VM, Mesa 25.0.7, 2026-12-06);
/// the stepping mechanism is ETA's, which runs by default.
#[gpu_test]
#[ignore = "minutes on lavapipe; same stepping mechanism as the ETA test; run with --ignored"]
fn frame_protocol_holds_for_tent(ctx: GpuContext) {
    check(&ctx, "tent", &stepping("tent"));
}

/// ETA, SGD 2.5e-4, window 8, a step every 8 (the video demo's config before `auto`): the frame
/// protocol with gradient steps on the window, run by default.
#[gpu_test]
fn frame_protocol_holds_for_eta(ctx: GpuContext) {
    check(&ctx, "eta", &stepping("eta"));
}
