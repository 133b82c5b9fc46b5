//! The config target: TOML text → [`AdaptConfig::from_toml_str`].
//!
//! Inputs are config files assembled from the real sections and keys with values of the right
//! type at their edges (0, negative, NaN, inf, 1e300, huge integers), of the wrong type, and
//! duplicated or misspelt keys, then damaged at the character level one time in four, so the
//! parser's validation (not only the TOML syntax check) sees them.

use acclimate::adapt::AdaptConfig;
use rand::RngExt;
use rand::rngs::Xoshiro256PlusPlus;

/// Every section and key of the config file, with a value of the kind it takes.
const KEYS: [(&str, &str, Kind); 45] = [
    ("adapt", "method", Kind::Method),
    ("adapt", "norm", Kind::Word(&["source", "batch", "ema", "alpha", "bogus"])),
    ("adapt", "norm_momentum", Kind::Float),
    ("adapt", "norm_alpha", Kind::Float),
    ("adapt", "steps", Kind::Int),
    ("adapt", "episodic", Kind::Bool),
    ("adapt", "exclude", Kind::Strings),
    ("adapt", "include", Kind::Strings),
    ("optimizer", "kind", Kind::Word(&["sgd", "adam", "adamw"])),
    ("optimizer", "lr", Kind::Float),
    ("optimizer", "momentum", Kind::Float),
    ("optimizer", "dampening", Kind::Float),
    ("optimizer", "nesterov", Kind::Bool),
    ("optimizer", "weight_decay", Kind::Float),
    ("optimizer", "betas", Kind::Floats),
    ("optimizer", "eps", Kind::Float),
    ("eata", "e_margin", Kind::Float),
    ("eata", "d_margin", Kind::Float),
    ("eata", "fisher_alpha", Kind::Float),
    ("eata", "fisher_batches", Kind::Path),
    ("eata", "fisher_file", Kind::Path),
    ("sar", "e_margin", Kind::Float),
    ("sar", "rho", Kind::Float),
    ("sar", "reset_threshold", Kind::Float),
    ("sar", "reset_clears_ema", Kind::Bool),
    ("woc", "lambda", Kind::Float),
    ("roid", "temperature", Kind::Float),
    ("roid", "momentum_probs", Kind::Float),
    ("roid", "momentum_src", Kind::Float),
    ("roid", "weighting", Kind::Bool),
    ("roid", "prior_correction", Kind::Bool),
    ("roid", "consistency", Kind::Bool),
    ("roid", "batch_size", Kind::Int),
    ("stream", "mode", Kind::Word(&["frame", "batch", "video"])),
    ("stream", "batch", Kind::Int),
    ("stream", "window", Kind::Int),
    ("stream", "adapt_every", Kind::Int),
    ("lame", "affinity", Kind::Word(&["rbf", "knn", "linear", "cosine"])),
    ("lame", "knn", Kind::Int),
    ("lame", "lambda", Kind::Float),
    ("lame", "max_steps", Kind::Int),
    ("lame", "features", Kind::Word(&["auto", "logits", "", "node:x"])),
    ("label_shift", "mode", Kind::Word(&["none", "ema", "em", "bbse", "adapter"])),
    ("label_shift", "momentum", Kind::Float),
    ("label_shift", "source_prior", Kind::Floats),
];

#[derive(Clone, Copy)]
enum Kind {
    Method,
    Word(&'static [&'static str]),
    Float,
    Int,
    Bool,
    Strings,
    Floats,
    Path,
}

const FLOATS: [&str; 20] = [
    "0.0", "-0.0", "1.0", "-1.0", "0.5", "1e-8", "1e-30", "1e300", "-1e300", "3.5e38", "nan", "inf", "-inf", "0.999",
    "1", "0", "2", "1e-45", "0.00025", "100",
];
const INTS: [&str; 14] = [
    "0",
    "1",
    "2",
    "-1",
    "64",
    "100000000",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "1.5",
    "3",
    "8",
    "1_000",
];
const METHODS: [&str; 14] =
    ["source", "norm", "rbn", "tent", "eta", "eata", "woc", "sar", "eata+woc", "lame", "roid", "TENT", "", "cotta"];

