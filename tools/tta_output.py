"""PyTorch reference of Acclimate's output stages (issue 4): LAME and the label-shift corrections
(shared/docs/tta-methods.md §5, §6, §6b, §12). tools/tta_reference.py calls `output_stage` on the
records of a method's run and writes the fixtures; the runtime's kernels are in
shaders/output.wgsl and runtime/src/adapt/output.rs.

The stages act on the probabilities a method returns (softmax of its pre-update logits):
  adapter  the label-shift adapter (an ONNX net: "prior" [1, C] -> "gamma" [1, D], "beta" [1, D],
           "delta_w" [C, D], "delta_b" [1, C]) fed the EMA estimate q of the batches before this
           one; logits' = (W + dW)(gamma * h + beta) + (b + db), h the input of the final Gemm, W
           and b its weight (as applied to h, times alpha) and bias (times beta); probs =
           softmax(logits'); then q <- m q + (1 - m) mean softmax(logits) (unmodulated).
  lame     fiveai/LAME's laplacian_optimization over the L2-normalised features, with the kNN
           neighbours in (distance, index) order (ties to the lower index; the reference's topk
           leaves them unspecified) and rbf's sigma = 0 limit (1 where d = 0, else 0).
  ema      p <- normalise(p * q / p_s) with q of the batches before this one, then
           q <- m q + (1 - m) mean p (the uncorrected p).
  em       MLLS from q = mean p: r = normalise(p * q / p_s), q' = mean r, stop when
           sum |q' - q| < 1e-6 (after q <- q'), at most 1000 iterations; p <- normalise(p * q / p_s).
  bbse     mu = fraction of argmax predictions per class; w = max((C^T C + 1e-8 I)^-1 C^T mu, 0)
           with C the normalised source confusion matrix (row = predicted, column = true);
           q = w p_s / sum(w p_s) (p_s when that sum is 0); p <- normalise(p * q / p_s).
A row whose normaliser is not positive and finite keeps its p. The records get "probs" and,
except for LAME alone, "prior" (the q the batch was corrected with).
"""
import math
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_torch import OnnxTorch

LAME_DEFAULTS = {"affinity": "rbf", "knn": 5, "lambda": 1.0, "max_steps": 100, "features": "auto"}
LS_DEFAULTS = {"mode": "none", "momentum": 0.9}
EM_TOLERANCE = 1e-6
EM_MAX_ITERATIONS = 1000
BBSE_RIDGE = 1e-8


def f32(t):
    return t.detach().to(torch.float32).numpy().tolist()


# ---- LAME -----------------------------------------------------------------------------------
def lame_affinity(z, kind, knn):
    n = z.shape[0]
    if kind == "linear":
        return z @ z.t()
    dist = torch.norm(z.unsqueeze(0) - z.unsqueeze(1), dim=-1, p=2)
    if kind == "rbf":
        kth = dist.topk(k=min(knn, n), dim=-1, largest=False).values[:, -1]
        sigma = kth.mean()
        if float(sigma) == 0.0:
            return (dist == 0).to(torch.float32)
        return torch.exp(-dist ** 2 / (2 * sigma ** 2))
    k = min(knn, n - 1)
    w = torch.zeros(n, n)
    if k > 0:
        masked = dist.clone()
        masked.fill_diagonal_(float("inf"))
        order = torch.sort(masked, dim=-1, stable=True).indices[:, :k]
        w.scatter_(1, order, 1.0)
    return w


def laplacian_optimization(p, w, lam, max_steps):
    """(Y, iterations run, whether the stop rule ended it)."""
    unary = -torch.log(p + 1e-10)
    y = (-unary).softmax(-1)
    old = float("inf")
    for i in range(max_steps):
        pairwise = lam * w.matmul(y)
        y = (-unary + pairwise).softmax(-1)
        e = (unary * y - lam * pairwise * y + y * torch.log(y.clip(1e-20))).sum().item()
        if i > 1 and abs(e - old) <= 1e-8 * abs(old):
            return y, i + 1, True
        old = e
    return y, max_steps, False


