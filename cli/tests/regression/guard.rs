// Regression tests of the parameter guard and the config's bounds (spliced into
// tests/regression.rs's `regression` module: no top-level `use` items here).

/// The SVHN digits of `assets/mnist32_first64.npy` from `from`, `n` of them.
fn guard_digits(from: usize, n: usize) -> acclimate::Tensor {
    let all = acclimate::npy::read_f32(&common::asset("mnist32_first64.npy")).unwrap();
    let per = 3 * 32 * 32;
    acclimate::Tensor::f32(vec![n, 3, 32, 32], all.to_f32_vec()[from * per..(from + n) * per].to_vec())
}

fn guard_session(ctx: &acclimate::GpuContext, toml: &str) -> acclimate::adapt::Session {
    let cfg = acclimate::adapt::AdaptConfig::from_toml_str(toml).unwrap();
    let model = acclimate::Model::load(&common::asset("svhn.onnx")).unwrap();
    acclimate::adapt::Session::new(ctx, model, cfg).unwrap()
}

/// Everything a saved state holds (parameters, statistics, optimizer moments and counter, EATA's
/// m, the label-shift estimate), read through a state file; asserts every value is finite.
fn guard_all_state_finite(s: &acclimate::adapt::Session, what: &str) -> Vec<(String, Vec<u32>)> {
    let dir = std::env::temp_dir().join(format!("acclimate-guard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}.safetensors", what.replace(|c: char| !c.is_alphanumeric(), "_")));
    s.save_state(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let mut st = safetensors_view(&bytes);
    // The optimizer state's gate and guard flag describe the last step; the step count is state.
    for (name, v) in &mut st {
        if name == "opt:state" {
            v.truncate(1);
        }
    }
    for (name, values) in &st {
        let bad = values.iter().filter(|b| !f32::from_bits(**b).is_finite()).count();
        assert_eq!(bad, 0, "{what}: {name} holds {bad} non-finite value(s)");
    }
    st
}

/// The tensors of a safetensors file as raw f32 bits (the format: an 8-byte header length, a JSON
/// header of dtype/shape/offsets, then the data), read independently of the runtime's loader.
fn safetensors_view(bytes: &[u8]) -> Vec<(String, Vec<u32>)> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = Vec::new();
    for (name, t) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(t["dtype"], "F32", "{name}");
        let off = t["data_offsets"].as_array().unwrap();
        let (a, b) = (off[0].as_u64().unwrap() as usize, off[1].as_u64().unwrap() as usize);
        let v = data[a..b].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        out.push((name.clone(), v));
    }
    out.sort();
    out
}

/// A TENT step on an empty batch [0, 3, 32, 32] returned loss 0 and wrote NaN (0/0 batch
/// statistics) into every adapted scale and bias. It is refused now, and nothing changes.
#[gpu_test]
fn empty_batch_refused(ctx: acclimate::GpuContext) {
    for toml in ["[adapt]\nmethod = \"tent\"\n", "[adapt]\nmethod = \"rbn\"\n"] {
        let mut s = guard_session(&ctx, toml);
        let before = guard_all_state_finite(&s, "before");
        let empty = acclimate::Tensor::f32(vec![0, 3, 32, 32], vec![]);
        let e = s.step(&empty).unwrap_err().to_string();
        assert!(e.contains("empty") && e.contains("[0, 3, 32, 32]"), "{toml}: {e}");
        let e = s.predict(&empty, acclimate::adapt::NormMode::Ema).unwrap_err().to_string();
        assert!(e.contains("empty"), "{toml}: {e}");
        let after = guard_all_state_finite(&s, "after empty");
        assert!(after == before, "{toml}: an empty batch changed {:?}", guard_diff(&before, &after));
        assert_eq!(s.steps_taken(), 0);
    }
}

