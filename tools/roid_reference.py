#!/usr/bin/env python3
"""PyTorch reference for ROID (Marsden, Doebler, Yang, WACV 2024; issue 14), exact to
shared/docs/tta-universal.md §1 (written from mariodoebler/test-time-adaptation
`classification/methods/roid.py` @ 8b2ed63), with the authors' own `USE_CONSISTENCY=False`
switch: the augmentation-consistency term needs GPU augmentation kernels, which the runtime does
not have yet, so the runtime ships ROID without it (tta-universal.md §6).

Needs torch (not in CI; fixtures are committed):

    python tools/roid_reference.py --out tests/fixtures/tta

Writes
- `tiny_roid_*/` scenarios in the format of tools/tta_reference.py (replayed by
  cli/tests/tta_reference.rs): the returned (prior-corrected) logits, the loss, the kept
  samples and their weights, and the BN parameters after the step *and* the ensembling;
- `roid_kernels.json`: the ROID pieces on given logits (weights, SLR loss and its gradient, the
  class-probability EMA, the prior correction) and the optimizer step followed by the weight
  ensembling on given tensors (cli/tests/roid.rs checks the kernels against them).

One step, as the authors' `forward_and_adapt` (tta-universal.md §1.4):
1. z = f_θ(x), BN with the batch's statistics (gradients through them);
2. under no_grad: d = 1 − cos(ē, p) (F.cosine_similarity, eps 1e-8), d̂ min-max normalised,
   kept = d̂ ≥ mean(d̂) (the authors drop `d̂ < mean`), c = −H (log_softmax), ĉ min-max,
   w = exp(d̂·ĉ/T); ē ← m_p·ē + (1 − m_p)·mean_i p_i over the whole batch (after the weights);
3. L = Σ_kept w_i·SLR_i / B_cfg, SLR = −Σ q log(q/(1 − q) + 1e-5), q = clamp(p, 0, 0.99);
4. backward, optimizer step;
5. θ ← α_s·θ + (1 − α_s)·θ_src for every adapted tensor (Adam's moments untouched), unless α_s ≥ 1;
6. returned: z ⊙ π̃, π = mean_i p_i, s = max(1/B, 1/C)/max π, π̃ = (π + s)/(1 + s·C) (logits are
   multiplied, as the authors do: tta-universal.md §1.8.1).

The guard ROID lacks (tta-universal.md §1.8.2): when max d = min d or max c = min c (always at
B = 1), the min-max normalisation is 0/0 and the authors' θ becomes NaN for good. Here the
weights are then undefined and no gradient step is taken (no backward, the optimizer untouched,
loss 0, nothing kept); ē, the ensembling and the prior correction, which do not depend on the
weights, still run. The runtime does the same; a non-finite value anywhere else refuses the whole
step (the parameter guard of runtime/src/adapt/optim.rs).
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_torch import OnnxTorch  # noqa: E402
from tta_reference import f32, make_optimizer, tiny_model, toml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

ROID_DEFAULTS = {"temperature": 1.0 / 3.0, "momentum_probs": 0.9, "momentum_src": 0.99, "weighting": True,
                 "prior_correction": True, "consistency": False}


def slr(z):
    """utils/losses.py SoftLikelihoodRatio (clip 0.99, eps 1e-5), per sample."""
    p = torch.clamp(z.softmax(1), min=0.0, max=0.99)
    return -(p * torch.log((p / (torch.ones_like(p) - p)) + 1e-5)).sum(1)


def weights_of(z, ema, temperature):
    """(d̂, ĉ, kept, w) under no_grad, or None for d̂ or ĉ when its range is 0 (the guard)."""
    with torch.no_grad():
        p = z.softmax(1)
        d = 1 - F.cosine_similarity(ema.unsqueeze(dim=0), p, dim=1)
        c = (z.softmax(1) * z.log_softmax(1)).sum(1)
        rd, rc = d.max() - d.min(), c.max() - c.min()
        if not (bool(rd > 0) and bool(rc > 0)):
            return None
        dn = (d - d.min()) / (d.max() - d.min())
        mask = dn < dn.mean()
        cn = (c - c.min()) / (c.max() - c.min())
        w = torch.exp(dn * cn / temperature)
        w[mask] = 0.0
        return dn, cn, ~mask, w


def ema_probs(ema, z, m):
    with torch.no_grad():
        return m * ema + (1 - m) * z.softmax(1).mean(0)


def prior_correct(z):
    with torch.no_grad():
        prior = z.softmax(1).mean(0)
        smooth = max(1 / z.shape[0], 1 / z.shape[1]) / torch.max(prior)
        smoothed = (prior + smooth) / (1 + smooth * z.shape[1])
        return z * smoothed, smoothed


def mask_margin(dn):
    """The distance of the closest d̂ to the mask threshold mean(d̂): the fixtures keep it well
    above float32 noise, so the kept set cannot flip on rounding (tta-universal.md §1.8.6)."""
    return float((dn - dn.mean()).abs().min())


def run_roid(model_path, cfg, batches):
    ad, o, r = cfg["adapt"], cfg["optimizer"], {**ROID_DEFAULTS, **cfg.get("roid", {})}
    assert not r["consistency"], "the consistency term needs augmentation kernels (not in the runtime)"
    net = OnnxTorch(model_path, "batch", ad["norm_momentum"], ad["norm_alpha"], adapted=lambda name: True)
    params = dict(net.adapted_parameters())
    src = {k: p.detach().clone() for k, p in params.items()}
    opt = make_optimizer(list(params.values()), o)
    ema = None
    steps = []
    for x in batches:
        x = torch.tensor(x)
        z = net(x)
        b, c = z.shape
        b_cfg = r.get("batch_size", b)
        if ema is None:
            ema = 1 / c * torch.ones(c)
        ema_before = ema.clone()
        rec = {}
        if r["weighting"]:
            got = weights_of(z, ema, r["temperature"])
            ema = ema_probs(ema, z, r["momentum_probs"])
            if got is None:
                loss = None
            else:
                dn, cn, kept, w = got
                rec["margin"] = mask_margin(dn)
                loss = (slr(z) * w)[kept].sum() / b_cfg
                rec.update(div=f32(dn), cert=f32(cn))
        else:
            kept, w = torch.ones(b, dtype=torch.bool), torch.ones(b)
            loss = slr(z).sum() / b_cfg
        if loss is not None:
            loss.backward()
            rec["grads"] = {k: f32(p.grad) for k, p in params.items()}
            opt.step()
            opt.zero_grad()
            rec["selected"] = [int(i) for i in torch.where(kept)[0]]
            rec["weights"] = f32(w[kept])
        else:
            rec["selected"], rec["weights"] = [], []
        rec["params_step"] = {k: f32(p) for k, p in params.items()}
        if r["momentum_src"] < 1.0:
            with torch.no_grad():
                a = r["momentum_src"]
                for k, p in params.items():
                    p.data = a * p.data + (1 - a) * src[k]
        out, smoothed = prior_correct(z) if r["prior_correction"] else (z.detach(), None)
        rec.update({
            "logits": f32(out),
            "raw_logits": f32(z),
            "loss": float(loss.item()) if loss is not None else 0.0,
            "params": {k: f32(p) for k, p in params.items()},
            "class_probs_before": f32(ema_before),
            "class_probs": f32(ema),
        })
        if smoothed is not None:
            rec["smoothed_prior"] = f32(smoothed)
        steps.append(rec)
    return {"steps": steps}


def config(kind="adam", lr=0.01, momentum=0.9, nesterov=False, roid=None):
    return {
        "adapt": {"method": "roid", "norm": "batch", "norm_momentum": 0.05, "norm_alpha": 0.1, "steps": 1,
                  "episodic": False, "exclude": []},
        "optimizer": {"kind": kind, "lr": lr, "momentum": momentum, "dampening": 0.0, "nesterov": nesterov,
                      "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8},
        "roid": roid or {},
    }


def write(out, name, model, cfg, batches):
    d = out / name
    if d.exists():
        shutil.rmtree(d)
    (d / "batches").mkdir(parents=True)
    shutil.copy(model, d / "model.onnx")
    for i, b in enumerate(batches):
        np.save(d / "batches" / f"{i:03d}.npy", b.astype(np.float32))
    (d / "config.toml").write_text(toml(cfg))
    res = run_roid(d / "model.onnx", cfg, batches)
    margins = [s["margin"] for s in res["steps"] if "margin" in s]
    assert all(m > 1e-3 for m in margins), f"{name}: a kept/dropped decision within 1e-3 of the threshold: {margins}"
    (d / "expected.json").write_text(json.dumps(res))
    return res


# ---- roid_kernels.json ---------------------------------------------------------------------------

def kernel_case(z, ema, temperature=1.0 / 3.0, momentum_probs=0.9, batch_size=None, weighting=True):
    z = torch.tensor(np.asarray(z, dtype=np.float32), requires_grad=True)
    ema = torch.tensor(np.asarray(ema, dtype=np.float32))
    b, c = z.shape
    b_cfg = batch_size or b
    case = {"logits": f32(z), "class_probs": f32(ema), "temperature": temperature, "momentum_probs": momentum_probs,
            "batch_size": b_cfg, "weighting": weighting, "slr": f32(slr(z))}
    got = weights_of(z, ema, temperature) if weighting else None
    case["degenerate"] = weighting and got is None
    if weighting:
        case["class_probs_next"] = f32(ema_probs(ema, z, momentum_probs))
    else:
        case["class_probs_next"] = f32(ema)
    if got is not None:
        dn, cn, kept, w = got
        case.update(div=f32(dn), cert=f32(cn), kept=[bool(k) for k in kept], weights=f32(w), margin=mask_margin(dn))
        loss = (slr(z) * w)[kept].sum() / b_cfg
    elif not weighting:
        case.update(kept=[True] * b, weights=[1.0] * b)
        loss = slr(z).sum() / b_cfg
    else:
        loss = None
    if loss is not None:
        (g,) = torch.autograd.grad(loss, z)
        case.update(loss=float(loss.item()), grad=f32(g))
    else:
        case.update(kept=[False] * b, weights=[0.0] * b, loss=0.0, grad=[[0.0] * c for _ in range(b)])
    corrected, smoothed = prior_correct(z.detach())
    case.update(corrected=f32(corrected), smoothed_prior=f32(smoothed))
    return case


def ensemble_case(o, alpha, rng, n=9, steps=4):
    """The optimizer's step, then θ ← α·θ + (1 − α)·θ_src, on given gradients."""
    p0 = rng.normal(0, 1, n).astype(np.float32)
    src = rng.normal(0, 1, n).astype(np.float32)
    grads = [rng.normal(0, 1, n).astype(np.float32) for _ in range(steps)]
    p = torch.nn.Parameter(torch.tensor(p0))
    s = torch.tensor(src)
    opt = make_optimizer([p], o)
    after = []
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
        with torch.no_grad():
            p.data = alpha * p.data + (1 - alpha) * s
        after.append(f32(p))
    return dict(o, alpha=alpha, param0=p0.tolist(), source=src.tolist(), grads=[g.tolist() for g in grads],
                params=after)


