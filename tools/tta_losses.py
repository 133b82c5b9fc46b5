"""tests/fixtures/tta/losses.json: the adaptation losses and their gradients, from torch autograd
in float32 (written by tools/tta_reference.py).

Inputs: logits z [5, 7] (row 2 is extremely confident: its other classes are 110 to 120 below
the top one, so softmax underflows to exactly 0 in float32 there and only a log_softmax entropy
stays finite), coefficients c [5], labels y [5] (row 2's label is its argmax).
Terms, with p_i = softmax(z_i), H(p) = -sum_k p_k log p_k, and entropies from log_softmax:
  entropy_mean      (1/5) sum_i H(p_i)
  entropy_weighted  sum_i c_i H(p_i)
  ce_weighted       sum_i c_i CE(z_i, y_i),  CE = -log_softmax(z_i)[y_i]
  diversity         -lambda * H(mean_i p_i), lambda = 0.5, log of the mean itself (no epsilon)
  ewc               lambda * sum_j F_j (theta_j - theta*_j)^2 over a small theta, gradient wrt theta
Each has "value" and "grad" (with respect to the logits, or to theta for ewc).
"""
import numpy as np
import torch


def _ent(z):
    return -(z.softmax(1) * z.log_softmax(1)).sum(1)


def _term(fn, x):
    x = torch.tensor(x, requires_grad=True)
    v = fn(x)
    (g,) = torch.autograd.grad(v, x)
    return {"value": float(v.item()), "grad": g.numpy().tolist()}


def losses_doc():
    rng = np.random.default_rng(11)
    z = rng.normal(0, 2, (5, 7)).astype(np.float32)
    z[2] = np.array([80.0, -30.0, -35.0, -40.0, -32.0, -31.0, -38.0], dtype=np.float32)  # margins 110..120
    z[4] *= 4.0  # fairly confident, but not underflowing
    c = rng.uniform(0.2, 2.0, 5).astype(np.float32)
    y = rng.integers(0, 7, 5)
    y[2] = 0
    lam_div = 0.5
    ct = torch.tensor(c)
    yt = torch.tensor(y)

    def diversity(x):
        pm = x.softmax(1).mean(0)
        return -lam_div * (-(pm * torch.log(pm)).sum())

    doc = {
        "logits": z.tolist(),
        "c": c.tolist(),
        "labels": [int(v) for v in y],
        "entropy_per_sample": _ent(torch.tensor(z)).numpy().tolist(),
        "entropy_mean": _term(lambda x: _ent(x).mean(), z),
        "entropy_weighted": _term(lambda x: (ct * _ent(x)).sum(), z),
        "ce_weighted": _term(lambda x: (ct * -x.log_softmax(1).gather(1, yt[:, None])[:, 0]).sum(), z),
        "diversity": {"lambda": lam_div, **_term(diversity, z)},
    }
    theta = rng.normal(0, 1, 6).astype(np.float32)
    theta_star = (theta + rng.normal(0, 0.1, 6)).astype(np.float32)
    fisher = rng.uniform(0, 1e-3, 6).astype(np.float32)
    lam_ewc = 2000.0
    ft, st = torch.tensor(fisher), torch.tensor(theta_star)
    doc["ewc"] = {"lambda": lam_ewc, "theta": theta.tolist(), "theta_star": theta_star.tolist(),
                  "fisher": fisher.tolist(),
                  **_term(lambda t: lam_ewc * (ft * (t - st) ** 2).sum(), theta)}
    for k in ("entropy_mean", "entropy_weighted", "ce_weighted", "diversity", "ewc"):
        v = doc[k]["value"]
        assert np.isfinite(v) and np.all(np.isfinite(doc[k]["grad"])), k
    return doc
