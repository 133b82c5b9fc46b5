//! Shift schedules for a stream: which corruption hits which frame (`--corrupt`, `--segment`),
//! in which order a labelled dataset's samples arrive (`--order`), and the per-frame random
//! generators that make a run reproducible whatever the threading.
//!
//! **Corruption segments.** `--corrupt NAME:SEV[,NAME:SEV...]` lists segments; an entry `clean`
//! (or `none`) is a segment without corruption. With `--segment K` the stream switches to the
//! next segment every K frames and cycles through the list (frame f is in segment
//! `(f / K) mod S`). Without `--segment` the stream's N frames are split evenly, in order: frame
//! f is in segment `floor(f·S / N)`, so one entry corrupts the whole stream and `clean,fog:3` is a
//! clean first half and a foggy second half.
//!
//! **Label orders** over a labelled dataset (`order`):
//! - `iid`: the dataset's own order. Test sets such as MNIST's are stored shuffled, so this is the
//!   usual i.i.d. protocol; folders of images are stored class by class, for them use `shuffle`.
//! - `shuffle`: a uniformly random permutation, seeded.
//! - `sorted`: by class, stable (within a class the dataset's order).
//! - `dirichlet:D`: class-correlated order by RoTTA's temporal sampler
//!   (`LabelDirichletDomainSequence`, the non-i.i.d. protocol of NOTE and RoTTA): with S slots
//!   (the number of classes, at most 100), every class draws slot proportions from a symmetric
//!   Dirichlet(D) and its samples, in dataset order, are cut into S consecutive pieces of those
//!   proportions (cut points `floor(cumsum(p)·n)`); slot s collects piece s of every class in a
//!   random order, and the slots are concatenated. A small D (0.1, 0.01) puts most of a class into
//!   one slot: long runs of one class. As D grows the pieces become equal, and the order tends to
//!   S rounds of every class in blocks of n_class / S samples (NOTE's sampler has the same limit):
//!   runs shorten with D but do not reach i.i.d.; `shuffle` is the i.i.d. order. Seeded; every
//!   index appears exactly once, and each class keeps its dataset order.

use std::fmt;
use std::str::FromStr;

use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::SliceRandom;
use rand::{Rng, RngExt, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use thiserror::Error;

use super::corrupt::{self, CorruptError, Corruption, RgbImage};

/// Why a schedule or an order could not be built.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum ScheduleError {
    /// `--corrupt` with nothing in it.
    #[error("no corruption given: expected NAME:SEV[,NAME:SEV...] (NAME one of {valid}, or clean)")]
    Empty { valid: String },
    /// An empty entry between commas.
    #[error("empty entry in `{spec}`")]
    EmptyEntry { spec: String },
    /// `NAME` without `:SEV`.
    #[error("`{entry}` needs a severity: {entry}:SEV with SEV in 1..=5")]
    MissingSeverity { entry: String },
    /// A severity that is not an integer in 1..=5.
    #[error("severity `{text}` in `{entry}` is not an integer in 1..=5")]
    BadSeverity { entry: String, text: String },
    /// `clean:3`.
    #[error("`{entry}`: a clean segment takes no severity")]
    CleanWithSeverity { entry: String },
    /// An unknown corruption name or a severity out of range.
    #[error(transparent)]
    Corruption(#[from] CorruptError),
    /// `--segment 0`.
    #[error("--segment must be at least 1 frame")]
    ZeroSegment,
    /// An unknown label order.
    #[error("unknown label order `{text}`; valid: iid, shuffle, sorted, dirichlet:D (D > 0, e.g. dirichlet:0.1)")]
    UnknownOrder { text: String },
    /// `dirichlet:D` with D not a number in range.
    #[error("dirichlet concentration `{text}` must be a number from {} to {}", Concentration::MIN, Concentration::MAX)]
    BadConcentration { text: String },
}

/// One segment of a schedule: a corruption at a severity, or clean frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Segment {
    /// The corruption and severity; `None` for a clean segment.
    pub shift: Option<(Corruption, u8)>,
}

impl Segment {
    /// The segment's name in reports: `gaussian_noise:5` or `clean`.
    pub fn name(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.shift {
            Some((c, s)) => write!(f, "{}:{s}", c.name()),
            None => f.write_str("clean"),
        }
    }
}

impl FromStr for Segment {
    type Err = ScheduleError;

