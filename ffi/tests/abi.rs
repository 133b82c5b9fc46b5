//! The ABI called from Rust where the reference or the fixture needs the library itself:
//! predictions against the library's CPU preprocessing and a plain `Engine` (an independent
//! path: no GPU preprocessing, no frame mapping, no stream), and state files the C suite cannot
//! make (a NaN inside a sealed state, a state of another model, the CLI's plain session state).

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr;

use acclimate::adapt::state;
use acclimate::stream::frame::{Frame, Plane, Rotation};
use acclimate::stream::preprocess::{PreprocessSpec, preprocess_cpu};
use acclimate::{Engine, GpuContext, Model, Tensor};
use acclimate_ffi::*;

const SPEC: &str = "size=32,channels=3,mean=0.4377/0.4438/0.4728,std=0.1980/0.2010/0.1970";

fn asset(name: &str) -> PathBuf {
    let dir = std::env::var_os("ACCLIMATE_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets"));
    let p = dir.join(name);
    assert!(p.is_file(), "missing asset {} — run `bash tools/setup.sh` first", p.display());
    p
}

fn gpu() -> Option<GpuContext> {
    match GpuContext::new() {
        Ok(ctx) => Some(ctx),
        Err(e) if std::env::var("ACCLIMATE_ALLOW_NO_GPU").as_deref() == Ok("1") => {
            eprintln!("SKIPPED (ACCLIMATE_ALLOW_NO_GPU=1): {e}");
            None
        }
        Err(e) => panic!("{e}\n(set ACCLIMATE_ALLOW_NO_GPU=1 to skip GPU tests explicitly)"),
    }
}

fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

fn path_c(p: &Path) -> CString {
    c(p.to_str().expect("UTF-8 test paths"))
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(acclimate_last_error()) }.to_string_lossy().into_owned()
}

struct Session(*mut AcclimateSession);

impl Session {
    fn new(model: &Path, config: &str) -> Session {
        let mut s = ptr::null_mut();
        let status = unsafe { acclimate_session_new(path_c(model).as_ptr(), c(config).as_ptr(), &mut s) };
        assert_eq!(status, AcclimateStatus::OK, "{}", last_error());
        Session(s)
    }

    fn push(&self, frame: &AcclimateFrame) -> AcclimatePrediction {
        let mut p = std::mem::MaybeUninit::<AcclimatePrediction>::uninit();
        let status = unsafe { acclimate_session_push_frame(self.0, frame, p.as_mut_ptr()) };
        assert_eq!(status, AcclimateStatus::OK, "{}", last_error());
        unsafe { p.assume_init() }
    }

    fn load(&self, path: &Path) -> AcclimateStatus {
        unsafe { acclimate_session_load_state(self.0, path_c(path).as_ptr()) }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        unsafe { acclimate_session_free(self.0) };
    }
}

fn plane(data: &[u8], row_stride: usize, pixel_stride: usize) -> AcclimatePlane {
    AcclimatePlane {
        data: data.as_ptr(),
        len: data.len(),
        row_stride: row_stride as u32,
        pixel_stride: pixel_stride as u32,
    }
}

const NO_PLANE: AcclimatePlane = AcclimatePlane { data: ptr::null(), len: 0, row_stride: 0, pixel_stride: 0 };

/// A picture with structure in every channel, as bytes 0–255.
fn picture(w: usize, h: usize, seed: u32) -> Vec<[u8; 3]> {
    (0..w * h)
        .map(|i| {
            let (x, y) = ((i % w) as f32 / w as f32, (i / w) as f32 / h as f32);
            let s = seed as f32;
            [
                (255.0 * x * (0.5 + 0.5 * (9.0 * (x - 0.3).hypot(y - 0.6) + s).sin())) as u8,
                (255.0 * (1.0 - y) * 0.7) as u8,
                (127.5 + 127.0 * (6.0 * x * y + 0.7 * s).sin()) as u8,
            ]
        })
        .collect()
}

/// Softmax of the engine's logits and their top 5, most probable first.
fn reference_top5(engine: &mut Engine, input: Vec<f32>) -> Vec<(u32, f32)> {
    let logits = engine.run(&[Tensor::f32(vec![1, 3, 32, 32], input)]).expect("the engine runs").remove(0);
    let l = logits.to_f32_vec();
    let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = l.iter().map(|v| ((v - m) as f64).exp()).collect();
    let sum: f64 = e.iter().sum();
    let mut idx: Vec<usize> = (0..e.len()).collect();
    idx.sort_by(|&a, &b| e[b].total_cmp(&e[a]));
    idx.into_iter().take(5).map(|i| (i as u32, (e[i] / sum) as f32)).collect()
}

