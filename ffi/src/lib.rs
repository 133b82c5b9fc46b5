//! The C ABI of Acclimate: a session from an ONNX model and a TOML config, camera frames in,
//! one prediction per frame out, adaptation in between; the adapted state saved and loaded.
//! The Kotlin and Swift bindings (`mobile.rs`, through UniFFI) expose the same session beside it;
//! both go through `bridge.rs`, so frames are checked and errors classified the same way.
//!
//! `include/acclimate.h` is generated from this file by cbindgen (`cbindgen.toml`); the test
//! `tests/header.rs` regenerates it and fails on any difference. Rules every function keeps:
//! - no panic unwinds into C: each body runs under `catch_unwind`, a panic is
//!   `ACCLIMATE_INTERNAL_ERROR`;
//! - every pointer and length is checked before use (NULL, planes shorter than their strides
//!   imply, enum values out of range), and C structs are read field by field as plain integers,
//!   so a bad `format` or `mirror` byte is an error, not undefined behaviour;
//! - a failure sets this thread's message (`acclimate_last_error`);
//! - a session is a `Mutex`: calls from several threads on one session are serialized, and
//!   different sessions run concurrently (sharing one GPU device and its compiled pipelines).

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::ptr;
use std::sync::Mutex;
use std::time::Instant;

use acclimate::{Frame, PixelFormat};

uniffi::setup_scaffolding!("acclimate");

mod bridge;
mod mobile;

use bridge::{Failure, Kind, Stream};

/// The most classes a prediction returns (`AcclimatePrediction.classes` and `.probs`).
pub const ACCLIMATE_MAX_TOP_K: usize = 5;

const _: () = assert!(ACCLIMATE_MAX_TOP_K == bridge::MAX_TOP_K);

/// What a call did. Every status but `ACCLIMATE_OK` comes with a message from
/// `acclimate_last_error` on the same thread.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcclimateStatus {
    /// Success.
    OK = 0,
    /// A NULL pointer, an empty path or another argument the call cannot take.
    INVALID_ARGUMENT = 1,
    /// The model cannot be loaded or run (malformed ONNX, unsupported op, shapes).
    MODEL_ERROR = 2,
    /// The config text is not valid TOML, has an unknown key, a value out of range, no
    /// `[preprocess]`, or a setting this model cannot run with.
    CONFIG_ERROR = 3,
    /// The frame is malformed (NULL plane, plane shorter than its strides imply, bad format,
    /// bad rotation); the session is unchanged and takes the next frame.
    FRAME_ERROR = 4,
    /// A state file that is torn, corrupt, of another model or non-finite; the session is
    /// unchanged.
    STATE_ERROR = 5,
    /// No GPU adapter, a lost device, or out of GPU memory.
    GPU_ERROR = 6,
    /// A file could not be read or written (model, state).
    IO_ERROR = 7,
    /// A bug in Acclimate (a caught panic); a session it happened in refuses further calls.
    INTERNAL_ERROR = 8,
}

/// How the bytes of a frame encode its pixels.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcclimatePixelFormat {
    /// 4 bytes per pixel: R, G, B, A.
    RGBA8 = 0,
    /// 4 bytes per pixel: B, G, R, A.
    BGRA8 = 1,
    /// 3 bytes per pixel: R, G, B.
    RGB8 = 2,
    /// 1 byte per pixel: luma.
    GRAY8 = 3,
    /// planes[0] Y, planes[1] interleaved U/V pairs at half resolution (BT.601 video range).
    NV12 = 4,
    /// planes[0] Y, planes[1] interleaved V/U pairs at half resolution (Android's camera default).
    NV21 = 5,
    /// planes[0] Y, planes[1] U, planes[2] V, chroma at half resolution; chroma pixel_stride 2
    /// takes Android's YUV_420_888 semi-planar layouts as they come.
    I420 = 6,
}

/// One plane of a frame.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AcclimatePlane {
    /// The plane's first byte (its top-left sample).
    pub data: *const u8,
    /// Bytes readable from `data`: at least (rows − 1)·row_stride + (columns − 1)·pixel_stride
    /// + the sample's size.
    pub len: usize,
    /// Bytes from one row to the next; 0: tightly packed rows (columns × pixel_stride).
    pub row_stride: u32,
    /// Bytes from one sample to the next within a row; 0: the format's sample size (4 for
    /// RGBA8/BGRA8, 3 for RGB8, 2 for NV12/NV21 chroma pairs, else 1).
    pub pixel_stride: u32,
}