    /// `NAME:SEV` (any name [`Corruption`] parses), `clean` or `none`.
    fn from_str(entry: &str) -> Result<Segment, ScheduleError> {
        let entry = entry.trim();
        let (name, sev) = match entry.split_once(':') {
            Some((n, s)) => (n.trim(), Some(s.trim())),
            None => (entry, None),
        };
        if name.eq_ignore_ascii_case("clean") || name.eq_ignore_ascii_case("none") {
            return match sev {
                None => Ok(Segment { shift: None }),
                Some(_) => Err(ScheduleError::CleanWithSeverity { entry: entry.to_string() }),
            };
        }
        let corruption: Corruption = name.parse()?;
        let Some(text) = sev else {
            return Err(ScheduleError::MissingSeverity { entry: entry.to_string() });
        };
        let severity: u8 = text
            .parse()
            .map_err(|_| ScheduleError::BadSeverity { entry: entry.to_string(), text: text.to_string() })?;
        if !(1..=5).contains(&severity) {
            return Err(CorruptError::Severity { corruption: corruption.name(), severity }.into());
        }
        Ok(Segment { shift: Some((corruption, severity)) })
    }
}

/// How frames map to segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Span {
    /// `--segment K`: K frames per segment, cycling.
    Every(usize),
    /// The stream's `N` frames split evenly.
    Even(usize),
}

/// A corruption schedule: per frame index, the segment it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    segments: Vec<Segment>,
    span: Span,
}

impl Schedule {
    /// Parses `--corrupt` (`NAME:SEV[,NAME:SEV...]`, entries `clean`/`none` allowed) with
    /// `--segment` (`Some(K)`: switch every K frames, cycling; `None`: split the stream's
    /// `total` frames evenly).
    pub fn parse(spec: &str, segment: Option<usize>, total: usize) -> Result<Schedule, ScheduleError> {
        if spec.trim().is_empty() {
            return Err(ScheduleError::Empty { valid: Corruption::valid_names() });
        }
        let segments = spec
            .split(',')
            .map(|entry| {
                if entry.trim().is_empty() {
                    Err(ScheduleError::EmptyEntry { spec: spec.to_string() })
                } else {
                    entry.parse()
                }
            })
            .collect::<Result<Vec<Segment>, _>>()?;
        Schedule::new(segments, segment, total)
    }

    /// A schedule from parsed segments (at least one); see [`Schedule::parse`].
    pub fn new(segments: Vec<Segment>, segment: Option<usize>, total: usize) -> Result<Schedule, ScheduleError> {
        if segments.is_empty() {
            return Err(ScheduleError::Empty { valid: Corruption::valid_names() });
        }
        let span = match segment {
            Some(0) => return Err(ScheduleError::ZeroSegment),
            Some(k) => Span::Every(k),
            None => Span::Even(total),
        };
        Ok(Schedule { segments, span })
    }

    /// The segments, in schedule order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The position in [`Schedule::segments`] of frame `frame`'s segment. Frames past an even
    /// split's total stay in the last segment.
    pub fn segment_index(&self, frame: usize) -> usize {
        let s = self.segments.len();
        match self.span {
            Span::Every(k) => (frame / k) % s,
            Span::Even(total) => {
                let i = (frame as u128 * s as u128) / total.max(1) as u128;
                (i as usize).min(s - 1)
            }
        }
    }

    /// Frame `frame`'s segment.
    pub fn segment(&self, frame: usize) -> Segment {
        self.segments[self.segment_index(frame)]
    }

    /// Frame `frame`'s corruption and severity; `None` when the frame stays clean.
    pub fn at(&self, frame: usize) -> Option<(Corruption, u8)> {
        self.segment(frame).shift
    }

    /// Frame `frame`'s segment name for reports (`gaussian_noise:5`, `clean`).
    pub fn segment_name(&self, frame: usize) -> String {
        self.segment(frame).name()
    }

    /// Frame `frame` of a stream seeded with `seed`, corrupted as scheduled (unchanged in a clean
    /// segment), with the frame's own generator ([`frame_rng`]).
    pub fn apply(&self, img: &RgbImage, frame: usize, seed: u64) -> Result<RgbImage, CorruptError> {
        match self.at(frame) {
            Some((c, s)) => corrupt::apply(img, c, s, &mut frame_rng(seed, frame as u64)),
            None => Ok(img.clone()),
        }
    }
}

