//! The driver's compiled pipelines persisted between runs ([`wgpu::PipelineCache`]).
//!
//! Compiling WGSL to the device's code is most of a session's cold start (tens of pipelines,
//! each through naga and the driver's compiler). wgpu can hand the driver's compiled pipelines
//! back as bytes and seed a later device with them; only Vulkan supports it today
//! (`Features::PIPELINE_CACHE`), elsewhere this module does nothing.
//!
//! **Off by default in the library**: a library that writes into its user's home behind the
//! application's back breaks sandboxed and read-only deployments, and an app that ships on
//! Android wants the file in its own cache directory. An application turns it on with
//! [`GpuContext::enable_pipeline_cache`], or a deployment with the `ACCLIMATE_PIPELINE_CACHE`
//! environment variable (a directory; read by [`GpuContext::new`]). The `acclimate` command-line
//! tool, which runs as its user, turns it on under the user's cache directory.
//!
//! The file (one per adapter, named by [`wgpu::util::pipeline_cache_key`]) wraps wgpu's bytes in
//! a header of our own with a checksum: wgpu checks the device and driver it came from but not
//! the bytes themselves, and hands them to the driver (`vkCreatePipelineCache`), so a truncated
//! or corrupted file must stop here. A file that fails any check is ignored with a warning and
//! rewritten, never an error. The cache is written when asked ([`GpuContext::save_pipeline_cache`])
//! and when the last clone of the context is dropped, if pipelines were compiled since; writes go
//! to a temporary file renamed over the old one, so a crash never leaves half a file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::{GpuContext, GpuError};

/// The environment variable [`GpuContext::new`] reads: a directory to keep the pipeline cache
/// in; empty or `off` leaves it off.
pub const PIPELINE_CACHE_ENV: &str = "ACCLIMATE_PIPELINE_CACHE";

const MAGIC: &[u8; 8] = b"ACCLPC1\n";
const HEADER: usize = 8 + 8 + 8;

/// What became of the pipeline cache file when the cache was opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineCacheStatus {
    /// The file the cache is read from and written to.
    pub path: PathBuf,
    /// Bytes of compiled pipelines handed to the driver (0 when starting empty).
    pub loaded_bytes: usize,
    /// Why an existing file was not used (corrupt, truncated, made by another driver); `None`
    /// when it was used or there was none.
    pub ignored: Option<String>,
}

pub(super) struct DiskCache {
    pub(super) cache: wgpu::PipelineCache,
    status: PipelineCacheStatus,
    /// Set when a pipeline was compiled through the cache since the last save.
    dirty: AtomicBool,
}

impl Drop for DiskCache {
    fn drop(&mut self) {
        if self.dirty.load(Ordering::Relaxed)
            && let Err(e) = self.save()
        {
            log::warn!("{e}");
        }
    }
}

/// FNV-1a, 64 bit: enough to tell a damaged file from a good one (not an integrity guarantee
/// against an adversary, who could write any file the driver reads anyway).
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// wgpu's bytes out of a file's contents, or why they cannot be used.
fn unwrap_file(bytes: &[u8]) -> Result<&[u8], String> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err("not an Acclimate pipeline cache (bad header)".into());
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
    let sum = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or_default());
    let payload = &bytes[HEADER..];
    if payload.len() as u64 != len {
        return Err(format!("truncated or extended: the header says {len} bytes, {} follow", payload.len()));
    }
    if checksum(payload) != sum {
        return Err("checksum mismatch (the file is damaged)".into());
    }
    Ok(payload)
}

fn wrap_file(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

impl DiskCache {
    fn save(&self) -> Result<(), GpuError> {
        let path = &self.status.path;
        let io = |what: &str, e: std::io::Error| GpuError::PipelineCache(format!("{what} {}: {e}", path.display()));
        let Some(data) = self.cache.get_data() else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, wrap_file(&data)).map_err(|e| io("writing the pipeline cache", e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            std::fs::remove_file(&tmp).ok();
            io("replacing the pipeline cache", e)
        })?;
        self.dirty.store(false, Ordering::Relaxed);
        Ok(())
    }
}

/// The directory `ACCLIMATE_PIPELINE_CACHE` names, if any.
pub(super) fn dir_from_env() -> Option<PathBuf> {
    let v = std::env::var_os(PIPELINE_CACHE_ENV)?;
    (!v.is_empty() && v != "off").then(|| PathBuf::from(v))
}

/// The user's cache directory for Acclimate's pipelines (`$XDG_CACHE_HOME/acclimate/pipelines`,
/// else `~/.cache/acclimate/pipelines`; `%LOCALAPPDATA%` on Windows), if one can be named.
pub fn default_pipeline_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("LOCALAPPDATA").filter(|v| !v.is_empty()).map(PathBuf::from))
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("acclimate").join("pipelines"))
}

