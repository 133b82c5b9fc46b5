//! `acclimate-fuzz`: a stable-Rust fuzzing driver (tools/fuzz.sh runs it).
//!
//! ```text
//! acclimate-fuzz [--target loader|frame|config|all] [--execs N] [--seconds S] [--seed N]
//!                [--timeout S] [--artifacts DIR]
//! acclimate-fuzz --target T --replay FILE        # run one saved input in this process
//! acclimate-fuzz --target T --seed N --exec I    # regenerate and run execution I of seed N
//! ```
//!
//! The supervisor runs the executions in a worker process (this binary with `--worker`), which
//! announces each execution's index on its stdout before running it and catches panics with
//! `catch_unwind`. Because every input is a pure function of `(seed, index)`, the supervisor can
//! rebuild whichever input a worker was on when it
//! - panicked (reported by the worker, which goes on),
//! - stopped answering for `--timeout` seconds (a hang: the worker is killed),
//! - died (a crash: a signal, an abort, a stack overflow, an out-of-memory kill),
//!
//! save it under `fuzz-artifacts/<target>/` with its seed and index, and start a new worker
//! after it. At the end each target prints
//! `loader: 100000 executions, 0 panics, 0 hangs, 0 crashes (…)`; the exit status is 1 if any
//! target had a finding.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use acclimate_fuzz::{Kind, Target, repo_root};

struct Args {
    targets: Vec<Kind>,
    execs: Option<u64>,
    seconds: Option<f64>,
    seed: u64,
    timeout: f64,
    artifacts: PathBuf,
    replay: Option<PathBuf>,
    exec: Option<u64>,
    worker: Option<(PathBuf, u64, u64)>,
}

fn usage() -> ! {
    eprintln!(
        "usage: acclimate-fuzz [--target loader|frame|config|all] [--execs N] [--seconds S] [--seed N] \
         [--timeout S] [--artifacts DIR] [--replay FILE | --exec I]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        targets: Kind::ALL.to_vec(),
        execs: None,
        seconds: None,
        seed: 1,
        timeout: 10.0,
        artifacts: PathBuf::from("fuzz-artifacts"),
        replay: None,
        exec: None,
        worker: None,
    };
    let mut it = std::env::args().skip(1);
    let mut work = None;
    let (mut from, mut to) = (0, u64::MAX);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        let num = |s: String| s.parse::<u64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--target" => {
                let v = val();
                a.targets =
                    if v == "all" { Kind::ALL.to_vec() } else { vec![Kind::parse(&v).unwrap_or_else(|| usage())] };
            }
            "--execs" => a.execs = Some(num(val())),
            "--seconds" => a.seconds = Some(val().parse().unwrap_or_else(|_| usage())),
            "--seed" => a.seed = num(val()),
            "--timeout" => a.timeout = val().parse().unwrap_or_else(|_| usage()),
            "--artifacts" => a.artifacts = PathBuf::from(val()),
            "--replay" => a.replay = Some(PathBuf::from(val())),
            "--exec" => a.exec = Some(num(val())),
            "--worker" => work = Some(PathBuf::from(val())),
            "--from" => from = num(val()),
            "--to" => to = num(val()),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    if a.execs.is_none() && a.seconds.is_none() {
        a.execs = Some(10_000);
    }
    a.worker = work.map(|w| (w, from, to));
    a
}

fn main() -> ExitCode {
    let args = parse_args();
    if let Some((work, from, to)) = &args.worker {
        return worker(args.targets[0], &work.clone(), args.seed, *from, *to);
    }
    let work = std::env::temp_dir().join(format!("acclimate-fuzz-{}", std::process::id()));
    let result =
        if args.replay.is_some() || args.exec.is_some() { replay(&args, &work) } else { supervise(&args, &work) };
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Runs one input in this process, panics and all (for a debugger or a backtrace).
fn replay(args: &Args, work: &Path) -> ExitCode {
    let kind = args.targets[0];
    let target = match Target::new(kind, &repo_root(), work) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: {e}", kind.name());
            return ExitCode::from(2);
        }
    };
    let input = match (&args.replay, args.exec) {
        (Some(p), _) => std::fs::read(p).unwrap_or_else(|e| {
            eprintln!("cannot read {}: {e}", p.display());
            std::process::exit(2)
        }),
        (None, Some(i)) => target.input(args.seed, i),
        (None, None) => usage(),
    };
    let start = Instant::now();
    let depth = target.execute(&input);
    let reached = if depth == 0 { "refused" } else { target.depths()[depth - 1] };
    println!(
        "{}: {} bytes ran without a panic in {:.3} s ({reached})",
        kind.name(),
        input.len(),
        start.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}