/// One camera frame. The call reads it and its planes during the call only.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AcclimateFrame {
    /// Width in pixels as stored (before rotation).
    pub width: u32,
    /// Height in pixels as stored (before rotation).
    pub height: u32,
    pub format: AcclimatePixelFormat,
    /// packed: planes[0]; NV12/NV21: Y, interleaved chroma; I420: Y, U, V. Unused planes are
    /// not read.
    pub planes: [AcclimatePlane; 3],
    /// Clockwise degrees that bring the frame upright: 0, 90, 180, 270.
    pub rotation: u32,
    /// Mirror horizontally after the rotation (front cameras).
    pub mirror: bool,
    /// The producer's timestamp, carried for the caller's bookkeeping.
    pub timestamp_ns: i64,
}

/// One frame's prediction.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AcclimatePrediction {
    /// The frame's position among the frames pushed to the session (0-based; refused frames
    /// count too, so indices follow the camera's frames).
    pub frame_index: u64,
    /// How many entries of `classes` and `probs` are set: min(ACCLIMATE_MAX_TOP_K, classes).
    pub k: u32,
    /// The most probable classes, most probable first.
    pub classes: [u32; ACCLIMATE_MAX_TOP_K],
    /// Their probabilities.
    pub probs: [f32; ACCLIMATE_MAX_TOP_K],
    /// A gradient step landed with this frame: its update reached the parameters just before
    /// this frame's prediction (`[stream] steps = "background"`, the default: a step starts
    /// every `adapt_every` frames on the window and lands `adapt_every` frames later), or ran
    /// right after it (`steps = "inline"`).
    pub stepped: bool,
    /// Milliseconds from the call's entry to its return (an inline step included).
    pub latency_ms: f32,
}

/// Counters of a session.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AcclimateStats {
    /// Frames pushed (refused ones included): the next frame's index.
    pub frames: u64,
    /// Gradient steps taken on the stream.
    pub steps: u64,
    /// Updates the parameter guard refused because they would have written NaN or infinity.
    pub steps_skipped: u64,
}

/// A model adapting on a stream of frames. Opaque; one call at a time per session (concurrent
/// calls on one session are serialized), any thread.
pub struct AcclimateSession {
    inner: Mutex<Stream>,
}

// The C header declares these as C enums and bool; the ABI reads them as integers of these sizes.
const _: () = assert!(std::mem::size_of::<AcclimatePixelFormat>() == 4);
const _: () = assert!(std::mem::size_of::<AcclimateStatus>() == 4);
const _: () = assert!(std::mem::size_of::<bool>() == 1);

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

fn status(kind: Kind) -> AcclimateStatus {
    match kind {
        Kind::InvalidArgument => AcclimateStatus::INVALID_ARGUMENT,
        Kind::Model => AcclimateStatus::MODEL_ERROR,
        Kind::Config => AcclimateStatus::CONFIG_ERROR,
        Kind::Frame => AcclimateStatus::FRAME_ERROR,
        Kind::State => AcclimateStatus::STATE_ERROR,
        Kind::Gpu => AcclimateStatus::GPU_ERROR,
        Kind::Io => AcclimateStatus::IO_ERROR,
        Kind::Internal => AcclimateStatus::INTERNAL_ERROR,
    }
}

/// Runs an ABI body: a failure sets the message and becomes its status, a panic stops here.
fn run(call: &str, body: impl FnOnce() -> Result<(), Failure>) -> AcclimateStatus {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => AcclimateStatus::OK,
        Ok(Err(f)) => {
            if f.kind == Kind::Gpu {
                bridge::forget_context();
            }
            set_error(&format!("{call}: {}", f.message));
            status(f.kind)
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            set_error(&format!("{call}: internal error (a panic, stopped at the C boundary): {what}"));
            AcclimateStatus::INTERNAL_ERROR
        }
    }
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure::new(Kind::InvalidArgument, message)
}

/// Locks a session for one call. A session whose earlier call panicked stays refused: its
/// state may be half-updated.
fn with_session<T>(
    session: *const AcclimateSession,
    body: impl FnOnce(&mut Stream) -> Result<T, Failure>,
) -> Result<T, Failure> {
    if session.is_null() {
        return Err(invalid("session is NULL"));
    }
    // SAFETY: a non-NULL session is one acclimate_session_new returned and the caller has not
    // freed (the header's contract); the Mutex makes shared access sound.
    let session = unsafe { &*session };
    let mut guard = session.inner.lock().map_err(|_| {
        Failure::new(
            Kind::Internal,
            "the session is unusable after an internal error in an earlier call; free it and create a new one",
        )
    })?;
    body(&mut guard)
}

