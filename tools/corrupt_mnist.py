#!/usr/bin/env python3
"""The SVHN->MNIST accuracy datasets (docs/accuracy.md), cached under assets/accuracy/.

Every dataset is the 10,000 MNIST test digits prepared exactly as tools/check_assets.py prepares
them for the SVHN network (tools/imgproc.py: PIL-exact bilinear resize 28->32 on the 8-bit image,
gray copied to RGB, ToTensor, Normalize with the SVHN mean/std), saved as one float32
[10000, 3, 32, 32] .npy plus int64 labels:

  clean           the digits in the test set's own order (equal to imgproc.mnist_for_svhn)
  gaussian_noise5 imagecorruptions' gaussian_noise, severity 5, on the 32x32 RGB uint8 digit,
                  before normalisation (the package draws from numpy's global generator: it is
                  seeded once, then the digits are corrupted in test-set order)
  defocus_blur5   imagecorruptions' defocus_blur, severity 5 (deterministic)
  correlated      the clean digits reordered by Dirichlet label-correlated sampling (RoTTA's
                  temporal sampler, NOTE's non-i.i.d. protocol) with delta = 0.1, seeded
  fisher/         2000 clean MNIST *training* digits (the first 2000) in 32 batch files of 64
                  (the last 16): the clean set EATA's Fisher is computed from. No SVHN images
                  ship with the assets, so the Fisher anchors the model on unlabelled clean digits.

Run with a Python that has imagecorruptions==1.1.2 (numpy, opencv, scikit-image come with it):

    python3 -m venv /tmp/icvenv2 && /tmp/icvenv2/bin/pip install imagecorruptions==1.1.2
    /tmp/icvenv2/bin/python tools/corrupt_mnist.py            # writes assets/accuracy/

A manifest (assets/accuracy/manifest.json) records the recipe, seeds, package versions and the
SHA-256 of every file; an up-to-date cache is left alone unless --force.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imgproc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "assets" / "accuracy"
MNIST = ROOT / "assets" / "mnist"

NOISE_SEED = 2024
DIRICHLET_SEED = 2024
DIRICHLET_DELTA = 0.1
FISHER_COUNT = 2000
BATCH = 64
SEVERITY = 5
# Bump when the recipe changes so a stale cache is rebuilt.
RECIPE = 1

DATASETS = ("clean", "gaussian_noise5", "defocus_blur5", "correlated")


def dirichlet_order(labels: np.ndarray, delta: float, rng: np.random.Generator, slots: int | None = None) -> np.ndarray:
    """A label-correlated order of range(len(labels)).

    Each class's indices (in their original order) are cut into `slots` consecutive pieces whose
    sizes follow one Dirichlet(delta) draw per class; slot s gathers piece s of every class, its
    pieces are shuffled, and the slots are concatenated. A small delta puts most of a class in
    one or two slots, so the stream shows long runs of one class (delta -> inf: i.i.d.-like)."""
    classes = int(labels.max()) + 1
    slots = slots or classes
    proportions = rng.dirichlet([delta] * slots, classes)
    per_slot: list[list[np.ndarray]] = [[] for _ in range(slots)]
    for c in range(classes):
        ids = np.flatnonzero(labels == c)
        cuts = (np.cumsum(proportions[c])[:-1] * len(ids)).astype(int)
        for s, piece in enumerate(np.split(ids, cuts)):
            per_slot[s].append(piece)
    order = []
    for pieces in per_slot:
        for i in rng.permutation(len(pieces)):
            order.extend(pieces[i].tolist())
    order = np.asarray(order, dtype=np.int64)
    if not np.array_equal(np.sort(order), np.arange(len(labels))):
        raise AssertionError("the Dirichlet order is not a permutation")
    return order


def corrupt_all(rgb_u8: np.ndarray, name: str) -> np.ndarray:
    """Apply one imagecorruptions corruption at SEVERITY to [N, 32, 32, 3] uint8 images."""
    try:
        from imagecorruptions import corrupt
    except ImportError:
        raise SystemExit("corrupt_mnist.py needs the imagecorruptions package (pip install imagecorruptions==1.1.2)")
    out = np.empty_like(rgb_u8)
    for i, img in enumerate(rgb_u8):
        out[i] = corrupt(img, severity=SEVERITY, corruption_name=name)
    return out


def to_input(rgb_u8: np.ndarray) -> np.ndarray:
    """[N, 32, 32, 3] uint8 -> the SVHN network's input [N, 3, 32, 32] float32."""
    return imgproc.normalize(np.ascontiguousarray(rgb_u8.transpose(0, 3, 1, 2)), imgproc.SVHN_MEAN, imgproc.SVHN_STD)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    v = {"numpy": np.__version__}
    try:
        import importlib.metadata as md
        for pkg in ("imagecorruptions", "opencv-python", "scikit-image", "scipy"):
            try:
                v[pkg] = md.version(pkg)
            except md.PackageNotFoundError:
                pass
    except ImportError:
        pass
    return v


