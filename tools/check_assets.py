#!/usr/bin/env python3
"""Independent check of the converted models with onnxruntime (CPU).

The converter (tools/pth.py + tools/build_onnx.py) is right only if the ONNX
graphs reproduce the published behaviour of the PyTorch models, so this runs
them on real data:

* MobileNetV2 on two real photos (a cat, an espresso): the top-1 class must be
  a cat class (281-285) and a coffee class (504, 967, 968).
* SVHNNet on all 10,000 MNIST test digits as 32x32 RGB: ~73.6 % (a real
  SVHN->MNIST domain shift; the figure from the package's author).
* MNISTNet on MNIST test with its own preprocessing: ~99 %.
* USPSNet on MNIST downscaled to 16x16 (informational, no reference figure).

It also checks graph structure: input/output names, the symbolic batch
dimension, BatchNormalization counts (BN must stay unfused), and that two batch
sizes give the same logits. Exit status 1 on any failure.

Run after tools/setup.sh:  .venv/bin/python tools/check_assets.py
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

TOOLS = Path(__file__).resolve().parent
ASSETS = TOOLS.parent / "assets"
sys.path.insert(0, str(TOOLS))

import imgproc  # noqa: E402

# The few ImageNet classes the photo check talks about.
IMAGENET_NAMES = {
    281: "tabby", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat", 285: "Egyptian cat",
    287: "lynx", 504: "coffee mug", 809: "soup bowl", 925: "consomme", 967: "espresso", 968: "cup",
}
PHOTOS = {"chelsea": set(range(281, 286)), "coffee": {504, 967, 968}}

# model -> (input shape without batch, expected BatchNormalization count)
BUILT_MODELS = {
    "mobilenetv2": ([3, 224, 224], 52),
    "efficientnet_lite0": ([3, 224, 224], 49),
    "svhn": ([3, 32, 32], 6),
    "usps": ([1, 16, 16], 2),
    "mnist": ([1, 28, 28], 0),
}

failures: list[str] = []


def check(cond: bool, what: str) -> None:
    print(f"  [{'ok' if cond else 'FAIL'}] {what}")
    if not cond:
        failures.append(what)


def session(name: str) -> ort.InferenceSession:
    path = ASSETS / f"{name}.onnx"
    if not path.exists():
        sys.exit(f"{path} missing: run tools/setup.sh first")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_batched(sess: ort.InferenceSession, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    return np.concatenate([sess.run(["logits"], {"input": x[i : i + batch]})[0]
                           for i in range(0, len(x), batch)])


def describe(path: Path) -> tuple[onnx.ModelProto, collections.Counter]:
    model = onnx.load(str(path))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    init = {i.name for i in model.graph.initializer}
    inp = [i for i in model.graph.input if i.name not in init][0]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    print(f"{path.name}: ir_version {model.ir_version}, opset {opset}, input {inp.name} {dims}, "
          f"{len(model.graph.node)} nodes")
    print("  ops: " + ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())))
    return model, ops


def check_structure() -> None:
    print("== graph structure")
    for name, (shape, n_bn) in BUILT_MODELS.items():
        model, ops = describe(ASSETS / f"{name}.onnx")
        g = model.graph
        in_dims = [d.dim_param or d.dim_value for d in g.input[0].type.tensor_type.shape.dim]
        out_dims = [d.dim_param or d.dim_value for d in g.output[0].type.tensor_type.shape.dim]
        check(g.input[0].name == "input" and in_dims == ["N"] + shape, f"{name}: input 'input' {in_dims}")
        check(g.output[0].name == "logits" and out_dims[0] == "N", f"{name}: output 'logits' {out_dims}")
        check(ops["BatchNormalization"] == n_bn, f"{name}: {ops['BatchNormalization']} BatchNormalization nodes "
                                                 f"(expected {n_bn}, unfused)")
        check(model.ir_version == 8 and model.opset_import[0].version == 13, f"{name}: IR 8 / opset 13")
    describe(ASSETS / "ocr_cls.onnx")


def check_ocr() -> None:
    # RapidOCR feeds this model [N, 3, 48, 192] crops scaled to [-1, 1]; its output is a
    # 2-way softmax (0 / 180 degrees). A smoke run: it loads, accepts two batch sizes
    # and two widths, and gives probabilities.
    print("== ocr_cls.onnx smoke run")
    sess = ort.InferenceSession(str(ASSETS / "ocr_cls.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for shape in ((1, 3, 48, 192), (3, 3, 48, 96)):
        x = rng.uniform(-1, 1, size=shape).astype(np.float32)
        (y,) = sess.run(None, {sess.get_inputs()[0].name: x})
        check(y.shape == (shape[0], 2) and np.allclose(y.sum(1), 1, atol=1e-5),
              f"ocr_cls on {list(shape)} -> {list(y.shape)} probabilities")


# EfficientNet-Lite takes (x - 127) / 128 of 0..255 pixels: mean 127/255, std 128/255 on a 0..1 scale.
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3
PHOTO_MODELS = {"mobilenetv2": (None, None), "efficientnet_lite0": (LITE_MEAN, LITE_STD)}


def check_photos() -> None:
    for model, (mean, std) in PHOTO_MODELS.items():
        check_photos_of(model, mean, std)


def check_photos_of(model: str, mean, std) -> None:
    print(f"== {model} on photos (resize 256, center crop 224, {'ImageNet' if mean is None else 'its'} mean/std)")
    sess = session(model)
    names = list(PHOTOS)
    x = np.stack([imgproc.imagenet_preprocess(imgproc.read_png(ASSETS / "photos" / f"{n}.png"), mean, std)
                  for n in names])
    logits = sess.run(["logits"], {"input": x})[0]
    # Same logits one image at a time: the batch dimension really is dynamic.
    single = sess.run(["logits"], {"input": x[:1]})[0]
    check(np.allclose(single[0], logits[0], atol=1e-4), "batch 1 and batch 2 agree")
    for n, row in zip(names, logits):
        p = np.exp(row - row.max())
        p /= p.sum()
        top = np.argsort(-row)[:5]
        desc = ", ".join(f"{i} {IMAGENET_NAMES.get(int(i), '?')} {p[i]:.3f}" for i in top)
        print(f"  {n}: top-5 {desc}")
        check(int(top[0]) in PHOTOS[n], f"{n}: top-1 class {int(top[0])} in {sorted(PHOTOS[n])}")


def check_digits() -> None:
    print("== digit networks on the MNIST test set (10,000)")
    images = imgproc.read_idx(ASSETS / "mnist" / "t10k-images-idx3-ubyte")
    labels = imgproc.read_idx(ASSETS / "mnist" / "t10k-labels-idx1-ubyte").astype(np.int64)
    check(images.shape == (10000, 28, 28) and list(labels[:5]) == [7, 2, 1, 0, 4], "MNIST test set looks canonical")

    svhn_x = imgproc.mnist_for_svhn(images)
    svhn = session("svhn")
    acc = float((run_batched(svhn, svhn_x).argmax(1) == labels).mean())
    print(f"  SVHNNet on MNIST 32x32 RGB: {acc * 100:.2f} %  (reference ~73.6 %)")
    check(abs(acc - 0.736) < 0.01, "SVHNNet accuracy within 1 point of 73.6 %")

    first = np.load(ASSETS / "mnist32_first64.npy")
    first_labels = np.load(ASSETS / "mnist32_first64_labels.npy")
    check(first.shape == (64, 3, 32, 32) and first.dtype == np.float32 and np.array_equal(first, svhn_x[:64])
          and np.array_equal(first_labels, labels[:64]), "mnist32_first64.npy matches the preprocessing")

    acc = float((run_batched(session("mnist"), imgproc.mnist_for_mnist(images)).argmax(1) == labels).mean())
    print(f"  MNISTNet on MNIST 28x28: {acc * 100:.2f} %  (reference ~99 %)")
    check(acc > 0.985, "MNISTNet accuracy > 98.5 %")

    acc = float((run_batched(session("usps"), imgproc.mnist_for_usps(images)).argmax(1) == labels).mean())
    print(f"  USPSNet on MNIST resized to 16x16 (informational, no reference): {acc * 100:.2f} %")
    check(acc > 0.5, "USPSNet clearly better than chance on MNIST")


def main() -> int:
    check_structure()
    check_ocr()
    check_photos()
    check_digits()
    if failures:
        print(f"{len(failures)} check(s) failed: {failures}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