/// A path argument: bytes as the OS takes them (UTF-8 or not on Unix).
fn path_arg(p: *const c_char, what: &str) -> Result<PathBuf, Failure> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and, by the contract, a NUL-terminated string.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    if bytes.is_empty() {
        return Err(invalid(format!("{what} is empty")));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
    }
    #[cfg(not(unix))]
    {
        std::str::from_utf8(bytes).map(PathBuf::from).map_err(|_| invalid(format!("{what} is not UTF-8")))
    }
}

/// The version of this library, e.g. "0.1.0". Static; never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn acclimate_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of this thread's last failed call ("" before any). Never NULL; valid until the
/// next failing call on this thread.
#[unsafe(no_mangle)]
pub extern "C" fn acclimate_last_error() -> *const c_char {
    static EMPTY: &CStr = c"";
    LAST_ERROR.try_with(|e| e.borrow().as_ptr()).unwrap_or(EMPTY.as_ptr())
}

/// Runs the GPU self-test on the device sessions share: a tiny golden network (convolution,
/// batch normalization, ReLU, global pooling, Gemm, softmax) and one TENT gradient step on the
/// GPU, each stage compared with a CPU reference. OK: the GPU computed every stage right, and
/// `*stages_out` (when not NULL) is the number of stages checked. GPU_ERROR: the driver computed
/// a stage wrong (or no GPU opened); `acclimate_last_error()` names the stage and its error, and
/// the app should not adapt on this GPU. `[gpu] self_test = true` in a session's config runs the
/// same test before the session opens.
///
/// # Safety
/// `stages_out` is NULL or points to writable storage for one `uint32_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn acclimate_gpu_self_test(stages_out: *mut u32) -> AcclimateStatus {
    run("acclimate_gpu_self_test", || {
        let stages = bridge::self_test()?;
        if !stages_out.is_null() {
            // SAFETY: non-NULL, writable by the contract; unaligned writes are fine.
            unsafe { stages_out.write_unaligned(stages as u32) };
        }
        Ok(())
    })
}

/// Opens `model_path` (ONNX) and builds a session from `config_toml`, the text of a config
/// file: it must hold `[preprocess]` with `spec = "..."` (the string `acclimate stream
/// --preprocess` takes); every key it leaves out takes the library's default, and with no
/// `[adapt]` at all the default preset's method and optimizer. `[stream]` `window` and
/// `adapt_every` drive the frame protocol. On success `*out` is the session, else NULL.
///
/// # Safety
/// `model_path` and `config_toml` are NULL or NUL-terminated strings; `out` is NULL or points
/// to writable storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn acclimate_session_new(
    model_path: *const c_char,
    config_toml: *const c_char,
    out: *mut *mut AcclimateSession,
) -> AcclimateStatus {
    run("acclimate_session_new", || {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: non-NULL, writable by the contract; unaligned writes are fine.
        unsafe { out.write_unaligned(ptr::null_mut()) };
        let path = path_arg(model_path, "model_path")?;
        if config_toml.is_null() {
            return Err(invalid("config_toml is NULL"));
        }
        // SAFETY: non-NULL and NUL-terminated by the contract.
        let text = unsafe { CStr::from_ptr(config_toml) }
            .to_str()
            .map_err(|e| Failure::new(Kind::Config, format!("config: the text is not UTF-8 ({e})")))?;
        let stream = Stream::open(&path, text, false)?;
        let session = Box::new(AcclimateSession { inner: Mutex::new(stream) });
        // SAFETY: as above.
        unsafe { out.write_unaligned(Box::into_raw(session)) };
        Ok(())
    })
}

/// Frees a session and its GPU resources. NULL is a no-op.
///
/// # Safety
/// `session` is NULL or a session from `acclimate_session_new` not freed yet, with no call on it
/// in progress on another thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn acclimate_session_free(session: *mut AcclimateSession) {
    if session.is_null() {
        return;
    }
    run("acclimate_session_free", || {
        // SAFETY: by the contract, a live session owned by the caller, given up here.
        drop(unsafe { Box::from_raw(session) });
        Ok(())
    });
}