def kernels_doc():
    rng = np.random.default_rng(21)

    def dirichlet(c):
        return rng.dirichlet(np.ones(c)).astype(np.float32)

    cases = []
    cases.append(kernel_case(rng.normal(0, 1.5, (8, 5)), dirichlet(5)))
    # A confident row (p > 0.99: the clamp, zero gradient there) and one whose other classes
    # underflow to p = 0 (q·log(q/(1 − q) + 1e-5) = 0 there, its gradient finite).
    z = rng.normal(0, 1, (6, 7))
    z[1] = [9.0, 0.1, -0.3, 0.2, 0.0, -0.1, 0.3]
    z[4] = [60.0, -60.0, -70.0, -65.0, -62.0, -61.0, -68.0]
    cases.append(kernel_case(z, np.full(7, 1 / 7), batch_size=8))
    cases.append(kernel_case(rng.normal(0, 1, (2, 3)), dirichlet(3)))
    # The guard: B = 1 and identical rows make a min-max 0/0.
    cases.append(kernel_case(rng.normal(0, 1, (1, 5)), dirichlet(5), batch_size=4))
    cases.append(kernel_case(np.tile(rng.normal(0, 1, (1, 5)), (4, 1)), dirichlet(5)))
    cases.append(kernel_case(rng.normal(0, 1, (5, 4)), dirichlet(4), batch_size=8, weighting=False))
    # Past one workgroup's 256 threads: over the batch (the weights) and over the classes (rows).
    cases.append(kernel_case(rng.normal(0, 2, (260, 3)), dirichlet(3), temperature=0.5, momentum_probs=0.8))
    cases.append(kernel_case(rng.normal(0, 2, (3, 260)), dirichlet(260)))
    for i, k in enumerate(cases):
        assert "margin" not in k or k["margin"] > 1e-3, f"kernel case {i}: a mask decision on a near-tie ({k['margin']})"
    opts = [
        dict(kind="sgd", lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, betas=[0.9, 0.999],
             eps=1e-8),
        dict(kind="sgd", lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0, betas=[0.9, 0.999],
             eps=1e-8),
        dict(kind="adam", lr=0.01, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, betas=[0.9, 0.999],
             eps=1e-8),
    ]
    ensemble = [ensemble_case(o, a, rng) for o in opts for a in (0.99, 0.9)]
    return {"cases": cases, "ensemble": ensemble}


