//! The C test suite: the programs in `tests/c/` and `examples/c/classify.c`, compiled with gcc
//! (`-Wall -Wextra -Werror -pthread`) against the checked-in `include/acclimate.h` and the
//! shared library built from this crate, run on the small models in `assets/`, and judged by
//! their exit code and their last line, `N passed, M failed` (at least as many checks as each
//! program makes today, so none can pass by running nothing).
//!
//! Which library: `cargo test -p acclimate-ffi` builds the package's library with every crate
//! type it declares (cdylib, staticlib, rlib) in one compilation before it builds and runs this
//! test, and writes them to the same `deps/` directory as this test's executable. The
//! `libacclimate_ffi.so` next to `current_exe()` is therefore the one built from the sources
//! under test, in the same profile. `target/<profile>/libacclimate_ffi.so` is only a fallback
//! (a `cargo build` leaves it there; it can be stale). The test never runs `cargo build` itself:
//! the outer `cargo test` holds the build directory's lock.
//!
//! The programs run the real kernels on the GPU (lavapipe here) and fail when there is no
//! adapter, unless `ACCLIMATE_ALLOW_NO_GPU=1` opts out: then they are still compiled and linked.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn assets() -> PathBuf {
    std::env::var_os("ACCLIMATE_ASSETS").map(PathBuf::from).unwrap_or_else(|| crate_dir().join("../assets"))
}

fn asset(name: &str) -> PathBuf {
    let p = assets().join(name);
    assert!(p.is_file(), "missing asset {} — run `bash tools/setup.sh` first", p.display());
    p
}

/// The directory of the freshly built shared library (see the module comment).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let deps = exe.parent().expect("the test executable lies in a directory").to_path_buf();
    let name = format!("{}acclimate_ffi{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    let candidates = [deps.clone(), deps.parent().map(Path::to_path_buf).unwrap_or_else(|| deps.clone())];
    candidates.iter().find(|d| d.join(&name).is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "{name} is not in {} or its parent: run this test through `cargo test -p acclimate-ffi`, which builds it",
            deps.display()
        )
    })
}

/// A fresh directory for one program's binary and files.
fn work_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("c-suite").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("the target directory is writable");
    d
}

