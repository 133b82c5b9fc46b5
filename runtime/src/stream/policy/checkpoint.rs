//! A stream's whole state in one file, everything the next frames' predictions depend on; and
//! the reset of all of it.
//!
//! The adaptation [`Session`](crate::adapt::Session)'s state (parameters, normalization
//! statistics, optimizer moments, output-stage estimates) is not enough for a stream in frame
//! mode: the next gradient step runs on the ring buffer of the last `window` preprocessed
//! frames, LAME predicts each frame from that window, and a step falls due `adapt_every` frames
//! after the last one. A stream state holds all of it, so a stream that loads it predicts the
//! next frames exactly as the one that saved it did (and numbers them the same).
//!
//! Layout, little-endian:
//!
//! ```text
//! "ACCLSTRM" | u32 version | u64 frames | u64 steps | u64 since_step | u32 frame_len | u32 rows
//! | u64 session_len | the session's state file (safetensors, see adapt::state), session_len bytes
//! | rows × frame_len f32 (the window, oldest first)
//! | u32 flags | u32 classes | classes × f64 | u32 n | n × f64 (method auto in frame mode:
//!   flags bit 0: the latest decision judged the labels correlated, bit 1: the inputs' shift
//!   dominated its window (frames are normalised with the recent frames' statistics); the
//!   recent-class prior (0 classes: none yet), and the class-prior estimate its frames are
//!   corrected with when the latest decision judged the labels shifted (n = 0: not shifted))
//! | SHA-256 of everything before it
//! ```
//!
//! Version 1 files (without the recent-class prior) load with a fresh prior; version 2 files
//! (flags 0 or 1, before bit 1 existed) with the shift not dominating.
//!
//! Not included: SAR's loss EMA (the session keeps it outside its state file), the count of
//! steps the parameter guard skipped, and batch mode's frames of an incomplete batch (saving
//! with one pending is an error). A plain session state file, as `acclimate stream
//! --save-state` writes it, loads too: the session's state, with an empty window.
//!
//! Writes are atomic (a temporary file beside the target, fsynced, renamed over it); a load
//! reads and checks the whole file, the window and the session's tensors (finite, this model's)
//! before it changes anything, so a torn, foreign or non-finite state leaves the stream as it
//! was.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::{FramePriorState, StreamSession};
use crate::adapt::state::{self, StateError};

const MAGIC: &[u8; 8] = b"ACCLSTRM";
/// The layout version this build writes and reads.
const STREAM_STATE_VERSION: u32 = 3;
const HEADER: usize = 8 + 4 + 8 + 8 + 8 + 4 + 4 + 8;
const DIGEST: usize = 32;

/// The parts of a stream state file.
#[derive(Debug, PartialEq)]
struct Decoded<'a> {
    frames: u64,
    steps: u64,
    since_step: u64,
    frame_len: usize,
    rows: Vec<Vec<f32>>,
    session: &'a [u8],
    /// Method auto's recent-class prior (frame mode): the latest decision's "correlated" and the
    /// prior (empty: none yet).
    correlated: bool,
    /// The latest decision's "dominated" (version 3).
    dominated: bool,
    prior: Vec<f64>,
    label_prior: Vec<f64>,
}

