#!/usr/bin/env python3
"""PyTorch reference for adapting LayerNorm and GroupNorm affine parameters (the harness's
`collect_params` adds them to BatchNorm's; SAR's ViT-LN and ResNet-GN models, tta-methods.md §1, §3).

Unlike tools/tta_reference.py, the networks here are native torch modules (nn.LayerNorm,
nn.GroupNorm, nn.Linear, F.gelu), exported with `torch.onnx.export` (the TorchScript exporter,
opset 17: LayerNormalization, and GroupNorm as InstanceNormalization on a grouped view followed by
the module's weight and bias as Mul and Add). The reference adapts the modules' own parameters,
so it also checks that the runtime finds in the exported graph exactly the parameters torch has.
The initializer each parameter became is found by its values (the exporter may rename or reshape
it); the fixture records the parameters under those ONNX names.

Needs torch (not in CI), as tools/tta_reference.py:

    python tools/norm_affine_reference.py --out tests/fixtures/tta

Writes `tiny_tent_layernorm`, `tiny_sar_layernorm` and `tiny_tent_groupnorm` in the format
cli/tests/tta_reference.rs replays (see tests/fixtures/tta/README.md).
"""
import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tta_reference import config, entropy, f32, make_optimizer, run_sar, toml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class LnNet(nn.Module):
    """Patch tokens with LayerNorms, a GELU MLP with a residual, mean pooling and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.ln1 = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.ln2 = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = t + self.fc2(F.gelu(self.fc1(self.ln1(t))))
        return self.head(self.ln2(t.mean(1)))


class GnNet(nn.Module):
    """Two convolutions with GroupNorm and ReLU, global pooling and a head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.gn2 = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        return self.head(y.mean((2, 3)))


def norm_params(net):
    """The harness's collect_params for LN/GN: every LayerNorm and GroupNorm weight and bias."""
    out = {}
    for mname, m in net.named_modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            for pname, p in m.named_parameters(recurse=False):
                out[f"{mname}.{pname}"] = p
    return out


def make(cls, seed):
    torch.manual_seed(seed)
    net = cls()
    # Random affine parameters, so that each is found in the exported graph by its values.
    with torch.no_grad():
        for name, p in norm_params(net).items():
            p.copy_(torch.randn_like(p) * 0.3 + (0.0 if name.endswith("bias") else 1.0))
    net.requires_grad_(False)
    for p in norm_params(net).values():
        p.requires_grad_(True)
    return net


def export(net, path):
    x = torch.zeros(2, 3, 8, 8)
    torch.onnx.export(net, (x,), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)


def onnx_names(path, params):
    """The ONNX initializer holding each parameter's values (reshaped or not)."""
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    names = {}
    for k, p in params.items():
        v = p.detach().numpy().ravel()
        found = [n for n, a in inits.items() if a.dtype == np.float32 and a.size == v.size
                 and np.array_equal(a.ravel(), v)]
        assert len(found) == 1, f"{k}: initializers with its values: {found}"
        names[k] = found[0]
    return names


class Wrapped(nn.Module):
    """The net with reset() to its source parameters (what run_sar calls)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.source = copy.deepcopy(net.state_dict())

    def forward(self, x):
        return self.net(x)

    def reset(self):
        with torch.no_grad():
            for k, v in self.net.state_dict().items():
                v.copy_(self.source[k])


def run_tent(net, params, cfg, batches):
    opt = make_optimizer(list(params.values()), cfg["optimizer"])
    steps = []
    for x in batches:
        z = net(torch.tensor(x))
        loss = entropy(z).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps.append({"logits": f32(z), "loss": float(loss.item()), "params": {k: f32(p) for k, p in params.items()}})
    return {"steps": steps}


def write(out, name, cls, seed, cfg, batches):
    d = out / name
    if d.exists():
        shutil.rmtree(d)
    (d / "batches").mkdir(parents=True)
    net = make(cls, seed)
    export(net, d / "model.onnx")
    names = onnx_names(d / "model.onnx", norm_params(net))
    # The reference's parameters under their ONNX names, in the exported shapes.
    shapes = {i.name: list(i.dims) for i in onnx.load(str(d / "model.onnx")).graph.initializer}
    params = {names[k]: p for k, p in norm_params(net).items()}
    for i, b in enumerate(batches):
        np.save(d / "batches" / f"{i:03d}.npy", b.astype(np.float32))
    (d / "config.toml").write_text(toml(cfg))
    if cfg["adapt"]["method"] == "sar":
        res = run_sar(Wrapped(net), params, make_optimizer(list(params.values()), cfg["optimizer"]), cfg, batches)
    else:
        res = run_tent(net, params, cfg, batches)
    for s in res["steps"]:
        s["params"] = {k: np.reshape(np.array(v, np.float32), shapes[k]).tolist() for k, v in s["params"].items()}
    (d / "expected.json").write_text(json.dumps(res))
    print(name, sorted(names.items()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures/tta"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    rng = np.random.default_rng(2026)
    batches = [rng.normal(0.0, 1.0, (8, 3, 8, 8)).astype(np.float32) for _ in range(3)]
    write(out, "tiny_tent_layernorm", LnNet, 1, config("tent", kind="adam", lr=0.01), batches)
    sar = {"e_margin": 1.4, "rho": 0.05, "reset_threshold": 0.2, "reset_clears_ema": False}
    write(out, "tiny_sar_layernorm", LnNet, 2, config("sar", lr=0.05) | {"sar": sar}, batches)
    write(out, "tiny_tent_groupnorm", GnNet, 3, config("tent", kind="adam", lr=0.01), batches)


if __name__ == "__main__":
    main()
