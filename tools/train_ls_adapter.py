#!/usr/bin/env python3
"""Train, export, check and evaluate the label-shift adapter for the MNIST network (assets/mnist.onnx).

The adapter follows shared/docs/tta-methods.md §6 (Park et al., ICCV 2023, reconstructed there) and §12: a small
network, trained offline on labelled source data with the source network frozen, that maps an estimated target label
distribution p_t to the parameters it modulates in the last layer. The runtime computes

    logits' = (W + delta_w) · (gamma ⊙ h + beta) + (b + delta_b)

where h is the input of the network's final Gemm and W [C, D], b [C] its weight (as applied to h) and bias.

Interface of the exported ONNX (opset 17, fixed shapes): input "prior" f32 [1, C] (sums to 1); outputs "gamma"
[1, D], "beta" [1, D], "delta_w" [C, D], "delta_b" [1, C]. Only MatMul, Add, Log, Tanh and Reshape appear (checked
against the runtime's op list), every constant an initializer.

Architecture (residual, exactly the identity at the uniform prior):
    u  = (log(p + 1e-6)) · (I − 11ᵀ/C)                 centred log prior; u = 0 at the uniform prior
    a1 = tanh(u·W1 + b1) − tanh(b1)                     both hidden layers are shifted so that u = 0 gives a = 0
    a2 = tanh(a1·W2 + b2) − tanh(b2)
    gamma = 1 + a2·Wγ,  beta = a2·Wβ,  delta_w = reshape(a2·WΔW, [C, D]),  delta_b = a2·WΔb + u·S
The heads have no bias, so the uniform prior gives gamma = 1, beta = 0, delta_w = 0, delta_b = 0 exactly: an
uninformative estimate leaves the source model untouched. S starts at the identity, which makes the untrained adapter
the classic prior correction z + log p_t − log(1/C) (up to a per-sample constant); the MLP learns what that misses.

Training loss: the generalized logit-adjusted loss CE(softmax(z' + log p_s − log p_t), y) on source samples, z' the
adapter-modulated logits from the sampled p_t. Its minimiser is z' = log p_s(y|x) − log p_s(y) + log p_t(y), the
Bayes-optimal logits under p_t. The adapter is fed p_t itself, or a perturbed copy of it so that it tolerates the
estimation error of an online estimate. p_t families: long-tailed (exponential profile, imbalance ratio log-uniform in
[1, 100], forward, backward or a random class order), Dirichlet (concentration log-uniform in [0.05, 10]) and uniform.
The source samples are the 60k MNIST training digits plus a copy of them translated by up to one pixel: the network
fits its own training digits (99.84 %) far better than unseen ones (99.05 %); on the training digits alone the adapter
learns to fit their ~100 errors and hurts on the test set (models/README.md has the numbers), while the shifted copy
(98.6 %) gives the loss errors that look like those on unseen digits.

Two interpreters: the training needs torch (/tmp/torchenv, never CI), the feature extraction, the export check, the
evaluation and the fixture use onnxruntime (.venv). Run with the torch interpreter; the onnxruntime stages are run as
subprocesses of this same file with the .venv interpreter:

    /tmp/torchenv/bin/python tools/train_ls_adapter.py            # everything, writes the files below

writes models/mnist_ls_adapter.onnx, tests/fixtures/ls_adapter/ and target/ls_adapter/ (cached features, the torch
reference outputs and eval.md, the evaluation table). Seeded and deterministic (single-threaded torch).
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import imgproc  # noqa: E402

C = 10
PRIOR_EPS = 1e-6  # added to the prior before the log: keeps log finite for empty classes (−13.8 at p = 0)
EMA_MOMENTUM = 0.9
EVAL_BATCH = 64
EVAL_SEEDS = 5
ALLOWED_OPS = {"Gemm", "MatMul", "Add", "Mul", "Relu", "Sigmoid", "Tanh", "Reshape", "Log", "Exp", "Softmax", "Concat"}

MODEL = ROOT / "assets" / "mnist.onnx"
MNIST = ROOT / "assets" / "mnist"
DEFAULT_OUT = ROOT / "models" / "mnist_ls_adapter.onnx"
FIXTURE = ROOT / "tests" / "fixtures" / "ls_adapter"
WORK = ROOT / "target" / "ls_adapter"


# ------------------------------------------------------------------------------------------------------------------
# The source network's last layer (shared by both interpreters; onnx only)


def final_layer(model: onnx.ModelProto):
    """(name of h, W as the [C, D] matrix applied to h, b [C]) of the Gemm/MatMul that produces the graph output."""
    g = model.graph
    if len(g.output) != 1:
        raise ValueError(f"expected one graph output, found {len(g.output)}")
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    node = producer[g.output[0].name]
    if node.op_type == "Gemm":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) != 0:
            raise ValueError("final Gemm has transA=1: h is not its first input as [N, D]")
        if len(node.input) < 2 or node.input[1] not in inits:
            raise ValueError("final Gemm's weight is not an initializer")
        w = inits[node.input[1]]
        w = w if attrs.get("transB", 0) else w.T
        w = w * attrs.get("alpha", 1.0)
        bias = inits[node.input[2]] * attrs.get("beta", 1.0) if len(node.input) > 2 and node.input[2] else 0.0
        return node.input[0], w, np.broadcast_to(bias, (w.shape[0],)).copy()
    if node.op_type == "Add":
        mm = next((producer.get(i) for i in node.input if producer.get(i) is not None
                   and producer[i].op_type == "MatMul"), None)
        bias_name = next((i for i in node.input if i in inits), None)
        if mm is None or bias_name is None or mm.input[1] not in inits:
            raise ValueError("final Add is not MatMul(h, W) + bias with constant W and bias")
        w = inits[mm.input[1]].T
        return mm.input[0], w, np.broadcast_to(inits[bias_name], (w.shape[0],)).copy()
    raise ValueError(f"the graph output is produced by {node.op_type}, not by Gemm or MatMul+Add")


# ------------------------------------------------------------------------------------------------------------------
# Label distributions


def long_tailed(counts_max: float, ratio: float, order: np.ndarray) -> np.ndarray:
    """Exponential long-tailed profile: class order[k] gets counts_max · ratio^(−k/(C−1))."""
    n = np.empty(C)
    n[order] = counts_max * ratio ** (-np.arange(C) / (C - 1))
    return n


# ------------------------------------------------------------------------------------------------------------------
# onnxruntime side (.venv)


def ort_session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_features(images_u8: np.ndarray, model: onnx.ModelProto, h_name: str):
    """h and the logits of the MNIST net, from onnxruntime, in batches of 1000."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.helper.make_tensor_value_info(h_name, onnx.TensorProto.FLOAT, None))
    sess = ort_session(m)
    x = imgproc.mnist_for_mnist(images_u8)
    hs, zs = [], []
    for i in range(0, len(x), 1000):
        z, h = sess.run([model.graph.output[0].name, h_name], {model.graph.input[0].name: x[i:i + 1000]})
        hs.append(h)
        zs.append(z)
    return np.concatenate(hs), np.concatenate(zs)


