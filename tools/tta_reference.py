#!/usr/bin/env python3
"""PyTorch reference for Acclimate's adaptation (issue 3): normalization statistics modes,
TENT (and ETA/EATA) with PyTorch's own optimizers, and the fixtures the Rust tests compare against.

Needs torch (not in CI): a venv from tools/requirements-reference.txt, then

    python tools/tta_reference.py --out tests/fixtures/tta

The ONNX graph is interpreted with torch ops by tools/onnx_torch.py, from the same initializers the
runtime loads; BN scale and bias are the nn.Parameters (named by their ONNX initializer names).
Semantics follow shared/docs/tta-methods.md: entropy via log_softmax, pre-update logits returned,
TENT-mode BN with biased batch variance and gradients through the statistics, RBN (RoTTA) EMA
statistics normalising with the updated values, BN-alpha with the unbiased batch variance.

Before writing anything the script checks itself (`self_checks`): the interpreter against ONNX's
own reference evaluator, each BN mode against torch's F.batch_norm, and the gradients through the
batch statistics against finite differences.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper, TensorProto

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_torch import OnnxTorch  # noqa: E402
from tta_losses import losses_doc  # noqa: E402
from tta_selfcheck import self_checks  # noqa: E402
import tta_output  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def f32(t):
    """A tensor as nested lists of Python floats holding the exact float32 values."""
    return t.detach().to(torch.float32).numpy().tolist()


def entropy(z):
    return -(z.softmax(1) * z.log_softmax(1)).sum(1)


def make_optimizer(params, o):
    if o["kind"] == "sgd":
        return torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"], dampening=o["dampening"],
                               nesterov=o["nesterov"], weight_decay=o["weight_decay"])
    return torch.optim.Adam(params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"])


DEFAULT_NORM = {"source": "source", "norm": "batch", "rbn": "ema", "tent": "batch", "eta": "batch", "eata": "batch", "sar": "batch",
                "woc": "batch", "eata+woc": "batch", "lame": "source"}
ADAPTING = ("tent", "eta", "eata", "woc", "sar", "eata+woc")


def run(model_path, cfg, batches):
    """The method's records, then its output stages (LAME, label shift; tools/tta_output.py)."""
    res = run_method(model_path, cfg, batches)
    tta_output.output_stage(model_path, cfg, batches, res, cfg["adapt"]["method"] in ADAPTING)
    return res


def run_method(model_path, cfg, batches):
    ad, o = cfg["adapt"], cfg["optimizer"]
    method = ad["method"]
    norm = ad.get("norm") or DEFAULT_NORM[method]
    exclude = ad.get("exclude", [])
    net = OnnxTorch(model_path, norm, ad["norm_momentum"], ad["norm_alpha"],
                    adapted=lambda name: method in ADAPTING and not any(s in name for s in exclude))
    params = dict(net.adapted_parameters())
    opt = make_optimizer(list(params.values()), o) if params else None
    if method in ("eta", "eata", "eata+woc"):
        return run_eata(net, params, opt, cfg, batches, method, model_path)
    if method == "woc":
        return run_woc(net, params, opt, cfg, batches)
    if method == "sar":
        return run_sar(net, params, opt, cfg, batches)
    steps = []
    for x in batches:
        x = torch.tensor(x)
        if ad["episodic"]:
            net.reset()
            if opt is not None:
                opt = make_optimizer(list(params.values()), o)
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
        rec = {"logits": f32(logits), "loss": loss_first, "params": {k: f32(p) for k, p in params.items()}}
        if norm == "ema":
            rec["stats"] = {k: f32(v) for k, v in net.running_stats().items()}
        steps.append(rec)
    return {"steps": steps}


def fisher(net, params, batches):
    """EATA's Fisher: batch statistics, argmax pseudo-labels, squared batch-mean CE gradients,
    averaged over batches; the parameters do not move."""
    f = {k: torch.zeros_like(p) for k, p in params.items()}
    for x in batches:
        z = net(torch.tensor(x))
        F.cross_entropy(z, z.max(1)[1]).backward()
        for k, p in params.items():
            f[k] += p.grad.detach() ** 2
            p.grad = None
    return {k: v / len(batches) for k, v in f.items()}


