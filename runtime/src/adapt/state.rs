//! Saving and loading adapted state: named `f32` tensors (parameters, normalization statistics,
//! optimizer moments and step counters) plus metadata, in a safetensors file.
//!
//! The header's string metadata carries:
//! - `format` = `acclimate-state`, `format_version` = [`FORMAT_VERSION`];
//! - `fingerprint`: the [`fingerprint`] of the model the state belongs to, so a state is never
//!   loaded into another model (or another export of it);
//! - `checksum`: SHA-256 over every tensor (name, shape, bytes) and every other metadata entry,
//!   so a bit flip anywhere in the data is caught, not only a truncation;
//! - the caller's entries (`method`, `steps_taken`, ...).
//!
//! Every tensor must be finite: a NaN or infinity is refused when saving (the previous file stays)
//! and when loading, with the tensor's name and the count, because one NaN in a BN scale or a
//! running variance silently turns every later prediction into the same class.
//!
//! Writes are atomic: a temporary file in the target's directory is written, fsynced and renamed
//! over the target, then the directory is fsynced. A crash or error at any point leaves either
//! the old file or the new one, never a mix. A save killed before its rename leaves its
//! temporary (`.<file>.tmp-<pid>-<n>`); the next save to the same path removes the temporaries
//! of that path whose process is gone. [`load_state`] reads and validates the whole file
//! before returning anything, so a caller that applies the result only on `Ok` is never left
//! half-updated.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::ir::Graph;
use crate::tensor::{DType, Data, Tensor};

/// The `format` metadata value of a state file.
pub const FORMAT: &str = "acclimate-state";
/// The layout version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Metadata keys the file format itself uses; callers cannot set them.
pub const RESERVED_KEYS: [&str; 4] = ["format", "format_version", "fingerprint", "checksum"];

/// Why a state could not be saved or loaded.
#[derive(Debug, Error)]
pub enum StateError {
    #[error("cannot read state file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write state file {}: {source} (any previous file there is unchanged)", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state file {} is truncated or corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("state file {} has format version {found}; this build reads version {FORMAT_VERSION}", path.display())]
    Version { path: PathBuf, found: String },
    #[error("state file {} belongs to a different model (fingerprint {found}, this model's is {expected})", path.display())]
    Fingerprint { path: PathBuf, expected: String, found: String },
    #[error("state file {} has no tensor '{name}'", path.display())]
    Missing { path: PathBuf, name: String },
    #[error("state file {}: tensor '{name}' {reason}", path.display())]
    Tensor { path: PathBuf, name: String, reason: String },
    /// The state cannot be written as given (a caller error, nothing was written).
    #[error("invalid state to save: {0}")]
    Invalid(String),
    /// A loaded state does not fit what it is applied to.
    #[error("saved state does not match the session: {0}")]
    Mismatch(String),
}

/// A state file's content, fully read and validated.
#[derive(Clone, Debug)]
pub struct LoadedState {
    pub path: PathBuf,
    /// Tensors in name order.
    pub tensors: Vec<(String, Tensor)>,
    /// The caller's metadata entries (the reserved keys are not repeated here).
    pub metadata: BTreeMap<String, String>,
    pub fingerprint: String,
    /// The `method` entry, if the saver wrote one.
    pub method: Option<String>,
    /// The `steps_taken` entry; 0 when absent.
    pub steps_taken: u64,
}

impl LoadedState {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Checks that each `(name, shape)` is present with exactly that shape.
    pub fn expect(&self, expected: &[(&str, &[usize])]) -> Result<(), StateError> {
        for (name, shape) in expected {
            let t = self
                .get(name)
                .ok_or_else(|| StateError::Missing { path: self.path.clone(), name: name.to_string() })?;
            if t.shape != *shape {
                return Err(StateError::Tensor {
                    path: self.path.clone(),
                    name: name.to_string(),
                    reason: format!("has shape {:?}, expected {:?}", t.shape, shape),
                });
            }
        }
        Ok(())
    }
}

