#!/usr/bin/env python3
"""PyTorch reference for Acclimate's adaptation (issue 3): normalization statistics modes,
TENT with PyTorch's own optimizers, and the fixtures the Rust tests compare against.

Needs torch (not in CI): a venv from tools/requirements-reference.txt, then

    python tools/tta_reference.py --out tests/fixtures/tta

The ONNX graph is interpreted with torch ops, from the same initializers the runtime loads; BN
scale and bias become the nn.Parameters (named by their ONNX initializer names). Semantics follow
shared/docs/tta-methods.md: entropy via log_softmax, pre-update logits returned, TENT-mode BN with
biased batch variance and gradients through the statistics, RBN (RoTTA) EMA statistics normalising
with the updated values, BN-alpha with the unbiased batch variance.
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper, TensorProto

ROOT = Path(__file__).resolve().parent.parent


class OnnxNet:
    """Interprets the ops of the test networks; BN statistics per mode."""

    def __init__(self, path, norm, momentum=0.05, alpha=0.1, adapted=lambda node: True):
        self.model = onnx.load(str(path))
        self.w = {i.name: torch.tensor(numpy_helper.to_array(i).copy()) for i in self.model.graph.initializer}
        self.norm, self.momentum, self.alpha = norm, momentum, alpha
        self.params = {}
        self.bns = []
        for n in self.model.graph.node:
            if n.op_type == "BatchNormalization":
                self.bns.append(n)
                if adapted(n.name):
                    for k in n.input[1:3]:
                        self.params[k] = torch.nn.Parameter(self.w[k].clone())
        # Running statistics (updated in place by the EMA mode); source copies for reset.
        self.running = {k: self.w[k].clone() for n in self.bns for k in n.input[3:5]}
        self.source = {k: v.clone() for k, v in self.w.items()}

    def reset(self):
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.source[k])
            for k in self.running:
                self.running[k] = self.source[k].clone()

    def value(self, k):
        if k in self.params:
            return self.params[k]
        return self.w[k]

    def bn(self, n, x, attrs):
        eps = attrs.get("epsilon", 1e-5)
        g, b = self.value(n.input[1]), self.value(n.input[2])
        km, kv = n.input[3], n.input[4]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        if self.norm == "source":
            mean, var = self.running[km], self.running[kv]
        else:
            var_b, mean_b = torch.var_mean(x, dim=dims, unbiased=False)
            if self.norm == "batch":
                mean, var = mean_b, var_b
            elif self.norm == "ema":
                a = self.momentum
                mean = (1 - a) * self.running[km] + a * mean_b
                var = (1 - a) * self.running[kv] + a * var_b
                self.running[km], self.running[kv] = mean.detach().clone(), var.detach().clone()
            elif self.norm == "alpha":
                m = x.numel() // x.shape[1]
                a = self.alpha
                mean = (1 - a) * self.running[km] + a * mean_b
                var = (1 - a) * self.running[kv] + a * var_b * m / (m - 1)
            else:
                raise ValueError(self.norm)
        return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * g.view(shape) + b.view(shape)

    def __call__(self, x):
        env = {self.model.graph.input[0].name: x}
        for n in self.model.graph.node:
            a = {at.name: helper.get_attribute_value(at) for at in n.attribute}
            i = [env[k] if k in env else (self.value(k) if k else None) for k in n.input]
            t = n.op_type
            if t == "Conv":
                p = a.get("pads", [0, 0, 0, 0])
                assert p[0] == p[2] and p[1] == p[3]
                y = F.conv2d(i[0], i[1], i[2] if len(i) > 2 else None, stride=a.get("strides", [1, 1]),
                             padding=(p[0], p[1]), dilation=a.get("dilations", [1, 1]), groups=a.get("group", 1))
            elif t == "BatchNormalization":
                y = self.bn(n, i[0], a)
            elif t == "Relu":
                y = torch.relu(i[0])
            elif t == "Clip":
                y = F.hardtanh(i[0], float(i[1]), float(i[2]))
            elif t == "Add":
                y = i[0] + i[1]
            elif t == "MaxPool":
                p = a.get("pads", [0, 0, 0, 0])
                y = F.max_pool2d(i[0], a["kernel_shape"], a.get("strides"), padding=(p[0], p[1]))
            elif t == "GlobalAveragePool":
                y = i[0].mean(dim=(2, 3), keepdim=True)
            elif t == "Flatten":
                y = torch.flatten(i[0], a.get("axis", 1))
            elif t == "Gemm":
                bm = i[1].T if a.get("transB", 0) else i[1]
                y = a.get("alpha", 1.0) * (i[0] @ bm) + a.get("beta", 1.0) * i[2]
            else:
                raise ValueError(f"op {t} not in the reference interpreter")
            env[n.output[0]] = y
        return env[self.model.graph.output[0].name]


def entropy(z):
    return -(z.softmax(1) * z.log_softmax(1)).sum(1)


def make_optimizer(params, o):
    if o["kind"] == "sgd":
        return torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"], dampening=o["dampening"],
                               nesterov=o["nesterov"], weight_decay=o["weight_decay"])
    return torch.optim.Adam(params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"])


DEFAULT_NORM = {"source": "source", "norm": "batch", "rbn": "ema", "tent": "batch", "eta": "batch", "eata": "batch"}
ADAPTING = ("tent", "eta", "eata")


def run(model_path, cfg, batches):
    ad, o = cfg["adapt"], cfg["optimizer"]
    method = ad["method"]
    norm = ad.get("norm") or DEFAULT_NORM[method]
    exclude = ad.get("exclude", [])
    net = OnnxNet(model_path, norm, ad["norm_momentum"], ad["norm_alpha"],
                  adapted=lambda name: method in ADAPTING and not any(s in name for s in exclude))
    opt = make_optimizer(list(net.params.values()), o) if net.params else None
    if method in ("eta", "eata"):
        return run_eata(net, opt, cfg, batches, method, model_path)
    steps = []
    for x in batches:
        x = torch.tensor(x)
        if ad["episodic"]:
            net.reset()
            if opt is not None:
                opt = make_optimizer(list(net.params.values()), o)
        logits, loss_first = None, None
        for s in range(ad["steps"] if method == "tent" else 1):
            z = net(x)
            if logits is None:
                logits = z.detach().clone()
            if method == "tent":
                loss = entropy(z).mean()
                if loss_first is None:
                    loss_first = float(loss.item())
                loss.backward()
                opt.step()
                opt.zero_grad()
        rec = {
            "logits": logits.numpy().astype(np.float32).tolist(),
            "loss": loss_first,
            "params": {k: p.detach().numpy().astype(np.float32).tolist() for k, p in net.params.items()},
        }
        if norm == "ema":
            rec["stats"] = {k: v.numpy().astype(np.float32).tolist() for k, v in net.running.items()}
        steps.append(rec)
    return {"steps": steps}


def fisher(net, batches):
    """EATA's Fisher: batch statistics, argmax pseudo-labels, squared batch-mean CE gradients,
    averaged over batches; the parameters do not move."""
    f = {k: torch.zeros_like(p) for k, p in net.params.items()}
    for x in batches:
        z = net(torch.tensor(x))
        F.cross_entropy(z, z.max(1)[1]).backward()
        for k, p in net.params.items():
            f[k] += p.grad.detach() ** 2
            p.grad = None
    return {k: v / len(batches) for k, v in f.items()}


def run_eata(net, opt, cfg, batches, method, model_path):
    """ETA/EATA as mr-eggplant/EATA's forward_and_adapt_eata (tta-methods.md §2). When nothing is
    selected there is no backward and no step; the recorded loss is then the penalty alone (the
    reference's mean over an empty selection is NaN and unused), which is what the runtime reports."""
    e = cfg["eata"]
    classes = None
    e0 = e.get("e_margin")
    d = e["d_margin"]
    beta = e["fisher_alpha"] if method == "eata" else 0.0
    fish, anchor = {}, {}
    if method == "eata":
        fdir = Path(model_path).parent / e["fisher_batches"] if "fisher_batches" in e else None
        fb = [np.load(p) for p in sorted(fdir.glob("*.npy"))]
        fish = fisher(net, fb)
        anchor = {k: p.detach().clone() for k, p in net.params.items()}
    m = None
    steps = []
    for x in batches:
        z = net(torch.tensor(x))
        classes = z.shape[1]
        if e0 is None:
            e0 = 0.4 * float(np.log(classes))
        ent = entropy(z)
        ids1 = torch.where(ent < e0)[0]
        if m is not None and len(ids1) > 0:
            cos = F.cosine_similarity(m.unsqueeze(0), z[ids1].softmax(1), dim=1)
            ids2 = torch.where(cos.abs() < d)[0]
            sel = ids1[ids2]
        else:
            sel = ids1
        ent_s = ent[sel]
        if len(sel) > 0:
            new_p = z[sel].softmax(1).detach()
            m = new_p.mean(0) if m is None else 0.9 * m + 0.1 * new_p.mean(0)
        w = torch.exp(e0 - ent_s.detach())
        loss = (ent_s * w).mean(0) if len(sel) > 0 else torch.zeros((), dtype=torch.float32)
        if beta > 0:
            loss = loss + beta * sum((fish[k] * (p - anchor[k]) ** 2).sum() for k, p in net.params.items())
        if len(sel) > 0:
            loss.backward()
            opt.step()
        opt.zero_grad()
        steps.append({
            "logits": z.detach().numpy().astype(np.float32).tolist(),
            "loss": float(loss.item()),
            "params": {k: p.detach().numpy().astype(np.float32).tolist() for k, p in net.params.items()},
            "selected": [int(i) for i in sel],
            "weights": w.numpy().astype(np.float32).tolist(),
        })
    return {"steps": steps}


def tiny_model(path, seed=0):
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))

    def conv(name, x, y, cin, cout, k, stride, pad, group):
        init(f"{name}.weight", rng.normal(0, 0.4, (cout, cin // group, k, k)))
        init(f"{name}.bias", rng.normal(0, 0.1, cout))
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [y], name=name,
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group))

    def bn(name, x, y, c):
        init(f"{name}.weight", rng.normal(1.0, 0.2, c))
        init(f"{name}.bias", rng.normal(0.0, 0.2, c))
        init(f"{name}.running_mean", rng.uniform(-0.5, 0.5, c))
        init(f"{name}.running_var", rng.uniform(0.5, 2.0, c))
        nodes.append(helper.make_node("BatchNormalization", [x, f"{name}.weight", f"{name}.bias",
                                      f"{name}.running_mean", f"{name}.running_var"], [y], name=name, epsilon=1e-5))

    conv("conv1", "input", "c1", 3, 4, 3, 1, 1, 1)
    bn("bn1", "c1", "b1", 4)
    nodes.append(helper.make_node("Relu", ["b1"], ["r1"], name="relu1"))
    conv("conv2", "r1", "c2", 4, 6, 3, 2, 1, 2)
    bn("bn2", "c2", "b2", 6)
    nodes.append(helper.make_node("Relu", ["b2"], ["r2"], name="relu2"))
    conv("conv3", "r2", "c3", 6, 6, 3, 1, 1, 6)
    bn("bn3", "c3", "b3", 6)
    init("clip.min", np.array(0.0))
    init("clip.max", np.array(6.0))
    nodes.append(helper.make_node("Clip", ["b3", "clip.min", "clip.max"], ["k3"], name="clip3"))
    nodes.append(helper.make_node("Add", ["k3", "r2"], ["s"], name="residual"))
    nodes.append(helper.make_node("GlobalAveragePool", ["s"], ["g"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["g"], ["f"], name="flatten", axis=1))
    init("fc.weight", rng.normal(0, 0.5, (5, 6)))
    init("fc.bias", rng.normal(0, 0.1, 5))
    nodes.append(helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="acclimate-tools")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))