def run_eata(net, params, opt, cfg, batches, method, model_path):
    """ETA/EATA as mr-eggplant/EATA's forward_and_adapt_eata (tta-methods.md §2). When nothing is
    selected there is no backward and no step; the recorded loss is then the penalty alone (the
    reference's mean over an empty selection is NaN and unused), which is what the runtime reports."""
    e = cfg["eata"]
    classes = None
    e0 = e.get("e_margin")
    d = e["d_margin"]
    beta = e["fisher_alpha"] if method in ("eata", "eata+woc") else 0.0
    woc = method == "eata+woc"
    fish, anchor = {}, {}
    if beta > 0:
        # Without clean batches the Fisher is zero (the penalty vanishes), as in the runtime.
        fish = {k: torch.zeros_like(p) for k, p in params.items()}
        if "fisher_batches" in e:
            fdir = Path(model_path).parent / e["fisher_batches"]
            fish = fisher(net, params, [np.load(p) for p in sorted(fdir.glob("*.npy"))])
        anchor = {k: p.detach().clone() for k, p in params.items()}
    m = None
    steps = []
    for x in batches:
        x = torch.tensor(x)
        if woc:
            # eata+woc: the WoC filter (the original model: source affine parameters, the batch's
            # statistics, no gradients) ANDed with EATA's entropy filter before the redundancy
            # filter; m moves with the samples that pass all three (tta-methods.md §4, §12).
            with torch.no_grad():
                net.use_source = True
                p0 = net(x).softmax(1)
                net.use_source = False
            v0, c0 = p0.max(1)
        z = net(x)
        classes = z.shape[1]
        if e0 is None:
            e0 = 0.4 * float(np.log(classes))
        ent = entropy(z)
        keep = ent < e0
        if woc:
            keep = keep & (z.softmax(1).gather(1, c0[:, None])[:, 0] >= v0)
        ids1 = torch.where(keep)[0]
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
            loss = loss + beta * sum((fish[k] * (p - anchor[k]) ** 2).sum() for k, p in params.items())
        if len(sel) > 0:
            loss.backward()
            opt.step()
        opt.zero_grad()
        steps.append({
            "logits": f32(z),
            "loss": float(loss.item()),
            "params": {k: f32(p) for k, p in params.items()},
            "selected": [int(i) for i in sel],
            "weights": f32(w),
        })
    out = {"steps": steps}
    if beta > 0:
        out["fisher"] = {k: f32(v) for k, v in fish.items()}
    return out


def run_woc(net, params, opt, cfg, batches):
    """WoC as UniEnt's OSTTA (tta-methods.md §4): the original model (source affine parameters,
    the batch's statistics) without gradients; keep i iff p[i, c0] >= p0[i, c0] with c0 the
    original argmax; loss = mean entropy over the kept - lambda * H(mean p over the batch). With
    nothing kept (UniEnt's NaN) the runtime takes no step; the loss is then the diversity term."""
    lam = cfg["woc"]["lambda"]
    steps = []
    for x in batches:
        x = torch.tensor(x)
        with torch.no_grad():
            net.use_source = True
            p0 = net(x).softmax(1)
            net.use_source = False
        v0, c0 = p0.max(1)
        z = net(x)
        p = z.softmax(1)
        v = p.gather(1, c0[:, None])[:, 0]
        sel = torch.where(v >= v0)[0]
        pm = p.mean(0)
        div = -(pm * torch.log(pm)).sum()
        ent = entropy(z)
        loss = (ent[sel].mean(0) if len(sel) > 0 else torch.zeros(())) - lam * div
        if len(sel) > 0:
            loss.backward()
            opt.step()
        opt.zero_grad()
        steps.append({
            "logits": f32(z),
            "loss": float(loss.item()),
            "params": {k: f32(q) for k, q in params.items()},
            "selected": [int(i) for i in sel],
            "weights": [1.0] * len(sel),
        })
    return {"steps": steps}