def shift_digits(images_u8: np.ndarray, rng) -> np.ndarray:
    """Each digit translated by (dy, dx) drawn uniformly from {−1, 0, 1}², zero fill."""
    n = len(images_u8)
    shifts = rng.integers(-1, 2, size=(n, 2))
    padded = np.pad(images_u8, ((0, 0), (1, 1), (1, 1)))
    out = np.empty_like(images_u8)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            out[sel] = padded[sel, 1 - dy:29 - dy, 1 - dx:29 - dx]
    return out


def stage_features(work: Path) -> None:
    model = onnx.load(MODEL)
    h_name, w, b = final_layer(model)
    out = {"W": w.astype(np.float32), "b": b.astype(np.float32)}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = imgproc.read_idx(MNIST / f"{prefix}-images-idx3-ubyte")
        labels = imgproc.read_idx(MNIST / f"{prefix}-labels-idx1-ubyte").astype(np.int64)
        h, z = ort_features(images, model, h_name)
        # The last layer recomputed from h must be the network's own output, or W/b were read wrongly.
        err = np.abs(h.astype(np.float64) @ w.T + b - z).max()
        if err > 1e-3:
            raise SystemExit(f"final layer from h does not reproduce the logits ({split}): max abs error {err:.2e}")
        acc = float((z.argmax(1) == labels).mean())
        print(f"  {split}: {len(labels)} digits, h {h.shape}, source accuracy {acc * 100:.2f} %, "
              f"h·Wᵀ+b vs logits max abs error {err:.1e}")
        out.update({f"{split}_h": h, f"{split}_z": z, f"{split}_y": labels})
        if split == "train":
            h, z = ort_features(shift_digits(images, np.random.default_rng(0)), model, h_name)
            acc = float((z.argmax(1) == labels).mean())
            print(f"  train shifted by up to 1 px: source accuracy {acc * 100:.2f} %")
            out.update({"shifted_h": h, "shifted_z": z})
    print(f"  h = {h_name!r}, D = {w.shape[1]}, W {w.shape}")
    np.savez(work / "features.npz", **out)