/// The generator behind every seeded draw of a schedule: xoshiro256++, whose output is fixed
/// by its algorithm (unlike `StdRng`, which may change between `rand` versions).
pub type FrameRng = Xoshiro256PlusPlus;

/// SplitMix64, the seeding function xoshiro's authors recommend.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A generator keyed by (seed, domain, index): the three are hashed separately and combined, so
/// neighbouring indices and seeds give unrelated streams.
fn keyed_rng(seed: u64, domain: u64, index: u64) -> FrameRng {
    let (mut a, mut b, mut c) = (seed, domain, index);
    let mut state = splitmix64(&mut a) ^ splitmix64(&mut b).rotate_left(21) ^ splitmix64(&mut c).rotate_left(42);
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_exact_mut(8) {
        chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    FrameRng::from_seed(bytes)
}

/// The generator for frame `frame` of a stream seeded with `seed`: corrupting frame f depends on
/// (seed, f) only, not on which thread or in which order frames are processed.
pub fn frame_rng(seed: u64, frame: u64) -> FrameRng {
    keyed_rng(seed, 0, frame)
}

/// A Dirichlet concentration for `dirichlet:D` orders, validated to [`Concentration::MIN`] ..=
/// [`Concentration::MAX`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Concentration(f64);

impl Concentration {
    /// The smallest accepted D: below it every class already sits in a single slot.
    pub const MIN: f64 = 1e-6;
    /// The largest accepted D: above it the order is indistinguishable from a shuffle.
    pub const MAX: f64 = 1e6;

    /// Validates `d`.
    pub fn new(d: f64) -> Option<Concentration> {
        (Concentration::MIN..=Concentration::MAX).contains(&d).then_some(Concentration(d))
    }

    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }
}

/// A label order (`--order`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OrderSpec {
    /// The dataset's own order.
    Iid,
    /// A seeded uniformly random permutation.
    Shuffle,
    /// By class, stable.
    Sorted,
    /// Class-correlated (RoTTA's Dirichlet sampler) with concentration D.
    Dirichlet(Concentration),
}

impl FromStr for OrderSpec {
    type Err = ScheduleError;

    /// `iid`, `shuffle`, `sorted` or `dirichlet:D`.
    fn from_str(s: &str) -> Result<OrderSpec, ScheduleError> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "iid" => return Ok(OrderSpec::Iid),
            "shuffle" => return Ok(OrderSpec::Shuffle),
            "sorted" => return Ok(OrderSpec::Sorted),
            _ => {}
        }
        if let Some(d) = t.strip_prefix("dirichlet:") {
            let text = d.trim();
            return text
                .parse::<f64>()
                .ok()
                .and_then(Concentration::new)
                .map(OrderSpec::Dirichlet)
                .ok_or_else(|| ScheduleError::BadConcentration { text: text.to_string() });
        }
        Err(ScheduleError::UnknownOrder { text: s.trim().to_string() })
    }
}

impl fmt::Display for OrderSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OrderSpec::Iid => f.write_str("iid"),
            OrderSpec::Shuffle => f.write_str("shuffle"),
            OrderSpec::Sorted => f.write_str("sorted"),
            OrderSpec::Dirichlet(d) => write!(f, "dirichlet:{}", d.get()),
        }
    }
}

/// The order in which to visit a dataset with `labels` (class ids): a permutation of
/// `0..labels.len()`. Seeded where the order is random.
pub fn order(labels: &[u32], spec: &OrderSpec, seed: u64) -> Vec<usize> {
    let n = labels.len();
    let mut rng = keyed_rng(seed, 1, 0);
    match spec {
        OrderSpec::Iid => (0..n).collect(),
        OrderSpec::Shuffle => {
            let mut idx: Vec<usize> = (0..n).collect();
            idx.shuffle(&mut rng);
            idx
        }
        OrderSpec::Sorted => {
            let mut idx: Vec<usize> = (0..n).collect();
            idx.sort_by_key(|&i| labels[i]);
            idx
        }
        OrderSpec::Dirichlet(d) => dirichlet_order(labels, d.get(), &mut rng),
    }
}

