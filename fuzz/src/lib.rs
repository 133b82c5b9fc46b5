//! Fuzz targets for Acclimate's untrusted-input parsers, and seeded structure-aware mutators.
//!
//! Each target is a plain `fn(&[u8])` (what a libFuzzer `fuzz_target!` wraps):
//! - [`loader::run`]: model bytes → the ONNX loader (with a folder of external data holding a
//!   FIFO, a directory and links out of it), the IR builder and shape specialisation;
//! - [`frame::run`]: bytes decoded into a frame (format, sizes, planes, strides, offsets, buffer
//!   length, rotation, mirror, YUV encoding) and a preprocessing spec string → validation, then the
//!   CPU preprocessing reference on frames that validate;
//! - [`config::run`]: TOML text → the adaptation config parser.
//!
//! Inputs are not random bytes: each [`Target::input`] is a pure function of `(seed, index)` that
//! mutates a seed model or builds TOML from the valid keys, so the mutants get past the decoder,
//! and any execution can be regenerated from its numbers alone (the driver relies on that to
//! name the input that crashed a worker process).

use std::path::{Path, PathBuf};

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

pub mod config;
pub mod frame;
pub mod loader;

/// What is fuzzed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Loader,
    Frame,
    Config,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Loader, Kind::Frame, Kind::Config];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Loader => "loader",
            Kind::Frame => "frame",
            Kind::Config => "config",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// A target with its seed corpus and working files.
pub struct Target {
    pub kind: Kind,
    loader: Option<loader::Loader>,
}

impl Target {
    /// Loads the seeds (`repo` is the repository root: `assets/`, `models/`,
    /// `tests/data/onnx/`) and prepares the external-data folder under `work`.
    pub fn new(kind: Kind, repo: &Path, work: &Path) -> Result<Target, String> {
        let loader = match kind {
            Kind::Loader => Some(loader::Loader::new(repo, work)?),
            _ => None,
        };
        Ok(Target { kind, loader })
    }

    /// Execution `index` of the run seeded with `seed`: always the same bytes.
    pub fn input(&self, seed: u64, index: u64) -> Vec<u8> {
        let mut rng = rng_for(seed, index);
        match self.kind {
            Kind::Loader => self.loader.as_ref().map(|l| l.input(&mut rng)).unwrap_or_default(),
            Kind::Frame => frame::input(&mut rng),
            Kind::Config => config::input(&mut rng).into_bytes(),
        }
    }

    /// Runs the target on `data`. Returns normally for every input the code handles (an error
    /// value is a pass); a panic, an abort or a hang is a finding. The result is how deep the
    /// input got, `0..`[`Target::depths`] (see each target's `run`).
    pub fn execute(&self, data: &[u8]) -> usize {
        match self.kind {
            Kind::Loader => self.loader.as_ref().map_or(0, |l| loader::run(data, Some(l.external_dir()))),
            Kind::Frame => frame::run(data),
            Kind::Config => config::run(data),
        }
    }

    /// Names of the depths [`Target::execute`] reports, from 1 up.
    pub fn depths(&self) -> &'static [&'static str] {
        match self.kind {
            Kind::Loader => &["loaded", "valid graph", "specialised"],
            Kind::Frame => &["valid", "preprocessed"],
            Kind::Config => &["accepted"],
        }
    }

    /// How many seed inputs the target starts from.
    pub fn seed_count(&self) -> usize {
        self.loader.as_ref().map_or(0, |l| l.seed_count())
    }
}

/// The generator of execution `index`: SplitMix64 of both numbers, so neighbouring indices get
/// unrelated streams.
pub fn rng_for(seed: u64, index: u64) -> Xoshiro256PlusPlus {
    let mut z = seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    Xoshiro256PlusPlus::seed_from_u64(z ^ (z >> 31))
}

/// Integers that sit on the edges parsers get wrong: zero, one, powers of two and their
/// neighbours, the extremes of every width.
pub const INTERESTING_I64: [i64; 22] = [
    0,
    1,
    2,
    3,
    -1,
    -2,
    7,
    8,
    16,
    255,
    256,
    65535,
    65536,
    i32::MAX as i64,
    i32::MIN as i64,
    1 << 31,
    1 << 32,
    (1 << 32) + 1,
    1 << 40,
    1 << 62,
    i64::MAX,
    i64::MIN,
];

/// An edge value most of the time, otherwise a small or a fully random one.
pub fn interesting_i64(rng: &mut Xoshiro256PlusPlus) -> i64 {
    match rng.random_range(0..10) {
        0..=4 => INTERESTING_I64[rng.random_range(0..INTERESTING_I64.len())],
        5..=7 => rng.random_range(-4..64),
        _ => rng.random(),
    }
}

/// Where the repository's root is: `ACCLIMATE_ROOT`, else the parent of this crate's folder.
pub fn repo_root() -> PathBuf {
    std::env::var_os("ACCLIMATE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}