def run_sar(net, params, opt, cfg, batches):
    """SAR as mr-eggplant/SAR's forward_and_adapt_sar with its SAM (tta-methods.md §3): entropy
    filter, ascent by rho * g / (||g||_2 + 1e-12) (the norm of the stack of per-tensor norms),
    second forward and re-filter within the first selection, gradient there, restore, base SGD
    step; EMA (0.9) of the second loss when it is not NaN; reset below the threshold. A reset
    clears the EMA only when `reset_clears_ema` (the authors' code keeps it)."""
    sc = cfg["sar"]
    rho, threshold, clears = sc["rho"], sc["reset_threshold"], sc["reset_clears_ema"]
    e0 = sc.get("e_margin")
    ema = None
    steps = []
    for x in batches:
        x = torch.tensor(x)
        z = net(x)
        if e0 is None:
            e0 = 0.4 * float(np.log(z.shape[1]))
        ent = entropy(z)
        ids1 = torch.where(ent < e0)[0]
        loss = ent[ids1].mean(0)
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
        norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
        scale = rho / (norm + 1e-12)
        old = {}
        with torch.no_grad():
            for (k, p), g in zip(params.items(), grads):
                old[k] = p.data.clone()
                p.add_(g * scale)
        opt.zero_grad()
        ent2 = entropy(net(x))[ids1]
        ids2 = torch.where(ent2 < e0)[0]
        loss2 = ent2[ids2].mean()
        loss2_value = float(loss2.item())
        if not np.isnan(loss2_value):
            ema = loss2_value if ema is None else 0.9 * ema + 0.1 * loss2_value
        loss2.backward()
        with torch.no_grad():
            for k, p in params.items():
                p.data = old[k]
        opt.step()
        opt.zero_grad()
        reset = ema is not None and ema < threshold
        if reset:
            net.reset()
            opt = make_optimizer(list(params.values()), cfg["optimizer"])
            if clears:
                ema = None
        steps.append({
            "logits": f32(z),
            "loss": float(loss.item()) if len(ids1) > 0 else 0.0,
            "params": {k: f32(q) for k, q in params.items()},
            "ema": ema,
            "reset": bool(reset),
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


def write(out, name, model, cfg, batches, asset=None, fisher_batches=None, files=None):
    d = out / name
    if d.exists():
        shutil.rmtree(d)
    (d / "batches").mkdir(parents=True)
    # Extra inputs the config names (relative to the fixture), each made by a function of its path.
    for fname, make in (files or {}).items():
        make(d / fname)
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


def output_scenarios(out, tiny):
    """LAME and the label-shift corrections (issue 4; tools/tta_output.py). The tiny net's head is
    replaced by one that predicts every class (tta_output.balanced_head). Own random stream, so
    these fixtures do not move when scenarios are added above."""
    rng = np.random.default_rng(4)
    probe = [rng.normal(0, 1, (64, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    h = np.concatenate([tta_output.tensor_of(OnnxTorch(tiny, "source"), x, "f").numpy() for x in probe])
    hb = np.concatenate([tta_output.tensor_of(OnnxTorch(tiny, "batch"), x, "f").numpy() for x in probe])
    ls, ls_nt, ls_b = out / "_tiny_ls.onnx", out / "_tiny_ls_nt.onnx", out / "_tiny_ls_batch.onnx"
    tta_output.balanced_head(tiny, ls, h, seed=11)
    # TENT normalises with batch statistics, which moves the features: its head is balanced there.
    tta_output.balanced_head(tiny, ls_b, hb, seed=11)
    # The same kind of head stored as Gemm transB = 0 with alpha 0.5 and beta 2 (the adapter reads
    # the weight in the other layout and scales it).
    tta_output.balanced_head(tiny, ls_nt, h, seed=12, trans_b=False, alpha=0.5, beta=2.0)
    lb = [rng.normal(0, 1, (n, 3, 8, 8)).astype(np.float32) for n in (8, 8, 4)]
    sb = [rng.normal(0, 1, (8, 3, 8, 8)).astype(np.float32) for _ in range(3)]
    src = config("source")
    write(out, "tiny_lame_rbf", ls, config("lame") | {"lame": {"affinity": "rbf", "knn": 5, "lambda": 1.0}}, lb)
    write(out, "tiny_lame_knn", ls, config("lame") | {"lame": {"affinity": "knn", "knn": 5}}, lb)
    write(out, "tiny_lame_linear", ls, config("lame") | {"lame": {"affinity": "linear", "lambda": 0.5,
                                                                   "max_steps": 60, "features": "f"}}, lb)
    write(out, "tiny_lame_rbf_ls_ema", ls, config("lame") | {"label_shift": {"mode": "ema", "momentum": 0.8}}, lb)
    prior = [0.1, 0.3, 0.2, 0.25, 0.15]
    write(out, "tiny_ls_ema_source", ls, src | {"label_shift": {"mode": "ema"}}, sb)
    write(out, "tiny_ls_ema_tent", ls_b, config() | {"label_shift": {"mode": "ema", "momentum": 0.7,
                                                                     "source_prior": prior}}, sb)
    write(out, "tiny_ls_em_source", ls, src | {"label_shift": {"mode": "em", "source_prior": prior}}, sb)
    write(out, "tiny_ls_em_tent", ls_b, config() | {"label_shift": {"mode": "em"}}, sb)
    source_data = rng.normal(0, 1, (400, 3, 8, 8)).astype(np.float32)
    conf = tta_output.confusion(ls, source_data, seed=13)
    conf_b = tta_output.confusion(ls_b, source_data, seed=13, norm="batch")
    files = {"confusion.npy": lambda p: np.save(p, conf),
             "prior.npy": lambda p: np.save(p, np.asarray(prior, dtype=np.float32))}
    write(out, "tiny_ls_bbse_source", ls, src | {"label_shift": {"mode": "bbse", "confusion": "confusion.npy",
                                                                 "source_prior": "prior.npy"}}, sb, files=files)
    write(out, "tiny_ls_bbse_tent", ls_b, config() | {"label_shift": {"mode": "bbse", "confusion": "confusion.npy"}},
          sb, files={"confusion.npy": lambda p: np.save(p, conf_b)})
    adapter = {"adapter.onnx": lambda p: tta_output.adapter_model(p, 5, 6, seed=14)}
    write(out, "tiny_ls_adapter", ls, src | {"label_shift": {"mode": "adapter", "adapter": "adapter.onnx"}}, sb,
          files=adapter)
    write(out, "tiny_ls_adapter_nt_lame", ls_nt, config("lame") | {"lame": {"affinity": "knn", "knn": 3},
                                                                    "label_shift": {"mode": "adapter", "momentum": 0.5,
                                                                                    "adapter": "adapter.onnx"}},
          lb, files=adapter)
    for m in (ls, ls_nt, ls_b):
        m.unlink()


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
        dict(kind="sgd", lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0),
        dict(kind="sgd", lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.01),
        dict(kind="adam", lr=0.001, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.01),
    ]
    # Every case names every key (the unused ones at torch's defaults), as the optimizer config does.
    defaults = dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8)
    cases = []
    for c in configs:
        c = {"kind": c["kind"], "lr": c["lr"], **{k: c.get(k, v) for k, v in defaults.items()}}
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
            params.append(f32(p))
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
    self_checks(tiny, ROOT / "assets/svhn.onnx", b8[0], np.load(ROOT / "assets/mnist32_first64.npy")[:8])
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
    write(out, "tiny_eata_woc", tiny, config("eata+woc", lr=0.1, eata={"e_margin": 1.40, "d_margin": 0.9995,
                                                                       "fisher_alpha": 2000.0, "fisher_batches": "fisher"}),
          eb + eb[:1], fisher_batches=fb)
    write(out, "tiny_woc", tiny, config("woc", lr=0.1, eata=None) | {"woc": {"lambda": 0.5}}, eb)
    # SAR: E0 rejects some samples; the threshold is high enough that the EMA of the second loss
    # falls below it and the model resets (the authors' code keeps the EMA, so it resets again).
    sar = {"e_margin": 1.40, "rho": 0.05, "reset_threshold": 1.341, "reset_clears_ema": False}
    write(out, "tiny_sar", tiny, config("sar", lr=0.05) | {"sar": sar}, eb + eb[:1])
    output_scenarios(out, tiny)
    tiny.unlink()
    (out / "optim.json").write_text(json.dumps(optim_cases()))
    (out / "losses.json").write_text(json.dumps(losses_doc()))
    print(f"wrote fixtures to {out} with torch {torch.__version__}")


if __name__ == "__main__":
    main()
