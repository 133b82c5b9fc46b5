"""Checks that tools/tta_reference.py runs before it writes any fixture.

1. The interpreter (tools/onnx_torch.py) in `source` mode against ONNX's own reference evaluator
   (onnx.reference), on the tiny net, the SVHN net and a net made for the ops the two do not use
   (Mul, Reshape, dilation, asymmetric pads, ceil-mode pooling, Gemm with transA).
2. Each BN mode, layer by layer, against torch's F.batch_norm: `batch` normalises to mean ~0 and
   biased variance ~1 per channel and equals training-mode F.batch_norm; `source` equals eval-mode
   F.batch_norm; `alpha` equals eval-mode F.batch_norm after a momentum-alpha training update of
   the source statistics (torch stores the *unbiased* batch variance there: that is BN-alpha);
   `ema` stores (1-a) source + a batch (biased) and normalises with exactly the stored values.
3. The gradients of the mean entropy with respect to the BN parameters, for `batch`, `ema` and
   `alpha`, against central finite differences in float64 (so they include the path through the
   batch statistics), and a control showing that detached statistics give different gradients.
"""
import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_torch import OnnxTorch


def _ent(z):
    return -(z.softmax(1) * z.log_softmax(1)).sum(1).mean()


def _close(name, got, want, atol, rtol=0.0):
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    err = (got - want).abs().max().item()
    tol = atol + rtol * want.abs().max().item()
    if not err <= tol:
        raise AssertionError(f"self-check {name}: max error {err:.3g} > {tol:.3g}")
    return err


def ops_model():
    """Conv (dilation 2, asymmetric pads) -> Mul (per-channel) -> MaxPool (asymmetric pads, ceil
    mode) -> Reshape [0, -1] -> Gemm (transB, alpha 0.5, no C) -> Gemm (transA and transB)."""
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(1, 0.3, (1, 4, 1, 1)).astype(np.float32), "scale"),
        numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "shape"),
        numpy_helper.from_array(rng.normal(0, 0.3, (5, 4 * 4 * 4)).astype(np.float32), "fc.w"),
        numpy_helper.from_array(rng.normal(0, 0.3, (5, 5)).astype(np.float32), "fc2.w"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], dilations=[2, 2],
                         pads=[1, 2, 2, 1], strides=[1, 1]),
        helper.make_node("Mul", ["c", "scale"], ["m"]),
        helper.make_node("MaxPool", ["m"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0],
                         ceil_mode=1),
        helper.make_node("Reshape", ["p", "shape"], ["r"]),
        helper.make_node("Gemm", ["r", "fc.w"], ["g"], transB=1, alpha=0.5),
        helper.make_node("Gemm", ["fc2.w", "g"], ["y"], transA=1, transB=1),
    ]
    g = helper.make_graph(nodes, "ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def check_interpreter(models):
    out = []
    for name, model, x in models:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        net = OnnxTorch(proto, "source")
        with torch.no_grad():
            got = net(torch.tensor(x))
        # onnx.reference's BatchNormalization for opsets 9-13 applies a momentum update with the
        # batch statistics whenever the momentum attribute has a value, and the schema default
        # fills it in: that is not inference. From opset 14 it honours training_mode (default 0),
        # and the other ops here are unchanged between 13 and 15, so the evaluator gets opset 15.
        proto_ref = onnx.ModelProto()
        proto_ref.CopyFrom(proto)
        for o in proto_ref.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, 15)
        ref = ReferenceEvaluator(proto_ref)
        want = ref.run(None, {net.input_name: x})[0]
        err = _close(f"interpreter {name}", got, want, atol=2e-5, rtol=1e-5)
        out.append(f"{name} {err:.1e}")
    return "interpreter vs onnx.reference: " + ", ".join(out)