static PANIC_MESSAGE: Mutex<String> = Mutex::new(String::new());

/// Inputs saved per distinct finding (kind and panic location).
const ARTIFACTS_PER_LOCATION: u32 = 3;

/// The worker: announces `s <i>` before execution i, reports `p <i> <message>` for a panic and
/// `d` when its range is done.
fn worker(kind: Kind, work: &Path, seed: u64, from: u64, to: u64) -> ExitCode {
    let target = match Target::new(kind, &repo_root(), work) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: {e}", kind.name());
            return ExitCode::from(2);
        }
    };
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into());
        if let Ok(mut m) = PANIC_MESSAGE.lock() {
            *m = format!("{msg}{at}").replace('\n', " | ");
        }
    }));
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // How many executions reached each depth; sent along with every announcement.
    let mut reached = [0u64; 4];
    for i in from..to {
        let counts = reached.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
        if writeln!(out, "s {i} {counts}").and_then(|_| out.flush()).is_err() {
            return ExitCode::SUCCESS; // the supervisor is gone
        }
        let input = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target.input(seed, i))) {
            Ok(input) => input,
            Err(_) => {
                let msg = PANIC_MESSAGE.lock().map(|m| m.clone()).unwrap_or_default();
                let _ = writeln!(out, "e {i} {msg}");
                return ExitCode::from(3);
            }
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target.execute(&input))) {
            Ok(depth) => {
                for r in reached.iter_mut().take(depth.min(4)) {
                    *r += 1;
                }
            }
            Err(_) => {
                let msg = PANIC_MESSAGE.lock().map(|m| m.clone()).unwrap_or_default();
                let _ = writeln!(out, "p {i} {msg}");
            }
        }
    }
    let counts = reached.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
    let _ = writeln!(out, "d 0 {counts}");
    ExitCode::SUCCESS
}

#[derive(Default)]
struct Counts {
    executions: u64,
    panics: u64,
    hangs: u64,
    crashes: u64,
    /// Executions that got to each depth (finished workers, plus the current one's last report).
    reached: [u64; 4],
}

/// The cumulative depth counts a worker's `s`/`d` line carries.
fn parse_reached(s: &str) -> [u64; 4] {
    let mut r = [0u64; 4];
    for (slot, v) in r.iter_mut().zip(s.split(',')) {
        *slot = v.parse().unwrap_or(0);
    }
    r
}

/// What a worker said, or that it is gone.
enum Event {
    Line(String),
    Eof,
}

fn spawn_worker(
    kind: Kind,
    args: &Args,
    work: &Path,
    from: u64,
    to: u64,
) -> std::io::Result<(Child, mpsc::Receiver<Event>)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--worker", &work.to_string_lossy(), "--target", kind.name()])
        .args(["--seed", &args.seed.to_string(), "--from", &from.to_string(), "--to", &to.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| std::io::Error::other("no worker stdout"))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) => {
                    if tx.send(Event::Line(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(Event::Eof);
    });
    Ok((child, rx))
}