fn encode(d: &Decoded<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + d.session.len() + d.rows.len() * d.frame_len * 4 + DIGEST);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&STREAM_STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&d.frames.to_le_bytes());
    out.extend_from_slice(&d.steps.to_le_bytes());
    out.extend_from_slice(&d.since_step.to_le_bytes());
    out.extend_from_slice(&(d.frame_len as u32).to_le_bytes());
    out.extend_from_slice(&(d.rows.len() as u32).to_le_bytes());
    out.extend_from_slice(&(d.session.len() as u64).to_le_bytes());
    out.extend_from_slice(d.session);
    for row in &d.rows {
        for v in row {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out.extend_from_slice(&(d.correlated as u32 | (d.dominated as u32) << 1).to_le_bytes());
    out.extend_from_slice(&(d.prior.len() as u32).to_le_bytes());
    for v in &d.prior {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&(d.label_prior.len() as u32).to_le_bytes());
    for v in &d.label_prior {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

/// Checks and splits a stream state; the error says what is wrong (the caller adds the path).
fn decode(bytes: &[u8]) -> Result<Decoded<'_>, String> {
    if bytes.len() < HEADER + DIGEST {
        return Err(format!("{} bytes, shorter than the {}-byte header and checksum", bytes.len(), HEADER + DIGEST));
    }
    if &bytes[..8] != MAGIC {
        return Err("not an Acclimate stream state".into());
    }
    let (body, digest) = bytes.split_at(bytes.len() - DIGEST);
    if Sha256::digest(body).as_slice() != digest {
        return Err("checksum mismatch: the file was cut short or changed after saving".into());
    }
    let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap_or([0; 8]));
    let version = u32_at(8);
    if !(1..=STREAM_STATE_VERSION).contains(&version) {
        return Err(format!("stream state version {version}; this build reads versions 1 to {STREAM_STATE_VERSION}"));
    }
    let (frames, steps, since_step) = (u64_at(12), u64_at(20), u64_at(28));
    let (frame_len, rows, session_len) = (u32_at(36) as usize, u32_at(40) as usize, u64_at(44));
    let window_bytes = rows.checked_mul(frame_len).and_then(|n| n.checked_mul(4));
    let window_end = window_bytes
        .and_then(|w| usize::try_from(session_len).ok().and_then(|s| s.checked_add(w)))
        .and_then(|n| n.checked_add(HEADER));
    let promised = |prior: &str| {
        format!(
            "the header promises a {session_len}-byte session state and {rows} frames of {frame_len} floats{prior}, \
             the file holds {} bytes for them",
            body.len() - HEADER
        )
    };
    // Version 2: the recent-class prior after the window.
    let (correlated, classes) = match (version, window_end) {
        (2.., Some(end)) if body.len() >= end + 8 => (u32_at(end), u32_at(end + 4) as usize),
        (2.., _) => return Err(promised(" and a recent-class prior")),
        _ => (0, 0),
    };
    // The class-prior estimate's count, after the recent-class prior.
    let label_at = window_end.and_then(|e| classes.checked_mul(8).and_then(|n| n.checked_add(e + 8)));
    let label_classes = match (version, label_at) {
        (2.., Some(at)) if body.len() >= at + 4 => u32_at(at) as usize,
        (2.., _) => return Err(promised(&format!(" and a prior of {classes} classes"))),
        _ => 0,
    };
    let prior_bytes = if version >= 2 {
        classes.checked_add(label_classes).and_then(|n| n.checked_mul(8)).and_then(|n| n.checked_add(12))
    } else {
        Some(0)
    };
    let expected = window_end.zip(prior_bytes).and_then(|(n, p)| n.checked_add(p));
    if expected != Some(body.len()) {
        return Err(promised(&if version >= 2 {
            format!(" and priors of {classes} and {label_classes} classes")
        } else {
            String::new()
        }));
    }
    let prior_bytes = prior_bytes.unwrap_or(0);
    let session_end = HEADER + session_len as usize;
    let window_end = body.len() - prior_bytes;
    let window = &body[session_end..window_end];
    let rows = if frame_len == 0 {
        vec![Vec::new(); rows]
    } else {
        window
            .chunks_exact(frame_len * 4)
            .map(|r| r.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            .collect()
    };
    if steps > frames || since_step > frames {
        return Err(format!("{steps} steps and {since_step} frames since the last one, of {frames} frames in all"));
    }
    let flags = correlated;
    if flags > 3 || (version < 3 && flags > 1) {
        return Err(format!("the recent-class prior's correlated flag is {flags}, not 0 or 1 (version 3: up to 3)"));
    }
    let floats = |b: &[u8]| -> Vec<f64> {
        b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
    };
    let (prior, label_prior) = match body.get(window_end + 8..) {
        Some(rest) if version >= 2 => (floats(&rest[..classes * 8]), floats(&rest[classes * 8 + 4..])),
        _ => (Vec::new(), Vec::new()),
    };
    if prior.iter().chain(&label_prior).any(|v| !(v.is_finite() && *v >= 0.0)) {
        return Err("a frame-mode class prior holds a negative, NaN or infinite value".into());
    }
    Ok(Decoded {
        frames,
        steps,
        since_step,
        frame_len,
        rows,
        session: &body[HEADER..session_end],
        correlated: flags & 1 == 1,
        dominated: flags & 2 == 2,
        prior,
        label_prior,
    })
}

/// A scratch file for the session's part of a stream state, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    /// A fresh file in `dir` holding `bytes` (or an empty name to be written by someone else).
    fn create(dir: &Path, bytes: Option<&[u8]>) -> io::Result<Scratch> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = dir.join(format!(
            ".acclimate-stream-session.tmp-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let scratch = Scratch(path);
        let mut f = fs::OpenOptions::new().write(true).create_new(true).open(&scratch.0)?;
        if let Some(b) = bytes {
            f.write_all(b)?;
        }
        Ok(scratch)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Best effort: a session save renames its own temporaries, and this one may be gone.
        let _ = fs::remove_file(&self.0);
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `bytes` to a temporary beside `path`, fsyncs it, renames it over `path` and fsyncs the
/// directory: a crash leaves the old file or the new one, never a mix.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent_dir(path);
    let tmp = Scratch::create(&dir, None)?;
    let mut f = fs::OpenOptions::new().write(true).truncate(true).open(&tmp.0)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp.0, path)?;
    #[cfg(unix)]
    fs::File::open(&dir)?.sync_all()?;
    Ok(())
}

/// The same error, naming `path` (the stream state) instead of the scratch file the session
/// read its part from.
fn at(e: StateError, path: &Path) -> StateError {
    let path = path.to_path_buf();
    match e {
        StateError::Read { source, .. } => StateError::Read { path, source },
        StateError::Write { source, .. } => StateError::Write { path, source },
        StateError::Corrupt { reason, .. } => StateError::Corrupt { path, reason },
        StateError::Version { found, .. } => StateError::Version { path, found },
        StateError::Fingerprint { expected, found, .. } => StateError::Fingerprint { path, expected, found },
        StateError::Missing { name, .. } => StateError::Missing { path, name },
        StateError::Tensor { name, reason, .. } => StateError::Tensor { path, name, reason },
        other => other,
    }
}

fn at_session(e: crate::Error, path: &Path) -> crate::Error {
    match e {
        crate::Error::State(s) => crate::Error::State(at(s, path)),
        other => other,
    }
}

impl StreamSession {
    /// Saves the stream's whole state (the session's, the window, the frame and step counters)
    /// atomically to `path`; see the `checkpoint` module for what it holds.
    pub fn save_state(&self, path: &Path) -> crate::Result<()> {
        if !self.pending.is_empty() {
            return Err(StateError::Invalid(format!(
                "{} frame(s) of an incomplete batch are pending: save after the batch completes, or after finish()",
                self.pending.len()
            ))
            .into());
        }
        let write_err = |source| StateError::Write { path: path.to_path_buf(), source };
        let scratch = Scratch::create(&parent_dir(path), None).map_err(write_err)?;
        // A background step in flight writes its update first and counts as taken; the frame it
        // lands before will not report it, as a stream loaded from this state will not.
        let pending = match &self.inflight {
            Some(f) => {
                f.silenced.store(true, std::sync::atomic::Ordering::SeqCst);
                f.settle() as u64
            }
            None => 0,
        };
        self.session().save_state(&scratch.0).map_err(|e| at_session(e, path))?;
        let session = fs::read(&scratch.0).map_err(write_err)?;
        drop(scratch);
        let bytes = encode(&Decoded {
            frames: self.next_index,
            steps: self.steps + pending,
            since_step: self.since_step as u64,
            frame_len: self.frame_len,
            rows: self.window_rows()?,
            session: &session,
            correlated: self.frame_prior.correlated,
            dominated: self.frame_prior.dominated,
            prior: self.frame_prior.prior.as_ref().map(|p| p.r.clone()).unwrap_or_default(),
            label_prior: self.frame_prior.label_prior.clone().unwrap_or_default(),
        });
        write_atomic(path, &bytes).map_err(write_err)?;
        Ok(())
    }

    /// Loads a state saved by [`StreamSession::save_state`] for the same model and
    /// preprocessing (or a plain session state: the session's part only, the window emptied).
    /// The frames after it predict as they did after the save. On any error the stream is as it
    /// was.
    pub fn load_state(&mut self, path: &Path) -> crate::Result<()> {
        let read_err = |source| StateError::Read { path: path.to_path_buf(), source };
        let bytes = fs::read(path).map_err(read_err)?;
        if !bytes.starts_with(MAGIC) {
            self.check_session_part(path)?;
            // A background step in flight lands first (the state supersedes it).
            let _ = self.land();
            self.locked().load_state(path)?;
            self.clear_window();
            self.pending.clear();
            self.since_step = 0;
            self.frame_prior = FramePriorState { on: self.frame_prior.on, ..Default::default() };
            self.apply_frame_weight();
            return Ok(());
        }
        let corrupt = |reason: String| StateError::Corrupt { path: path.to_path_buf(), reason };
        let d = decode(&bytes).map_err(corrupt)?;
        let mismatch = |what: String| crate::Error::State(StateError::Mismatch(what));
        if d.frame_len != self.frame_len {
            return Err(mismatch(format!(
                "the stream state's frames have {} values each, this stream's preprocessing makes {}",
                d.frame_len, self.frame_len
            )));
        }
        let window = self.config.stream.window;
        if d.rows.len() > window {
            return Err(mismatch(format!(
                "the stream state holds a window of {} frames, this stream's stream.window is {window}",
                d.rows.len()
            )));
        }
        if let Some(i) = d.rows.iter().position(|r| r.iter().any(|v| !v.is_finite())) {
            return Err(StateError::Tensor {
                path: path.to_path_buf(),
                name: format!("window frame {i}"),
                reason: "holds NaN or infinite values".into(),
            }
            .into());
        }
        // The session reads its part from a file: beside the state (the app can write there),
        // else in the temporary directory.
        let scratch = Scratch::create(&parent_dir(path), Some(d.session))
            .or_else(|_| Scratch::create(&std::env::temp_dir(), Some(d.session)))
            .map_err(|source| StateError::Write {
                path: std::env::temp_dir().join(".acclimate-stream-session.tmp"),
                source,
            })?;
        self.check_session_part(&scratch.0).map_err(|e| at_session(e, path))?;
        // A background step in flight lands first (the state supersedes it). The checks above
        // did not touch the session, so a file they refuse leaves the step in flight as it was.
        let _ = self.land();
        self.locked().load_state(&scratch.0).map_err(|e| at_session(e, path))?;
        self.set_window_rows(d.rows)?;
        self.pending.clear();
        self.since_step = d.since_step as usize;
        self.next_index = d.frames;
        self.steps = d.steps;
        self.frame_prior = FramePriorState {
            on: self.frame_prior.on,
            correlated: d.correlated,
            dominated: d.dominated,
            prior: (!d.prior.is_empty()).then_some(crate::adapt::methods::auto::FramePrior { r: d.prior }),
            label_prior: (!d.label_prior.is_empty()).then_some(d.label_prior),
        };
        self.apply_frame_weight();
        Ok(())
    }

    /// Restores the source model (parameters, statistics, optimizer state: [`Session::reset`])
    /// and empties the window, so the next step waits for `adapt_every` new frames. Frame
    /// indices and the step count go on.
    ///
    /// [`Session::reset`]: crate::adapt::Session::reset
    pub fn reset(&mut self) -> crate::Result<()> {
        // A background step in flight lands first; the reset undoes it.
        let _ = self.land();
        self.locked().reset()?;
        self.clear_window();
        self.pending.clear();
        self.since_step = 0;
        self.frame_prior = FramePriorState { on: self.frame_prior.on, ..Default::default() };
        self.apply_frame_weight();
        Ok(())
    }

    /// Refuses a session state that belongs to another model or holds a NaN or an infinity
    /// before the session applies any of it.
    fn check_session_part(&self, file: &Path) -> crate::Result<()> {
        let loaded = state::load_state(file, &state::fingerprint(&self.graph))?;
        for (name, t) in &loaded.tensors {
            if t.as_f32().is_some_and(|v| v.iter().any(|x| !x.is_finite())) {
                return Err(StateError::Tensor {
                    path: file.to_path_buf(),
                    name: name.clone(),
                    reason: "holds NaN or infinite values".into(),
                }
                .into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(session: &[u8]) -> Decoded<'_> {
        Decoded {
            frames: 9,
            steps: 2,
            since_step: 3,
            frame_len: 3,
            rows: vec![vec![1.0, -2.0, 0.5], vec![0.0, f32::MIN_POSITIVE, 3.25]],
            session,
            correlated: true,
            dominated: true,
            prior: vec![0.5, 0.25, 0.25],
            label_prior: vec![0.125, 0.875],
        }
    }

    fn reseal(mut b: Vec<u8>) -> Vec<u8> {
        b.truncate(b.len() - DIGEST);
        let d = Sha256::digest(&b);
        b.extend_from_slice(&d);
        b
    }

    #[test]
    fn stream_state_round_trips() {
        let bytes = encode(&sample(b"session-bytes"));
        assert_eq!(decode(&bytes).unwrap(), sample(b"session-bytes"));
        let empty = Decoded {
            rows: Vec::new(),
            frames: 0,
            steps: 0,
            since_step: 0,
            correlated: false,
            dominated: false,
            prior: Vec::new(),
            label_prior: Vec::new(),
            ..sample(b"")
        };
        assert_eq!(decode(&encode(&empty)).unwrap(), empty);
    }

    /// A version-1 file (no recent-class prior after the window) still loads, with no prior.
    #[test]
    fn version_1_stream_states_load_without_a_prior() {
        let bare = || Decoded {
            correlated: false,
            dominated: false,
            prior: Vec::new(),
            label_prior: Vec::new(),
            ..sample(b"session-bytes")
        };
        let v2 = encode(&bare());
        let mut v1 = v2[..v2.len() - DIGEST - 12].to_vec();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&[0; DIGEST]);
        let v1 = reseal(v1);
        let d = decode(&v1).unwrap();
        assert_eq!(d, bare());
    }

    /// Version 2 wrote the correlated flag alone: 0 or 1 loads (not dominated), 2 is refused;
    /// version 3 keeps "dominated" in bit 1.
    #[test]
    fn version_2_flags_load_without_dominance() {
        let v3 = encode(&sample(b"session-bytes"));
        let flags_at = v3.len() - DIGEST - 2 * 8 - 4 - 3 * 8 - 8;
        assert_eq!(u32::from_le_bytes(v3[flags_at..flags_at + 4].try_into().unwrap()), 3);
        let mut v2 = v3.clone();
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        v2[flags_at..flags_at + 4].copy_from_slice(&1u32.to_le_bytes());
        let sealed = reseal(v2.clone());
        let d = decode(&sealed).unwrap();
        assert!(d.correlated && !d.dominated);
        v2[flags_at..flags_at + 4].copy_from_slice(&2u32.to_le_bytes());
        assert!(decode(&reseal(v2)).unwrap_err().contains("correlated flag is 2"));
    }

    #[test]
    fn a_bad_frame_class_prior_is_refused() {
        let bytes = encode(&sample(b"session-bytes"));
        let prior_at = bytes.len() - DIGEST - 2 * 8 - 4 - 3 * 8;
        let mut b = bytes.clone();
        b[prior_at..prior_at + 8].copy_from_slice(&f64::NAN.to_le_bytes());
        assert!(decode(&reseal(b)).unwrap_err().contains("class prior holds"));
        let mut b = bytes.clone();
        b[prior_at - 8..prior_at - 4].copy_from_slice(&7u32.to_le_bytes());
        assert!(decode(&reseal(b)).unwrap_err().contains("correlated flag is 7"));
        let mut b = bytes.clone();
        b[prior_at - 4..prior_at].copy_from_slice(&4u32.to_le_bytes());
        // The count no longer matches what follows.
        assert!(decode(&reseal(b)).unwrap_err().contains("the header promises"));
        let mut b = bytes.clone();
        let label_at = bytes.len() - DIGEST - 2 * 8;
        b[label_at..label_at + 8].copy_from_slice(&(-1.0f64).to_le_bytes());
        assert!(decode(&reseal(b)).unwrap_err().contains("class prior holds"));
        let mut b = bytes.clone();
        b[label_at - 4..label_at].copy_from_slice(&3u32.to_le_bytes());
        assert!(decode(&reseal(b)).unwrap_err().contains("priors of 3 and 3 classes"));
    }

    #[test]
    fn torn_or_changed_stream_states_are_refused() {
        let bytes = encode(&sample(b"session-bytes"));
        for cut in [0, 7, HEADER, HEADER + 5, bytes.len() - 1] {
            let e = decode(&bytes[..cut]).unwrap_err();
            assert!(e.contains("shorter") || e.contains("checksum") || e.contains("not an"), "cut {cut}: {e}");
        }
        for flip in [9, 13, HEADER + 2, bytes.len() - DIGEST - 1, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[flip] ^= 0x10;
            assert!(decode(&b).unwrap_err().contains("checksum"), "flip {flip}");
        }
        let mut other = bytes.clone();
        other[0] = b'X';
        assert!(decode(&other).unwrap_err().contains("not an Acclimate stream state"));
    }

    #[test]
    fn inconsistent_headers_are_refused_even_with_a_valid_checksum() {
        let mut b = encode(&sample(b"session-bytes"));
        b[40..44].copy_from_slice(&5u32.to_le_bytes());
        assert!(decode(&reseal(b)).unwrap_err().contains("5 frames of 3 floats"));
        let mut b = encode(&sample(b"session-bytes"));
        b[44..52].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&reseal(b)).unwrap_err().contains("the header promises"));
        let mut b = encode(&sample(b"session-bytes"));
        b[8..12].copy_from_slice(&4u32.to_le_bytes());
        assert!(decode(&reseal(b)).unwrap_err().contains("version 4"));
        let mut b = encode(&sample(b"session-bytes"));
        b[20..28].copy_from_slice(&100u64.to_le_bytes());
        assert!(decode(&reseal(b)).unwrap_err().contains("100 steps"));
    }
}