class OrtAdapter:
    def __init__(self, path: Path):
        self.sess = ort_session(onnx.load(path))

    def __call__(self, prior: np.ndarray):
        p = np.asarray(prior, dtype=np.float32).reshape(1, C)
        return self.sess.run(["gamma", "beta", "delta_w", "delta_b"], {"prior": p})


def adapted_logits(h, w, b, params) -> np.ndarray:
    """(W + ΔW)(γ ⊙ h + β) + (b + Δb) in float64."""
    gamma, beta, dw, db = (np.asarray(p, dtype=np.float64) for p in params)
    return (gamma * h + beta) @ (w + dw).T + (b + db)


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def eval_streams(y: np.ndarray, seed: int):
    """Label-shifted test streams: [(name, indices in stream order, per-sample oracle p_t [N, C])]."""
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in range(C)]
    n_max = min(len(p) for p in pools)
    streams = []
    for ratio in (10, 100):
        for direction, order in (("forward", np.arange(C)), ("backward", np.arange(C)[::-1])):
            counts = np.round(long_tailed(n_max, ratio, order)).astype(int)
            idx = rng.permutation(np.concatenate([pools[c][:counts[c]] for c in range(C)]))
            p_t = counts / counts.sum()
            streams.append((f"LT {direction} ρ={ratio}", idx, np.tile(p_t, (len(idx), 1))))
    # Piecewise-stationary Dirichlet stream: 10 segments of 20 batches, each segment's labels drawn i.i.d. from its own
    # p ~ Dir(0.1·1). Digits are drawn with replacement from the class pools (a segment can ask for more digits of one
    # class than the test set holds). The oracle is the segment's generating p.
    idx, oracle = [], []
    for _ in range(10):
        p = rng.dirichlet(np.full(C, 0.1))
        labels = rng.choice(C, size=20 * EVAL_BATCH, p=p)
        idx.append(np.array([rng.choice(pools[c]) for c in labels]))
        oracle.append(np.tile(p, (len(labels), 1)))
    streams.append(("Dirichlet δ=0.1", np.concatenate(idx), np.concatenate(oracle)))
    idx = rng.permutation(len(y))
    streams.append(("uniform, whole test set", idx, np.tile(np.bincount(y, minlength=C) / len(y), (len(y), 1))))
    return streams


METHODS = [
    ("source", "source model"),
    ("pc_oracle", "prior correction, oracle p_t"),
    ("pc_ema", "prior correction, EMA p̂_t"),
    ("ad_ema", "adapter, EMA p̂_t"),
    ("ad_oracle", "adapter, oracle p_t"),
    ("pc_ema_self", "prior correction, EMA of own output"),
    ("ad_ema_self", "adapter, EMA of own output"),
]