fn le_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn hash_len(h: &mut Sha256, n: usize) {
    h.update((n as u64).to_le_bytes());
}

fn hash_str(h: &mut Sha256, s: &str) {
    hash_len(h, s.len());
    h.update(s.as_bytes());
}

/// A model's identity for saved state: SHA-256 (hex) over every initializer's name, element
/// type, shape and values, in name order. Node structure is not included: two exports with the
/// same weights share adapted state only if their initializer names match too.
pub fn fingerprint(graph: &Graph) -> String {
    let mut h = Sha256::new();
    h.update(b"acclimate-fingerprint-v1");
    let mut names: Vec<&String> = graph.initializers.keys().collect();
    names.sort();
    hash_len(&mut h, names.len());
    for name in names {
        let t = &graph.initializers[name];
        hash_str(&mut h, name);
        h.update(t.dtype.to_onnx().to_le_bytes());
        hash_len(&mut h, t.shape.len());
        for &d in &t.shape {
            hash_len(&mut h, d);
        }
        hash_len(&mut h, t.numel());
        // Chunks keep the temporary small for large weights.
        match &t.data {
            Data::F32(v) => v.chunks(1 << 16).for_each(|c| h.update(le_f32(c))),
            Data::I64(v) => {
                v.chunks(1 << 16).for_each(|c| h.update(c.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()))
            }
        }
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 over the tensors (name order) and the metadata other than the checksum (key order).
fn checksum<'a>(
    tensors: impl Iterator<Item = (&'a str, &'a [usize], &'a [u8])>,
    meta: &BTreeMap<String, String>,
) -> String {
    let mut h = Sha256::new();
    h.update(b"acclimate-state-checksum-v1");
    for (name, shape, data) in tensors {
        hash_str(&mut h, name);
        hash_len(&mut h, shape.len());
        for &d in shape {
            hash_len(&mut h, d);
        }
        hash_len(&mut h, data.len());
        h.update(data);
    }
    for (k, v) in meta.iter().filter(|(k, _)| k.as_str() != "checksum") {
        hash_str(&mut h, k);
        hash_str(&mut h, v);
    }
    hex(&h.finalize())
}

/// Saves `tensors` (all `f32`, unique names) and `metadata` for the model with fingerprint
/// `fingerprint`, atomically replacing `path`.
pub fn save_state(
    path: &Path,
    fingerprint: &str,
    tensors: &[(String, Tensor)],
    metadata: &[(String, String)],
) -> Result<(), StateError> {
    save_state_with(path, fingerprint, tensors, metadata, |f, bytes| f.write_all(bytes))
}

/// [`save_state`] without its refusal of NaN and infinity: a sealed, checksummed file holding
/// non-finite values, which only a test that proves loading refuses them needs (the C ABI's
/// tests, which cannot re-seal a file themselves). Never use it to save a session.
#[doc(hidden)]
pub fn save_non_finite_state_for_tests(
    path: &Path,
    fingerprint: &str,
    tensors: &[(String, Tensor)],
    metadata: &[(String, String)],
) -> Result<(), StateError> {
    let bytes = encode_with(fingerprint, tensors, metadata, false)?;
    write_atomic(path, &bytes, |f, b| f.write_all(b))
        .map_err(|source| StateError::Write { path: path.to_path_buf(), source })
}

/// [`save_state`] with the file write injected (tests simulate a failing disk).
fn save_state_with(
    path: &Path,
    fingerprint: &str,
    tensors: &[(String, Tensor)],
    metadata: &[(String, String)],
    write: impl FnOnce(&mut fs::File, &[u8]) -> io::Result<()>,
) -> Result<(), StateError> {
    let bytes = encode(fingerprint, tensors, metadata)?;
    write_atomic(path, &bytes, write).map_err(|source| StateError::Write { path: path.to_path_buf(), source })
}

fn encode(
    fingerprint: &str,
    tensors: &[(String, Tensor)],
    metadata: &[(String, String)],
) -> Result<Vec<u8>, StateError> {
    encode_with(fingerprint, tensors, metadata, true)
}

fn encode_with(
    fingerprint: &str,
    tensors: &[(String, Tensor)],
    metadata: &[(String, String)],
    finite_only: bool,
) -> Result<Vec<u8>, StateError> {
    let mut sorted: BTreeMap<&str, (&[usize], Vec<u8>)> = BTreeMap::new();
    for (name, t) in tensors {
        let data = match (&t.data, t.dtype) {
            (Data::F32(v), DType::F32) => v,
            _ => {
                return Err(StateError::Invalid(format!(
                    "tensor '{name}' is {}, only float32 state is saved",
                    t.dtype
                )));
            }
        };
        let bad = non_finite(data);
        if finite_only && bad > 0 {
            return Err(StateError::Invalid(format!(
                "tensor '{name}' holds {bad} non-finite value(s) (NaN or infinity); nothing was written"
            )));
        }
        if t.shape.iter().product::<usize>() != data.len() {
            return Err(StateError::Invalid(format!(
                "tensor '{name}' has shape {:?} but {} values",
                t.shape,
                data.len()
            )));
        }
        if sorted.insert(name, (&t.shape, le_f32(data))).is_some() {
            return Err(StateError::Invalid(format!("tensor '{name}' is given twice")));
        }
    }
    let mut meta: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in metadata {
        if RESERVED_KEYS.contains(&k.as_str()) {
            return Err(StateError::Invalid(format!("metadata key '{k}' is reserved by the file format")));
        }
        if meta.insert(k.clone(), v.clone()).is_some() {
            return Err(StateError::Invalid(format!("metadata key '{k}' is given twice")));
        }
    }
    if let Some(s) = meta.get("steps_taken")
        && s.parse::<u64>().is_err()
    {
        return Err(StateError::Invalid(format!("metadata steps_taken = '{s}' is not an unsigned integer")));
    }
    meta.insert("format".into(), FORMAT.into());
    meta.insert("format_version".into(), FORMAT_VERSION.to_string());
    meta.insert("fingerprint".into(), fingerprint.into());
    let sum = checksum(sorted.iter().map(|(n, (s, d))| (*n, *s, d.as_slice())), &meta);
    meta.insert("checksum".into(), sum);
    let views = sorted
        .iter()
        .map(|(name, (shape, data))| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.to_vec(), data)
                .map(|v| (name.to_string(), v))
                .map_err(|e| StateError::Invalid(format!("tensor '{name}': {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, Some(meta.into_iter().collect::<HashMap<_, _>>()))
        .map_err(|e| StateError::Invalid(format!("cannot encode the state: {e}")))
}

fn non_finite(v: &[f32]) -> usize {
    v.iter().filter(|x| !x.is_finite()).count()
}

/// The name of a save's temporary file for the target file name `name`: hidden, and parseable
/// back (see [`stale_temporary`]) so that only our own temporaries are ever removed.
fn temporary_name(name: &str, pid: u32, n: u64) -> String {
    format!(".{name}.tmp-{pid}-{n}")
}

/// The pid in `entry` if it is exactly a temporary name of `name` (`.<name>.tmp-<pid>-<n>`).
fn temporary_pid(entry: &str, name: &str) -> Option<u32> {
    let rest = entry.strip_prefix('.')?.strip_prefix(name)?.strip_prefix(".tmp-")?;
    let (pid, n) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(n) {
        return None;
    }
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Without a process table to ask, a temporary this old is taken as abandoned: a save writes
/// a few megabytes at most and renames within seconds.
const STALE_TEMPORARY_AGE: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Whether the temporary `entry` (of target `name`, in `dir`) was left by a save that can no
/// longer finish: its process is gone. Our own process's temporaries may belong to a save
/// running on another thread and are never stale.
fn stale_temporary(dir: &Path, entry: &str, name: &str) -> bool {
    let Some(pid) = temporary_pid(entry, name) else { return false };
    if pid == std::process::id() {
        return false;
    }
    let Ok(meta) = fs::symlink_metadata(dir.join(entry)) else { return false };
    if !meta.is_file() {
        return false;
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let proc = Path::new("/proc");
        if proc.join("self").exists() {
            return !proc.join(pid.to_string()).exists();
        }
    }
    meta.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|age| age > STALE_TEMPORARY_AGE)
}

/// Removes what saves to `dir/name` killed before their rename left behind. Best effort: a
/// temporary that cannot be listed or removed is left, and the save goes on.
fn remove_stale_temporaries(dir: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        if stale_temporary(dir, file, name) {
            match fs::remove_file(dir.join(file)) {
                Ok(()) => log::info!("removed {}, left by an interrupted save", dir.join(file).display()),
                Err(e) => log::debug!("cannot remove stale temporary {}: {e}", dir.join(file).display()),
            }
        }
    }
}

/// Writes `bytes` to a fresh temporary file next to `path`, fsyncs it, renames it over `path`
/// and fsyncs the directory. On error the temporary file is removed and `path` is untouched.
fn write_atomic(
    path: &Path,
    bytes: &[u8],
    write: impl FnOnce(&mut fs::File, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name =
        path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = name.to_string_lossy();
    remove_stale_temporaries(&dir, &name);
    let tmp = dir.join(temporary_name(&name, std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let result = (|| {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        write(&mut f, bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_dir(&dir)
    })();
    if result.is_err() {
        // Best effort: the temporary may not exist (creation failed) or be gone (renamed).
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Makes the rename durable: on POSIX systems a rename is persisted by syncing the directory.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// Reads and fully validates a state file saved for the model with `expected_fingerprint`.
pub fn load_state(path: &Path, expected_fingerprint: &str) -> Result<LoadedState, StateError> {
    let bytes = fs::read(path).map_err(|source| StateError::Read { path: path.to_path_buf(), source })?;
    decode(path, &bytes, expected_fingerprint)
}

fn decode(path: &Path, bytes: &[u8], expected_fingerprint: &str) -> Result<LoadedState, StateError> {
    let corrupt = |reason: String| StateError::Corrupt { path: path.to_path_buf(), reason };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| corrupt(e.to_string()))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
    let meta: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
    match meta.get("format") {
        Some(f) if f == FORMAT => {}
        Some(f) => return Err(corrupt(format!("format is '{f}', not '{FORMAT}'"))),
        None => return Err(corrupt("no 'format' metadata: not an Acclimate state file".into())),
    }
    let version = meta.get("format_version").cloned().unwrap_or_default();
    if version != FORMAT_VERSION.to_string() {
        return Err(StateError::Version { path: path.to_path_buf(), found: version });
    }
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let stored = meta.get("checksum").ok_or_else(|| corrupt("no checksum".into()))?;
    let actual = checksum(views.iter().map(|(n, v)| (n.as_str(), v.shape(), v.data())), &meta);
    if *stored != actual {
        return Err(corrupt("checksum mismatch: the data or metadata changed after saving".into()));
    }
    let found = meta.get("fingerprint").cloned().unwrap_or_default();
    if found != expected_fingerprint {
        return Err(StateError::Fingerprint {
            path: path.to_path_buf(),
            expected: expected_fingerprint.to_string(),
            found,
        });
    }
    let mut tensors = Vec::with_capacity(views.len());
    for (name, v) in views {
        if v.dtype() != Dtype::F32 {
            return Err(StateError::Tensor {
                path: path.to_path_buf(),
                name,
                reason: format!("is {:?}, expected F32", v.dtype()),
            });
        }
        let data: Vec<f32> = v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let bad = non_finite(&data);
        if bad > 0 {
            return Err(StateError::Tensor {
                path: path.to_path_buf(),
                name,
                reason: format!("holds {bad} non-finite value(s) (NaN or infinity) of {}", data.len()),
            });
        }
        tensors.push((name, Tensor::f32(v.shape().to_vec(), data)));
    }
    let steps_taken = match meta.get("steps_taken") {
        Some(s) => s.parse::<u64>().map_err(|_| corrupt(format!("steps_taken = '{s}' is not an unsigned integer")))?,
        None => 0,
    };
    let method = meta.get("method").cloned();
    let metadata = meta.into_iter().filter(|(k, _)| !RESERVED_KEYS.contains(&k.as_str())).collect();
    Ok(LoadedState { path: path.to_path_buf(), tensors, metadata, fingerprint: found, method, steps_taken })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "acclimate-state-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }

        fn files(&self) -> Vec<String> {
            let mut v: Vec<String> =
                fs::read_dir(&self.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            v.sort();
            v
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const FP: &str = "0123abcd";

    fn sample() -> Vec<(String, Tensor)> {
        vec![
            ("bn1.weight".into(), Tensor::f32(vec![3], vec![1.0, -2.5, 3.25])),
            ("bn1.bias".into(), Tensor::f32(vec![3], vec![0.0, f32::MIN_POSITIVE, -0.0])),
            ("opt:m:bn1.weight".into(), Tensor::f32(vec![3], vec![1e-30, 2.0, 3.0])),
            ("opt:state".into(), Tensor::f32(vec![2], vec![7.0, 1.0])),
            ("conv.scalar".into(), Tensor::f32(vec![], vec![42.0])),
        ]
    }

    fn meta() -> Vec<(String, String)> {
        vec![("method".into(), "tent".into()), ("steps_taken".into(), "7".into())]
    }

    #[test]
    fn round_trip() {
        let d = TempDir::new("rt");
        let p = d.0.join("s.safetensors");
        save_state(&p, FP, &sample(), &meta()).unwrap();
        let l = load_state(&p, FP).unwrap();
        let mut want = sample();
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(l.tensors.len(), want.len());
        for ((n, t), (wn, wt)) in l.tensors.iter().zip(&want) {
            assert_eq!(n, wn);
            assert_eq!(t.shape, wt.shape);
            let (a, b) = (t.as_f32().unwrap(), wt.as_f32().unwrap());
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{n}: {a:?} vs {b:?}");
        }
        assert_eq!(l.steps_taken, 7);
        assert_eq!(l.method.as_deref(), Some("tent"));
        assert_eq!(l.fingerprint, FP);
        assert_eq!(l.metadata.get("method").map(String::as_str), Some("tent"));
        assert!(!l.metadata.contains_key("checksum"));
        l.expect(&[("bn1.weight", &[3]), ("opt:state", &[2])]).unwrap();
        assert!(matches!(l.expect(&[("bn2.weight", &[3])]), Err(StateError::Missing { .. })));
        let e = l.expect(&[("bn1.weight", &[4])]).unwrap_err();
        assert!(matches!(e, StateError::Tensor { .. }) && e.to_string().contains("[3]"), "{e}");
        // Only the state file is left in the directory (no temporaries).
        assert_eq!(d.files(), vec!["s.safetensors".to_string()]);
        // A second save replaces the first.
        save_state(&p, FP, &sample()[..1], &[]).unwrap();
        let l = load_state(&p, FP).unwrap();
        assert_eq!(l.tensors.len(), 1);
        assert_eq!(l.steps_taken, 0);
        assert_eq!(d.files(), vec!["s.safetensors".to_string()]);
    }

    #[test]
    fn truncation_anywhere_is_an_error() {
        let d = TempDir::new("trunc");
        let p = d.0.join("s.safetensors");
        save_state(&p, FP, &sample(), &meta()).unwrap();
        let bytes = fs::read(&p).unwrap();
        let n = bytes.len();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for cut in [0, 1, 7, 8, 9, 8 + header / 2, 8 + header - 1, 8 + header, 8 + header + 1, n - 4, n - 1] {
            fs::write(&p, &bytes[..cut]).unwrap();
            let e = load_state(&p, FP).expect_err(&format!("cut at {cut} of {n}"));
            assert!(matches!(e, StateError::Corrupt { .. }), "cut {cut}: {e}");
        }
        // Trailing garbage is corrupt too.
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0; 4]);
        fs::write(&p, &longer).unwrap();
        assert!(matches!(load_state(&p, FP), Err(StateError::Corrupt { .. })));
    }

    #[test]
    fn bit_flips_in_data_or_header_are_caught() {
        let d = TempDir::new("flip");
        let p = d.0.join("s.safetensors");
        save_state(&p, FP, &sample(), &meta()).unwrap();
        let bytes = fs::read(&p).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        // Every byte of the data, and a spread of header bytes.
        let positions: Vec<usize> = (8 + header..bytes.len()).chain((8..8 + header).step_by(7)).collect();
        for pos in positions {
            let mut b = bytes.clone();
            b[pos] ^= 0x10;
            fs::write(&p, &b).unwrap();
            match load_state(&p, FP) {
                Err(StateError::Corrupt { .. } | StateError::Version { .. }) => {}
                // A flip in the header's stored fingerprint reads as "another model": also refused.
                Err(StateError::Fingerprint { .. }) => {}
                other => panic!("flip at {pos}: {other:?}"),
            }
        }
    }

    #[test]
    fn corrupted_header_is_an_error() {
        let d = TempDir::new("hdr");
        let p = d.0.join("s.safetensors");
        for bad in [
            b"not a safetensors file at all".to_vec(),
            {
                let mut b = 16u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"{\"a\": [1, 2, 3]}");
                b
            },
            {
                let mut b = u64::MAX.to_le_bytes().to_vec();
                b.extend_from_slice(b"{}");
                b
            },
        ] {
            fs::write(&p, &bad).unwrap();
            assert!(matches!(load_state(&p, FP), Err(StateError::Corrupt { .. })));
        }
        // A valid safetensors file that is not ours.
        let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![1], &[0, 0, 128, 63]).unwrap();
        fs::write(&p, safetensors::serialize([("x", view)], None).unwrap()).unwrap();
        let e = load_state(&p, FP).unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }) && e.to_string().contains("not an Acclimate state"), "{e}");
        assert!(matches!(load_state(&d.0.join("absent"), FP), Err(StateError::Read { .. })));
    }

    #[test]
    fn foreign_fingerprint_is_refused() {
        let d = TempDir::new("fp");
        let p = d.0.join("s.safetensors");
        save_state(&p, FP, &sample(), &meta()).unwrap();
        let e = load_state(&p, "ffff").unwrap_err();
        assert!(matches!(e, StateError::Fingerprint { .. }), "{e}");
        assert!(e.to_string().contains(FP) && e.to_string().contains("ffff"), "{e}");
    }

    #[test]
    fn failed_save_keeps_the_old_file() {
        let d = TempDir::new("fail");
        let p = d.0.join("s.safetensors");
        save_state(&p, FP, &sample(), &meta()).unwrap();
        let old = fs::read(&p).unwrap();
        // The disk fails halfway through writing the new state.
        let e = save_state_with(&p, FP, &sample()[..2], &[], |f, bytes| {
            f.write_all(&bytes[..bytes.len() / 2])?;
            Err(io::Error::other("simulated disk failure"))
        })
        .unwrap_err();
        assert!(matches!(e, StateError::Write { .. }) && e.to_string().contains("simulated"), "{e}");
        assert_eq!(fs::read(&p).unwrap(), old);
        assert_eq!(d.files(), vec!["s.safetensors".to_string()], "no temporary left behind");
        load_state(&p, FP).unwrap();
        // Invalid input fails before anything is written.
        for (tensors, meta) in [
            (vec![sample()[0].clone(), sample()[0].clone()], vec![]),
            (vec![("i".to_string(), Tensor::i64(vec![1], vec![1]))], vec![]),
            (sample(), vec![("checksum".to_string(), "x".to_string())]),
            (sample(), vec![("steps_taken".to_string(), "-1".to_string())]),
        ] {
            assert!(matches!(save_state(&p, FP, &tensors, &meta), Err(StateError::Invalid(_))));
            assert_eq!(fs::read(&p).unwrap(), old);
        }
        // A directory that does not exist: an error, and nothing is created.
        let e = save_state(&d.0.join("missing/s.safetensors"), FP, &sample(), &[]).unwrap_err();
        assert!(matches!(e, StateError::Write { .. }), "{e}");
        assert_eq!(d.files(), vec!["s.safetensors".to_string()]);
    }

    #[test]
    fn non_finite_state_is_not_saved() {
        let d = TempDir::new("nonfinite");
        let p = d.0.join("s.safetensors");
        save_state(&p, FP, &sample(), &meta()).unwrap();
        let old = fs::read(&p).unwrap();
        let mut bad = sample();
        bad[2].1 = Tensor::f32(vec![3], vec![f32::NAN, 1.0, f32::INFINITY]);
        let e = save_state(&p, FP, &bad, &meta()).unwrap_err();
        assert!(matches!(e, StateError::Invalid(_)), "{e}");
        assert!(e.to_string().contains("'opt:m:bn1.weight' holds 2 non-finite"), "{e}");
        assert_eq!(fs::read(&p).unwrap(), old, "the previous state stays");
        assert_eq!(d.files(), vec!["s.safetensors".to_string()]);
    }

    #[test]
    fn temporary_names_parse_back_exactly() {
        assert_eq!(temporary_pid(&temporary_name("s.st", 42, 7), "s.st"), Some(42));
        for other in
            [".s.st.tmp-42-7x", ".s.st.tmp-42", ".s.st.tmp--7", "s.st.tmp-42-7", ".t.st.tmp-42-7", ".s.st.tmp-a-7"]
        {
            assert_eq!(temporary_pid(other, "s.st"), None, "{other}");
        }
        // A target whose name itself looks like a temporary is still matched exactly.
        assert_eq!(temporary_pid(".a.tmp-1-2.tmp-3-4", "a.tmp-1-2"), Some(3));
    }

    fn graph(inits: Vec<(&str, Tensor)>) -> Graph {
        Graph {
            opset: 13,
            producer: String::new(),
            nodes: vec![],
            initializers: inits.into_iter().map(|(n, t)| (n.to_string(), Arc::new(t))).collect(),
            inputs: vec![],
            outputs: vec![],
        }
    }

    #[test]
    fn fingerprint_depends_on_names_shapes_types_and_values() {
        let base = || {
            vec![("w", Tensor::f32(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0])), ("b", Tensor::f32(vec![2], vec![0.5, 0.25]))]
        };
        let f = fingerprint(&graph(base()));
        assert_eq!(f.len(), 64);
        // Insertion order does not matter.
        let mut rev = base();
        rev.reverse();
        assert_eq!(fingerprint(&graph(rev)), f);
        let mut other = base();
        other[0].1 = Tensor::f32(vec![4], vec![1.0, 2.0, 3.0, 4.0]);
        assert_ne!(fingerprint(&graph(other)), f, "shape");
        let mut other = base();
        other[1].1 = Tensor::f32(vec![2], vec![0.5, 0.250001]);
        assert_ne!(fingerprint(&graph(other)), f, "value");
        let mut other = base();
        other[1].0 = "c";
        assert_ne!(fingerprint(&graph(other)), f, "name");
        let mut other = base();
        other[1].1.dtype = DType::F16;
        assert_ne!(fingerprint(&graph(other)), f, "dtype");
        let mut other = base();
        other.push(("extra", Tensor::i64(vec![1], vec![3])));
        assert_ne!(fingerprint(&graph(other)), f, "extra initializer");
    }
}