/// A finite batch of 3e38 overflows inside the network: the batch statistics are infinite and the
/// gradients NaN. TENT wrote them into the parameters and moments; RBN into the running
/// statistics; the model then predicted one class forever. Now every method's update is refused
/// on the GPU, the step is counted as skipped, the state is bit-for-bit what it was, and the
/// next finite batch adapts as if the bad one had never come.
#[gpu_test]
fn overflowing_batch_never_reaches_the_parameters(ctx: acclimate::GpuContext) {
    let overflow = acclimate::Tensor::f32(vec![4, 3, 32, 32], vec![3e38; 4 * 3 * 32 * 32]);
    for toml in [
        "[adapt]\nmethod = \"tent\"\n[optimizer]\nkind = \"adam\"\nlr = 0.001\n",
        "[adapt]\nmethod = \"tent\"\n[optimizer]\nlr = 0.01\n",
        "[adapt]\nmethod = \"rbn\"\n",
        "[adapt]\nmethod = \"tent\"\nnorm = \"ema\"\n",
        "[adapt]\nmethod = \"eta\"\n[eata]\nd_margin = 0.4\n[optimizer]\nkind = \"adam\"\nlr = 0.005\n",
        "[adapt]\nmethod = \"sar\"\n",
        "[adapt]\nmethod = \"woc\"\n",
        "[adapt]\nmethod = \"tent\"\n[label_shift]\nmode = \"ema\"\n",
    ] {
        let mut s = guard_session(&ctx, toml);
        let mut twin = guard_session(&ctx, toml);
        s.step(&guard_digits(0, 4)).unwrap();
        twin.step(&guard_digits(0, 4)).unwrap();
        let before = guard_all_state_finite(&s, "before");
        let taken = s.steps_taken();
        let p = if toml.contains("rbn") {
            s.predict(&overflow, acclimate::adapt::NormMode::Ema).unwrap()
        } else {
            s.step(&overflow).unwrap()
        };
        // The entropy filters of ETA, SAR and WoC may already select nothing from NaN logits
        // (no step, nothing for the guard to refuse); every other method's step is refused.
        let filters = ["\"eta\"", "\"sar\"", "\"woc\""].iter().any(|m| toml.contains(m));
        if !filters {
            assert!(p.skipped, "{toml}: the overflowing batch's update was not reported as skipped");
        }
        assert_eq!(s.steps_skipped(), p.skipped as u64, "{toml}");
        assert_eq!(s.steps_taken(), taken, "{toml}: a refused step was counted as taken");
        let after = guard_all_state_finite(&s, toml);
        assert!(after == before, "{toml}: the refused step changed {:?}", guard_diff(&before, &after));
        // The next batch adapts exactly as in a session that never saw the bad one.
        let a = s.step(&guard_digits(4, 4)).unwrap();
        let b = twin.step(&guard_digits(4, 4)).unwrap();
        assert!(!a.skipped);
        assert_eq!(a.logits.to_f32_vec(), b.logits.to_f32_vec(), "{toml}");
        let (x, y) = (guard_all_state_finite(&s, "s"), guard_all_state_finite(&twin, "twin"));
        assert!(x == y, "{toml}: differs from the twin in {:?}", guard_diff(&x, &y));
    }
}

/// `lr = 1e300` passed the config check (in f64) and reached the kernels as +inf.
#[test]
fn lr_beyond_float32_refused() {
    for (toml, key) in [
        ("[optimizer]\nlr = 1e300\n", "optimizer.lr"),
        ("[optimizer]\nlr = 1e-50\n", "optimizer.lr"),
        ("[optimizer]\nkind = \"adam\"\neps = 1e-300\n", "optimizer.eps"),
        ("[label_shift]\nmode = \"ema\"\nmomentum = 1e-320\n", "label_shift.momentum"),
    ] {
        let e = acclimate::adapt::AdaptConfig::from_toml_str(toml).unwrap_err().to_string();
        assert!(e.contains(&format!("`{key}`")) && e.contains("float32"), "{toml}: {e}");
    }
}

/// `window = 100000000` was accepted; the first step then asked the GPU for a batch of 10^8
/// frames.
#[test]
fn window_100000000_refused() {
    let e = acclimate::adapt::AdaptConfig::from_toml_str("[stream]\nwindow = 100000000\n").unwrap_err().to_string();
    assert!(e.contains("`stream.window`") && e.contains("4096"), "{e}");
    assert!(acclimate::adapt::AdaptConfig::from_toml_str("[stream]\nwindow = 4096\n").is_ok());
}

/// Names of the tensors that differ between two state views.
fn guard_diff(a: &[(String, Vec<u32>)], b: &[(String, Vec<u32>)]) -> Vec<String> {
    let mut d: Vec<String> = a.iter().zip(b).filter(|(x, y)| x != y).map(|(x, _)| x.0.clone()).collect();
    if a.len() != b.len() {
        d.push(format!("{} vs {} tensors", a.len(), b.len()));
    }
    d
}
