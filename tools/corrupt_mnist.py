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
  gaussian_noise3 the same at severity 3 (the global generator re-seeded with NOISE3_SEED)
  defocus_blur5   imagecorruptions' defocus_blur, severity 5 (deterministic): ImageNet-C's disk
                  of radius 10, which leaves a blob of a 32-pixel digit
  defocus_blur_c3 defocus blur with CIFAR-10-C's parameters for 32-pixel images (Hendrycks &
  defocus_blur_c5 Dietterich's CIFAR recipe: disk radius and anti-aliasing 0.5/0.6 at severity 3,
                  1.5/0.1 at severity 5), built from imagecorruptions' `disk` kernel and
                  OpenCV's filter2D per channel, as its ImageNet defocus_blur is
  mixed           the corruption changes every 128 digits, cycling gaussian_noise3,
                  defocus_blur_c3, gaussian_noise5, defocus_blur_c5 (digit i taken from the set
                  of its segment, so the labels keep the test-set order)
  correlated      the clean digits reordered by Dirichlet label-correlated sampling (RoTTA's
                  temporal sampler, NOTE's non-i.i.d. protocol) with delta = 0.1, seeded
  correlated001   the same with delta = 0.01 (most classes in one run)
  longtail        a label-shifted subsample: class k keeps its first 1000 * 0.01^(r_k / 9)
                  test digits (imbalance 100, the long-tailed CIFAR rule; r_k a seeded
                  permutation of the classes), shuffled i.i.d. with a seeded generator
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
DIRICHLET_DELTA_STRONG = 0.01
NOISE3_SEED = 2027
LONGTAIL_SEED = 2024
LONGTAIL_IMBALANCE = 100.0
LONGTAIL_HEAD = 1000
MIXED_SEGMENT = 128
# CIFAR-10-C's defocus_blur (radius, alias_blur) by severity.
CIFAR_DEFOCUS = {3: (0.5, 0.6), 5: (1.5, 0.1)}
FISHER_COUNT = 2000
BATCH = 64
SEVERITY = 5
# Bump when the recipe changes so a stale cache is rebuilt.
RECIPE = 2

DATASETS = ("clean", "gaussian_noise3", "gaussian_noise5", "defocus_blur_c3", "defocus_blur_c5", "defocus_blur5",
            "mixed", "correlated", "correlated001", "longtail")
MIXED_CYCLE = ("gaussian_noise3", "defocus_blur_c3", "gaussian_noise5", "defocus_blur_c5")


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


def corrupt_all(rgb_u8: np.ndarray, name: str, severity: int = SEVERITY) -> np.ndarray:
    """Apply one imagecorruptions corruption at `severity` to [N, 32, 32, 3] uint8 images."""
    try:
        from imagecorruptions import corrupt
    except ImportError:
        raise SystemExit("corrupt_mnist.py needs the imagecorruptions package (pip install imagecorruptions==1.1.2)")
    out = np.empty_like(rgb_u8)
    for i, img in enumerate(rgb_u8):
        out[i] = corrupt(img, severity=severity, corruption_name=name)
    return out


def cifar_defocus_all(rgb_u8: np.ndarray, severity: int) -> np.ndarray:
    """CIFAR-10-C's defocus blur at `severity` on [N, 32, 32, 3] uint8 images: imagecorruptions'
    disk kernel with CIFAR's radius and anti-aliasing, filter2D per channel, clipped, truncated
    to uint8 as imagecorruptions' `corrupt` does."""
    import cv2
    from imagecorruptions.corruptions import disk
    radius, alias = CIFAR_DEFOCUS[severity]
    kernel = disk(radius=radius, alias_blur=alias)
    out = np.empty_like(rgb_u8)
    for i, img in enumerate(rgb_u8):
        x = img / 255.0
        ch = np.stack([cv2.filter2D(x[:, :, d], -1, kernel) for d in range(3)], axis=2)
        out[i] = np.uint8(np.clip(ch, 0, 1) * 255)
    return out


def longtail_subsample(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of the long-tailed subsample (see the module doc), in a shuffled order."""
    classes = int(labels.max()) + 1
    rank = rng.permutation(classes)
    ids = []
    for c in range(classes):
        n = int(LONGTAIL_HEAD * (1.0 / LONGTAIL_IMBALANCE) ** (rank[c] / (classes - 1)))
        ids.extend(np.flatnonzero(labels == c)[:n].tolist())
    ids = np.asarray(ids, dtype=np.int64)
    return ids[rng.permutation(len(ids))]


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
    return {"recipe": RECIPE, "noise_seed": NOISE_SEED, "noise3_seed": NOISE3_SEED, "dirichlet_seed": DIRICHLET_SEED,
            "dirichlet_delta": DIRICHLET_DELTA, "dirichlet_delta_strong": DIRICHLET_DELTA_STRONG,
            "cifar_defocus": {str(k): list(v) for k, v in CIFAR_DEFOCUS.items()}, "mixed_cycle": list(MIXED_CYCLE),
            "mixed_segment": MIXED_SEGMENT, "longtail": [LONGTAIL_SEED, LONGTAIL_IMBALANCE, LONGTAIL_HEAD],
            "severity": SEVERITY, "fisher_count": FISHER_COUNT, "batch": BATCH}


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
    print("[corrupt_mnist] gaussian_noise severity 3", flush=True)
    np.random.seed(NOISE3_SEED)
    sets["gaussian_noise3"] = (to_input(corrupt_all(rgb, "gaussian_noise", 3)), labels, None)
    print("[corrupt_mnist] defocus_blur severity 5", flush=True)
    sets["defocus_blur5"] = (to_input(corrupt_all(rgb, "defocus_blur")), labels, None)
    for sev in sorted(CIFAR_DEFOCUS):
        print(f"[corrupt_mnist] defocus_blur, CIFAR-10-C severity {sev}", flush=True)
        sets[f"defocus_blur_c{sev}"] = (to_input(cifar_defocus_all(rgb, sev)), labels, None)
    segment = (np.arange(len(labels)) // MIXED_SEGMENT) % len(MIXED_CYCLE)
    mixed = np.empty_like(clean)
    for k, name in enumerate(MIXED_CYCLE):
        mixed[segment == k] = sets[name][0][segment == k]
    sets["mixed"] = (mixed, labels, None)
    order = dirichlet_order(labels, DIRICHLET_DELTA, np.random.default_rng(DIRICHLET_SEED))
    sets["correlated"] = (clean[order], labels[order], order)
    order = dirichlet_order(labels, DIRICHLET_DELTA_STRONG, np.random.default_rng(DIRICHLET_SEED))
    sets["correlated001"] = (clean[order], labels[order], order)
    order = longtail_subsample(labels, np.random.default_rng(LONGTAIL_SEED))
    sets["longtail"] = (clean[order], labels[order], order)

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

    def mean_run(y):
        return float(np.diff(np.flatnonzero(np.diff(y) != 0), prepend=-1, append=len(y) - 1).mean())
    manifest = {"recipe": recipe(), "versions": versions(), "files": files,
                "correlated_mean_run_length": mean_run(sets["correlated"][1]),
                "correlated001_mean_run_length": mean_run(sets["correlated001"][1]),
                "longtail_class_counts": np.bincount(sets["longtail"][1], minlength=10).tolist()}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"[corrupt_mnist] wrote {len(files)} files to {OUT} "
          f"(mean run of one class: correlated {manifest['correlated_mean_run_length']:.1f}, "
          f"correlated001 {manifest['correlated001_mean_run_length']:.1f} digits; "
          f"longtail {len(sets['longtail'][1])} digits)")


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
