// Regression tests of the state area (spliced into tests/regression.rs's `regression` module).
//
// The damaged files are written here with the safetensors crate and the checksum as the format
// documents it (adapt/state.rs), so a NaN reaches the loader's finiteness check rather than
// being caught as corruption.

fn state_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("acclimate-regression-state-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn state_session(ctx: &acclimate::GpuContext, method: &str) -> acclimate::adapt::Session {
    let cfg = acclimate::adapt::AdaptConfig::from_toml_str(&format!(
        "[adapt]\nmethod = \"{method}\"\n[optimizer]\nkind = \"adam\"\nlr = 0.001\n"
    ))
    .unwrap();
    let model = acclimate::Model::load(&common::asset("svhn.onnx")).unwrap();
    acclimate::adapt::Session::new(ctx, model, cfg).unwrap()
}

fn state_digits(from: usize, n: usize) -> acclimate::Tensor {
    let all = acclimate::npy::read_f32(&common::asset("mnist32_first64.npy")).unwrap();
    let per = 3 * 32 * 32;
    acclimate::Tensor::f32(vec![n, 3, 32, 32], all.to_f32_vec()[from * per..(from + n) * per].to_vec())
}

/// Rewrites the state file `src` into `dst` after `edit` changed its tensors or metadata, with
/// a valid checksum: SHA-256 over "acclimate-state-checksum-v1", then per tensor in name order
/// its name, rank, dims, byte count and bytes, then per metadata entry but the checksum, in key
/// order, key and value (strings and counts prefixed by their length as a little-endian u64).
fn state_rewrite(
    src: &std::path::Path,
    dst: &std::path::Path,
    edit: impl FnOnce(
        &mut std::collections::BTreeMap<String, (Vec<usize>, Vec<u8>)>,
        &mut std::collections::BTreeMap<String, String>,
    ),
) {
    use sha2::Digest;
    let bytes = std::fs::read(src).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta: std::collections::BTreeMap<String, String> =
        header.metadata().clone().unwrap_or_default().into_iter().collect();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: std::collections::BTreeMap<String, (Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec()))).collect();
    edit(&mut tensors, &mut meta);
    meta.remove("checksum");
    let mut h = sha2::Sha256::new();
    let len = |h: &mut sha2::Sha256, n: usize| h.update((n as u64).to_le_bytes());
    let text = |h: &mut sha2::Sha256, s: &str| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    h.update(b"acclimate-state-checksum-v1");
    for (name, (shape, data)) in &tensors {
        text(&mut h, name);
        len(&mut h, shape.len());
        shape.iter().for_each(|&d| len(&mut h, d));
        len(&mut h, data.len());
        h.update(data);
    }
    for (k, v) in &meta {
        text(&mut h, k);
        text(&mut h, v);
    }
    let sum: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    meta.insert("checksum".into(), sum);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (s, d))| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap()))
        .collect();
    std::fs::write(dst, safetensors::serialize(views, Some(meta.into_iter().collect())).unwrap()).unwrap();
}

/// The first BN scale of the SVHN network as it is named in state files.
fn state_first_scale(s: &acclimate::adapt::Session) -> String {
    s.batch_norms()[0].scale.clone()
}

