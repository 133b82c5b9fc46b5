//! The adaptation config file (TOML).
//!
//! ```toml
//! [adapt]
//! method = "tent"          # auto (the default) | source | norm | rbn | tent | eta | eata | woc | sar | eata+woc | lame | roid
//! norm = "batch"           # source | batch | ema | alpha (default: the method's own)
//! norm_momentum = 0.05     # ema
//! norm_alpha = 0.1         # alpha
//! steps = 1
//! episodic = false
//! exclude = []             # node-name substrings whose normalization parameters stay frozen
//! include = []             # if non-empty, only BN nodes whose name contains one of these adapt
//!
//! [optimizer]
//! kind = "sgd"             # sgd | adam
//! lr = 0.00025
//! momentum = 0.9
//! dampening = 0.0
//! nesterov = false
//! weight_decay = 0.0
//! betas = [0.9, 0.999]
//! eps = 1e-8
//!
//! [preprocess]             # optional: how frames become the model's input (the stream API,
//! spec = "size=32,mean=0.4377/0.4438/0.4728,std=0.198/0.201/0.197"   # the C ABI); as --preprocess
//! ```
//!
//! Every key is optional. The method defaults to `auto` (which picks its own statistics and
//! optimizer, `[auto]` in [`super::methods::auto`]); the other keys' defaults are TENT's ImageNet-C
//! ones above (tta-methods.md §1), used by the methods that take them. Unknown sections and keys
//! are errors, so a typo never silently falls back to a default.
//!
//! The method sections (`[eata]`, `[woc]`, `[sar]`, `[lame]`, `[label_shift]`) live in their
//! methods' files under [`super::methods`]; [`Method`] and [`AdaptConfig`] are generated from
//! the registry there, so adding a method or its section is one line of it (see
//! [`super::methods`]). The enums carry explicit discriminants so that a C binding can pass them
//! as integers that never change meaning.
//!
//! Optimizer hyperparameters are `f64` because PyTorch's are Python floats: the bias corrections
//! and `1 − β` terms are formed in double precision before the update runs in `f32`
//! (see [`super::optim`]).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use super::methods::eata::EataSection;
pub use super::methods::label_shift::{LabelShiftMode, LabelShiftSection, SourcePrior};
pub use super::methods::lame::{Affinity, LameSection};
pub use super::methods::sar::SarSection;
pub use super::methods::woc::WocSection;
use super::methods::{AdaptMethod, Section};
use crate::stream::preprocess::PreprocessSpec;