fn value(kind: Kind, rng: &mut Xoshiro256PlusPlus) -> String {
    let one = |rng: &mut Xoshiro256PlusPlus, v: &[&str]| v[rng.random_range(0..v.len())].to_string();
    // A value of another kind now and then: a string where a number goes, and so on.
    if rng.random_range(0..10) == 0 {
        return one(rng, &["\"text\"", "true", "[]", "{}", "1", "1.0", "[1, \"a\"]", "{ a = 1 }"]);
    }
    match kind {
        Kind::Method => format!("\"{}\"", one(rng, &METHODS)),
        Kind::Word(w) => format!("\"{}\"", one(rng, w)),
        Kind::Float => one(rng, &FLOATS),
        Kind::Int => one(rng, &INTS),
        Kind::Bool => one(rng, &["true", "false"]),
        Kind::Strings => {
            format!("[{}]", (0..rng.random_range(0..3)).map(|i| format!("\"bn{i}\"")).collect::<Vec<_>>().join(", "))
        }
        Kind::Floats => {
            let n = rng.random_range(0..4);
            format!("[{}]", (0..n).map(|_| one(rng, &FLOATS)).collect::<Vec<_>>().join(", "))
        }
        Kind::Path => one(rng, &["\"\"", "\"/nonexistent/x\"", "\"batches\"", "\"/dev/null\""]),
    }
}

/// A config file: a few sections with a few keys each, in section order with a chance of
/// repeating a section or a key.
pub fn input(rng: &mut Xoshiro256PlusPlus) -> String {
    let mut out = String::new();
    let n = rng.random_range(0..10);
    let mut picks: Vec<usize> = (0..n).map(|_| rng.random_range(0..KEYS.len())).collect();
    if !rng.random_bool(0.1) {
        picks.sort_by_key(|&i| KEYS[i].0);
    }
    let mut section = "";
    for i in picks {
        let (s, k, kind) = KEYS[i];
        if s != section || rng.random_range(0..20) == 0 {
            let name = if rng.random_range(0..30) == 0 { "adapts" } else { s };
            out.push_str(&format!("[{name}]\n"));
            section = s;
        }
        let key = if rng.random_range(0..30) == 0 { format!("{k}_") } else { k.to_string() };
        out.push_str(&format!("{key} = {}\n", value(kind, rng)));
    }
    if rng.random_range(0..4) == 0 {
        damage(&mut out, rng);
    }
    out
}

fn damage(s: &mut String, rng: &mut Xoshiro256PlusPlus) {
    let mut chars: Vec<char> = s.chars().collect();
    for _ in 0..rng.random_range(1..4) {
        if chars.is_empty() {
            break;
        }
        let i = rng.random_range(0..chars.len());
        match rng.random_range(0..4) {
            0 => {
                chars.remove(i);
            }
            1 => chars.insert(i, ['[', ']', '"', '=', '\n', '#', '\\', '\u{0}', 'é'][rng.random_range(0..9)]),
            2 => chars.truncate(i),
            _ => {
                let end = (i + rng.random_range(1..40)).min(chars.len());
                let span: Vec<char> = chars[i..end].to_vec();
                chars.splice(i..i, span);
            }
        }
    }
    *s = chars.into_iter().collect();
}

/// Parses `data` (UTF-8, lossily) as a config file; both outcomes are fine, a panic is not.
/// Returns 1 when the config is accepted, 0 when it is refused.
pub fn run(data: &[u8]) -> usize {
    let text = String::from_utf8_lossy(data);
    match AdaptConfig::from_toml_str(&text) {
        Ok(cfg) => {
            let _ = format!("{cfg:?}");
            1
        }
        Err(e) => {
            let _ = e.to_string();
            0
        }
    }
}