/// The model's number of classes.
///
/// # Safety
/// `session` is NULL or a live session; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn acclimate_session_num_classes(
    session: *const AcclimateSession,
    out: *mut u32,
) -> AcclimateStatus {
    run("acclimate_session_num_classes", || {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let n = with_session(session, |s| s.num_classes())?;
        let n =
            u32::try_from(n).map_err(|_| Failure::new(Kind::Model, format!("{n} classes do not fit a uint32_t")))?;
        // SAFETY: non-NULL, writable by the contract.
        unsafe { out.write_unaligned(n) };
        Ok(())
    })
}

/// The fields of an `AcclimateFrame`, read as plain integers: a C enum or bool holding a value
/// Rust's types do not allow is then an error message, never undefined behaviour.
struct RawFrame {
    width: u32,
    height: u32,
    format: u32,
    planes: [AcclimatePlane; 3],
    rotation: u32,
    mirror: u8,
    timestamp_ns: i64,
}

/// # Safety
/// `p` is non-NULL and points to an `AcclimateFrame`'s bytes.
unsafe fn read_frame(p: *const AcclimateFrame) -> RawFrame {
    // SAFETY: the fields are read in place through raw pointers, unaligned, as their integer
    // types (the enum is an int-sized C enum, bool one byte: asserted above).
    unsafe {
        RawFrame {
            width: ptr::addr_of!((*p).width).read_unaligned(),
            height: ptr::addr_of!((*p).height).read_unaligned(),
            format: ptr::addr_of!((*p).format).cast::<u32>().read_unaligned(),
            planes: ptr::addr_of!((*p).planes).read_unaligned(),
            rotation: ptr::addr_of!((*p).rotation).read_unaligned(),
            mirror: ptr::addr_of!((*p).mirror).cast::<u8>().read_unaligned(),
            timestamp_ns: ptr::addr_of!((*p).timestamp_ns).read_unaligned(),
        }
    }
}

/// Copies a C frame into the library's [`Frame`] through [`bridge::build_frame`] (the checks the
/// Kotlin and Swift bindings share), reading each plane only within its `len`.
fn to_frame(raw: &RawFrame) -> Result<Frame, String> {
    let format = match raw.format {
        0 => PixelFormat::Rgba8,
        1 => PixelFormat::Bgra8,
        2 => PixelFormat::Rgb8,
        3 => PixelFormat::Gray8,
        4 => PixelFormat::Nv12,
        5 => PixelFormat::Nv21,
        6 => PixelFormat::I420,
        v => return Err(format!("format {v} is not an AcclimatePixelFormat (0 to 6)")),
    };
    let mut planes = Vec::with_capacity(3);
    for (i, p) in raw.planes.iter().take(format.plane_count()).enumerate() {
        if p.data.is_null() {
            return Err(format!("{}: data is NULL", bridge::plane_label(format, i)));
        }
        if p.len > isize::MAX as usize {
            return Err(format!("{}: len {} is more than a buffer can hold", bridge::plane_label(format, i), p.len));
        }
        // SAFETY: non-NULL, at most isize::MAX bytes, and by the contract `len` bytes are
        // readable from `data` for the duration of the call.
        let data = unsafe { std::slice::from_raw_parts(p.data, p.len) };
        planes.push(bridge::PlaneIn { data, row_stride: p.row_stride as usize, pixel_stride: p.pixel_stride as usize });
    }
    let frame =
        bridge::build_frame(i64::from(raw.width), i64::from(raw.height), format, &planes, i64::from(raw.rotation))?;
    Ok(frame.with_mirror(raw.mirror != 0).with_timestamp(raw.timestamp_ns / 1000))
}

