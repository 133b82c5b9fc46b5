//! Adaptation against the PyTorch reference (`tools/tta_reference.py`, fixtures committed in
//! `tests/fixtures/tta/`; CI needs no torch): every scenario's config is replayed through the
//! library's replay API and the returned (pre-update) logits, the loss, every adapted parameter,
//! (EMA mode) the running statistics after each batch and (output stages) the returned
//! probabilities and label-shift prior must match within 1e-4 relative
//! (max |ours − torch| ≤ 1e-4 · max |torch| per tensor, with an absolute floor of 1e-6).

mod common;

use std::path::{Path, PathBuf};

use acclimate::Model;
use acclimate::adapt::config::AdaptConfig;
use acclimate::adapt::replay::replay;
use acclimate::adapt::session::Session;
use serde_json::Value;

fn fixtures() -> PathBuf {
    std::env::var_os("ACCLIMATE_TTA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::repo_root().join("tests/fixtures/tta"))
}

fn model_of(dir: &Path) -> PathBuf {
    common::fixture_model(dir)
}

fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap()],
        Value::Null => vec![f64::NAN],
        other => panic!("unexpected JSON {other}"),
    }
}

/// max |a − b| / max(max |b|, floor), and whether it is within 1e-4.
fn close(what: &str, got: &[f64], want: &[f64], errors: &mut Vec<String>) -> f64 {
    if got.len() != want.len() {
        errors.push(format!("{what}: {} values, expected {}", got.len(), want.len()));
        return f64::INFINITY;
    }
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-2);
    let err = got.iter().zip(want).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    let rel = err / scale;
    if !(rel <= 1e-4 || err <= 1e-6) {
        errors.push(format!("{what}: max error {err:.3e} = {rel:.3e} relative (> 1e-4)"));
    }
    rel
}

fn run_scenario(ctx: &acclimate::GpuContext, dir: &Path) -> (Vec<String>, f64) {
    let cfg = AdaptConfig::from_file(&dir.join("config.toml")).expect("config");
    let model = Model::load(&model_of(dir)).expect("model");
    let mut session = Session::new(ctx, model, cfg).expect("session");
    let want: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let mut errors = Vec::new();
    let mut worst = 0.0f64;
    // EATA: the Fisher computed from the clean batches, before adaptation.
    if let Value::Object(fisher) = &want["fisher"] {
        let ours = session.fisher().expect("fisher");
        if ours.len() != fisher.len() {
            errors.push(format!("{} Fisher tensors, expected {}", ours.len(), fisher.len()));
        }
        for (name, t) in &ours {
            let got: Vec<f64> = t.to_f32_vec().iter().map(|&v| v as f64).collect();
            match fisher.get(name) {
                Some(v) => worst = worst.max(close(&format!("fisher {name}"), &got, &floats(v), &mut errors)),
                None => errors.push(format!("fisher {name} missing from the reference")),
            }
        }
    }
    let log = replay(&mut session, &dir.join("batches")).expect("replay");
    let ours: Value = serde_json::to_value(&log).unwrap();
    let (a, b) = (ours["steps"].as_array().unwrap(), want["steps"].as_array().unwrap());
    if a.len() != b.len() {
        errors.push(format!("{} steps, expected {}", a.len(), b.len()));
    }
    for (i, (s, w)) in a.iter().zip(b).enumerate() {
        worst =
            worst.max(close(&format!("step {i} logits"), &floats(&s["logits"]), &floats(&w["logits"]), &mut errors));
        match (&s["loss"], &w["loss"]) {
            (Value::Null, Value::Null) => {}
            (x, y) => {
                worst = worst.max(close(&format!("step {i} loss"), &floats(x), &floats(y), &mut errors));
            }
        }
        // ETA/EATA: the selection must be identical; the weights within tolerance.
        if s["selected"] != w["selected"] {
            errors.push(format!("step {i}: selected {} vs reference {}", s["selected"], w["selected"]));
        }
        if !w["weights"].is_null() {
            worst = worst.max(close(
                &format!("step {i} weights"),
                &floats(&s["weights"]),
                &floats(&w["weights"]),
                &mut errors,
            ));
        }
        // SAR: the recovery signal and its decision.
        if s["reset"] != w["reset"] {
            errors.push(format!("step {i}: reset {} vs reference {}", s["reset"], w["reset"]));
        }
        if !w["ema"].is_null() {
            worst = worst.max(close(&format!("step {i} ema"), &floats(&s["ema"]), &floats(&w["ema"]), &mut errors));
        }
        // Output stages (LAME, label shift): the returned probabilities and the prior q̂ they
        // were corrected with.
        for key in ["probs", "prior"] {
            match (&s[key], &w[key]) {
                (Value::Null, Value::Null) => {}
                (Value::Null, _) => errors.push(format!("step {i}: no {key}, the reference has them")),
                (_, Value::Null) => errors.push(format!("step {i}: {key} reported but the reference has none")),
                (x, y) => worst = worst.max(close(&format!("step {i} {key}"), &floats(x), &floats(y), &mut errors)),
            }
        }
        for key in ["params", "stats"] {
            let (ours, theirs) = (&s[key], &w[key]);
            let theirs = match theirs {
                Value::Object(m) => m,
                Value::Null => {
                    if !ours.is_null() && !ours.as_object().is_some_and(|m| m.is_empty()) {
                        errors.push(format!("step {i}: {key} reported but the reference has none"));
                    }
                    continue;
                }
                other => panic!("{key}: {other}"),
            };
            let ours = ours.as_object().cloned().unwrap_or_default();
            if ours.len() != theirs.len() {
                errors.push(format!("step {i}: {} {key} tensors, expected {}", ours.len(), theirs.len()));
            }
            for (name, v) in theirs {
                match ours.get(name) {
                    Some(o) => {
                        worst = worst.max(close(&format!("step {i} {key} {name}"), &floats(o), &floats(v), &mut errors))
                    }
                    None => errors.push(format!("step {i}: {key} {name} missing")),
                }
            }
        }
    }
    (errors, worst)
}

