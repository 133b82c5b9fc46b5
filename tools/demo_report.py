#!/usr/bin/env python3
"""Helpers of tools/demo.sh: turn photos into an ImageNet batch, and summarise the demo's outputs.

    demo_report.py photos OUT.npy PNG...          # [N,3,224,224] float32, torchvision's eval transform
    demo_report.py classify GPU.npy ORT.npy PNG... # top-5 per photo from both backends, max difference
    demo_report.py digits GPU.npy ORT.npy LABELS.npy
    demo_report.py split X.npy N DIR                # DIR/000.npy, 001.npy, ... batches of N rows
    demo_report.py replay OUT.json LABELS.npy SOURCE.npy  # accuracy of the returned (pre-update) predictions
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imgproc  # noqa: E402

from check_assets import IMAGENET_NAMES as NAMES  # noqa: E402


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main(argv):
    cmd = argv[1]
    if cmd == "photos":
        out, pngs = argv[2], argv[3:]
        batch = np.stack([imgproc.imagenet_preprocess(imgproc.read_png(p)) for p in pngs]).astype(np.float32)
        np.save(out, batch)
        return 0
    if cmd == "split":
        x, n, out = np.load(argv[2]), int(argv[3]), Path(argv[4])
        out.mkdir(parents=True, exist_ok=True)
        for i in range(0, len(x), n):
            np.save(out / f"{i // n:03d}.npy", x[i:i + n])
        return 0
    if cmd == "replay":
        import json
        steps = json.load(open(argv[2]))["steps"]
        labels = np.load(argv[3]).astype(np.int64)
        pred = np.concatenate([np.argmax(np.array(s["logits"]), axis=1) for s in steps])
        losses = ", ".join(f"{s['loss']:.3f}" for s in steps)
        source = float((np.load(argv[4]).argmax(1)[:len(pred)] == labels[:len(pred)]).mean())
        print(f"  TENT on {len(pred)} digits in {len(steps)} batches: accuracy of the returned predictions "
              f"{float((pred == labels[:len(pred)]).mean()):.1%} (source model {source:.1%}); "
              f"mean entropy per batch: {losses}")
        print("  (batch statistics of 16 digits cost this network accuracy; PyTorch's TENT returns the same "
              "predictions, step for step)")
        return 0
    gpu, ort = np.load(argv[2]), np.load(argv[3])
    diff = float(np.abs(gpu - ort).max())
    bound = 1e-4 * float(np.abs(ort).max()) + 1e-5
    if cmd == "classify":
        pg = softmax(gpu)
        for i, p in enumerate(argv[4:]):
            top = np.argsort(-pg[i])[:5]
            same = int(np.argmax(gpu[i]) == np.argmax(ort[i]))
            items = ", ".join(f"{c} {NAMES.get(int(c), '')} {pg[i, c]:.3f}".replace("  ", " ") for c in top)
            print(f"  {Path(p).name:12s} top-5 (GPU): {items}   [ORT top-1 agrees: {'yes' if same else 'NO'}]")
    elif cmd == "digits":
        labels = np.load(argv[4]).astype(np.int64)
        acc_g = float((gpu.argmax(1) == labels).mean())
        acc_o = float((ort.argmax(1) == labels).mean())
        print(f"  SVHN network on {len(labels)} MNIST digits: accuracy GPU {acc_g:.1%}, ONNX Runtime {acc_o:.1%}"
              f" (a real SVHN->MNIST shift: ~73.6% on the full test set without adaptation)")
    print(f"  max |gpu - ort| = {diff:.3g} (parity bound 1e-4*max|ort| + 1e-5 = {bound:.3g}): "
          f"{'OK' if diff <= bound else 'EXCEEDED'}")
    return 0 if diff <= bound else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