def self_check():
    """The SLR gradient (autograd, float64) against central finite differences, including a row
    past the clamp and one with underflowing classes."""
    rng = np.random.default_rng(5)
    z = rng.normal(0, 1.5, (4, 6))
    z[2] = [8.0, 0.0, 0.1, -0.2, 0.3, 0.0]
    w = torch.tensor(rng.uniform(0.5, 2.0, 4))
    zt = torch.tensor(z, requires_grad=True)
    (g,) = torch.autograd.grad((slr(zt) * w).sum(), zt)
    h = 1e-6
    fd = np.zeros_like(z)
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            zp, zm = z.copy(), z.copy()
            zp[i, j] += h
            zm[i, j] -= h
            fd[i, j] = float(((slr(torch.tensor(zp)) - slr(torch.tensor(zm))) * w).sum()) / (2 * h)
    err = np.abs(fd - g.numpy()).max()
    assert err < 1e-6, f"SLR gradient vs finite differences: {err}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures/tta"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    self_check()
    tiny = out / "_tiny_roid.onnx"
    tiny_model(tiny)
    rng = np.random.default_rng(14)
    # Adam (the CIFAR configs), B_cfg = 8 with a last partial batch of 5: the loss divides by 8,
    # the prior smoothing by 5.
    batches = [rng.normal(0, 1, (8, 3, 8, 8)).astype(np.float32) * s for s in (1.0, 1.3, 0.8, 1.1)]
    batches.append(rng.normal(0, 1, (5, 3, 8, 8)).astype(np.float32))
    write(out, "tiny_roid_adam", tiny, config(roid={"batch_size": 8}), batches)
    # SGD-Nesterov (the ImageNet configs) with a strong pull to the source (α_s = 0.9); a batch of
    # 1 (the guard: no gradient step, ensembling and prior correction still run) and one of 2
    # (one sample kept).
    nb = [rng.normal(0, 1, (n, 3, 8, 8)).astype(np.float32) for n in (8, 8, 1, 8, 2)]
    write(out, "tiny_roid_sgd_nesterov", tiny,
          config("sgd", lr=0.05, nesterov=True, roid={"momentum_src": 0.9, "temperature": 0.5,
                                                       "momentum_probs": 0.8}), nb)
    # The switches: no weighting (plain SLR over the batch, ē frozen), no prior correction, no
    # ensembling (α_s = 1).
    sb = [rng.normal(0, 1, (6, 3, 8, 8)).astype(np.float32) for _ in range(3)]
    write(out, "tiny_roid_switches", tiny,
          config("sgd", lr=0.1, momentum=0.0, roid={"weighting": False, "prior_correction": False,
                                                     "momentum_src": 1.0}), sb)
    tiny.unlink()
    (out / "roid_kernels.json").write_text(json.dumps(kernels_doc()))
    print(f"wrote ROID fixtures to {out} with torch {torch.__version__}")


if __name__ == "__main__":
    main()