def run_stream(h, z, y, oracle, w, b, log_ps, adapter, cache):
    """Correct predictions per method over one stream, in batches of EVAL_BATCH, predicting each batch with the
    estimate from the previous batches (the EMA starts at the uniform distribution)."""
    def params(p):
        key = np.asarray(p, dtype=np.float32).tobytes()
        if key not in cache:
            cache[key] = adapter(p)
        return cache[key]

    uniform = np.full(C, 1.0 / C)
    est = {"pc_ema": uniform.copy(), "ad_ema": uniform.copy(), "pc_ema_self": uniform.copy(),
           "ad_ema_self": uniform.copy()}
    correct = {k: 0 for k, _ in METHODS}
    for i in range(0, len(y), EVAL_BATCH):
        hb, zb, yb = h[i:i + EVAL_BATCH].astype(np.float64), z[i:i + EVAL_BATCH].astype(np.float64), y[i:i + EVAL_BATCH]
        p_t = oracle[i]  # constant within a batch for every stream above (segments are whole batches)
        src = zb
        out = {
            "source": src,
            "pc_oracle": src + np.log(p_t + PRIOR_EPS) - log_ps,
            "pc_ema": src + np.log(est["pc_ema"] + PRIOR_EPS) - log_ps,
            "pc_ema_self": src + np.log(est["pc_ema_self"] + PRIOR_EPS) - log_ps,
            "ad_oracle": adapted_logits(hb, w, b, params(p_t)),
            "ad_ema": adapted_logits(hb, w, b, params(est["ad_ema"])),
            "ad_ema_self": adapted_logits(hb, w, b, params(est["ad_ema_self"])),
        }
        for k, logits in out.items():
            correct[k] += int((logits.argmax(1) == yb).sum())
        src_mean = softmax(src).mean(0)
        for k in est:
            batch_mean = softmax(out[k]).mean(0) if k.endswith("_self") else src_mean
            est[k] = EMA_MOMENTUM * est[k] + (1 - EMA_MOMENTUM) * batch_mean
    return correct


def stage_check(work: Path, out: Path, fixture: bool) -> None:
    """Export check against torch, evaluation, fixture."""
    feats = dict(np.load(work / "features.npz"))
    w, b = feats["W"].astype(np.float64), feats["b"].astype(np.float64)
    d = w.shape[1]
    adapter = OrtAdapter(out)

    model = onnx.load(out)
    ops = sorted({n.op_type for n in model.graph.node})
    extra = set(ops) - ALLOWED_OPS
    if extra:
        raise SystemExit(f"exported adapter uses ops outside the allowed set: {sorted(extra)}")
    print(f"== export check: ops {ops}, opset {model.opset_import[0].version}, "
          f"{out.stat().st_size / 1024:.0f} KiB")
    ref = dict(np.load(work / "torch_reference.npz"))
    names = ["gamma", "beta", "delta_w", "delta_b"]
    worst = 0.0
    for j, p in enumerate(ref["priors"]):
        got = adapter(p)
        for name, g in zip(names, got):
            want = ref[name][j]
            if g.shape != want.shape:
                raise SystemExit(f"{name}: onnxruntime shape {g.shape}, torch {want.shape}")
            worst = max(worst, float(np.abs(g - want).max()))
    print(f"  onnxruntime vs torch over {len(ref['priors'])} priors, all four outputs: max abs error {worst:.2e}")
    if worst > 1e-4:
        raise SystemExit("export differs from torch")
    uni = adapter(np.full(C, 1.0 / C))
    dev = max(float(np.abs(uni[0] - 1).max()), *(float(np.abs(t).max()) for t in uni[1:]))
    print(f"  at the uniform prior: max |gamma−1|, |beta|, |delta_w|, |delta_b| = {dev:.2e}")

    # ---- evaluation
    h, z, y = feats["test_h"], feats["test_z"], feats["test_y"]
    log_ps = np.log(np.bincount(feats["train_y"], minlength=C) / len(feats["train_y"]))
    cache: dict = {}
    totals: dict = {}
    for seed in range(EVAL_SEEDS):
        for name, idx, oracle in eval_streams(y, seed):
            c = run_stream(h[idx], z[idx], y[idx], oracle, w, b, log_ps, adapter, cache)
            t = totals.setdefault(name, {"n": 0, **{k: 0 for k, _ in METHODS}})
            t["n"] += len(idx)
            for k in c:
                t[k] += c[k]
    head = "| stream (digits per seed) | " + " | ".join(label for _, label in METHODS) + " |"
    lines = [head, "|" + "---|" * (len(METHODS) + 1)]
    for name, t in totals.items():
        cells = [f"{100 * t[k] / t['n']:.2f}" for k, _ in METHODS]
        lines.append(f"| {name} ({t['n'] // EVAL_SEEDS}) | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(f"== evaluation: accuracy %, {EVAL_SEEDS} seeds pooled, batches of {EVAL_BATCH}, EMA momentum "
          f"{EMA_MOMENTUM}\n{table}")
    (work / "eval.md").write_text(table + "\n")

    if fixture:
        write_fixture(feats, w, b, adapter)