/// Defines [`Method`] and [`AdaptConfig`] from the method registry (`registry!` in
/// [`super::methods`]): a variant per method, a field per method section.
macro_rules! define_config {
    (
        methods { $( $(#[$mdoc:meta])* $variant:ident = $disc:literal, $name:literal, $def:path; )* }
        sections { $( $(#[$sdoc:meta])* $field:ident: $section:ty, )* }
    ) => {
        /// A named adaptation method (a preset of normalization mode, loss and optimizer),
        /// implemented in its file under [`super::methods`].
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
        #[repr(u32)]
        pub enum Method {
            $( $(#[$mdoc])* #[serde(rename = $name)] $variant = $disc, )*
        }

        impl Method {
            pub const ALL: [Method; [$(Method::$variant),*].len()] = [$(Method::$variant),*];

            pub fn name(self) -> &'static str {
                match self {
                    $( Method::$variant => $name, )*
                }
            }

            /// The method's implementation.
            pub(crate) fn def(self) -> &'static dyn AdaptMethod {
                match self {
                    $( Method::$variant => &$def, )*
                }
            }
        }

        /// The whole config file: `[adapt]`, `[optimizer]`, one section per method that has
        /// one (from the registry), `[stream]` and the optional `[preprocess]`. Every key left
        /// out takes its default; unknown keys and out-of-range values are errors that name the
        /// key.
        ///
        /// ```
        /// let config = acclimate::Config::from_toml_str(r#"
        ///     [adapt]
        ///     method = "eta"
        ///     [optimizer]
        ///     kind = "adam"
        ///     lr = 5e-3
        ///     [stream]
        ///     window = 32
        ///     [preprocess]
        ///     spec = "size=32,mean=0.4377/0.4438/0.4728,std=0.198/0.201/0.197"
        /// "#)?;
        /// assert_eq!(config.adapt.method, acclimate::Method::Eta);
        /// assert!(acclimate::Config::from_toml_str("[optimizer]\nlr = -1").is_err());
        /// # Ok::<(), acclimate::Error>(())
        /// ```
        #[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct AdaptConfig {
            pub adapt: AdaptSection,
            pub optimizer: OptimizerConfig,
            $( $(#[$sdoc])* pub $field: $section, )*
            pub stream: StreamSection,
            #[serde(skip_serializing_if = "Option::is_none")]
            pub preprocess: Option<PreprocessSection>,
            #[serde(skip_serializing_if = "GpuSection::is_default")]
            pub gpu: GpuSection,
        }

        impl AdaptConfig {
            fn sections(&self) -> Vec<&dyn Section> {
                vec![$( &self.$field as &dyn Section ),*]
            }

            fn sections_mut(&mut self) -> Vec<&mut dyn Section> {
                vec![$( &mut self.$field as &mut dyn Section ),*]
            }
        }
    };
}

super::methods::registry!(define_config);

impl Method {
    /// The normalization statistics the method's reference implementation uses.
    pub fn default_norm(self) -> NormMode {
        self.def().default_norm()
    }

    /// Whether the method takes gradient steps on parameters (and so needs an optimizer).
    pub fn updates_parameters(self) -> bool {
        self.def().updates_parameters()
    }
}

/// Which statistics BatchNormalization layers normalise with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u32)]
pub enum NormMode {
    /// The model's running statistics.
    Source = 0,
    /// The current batch's mean and biased variance (TENT, BN-adapt).
    Batch = 1,
    /// Running statistics updated by an EMA of batch statistics, then used (RBN).
    Ema = 2,
    /// A fixed mix (1−α)·source + α·batch (BN-α).
    Alpha = 3,
}

impl NormMode {
    pub const ALL: [NormMode; 4] = [NormMode::Source, NormMode::Batch, NormMode::Ema, NormMode::Alpha];

    pub fn name(self) -> &'static str {
        match self {
            NormMode::Source => "source",
            NormMode::Batch => "batch",
            NormMode::Ema => "ema",
            NormMode::Alpha => "alpha",
        }
    }
}

/// The optimizer family; both follow `torch.optim` exactly (see [`super::optim`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u32)]
pub enum OptimizerKind {
    /// `torch.optim.SGD`: momentum, dampening, Nesterov, L2 weight decay.
    Sgd = 0,
    /// `torch.optim.Adam` (L2 weight decay added to the gradient, not AdamW's decoupled decay).
    Adam = 1,
}

impl OptimizerKind {
    pub const ALL: [OptimizerKind; 2] = [OptimizerKind::Sgd, OptimizerKind::Adam];

    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adam => "adam",
        }
    }
}

/// `Display` and `FromStr` by [`name`](Method::name) for a config enum with an `ALL` list.
macro_rules! named_enum {
    ($t:ty, $what:literal) => {
        impl ::std::fmt::Display for $t {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl ::std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL.iter().copied().find(|m| m.name() == s).ok_or_else(|| {
                    let names: Vec<&str> = Self::ALL.iter().map(|m| m.name()).collect();
                    format!("unknown {} '{s}', expected one of: {}", $what, names.join(", "))
                })
            }
        }
    };
}
pub(crate) use named_enum;

named_enum!(Method, "method");
named_enum!(NormMode, "normalization mode");
named_enum!(OptimizerKind, "optimizer");

/// The `[adapt]` section.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptSection {
    pub method: Method,
    /// `None`: the method's own ([`Method::default_norm`]); see [`AdaptSection::norm_mode`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm: Option<NormMode>,
    /// EMA momentum m of `ema` mode: running ← (1−m)·running + m·batch.
    pub norm_momentum: f32,
    /// α of `alpha` mode.
    pub norm_alpha: f32,
    /// Gradient steps per batch.
    pub steps: u32,
    /// Reset to the source state before every batch.
    pub episodic: bool,
    /// Normalization layers (BatchNorm; LayerNorm, GroupNorm and InstanceNorm for gradient
    /// methods) whose node name contains any of these substrings stay frozen.
    pub exclude: Vec<String>,
    /// If non-empty, only normalization layers whose node name contains one of these substrings
    /// adapt.
    pub include: Vec<String>,
}

impl Default for AdaptSection {
    fn default() -> Self {
        AdaptSection {
            method: Method::Auto,
            norm: None,
            norm_momentum: 0.05,
            norm_alpha: 0.1,
            steps: 1,
            episodic: false,
            exclude: Vec::new(),
            include: Vec::new(),
        }
    }
}

impl AdaptSection {
    /// The normalization mode in effect: the configured one, else the method's default.
    pub fn norm_mode(&self) -> NormMode {
        self.norm.unwrap_or_else(|| self.method.default_norm())
    }

    fn validate(&self) -> Result<(), Invalid> {
        unit_interval("adapt.norm_momentum", self.norm_momentum as f64, true)?;
        unit_interval("adapt.norm_alpha", self.norm_alpha as f64, true)?;
        if self.steps < 1 {
            return Err(Invalid::new("adapt.steps", self.steps, "must be at least 1"));
        }
        if self.steps as usize > MAX_STEPS_PER_BATCH {
            return Err(Invalid::new(
                "adapt.steps",
                self.steps,
                format!("must be at most {MAX_STEPS_PER_BATCH}: each step is a whole forward and reverse pass"),
            ));
        }
        for (key, list) in [("adapt.exclude", &self.exclude), ("adapt.include", &self.include)] {
            if list.iter().any(|s| s.is_empty()) {
                return Err(Invalid::new(key, format!("{list:?}"), "an empty substring would match every node"));
            }
        }
        Ok(())
    }
}

/// How a stream of frames is predicted and adapted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StreamMode {
    /// Every frame is predicted at once (EMA normalization statistics); the method's gradient
    /// step runs on a ring buffer of the last `window` frames every `adapt_every` frames.
    #[default]
    Frame,
    /// Frames are grouped into batches of `batch`, each predicted and adapted on as a batch
    /// (the protocol of the TTA literature).
    Batch,
}

/// The `[gpu]` section: checks of the GPU a session or stream runs on.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuSection {
    /// Run [`crate::GpuContext::self_test`] before the session opens (once per context), and
    /// refuse the GPU when it computes a stage wrong.
    pub self_test: bool,
}