def lame(p, feats, cfg):
    z = F.normalize(feats.reshape(feats.shape[0], -1), p=2, dim=-1)
    w = lame_affinity(z, cfg["affinity"], cfg["knn"])
    return laplacian_optimization(p, w, cfg["lambda"], cfg["max_steps"])


# ---- label shift ----------------------------------------------------------------------------
def correct(p, q, ps):
    r = p * (q / ps)
    s = r.sum(1, keepdim=True)
    ok = (s > 0) & torch.isfinite(s)
    return torch.where(ok, r / s, p)


def em_prior(p, ps):
    q = p.mean(0)
    for it in range(EM_MAX_ITERATIONS):
        w = q / ps
        r = p * w
        z = r.sum(1, keepdim=True)
        ok = (z > 0) & torch.isfinite(z)
        r = torch.where(ok, r / z, p)
        qn = r.mean(0)
        diff = float((qn - q).abs().sum())
        q = qn
        if diff < EM_TOLERANCE:
            return q, it + 1
    return q, EM_MAX_ITERATIONS


def bbse_matrix(confusion):
    c = np.asarray(confusion, dtype=np.float64)
    c = c / c.sum()
    a = c.T @ c + BBSE_RIDGE * np.eye(len(c))
    return torch.tensor(np.linalg.solve(a, c.T).astype(np.float32))


def bbse_prior(p, m, ps):
    mu = torch.bincount(p.argmax(1), minlength=p.shape[1]).to(torch.float32) / p.shape[0]
    w = (m @ mu).clamp_min(0)
    wp = w * ps
    s = wp.sum()
    return wp / s if float(s) > 0 else ps.clone()


def source_prior(ls, base, c):
    v = ls.get("source_prior")
    if v is None:
        return torch.full((c,), 1.0 / c)
    v = np.load(base / v) if isinstance(v, str) else np.asarray(v, dtype=np.float32)
    v = v.astype(np.float32).astype(np.float64)
    return torch.tensor((v / v.sum()).astype(np.float32))