FIXTURE_README = """# Label-shift adapter fixture (MNIST net + models/mnist_ls_adapter.onnx)

Written by `tools/train_ls_adapter.py` (its `check` stage, onnxruntime {ort} on CPU) together with
`models/mnist_ls_adapter.onnx`; regenerate both with

    /tmp/torchenv/bin/python tools/train_ls_adapter.py

All files are float32 `.npy`.

| file | shape | content |
|---|---|---|
| `input.npy` | [8, 1, 28, 28] | MNIST test digits 0..7 preprocessed for `assets/mnist.onnx` (x/255, mean 0.1307, std 0.3081) |
| `features.npy` | [8, {d}] | h, the input of the net's final Gemm (`classifier.1`), from onnxruntime on `input.npy` |
| `prior.npy` | [1, 10] | a skewed label distribution: long-tailed, imbalance ratio 20, class order 3 7 0 9 1 5 2 8 4 6 |
| `expected_gamma.npy` | [1, {d}] | adapter output "gamma" at `prior.npy` (onnxruntime) |
| `expected_beta.npy` | [1, {d}] | adapter output "beta" |
| `expected_delta_w.npy` | [10, {d}] | adapter output "delta_w" |
| `expected_delta_b.npy` | [1, 10] | adapter output "delta_b" |
| `expected_logits.npy` | [8, 10] | (W + delta_w)(gamma ⊙ h + beta) + (b + delta_b), computed in float64 numpy, stored as float32 |

W is the final Gemm's weight `classifier.2.weight` [10, {d}] (transB = 1, so it is already the [C, D] matrix applied to
h) and b is `classifier.2.bias`. The prior is {prior}.

Labels {labels}; source argmax {src}; adapted argmax {adapted}.
The adapter changes the logits by up to {change:.1f} (it mostly shrinks the network's very large logit margins), so a
runtime that ignores an output or applies one in the wrong orientation misses `expected_logits.npy` by far more than
float32 rounding.
"""


def write_fixture(feats, w, b, adapter) -> None:
    images = imgproc.read_idx(MNIST / "t10k-images-idx3-ubyte")[:8]
    x = imgproc.mnist_for_mnist(images)
    model = onnx.load(MODEL)
    h_name, _, _ = final_layer(model)
    h, z = ort_features(images, model, h_name)
    if not np.array_equal(h, feats["test_h"][:8]):
        raise SystemExit("fixture features differ from the cached test features")
    # A skewed prior the runtime will meet in practice: long-tailed, ratio 20, a scrambled class order.
    order = np.array([3, 7, 0, 9, 1, 5, 2, 8, 4, 6])
    prior = long_tailed(1.0, 20.0, order)
    prior = (prior / prior.sum()).astype(np.float32).reshape(1, C)
    gamma, beta, dw, db = adapter(prior)
    logits = adapted_logits(h.astype(np.float64), w, b, (gamma, beta, dw, db))
    FIXTURE.mkdir(parents=True, exist_ok=True)
    files = {"input": x, "features": h, "prior": prior, "expected_gamma": gamma, "expected_beta": beta,
             "expected_delta_w": dw, "expected_delta_b": db, "expected_logits": logits.astype(np.float32)}
    for name, arr in files.items():
        np.save(FIXTURE / f"{name}.npy", np.ascontiguousarray(arr, dtype=np.float32))
    labels = imgproc.read_idx(MNIST / "t10k-labels-idx1-ubyte")[:8]
    import onnxruntime

    (FIXTURE / "README.md").write_text(FIXTURE_README.format(
        ort=onnxruntime.__version__, prior=np.array2string(prior[0], precision=5, separator=", "), d=h.shape[1],
        labels=labels.tolist(),
        src=z.argmax(1).tolist(), adapted=logits.argmax(1).tolist(), change=np.abs(logits - z).max()))
    print(f"== fixture {FIXTURE.relative_to(ROOT)}: labels {labels.tolist()}, source argmax {z.argmax(1).tolist()}, "
          f"adapted argmax {logits.argmax(1).tolist()}, max |logits' − logits| {np.abs(logits - z).max():.3f}")