impl GpuSection {
    fn is_default(&self) -> bool {
        *self == GpuSection::default()
    }
}

/// The `[stream]` section (`acclimate stream`, `acclimate demo` and the stream API).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSection {
    pub mode: StreamMode,
    /// Frames per batch in batch mode.
    pub batch: usize,
    /// Frames in the ring buffer the frame mode adapts on (and LAME / label shift run over).
    pub window: usize,
    /// Frame mode: one gradient step every this many frames (once the window holds two frames).
    pub adapt_every: usize,
    /// Frame mode: when a step's update reaches the predictions ([`StepTiming`]).
    pub steps: StepTiming,
}

impl Default for StreamSection {
    fn default() -> Self {
        StreamSection { mode: StreamMode::Frame, batch: 64, window: 64, adapt_every: 16, steps: StepTiming::Background }
    }
}

/// Frame mode: how a gradient step shares the GPU with the frames' predictions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StepTiming {
    /// The step due after frame k runs on a worker thread, its GPU work submitted in chunks of
    /// about one frame's forward pass between the frames' predictions; its update lands just
    /// before frame k + `adapt_every` is predicted. No prediction waits for a whole step: a
    /// frame waits at most for one chunk (and, at the landing frame, for what is left of the
    /// step). Predictions are deterministic: frames k + 1 … k + `adapt_every` − 1 see the
    /// parameters before the step, whatever the timing.
    #[default]
    Background,
    /// The step runs right after frame k's prediction, in the same call (frame k's result
    /// waits for the whole step; frame k + 1 sees its update).
    Inline,
}

/// The `[preprocess]` section: how frames become the model's input, written as the same string
/// `acclimate stream --preprocess` takes (see [`PreprocessSpec`]), so that one config file holds
/// everything a stream session needs. Optional in a config file; a `[preprocess]` table without
/// `spec` is an error, as is a spec the parser refuses (the message names `preprocess.spec`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSection {
    #[serde(with = "spec_string")]
    pub spec: PreprocessSpec,
}

/// A [`PreprocessSpec`] in TOML: its spec string, parsed by the CLI's own parser.
mod spec_string {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::stream::preprocess::{PreprocessSpec, SpecError};

    pub fn serialize<S: Serializer>(spec: &PreprocessSpec, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(spec)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PreprocessSpec, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(|e: SpecError| serde::de::Error::custom(format!("\"{text}\": {e}")))
    }
}

/// The default preset (the text of a config file): what `acclimate demo`, `acclimate stream`
/// without `--config` and the C ABI without an `[adapt]` section adapt with.
pub const DEFAULT_PRESET: &str = include_str!("default_preset.toml");

/// The `[optimizer]` section (hyperparameters as in `torch.optim`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub lr: f64,
    /// SGD momentum μ.
    pub momentum: f64,
    /// SGD dampening.
    pub dampening: f64,
    pub nesterov: bool,
    /// L2 penalty added to the gradient (both SGD and Adam).
    pub weight_decay: f64,
    /// Adam (β1, β2).
    #[serde(deserialize_with = "exactly_two")]
    pub betas: [f64; 2],
    /// Adam ε.
    pub eps: f64,
}

/// A fixed-size array read through the TOML deserializer ignores extra elements; read a list
/// and insist on its length instead.
fn exactly_two<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[f64; 2], D::Error> {
    let v = Vec::<f64>::deserialize(d)?;
    <[f64; 2]>::try_from(v.as_slice())
        .map_err(|_| serde::de::Error::invalid_length(v.len(), &"a list of two numbers [beta1, beta2]"))
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            kind: OptimizerKind::Sgd,
            lr: 0.00025,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
        }
    }
}