#[gpu_test]
fn state_with_nan_refused(ctx: acclimate::GpuContext) {
    let dir = state_dir("nan");
    let mut s = state_session(&ctx, "tent");
    s.step(&state_digits(0, 4)).unwrap();
    let good = dir.join("good.safetensors");
    s.save_state(&good).unwrap();
    // The control: the untouched file loads.
    s.load_state(&good).unwrap();
    let scale = state_first_scale(&s);
    for (tag, bad_values) in [("nan", vec![f32::NAN; 3]), ("inf", vec![f32::INFINITY, f32::NEG_INFINITY, f32::NAN])] {
        let bad = dir.join(format!("{tag}.safetensors"));
        state_rewrite(&good, &bad, |t, _| {
            let data = &mut t.get_mut(&scale).unwrap().1;
            for (i, v) in bad_values.iter().enumerate() {
                data[4 * i * 2..4 * i * 2 + 4].copy_from_slice(&v.to_le_bytes());
            }
        });
        let err = s.load_state(&bad).unwrap_err().to_string();
        assert!(err.contains(&scale), "{tag}: {err}");
        assert!(err.contains("holds 3 non-finite value(s)"), "{tag}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[gpu_test]
fn state_from_other_method_refused(ctx: acclimate::GpuContext) {
    let dir = state_dir("method");
    let tent = state_session(&ctx, "tent");
    let path = dir.join("tent.safetensors");
    tent.save_state(&path).unwrap();
    let mut eta = state_session(&ctx, "eta");
    let err = eta.load_state(&path).unwrap_err().to_string();
    assert!(err.contains("method 'tent'") && err.contains("method 'eta'"), "{err}");
    // A state that records no method (hand-made or damaged) is refused as well.
    let anonymous = dir.join("anonymous.safetensors");
    state_rewrite(&path, &anonymous, |_, meta| {
        meta.remove("method");
    });
    let mut tent = tent;
    let err = tent.load_state(&anonymous).unwrap_err().to_string();
    assert!(err.contains("records no method") && err.contains("'tent'"), "{err}");
    // The same file with its method left in loads into a session of that method.
    tent.load_state(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refused_state_load_leaves_predictions_unchanged() {
    use acclimate::adapt::NormMode;
    let Some(ctx) = common::gpu() else { return };
    let dir = state_dir("unchanged");
    let mut s = state_session(&ctx, "tent");
    s.step(&state_digits(0, 4)).unwrap();
    let good = dir.join("good.safetensors");
    s.save_state(&good).unwrap();
    s.step(&state_digits(4, 4)).unwrap();
    let probe = state_digits(8, 4);
    let before = s.predict(&probe, NormMode::Batch).unwrap().logits.to_f32_vec();
    let params = s.parameters().unwrap();
    let stats = s.statistics().unwrap();
    let steps = s.steps_taken();

    // Only the last tensor (in file order) is poisoned, so a loader that wrote tensors as it
    // checked them would leave the session half-updated.
    let nan = dir.join("nan.safetensors");
    state_rewrite(&good, &nan, |t, _| {
        let last = t.keys().last().unwrap().clone();
        let v = &mut t.get_mut(&last).unwrap().1;
        v[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let other = dir.join("other.safetensors");
    state_rewrite(&good, &other, |_, meta| {
        meta.insert("method".into(), "sar".into());
    });
    for bad in [&nan, &other] {
        assert!(s.load_state(bad).is_err(), "{} loaded", bad.display());
        let after = s.predict(&probe, NormMode::Batch).unwrap().logits.to_f32_vec();
        assert_eq!(
            before.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            after.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{}",
            bad.display()
        );
        assert_eq!(s.parameters().unwrap(), params);
        assert_eq!(s.statistics().unwrap(), stats);
        assert_eq!(s.steps_taken(), steps);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stale_temporary_files_removed() {
    use acclimate::Tensor;
    use acclimate::adapt::state;
    let dir = state_dir("stale");
    let target = dir.join("s.safetensors");
    // A pid that certainly belonged to a process that is gone: a child we started and reaped.
    let dead = {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let live = std::process::id();
    let killed = format!(".s.safetensors.tmp-{dead}-0");
    let killed2 = format!(".s.safetensors.tmp-{dead}-17");
    // Not ours to remove: a live process's temporary (a save in flight), another target's
    // temporary, and names that only look similar.
    let keep = [
        format!(".s.safetensors.tmp-{live}-3"),
        format!(".t.safetensors.tmp-{dead}-0"),
        format!(".s.safetensors.tmp-{dead}-0.bak"),
        format!(".s.safetensors.tmp-{dead}-x"),
        format!("s.safetensors.tmp-{dead}-0"),
        ".s.safetensors.tmp--0".to_string(),
        "notes.txt".to_string(),
    ];
    for f in keep.iter().chain([&killed, &killed2]) {
        std::fs::write(dir.join(f), b"partial").unwrap();
    }
    let t = vec![("bn.weight".to_string(), Tensor::f32(vec![2], vec![1.0, 2.0]))];
    state::save_state(&target, "fp", &t, &[("method".into(), "tent".into())]).unwrap();
    let mut left: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    let mut want: Vec<String> = keep.iter().cloned().chain(["s.safetensors".to_string()]).collect();
    want.sort();
    assert_eq!(left, want, "only the dead saves' temporaries of this path go");
    assert_eq!(state::load_state(&target, "fp").unwrap().tensors, t);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn replay_load_state_reports_refused_states() {
    // `acclimate replay --load-state` with a non-finite state and with another method's state:
    // one error line naming the tensor (or both methods), a non-zero exit that is not a panic,
    // and no record written.
    let fx = common::repo_root().join("tests/fixtures/tta/tiny_tent_adam");
    let dir = state_dir("cli");
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let run = |extra: &[String]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_acclimate"));
        cmd.arg("replay").arg(fx.join("model.onnx")).arg("--config").arg(fx.join("config.toml"));
        cmd.arg("--batches").arg(fx.join("batches")).args(extra).env_remove("RUST_LOG");
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            cmd.env("XDG_RUNTIME_DIR", &dir);
        }
        cmd.output().unwrap()
    };
    let state = dir.join("state.safetensors");
    let o = run(&["--out".into(), s(&dir.join("out.json")), "--save-state".into(), s(&state)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let nan = dir.join("nan.safetensors");
    let mut poisoned = String::new();
    state_rewrite(&state, &nan, |t, _| {
        let (name, (_, data)) = t.iter_mut().next().unwrap();
        poisoned = name.clone();
        data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let other = dir.join("other.safetensors");
    state_rewrite(&state, &other, |_, meta| {
        meta.insert("method".into(), "eata".into());
    });
    for (bad, want) in [(&nan, vec![poisoned.as_str(), "1 non-finite"]), (&other, vec!["'eata'", "'tent'"])] {
        let out = dir.join("refused.json");
        let o = run(&["--out".into(), s(&out), "--load-state".into(), s(bad)]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success() && o.status.code() != Some(101), "{}: {:?}\n{err}", bad.display(), o.status);
        assert_eq!(err.lines().count(), 1, "one error line expected:\n{err}");
        assert!(want.iter().all(|w| err.contains(w)), "{}: {err}", bad.display());
        assert!(!out.exists(), "a refused state must not produce a record");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Adam's m and v moved into one buffer (`opt:m:<p>` = [m, v]) to fit phone GPUs' 4 storage
/// buffers; a state saved before that (separate `opt:m:<p>` and `opt:v:<p>`) was then written
/// half into the packed buffer, v left stale: silently wrong. It must load exactly as the same
/// state saved in the new layout.
#[gpu_test]
fn adam_state_saved_with_separate_moments_loads_exactly(ctx: acclimate::GpuContext) {
    use acclimate::adapt::state;
    let dir = state_dir("adam-split");
    let mut a = state_session(&ctx, "tent");
    a.step(&state_digits(0, 8)).unwrap();
    a.step(&state_digits(8, 8)).unwrap();
    let new = dir.join("new.safetensors");
    a.save_state(&new).unwrap();
    // The same state in the old layout.
    let fp = state::fingerprint(&a.model().graph);
    let loaded = state::load_state(&new, &fp).unwrap();
    let mut old_tensors = Vec::new();
    let mut split = 0;
    for (name, t) in loaded.tensors {
        match name.strip_prefix("opt:m:") {
            Some(p) => {
                let d = t.to_f32_vec();
                let n = d.len() / 2;
                old_tensors.push((name.clone(), acclimate::Tensor::f32(vec![n], d[..n].to_vec())));
                old_tensors.push((format!("opt:v:{p}"), acclimate::Tensor::f32(vec![n], d[n..].to_vec())));
                split += 1;
            }
            None => old_tensors.push((name, t)),
        }
    }
    assert!(split > 0, "the Adam state has no moments");
    let old = dir.join("old.safetensors");
    let meta = vec![("method".to_string(), "tent".to_string()), ("steps_taken".to_string(), "2".to_string())];
    state::save_state(&old, &fp, &old_tensors, &meta).unwrap();
    let x = state_digits(16, 8);
    let mut b_new = state_session(&ctx, "tent");
    b_new.load_state(&new).unwrap();
    let mut b_old = state_session(&ctx, "tent");
    // A session that already ran (its packed buffer exists) and a fresh one both load it.
    b_old.step(&state_digits(24, 8)).unwrap();
    b_old.load_state(&old).unwrap();
    let (pn, po) = (b_new.step(&x).unwrap(), b_old.step(&x).unwrap());
    assert_eq!(pn.logits.to_f32_vec(), po.logits.to_f32_vec());
    let (qn, qo) = (b_new.parameters().unwrap(), b_old.parameters().unwrap());
    for ((n1, t1), (_, t2)) in qn.iter().zip(&qo) {
        assert_eq!(t1.to_f32_vec(), t2.to_f32_vec(), "{n1} after a step from the old-layout state");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