# ------------------------------------------------------------------------------------------------------------------
# torch side (/tmp/torchenv)


def build_adapter(d: int, hidden: int):
    import torch
    from torch import nn

    class LabelShiftAdapter(nn.Module):
        """Prior [K, C] -> (gamma [K, D], beta [K, D], delta_w [K, C, D], delta_b [K, C]); see the module doc."""

        def __init__(self):
            super().__init__()
            self.register_buffer("center", torch.eye(C) - 1.0 / C)
            self.l1 = nn.Linear(C, hidden)
            self.l2 = nn.Linear(hidden, hidden)
            # Zero heads: the untrained adapter is gamma = 1, beta = 0, delta_w = 0 and delta_b = u·S.
            self.w_gamma = nn.Parameter(torch.zeros(hidden, d))
            self.w_beta = nn.Parameter(torch.zeros(hidden, d))
            self.w_dw = nn.Parameter(torch.zeros(hidden, C * d))
            self.w_db = nn.Parameter(torch.zeros(hidden, C))
            self.skip = nn.Parameter(torch.eye(C))

        def trunk(self, prior):
            u = torch.log(prior + PRIOR_EPS) @ self.center
            a1 = torch.tanh(self.l1(u)) - torch.tanh(self.l1.bias)
            a2 = torch.tanh(self.l2(a1)) - torch.tanh(self.l2.bias)
            return u, a2

        def forward(self, prior):
            u, a = self.trunk(prior)
            return (1 + a @ self.w_gamma, a @ self.w_beta, (a @ self.w_dw).reshape(-1, C, d),
                    a @ self.w_db + u @ self.skip)

    class ExportAdapter(nn.Module):
        """The trained adapter for one prior [1, C], written so that the ONNX graph holds only allowed ops: every
        constant is a tensor (an initializer, no Constant/Sub/Slice nodes) and the shifts are Adds."""

        def __init__(self, m: LabelShiftAdapter):
            super().__init__()
            t = lambda x: x.detach().clone()  # noqa: E731
            self.register_buffer("eps", torch.full((1, C), PRIOR_EPS))
            self.register_buffer("center", t(m.center))
            self.register_buffer("w1", t(m.l1.weight.T))
            self.register_buffer("b1", t(m.l1.bias))
            self.register_buffer("s1", t(-torch.tanh(m.l1.bias)))
            self.register_buffer("w2", t(m.l2.weight.T))
            self.register_buffer("b2", t(m.l2.bias))
            self.register_buffer("s2", t(-torch.tanh(m.l2.bias)))
            self.register_buffer("ones", torch.ones(1, d))
            for name in ("w_gamma", "w_beta", "w_dw", "w_db", "skip"):
                self.register_buffer(name, t(getattr(m, name)))

        def forward(self, prior):
            u = torch.matmul(torch.log(prior + self.eps), self.center)
            a1 = torch.tanh(torch.matmul(u, self.w1) + self.b1) + self.s1
            a2 = torch.tanh(torch.matmul(a1, self.w2) + self.b2) + self.s2
            gamma = torch.matmul(a2, self.w_gamma) + self.ones
            beta = torch.matmul(a2, self.w_beta)
            delta_w = torch.reshape(torch.matmul(a2, self.w_dw), (C, d))
            delta_b = torch.matmul(a2, self.w_db) + torch.matmul(u, self.skip)
            return gamma, beta, delta_w, delta_b

    return LabelShiftAdapter(), ExportAdapter