/// Runs the frame protocol on one frame and returns its prediction at once: the frame is
/// preprocessed as `[preprocess]` says, predicted with the adapted model, added to the window,
/// and every `adapt_every` frames a gradient step starts on the window; it runs on a worker
/// thread beside the next frames and lands `adapt_every` frames later (`stepped`), or, with
/// `[stream] steps = "inline"`, runs before the call returns. A malformed frame is `ACCLIMATE_FRAME_ERROR`; the session is unchanged (the
/// frame still takes an index) and takes the next frame. On error `*out` is zeroed.
///
/// # Safety
/// `session` is NULL or a live session; `frame` is NULL or points to a frame whose planes
/// point to at least `len` readable bytes each; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn acclimate_session_push_frame(
    session: *mut AcclimateSession,
    frame: *const AcclimateFrame,
    out: *mut AcclimatePrediction,
) -> AcclimateStatus {
    let start = Instant::now();
    run("acclimate_session_push_frame", || {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let zero = AcclimatePrediction {
            frame_index: 0,
            k: 0,
            classes: [0; ACCLIMATE_MAX_TOP_K],
            probs: [0.0; ACCLIMATE_MAX_TOP_K],
            stepped: false,
            latency_ms: 0.0,
        };
        // SAFETY: non-NULL, writable by the contract.
        unsafe { out.write_unaligned(zero) };
        if frame.is_null() {
            return Err(invalid("frame is NULL"));
        }
        with_session(session, |s| {
            // SAFETY: non-NULL, an AcclimateFrame by the contract.
            let raw = unsafe { read_frame(frame) };
            let p = s.push_built(to_frame(&raw))?;
            let mut pred = zero;
            pred.frame_index = p.frame_index;
            pred.k = p.top_k.len().min(ACCLIMATE_MAX_TOP_K) as u32;
            for (i, (class, prob)) in p.top_k.iter().take(ACCLIMATE_MAX_TOP_K).enumerate() {
                pred.classes[i] = *class as u32;
                pred.probs[i] = *prob;
            }
            pred.stepped = p.stepped;
            pred.latency_ms = bridge::elapsed_ms(start);
            // SAFETY: as above.
            unsafe { out.write_unaligned(pred) };
            Ok(())
        })
    })
}

/// Saves the session's whole state atomically to `path`: the adapted parameters, normalization
/// statistics and optimizer state, the window of recent frames and the frame and step counters,
/// so a session that loads it predicts the next frames exactly as this one will.
///
/// # Safety
/// `session` is NULL or a live session; `path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn acclimate_session_save_state(
    session: *mut AcclimateSession,
    path: *const c_char,
) -> AcclimateStatus {
    run("acclimate_session_save_state", || {
        let path = path_arg(path, "path")?;
        with_session(session, |s| s.save_state(&path))
    })
}

/// Loads a state saved by `acclimate_session_save_state` for the same model and preprocessing
/// (a state saved by `acclimate stream --save-state` loads too: the adapted model, with an
/// empty window). A torn, corrupt, foreign or non-finite state is `ACCLIMATE_STATE_ERROR` and
/// leaves the session as it was.
///
/// # Safety
/// `session` is NULL or a live session; `path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn acclimate_session_load_state(
    session: *mut AcclimateSession,
    path: *const c_char,
) -> AcclimateStatus {
    run("acclimate_session_load_state", || {
        let path = path_arg(path, "path")?;
        with_session(session, |s| s.load_state(&path))
    })
}

/// Restores the unadapted model (parameters, statistics, optimizer state) and empties the
/// window; frame indices go on.
///
/// # Safety
/// `session` is NULL or a live session.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn acclimate_session_reset(session: *mut AcclimateSession) -> AcclimateStatus {
    run("acclimate_session_reset", || with_session(session, |s| s.reset()))
}