impl OptimizerConfig {
    /// The checks `torch.optim` makes in its constructors, plus finiteness.
    fn validate(&self) -> Result<(), Invalid> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Invalid::new("optimizer.lr", self.lr, "must be a finite number > 0"));
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return Err(Invalid::new("optimizer.momentum", self.momentum, "must be in [0, 1)"));
        }
        unit_interval("optimizer.dampening", self.dampening, true)?;
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(Invalid::new(
                "optimizer.nesterov",
                true,
                format!(
                    "Nesterov momentum requires momentum > 0 and dampening = 0 (as torch.optim.SGD), got momentum {} and dampening {}",
                    self.momentum, self.dampening
                ),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Invalid::new("optimizer.weight_decay", self.weight_decay, "must be a finite number >= 0"));
        }
        for (i, b) in self.betas.iter().enumerate() {
            if !(b.is_finite() && (0.0..1.0).contains(b)) {
                return Err(Invalid::new(
                    "optimizer.betas",
                    format!("{:?}", self.betas),
                    format!("beta{} must be in [0, 1)", i + 1),
                ));
            }
        }
        // torch.optim.Adam accepts eps = 0; a zero second moment then divides 0 by 0.
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(Invalid::new("optimizer.eps", self.eps, "must be a finite number >= 0"));
        }
        for (key, v) in [
            ("optimizer.lr", self.lr),
            ("optimizer.momentum", self.momentum),
            ("optimizer.dampening", self.dampening),
            ("optimizer.weight_decay", self.weight_decay),
            ("optimizer.betas", self.betas[0]),
            ("optimizer.betas", self.betas[1]),
            ("optimizer.eps", self.eps),
        ] {
            gpu_f32(key, v)?;
        }
        Ok(())
    }
}

/// Why a config could not be read or is not acceptable. `origin` is the file path, or
/// `<string>` for [`AdaptConfig::from_toml_str`].
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}{}{}: {message}", line.map(|l| format!(", line {l}")).unwrap_or_default(), key.as_ref().map(|k| format!(", key `{k}`")).unwrap_or_default())]
    Parse { origin: String, line: Option<usize>, key: Option<String>, message: String },
    #[error("{origin}: `{key}` = {value}: {reason}")]
    Invalid { origin: String, key: String, value: String, reason: String },
}

/// A validation failure before the origin is known.
pub(crate) struct Invalid {
    key: &'static str,
    value: String,
    reason: String,
}

impl Invalid {
    pub(crate) fn new(key: &'static str, value: impl fmt::Display, reason: impl Into<String>) -> Invalid {
        Invalid { key, value: value.to_string(), reason: reason.into() }
    }

    fn at(self, origin: &str) -> ConfigError {
        ConfigError::Invalid {
            origin: origin.to_string(),
            key: self.key.to_string(),
            value: self.value,
            reason: self.reason,
        }
    }
}

/// A value the kernels receive as `f32` must mean the same there: finite in `f32` (1e300 passes a
/// check in `f64` and becomes +inf on the GPU), and not flushed to zero (a non-zero value below
/// `f32::MIN_POSITIVE`, 1.2e-38, is subnormal, which many GPUs flush to 0).
pub(crate) fn gpu_f32(key: &'static str, v: f64) -> Result<(), Invalid> {
    let f = v as f32;
    if !f.is_finite() {
        return Err(Invalid::new(
            key,
            v,
            format!("is beyond float32's range (±{:e}), the precision the GPU computes in", f32::MAX),
        ));
    }
    if v != 0.0 && f.abs() < f32::MIN_POSITIVE {
        return Err(Invalid::new(
            key,
            v,
            format!(
                "is below float32's smallest normal number ({:e}): the GPU would compute with 0",
                f32::MIN_POSITIVE
            ),
        ));
    }
    Ok(())
}

/// The largest `stream.window` and `stream.batch`. A window is one batch of the gradient step, kept
/// on the GPU with the activations its reverse pass reads: 4096 frames is 16 times the largest
/// batch of the TTA literature (256), and already more than a 224×224 classifier's activations fit
/// in any adapter's buffer limits. 100 000 000 frames would be refused only when the first step
/// failed to allocate.
pub const MAX_STREAM_FRAMES: usize = 4096;

/// The most gradient steps per batch (`adapt.steps`): each is a whole forward and reverse pass;
/// the methods' papers take 1, and 100 already makes a batch 100 times slower.
pub const MAX_STEPS_PER_BATCH: usize = 100;

pub(crate) fn unit_interval(key: &'static str, v: f64, closed: bool) -> Result<(), Invalid> {
    let ok = v.is_finite() && v >= 0.0 && if closed { v <= 1.0 } else { v < 1.0 };
    if ok { Ok(()) } else { Err(Invalid::new(key, v, if closed { "must be in [0, 1]" } else { "must be in [0, 1)" })) }
}