#[test]
fn adaptation_matches_the_pytorch_reference() {
    let root = fixtures();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures/tta")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("expected.json").exists())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 15, "found {} reference scenarios in {}, expected at least 15", dirs.len(), root.display());
    let Some(ctx) = common::gpu() else { return };
    let mut failures = Vec::new();
    for d in &dirs {
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        let (errors, worst) = run_scenario(&ctx, d);
        eprintln!("{name}: worst relative error {worst:.2e}");
        for e in errors {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// `fisher_file`: a Fisher saved from one session and loaded by another gives the same Fisher
/// bit for bit and the same replay as computing it from the clean batches; a file saved for
/// another model is refused.
#[test]
fn saved_fisher_reproduces_the_computed_one() {
    let dir = fixtures().join("tiny_eata");
    let Some(ctx) = common::gpu() else { return };
    let cfg = AdaptConfig::from_file(&dir.join("config.toml")).expect("config");
    let model = Model::load(&model_of(&dir)).expect("model");
    let mut a = Session::new(&ctx, model.clone(), cfg.clone()).expect("session");
    let tmp = std::env::temp_dir().join(format!("acclimate-fisher-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let file = tmp.join("fisher.safetensors");
    a.save_fisher(&file).expect("save fisher");
    let mut cfg_b = cfg.clone();
    cfg_b.eata.fisher_batches = None;
    cfg_b.eata.fisher_file = Some(file.clone());
    let mut b = Session::new(&ctx, model, cfg_b).expect("session from fisher_file");
    let (fa, fb) = (a.fisher().unwrap(), b.fisher().unwrap());
    assert_eq!(fa.len(), fb.len());
    for ((na, ta), (nb, tb)) in fa.iter().zip(&fb) {
        assert_eq!(na, nb);
        assert_eq!(ta.to_f32_vec(), tb.to_f32_vec(), "{na}");
    }
    assert!(fa.iter().any(|(_, t)| t.to_f32_vec().iter().any(|&v| v > 0.0)), "the Fisher is all zeros");
    let la = serde_json::to_value(replay(&mut a, &dir.join("batches")).unwrap()).unwrap();
    let lb = serde_json::to_value(replay(&mut b, &dir.join("batches")).unwrap()).unwrap();
    assert_eq!(la, lb);
    // Another model's session refuses the file (fingerprint mismatch) and says so.
    let other = fixtures().join("tiny_eta");
    let other_model = Model::load(&common::asset("svhn.onnx")).expect("svhn");
    let mut cfg_c = AdaptConfig::from_file(&other.join("config.toml")).expect("config");
    cfg_c.adapt.method = acclimate::adapt::config::Method::Eata;
    cfg_c.eata.fisher_file = Some(file.clone());
    let err = Session::new(&ctx, other_model, cfg_c).err().expect("a Fisher for another model is refused");
    assert!(err.to_string().contains("model") || err.to_string().contains("fingerprint"), "{err}");
    std::fs::remove_dir_all(&tmp).ok();
}
