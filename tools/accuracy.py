#!/usr/bin/env python3
"""Accuracy of the adaptation methods on the SVHN->MNIST shift (docs/accuracy.md).

The `ccexam` SVHN network (assets/svhn.onnx) sees the 10,000 MNIST test digits in batches of 64
in the stream's order (157 batches, the last one 16); each method's returned predictions (the
pre-update logits; LAME and label-shift correction: the argmax of the returned probabilities)
are scored against the labels. Four datasets, built by tools/corrupt_mnist.py: clean, Gaussian
noise 5, defocus blur 5, and a label-correlated order of the clean digits.

The accuracies come from the PyTorch reference (tools/tta_reference.py `run`); the Rust runtime
matches it per step to ~1e-6 (cli/tests/tta_reference.rs), and this script measures that
agreement on real data on a prefix of the clean stream (`--runtime-prefix`: the first 4
batches, 256 digits) or, given hours of software-GPU time, on everything (`--runtime-full`).

    /tmp/icvenv2/bin/python tools/corrupt_mnist.py                     # datasets -> assets/accuracy/
    nice -n 10 /tmp/torchenv/bin/python tools/accuracy.py --search     # the hyperparameter search (clean)
    nice -n 10 /tmp/torchenv/bin/python tools/accuracy.py --reference  # the tables (+ the search's best preset)
    nice -n 10 /tmp/torchenv/bin/python tools/accuracy.py --runtime-prefix   # needs target/release/acclimate
    /tmp/torchenv/bin/python tools/accuracy.py --report                # markdown tables from the cache
    nice -n 10 /tmp/torchenv/bin/python tools/accuracy.py --runtime-full     # every run on the runtime (hours)

Every run is cached in assets/accuracy/results/ under a hash of (dataset, config, batches), so
a step that is re-run only computes what is missing. Run-time files for the runtime go to
assets/accuracy/runtime/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "assets" / "accuracy"
RESULTS = DATA / "results"
RUNTIME = DATA / "runtime"
MODEL = ROOT / "assets" / "svhn.onnx"
# ACCLIMATE_BIN: a frozen copy of the binary, for long runs beside a rebuilding tree.
BINARY = Path(os.environ["ACCLIMATE_BIN"]) if os.environ.get("ACCLIMATE_BIN") else ROOT / "target" / "release" / "acclimate"
FISHER_DIR = DATA / "fisher"
# The full-set reference tables (the four sets of the first measurement).
DATASETS = ("clean", "gaussian_noise5", "defocus_blur5", "correlated")
# The runtime's grid: every row of the table, in the order they are run.
GRID_DATASETS = ("clean", "gaussian_noise3", "gaussian_noise5", "defocus_blur_c3", "defocus_blur_c5", "defocus_blur5", "mixed",
                 "correlated", "correlated001", "longtail")
# Sets whose whole-set numbers come from the reference only (the runtime's grid covers their first
# 1,024 digits: a grid row costs ~11 minutes of lavapipe here).
REFERENCE_ONLY = ("gaussian_noise3", "defocus_blur_c3", "defocus_blur5", "correlated001")
ALL_DATASETS = tuple(dict.fromkeys(DATASETS + GRID_DATASETS + REFERENCE_ONLY))
TITLES = {
    "clean": "Clean MNIST (test-set order)",
    "gaussian_noise5": "Gaussian noise, severity 5",
    "gaussian_noise3": "Gaussian noise, severity 3",
    "defocus_blur5": "Defocus blur, severity 5 (ImageNet-C's radius 10)",
    "defocus_blur_c3": "Defocus blur, CIFAR-10-C severity 3 (radius 0.5)",
    "defocus_blur_c5": "Defocus blur, CIFAR-10-C severity 5 (radius 1.5)",
    "mixed": "Mixed domains (noise 3, blur c3, noise 5, blur c5; switching every 128 digits)",
    "correlated": "Label-correlated order (Dirichlet, δ = 0.1)",
    "correlated001": "Label-correlated order (Dirichlet, δ = 0.01)",
    "longtail": "Long-tailed label shift (imbalance 100, 2,460 digits, shuffled)",
}
# Batches of the runtime grid: the first 1,024 digits of every set.
GRID_BATCHES = 16
BATCH = 64
PREFIX_BATCHES = 4
CLASSES = 10
E0 = 0.4 * math.log(CLASSES)  # EATA/SAR's 0.4·ln C
# Published SVHN->MNIST TENT result: 45 % less error than the source model (relative).
TARGET_REDUCTION = 0.45
# Steps of the reference kept in the cache for the runtime comparison.
KEEP_LOGITS = PREFIX_BATCHES


# ----------------------------------------------------------------------------- presets

def _cfg(method, kind="adam", lr=1e-3, **sections):
    """A full config (every key spelled out, as the runtime's TOML) for `method`."""
    from tta_reference import config
    c = config(method, kind=kind, lr=lr, momentum=0.9 if kind == "sgd" else 0.0)
    for name, body in sections.items():
        c[name] = dict(body)
    return c


def eata_section(d_margin=0.4, fisher_alpha=0.0, e_margin=E0):
    s = {"e_margin": e_margin, "d_margin": d_margin, "fisher_alpha": fisher_alpha}
    if fisher_alpha > 0:
        s["fisher_batches"] = str(FISHER_DIR)
    return s


# SAR's reset threshold e0 = 0.2 is an entropy on ImageNet's scale (ln 1000); with 10 classes the
# filtered second-pass entropy starts below 0.2 and the model resets on every batch (measured: 157
# resets in 157 batches), so the threshold is scaled like E0: 0.2·ln 10 / ln 1000.
SAR_RESET = 0.2 * math.log(CLASSES) / math.log(1000)
SAR_DEFAULT = {"e_margin": E0, "rho": 0.05, "reset_threshold": SAR_RESET, "reset_clears_ema": False}
LAME_DEFAULT = {"affinity": "rbf", "knn": 5, "lambda": 1.0, "max_steps": 100, "features": "auto"}
LABEL_SHIFT_EMA = {"mode": "ema", "momentum": 0.9}


def presets():
    """The tables' configs: tta-methods.md's defaults for a 10-class problem.

    Adam 1e-3 is the CIFAR-10-C preset of TENT, ETA/EATA (harness) and WoC (UniEnt); SAR's
    base optimizer is SGD (momentum 0.9) at the harness's CIFAR lr 1e-3. E0 = 0.4·ln 10,
    d_margin = 0.4 and fisher_alpha = 1 are EATA's CIFAR-10 values; the Fisher comes from 2000
    clean MNIST training digits (tools/corrupt_mnist.py). LAME: the released code's rbf, k = 5,
    λ = 1, 100 iterations, on the input of the final Gemm."""
    return {
        "source": _cfg("source"),
        "norm": _cfg("norm"),
        "rbn": _cfg("rbn"),
        "tent": _cfg("tent"),
        "eta": _cfg("eta", eata=eata_section()),
        "eata": _cfg("eata", eata=eata_section(fisher_alpha=1.0)),
        "sar": _cfg("sar", kind="sgd", lr=1e-3, sar=SAR_DEFAULT),
        "woc": _cfg("woc", woc={"lambda": 0.5}),
        "eata+woc": _cfg("eata+woc", eata=eata_section(fisher_alpha=1.0)),
        "lame": _cfg("lame", lame=LAME_DEFAULT),
        "source + label shift (ema)": _cfg("source", label_shift=LABEL_SHIFT_EMA),
    }


def search_grid():
    """The hyperparameter search (clean set): a few configs per gradient method around the
    presets: optimizer (Adam / SGD momentum 0.9), lr, and the filters' margins."""
    g = []
    for kind, lr in (("adam", 1e-3), ("adam", 1e-4), ("sgd", 1e-3), ("sgd", 1e-2)):
        g.append((f"tent {kind} {lr:g}", _cfg("tent", kind=kind, lr=lr)))
    # Larger steps after the first pass showed SGD 1e-2 ahead of Adam 1e-3 yet short of the target.
    g.append(("tent sgd 0.05", _cfg("tent", kind="sgd", lr=5e-2)))
    for kind, lr in (("adam", 1e-3), ("adam", 1e-4), ("adam", 5e-3), ("sgd", 1e-2), ("sgd", 3e-2), ("sgd", 1e-1)):
        g.append((f"eta {kind} {lr:g} d0.4", _cfg("eta", kind=kind, lr=lr, eata=eata_section())))
    g.append(("eta adam 0.001 d0.05", _cfg("eta", eata=eata_section(d_margin=0.05))))
    g.append(("eta adam 0.001 d1.0 (no redundancy filter)", _cfg("eta", eata=eata_section(d_margin=1.0))))
    g.append(("eta adam 0.001 d0.4 E0=0.6ln10", _cfg("eta", eata=eata_section(e_margin=0.6 * math.log(CLASSES)))))
    g.append(("eata adam 0.001 d0.4 β1", _cfg("eata", eata=eata_section(fisher_alpha=1.0))))
    g.append(("eata adam 0.001 d0.4 β2000", _cfg("eata", eata=eata_section(fisher_alpha=2000.0))))
    g.append(("eata sgd 0.01 d0.4 β1", _cfg("eata", kind="sgd", lr=1e-2, eata=eata_section(fisher_alpha=1.0))))
    for lr in (1e-3, 1e-2):
        g.append((f"sar sgd {lr:g} reset 0.2", _cfg("sar", kind="sgd", lr=lr, sar=SAR_DEFAULT | {"reset_threshold": 0.2})))
        g.append((f"sar sgd {lr:g} reset 0.067", _cfg("sar", kind="sgd", lr=lr, sar=SAR_DEFAULT)))
    g.append(("sar sgd 0.01 no reset", _cfg("sar", kind="sgd", lr=1e-2, sar=SAR_DEFAULT | {"reset_threshold": 0.0})))
    for kind, lr, lam in (("adam", 1e-3, 0.5), ("adam", 1e-4, 0.5), ("adam", 1e-3, 0.1), ("sgd", 1e-2, 0.5)):
        g.append((f"woc {kind} {lr:g} λ{lam:g}", _cfg("woc", kind=kind, lr=lr, woc={"lambda": lam})))
    g.append(("eata+woc adam 0.001 d0.4 β1", _cfg("eata+woc", eata=eata_section(fisher_alpha=1.0))))
    g.append(("eata+woc adam 0.001 d1.0 β1", _cfg("eata+woc", eata=eata_section(d_margin=1.0, fisher_alpha=1.0))))
    return g


# ----------------------------------------------------------------------------- data

def load(dataset):
    x, y = DATA / f"{dataset}.npy", DATA / f"{dataset}_labels.npy"
    if not (x.exists() and y.exists()):
        raise SystemExit(f"[accuracy] {x} is missing: build the datasets first "
                         f"(/tmp/icvenv2/bin/python tools/corrupt_mnist.py)")
    return np.load(x, mmap_mode="r"), np.load(y)


def batches_of(x, n=None):
    count = math.ceil(len(x) / BATCH) if n is None else n
    return [np.ascontiguousarray(x[i * BATCH:(i + 1) * BATCH], dtype=np.float32) for i in range(count)]


def summary(cfg):
    """A short human description of a config's key settings."""
    ad, o, m = cfg["adapt"], cfg["optimizer"], cfg["adapt"]["method"]
    parts = []
    from tta_reference import ADAPTING
    if m in ADAPTING:
        opt = f"Adam {o['lr']:g}" if o["kind"] == "adam" else f"SGD {o['lr']:g} m{o['momentum']:g}"
        parts.append(opt)
    if m == "norm":
        parts.append("batch statistics")
    if m == "rbn":
        parts.append(f"EMA stats α {ad['norm_momentum']:g}")
    if m in ("eta", "eata", "eata+woc"):
        e = cfg["eata"]
        parts.append(f"E0 {e['e_margin'] / math.log(CLASSES):.1f}·ln10, ε {e['d_margin']:g}")
        if m != "eta":
            parts.append(f"β {e['fisher_alpha']:g}")
    if m == "sar":
        s = cfg["sar"]
        parts.append(f"E0 0.4·ln10, ρ {s['rho']:g}, reset below {s['reset_threshold']:.3g}")
    if m == "woc":
        parts.append(f"λ {cfg['woc']['lambda']:g}")
    if m == "lame":
        la = cfg["lame"]
        where = "input of the final Gemm" if la["features"] == "auto" else la["features"]
        parts.append(f"{la['affinity']}, k {la['knn']}, λ {la['lambda']:g}, features: {where}")
    if "label_shift" in cfg and cfg["label_shift"]["mode"] != "none":
        parts.append(f"label shift {cfg['label_shift']['mode']} m {cfg['label_shift']['momentum']:g}")
    return ", ".join(parts) or "—"


# The reference's sources: a cached result is only reused while none of them changed (before,
# the key held the config alone, and whole-set numbers of an older reference were reported as
# the current one's).
REFERENCE_SOURCES = ("tta_reference.py", "auto_reference.py", "roid_reference.py", "onnx_torch.py", "tta_output.py",
                     "tta_losses.py")


def reference_version():
    h = hashlib.sha256()
    for name in REFERENCE_SOURCES:
        path = Path(__file__).resolve().parent / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"") + b"\0")
    return h.hexdigest()[:16]