def recipe() -> dict:
    return {"recipe": RECIPE, "noise_seed": NOISE_SEED, "dirichlet_seed": DIRICHLET_SEED,
            "dirichlet_delta": DIRICHLET_DELTA, "severity": SEVERITY, "fisher_count": FISHER_COUNT, "batch": BATCH}


def up_to_date() -> bool:
    man = OUT / "manifest.json"
    if not man.exists():
        return False
    m = json.loads(man.read_text())
    return m.get("recipe") == recipe() and all((OUT / f).exists() for f in m.get("files", {}))


def build() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    images = imgproc.read_idx(MNIST / "t10k-images-idx3-ubyte")
    labels = imgproc.read_idx(MNIST / "t10k-labels-idx1-ubyte").astype(np.int64)
    resized = imgproc._resize_batch(images, 32, 32)          # [N, 32, 32] uint8, PIL-exact
    rgb = np.repeat(resized[:, :, :, None], 3, axis=3)         # convert("RGB"): gray copied
    clean = to_input(rgb)
    if not np.array_equal(clean, imgproc.mnist_for_svhn(images)):
        raise AssertionError("clean set differs from imgproc.mnist_for_svhn")
    first = ROOT / "assets" / "mnist32_first64.npy"
    if first.exists() and not np.array_equal(np.load(first), clean[:64]):
        raise AssertionError("clean set differs from assets/mnist32_first64.npy")

    sets = {"clean": (clean, labels, None)}
    print("[corrupt_mnist] gaussian_noise severity 5", flush=True)
    np.random.seed(NOISE_SEED)
    sets["gaussian_noise5"] = (to_input(corrupt_all(rgb, "gaussian_noise")), labels, None)
    print("[corrupt_mnist] defocus_blur severity 5", flush=True)
    sets["defocus_blur5"] = (to_input(corrupt_all(rgb, "defocus_blur")), labels, None)
    order = dirichlet_order(labels, DIRICHLET_DELTA, np.random.default_rng(DIRICHLET_SEED))
    sets["correlated"] = (clean[order], labels[order], order)

    files = {}
    for name, (x, y, perm) in sets.items():
        np.save(OUT / f"{name}.npy", x.astype(np.float32))
        np.save(OUT / f"{name}_labels.npy", y.astype(np.int64))
        files[f"{name}.npy"] = sha256(OUT / f"{name}.npy")
        files[f"{name}_labels.npy"] = sha256(OUT / f"{name}_labels.npy")
        if perm is not None:
            np.save(OUT / f"{name}_order.npy", perm)
            files[f"{name}_order.npy"] = sha256(OUT / f"{name}_order.npy")

    train = imgproc.read_idx(MNIST / "train-images-idx3-ubyte")[:FISHER_COUNT]
    fisher = imgproc.mnist_for_svhn(train)
    fdir = OUT / "fisher"
    fdir.mkdir(exist_ok=True)
    for old in fdir.glob("*.npy"):
        old.unlink()
    for i in range(0, FISHER_COUNT, BATCH):
        p = fdir / f"{i // BATCH:03d}.npy"
        np.save(p, fisher[i:i + BATCH])
        files[f"fisher/{p.name}"] = sha256(p)

    run_lengths = np.diff(np.flatnonzero(np.diff(labels[order]) != 0), prepend=-1, append=len(order) - 1)
    manifest = {"recipe": recipe(), "versions": versions(), "files": files,
                "correlated_mean_run_length": float(run_lengths.mean())}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"[corrupt_mnist] wrote {len(files)} files to {OUT} "
          f"(correlated: mean run of one class {manifest['correlated_mean_run_length']:.1f} digits)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even when the cache is up to date")
    args = ap.parse_args()
    if not (MNIST / "t10k-images-idx3-ubyte").exists():
        print(f"[corrupt_mnist] error: {MNIST} is missing; run tools/setup.sh first", file=sys.stderr)
        return 1
    if up_to_date() and not args.force:
        print(f"[corrupt_mnist] {OUT} is up to date")
        return 0
    build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
