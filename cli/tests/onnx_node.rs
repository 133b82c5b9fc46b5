//! The official ONNX node tests (from the `onnx==1.22.0` wheel, copied to `assets/onnx-node` by
//! `tools/setup.sh`) for every supported op, selected by `tests/onnx_node_manifest.txt`.
//!
//! Node tests pass weights as graph inputs; as the ONNX backend runners do, every input after the
//! first `runtime=N` ones is frozen into an initializer. The run fails when a pattern matches no
//! case or fewer cases than the manifest's `min_cases` are found, so a moved or emptied test
//! directory cannot pass silently.

mod common;

use std::path::{Path, PathBuf};

use acclimate::ir::Graph;
use acclimate::onnx::{self, proto};
use acclimate::{Engine, Model, Tensor};
use prost::Message;

struct Pattern {
    glob: String,
    runtime: usize,
}

fn glob_match(p: &str, s: &str) -> bool {
    // '*' matches any run of characters; everything else literally; anchored at both ends.
    let parts: Vec<&str> = p.split('*').collect();
    if parts.len() == 1 {
        return p == s;
    }
    let mut rest = s;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            if !rest.starts_with(part) {
                return false;
            }
            rest = &rest[part.len()..];
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else if let Some(pos) = rest.find(part) {
            rest = &rest[pos + part.len()..];
        } else {
            return false;
        }
    }
    true
}

fn manifest() -> (usize, Vec<Pattern>) {
    let path = common::repo_root().join("tests/onnx_node_manifest.txt");
    let text = std::fs::read_to_string(&path).expect("manifest");
    let mut min = 0;
    let mut pats = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        let mut it = line.split_whitespace();
        let first = it.next().unwrap();
        if first == "min_cases" {
            min = it.next().unwrap().parse().unwrap();
            continue;
        }
        let mut runtime = 1;
        for flag in it {
            if let Some(v) = flag.strip_prefix("runtime=") {
                runtime = v.parse().unwrap();
            } else {
                panic!("unknown manifest flag {flag}");
            }
        }
        pats.push(Pattern { glob: first.to_string(), runtime });
    }
    (min, pats)
}

fn read_pb(path: &Path) -> Tensor {
    let bytes = std::fs::read(path).unwrap();
    let t = proto::TensorProto::decode(bytes.as_slice()).unwrap();
    onnx::tensor_from_proto(&t, None).unwrap()
}

fn run_case(ctx: &acclimate::GpuContext, dir: &Path, runtime: usize) -> Result<(), String> {
    let mut raw = onnx::load_model(&dir.join("model.onnx")).map_err(|e| e.to_string())?;
    let data = dir.join("test_data_set_0");
    let mut inputs = Vec::new();
    let mut i = 0;
    while data.join(format!("input_{i}.pb")).exists() {
        inputs.push(read_pb(&data.join(format!("input_{i}.pb"))));
        i += 1;
    }
    let mut expected = Vec::new();
    let mut i = 0;
    while data.join(format!("output_{i}.pb")).exists() {
        expected.push(read_pb(&data.join(format!("output_{i}.pb"))));
        i += 1;
    }
    // Freeze inputs beyond the first `runtime` (and every non-float input) as initializers.
    let names: Vec<String> = raw.graph.inputs.iter().map(|v| v.name.clone()).collect();
    let mut feed = Vec::new();
    let mut keep = Vec::new();
    for (k, (name, t)) in names.iter().zip(inputs).enumerate() {
        if k < runtime && t.dtype == acclimate::DType::F32 {
            keep.push(name.clone());
            feed.push(t);
        } else {
            raw.graph.initializers.push((name.clone(), t));
        }
    }
    raw.graph.inputs.retain(|v| keep.contains(&v.name));
    let graph = Graph::from_raw(raw).map_err(|e| e.to_string())?;
    let mut engine = Engine::new(ctx, Model::from_graph(graph));
    let outs = engine.run(&feed).map_err(|e| e.to_string())?;
    for (k, (got, want)) in outs.iter().zip(&expected).enumerate() {
        if got.shape != want.shape {
            return Err(format!("output {k}: shape {:?}, expected {:?}", got.shape, want.shape));
        }
        let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
        for (j, (a, b)) in g.iter().zip(&w).enumerate() {
            // The ONNX backend test tolerance (rtol 1e-3, atol 1e-7), NaN only matching NaN.
            let ok = if b.is_nan() { a.is_nan() } else { a == b || (a - b).abs() <= 1e-7 + 1e-3 * b.abs() };
            if !ok {
                return Err(format!("output {k}[{j}]: got {a}, expected {b}"));
            }
        }
    }
    if outs.len() < expected.len() {
        return Err(format!("{} outputs, expected {}", outs.len(), expected.len()));
    }
    Ok(())
}

#[test]
fn onnx_node_tests() {
    let root: PathBuf = common::asset("onnx-node");
    let (min, patterns) = manifest();
    let mut cases: Vec<(String, usize)> = Vec::new();
    let mut dirs: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("model.onnx").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    for p in &patterns {
        let matched: Vec<&String> = dirs.iter().filter(|d| glob_match(&p.glob, d)).collect();
        assert!(!matched.is_empty(), "manifest pattern '{}' matched no test case under {}", p.glob, root.display());
        for d in matched {
            // A case listed twice with different run-time inputs runs both ways.
            if !cases.iter().any(|(c, r)| c == d && *r == p.runtime) {
                cases.push((d.clone(), p.runtime));
            }
        }
    }
    assert!(cases.len() >= min, "found {} node test cases, the manifest expects at least {min}", cases.len());
    let Some(ctx) = common::gpu() else { return };
    let filter = std::env::var("ACCLIMATE_NODE_FILTER").ok();
    let mut failures = Vec::new();
    let mut ran = 0;
    for (name, runtime) in &cases {
        if let Some(f) = &filter
            && !name.contains(f.as_str())
        {
            continue;
        }
        ran += 1;
        if let Err(e) = run_case(&ctx, &root.join(name), *runtime) {
            failures.push(format!("{name}: {e}"));
        }
    }
    eprintln!("ONNX node tests: {ran} run, {} failed", failures.len());
    assert!(failures.is_empty(), "{} of {ran} node tests failed:\n{}", failures.len(), failures.join("\n"));
}
