//! `acclimate replay` from the command line: the JSON record, saving and loading state, and
//! one-line errors.

mod common;

use std::process::Command;

fn acclimate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_acclimate"));
    let xdg = std::env::temp_dir().join(format!("acclimate-xdg-{}", std::process::id()));
    std::fs::create_dir_all(&xdg).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    c.env("XDG_RUNTIME_DIR", xdg);
    c
}

#[test]
fn replay_writes_the_record_and_round_trips_state() {
    let Some(_ctx) = common::gpu() else { return };
    let fx = common::repo_root().join("tests/fixtures/tta/tiny_tent_adam");
    let dir = std::env::temp_dir().join(format!("acclimate-cli-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (out, state) = (dir.join("out.json"), dir.join("state.safetensors"));
    let run = |extra: &[&str], out: &std::path::Path| {
        let mut c = acclimate();
        c.arg("replay")
            .arg(fx.join("model.onnx"))
            .arg("--config")
            .arg(fx.join("config.toml"))
            .arg("--batches")
            .arg(fx.join("batches"))
            .arg("--out")
            .arg(out);
        c.args(extra);
        c.output().unwrap()
    };
    let o = run(&["--save-state", state.to_str().unwrap()], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("expected.json")).unwrap()).unwrap();
    assert_eq!(log["steps"].as_array().unwrap().len(), 3);
    let (a, b) = (log["steps"][2]["loss"].as_f64().unwrap(), want["steps"][2]["loss"].as_f64().unwrap());
    assert!((a - b).abs() <= 1e-4 * b.abs(), "loss {a} vs reference {b}");
    assert!(state.exists());

    // Resuming from the saved state continues the trajectory: the first loss now differs from a
    // fresh start's.
    let out2 = dir.join("out2.json");
    let o = run(&["--load-state", state.to_str().unwrap()], &out2);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log2: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out2).unwrap()).unwrap();
    assert_ne!(log2["steps"][0]["loss"], log["steps"][0]["loss"]);

    // A truncated state file: non-zero exit, one line on stderr, no output written.
    let bytes = std::fs::read(&state).unwrap();
    let bad = dir.join("bad.safetensors");
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    let out3 = dir.join("out3.json");
    let o = run(&["--load-state", bad.to_str().unwrap()], &out3);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("error:"), "{err}");
    assert!(!out3.exists());

    // A config with an unknown key is refused with the key named.
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[adapt]\nmethod = \"tent\"\nlearning_rate = 1\n").unwrap();
    let o = acclimate()
        .args(["replay", fx.join("model.onnx").to_str().unwrap(), "--config", cfg.to_str().unwrap(), "--batches"])
        .arg(fx.join("batches"))
        .args(["--out", out3.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("learning_rate"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