/// The session's counters.
///
/// # Safety
/// `session` is NULL or a live session; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn acclimate_session_stats(
    session: *const AcclimateSession,
    out: *mut AcclimateStats,
) -> AcclimateStatus {
    run("acclimate_session_stats", || {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let s = with_session(session, |s| Ok(s.stats()))?;
        let stats = AcclimateStats { frames: s.frames, steps: s.steps, steps_skipped: s.steps_skipped };
        // SAFETY: non-NULL, writable by the contract.
        unsafe { out.write_unaligned(stats) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use acclimate::Plane;

    fn last_error() -> String {
        // SAFETY: acclimate_last_error never returns NULL and its string lives until the next failure.
        unsafe { CStr::from_ptr(acclimate_last_error()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn a_panic_stops_at_the_boundary_as_internal_error() {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let status = run("probe", || panic!("index out of bounds"));
        std::panic::set_hook(prev);
        assert_eq!(status, AcclimateStatus::INTERNAL_ERROR);
        let e = last_error();
        assert!(e.starts_with("probe: internal error") && e.contains("index out of bounds"), "{e}");
        assert_eq!(run("probe", || Ok(())), AcclimateStatus::OK);
        assert_eq!(last_error(), e, "a success keeps the last failure's message");
    }

    #[test]
    fn messages_with_nul_bytes_stay_whole() {
        assert_eq!(run("probe", || Err(Failure::new(Kind::Frame, "a\0b"))), AcclimateStatus::FRAME_ERROR);
        assert_eq!(last_error(), "probe: a b");
    }

    #[test]
    fn each_error_kind_has_its_status() {
        use acclimate::ErrorKind as K;
        let codes = [
            (K::InvalidArgument, 1),
            (K::Model, 2),
            (K::Config, 3),
            (K::Frame, 4),
            (K::State, 5),
            (K::Gpu, 6),
            (K::Io, 7),
            (K::Internal, 8),
        ];
        for (kind, code) in codes {
            assert_eq!(status(kind) as u32, code, "{kind:?}");
            assert_eq!(run("probe", || Err(Failure::new(kind, "x"))) as u32, code, "{kind:?} through run");
        }
    }

    #[test]
    fn library_errors_reach_c_as_their_kind() {
        let dir = std::env::temp_dir().join(format!("acclimate-ffi-kinds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = "[preprocess]\nspec = \"size=32\"\n";
        let missing = Stream::open(&dir.join("missing.onnx"), config, false).err().expect("a missing model opened");
        assert_eq!(status(missing.kind), AcclimateStatus::IO_ERROR, "{}", missing.message);
        assert!(missing.message.contains("missing.onnx"), "{}", missing.message);
        let garbage = dir.join("garbage.onnx");
        std::fs::write(&garbage, b"not a model").unwrap();
        let bad = Stream::open(&garbage, config, false).err().expect("a garbage model opened");
        assert_eq!(status(bad.kind), AcclimateStatus::MODEL_ERROR, "{}", bad.message);
        let spec =
            Stream::open(&garbage, "[preprocess]\nspec = \"size=abc\"\n", false).err().expect("a bad spec passed");
        assert_eq!(status(spec.kind), AcclimateStatus::CONFIG_ERROR, "{}", spec.message);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn raw(format: u32, width: u32, height: u32, planes: [AcclimatePlane; 3]) -> RawFrame {
        RawFrame { width, height, format, planes, rotation: 0, mirror: 0, timestamp_ns: 5_000 }
    }

    const NONE: AcclimatePlane = AcclimatePlane { data: ptr::null(), len: 0, row_stride: 0, pixel_stride: 0 };

    #[test]
    fn frames_copy_exactly_the_bytes_their_strides_reach() {
        // NV21 3x3 with padded rows: Y 3 rows of stride 5 (13 bytes), VU 2 rows of stride 6 (10 bytes).
        let y: Vec<u8> = (0..13).collect();
        let vu: Vec<u8> = (100..110).collect();
        let p = |d: &[u8], rs, ps| AcclimatePlane { data: d.as_ptr(), len: d.len(), row_stride: rs, pixel_stride: ps };
        let f = to_frame(&raw(5, 3, 3, [p(&y, 5, 0), p(&vu, 6, 2), NONE])).unwrap();
        assert_eq!(f.format, PixelFormat::Nv21);
        assert_eq!(f.planes, vec![Plane::new(0, 5, 1), Plane::new(13, 6, 2)]);
        assert_eq!(f.data, [y.clone(), vu.clone()].concat());
        assert_eq!(f.timestamp_us, 5);
        f.validate().unwrap();
        // One byte less in the chroma plane is refused before anything is read.
        let short = to_frame(&raw(5, 3, 3, [p(&y, 5, 0), p(&vu[..9], 6, 2), NONE])).unwrap_err();
        assert!(short.contains("planes[1] (VU)") && short.contains("reach byte 10, but len is 9"), "{short}");
        // Zero strides: tightly packed.
        let rgb = [7u8; 12];
        let f = to_frame(&raw(2, 2, 2, [p(&rgb, 0, 0), NONE, NONE])).unwrap();
        assert_eq!(f.planes, vec![Plane::new(0, 6, 3)]);
    }

    #[test]
    fn sizes_that_overflow_are_errors() {
        let b = [0u8; 4];
        let p = AcclimatePlane { data: b.as_ptr(), len: 4, row_stride: u32::MAX, pixel_stride: u32::MAX };
        for (w, h) in [(u32::MAX, u32::MAX), (1, u32::MAX), (u32::MAX, 1)] {
            let e = to_frame(&raw(0, w, h, [p, NONE, NONE])).unwrap_err();
            assert!(e.contains("planes[0] (RGBA)"), "{w}x{h}: {e}");
        }
    }
}