fn assert_close(got: &AcclimatePrediction, want: &[(u32, f32)], what: &str) {
    assert_eq!(got.k, 5, "{what}");
    for (i, (class, prob)) in want.iter().enumerate() {
        assert_eq!(got.classes[i], *class, "{what}: class {i}: {:?} vs {want:?}", got.classes);
        assert!((got.probs[i] - prob).abs() < 2e-4, "{what}: probability {i}: {} vs {prob}", got.probs[i]);
    }
}

#[test]
fn predictions_match_cpu_preprocessing_and_the_engine() {
    let Some(ctx) = gpu() else { return };
    let model = asset("svhn.onnx");
    let spec: PreprocessSpec = SPEC.parse().unwrap();
    let mut engine = Engine::new(&ctx, Model::load(&model).unwrap());
    let session = Session::new(&model, &format!("[adapt]\nmethod = \"source\"\n[preprocess]\nspec = \"{SPEC}\"\n"));

    // RGBA with padded rows.
    let (w, h, stride) = (45usize, 37usize, 45 * 4 + 20);
    let pic = picture(w, h, 3);
    let mut rgba = vec![7u8; stride * (h - 1) + w * 4];
    for (i, p) in pic.iter().enumerate() {
        let o = (i / w) * stride + (i % w) * 4;
        rgba[o..o + 3].copy_from_slice(p);
        rgba[o + 3] = 255;
    }
    let frame = AcclimateFrame {
        width: w as u32,
        height: h as u32,
        format: AcclimatePixelFormat::RGBA8,
        planes: [plane(&rgba, stride, 4), NO_PLANE, NO_PLANE],
        rotation: 0,
        mirror: false,
        timestamp_ns: 0,
    };
    let lib = Frame::new(
        w as u32,
        h as u32,
        acclimate::stream::frame::PixelFormat::Rgba8,
        vec![Plane::new(0, stride, 4)],
        rgba.clone(),
    );
    let want = reference_top5(&mut engine, preprocess_cpu(&lib, &spec).unwrap());
    assert_close(&session.push(&frame), &want, "RGBA");

    // Android YUV_420_888 (chroma interleaved, pixel stride 2), rotated 90° and mirrored.
    let (w, h) = (40usize, 30usize);
    let (cw, ch) = (w / 2, h / 2);
    let y: Vec<u8> = (0..w * h).map(|i| (16 + (i * 7 + i / w * 3) % 220) as u8).collect();
    let cs = 2 * cw + 6;
    let mut uv = vec![0u8; cs * (ch - 1) + 2 * cw];
    for j in 0..ch {
        for i in 0..cw {
            uv[j * cs + 2 * i] = (60 + (i * 9) % 140) as u8;
            uv[j * cs + 2 * i + 1] = (200 - (j * 11) % 150) as u8;
        }
    }
    let chroma_len = cs * (ch - 1) + 2 * (cw - 1) + 1;
    let frame = AcclimateFrame {
        width: w as u32,
        height: h as u32,
        format: AcclimatePixelFormat::I420,
        planes: [plane(&y, w, 1), plane(&uv[..chroma_len], cs, 2), plane(&uv[1..1 + chroma_len], cs, 2)],
        rotation: 90,
        mirror: true,
        timestamp_ns: 0,
    };
    let mut data = y.clone();
    data.extend_from_slice(&uv);
    let lib = Frame::yuv_420_888(
        w as u32,
        h as u32,
        data,
        Plane::new(0, w, 1),
        Plane::new(w * h, cs, 2),
        Plane::new(w * h + 1, cs, 2),
    )
    .with_rotation(Rotation::R90)
    .with_mirror(true);
    let want = reference_top5(&mut engine, preprocess_cpu(&lib, &spec).unwrap());
    assert_close(&session.push(&frame), &want, "YUV_420_888 rotated and mirrored");
}