def config(method="tent", norm=None, kind="sgd", lr=0.05, momentum=0.9, dampening=0.0, nesterov=False,
           weight_decay=0.0, steps=1, episodic=False, exclude=(), eata=None):
    c = {
        "adapt": {"method": method, "norm": norm or DEFAULT_NORM[method], "norm_momentum": 0.05, "norm_alpha": 0.1,
                  "steps": steps, "episodic": episodic, "exclude": list(exclude)},
        "optimizer": {"kind": kind, "lr": lr, "momentum": momentum, "dampening": dampening, "nesterov": nesterov,
                      "weight_decay": weight_decay, "betas": [0.9, 0.999], "eps": 1e-8},
    }
    if eata is not None:
        c["eata"] = eata
    return c


def toml(cfg):
    def v(x):
        if isinstance(x, bool):
            return "true" if x else "false"
        if isinstance(x, str):
            return f'"{x}"'
        if isinstance(x, (list, tuple)):
            return "[" + ", ".join(v(e) for e in x) + "]"
        return repr(float(x)) if isinstance(x, float) else str(x)
    out = []
    for section, kv in cfg.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {v(val)}" for k, val in kv.items())
    return "\n".join(out) + "\n"


def write(out, name, model, cfg, batches, asset=None, fisher_batches=None):
    d = out / name
    if d.exists():
        shutil.rmtree(d)
    (d / "batches").mkdir(parents=True)
    if fisher_batches is not None:
        (d / "fisher").mkdir()
        for i, b in enumerate(fisher_batches):
            np.save(d / "fisher" / f"{i:03d}.npy", b.astype(np.float32))
    if asset:
        (d / "model.txt").write_text(asset + "\n")
    else:
        shutil.copy(model, d / "model.onnx")
    for i, b in enumerate(batches):
        np.save(d / "batches" / f"{i:03d}.npy", b.astype(np.float32))
    (d / "config.toml").write_text(toml(cfg))
    # Relative paths in the config (fisher_batches) are relative to the fixture, as for the runtime.
    (d / "expected.json").write_text(json.dumps(run(model if asset else d / "model.onnx", cfg, batches)))