impl GpuContext {
    /// Keeps compiled pipelines in `dir` across runs (one file per adapter and driver), so a
    /// later session starts without recompiling them. Returns `None`, and does nothing, where
    /// the backend has no pipeline cache (only Vulkan has one) or the adapter is unknown (an
    /// application's device without [`GpuContext::with_adapter_info`]).
    ///
    /// Call it before the first plan is built: pipelines compiled earlier are not in the file.
    /// A file that cannot be used (damaged, from another driver) is ignored with a warning and
    /// replaced; see [`PipelineCacheStatus::ignored`].
    pub fn enable_pipeline_cache(&self, dir: &Path) -> Option<PipelineCacheStatus> {
        if !self.device.features().contains(wgpu::Features::PIPELINE_CACHE) {
            log::info!("pipeline cache: the {} backend has none; pipelines compile every run", self.backend_name());
            return None;
        }
        let key = wgpu::util::pipeline_cache_key(self.adapter_info.as_ref()?)?;
        let path = dir.join(key);
        let mut ignored = None;
        let payload = match std::fs::read(&path) {
            Ok(bytes) => match unwrap_file(&bytes) {
                Ok(p) => Some(p.to_vec()),
                Err(why) => {
                    ignored = Some(why);
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                ignored = Some(format!("unreadable: {e}"));
                None
            }
        };
        let create = |data: Option<&[u8]>| -> Result<wgpu::PipelineCache, String> {
            let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
            // SAFETY: `data` is what `PipelineCache::get_data` returned in an earlier run, for an
            // adapter with the same pipeline_cache_key: our checksum shows the bytes are the ones
            // written, and wgpu rejects data from another device or driver version by its header.
            let cache = unsafe {
                self.device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                    label: Some("acclimate pipelines"),
                    data,
                    fallback: true,
                })
            };
            match pollster::block_on(scope.pop()) {
                Some(e) => Err(e.to_string()),
                None => Ok(cache),
            }
        };
        let (cache, loaded_bytes) = match create(payload.as_deref()) {
            Ok(c) => (c, payload.as_ref().map_or(0, |p| p.len())),
            Err(why) => {
                // wgpu refuses (rather than falls back on) data from another adapter.
                ignored = Some(format!("the driver refused it: {why}"));
                match create(None) {
                    Ok(c) => (c, 0),
                    Err(why) => {
                        log::warn!("pipeline cache: cannot create one ({why}); pipelines compile every run");
                        return None;
                    }
                }
            }
        };
        if let Some(why) = &ignored {
            log::warn!(
                "pipeline cache {}: ignored ({why}); pipelines are compiled afresh and the file rewritten",
                path.display()
            );
        }
        let status = PipelineCacheStatus { path, loaded_bytes, ignored };
        // A file that was ignored is rewritten even if no new pipeline is compiled.
        let dirty = AtomicBool::new(status.ignored.is_some());
        *self.inner.disk_cache.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(DiskCache { cache, status: status.clone(), dirty });
        Some(status)
    }

    /// The pipeline cache in use, if [`GpuContext::enable_pipeline_cache`] (or the environment
    /// variable) turned one on.
    pub fn pipeline_cache_status(&self) -> Option<PipelineCacheStatus> {
        self.inner.disk_cache.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|c| c.status.clone())
    }

    /// Writes the pipeline cache now (it is also written when the last clone of the context is
    /// dropped). Returns the file written, or `None` when no cache is on.
    pub fn save_pipeline_cache(&self) -> Result<Option<PathBuf>, GpuError> {
        let guard = self.inner.disk_cache.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(c) => c.save().map(|()| Some(c.status.path.clone())),
            None => Ok(None),
        }
    }

    /// The cache to compile a pipeline through, marking it for saving.
    pub(super) fn pipeline_cache_handle(&self) -> Option<wgpu::PipelineCache> {
        let guard = self.inner.disk_cache.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(|c| {
            c.dirty.store(true, Ordering::Relaxed);
            c.cache.clone()
        })
    }

    fn backend_name(&self) -> String {
        self.adapter_info.as_ref().map_or_else(|| "application's".into(), |i| format!("{:?}", i.backend))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip_and_damage_is_detected() {
        let payload = b"compiled pipelines".to_vec();
        let file = wrap_file(&payload);
        assert_eq!(unwrap_file(&file).unwrap(), &payload[..]);
        let mut flipped = file.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(unwrap_file(&flipped).unwrap_err().contains("checksum"));
        assert!(unwrap_file(&file[..file.len() - 1]).unwrap_err().contains("truncated"));
        assert!(unwrap_file(b"garbage").unwrap_err().contains("header"));
        assert!(unwrap_file(&[]).is_err());
    }
}
