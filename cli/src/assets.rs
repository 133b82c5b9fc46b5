//! Where the assets built by `tools/setup.sh` are, from any working directory.

use std::path::{Path, PathBuf};

/// The folders that may hold the assets, in order: `explicit`, `ACCLIMATE_ASSETS`, `assets/` next
/// to the repository the binary was built in (`target/<profile>/acclimate` → `assets/`), the
/// source tree's `assets/`, and `./assets`.
pub fn candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = explicit {
        candidates.push(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ACCLIMATE_ASSETS") {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        for up in exe.ancestors().skip(1).take(4) {
            candidates.push(up.join("assets"));
        }
    }
    candidates.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets"));
    candidates.push(PathBuf::from("assets"));
    candidates
}

/// The first of [`candidates`] that holds the file `marker` (a path relative to the assets
/// folder).
pub fn find_with(explicit: Option<&Path>, marker: &str) -> Option<PathBuf> {
    candidates(explicit).into_iter().find(|p| p.join(marker).is_file())
}