def key(dataset, cfg, n_batches):
    blob = json.dumps({"dataset": dataset, "cfg": cfg, "n": n_batches, "batch": BATCH,
                       "reference": reference_version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def predictions(step):
    """A step's returned prediction: probabilities when the method returns them, else logits."""
    out = step.get("probs")
    if out is None:
        out = step["logits"]
    return np.asarray(out, dtype=np.float64).argmax(1)


# ----------------------------------------------------------------------------- reference

def reference(dataset, cfg, label="", n_batches=None, quiet=False):
    """Run the PyTorch reference over the dataset (cached); returns the result record."""
    x, y = load(dataset)
    n = math.ceil(len(x) / BATCH) if n_batches is None else n_batches
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{dataset}-{key(dataset, cfg, n)}.json"
    if path.exists():
        return json.loads(path.read_text())
    import torch
    from tta_reference import run
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t = time.time()
    if cfg["adapt"]["method"] == "auto":
        from auto_reference import run_auto
        out = run_auto(MODEL, cfg, batches_of(x, n))
    elif cfg["adapt"]["method"] == "roid":
        from roid_reference import run_roid
        out = run_roid(MODEL, cfg, batches_of(x, n))
    else:
        out = run(MODEL, cfg, batches_of(x, n))
    seconds = time.time() - t
    pred = np.concatenate([predictions(s) for s in out["steps"]])
    labels = y[:len(pred)]
    rec = {
        "dataset": dataset, "label": label, "config": cfg, "batches": n,
        "accuracy": float((pred == labels).mean()),
        "prefix_accuracy": float((pred[:PREFIX_BATCHES * BATCH] == labels[:PREFIX_BATCHES * BATCH]).mean()),
        "seconds": seconds, "torch": torch.__version__,
        "pred": pred.tolist(),
        "first_steps": [{k: s[k] for k in ("logits", "probs") if k in s} for s in out["steps"][:KEEP_LOGITS]],
        "resets": sum(1 for s in out["steps"] if s.get("reset")),
        "selected": (sum(len(s.get("selected", [])) for s in out["steps"])
                     if any("selected" in s for s in out["steps"]) else None),
    }
    path.write_text(json.dumps(rec))
    if not quiet:
        print(f"  {dataset:16s} {label:40s} {rec['accuracy'] * 100:6.2f} %  ({seconds:.0f} s)", flush=True)
    return rec


def best_preset():
    """The search entry whose clean accuracy is closest to the published relative error cut."""
    src = reference("clean", _cfg("source"), "source", quiet=True)
    target = 1 - (1 - src["accuracy"]) * (1 - TARGET_REDUCTION)
    best = None
    for label, cfg in search_grid():
        path = RESULTS / f"clean-{key('clean', cfg, math.ceil(10000 / BATCH))}.json"
        if not path.exists():
            continue
        acc = json.loads(path.read_text())["accuracy"]
        if best is None or abs(acc - target) < abs(best[2] - target):
            best = (label, cfg, acc)
    return best, target


def with_label_shift(cfg):
    c = json.loads(json.dumps(cfg))
    c["label_shift"] = dict(LABEL_SHIFT_EMA)
    return c


def table_configs():
    rows = list(presets().items())
    best, _ = best_preset()
    if best is not None:
        label, cfg, _ = best
        rows.append((f"best preset: {label}", cfg))
        rows.append((f"best preset + label shift (ema)", with_label_shift(cfg)))
    return rows


def run_reference(datasets):
    for d in datasets:
        print(f"[accuracy] {d}", flush=True)
        for label, cfg in table_configs():
            reference(d, cfg, label)


def run_search():
    print("[accuracy] search on clean", flush=True)
    for label, cfg in search_grid():
        reference("clean", cfg, label)
    best, target = best_preset()
    print(f"[accuracy] target {target * 100:.2f} %; closest: {best[0]} at {best[2] * 100:.2f} %")
    print(json.dumps(best[1], indent=1))


# ----------------------------------------------------------------------------- runtime

def runtime_config(cfg, fisher_file):
    """The reference's config for the runtime: the clean-batch Fisher is handed in as the file
    `acclimate fisher` made from the same batches (so it is computed once, not per method)."""
    c = json.loads(json.dumps(cfg))
    if "eata" in c and "fisher_batches" in c["eata"]:
        del c["eata"]["fisher_batches"]
        c["eata"]["fisher_file"] = str(fisher_file)
    return c


def ensure_binary():
    if not BINARY.exists():
        raise SystemExit(f"[accuracy] {BINARY} is missing: cargo build --release -p acclimate-cli")


def fisher_file():
    f = RUNTIME / "fisher.safetensors"
    if not f.exists():
        RUNTIME.mkdir(parents=True, exist_ok=True)
        t = time.time()
        cmd = [str(BINARY), "fisher", str(MODEL), "--batches", str(FISHER_DIR), "--out", str(f)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"[accuracy] {' '.join(cmd)} failed:\n{res.stderr}")
        print(f"  Fisher from {FISHER_DIR} in {time.time() - t:.0f} s", flush=True)
    return f


def write_batches(folder, x, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i, b in enumerate(batches_of(x, n)):
        p = folder / f"{i:03d}.npy"
        if not p.exists() or np.load(p).shape != b.shape or not np.array_equal(np.load(p), b):
            np.save(p, b)
    return folder


def replay(name, cfg, batch_dir, folder):
    """`acclimate replay` with cfg over batch_dir; returns (steps, seconds) or (None, error)."""
    from tta_reference import toml
    folder.mkdir(parents=True, exist_ok=True)
    out, done = folder / "out.json", folder / "seconds.txt"
    cmd = [str(BINARY), "replay", str(MODEL), "--config", str(folder / "config.toml"),
           "--batches", str(batch_dir), "--out", str(out)]
    # A finished replay of the same config over the same batch folder is reused (--runtime-full
    # takes hours: an interrupted run resumes where it stopped).
    if (done.exists() and out.exists() and (folder / "config.toml").read_text() == toml(cfg)
            and (folder / "command.txt").read_text() == " ".join(cmd) + "\n"):
        return json.loads(out.read_text())["steps"], float(done.read_text())
    done.unlink(missing_ok=True)
    (folder / "config.toml").write_text(toml(cfg))
    t = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - t
    (folder / "command.txt").write_text(" ".join(cmd) + "\n")
    if res.returncode != 0:
        return None, res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
    done.write_text(f"{seconds}\n")
    return json.loads(out.read_text())["steps"], seconds


def compare(ref_steps, rt_steps):
    """Top-1 agreement and max |Δ| of the logits (and of the probabilities, when returned)."""
    agree, total, dlogit, dprob, scale = 0, 0, 0.0, None, 0.0
    for r, g in zip(ref_steps, rt_steps):
        scale = max(scale, float(np.abs(np.asarray(r["logits"])).max()))
        agree += int((predictions(r) == predictions(g)).sum())
        total += len(r["logits"])
        dlogit = max(dlogit, float(np.abs(np.asarray(r["logits"]) - np.asarray(g["logits"])).max()))
        if "probs" in r and "probs" in g:
            d = float(np.abs(np.asarray(r["probs"]) - np.asarray(g["probs"])).max())
            dprob = d if dprob is None else max(dprob, d)
    return agree, total, dlogit, dprob, scale


def run_runtime_prefix():
    ensure_binary()
    x, y = load("clean")
    batch_dir = write_batches(RUNTIME / "prefix_batches", x, PREFIX_BATCHES)
    rows = []
    ff = None
    for label, cfg in table_configs():
        ref = reference("clean", cfg, label)
        if "eata" in cfg and cfg["eata"].get("fisher_alpha", 0) > 0:
            ff = ff or fisher_file()
        rcfg = runtime_config(cfg, ff)
        slug = hashlib.sha256(label.encode()).hexdigest()[:8]
        steps, info = replay(label, rcfg, batch_dir, RUNTIME / "prefix" / slug)
        if steps is None:
            row = {"label": label, "error": info}
            print(f"  {label:40s} runtime error: {info}", flush=True)
        else:
            agree, total, dlogit, dprob, scale = compare(ref["first_steps"], steps)
            pred = np.concatenate([predictions(s) for s in steps])
            row = {"label": label, "agree": agree, "total": total, "max_dlogit": dlogit, "max_dprob": dprob,
                   "max_logit": scale,
                   "runtime_accuracy": float((pred == y[:len(pred)]).mean()),
                   "reference_accuracy": ref["prefix_accuracy"], "seconds": info}
            print(f"  {label:40s} top-1 {agree}/{total}, max|Δlogit| {dlogit:.2e}, "
                  f"runtime {row['runtime_accuracy'] * 100:.2f} % (reference {ref['prefix_accuracy'] * 100:.2f} %), "
                  f"{info:.0f} s", flush=True)
        rows.append(row)
    (RUNTIME / "prefix.json").write_text(json.dumps(rows, indent=1))


def run_runtime_full(datasets):
    """Every table run on the runtime over all 157 batches (hours on lavapipe)."""
    ensure_binary()
    results = {}
    ff = None
    for d in datasets:
        x, y = load(d)
        batch_dir = write_batches(RUNTIME / "batches" / d, x, None)
        for label, cfg in table_configs():
            ref = reference(d, cfg, label)
            if "eata" in cfg and cfg["eata"].get("fisher_alpha", 0) > 0:
                ff = ff or fisher_file()
            slug = hashlib.sha256(label.encode()).hexdigest()[:8]
            steps, info = replay(label, runtime_config(cfg, ff), batch_dir, RUNTIME / "full" / d / slug)
            if steps is None:
                print(f"  {d:16s} {label:40s} runtime error: {info}", flush=True)
                results[f"{d}/{label}"] = {"error": info}
                continue
            pred = np.concatenate([predictions(s) for s in steps])
            acc = float((pred == y[:len(pred)]).mean())
            agree = int((pred == np.asarray(ref["pred"])).sum())
            results[f"{d}/{label}"] = {"accuracy": acc, "reference_accuracy": ref["accuracy"],
                                       "agree": agree, "total": len(pred), "seconds": info}
            print(f"  {d:16s} {label:40s} runtime {acc * 100:.2f} % (reference {ref['accuracy'] * 100:.2f} %), "
                  f"top-1 agreement {agree}/{len(pred)}, {info:.0f} s", flush=True)
            (RUNTIME / "full.json").write_text(json.dumps(results, indent=1))


def grid_configs():
    """The runtime grid's methods (the issue's list, plus the best preset): tta-methods.md's
    presets as in the reference tables; ROID with the authors' CIFAR optimizer (Adam 1e-3,
    tta-universal.md); `auto` with no key set, as a user gets it."""
    from roid_reference import config as roid_config
    p = presets()
    return [("auto", {"adapt": {"method": "auto"}}), ("source", p["source"]), ("norm", p["norm"]), ("tent", p["tent"]),
            ("eta", p["eta"]), ("eta, Adam 5e-3", _cfg("eta", lr=5e-3, eata=eata_section())),
            ("eata+woc", p["eata+woc"]), ("sar", p["sar"]), ("lame", p["lame"]),
            ("source + label shift (ema)", p["source + label shift (ema)"]), ("roid", roid_config(kind="adam", lr=1e-3))]


def run_runtime_grid(datasets, n_batches=GRID_BATCHES):
    """Every grid method on the runtime over the first `n_batches` batches of every set, with
    the PyTorch reference on the same batches for the agreement column."""
    ensure_binary()
    out = RUNTIME / "grid.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    ff = None
    for d in datasets:
        x, y = load(d)
        batch_dir = write_batches(RUNTIME / f"grid{n_batches}" / d, x, min(n_batches, math.ceil(len(x) / BATCH)))
        for label, cfg in grid_configs():
            if "eata" in cfg and cfg["eata"].get("fisher_alpha", 0) > 0:
                ff = ff or fisher_file()
            slug = hashlib.sha256(label.encode()).hexdigest()[:8]
            steps, info = replay(label, runtime_config(cfg, ff), batch_dir, RUNTIME / f"grid{n_batches}" / "runs" / d / slug)
            rec = {"dataset": d, "label": label, "batches": n_batches}
            if steps is None:
                rec["error"] = info
                print(f"  {d:16s} {label:28s} runtime error: {info}", flush=True)
            else:
                ref = reference(d, cfg, label, n_batches=n_batches, quiet=True)
                pred = np.concatenate([predictions(s) for s in steps])
                labels = y[:len(pred)]
                rec.update(accuracy=float((pred == labels).mean()), digits=len(pred),
                           accuracy_256=float((pred[:256] == labels[:256]).mean()),
                           reference_accuracy=ref["accuracy"],
                           agree=int((pred == np.asarray(ref["pred"])).sum()), seconds=info,
                           decisions=auto_decisions(steps) if label == "auto" else None)
                print(f"  {d:16s} {label:28s} runtime {rec['accuracy'] * 100:6.2f} % (first 256: "
                      f"{rec['accuracy_256'] * 100:6.2f} %; reference {ref['accuracy'] * 100:6.2f} %, top-1 agreement "
                      f"{rec['agree']}/{len(pred)}), {info:.0f} s", flush=True)
            results[f"{d}/{label}"] = rec
            out.write_text(json.dumps(results, indent=1))


MNIST_IDX = ("idx:" + str(ROOT / "assets" / "mnist" / "t10k-images-idx3-ubyte") + ","
             + str(ROOT / "assets" / "mnist" / "t10k-labels-idx1-ubyte"))
SVHN_PREPROCESS = "size=32,channels=3,mean=0.4377/0.4438/0.4728,std=0.1980/0.2010/0.1970"
MNIST_PREPROCESS = "size=28,channels=1,mean=0.1307,std=0.3081"
FRAME = {"mode": "frame", "window": 64, "adapt_every": 16}


def stream_runs():
    """(row, model, stream arguments, config) of the stream rows: frame mode (the stream's
    defaults: a window of 64 frames, a step every 16, background steps) and the no-shift control.
    The shifts are the CLI's own (`--corrupt`, `--order`), applied on the fly to the digits the
    stream reads and resizes itself."""
    svhn = ["--source", MNIST_IDX, "--preprocess", SVHN_PREPROCESS]
    mnist = ["--source", MNIST_IDX, "--preprocess", MNIST_PREPROCESS]
    auto_frame = {"adapt": {"method": "auto"}, "stream": FRAME}
    return [
        ("frame / clean / auto", MODEL, svhn, auto_frame),
        ("frame / Dirichlet 0.1 / auto", MODEL, svhn + ["--order", "dirichlet:0.1"], auto_frame),
        ("frame / Dirichlet 0.01 / auto", MODEL, svhn + ["--order", "dirichlet:0.01"], auto_frame),
        ("no shift: MNIST net / batch / auto", ROOT / "assets" / "mnist.onnx", mnist,
         {"adapt": {"method": "auto"}, "stream": {"mode": "batch", "batch": 64}}),
        ("no shift: MNIST net / frame / auto", ROOT / "assets" / "mnist.onnx", mnist, auto_frame),
        ("no shift: MNIST net / Dirichlet 0.1 / batch / auto", ROOT / "assets" / "mnist.onnx",
         mnist + ["--order", "dirichlet:0.1"], {"adapt": {"method": "auto"}, "stream": {"mode": "batch", "batch": 64}}),
    ]


def run_runtime_stream(limit=GRID_BATCHES * BATCH):
    """The stream rows on the runtime (`acclimate stream`, first `limit` frames)."""
    from tta_reference import toml
    ensure_binary()
    out = RUNTIME / "stream.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for row, model, args, cfg in stream_runs():
        folder = RUNTIME / "stream" / hashlib.sha256(row.encode()).hexdigest()[:8]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.toml").write_text(toml(cfg))
        cmd = [str(BINARY), "stream", str(model), *args, "--config", str(folder / "config.toml"), "--limit", str(limit),
               "--summary-json", str(folder / "summary.json"), "--quiet", "--seed", "0"]
        prev = results.get(row)
        if prev and prev.get("command") == cmd and (folder / "summary.json").exists():
            continue
        t = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            results[row] = {"command": cmd, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""}
            print(f"  {row:48s} error: {results[row]['error']}", flush=True)
        else:
            sm = json.loads((folder / "summary.json").read_text())
            results[row] = {"command": cmd, "config": cfg, "seconds": time.time() - t, "summary": sm}
            print(f"  {row:48s} adapted {sm['accuracy']:.2f} % source {sm['source_accuracy']:.2f} % "
                  f"({sm['frames']} frames, {sm['steps']} steps, {time.time() - t:.0f} s)", flush=True)
        out.write_text(json.dumps(results, indent=1))


def run_runtime_auto_whole(datasets):
    """`auto` (no key set) on whole sets with the runtime (`acclimate replay`), beside the
    PyTorch reference on the same batches; cached in assets/accuracy/runtime/auto_whole.json."""
    ensure_binary()
    out = RUNTIME / "auto_whole.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    cfg = dict(grid_configs())["auto"]
    for d in datasets:
        x, y = load(d)
        n = math.ceil(len(x) / BATCH)
        batch_dir = write_batches(RUNTIME / "whole" / d, x, n)
        steps, info = replay("auto", runtime_config(cfg, None), batch_dir, RUNTIME / "whole" / "runs" / d)
        if steps is None:
            results[d] = {"dataset": d, "error": info}
            print(f"  {d:16s} auto (whole set) runtime error: {info}", flush=True)
        else:
            ref = reference(d, cfg, "auto", quiet=True)
            pred = np.concatenate([predictions(s) for s in steps])
            labels = y[:len(pred)]
            results[d] = {"dataset": d, "digits": len(pred), "accuracy": float((pred == labels).mean()),
                          "reference_accuracy": ref["accuracy"], "agree": int((pred == np.asarray(ref["pred"])).sum()),
                          "seconds": info, "decisions": auto_decisions(steps)}
            print(f"  {d:16s} auto (whole set) runtime {results[d]['accuracy'] * 100:6.2f} % (reference "
                  f"{ref['accuracy'] * 100:6.2f} %, top-1 agreement {results[d]['agree']}/{len(pred)}), {info:.0f} s",
                  flush=True)
        out.write_text(json.dumps(results, indent=1))


def auto_decisions(steps):
    """How many of a replay's batches `auto` judged correlated, stepped on, reset."""
    diag = [s.get("auto") or {} for s in steps]
    out = {k: sum(1 for a in diag if a.get(k))
           for k in ("correlated", "label_shift", "stepped", "reset", "unjudged", "uncertain", "dominated")}
    # Steps with alpha 1 because the source statistics biased the predictions (not dominated).
    out["source_biased"] = sum(1 for a in diag if a.get("source_biased") and a.get("alpha") is not None
                               and not a.get("dominated"))
    return out


def alpha_one(x):
    """" (N dominated, M source-biased)" of a decisions tally: its steps with alpha 1."""
    parts = [f"{x[k]} {name}" for k, name in (("dominated", "dominated"), ("source_biased", "source-biased"))
             if x.get(k)]
    return f" ({', '.join(parts)})" if parts else ""


# ----------------------------------------------------------------------------- report

def cached(dataset, cfg):
    path = RESULTS / f"{dataset}-{key(dataset, cfg, math.ceil(10000 / BATCH))}.json"
    return json.loads(path.read_text()) if path.exists() else None


def report():
    prefix = {}
    if (RUNTIME / "prefix.json").exists():
        prefix = {r["label"]: r for r in json.loads((RUNTIME / "prefix.json").read_text())}
    rows = table_configs()
    src = cached("clean", _cfg("source"))
    for d in DATASETS:
        base = cached(d, _cfg("source"))
        print(f"\n### {TITLES[d]}\n")
        if d == "clean":
            print("| method | config | reference accuracy % | runtime, first 256 digits: top-1 agreement "
                  "/ accuracy (reference) | max \\|Δlogit\\| |")
            print("|---|---|---|---|---|")
        else:
            print("| method | config | reference accuracy % | error vs source |")
            print("|---|---|---|---|")
        for label, cfg in rows:
            r = cached(d, cfg)
            acc = f"{r['accuracy'] * 100:.2f}" if r else "not run"
            if d == "clean":
                p = prefix.get(label)
                if p is None:
                    rt, dl = "not measured", "—"
                elif "error" in p:
                    rt, dl = f"not in the runtime ({p['error'][:60]})", "—"
                else:
                    rt = (f"{p['agree']}/{p['total']} / {p['runtime_accuracy'] * 100:.2f} % "
                          f"({p['reference_accuracy'] * 100:.2f} %)")
                    dl = f"{p['max_dlogit']:.1e}"
                    if p.get("max_logit"):
                        dl += f" ({p['max_dlogit'] / p['max_logit']:.1e} of max \\|logit\\|)"
                    if p.get("max_dprob") is not None:
                        dl += f" (probs {p['max_dprob']:.1e})"
                print(f"| {label} | {summary(cfg)} | {acc} | {rt} | {dl} |")
            else:
                rel = "—"
                if r and base and label != "source":
                    rel = f"{((1 - r['accuracy']) / (1 - base['accuracy']) - 1) * 100:+.0f} %"
                    rel = "±0 %" if rel in ("+0 %", "-0 %") else rel
                print(f"| {label} | {summary(cfg)} | {acc} | {rel} |")
    best, target = best_preset()
    print(f"\n### Search (clean; target {target * 100:.2f} % = source error "
          f"{(1 - src['accuracy']) * 100:.2f} % cut by {TARGET_REDUCTION * 100:.0f} %)\n")
    print("| config | accuracy % | error vs source | distance to target | backward samples | SAR resets | time s |")
    print("|---|---|---|---|---|---|---|")
    for label, cfg in search_grid():
        r = cached("clean", cfg)
        if r is None:
            print(f"| {label} | not run | | | | | |")
            continue
        rel = ((1 - r["accuracy"]) / (1 - src["accuracy"]) - 1) * 100
        mark = " **(closest)**" if best and label == best[0] else ""
        sel = r["selected"] if r.get("selected") is not None else "all"
        resets = r["resets"] if cfg["adapt"]["method"] == "sar" else "—"
        print(f"| {label}{mark} | {r['accuracy'] * 100:.2f} | {rel:+.0f} % | {(r['accuracy'] - target) * 100:+.2f} "
              f"| {sel} | {resets} | {r['seconds']:.0f} |")
    if best:
        print("\nClosest preset config:\n\n```toml\n" + __import__("tta_reference").toml(best[1]) + "```")


GRID_SHORT = {
    "clean": "clean", "gaussian_noise3": "noise 3", "gaussian_noise5": "noise 5", "defocus_blur_c3": "blur c3",
    "defocus_blur_c5": "blur c5", "defocus_blur5": "blur 5 (ImageNet radius)", "mixed": "mixed domains",
    "correlated": "Dirichlet 0.1", "correlated001": "Dirichlet 0.01", "longtail": "long-tailed",
}


def grid_report():
    """The runtime's tables (markdown) from assets/accuracy/runtime/{grid,stream}.json."""
    lines = []
    grid = json.loads((RUNTIME / "grid.json").read_text()) if (RUNTIME / "grid.json").exists() else {}
    labels = [label for label, _ in grid_configs()]
    for key_, title in (("accuracy", f"first {GRID_BATCHES * BATCH:,} digits"), ("accuracy_256", "first 256 digits")):
        lines.append(f"\n#### Runtime, batch mode, {title} (accuracy %; **bold**: the row's best; auto − source, "
                     "auto − best)\n")
        lines.append("| set | " + " | ".join(labels) + " | auto − source | auto − best |")
        lines.append("|---|" + "---|" * (len(labels) + 2))
        for d in GRID_DATASETS:
            cells = {lab: grid.get(f"{d}/{lab}") for lab in labels}
            vals = {lab: c[key_] * 100 for lab, c in cells.items() if c and key_ in c}
            if not vals:
                continue
            best = max(vals.values())
            row = []
            for lab in labels:
                if lab not in vals:
                    c = cells[lab]
                    row.append("refused" if c and "error" in c else "—")
                    continue
                v = f"{vals[lab]:.2f}"
                row.append(f"**{v}**" if abs(vals[lab] - best) < 1e-9 else v)
            da = f"{vals['auto'] - vals['source']:+.2f}" if "auto" in vals and "source" in vals else "—"
            db = f"{vals['auto'] - best:+.2f}" if "auto" in vals else "—"
            lines.append(f"| {GRID_SHORT[d]} | " + " | ".join(row) + f" | {da} | {db} |")
    agree = [(k, c) for k, c in grid.items() if "agree" in c]
    same = sum(c["agree"] for _, c in agree)
    total = sum(c["digits"] for _, c in agree)
    off = [f"{k} ({c['agree']}/{c['digits']})" for k, c in agree if c["agree"] != c["digits"]]
    lines.append(f"\nTop-1 agreement with the PyTorch reference on the same batches: {same:,}/{total:,} predictions "
                 f"over {len(agree)} runs" + (f"; differing: {', '.join(off)}." if off else " (every run identical)."))
    errs = [f"{k}: {c['error']}" for k, c in grid.items() if "error" in c]
    if errs:
        lines.append("\nRefused: " + "; ".join(errs))
    dec = [(d, grid.get(f"{d}/auto", {}).get("decisions")) for d in GRID_DATASETS]
    dec = [(d, x) for d, x in dec if x]
    if dec:
        lines.append("\n`auto`'s decisions per set (16 batches): " + "; ".join(
            f"{GRID_SHORT[d]} {x['stepped']} stepped" + alpha_one(x)
            + f", {x['correlated']} correlated, "
            f"{x.get('label_shift', 0)} label-shifted" + (f", {x['reset']} reset" if x.get("reset") else "")
            for d, x in dec) + ".")
    whole = json.loads((RUNTIME / "auto_whole.json").read_text()) if (RUNTIME / "auto_whole.json").exists() else {}
    if whole:
        lines.append("\n#### Runtime, `auto` on whole sets (`acclimate replay`, batches of 64; the reference beside)\n")
        lines.append("| set | digits | runtime % | reference % | top-1 agreement | decisions | seconds (other jobs on "
                     "the cores) |")
        lines.append("|---|---|---|---|---|---|---|")
        for d in GRID_DATASETS:
            r = whole.get(d)
            if not r:
                continue
            if "error" in r:
                lines.append(f"| {GRID_SHORT[d]} | refused: {r['error']} | | | | | |")
                continue
            x = r["decisions"]
            dec = (f"{x['stepped']} stepped" + alpha_one(x)
                   + f", {x['correlated']} correlated, {x.get('label_shift', 0)} label-shifted"
                   + (f", {x['uncertain']} vague" if x.get("uncertain") else "")
                   + (f", {x['reset']} reset" if x.get("reset") else ""))
            lines.append(f"| {GRID_SHORT[d]} | {r['digits']:,} | {r['accuracy'] * 100:.2f} | "
                         f"{r['reference_accuracy'] * 100:.2f} | {r['agree']:,}/{r['digits']:,} | {dec} | "
                         f"{r['seconds']:.0f} |")
    stream = json.loads((RUNTIME / "stream.json").read_text()) if (RUNTIME / "stream.json").exists() else {}
    if stream:
        lines.append("\n#### Runtime, streams (`acclimate stream`, first 1,024 frames; the source model runs beside)\n")
        lines.append("| row | adapted % | source % | steps | auto's decisions | frames/s (other jobs on the cores) |")
        lines.append("|---|---|---|---|---|---|")
        for row, _, _, _ in stream_runs():
            r = stream.get(row)
            if not r:
                continue
            if "error" in r:
                lines.append(f"| {row} | refused: {r['error']} | | | | |")
                continue
            sm = r["summary"]
            a = sm.get("auto")
            dec = (f"{a['decisions']}: {a['stepped']} stepped"
                   + alpha_one(a)
                   + f", {a['correlated']} correlated, "
                   f"{a.get('label_shift', 0)} label-shifted, {a['unjudged']} unjudged"
                   + (f"; {a['prior_corrected_frames']} frames corrected by a class prior"
                      if a.get("prior_corrected_frames") else "")) if a else "—"
            lines.append(f"| {row} | {sm['accuracy']:.2f} | {sm['source_accuracy']:.2f} | {sm['steps']} | {dec} "
                         f"| {sm['fps']:.1f} |")
    return "\n".join(lines) + "\n"


def write_doc():
    """Replaces the generated part of docs/accuracy.md (between its markers) with grid_report()."""
    doc = ROOT / "docs" / "accuracy.md"
    text = doc.read_text()
    begin, end = "<!-- runtime tables: generated by tools/accuracy.py --write-doc -->", "<!-- end of runtime tables -->"
    if begin not in text or end not in text:
        raise SystemExit(f"[accuracy] {doc} lacks the markers {begin!r} … {end!r}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(head + begin + "\n" + grid_report() + end + tail)
    print(f"[accuracy] wrote the runtime tables into {doc}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", action="store_true", help="the tables' reference runs on every dataset")
    ap.add_argument("--search", action="store_true", help="the hyperparameter search on the clean set")
    ap.add_argument("--runtime-prefix", action="store_true", help="runtime vs reference on the first 4 clean batches")
    ap.add_argument("--runtime-full", action="store_true", help="every table run on the runtime (hours on lavapipe)")
    ap.add_argument("--runtime-grid", action="store_true",
                    help=f"every method of the grid on the runtime, first {GRID_BATCHES} batches of every set")
    ap.add_argument("--runtime-stream", action="store_true", help="the frame-mode rows and the no-shift control")
    ap.add_argument("--runtime-auto-whole", action="store_true",
                    help="auto on whole sets with the runtime (about 20 minutes a set that steps, on lavapipe)")
    ap.add_argument("--report", action="store_true", help="print the markdown tables from the cache")
    ap.add_argument("--write-doc", action="store_true", help="write the runtime tables into docs/accuracy.md")
    ap.add_argument("--datasets", default=None, help="comma-separated subset of " + ", ".join(ALL_DATASETS))
    args = ap.parse_args()
    datasets = [d for d in args.datasets.split(",") if d] if args.datasets else None
    unknown = [d for d in datasets or [] if d not in ALL_DATASETS]
    if unknown:
        ap.error(f"unknown dataset(s) {unknown}; choose from {', '.join(ALL_DATASETS)}")
    if not MODEL.exists():
        raise SystemExit(f"[accuracy] {MODEL} is missing: run tools/setup.sh")
    if not any((args.reference, args.search, args.runtime_prefix, args.runtime_full, args.runtime_grid,
                args.runtime_stream, args.runtime_auto_whole, args.report, args.write_doc)):
        ap.error("choose at least one of --reference, --search, --runtime-prefix, --runtime-full, --runtime-grid, "
                 "--report")
    if args.search:
        run_search()
    if args.reference:
        run_reference(datasets or DATASETS)
    if args.runtime_prefix:
        run_runtime_prefix()
    if args.runtime_full:
        run_runtime_full(datasets or DATASETS)
    if args.runtime_grid:
        run_runtime_grid(datasets or GRID_DATASETS)
    if args.runtime_stream:
        run_runtime_stream()
    if args.runtime_auto_whole:
        run_runtime_auto_whole(datasets or GRID_DATASETS)
    if args.write_doc:
        write_doc()
    if args.report:
        report()


if __name__ == "__main__":
    main()