def sample_priors(gen, k: int):
    """k target label distributions [k, C] (float64): 40 % long-tailed, 50 % Dirichlet, 10 % uniform."""
    import torch

    out = torch.empty(k, C, dtype=torch.float64)
    kind = torch.rand(k, generator=gen)
    for i in range(k):
        if kind[i] < 0.4:
            ratio = float(torch.exp(torch.rand(1, generator=gen) * np.log(100.0)))
            r = float(torch.rand(1, generator=gen))
            order = (torch.arange(C) if r < 1 / 3 else torch.arange(C).flip(0) if r < 2 / 3
                     else torch.randperm(C, generator=gen)).numpy()
            p = torch.from_numpy(long_tailed(1.0, ratio, order))
        elif kind[i] < 0.9:
            conc = float(torch.exp(np.log(0.05) + torch.rand(1, generator=gen) * np.log(10 / 0.05)))
            p = torch.distributions.Dirichlet(torch.full((C,), conc, dtype=torch.float64)).sample()
        else:
            p = torch.ones(C, dtype=torch.float64)
        out[i] = p / p.sum()
    return out


def perturb(gen, p):
    """What an online estimate looks like: half of the priors are exact; the others are mixed with a random
    distribution (weight up to 0.2, the mass a classifier's errors and an EMA's lag spread over the other classes) and
    scaled by log-normal noise (σ up to 0.5)."""
    import torch

    k = p.shape[0]
    noisy = torch.rand(k, 1, generator=gen, dtype=torch.float64) < 0.5
    lam = 0.2 * torch.rand(k, 1, generator=gen, dtype=torch.float64)
    mix = torch.distributions.Dirichlet(torch.ones(C, dtype=torch.float64)).sample((k,))
    sigma = 0.5 * torch.rand(k, 1, generator=gen, dtype=torch.float64)
    q = ((1 - lam) * p + lam * mix) * torch.exp(sigma * torch.randn(k, C, generator=gen, dtype=torch.float64))
    q = q / q.sum(1, keepdim=True)
    return torch.where(noisy, q, p)