# ---- the model's final layer and features ---------------------------------------------------
def final_gemm(proto):
    """(name of h, W [C, D] as applied to h including alpha, bias [C] including beta)."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    node = next(n for n in proto.graph.node if proto.graph.output[0].name in n.output)
    assert node.op_type == "Gemm", node.op_type
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    assert not a.get("transA", 0)
    w = torch.tensor(inits[node.input[1]])
    w = w if a.get("transB", 0) else w.t()
    b = torch.tensor(inits[node.input[2]]).reshape(-1)
    return node.input[0], a.get("alpha", 1.0) * w, a.get("beta", 1.0) * b


def features_name(proto, name):
    if name != "auto":
        return name
    return [n for n in proto.graph.node if n.op_type in ("Gemm", "MatMul")][-1].input[0]


def tensor_of(net, x, name):
    """Tensor `name` of the interpreter's forward on x (it returns one tensor: re-run it with
    that one as the output; only used where a forward changes no state)."""
    keep = net.output_name
    net.output_name = name
    try:
        with torch.no_grad():
            return net(torch.tensor(x))
    finally:
        net.output_name = keep


# ---- a tiny label-shift adapter with the runtime's interface ---------------------------------
ADAPTER_HIDDEN = 8


def adapter_model(path, c, d, seed):
    """A random adapter: a = relu(prior W1 + b1); gamma = a Wg + bg (bg near 1); beta = a Wb + bb;
    delta_w = reshape(a Wdw + bdw, [C, D]); delta_b = a Wdb + bdb. Gemm, Relu and Reshape only."""
    rng = np.random.default_rng(seed)
    hdim = ADAPTER_HIDDEN
    w = {
        "W1": rng.normal(0, 2.0, (c, hdim)), "b1": rng.normal(0, 0.2, hdim),
        "Wg": rng.normal(0, 0.3, (hdim, d)), "bg": 1.0 + rng.normal(0, 0.1, d),
        "Wb": rng.normal(0, 0.3, (hdim, d)), "bb": rng.normal(0, 0.1, d),
        "Wdw": rng.normal(0, 0.1, (hdim, c * d)), "bdw": rng.normal(0, 0.05, c * d),
        "Wdb": rng.normal(0, 0.3, (hdim, c)), "bdb": rng.normal(0, 0.1, c),
    }
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(np.array([c, d], dtype=np.int64), "dw_shape"))
    nodes = [
        helper.make_node("Gemm", ["prior", "W1", "b1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["a"], name="relu"),
        helper.make_node("Gemm", ["a", "Wg", "bg"], ["gamma"], name="gamma_head"),
        helper.make_node("Gemm", ["a", "Wb", "bb"], ["beta"], name="beta_head"),
        helper.make_node("Gemm", ["a", "Wdw", "bdw"], ["dw_flat"], name="delta_w_head"),
        helper.make_node("Reshape", ["dw_flat", "dw_shape"], ["delta_w"], name="delta_w_reshape"),
        helper.make_node("Gemm", ["a", "Wdb", "bdb"], ["delta_b"], name="delta_b_head"),
    ]
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
           for n, s in (("gamma", [1, d]), ("beta", [1, d]), ("delta_w", [c, d]), ("delta_b", [1, c]))]
    graph = helper.make_graph(nodes, "ls_adapter", [helper.make_tensor_value_info("prior", TensorProto.FLOAT, [1, c])],
                              out, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="acclimate-tools")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    # The torch evaluation below against ONNX's own reference evaluator, on a few priors.
    ev = ReferenceEvaluator(m)
    for q in (np.full(c, 1.0 / c), rng.dirichlet(np.ones(c)), rng.dirichlet(np.full(c, 0.2))):
        q = q.astype(np.float32)
        want = ev.run(None, {"prior": q[None]})
        got = adapter_eval(path, torch.tensor(q))
        for name, g, wv in zip(("gamma", "beta", "delta_w", "delta_b"), got, want):
            err = float(np.abs(g.numpy().reshape(wv.shape) - wv).max())
            assert err < 1e-5, f"adapter {name}: torch vs onnx.reference {err}"


def adapter_eval(path, q):
    """(gamma [D], beta [D], delta_w [C, D], delta_b [C]) for the prior q [C]."""
    w = {t.name: torch.tensor(numpy_helper.to_array(t)) for t in onnx.load(str(path)).graph.initializer}
    x = q.reshape(1, -1)
    a = torch.relu(x @ w["W1"] + w["b1"])
    gamma = (a @ w["Wg"] + w["bg"])[0]
    beta = (a @ w["Wb"] + w["bb"])[0]
    dw = (a @ w["Wdw"] + w["bdw"]).reshape(q.shape[0], -1)
    db = (a @ w["Wdb"] + w["bdb"])[0]
    return gamma, beta, dw, db


def balanced_head(src, dst, features, seed, trans_b=True, alpha=1.0, beta=1.0):
    """`src` with its final Gemm replaced so that the classes are predicted about equally often
    on `features` (the tiny net as built predicts one class almost always, which would leave the
    label-shift estimates and BBSE's confusion matrix degenerate): W = 2 R / max(std(h), 0.1),
    b = -W mean(h) (per feature, over `features`), stored for the given transB, alpha and beta."""
    m = onnx.load(str(src))
    node = next(n for n in m.graph.node if m.graph.output[0].name in n.output)
    inits = {t.name: t for t in m.graph.initializer}
    wt, bt = inits[node.input[1]], inits[node.input[2]]
    c, d = numpy_helper.to_array(wt).shape
    h = features.astype(np.float64)
    rng = np.random.default_rng(seed)
    w = 2.0 * rng.normal(0, 1, (c, d)) / np.maximum(h.std(0), 0.1)
    b = -(w @ h.mean(0))
    stored = (w if trans_b else w.T) / alpha
    wt.CopyFrom(numpy_helper.from_array(stored.astype(np.float32), wt.name))
    bt.CopyFrom(numpy_helper.from_array((b / beta).astype(np.float32), bt.name))
    del node.attribute[:]
    node.attribute.extend([helper.make_attribute("alpha", float(alpha)), helper.make_attribute("beta", float(beta)),
                           helper.make_attribute("transB", int(trans_b))])
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(dst))


def confusion(model_path, inputs, seed, norm="source"):
    """A source confusion matrix (row = predicted, column = true class, counts) for labels drawn
    as argmax(logits + Gumbel noise), the net's predictions in batches of 8 with `norm` statistics."""
    net = OnnxTorch(model_path, norm)
    with torch.no_grad():
        z = torch.cat([net(torch.tensor(inputs[i:i + 8])) for i in range(0, len(inputs), 8)]).numpy().astype(np.float64)
    rng = np.random.default_rng(seed)
    labels = (z + rng.gumbel(0, 1, z.shape)).argmax(1)
    pred = z.argmax(1)
    c = z.shape[1]
    m = np.zeros((c, c))
    np.add.at(m, (pred, labels), 1.0)
    cond = np.linalg.cond(m / m.sum())
    assert cond < 1e3, f"confusion matrix too ill-conditioned ({cond:.1e}) to test BBSE with"
    return m.astype(np.float32)


# ---- the stage ------------------------------------------------------------------------------
def output_stage(model_path, cfg, batches, res, adapting):
    """Adds "probs" (and "prior") to every record of `res`, from its "logits"; LAME scenarios
    also get "lame_iterations". Asserts that at least one LAME batch stopped by the stop rule."""
    method = cfg["adapt"]["method"]
    lame_cfg = {**LAME_DEFAULTS, **cfg.get("lame", {})} if method == "lame" else None
    ls = {**LS_DEFAULTS, **cfg.get("label_shift", {})}
    mode = ls["mode"]
    if lame_cfg is None and mode == "none":
        return
    base = Path(model_path).parent
    proto = onnx.load(str(model_path))
    c = len(res["steps"][0]["logits"][0])
    ps = source_prior(ls, base, c)
    m = ls["momentum"]
    net = None
    if lame_cfg is not None or mode == "adapter":
        # Features are read by re-running the interpreter: only where the forward changes nothing.
        norm = cfg["adapt"].get("norm") or "source"
        assert not adapting and norm in ("source", "batch"), "features need a stateless forward"
        net = OnnxTorch(model_path, norm)
    mat = bbse_matrix(np.load(base / ls["confusion"])) if mode == "bbse" else None
    q = ps.clone()
    stopped = []
    for x, step in zip(batches, res["steps"]):
        z = torch.tensor(step["logits"], dtype=torch.float32)
        p0 = z.softmax(1)
        p = p0
        used = None
        if mode == "adapter":
            used = q.clone()
            gamma, beta, dw, db = adapter_eval(base / ls["adapter"], used)
            h_name, w, b = final_gemm(proto)
            h = tensor_of(net, x, h_name)
            p = ((gamma * h + beta) @ (w + dw).t() + (b + db)).softmax(1)
            q = m * q + (1 - m) * p0.mean(0)
        if lame_cfg is not None:
            feats = tensor_of(net, x, features_name(proto, lame_cfg["features"]))
            p, iterations, stop = lame(p, feats, lame_cfg)
            step["lame_iterations"] = iterations
            stopped.append(stop)
        if mode == "ema":
            used = q.clone()
            q = m * q + (1 - m) * p.mean(0)
            p = correct(p, used, ps)
        elif mode == "em":
            used, step["em_iterations"] = em_prior(p, ps)
            p = correct(p, used, ps)
        elif mode == "bbse":
            used = bbse_prior(p, mat, ps)
            p = correct(p, used, ps)
        step["probs"] = f32(p)
        if used is not None:
            step["prior"] = f32(used)
    if lame_cfg is not None:
        assert any(stopped), f"LAME never met its stop rule within {lame_cfg['max_steps']} iterations"
        assert all(math.isfinite(v) for s in res["steps"] for r in s["probs"] for v in r)