impl AdaptConfig {
    /// Parses and validates a config; `origin` names the source in errors.
    fn parse(src: &str, origin: &str) -> Result<AdaptConfig, ConfigError> {
        let config: AdaptConfig = toml::from_str(src).map_err(|e| {
            let (line, key) = match e.span() {
                Some(span) => locate(src, span.start),
                None => (None, None),
            };
            ConfigError::Parse { origin: origin.to_string(), line, key, message: e.message().trim().to_string() }
        })?;
        config.validate_as(origin)?;
        Ok(config)
    }

    /// The configured ETA/EATA entropy margin, if any.
    pub fn adapt_e_margin(&self) -> Option<f32> {
        self.eata.e_margin
    }

    pub fn from_toml_str(src: &str) -> crate::Result<AdaptConfig> {
        Ok(AdaptConfig::parse(src, "<string>")?)
    }

    pub fn from_file(path: &Path) -> crate::Result<AdaptConfig> {
        let src =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let mut config = AdaptConfig::parse(&src, &path.display().to_string())?;
        // Paths in a config file are relative to the file, not to wherever the program runs.
        if let Some(dir) = path.parent() {
            for section in config.sections_mut() {
                for p in section.paths() {
                    if p.is_relative() {
                        *p = dir.join(&*p);
                    }
                }
            }
        }
        Ok(config)
    }

    /// Checks every value's range and the combinations PyTorch rejects.
    pub fn validate(&self) -> crate::Result<()> {
        Ok(self.validate_as("<config>")?)
    }

    fn validate_as(&self, origin: &str) -> Result<(), ConfigError> {
        self.adapt.validate().map_err(|e| e.at(origin))?;
        self.optimizer.validate().map_err(|e| e.at(origin))?;
        for section in self.sections() {
            section.validate().map_err(|e| e.at(origin))?;
        }
        for (key, v) in [
            ("stream.batch", self.stream.batch),
            ("stream.window", self.stream.window),
            ("stream.adapt_every", self.stream.adapt_every),
        ] {
            if v == 0 {
                return Err(Invalid::new(key, v, "must be at least 1").at(origin));
            }
        }
        for (key, v) in [("stream.batch", self.stream.batch), ("stream.window", self.stream.window)] {
            if v > MAX_STREAM_FRAMES {
                return Err(Invalid::new(
                    key,
                    v,
                    format!(
                        "must be at most {MAX_STREAM_FRAMES} frames: the frames are one batch of the gradient step, held on the GPU with its activations"
                    ),
                )
                .at(origin));
            }
        }
        self.adapt.method.def().validate(self).map_err(|e| e.at(origin))
    }

    /// The config as TOML (every key written out, so it records the defaults in effect).
    pub fn to_toml_string(&self) -> String {
        // Serialising plain structs of numbers, strings and lists cannot fail.
        toml::to_string(self).unwrap_or_default()
    }
}