def constants_to_initializers(m: onnx.ModelProto) -> onnx.ModelProto:
    """The tracer writes Reshape's target shape as a Constant node; the runtime's op set has no Constant, so every
    Constant becomes an initializer of the same name."""
    keep = []
    for n in m.graph.node:
        if n.op_type != "Constant":
            keep.append(n)
            continue
        if len(n.attribute) != 1 or n.attribute[0].name != "value":
            raise SystemExit(f"Constant node {n.name} does not hold a plain tensor value")
        t = onnx.TensorProto()
        t.CopyFrom(n.attribute[0].t)
        t.name = n.output[0]
        m.graph.initializer.append(t)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def stage_train(args, work: Path) -> None:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    # torch.distributions.Dirichlet draws from the global generator (seeded above), everything else from `gen`.
    gen = torch.Generator().manual_seed(args.seed)

    feats = np.load(work / "features.npz")
    args.h_name = final_layer(onnx.load(MODEL))[0]
    h = torch.from_numpy(feats["train_h"]).float()
    y = torch.from_numpy(feats["train_y"])
    if args.shifted:
        h = torch.cat([h, torch.from_numpy(feats["shifted_h"]).float()])
        y = torch.cat([y, y])
    w = torch.from_numpy(feats["W"]).float()
    b = torch.from_numpy(feats["b"]).float()
    n, d = h.shape
    log_ps = torch.log(torch.bincount(y, minlength=C).double() / n).float()

    model, export_cls = build_adapter(d, args.hidden)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"== training: D = {d}, hidden {args.hidden}, {n_params} parameters, {args.steps} steps of "
          f"{args.priors} priors × {args.per_prior} source digits")
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    t0 = time.time()
    running = 0.0
    for step in range(1, args.steps + 1):
        p_t = sample_priors(gen, args.priors)
        p_in = perturb(gen, p_t)
        idx = torch.randint(0, n, (args.priors, args.per_prior), generator=gen)
        hb, yb = h[idx], y[idx]  # [K, B, D], [K, B]
        gamma, beta, dw, db = model(p_in.float())
        hm = gamma[:, None, :] * hb + beta[:, None, :]
        z = torch.einsum("kbd,kcd->kbc", hm, w + dw) + (b + db)[:, None, :]
        adj = z + (log_ps - torch.log(p_t.float() + PRIOR_EPS))[:, None, :]
        loss = F.cross_entropy(adj.reshape(-1, C), yb.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % max(1, args.steps // 10) == 0:
            print(f"  step {step:5d}  loss (EMA) {running:.4f}  {time.time() - t0:.0f} s")
    train_s = time.time() - t0
    print(f"  training time {train_s:.1f} s (1 thread)")

    # ---- export
    model.eval()
    exp = export_cls(model).eval()
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.full((1, C), 1.0 / C)
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (fixed shapes, no dynamo graph rewrites); silence its notice.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(exp, (dummy,), str(out), input_names=["prior"],
                          output_names=["gamma", "beta", "delta_w", "delta_b"], opset_version=17, dynamo=False,
                          do_constant_folding=True)
    m = constants_to_initializers(onnx.load(out))
    m.doc_string = ("Label-shift adapter for assets/mnist.onnx (Park et al., ICCV 2023, as reconstructed in "
                    "shared/docs/tta-methods.md §6); made by tools/train_ls_adapter.py. prior [1,C] -> gamma [1,D], "
                    "beta [1,D], delta_w [C,D], delta_b [1,C]; logits' = (W+delta_w)(gamma*h+beta) + (b+delta_b).")
    m.producer_name = "tools/train_ls_adapter.py"
    # The adapter is only meaningful for the exact network whose last layer it was trained against.
    onnx.helper.set_model_props(m, {"source_model": "assets/mnist.onnx", "source_model_sha256":
                                    hashlib.sha256(MODEL.read_bytes()).hexdigest(), "feature": args.h_name})
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, out)

    # Torch outputs at a spread of priors (the trained module and the export module, which must agree) for the
    # onnxruntime check.
    priors = torch.cat([torch.full((1, C), 1.0 / C, dtype=torch.float64), sample_priors(gen, 15)]).float()
    ref = {k: [] for k in ("gamma", "beta", "delta_w", "delta_b")}
    with torch.no_grad():
        full = model(priors)
        worst = 0.0
        for j in range(len(priors)):
            outs = exp(priors[j:j + 1])
            for name, o, f in zip(ref, outs, full):
                f = f[j].reshape(o.shape)
                worst = max(worst, float((o - f).abs().max()))
                ref[name].append(o.numpy())
    print(f"  export module vs trained module: max abs error {worst:.2e}")
    np.savez(work / "torch_reference.npz", priors=priors.numpy(), **{k: np.stack(v) for k, v in ref.items()})
    (work / "train.json").write_text(json.dumps({"train_seconds": train_s, "parameters": n_params, "D": d,
                                                 "args": vars(args)}, indent=1, default=str))


# ------------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", nargs="?", default="all", choices=["all", "features", "train", "check"],
                    help="all (default, torch interpreter) runs features and check through --ort-python")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--ort-python", default=os.environ.get("ACCLIMATE_ORT_PYTHON", str(ROOT / ".venv/bin/python")))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the adapter ONNX to write (train) or check")
    ap.add_argument("--no-fixture", action="store_true", help=f"do not (re)write {FIXTURE.relative_to(ROOT)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--priors", type=int, default=32, help="target label distributions per step")
    ap.add_argument("--per-prior", type=int, default=128, help="source digits per distribution per step")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--shifted", type=int, default=1, help="1: train on the digits and a copy shifted by ≤1 px")
    args = ap.parse_args()
    args.out = args.out.resolve()
    args.work.mkdir(parents=True, exist_ok=True)

    def ort_stage(stage):
        cmd = [args.ort_python, __file__, stage, "--work", str(args.work), "--out", str(args.out)]
        subprocess.run(cmd + (["--no-fixture"] if args.no_fixture else []), check=True)

    if args.stage == "features":
        stage_features(args.work)
    elif args.stage == "train":
        stage_train(args, args.work)
    elif args.stage == "check":
        stage_check(args.work, args.out, not args.no_fixture)
    else:
        print(f"== features of {MODEL.relative_to(ROOT)} (onnxruntime, {args.ort_python})")
        ort_stage("features")
        stage_train(args, args.work)
        ort_stage("check")


if __name__ == "__main__":
    main()