/// RoTTA's `LabelDirichletDomainSequence` for one domain.
fn dirichlet_order<R: Rng + ?Sized>(labels: &[u32], d: f64, rng: &mut R) -> Vec<usize> {
    let Some(&max) = labels.iter().max() else {
        return Vec::new();
    };
    let classes = max as usize + 1;
    let slots = classes.min(100);
    let mut per_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        per_class[l as usize].push(i);
    }
    let mut per_slot: Vec<Vec<&[usize]>> = vec![Vec::new(); slots];
    for ids in &per_class {
        let p = dirichlet(d, slots, rng);
        let mut start = 0usize;
        let mut cum = 0.0f64;
        for (s, ps) in p.iter().enumerate() {
            let end = if s + 1 == slots {
                ids.len()
            } else {
                cum += ps;
                ((cum * ids.len() as f64) as usize).clamp(start, ids.len())
            };
            per_slot[s].push(&ids[start..end]);
            start = end;
        }
    }
    let mut out = Vec::with_capacity(labels.len());
    for pieces in per_slot.iter_mut() {
        pieces.shuffle(rng);
        for piece in pieces.iter() {
            out.extend_from_slice(piece);
        }
    }
    out
}

/// ln of a Gamma(a, 1) draw: Marsaglia–Tsang for a ≥ 1, and for a < 1 the boost
/// Gamma(a) = Gamma(a + 1)·U^(1/a), kept in logarithms because U^(1/a) underflows for the small
/// concentrations label-shift protocols use (D = 0.01 gives exponents of 100 and more).
fn ln_gamma<R: Rng + ?Sized>(a: f64, rng: &mut R) -> f64 {
    if a < 1.0 {
        let u = 1.0 - rng.random::<f64>(); // (0, 1]
        return ln_gamma(a + 1.0, rng) + u.ln() / a;
    }
    let d = a - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x: f64 = StandardNormal.sample(rng);
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u: f64 = rng.random();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return (d * v).ln();
        }
    }
}

/// A draw of the symmetric Dirichlet(d) over `n` categories (normalised Gamma draws, in
/// logarithms so tiny concentrations give one category nearly all the mass instead of 0/0).
fn dirichlet<R: Rng + ?Sized>(d: f64, n: usize, rng: &mut R) -> Vec<f64> {
    let logs: Vec<f64> = (0..n).map(|_| ln_gamma(d, rng)).collect();
    let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logs.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = e.iter().sum();
    e.iter().map(|v| v / total).collect()
}

/// The mean length of the runs of equal consecutive labels (1 for alternating labels, about
/// C/(C-1) for i.i.d. draws of C balanced classes, the class size for a sorted order).
pub fn mean_run_length(labels: &[u32]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    let runs = 1 + labels.windows(2).filter(|w| w[0] != w[1]).count();
    labels.len() as f64 / runs as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirichlet_draws_have_the_right_mean_and_spread() {
        // Symmetric Dirichlet(d) over n: E[p_i] = 1/n, Var[p_i] = (n-1) / (n^2 (n d + 1)).
        let mut rng = keyed_rng(7, 9, 0);
        for (d, n) in [(0.1, 10usize), (1.0, 4), (5.0, 3)] {
            let draws = 20_000;
            let (mut s, mut s2) = (0.0, 0.0);
            for _ in 0..draws {
                let p = dirichlet(d, n, &mut rng);
                assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
                s += p[0];
                s2 += p[0] * p[0];
            }
            let mean = s / draws as f64;
            let var = s2 / draws as f64 - mean * mean;
            let nf = n as f64;
            let want_var = (nf - 1.0) / (nf * nf * (nf * d + 1.0));
            // 6 standard errors of the mean; the variance within 5 %.
            assert!((mean - 1.0 / nf).abs() < 6.0 * (want_var / draws as f64).sqrt(), "d {d}: mean {mean}");
            assert!((var / want_var - 1.0).abs() < 0.05, "d {d}: var {var} want {want_var}");
        }
    }

    #[test]
    fn tiny_concentration_concentrates() {
        let mut rng = keyed_rng(1, 9, 0);
        let p = dirichlet(1e-6, 10, &mut rng);
        assert!(p.iter().all(|v| v.is_finite()));
        assert!(p.iter().copied().fold(0.0, f64::max) > 0.999, "{p:?}");
    }

    #[test]
    fn keyed_rngs_differ() {
        let a: u64 = frame_rng(1, 0).random();
        let b: u64 = frame_rng(1, 1).random();
        let c: u64 = frame_rng(2, 0).random();
        let a2: u64 = frame_rng(1, 0).random();
        assert_eq!(a, a2);
        assert!(a != b && a != c && b != c);
    }
}