fn rgba_frame(rgba: &[u8], w: usize, h: usize) -> AcclimateFrame {
    AcclimateFrame {
        width: w as u32,
        height: h as u32,
        format: AcclimatePixelFormat::RGBA8,
        planes: [plane(rgba, w * 4, 4), NO_PLANE, NO_PLANE],
        rotation: 0,
        mirror: false,
        timestamp_ns: 0,
    }
}

fn rgba(w: usize, h: usize, seed: u32) -> Vec<u8> {
    picture(w, h, seed).iter().flat_map(|p| [p[0], p[1], p[2], 255]).collect()
}

#[test]
fn states_with_nan_or_of_another_model_are_refused_and_the_cli_state_loads() {
    let Some(ctx) = gpu() else { return };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("abi-states");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model_path = asset("svhn.onnx");
    let config = format!("[adapt]\nmethod = \"tent\"\n[optimizer]\nlr = 0.05\n[preprocess]\nspec = \"{SPEC}\"\n");
    let session = Session::new(&model_path, &config);
    let model = Model::load(&model_path).unwrap();
    let fingerprint = state::fingerprint(&model.graph);
    let bn = model.graph.batch_norms().remove(0);
    let scale = model.graph.initializers[&bn.scale].clone();
    // The twin lives the same history without the failed loads.
    let twin = Session::new(&model_path, &config);
    let picture = rgba(32, 32, 5);
    session.push(&rgba_frame(&picture, 32, 32));
    twin.push(&rgba_frame(&picture, 32, 32));

    // A sealed, checksummed state of this model holding one NaN.
    let mut values = scale.to_f32_vec();
    values[0] = f32::NAN;
    let nan = dir.join("nan.state");
    let meta = vec![("method".to_string(), "tent".to_string())];
    state::save_non_finite_state_for_tests(
        &nan,
        &fingerprint,
        &[(bn.scale.clone(), Tensor::f32(scale.shape.clone(), values))],
        &meta,
    )
    .unwrap();
    assert_eq!(session.load(&nan), AcclimateStatus::STATE_ERROR);
    let e = last_error();
    assert!(e.contains("NaN") && e.contains(&bn.scale) && e.contains("nan.state"), "{e}");

    // A state of another model.
    let usps = Model::load(&asset("usps.onnx")).unwrap();
    let foreign = dir.join("usps.state");
    state::save_state(&foreign, &state::fingerprint(&usps.graph), &[], &meta).unwrap();
    assert_eq!(session.load(&foreign), AcclimateStatus::STATE_ERROR);
    assert!(last_error().contains("different model"), "{}", last_error());

    // Neither changed the session: it predicts as its twin.
    let after = session.push(&rgba_frame(&picture, 32, 32));
    let want = twin.push(&rgba_frame(&picture, 32, 32));
    assert_eq!((after.classes, after.probs), (want.classes, want.probs));

    // A plain session state (as `acclimate stream --save-state` writes) loads: the adapted
    // parameters predict otherwise than the source model.
    let mut adapted = acclimate::adapt::Session::new(
        &ctx,
        model.clone(),
        acclimate::adapt::AdaptConfig::from_toml_str("[adapt]\nmethod = \"tent\"\n[optimizer]\nlr = 0.5").unwrap(),
    )
    .unwrap();
    let batch: Vec<f32> = (0..8 * 3 * 32 * 32).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    for _ in 0..3 {
        adapted.step(&Tensor::f32(vec![8, 3, 32, 32], batch.clone())).unwrap();
    }
    let plain = dir.join("plain.state");
    adapted.save_state(&plain).unwrap();
    assert_eq!(session.load(&plain), AcclimateStatus::OK, "{}", last_error());
    let loaded = session.push(&rgba_frame(&picture, 32, 32));
    let want = twin.push(&rgba_frame(&picture, 32, 32));
    assert_ne!(loaded.probs, want.probs, "the plain state changed nothing");
}

/// The GPU self-test through the ABI: OK on this GPU with every stage counted, and a NULL count
/// pointer is allowed.
#[test]
fn the_gpu_self_test_passes_through_the_abi() {
    let Some(_ctx) = gpu() else { return };
    let mut stages = 0u32;
    let status = unsafe { acclimate_gpu_self_test(&mut stages) };
    assert_eq!(status, AcclimateStatus::OK, "{}", last_error());
    assert!(stages >= 10, "{stages} stages");
    assert_eq!(unsafe { acclimate_gpu_self_test(ptr::null_mut()) }, AcclimateStatus::OK, "{}", last_error());
}