/// Compiles `sources` into `out`, linked against the library; panics with gcc's messages.
fn compile(sources: &[PathBuf], out: &Path) {
    let lib = lib_dir();
    let cc = std::env::var("CC").unwrap_or_else(|_| "gcc".into());
    let output = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pthread"])
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg("-I")
        .arg(crate_dir().join("tests/c"))
        .args(sources)
        .arg("-o")
        .arg(out)
        .arg("-L")
        .arg(&lib)
        .arg("-lacclimate_ffi")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lm")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cc} (the C suite needs a C compiler): {e}"));
    assert!(
        output.status.success(),
        "{cc} failed on {sources:?}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Whether the GPU programs should run: an adapter is there, or the run opted out explicitly.
fn gpu_available() -> bool {
    match acclimate::GpuContext::new() {
        Ok(_) => true,
        Err(e) if std::env::var("ACCLIMATE_ALLOW_NO_GPU").as_deref() == Ok("1") => {
            eprintln!("SKIPPED running the C programs (ACCLIMATE_ALLOW_NO_GPU=1): {e}");
            false
        }
        Err(e) => panic!("{e}\n(set ACCLIMATE_ALLOW_NO_GPU=1 to skip GPU tests explicitly)"),
    }
}

/// Runs `exe` with `args` (at most `limit`), returns its exit success and output.
fn run(exe: &Path, args: &[PathBuf], dir: &Path, limit: Duration) -> (bool, String) {
    let log = dir.join("output.txt");
    let file = File::create(&log).expect("the log file can be created");
    let lib = lib_dir();
    let library_path = match std::env::var_os("LD_LIBRARY_PATH") {
        Some(old) => format!("{}:{}", lib.display(), old.to_string_lossy()),
        None => lib.display().to_string(),
    };
    let mut child = Command::new(exe)
        .args(args)
        .env("LD_LIBRARY_PATH", library_path)
        .stdout(Stdio::from(file.try_clone().expect("the log file can be shared")))
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting on the program") {
            break Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut output = std::fs::read_to_string(&log).unwrap_or_default();
    if status.is_none() {
        output.push_str(&format!("\n(killed after {limit:?})\n"));
    }
    (status.is_some_and(|s| s.success()), output)
}

/// Compiles `tests/c/<name>.c`, runs it and checks its verdict line.
fn c_program(name: &str, args: &[PathBuf], min_passed: usize) {
    let dir = work_dir(name);
    let exe = dir.join(name);
    compile(&[crate_dir().join(format!("tests/c/{name}.c"))], &exe);
    if !gpu_available() {
        return;
    }
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    let args: Vec<PathBuf> =
        args.iter().map(|a| if a.as_os_str() == "SCRATCH" { scratch.clone() } else { a.clone() }).collect();
    let (ok, output) = run(&exe, &args, &dir, Duration::from_secs(600));
    println!("{output}");
    let verdict = output.lines().rev().find(|l| l.ends_with(" failed")).unwrap_or("(no verdict line)");
    let counts: Vec<usize> = verdict.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
    assert!(ok, "{name} failed: {verdict}\n{output}");
    assert!(
        counts.len() == 2 && counts[1] == 0 && counts[0] >= min_passed,
        "{name}: verdict '{verdict}', expected at least {min_passed} passed and 0 failed"
    );
}

#[test]
fn c_whole_abi() {
    c_program("test_abi", &[asset("svhn.onnx")], 57);
}

#[test]
fn c_every_pixel_format_with_padded_strides() {
    c_program("test_formats", &[asset("svhn.onnx")], 21);
}

#[test]
fn c_errors_name_the_problem_and_the_session_goes_on() {
    c_program("test_errors", &[asset("svhn.onnx"), PathBuf::from("SCRATCH")], 175);
}

#[test]
fn c_state_round_trip_and_refused_states() {
    c_program("test_state", &[asset("svhn.onnx"), PathBuf::from("SCRATCH"), asset("mnist.onnx")], 10);
}

#[test]
fn c_two_sessions_on_two_threads() {
    c_program("test_threads", &[asset("svhn.onnx")], 8);
}

/// The README's example builds as its comment says, and runs.
#[test]
fn c_example_classify_builds_and_runs() {
    let dir = work_dir("classify");
    let exe = dir.join("classify");
    compile(&[crate_dir().join("../examples/c/classify.c")], &exe);
    if !gpu_available() {
        return;
    }
    let (ok, output) = run(&exe, &[asset("svhn.onnx")], &dir, Duration::from_secs(300));
    println!("{output}");
    assert!(ok && output.contains("frame 7: class") && output.contains("gradient step"), "classify:\n{output}");
}

/// The header stands alone in C99 and C++ (its `extern "C"` guard), with every warning on.
#[test]
fn header_compiles_alone_in_c_and_cxx() {
    let dir = work_dir("header");
    let src = dir.join("include_only.c");
    std::fs::write(&src, "#include \"acclimate.h\"\nint main(void) { return ACCLIMATE_MAX_TOP_K == 5 ? 0 : 1; }\n")
        .expect("write the probe");
    for (compiler, std) in [("gcc", "-std=c99"), ("g++", "-std=c++11")] {
        let lang = if compiler == "g++" { vec!["-x", "c++"] } else { vec![] };
        let out = match Command::new(compiler)
            .args(["-fsyntax-only", std, "-Wall", "-Wextra", "-Werror", "-pedantic"])
            .args(&lang)
            .arg("-I")
            .arg(crate_dir().join("include"))
            .arg(&src)
            .output()
        {
            Ok(o) => o,
            Err(_) if compiler == "g++" => {
                eprintln!("no g++: the C++ check of the header is skipped");
                continue;
            }
            Err(e) => panic!("cannot run {compiler}: {e}"),
        };
        assert!(out.status.success(), "{compiler} {std}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