def optim_cases():
    """torch.optim trajectories on random tensors (tests/fixtures/tta/optim.json)."""
    rng = np.random.default_rng(7)
    configs = [
        dict(kind="sgd", lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
        dict(kind="sgd", lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0),
        dict(kind="sgd", lr=0.05, momentum=0.9, dampening=0.5, nesterov=False, weight_decay=0.0),
        dict(kind="sgd", lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01),
        dict(kind="sgd", lr=0.00025, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.01),
        dict(kind="adam", lr=0.001, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0),
        dict(kind="adam", lr=0.01, betas=[0.8, 0.99], eps=1e-6, weight_decay=0.01),
    ]
    cases = []
    for c in configs:
        p0 = rng.normal(0, 1, 7).astype(np.float32)
        grads = [rng.normal(0, 1, 7).astype(np.float32) for _ in range(4)]
        p = torch.nn.Parameter(torch.tensor(p0))
        if c["kind"] == "sgd":
            opt = torch.optim.SGD([p], lr=c["lr"], momentum=c["momentum"], dampening=c["dampening"],
                                  nesterov=c["nesterov"], weight_decay=c["weight_decay"])
        else:
            opt = torch.optim.Adam([p], lr=c["lr"], betas=tuple(c["betas"]), eps=c["eps"], weight_decay=c["weight_decay"])
        params = []
        for g in grads:
            p.grad = torch.tensor(g)
            opt.step()
            params.append(p.detach().numpy().astype(np.float32).tolist())
        cases.append(dict(c, param0=p0.tolist(), grads=[g.tolist() for g in grads], params=params))
    return {"cases": cases}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures/tta"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    tiny = out / "_tiny.onnx"
    tiny_model(tiny)
    rng = np.random.default_rng(1)
    b8 = [rng.normal(0, 1, (8, 3, 8, 8)).astype(np.float32) for _ in range(3)]
    b1 = [rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32) for _ in range(3)]
    write(out, "tiny_tent_sgd", tiny, config(), b8)
    write(out, "tiny_tent_sgd_nesterov_wd", tiny, config(nesterov=True, weight_decay=0.01, steps=2), b8)
    write(out, "tiny_tent_sgd_dampening", tiny, config(dampening=0.5), b8)
    write(out, "tiny_tent_adam", tiny, config(kind="adam", lr=0.01), b8)
    write(out, "tiny_tent_adam_wd_steps3", tiny, config(kind="adam", lr=0.01, weight_decay=0.01, steps=3), b8)
    write(out, "tiny_tent_episodic", tiny, config(episodic=True), b8)
    write(out, "tiny_tent_exclude", tiny, config(exclude=["bn2"]), b8)
    write(out, "tiny_tent_ema_b8", tiny, config(norm="ema"), b8)
    write(out, "tiny_tent_source_b8", tiny, config(norm="source"), b8)
    for bs, batches in (("b8", b8), ("b1", b1)):
        write(out, f"tiny_source_{bs}", tiny, config("source"), batches)
        write(out, f"tiny_norm_{bs}", tiny, config("norm"), batches)
        write(out, f"tiny_rbn_{bs}", tiny, config("rbn"), batches)
        write(out, f"tiny_alpha_{bs}", tiny, config("norm", norm="alpha"), batches)
    digits = np.load(ROOT / "assets/mnist32_first64.npy")
    svhn_batches = [digits[i * 8:(i + 1) * 8] for i in range(3)]
    svhn = ROOT / "assets/svhn.onnx"
    write(out, "svhn_tent_sgd", svhn, config(lr=0.01), svhn_batches, asset="svhn.onnx")
    write(out, "svhn_tent_adam", svhn, config(kind="adam", lr=0.001), svhn_batches, asset="svhn.onnx")
    # ETA / EATA: thresholds picked so every path runs (some samples fail the entropy filter, some
    # the redundancy filter, and with ε = 0.05 later batches select nothing at all).
    eb = [rng.normal(0, 1, (8, 3, 8, 8)).astype(np.float32) * s for s in (1.0, 0.8, 1.2)]
    fb = [rng.normal(0, 1, (8, 3, 8, 8)).astype(np.float32) for _ in range(2)]
    write(out, "tiny_eta", tiny, config("eta", eata={"e_margin": 1.40, "d_margin": 0.9995, "fisher_alpha": 0.0}), eb)
    write(out, "tiny_eata", tiny, config("eata", eata={"e_margin": 1.40, "d_margin": 0.05, "fisher_alpha": 2000.0,
                                                       "fisher_batches": "fisher"}), eb, fisher_batches=fb)
    tiny.unlink()
    (out / "optim.json").write_text(json.dumps(optim_cases()))
    print(f"wrote fixtures to {out} with torch {torch.__version__}")


if __name__ == "__main__":
    main()