/// The 1-based line of byte offset `at` in `src` and the dotted key written there (the key on
/// that line, or on the nearest line above it within the same table, under its `[table]`).
fn locate(src: &str, at: usize) -> (Option<usize>, Option<String>) {
    let at = at.min(src.len());
    let lines: Vec<&str> = src[..at].split('\n').collect();
    let line_no = lines.len();
    let current = src.lines().nth(line_no - 1).unwrap_or("");
    let header = |l: &str| {
        let t = l.trim();
        t.strip_prefix('[').and_then(|t| t.split(']').next()).map(|h| h.trim_start_matches('[').trim().to_string())
    };
    if let Some(h) = header(current) {
        return (Some(line_no), Some(h));
    }
    let mut key = None;
    let mut table = None;
    for l in std::iter::once(current).chain(lines.iter().rev().skip(1).copied()) {
        if let Some(h) = header(l) {
            table = Some(h);
            break;
        }
        if key.is_none()
            && let Some((k, _)) = l.split_once('=')
        {
            let k = k.trim();
            // A key, not an `=` inside a string on a continuation line of a multi-line list.
            let is_key = k.chars().all(|ch| ch.is_ascii_alphanumeric() || "_-. \"'".contains(ch))
                && k.matches('"').count() % 2 == 0;
            if !k.is_empty() && is_key {
                key = Some(k.trim_matches('"').to_string());
            }
        }
    }
    let key = match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k),
        (Some(t), None) => Some(t),
        (None, None) => None,
    };
    (Some(line_no), key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(src: &str) -> String {
        AdaptConfig::from_toml_str(src).expect_err("config should be rejected").to_string()
    }

    #[test]
    fn empty_file_gives_auto_and_tent_defaults() {
        let c = AdaptConfig::from_toml_str("").unwrap();
        assert_eq!(c, AdaptConfig::default());
        assert_eq!(c.adapt.method, Method::Auto);
        let c = AdaptConfig::from_toml_str("[adapt]\nmethod = \"tent\"").unwrap();
        assert_eq!(c.adapt.norm_mode(), NormMode::Batch);
        assert_eq!(c.optimizer.kind, OptimizerKind::Sgd);
        assert_eq!(c.optimizer.lr, 0.00025);
        assert_eq!(c.optimizer.momentum, 0.9);
        assert_eq!(c.optimizer.betas, [0.9, 0.999]);
        assert_eq!(c.optimizer.eps, 1e-8);
        assert_eq!(c.adapt.steps, 1);
        assert!(!c.optimizer.nesterov && !c.adapt.episodic);
    }

    #[test]
    fn full_file_parses() {
        let c = AdaptConfig::from_toml_str(
            r#"
[adapt]
method = "rbn"
norm_momentum = 0.1
norm_alpha = 0.5
steps = 3
episodic = true
exclude = ["layer4"]
include = ["layer", "bn1"]
[optimizer]
kind = "adam"
lr = 1e-3
momentum = 0.0
dampening = 0.0
nesterov = false
weight_decay = 0.01
betas = [0.8, 0.99]
eps = 1e-6
"#,
        )
        .unwrap();
        assert_eq!(c.adapt.method, Method::Rbn);
        assert_eq!(c.adapt.norm, None);
        assert_eq!(c.adapt.norm_mode(), NormMode::Ema);
        assert_eq!(c.adapt.norm_momentum, 0.1);
        assert_eq!(c.adapt.steps, 3);
        assert_eq!(c.adapt.exclude, vec!["layer4".to_string()]);
        assert_eq!(c.adapt.include.len(), 2);
        assert_eq!(c.optimizer.kind, OptimizerKind::Adam);
        assert_eq!(c.optimizer.betas, [0.8, 0.99]);
        assert_eq!(c.optimizer.weight_decay, 0.01);
        // Integers are accepted where floats are expected.
        let c = AdaptConfig::from_toml_str("[adapt]\nmethod = \"tent\"\n[optimizer]\nlr = 1\nmomentum = 0").unwrap();
        assert_eq!((c.optimizer.lr, c.optimizer.momentum), (1.0, 0.0));
    }

    #[test]
    fn method_default_norms() {
        let norm =
            |m: &str| AdaptConfig::from_toml_str(&format!("[adapt]\nmethod = \"{m}\"")).unwrap().adapt.norm_mode();
        assert_eq!(norm("source"), NormMode::Source);
        assert_eq!(norm("norm"), NormMode::Batch);
        assert_eq!(norm("rbn"), NormMode::Ema);
        assert_eq!(norm("tent"), NormMode::Batch);
        let c = AdaptConfig::from_toml_str("[adapt]\nmethod = \"tent\"\nnorm = \"alpha\"").unwrap();
        assert_eq!(c.adapt.norm_mode(), NormMode::Alpha);
    }

    #[test]
    fn round_trips_through_toml() {
        let mut c = AdaptConfig::default();
        c.adapt.method = Method::Tent;
        c.adapt.norm = Some(NormMode::Ema);
        c.adapt.exclude = vec!["head".into()];
        c.optimizer.kind = OptimizerKind::Adam;
        let back = AdaptConfig::from_toml_str(&c.to_toml_string()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_keys_and_sections_are_rejected_with_their_names() {
        let e = err("[adapt]\nmethod = \"tent\"\nstep = 2\n");
        assert!(e.contains("unknown field `step`") && e.contains("line 3") && e.contains("`adapt.step`"), "{e}");
        let e = err("[optimiser]\nlr = 0.1\n");
        assert!(e.contains("unknown field `optimiser`") && e.contains("`optimiser`"), "{e}");
        let e = err("[optimizer]\nkind = \"sgd\"\nlearning_rate = 0.1\n");
        assert!(e.contains("learning_rate") && e.contains("`optimizer.learning_rate`"), "{e}");
    }

    #[test]
    fn bad_types_and_variants_name_the_key() {
        let e = err("[optimizer]\nlr = \"fast\"\n");
        assert!(e.contains("`optimizer.lr`") && e.contains("line 2"), "{e}");
        let e = err("[adapt]\nmethod = \"tentt\"\n");
        assert!(e.contains("`adapt.method`") && e.contains("tentt") && e.contains("tent"), "{e}");
        let e = err("[adapt]\nsteps = -1\n");
        assert!(e.contains("`adapt.steps`"), "{e}");
        let e = err("[optimizer]\nbetas = [\n  0.9,\n  0.99,\n  0.5,\n]\n");
        assert!(e.contains("`optimizer.betas`") && e.contains("invalid length 3"), "{e}");
        let e = err("[adapt]\nexclude = [\n  \"a=b\",\n  5,\n]\n");
        assert!(e.contains("`adapt.exclude`") && e.contains("line 4"), "{e}");
        let e = err("[optimizer]\nbetas = [0.9]\n");
        assert!(e.contains("`optimizer.betas`") && e.contains("invalid length 1"), "{e}");
        let e = err("[adapt\nmethod = 1");
        assert!(e.starts_with("<string>, line 1"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        for (src, key) in [
            ("[optimizer]\nlr = 0.0", "optimizer.lr"),
            ("[optimizer]\nlr = -1e-3", "optimizer.lr"),
            ("[optimizer]\nlr = nan", "optimizer.lr"),
            ("[optimizer]\nlr = inf", "optimizer.lr"),
            ("[optimizer]\nmomentum = 1.0", "optimizer.momentum"),
            ("[optimizer]\nmomentum = -0.1", "optimizer.momentum"),
            ("[optimizer]\ndampening = 1.5", "optimizer.dampening"),
            ("[optimizer]\nnesterov = true\nmomentum = 0.0", "optimizer.nesterov"),
            ("[optimizer]\nnesterov = true\ndampening = 0.1", "optimizer.nesterov"),
            ("[optimizer]\nweight_decay = -1.0", "optimizer.weight_decay"),
            ("[optimizer]\nbetas = [1.0, 0.999]", "optimizer.betas"),
            ("[optimizer]\nbetas = [0.9, -0.1]", "optimizer.betas"),
            ("[optimizer]\neps = -1e-8", "optimizer.eps"),
            ("[adapt]\nsteps = 0", "adapt.steps"),
            ("[adapt]\nnorm_alpha = 1.5", "adapt.norm_alpha"),
            ("[adapt]\nnorm_momentum = -0.5", "adapt.norm_momentum"),
            ("[adapt]\nexclude = [\"\"]", "adapt.exclude"),
            // Valid in f64, not in the f32 the GPU computes in.
            ("[optimizer]\nlr = 1e300", "optimizer.lr"),
            ("[optimizer]\nlr = 1e-50", "optimizer.lr"),
            ("[optimizer]\nweight_decay = 1e39", "optimizer.weight_decay"),
            ("[optimizer]\neps = 1e-45", "optimizer.eps"),
            ("[eata]\nd_margin = 1e300", "eata.d_margin"),
            ("[sar]\nrho = 1e39", "sar.rho"),
            ("[stream]\nwindow = 100000000", "stream.window"),
            ("[stream]\nbatch = 4097", "stream.batch"),
            ("[adapt]\nsteps = 101", "adapt.steps"),
        ] {
            let e = err(src);
            assert!(e.contains(&format!("`{key}`")), "{src}: {e}");
        }
        // The edges that are allowed.
        for src in [
            "[adapt]\nnorm_alpha = 1.0",
            "[adapt]\nnorm_alpha = 0.0",
            "[adapt]\nmethod = \"tent\"\n[optimizer]\nnesterov = true",
            "[adapt]\nmethod = \"tent\"\n[optimizer]\nmomentum = 0.0",
            "[adapt]\nmethod = \"tent\"\n[optimizer]\nbetas = [0.0, 0.0]",
        ] {
            AdaptConfig::from_toml_str(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        }
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("acclimate-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.toml");
        std::fs::write(&p, "[optimizer]\nlr = -1.0\n").unwrap();
        let e = AdaptConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("bad.toml") && e.contains("`optimizer.lr`"), "{e}");
        let e = AdaptConfig::from_file(&dir.join("missing.toml")).unwrap_err();
        assert!(
            matches!(e, crate::Error::Config(ConfigError::Read { .. })) && e.to_string().contains("missing.toml"),
            "{e}"
        );
        let good = dir.join("good.toml");
        std::fs::write(&good, "[adapt]\nmethod = \"norm\"\n").unwrap();
        assert_eq!(AdaptConfig::from_file(&good).unwrap().adapt.method, Method::Norm);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn method_sections_and_method_checks_keep_their_messages() {
        for (src, message) in [
            (
                "[adapt]\nmethod = \"eata\"\n",
                "<string>: `eata.fisher_batches` = (missing): EATA needs the Fisher: give clean batches (fisher_batches) or a saved Fisher (fisher_file)",
            ),
            (
                "[adapt]\nmethod = \"eata+woc\"\n",
                "<string>: `eata.fisher_batches` = (missing): EATA needs the Fisher: give clean batches (fisher_batches) or a saved Fisher (fisher_file)",
            ),
            (
                "[eata]\nfisher_batches = \"a\"\nfisher_file = \"b\"\n",
                "<string>: `eata.fisher_file` = (both set): give either fisher_batches or fisher_file, not both",
            ),
            ("[woc]\nlambda = -1.0\n", "<string>: `woc.lambda` = -1: must be a finite number >= 0"),
            ("[sar]\nreset_threshold = inf\n", "<string>: `sar.reset_threshold` = inf: must be finite"),
            ("[lame]\nknn = 0\n", "<string>: `lame.knn` = 0: must be at least 1"),
            (
                "[label_shift]\nmode = \"bbse\"\n",
                "<string>: `label_shift.confusion` = (missing): mode \"bbse\" needs the source confusion matrix (a [C, C] float32 .npy)",
            ),
        ] {
            assert_eq!(err(src), message, "{src}");
        }
        let e = err("[label_shift]\nmomentum = 1e-50\n");
        assert!(e.contains("`label_shift.momentum`") && e.contains("below float32's smallest normal number"), "{e}");
        // ETA has no Fisher, and EATA without the penalty needs none.
        for src in ["[adapt]\nmethod = \"eta\"\n", "[adapt]\nmethod = \"eata\"\n[eata]\nfisher_alpha = 0.0\n"] {
            AdaptConfig::from_toml_str(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        }
    }

    #[test]
    fn every_sections_paths_resolve_against_the_config_file() {
        let dir = std::env::temp_dir().join(format!("acclimate-config-paths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("paths.toml");
        std::fs::write(
            &p,
            "[eata]\nfisher_batches = \"clean\"\n[label_shift]\nmode = \"bbse\"\nconfusion = \"c.npy\"\nadapter = \"/abs/a.onnx\"\nsource_prior = \"p.npy\"\n",
        )
        .unwrap();
        let c = AdaptConfig::from_file(&p).unwrap();
        assert_eq!(c.eata.fisher_batches, Some(dir.join("clean")));
        assert_eq!(c.label_shift.confusion, Some(dir.join("c.npy")));
        assert_eq!(c.label_shift.adapter, Some(PathBuf::from("/abs/a.onnx")), "absolute paths stay");
        assert_eq!(c.label_shift.source_prior, Some(SourcePrior::File(dir.join("p.npy"))));
        std::fs::write(&p, "[eata]\nfisher_file = \"f.safetensors\"\n").unwrap();
        assert_eq!(AdaptConfig::from_file(&p).unwrap().eata.fisher_file, Some(dir.join("f.safetensors")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn preprocess_section_holds_the_cli_spec_string() {
        let spec = "size=32,channels=3,mean=0.4377/0.4438/0.4728,std=0.198/0.201/0.197";
        let c = AdaptConfig::from_toml_str(&format!("[preprocess]\nspec = \"{spec}\"\n")).unwrap();
        let parsed: PreprocessSpec = spec.parse().unwrap();
        assert_eq!(c.preprocess.as_ref().map(|p| &p.spec), Some(&parsed));
        assert_eq!(c.adapt, AdaptSection::default(), "the other sections keep their defaults");
        // Written back as the canonical spec string, and read again to the same config.
        let text = c.to_toml_string();
        assert!(text.contains("[preprocess]") && text.contains(&format!("spec = \"{spec}\"")), "{text}");
        assert_eq!(AdaptConfig::from_toml_str(&text).unwrap(), c);
        // Absent: None, and not written out.
        let c = AdaptConfig::from_toml_str("[adapt]\nmethod = \"norm\"\n").unwrap();
        assert!(c.preprocess.is_none() && !c.to_toml_string().contains("preprocess"));
    }

    #[test]
    fn bad_preprocess_sections_name_the_key() {
        let e = err("[preprocess]\nspec = \"size=0\"\n");
        assert!(e.contains("`preprocess.spec`") && e.contains("line 2") && e.contains("outside 1..=16384"), "{e}");
        let e = err("[adapt]\nmethod = \"tent\"\n[preprocess]\nspec = \"size=32,colour=rgb\"\n");
        assert!(e.contains("`preprocess.spec`") && e.contains("unknown key 'colour'"), "{e}");
        let e = err("[preprocess]\nspec = 32\n");
        assert!(e.contains("`preprocess.spec`"), "{e}");
        let e = err("[preprocess]\n");
        assert!(e.contains("missing field `spec`") && e.contains("`preprocess`"), "{e}");
        let e = err("[preprocess]\nspec = \"size=32\"\nsize = 32\n");
        assert!(e.contains("unknown field `size`") && e.contains("`preprocess.size`"), "{e}");
    }

    #[test]
    fn default_preset_is_a_valid_config() {
        let c = AdaptConfig::from_toml_str(DEFAULT_PRESET).unwrap();
        assert_eq!(c.adapt.method, Method::Auto);
        assert!(c.preprocess.is_none());
    }

    #[test]
    fn enums_parse_from_their_names() {
        for m in Method::ALL {
            assert_eq!(m.name().parse::<Method>().unwrap(), m);
            assert_eq!(m.to_string(), m.name());
        }
        for m in NormMode::ALL {
            assert_eq!(m.name().parse::<NormMode>().unwrap(), m);
        }
        for k in OptimizerKind::ALL {
            assert_eq!(k.name().parse::<OptimizerKind>().unwrap(), k);
        }
        assert!("TENT".parse::<Method>().unwrap_err().contains("source, norm, rbn, tent"));
        assert_eq!(Method::Tent as u32, 3);
        assert!(Method::Tent.updates_parameters() && !Method::Rbn.updates_parameters());
    }
}