fn supervise(args: &Args, work: &Path) -> ExitCode {
    let mut failed = false;
    for &kind in &args.targets {
        // The supervisor's own copy of the target: it regenerates the inputs to save.
        let target = match Target::new(kind, &repo_root(), &work.join("supervisor")) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{}: {e}", kind.name());
                return ExitCode::from(2);
            }
        };
        let c = match run_target(kind, &target, args, &work.join(kind.name())) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}: {e}", kind.name());
                return ExitCode::from(2);
            }
        };
        failed |= c.panics + c.hangs + c.crashes > 0;
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn run_target(kind: Kind, target: &Target, args: &Args, work: &Path) -> Result<Counts, String> {
    let start = Instant::now();
    let deadline = args.seconds.map(|s| start + Duration::from_secs_f64(s));
    let end = args.execs.unwrap_or(u64::MAX);
    let timeout = Duration::from_secs_f64(args.timeout);
    let mut c = Counts::default();
    let mut next = 0u64;
    // One bug found thousands of times would bury the others: artifacts are kept for the first
    // few inputs per panic location (the message's "at file:line"), all are counted.
    let mut seen: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    let mut save = |what: &str, i: u64, detail: &str| {
        let place = detail.rsplit(" at ").next().unwrap_or(detail).to_string();
        let n = seen.entry(format!("{what} {place}")).or_insert(0);
        *n += 1;
        if *n > ARTIFACTS_PER_LOCATION {
            return;
        }
        let dir = args.artifacts.join(kind.name());
        let stem = dir.join(format!("{what}-seed{}-exec{i}", args.seed));
        let input = target.input(args.seed, i);
        let saved = std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::write(stem.with_extension("bin"), &input))
            .and_then(|_| {
                std::fs::write(
                    stem.with_extension("txt"),
                    format!(
                        "{what} in target {} at seed {} execution {i}: {detail}\nreproduce: acclimate-fuzz --target {} \
                         --replay {}\n",
                        kind.name(),
                        args.seed,
                        kind.name(),
                        stem.with_extension("bin").display()
                    ),
                )
            });
        match saved {
            Ok(()) => eprintln!(
                "{}: {what} at seed {} exec {i}: {detail}\n  saved {}",
                kind.name(),
                args.seed,
                stem.with_extension("bin").display()
            ),
            Err(e) => eprintln!(
                "{}: {what} at seed {} exec {i}: {detail}\n  (cannot save the input: {e})",
                kind.name(),
                args.seed
            ),
        }
    };
    'workers: while next < end {
        let (mut child, rx) =
            spawn_worker(kind, args, work, next, end).map_err(|e| format!("cannot start a worker: {e}"))?;
        let mut current: Option<u64> = None;
        // This worker's depth counts so far; added to the totals when it ends, however it ends.
        let mut worker_reached = [0u64; 4];
        let add = |c: &mut Counts, r: &[u64; 4]| c.reached.iter_mut().zip(r).for_each(|(t, n)| *t += n);
        loop {
            let wait = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) => left.min(timeout),
                    None => {
                        // Time is up: the execution under way does not count.
                        let _ = child.kill();
                        let _ = child.wait();
                        add(&mut c, &worker_reached);
                        break 'workers;
                    }
                },
                None => timeout,
            };
            match rx.recv_timeout(wait) {
                Ok(Event::Line(l)) => {
                    let mut parts = l.splitn(3, ' ');
                    let tag = parts.next().unwrap_or("");
                    let i = parts.next().and_then(|s| s.parse::<u64>().ok());
                    let detail = parts.next().unwrap_or("");
                    match (tag, i) {
                        ("s", Some(i)) => {
                            if current.is_some() {
                                c.executions += 1;
                            }
                            current = Some(i);
                            worker_reached = parse_reached(detail);
                        }
                        ("p", Some(i)) => {
                            c.panics += 1;
                            save("panic", i, detail);
                        }
                        ("e", Some(i)) => {
                            let _ = child.wait();
                            return Err(format!("the input generator panicked at exec {i}: {detail}"));
                        }
                        ("d", _) => {
                            if current.is_some() {
                                c.executions += 1;
                            }
                            add(&mut c, &parse_reached(detail));
                            let _ = child.wait();
                            break 'workers;
                        }
                        _ => {}
                    }
                }
                Ok(Event::Eof) => {
                    let status = child.wait().map_err(|e| e.to_string())?;
                    let Some(i) = current else {
                        return Err(format!("the worker exited before its first execution ({status})"));
                    };
                    c.executions += 1;
                    c.crashes += 1;
                    add(&mut c, &worker_reached);
                    save("crash", i, &format!("the worker process died: {status}"));
                    next = i + 1;
                    continue 'workers;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        continue; // handled at the top of the loop
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    let Some(i) = current else {
                        return Err(format!("the worker did not start within {:.0} s", args.timeout));
                    };
                    c.executions += 1;
                    c.hangs += 1;
                    add(&mut c, &worker_reached);
                    save("hang", i, &format!("no answer within {:.1} s", args.timeout));
                    next = i + 1;
                    continue 'workers;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = child.wait();
                    add(&mut c, &worker_reached);
                    break 'workers;
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let depth =
        target.depths().iter().zip(c.reached).map(|(name, n)| format!("{name} {n}")).collect::<Vec<_>>().join(", ");
    println!(
        "{}: {} executions, {} panics, {} hangs, {} crashes ({secs:.1} s, {:.0} exec/s, seed {}{}; reached: {depth})",
        kind.name(),
        c.executions,
        c.panics,
        c.hangs,
        c.crashes,
        c.executions as f64 / secs.max(1e-9),
        args.seed,
        match target.seed_count() {
            0 => String::new(),
            n => format!(", {n} seed models"),
        }
    );
    Ok(c)
}