def check_bn_modes(tiny, x):
    x = torch.tensor(x)
    proto = onnx.load(str(tiny))
    dims = (0, 2, 3)
    report = []
    for mode in ("source", "batch", "alpha", "ema"):
        net = OnnxTorch(proto, mode, momentum=0.05, alpha=0.1)
        net.capture = {}
        with torch.no_grad():
            net(x)
        for n in net.bn_nodes:
            xin, xhat = net.capture[n.name]
            eps = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "epsilon"), 1e-5)
            src_m, src_v = net.source[n.input[3]], net.source[n.input[4]]
            if mode == "source":
                want = F.batch_norm(xin, src_m, src_v, training=False, eps=eps)
            elif mode == "batch":
                want = F.batch_norm(xin, None, None, training=True, eps=eps)
                _close(f"batch {n.name} mean", xhat.mean(dims), torch.zeros(xhat.shape[1]), atol=1e-5)
                v = xin.var(dims, unbiased=False)
                _close(f"batch {n.name} var", xhat.var(dims, unbiased=False), v / (v + eps), atol=1e-5)
                _close(f"batch {n.name} var~1", xhat.var(dims, unbiased=False), torch.ones(xhat.shape[1]), atol=1e-3)
            elif mode == "alpha":
                rm, rv = src_m.clone(), src_v.clone()
                F.batch_norm(xin, rm, rv, training=True, momentum=0.1, eps=eps)
                want = F.batch_norm(xin, rm, rv, training=False, eps=eps)
            else:  # ema
                v, m = torch.var_mean(xin, dims, unbiased=False)
                em, ev = 0.95 * src_m + 0.05 * m, 0.95 * src_v + 0.05 * v
                _close(f"ema {n.name} mean", net.tensor(n.input[3]), em, atol=1e-6)
                _close(f"ema {n.name} var", net.tensor(n.input[4]), ev, atol=1e-6)
                want = F.batch_norm(xin, net.tensor(n.input[3]), net.tensor(n.input[4]), training=False, eps=eps)
            _close(f"{mode} {n.name} normalised", xhat, want, atol=2e-5, rtol=1e-5)
        report.append(mode)
    # ema: a second batch moves the stored statistics again, from the updated values.
    net = OnnxTorch(proto, "ema", momentum=0.05)
    net.capture = {}
    with torch.no_grad():
        net(x)
        first = {k: v.clone() for k, v in net.running_stats().items()}
        net(x.flip(0) * 0.7 + 0.2)
    for n in net.bn_nodes:
        v, m = torch.var_mean(net.capture[n.name][0], dims, unbiased=False)
        _close(f"ema {n.name} second mean", net.tensor(n.input[3]), 0.95 * first[n.input[3]] + 0.05 * m, atol=1e-6)
        _close(f"ema {n.name} second var", net.tensor(n.input[4]), 0.95 * first[n.input[4]] + 0.05 * v, atol=1e-6)
    return "BN modes vs F.batch_norm: " + ", ".join(report) + " (+ ema second update)"


def check_gradients(tiny, x):
    proto = onnx.load(str(tiny))
    x = torch.tensor(x).double()
    report = []
    for mode in ("batch", "ema", "alpha"):
        net = OnnxTorch(proto, mode, momentum=0.05, alpha=0.1).double()
        stats0 = {k: v.clone() for k, v in net.running_stats().items()}

        def loss():
            for k, v in stats0.items():  # every evaluation starts from the same statistics
                net._set_buffer(k, v.clone())
            return _ent(net(x))

        params = dict(net.adapted_parameters())
        l0 = loss()
        grads = torch.autograd.grad(l0, list(params.values()))
        h, worst = 1e-6, 0.0
        for (k, p), g in zip(params.items(), grads):
            for j in range(p.numel()):
                with torch.no_grad():
                    old = p.view(-1)[j].item()
                    p.view(-1)[j] = old + h
                    lp = loss().item()
                    p.view(-1)[j] = old - h
                    lm = loss().item()
                    p.view(-1)[j] = old
                fd = (lp - lm) / (2 * h)
                worst = max(worst, abs(fd - g.view(-1)[j].item()))
        scale = max(g.abs().max().item() for g in grads)
        if not worst <= 1e-6 * max(scale, 1.0):
            raise AssertionError(f"self-check gradients {mode}: finite differences differ by {worst:.3g}")
        # Control: the same gradient with the batch statistics treated as constants is different.
        if mode == "batch":
            detached = _grad_detached_stats(proto, x)
            diff = max((a - b).abs().max().item() for a, b in zip(grads, detached))
            if not diff > 1e-3 * scale:
                raise AssertionError("self-check: detached statistics should change the gradient")
        report.append(f"{mode} {worst:.1e}")
    return "entropy gradients vs finite differences (float64): " + ", ".join(report)


def _grad_detached_stats(proto, x):
    """The batch-mode gradient with mean/var detached: source mode fed the batch statistics."""
    net = OnnxTorch(proto, "batch").double()
    net.capture = {}
    with torch.no_grad():
        net(x)
    src = OnnxTorch(proto, "source").double()
    for n in src.bn_nodes:
        v, m = torch.var_mean(net.capture[n.name][0], (0, 2, 3), unbiased=False)
        src._set_buffer(n.input[3], m)
        src._set_buffer(n.input[4], v)
    # The stats of later layers depend on earlier parameters only through the (now constant) stats.
    params = dict(src.adapted_parameters())
    return torch.autograd.grad(_ent(src(x)), list(params.values()))


def self_checks(tiny, svhn, x_tiny, x_svhn):
    torch.manual_seed(0)
    models = [("tiny", tiny, x_tiny), ("ops", ops_model(), np.random.default_rng(6).normal(0, 1, (5, 3, 8, 8))
                                       .astype(np.float32))]
    if svhn is not None:
        models.append(("svhn", svhn, x_svhn))
    lines = [check_interpreter(models), check_bn_modes(tiny, x_tiny), check_gradients(tiny, x_tiny)]
    for line in lines:
        print("ok:", line)
