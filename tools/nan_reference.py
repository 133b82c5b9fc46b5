"""ONNX Runtime's answers for NaN and infinite values, one single-node model per case.

Writes ``cli/tests/fixtures/nan/<case>.onnx`` and ``cli/tests/fixtures/nan/cases.json``:
for every case the model file, its inputs and ONNX Runtime's outputs (CPU execution provider,
graph optimisations disabled, as ``acclimate::reference`` runs it with ``unoptimized``: ONNX
Runtime's rewrites change non-finite arithmetic, e.g. its NCHWc convolution skips padded taps that
the unrewritten kernel multiplies by zero). ``tests/nan_semantics.rs`` runs the same models on the
GPU and compares NaN-ness and infinities exactly, finite values within a tolerance; it also
re-runs ONNX Runtime live on the model files, so a stale fixture fails. Values are JSON numbers,
with "nan", "inf" and "-inf" as strings.

``documented`` lists the outputs where the runtime deliberately differs, as [flat index of output
0, expected value]: MaxPool windows that hold a NaN, or only -inf. ONNX Runtime's CPU MaxPool has
no rule there (MLAS: the 1-D kernel skips NaN and starts from -FLT_MAX, the 2-D vector kernel
keeps or drops a NaN depending on its row in the window and the column's position mod 4); the
runtime returns NaN for any window holding one and -inf for a window of -inf only. Only those
windows are listed, and only where ONNX Runtime's answer differs.

Run: .venv/bin/python tools/nan_reference.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).resolve().parent.parent / "cli" / "tests" / "fixtures" / "nan"
NAN = np.float32("nan")
INF = np.float32("inf")

# Every unary case sees these: both infinities, both zeros, overflow-sized finite values.
SPECIAL = np.array([NAN, INF, -INF, 0.0, -0.0, 1.0, -1.0, 0.5, -2.5, 7.0, 3e38, -3e38], np.float32)


def enc(a: np.ndarray) -> list:
    out = []
    for v in np.asarray(a, np.float32).ravel().tolist():
        if math.isnan(v):
            out.append("nan")
        elif math.isinf(v):
            out.append("inf" if v > 0 else "-inf")
        else:
            out.append(v)
    return out


def model(op: str, inputs: dict[str, np.ndarray], inits: dict[str, np.ndarray | None], attrs: dict,
          opset: int, n_out: int = 1) -> onnx.ModelProto:
    """One node; `inits` in node-input order after the runtime inputs (None: an omitted input)."""
    ins = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in inputs.items()]
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(n_out)]
    node_inputs = list(inputs) + [k if v is not None else "" for k, v in inits.items()]
    node = helper.make_node(op, node_inputs, [o.name for o in outs], name=f"{op}_0", **attrs)
    init = [numpy_helper.from_array(v, k) for k, v in inits.items() if v is not None]
    g = helper.make_graph([node], f"nan_{op}", ins, outs, init)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="nan_reference")
    m.ir_version = 8
    return m


def graph_model(nodes, inputs: dict[str, np.ndarray], inits: dict[str, np.ndarray], outputs: list[str],
                opset: int) -> onnx.ModelProto:
    ins = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in inputs.items()]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    init = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    g = helper.make_graph(nodes, "nan_graph", ins, outs, init)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="nan_reference")
    m.ir_version = 8
    return m


def run_ort(m: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, inputs)


CASES: list[dict] = []


def case(name: str, m: onnx.ModelProto, inputs: dict[str, np.ndarray], extra: dict | None = None):
    outs = run_ort(m, inputs)
    (OUT / f"{name}.onnx").write_bytes(m.SerializeToString())
    c = {
        "name": name,
        "model": f"{name}.onnx",
        "inputs": [{"name": k, "shape": list(v.shape), "data": enc(v)} for k, v in inputs.items()],
        "outputs": [{"shape": list(o.shape), "data": enc(o)} for o in outs],
    }
    if extra:
        c.update(extra)
    CASES.append(c)


def unary_cases():
    x = {"x": SPECIAL.reshape(2, 6)}
    for op, attrs in [
        ("Relu", {}),
        ("LeakyRelu", {"alpha": 0.1}),
        ("Sigmoid", {}),
        ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}),
        ("HardSwish", {}),
        ("Log", {}),
        ("Exp", {}),
        ("Tanh", {}),
        ("Neg", {}),
        ("Abs", {}),
        ("Sqrt", {}),
        ("Erf", {}),
        ("Softplus", {}),
        ("Softsign", {}),
        ("Elu", {"alpha": 0.5}),
        ("Selu", {}),
        ("Reciprocal", {}),
    ]:
        case(f"unary_{op.lower()}", model(op, x, {}, attrs, 14), x)
    case("unary_mish", model("Mish", x, {}, {}, 18), x)
    case("unary_gelu", model("Gelu", x, {}, {}, 20), x)
    case("unary_gelu_tanh", model("Gelu", x, {}, {"approximate": "tanh"}, 20), x)
    case("clip10_attrs", model("Clip", x, {}, {"min": -2.0, "max": 2.0}, 10), x)
    case("clip10_default", model("Clip", x, {}, {}, 10), x)
    case("clip13_inputs", model("Clip", x, {"lo": np.float32(-2.0), "hi": np.float32(2.0)}, {}, 13), x)
    case("clip13_min_only", model("Clip", x, {"lo": np.float32(-1.0)}, {}, 13), x)
    case("clip13_max_only", model("Clip", x, {"lo": None, "hi": np.float32(6.0)}, {}, 13), x)
    case("clip13_none", model("Clip", x, {}, {}, 13), x)
    # A NaN bound is no bound at all in ONNX Runtime (its comparisons fail).
    case("clip13_nan_min", model("Clip", x, {"lo": NAN, "hi": np.float32(2.0)}, {}, 13), x)
    case("clip13_nan_max", model("Clip", x, {"lo": np.float32(-2.0), "hi": NAN}, {}, 13), x)


def binary_cases():
    # Every pair of special values: A [12, 1] against B [1, 12] as a constant (a NaN "weight").
    a = {"a": SPECIAL.reshape(12, 1)}
    b = SPECIAL.reshape(1, 12)
    for op in ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"]:
        case(f"binary_{op.lower()}", model(op, a, {"b": b}, {}, 14), a)
    # Pow's C99 special cases beyond the grid: base ±1 and ±0, odd and even integral exponents.
    base = np.array([1, -1, 0, -0.0, NAN, INF, -INF, -2, 2, 0.5, -0.5, 3e38], np.float32).reshape(12, 1)
    exps = np.array([NAN, INF, -INF, 0, -0.0, 3, -3, 2, -2, 0.5, -0.5, 1], np.float32).reshape(1, 12)
    case("binary_pow_specials", model("Pow", {"a": base}, {"b": exps}, {}, 14), {"a": base})
    x = {"x": SPECIAL.reshape(1, 12, 1, 1)}
    slope = np.array([0.25, NAN, INF, -INF, 0.1, 0.2, NAN, 0.5, INF, -1, 2, 0], np.float32).reshape(12, 1, 1)
    case("prelu_slopes", model("PRelu", x, {"slope": slope}, {}, 9), x)
    slope1 = np.array([NAN], np.float32)
    case("prelu_nan_slope", model("PRelu", {"x": SPECIAL.reshape(2, 6)}, {"slope": slope1}, {}, 9),
         {"x": SPECIAL.reshape(2, 6)})


def rng_input(shape, seed, lo=-2.0, hi=2.0):
    r = np.random.default_rng(seed)
    return r.uniform(lo, hi, size=shape).astype(np.float32)


def conv_cases():
    x = rng_input((1, 2, 5, 5), 1)
    x[0, 0, 0, 0] = NAN
    x[0, 1, 2, 2] = INF
    x[0, 0, 4, 3] = -INF
    w = rng_input((3, 2, 3, 3), 2)
    bias = rng_input((3,), 3)
    case("conv_input_nan_inf", model("Conv", {"x": x}, {"w": w, "b": bias}, {"pads": [1, 1, 1, 1]}, 13), {"x": x})
    # A NaN and an infinite weight: with padding, the taps that land in the padding meet zeros.
    w2 = w.copy()
    w2[1, 0, 0, 0] = NAN
    w2[2, 1, 2, 1] = INF
    xf = rng_input((1, 2, 5, 5), 4)
    case("conv_weight_nan_inf_padded", model("Conv", {"x": xf}, {"w": w2, "b": bias},
                                             {"pads": [1, 1, 1, 1]}, 13), {"x": xf})
    case("conv_weight_nan_inf_strided",
         model("Conv", {"x": xf}, {"w": w2}, {"pads": [2, 0, 1, 2], "strides": [2, 2], "dilations": [1, 2]}, 13),
         {"x": xf})
    # Depthwise (group = channels) and a 1x1 convolution (a matrix product).
    wd = rng_input((2, 1, 3, 3), 5)
    wd[0, 0, 2, 2] = NAN
    case("conv_depthwise", model("Conv", {"x": x}, {"w": wd}, {"pads": [1, 1, 1, 1], "group": 2}, 13), {"x": x})
    w1 = rng_input((3, 2, 1, 1), 6)
    w1[2, 1, 0, 0] = -INF
    case("conv_1x1", model("Conv", {"x": x}, {"w": w1, "b": bias}, {}, 13), {"x": x})
    bias_nan = bias.copy()
    bias_nan[1] = NAN
    case("conv_bias_nan", model("Conv", {"x": xf}, {"w": w, "b": bias_nan}, {"pads": [1, 1, 1, 1]}, 13),
         {"x": xf})


def matmul_cases():
    a = rng_input((3, 5), 7)
    a[0, 1] = NAN
    a[2, 4] = INF
    b = rng_input((5, 4), 8)
    b[3, 2] = -INF
    c = rng_input((4,), 9)
    c[3] = NAN
    case("gemm", model("Gemm", {"a": a}, {"b": b, "c": c}, {"alpha": 0.5, "beta": 2.0}, 13), {"a": a})
    case("gemm_beta0", model("Gemm", {"a": a}, {"b": b, "c": c}, {"beta": 0.0}, 13), {"a": a})
    case("gemm_transb", model("Gemm", {"a": a}, {"b": np.ascontiguousarray(b.T), "c": c}, {"transB": 1}, 13),
         {"a": a})
    a3 = rng_input((2, 3, 5), 10)
    a3[1, 0, 0] = NAN
    a3[0, 2, 3] = -INF
    case("matmul_batched", model("MatMul", {"a": a3}, {"b": b}, {}, 13), {"a": a3})
    # A large K, so the GPU accumulates over several 16-wide steps with the NaN in a late one.
    ak = rng_input((2, 40), 11)
    ak[1, 37] = NAN
    ak[0, 20] = INF
    bk = rng_input((40, 3), 12)
    case("matmul_long_k", model("MatMul", {"a": ak}, {"b": bk}, {}, 13), {"a": ak})


def norm_cases():
    x = rng_input((2, 4, 3, 3), 13)
    x[0, 0, 0, 0] = NAN
    x[1, 1, 2, 2] = INF
    x[0, 2, 1, 1] = -INF
    scale = np.array([1.0, NAN, 0.0, 2.0], np.float32)
    bias = np.array([0.1, 0.2, INF, -0.3], np.float32)
    mean = np.array([0.0, 0.5, -0.5, INF], np.float32)
    var = np.array([1.0, 2.0, 0.5, 1.5], np.float32)
    case("batchnorm", model("BatchNormalization", {"x": x}, {"s": scale, "b": bias, "m": mean, "v": var},
                            {"epsilon": 1e-5}, 15), {"x": x})
    var2 = np.array([INF, 1.0, NAN, 0.0], np.float32)
    case("batchnorm_var", model("BatchNormalization", {"x": x},
                                {"s": np.ones(4, np.float32), "b": np.zeros(4, np.float32),
                                 "m": np.zeros(4, np.float32), "v": var2}, {"epsilon": 1e-5}, 15), {"x": x})


def maxpool_rule(x: np.ndarray, kernel, strides, pads, out_shape) -> np.ndarray:
    """The runtime's 2-D MaxPool (dilation 1): NaN if a tap is NaN, else the taps' maximum
    (-inf for -inf only), -FLT_MAX for a window wholly in the padding."""
    n, c, h, w = x.shape
    y = np.full(out_shape, np.finfo(np.float32).min, np.float32)
    for i in range(out_shape[2]):
        for j in range(out_shape[3]):
            h0, w0 = i * strides[0] - pads[0], j * strides[1] - pads[1]
            win = x[:, :, max(h0, 0):min(h0 + kernel[0], h), max(w0, 0):min(w0 + kernel[1], w)]
            if win.size:
                m = win.max(axis=(2, 3))  # numpy's max propagates NaN
                y[:, :, i, j] = m
    return y


def documented_maxpool(x, attrs, ort_out) -> list:
    rule = maxpool_rule(x, attrs["kernel_shape"], attrs.get("strides", [1, 1]), attrs.get("pads", [0, 0, 0, 0]),
                        ort_out.shape).ravel()
    o = ort_out.ravel()
    out = []
    for i, (r, v) in enumerate(zip(rule, o)):
        special = np.isnan(r) or r == -INF
        same = (np.isnan(r) and np.isnan(v)) or r == v
        if special and not same:
            out.append([i, enc(np.array([r]))[0]])
    return out


def pool_cases():
    x = rng_input((1, 2, 6, 7), 14)
    x[0, 0, 0, 0] = NAN
    x[0, 0, 3, 4] = NAN
    x[0, 1, 2, 2] = INF
    x[0, 1, 5, 6] = -INF
    x[0, 0, 5, 0] = INF
    # A window of -inf only: ONNX Runtime's max starts from the lowest finite float.
    x[0, 1, 0:2, 5:7] = -INF
    for name, attrs in [
        ("maxpool_k2s2", {"kernel_shape": [2, 2], "strides": [2, 2]}),
        ("maxpool_k3s1_pad", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
        ("maxpool_k2s1", {"kernel_shape": [2, 2]}),
    ]:
        m = model("MaxPool", {"x": x}, {}, attrs, 12)
        doc = documented_maxpool(x, attrs, run_ort(m, {"x": x})[0])
        case(name, m, {"x": x}, {"documented": doc})
    # Without NaN and -inf-only windows, ONNX Runtime's MaxPool is defined; compare it exactly.
    xi = x.copy()
    xi[np.isnan(xi)] = 1.5
    xi[0, 1, 0, 5] = 0.25
    case("maxpool_inf_only", model("MaxPool", {"x": xi}, {}, {"kernel_shape": [3, 3], "strides": [2, 2],
                                                              "pads": [1, 1, 1, 1]}, 12), {"x": xi})
    for name, attrs in [
        ("avgpool_k2s1", {"kernel_shape": [2, 2]}),
        ("avgpool_pad_exclude", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
        ("avgpool_pad_include", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ]:
        case(name, model("AveragePool", {"x": x}, {}, attrs, 11), {"x": x})
    case("global_avgpool", model("GlobalAveragePool", {"x": x}, {}, {}, 11), {"x": x})
    # +inf and -inf in one plane: their sum is NaN.
    xg = rng_input((1, 3, 4, 4), 15)
    xg[0, 0, 1, 1] = INF
    xg[0, 0, 2, 3] = -INF
    xg[0, 1, 0, 0] = INF
    xg[0, 2, 3, 3] = -3e38
    xg[0, 2, 3, 2] = -3e38
    case("global_avgpool_inf", model("GlobalAveragePool", {"x": xg}, {}, {}, 11), {"x": xg})
    xm = xg.copy()
    xm[0, 1, 2, 2] = NAN
    m = model("GlobalMaxPool", {"x": xm}, {}, {}, 11)
    rule = xm.max(axis=(2, 3)).ravel()
    got = run_ort(m, {"x": xm})[0].ravel()
    doc = [[i, enc(np.array([r]))[0]] for i, (r, v) in enumerate(zip(rule, got))
           if not ((np.isnan(r) and np.isnan(v)) or r == v)]
    case("global_maxpool_nan", m, {"x": xm}, {"documented": doc})


def reduce_cases():
    x = rng_input((2, 3, 4), 16)
    x[0, 0, 1] = NAN
    x[0, 1, 2] = INF
    x[1, 1, 0] = INF
    x[1, 1, 3] = -INF
    x[1, 2, :] = 3e38
    case("reducemean_last", model("ReduceMean", {"x": x}, {}, {"axes": [2]}, 13), {"x": x})
    case("reducemean_01", model("ReduceMean", {"x": x}, {}, {"axes": [0, 1], "keepdims": 0}, 13), {"x": x})
    # ReduceMax and ReduceMin propagate NaN as numpy (the ONNX reference) does; ONNX Runtime's CPU
    # kernels skip a NaN that is not first in its reduction: documented where they differ.
    for op, reduce in [("ReduceMax", np.max), ("ReduceMin", np.min)]:
        for suffix, attrs in [("_last", {"axes": [2]}), ("_01", {"axes": [0, 1], "keepdims": 0})]:
            m = model(op, {"x": x}, {}, attrs, 13)
            rule = reduce(x, axis=tuple(attrs["axes"]), keepdims=bool(attrs.get("keepdims", 1))).ravel()
            got = run_ort(m, {"x": x})[0].ravel()
            doc = [[i, enc(np.array([r]))[0]] for i, (r, v) in enumerate(zip(rule, got))
                   if not ((np.isnan(r) and np.isnan(v)) or r == v)]
            case(op.lower() + suffix, m, {"x": x}, {"documented": doc})


def softmax_cases():
    rows = np.array([
        [1, INF, 2, 0],
        [INF, INF, 1, 0],
        [-INF, -INF, -INF, -INF],
        [-INF, 0, 1, -INF],
        [NAN, 1, 2, 3],
        [3e38, -3e38, 0, 1],
        [-3e38, -3e38, -3e38, -3e38],
        [0.5, -1, 2, 1],
    ], np.float32)
    for op in ["Softmax", "LogSoftmax"]:
        case(f"{op.lower()}_rows", model(op, {"x": rows}, {}, {"axis": -1}, 13), {"x": rows})
        # Along a non-last axis (rows spaced apart) and, opset 11, over flattened trailing dims.
        case(f"{op.lower()}_axis0", model(op, {"x": rows}, {}, {"axis": 0}, 13), {"x": rows})
        r3 = rows.reshape(2, 4, 4)
        case(f"{op.lower()}_opset11", model(op, {"x": r3}, {}, {"axis": 1}, 11), {"x": r3})
    # A row long enough for the one-workgroup-per-row kernel (see ops/softmax.rs).
    long = rng_input((3, 700), 17)
    long[0, 650] = NAN
    long[1, 3] = INF
    long[2, :] = -INF
    for op in ["Softmax", "LogSoftmax"]:
        case(f"{op.lower()}_long", model(op, {"x": long}, {}, {"axis": -1}, 13), {"x": long})


def layout_cases():
    x = SPECIAL.reshape(1, 3, 2, 2)
    case("transpose", model("Transpose", {"x": x}, {}, {"perm": [0, 2, 3, 1]}, 13), {"x": x})
    other = np.array([NAN, -INF, 2.0, INF], np.float32).reshape(1, 1, 2, 2)
    case("concat", model("Concat", {"x": x}, {"o": other}, {"axis": 1}, 13), {"x": x})
    case("slice", slice_model(x), {"x": x})
    case("pad_constant_nan", pad_model(x, "constant", NAN), {"x": x})
    case("pad_reflect", pad_model(x, "reflect", None), {"x": x})
    case("pad_edge", pad_model(x, "edge", None), {"x": x})
    case("split", split_model(x), {"x": x})
    case("reshape_flatten", graph_model([helper.make_node("Flatten", ["x"], ["y"], axis=1)], {"x": x}, {}, ["y"], 13),
         {"x": x})


def slice_model(x):
    starts = numpy_helper.from_array(np.array([1, 0], np.int64), "st")
    ends = numpy_helper.from_array(np.array([3, 2], np.int64), "en")
    axes = numpy_helper.from_array(np.array([1, 3], np.int64), "ax")
    node = helper.make_node("Slice", ["x", "st", "en", "ax"], ["y"])
    g = helper.make_graph([node], "slice", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [starts, ends, axes])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def pad_model(x, mode, value):
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 0], np.int64), "pads")
    inits = [pads]
    ins = ["x", "pads"]
    if value is not None:
        inits.append(numpy_helper.from_array(np.array(value, np.float32), "value"))
        ins.append("value")
    node = helper.make_node("Pad", ins, ["y"], mode=mode)
    g = helper.make_graph([node], "pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def split_model(x):
    split = numpy_helper.from_array(np.array([1, 2], np.int64), "split")
    node = helper.make_node("Split", ["x", "split"], ["y0", "y1"], axis=1)
    g = helper.make_graph([node], "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y0", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("y1", TensorProto.FLOAT, None)], [split])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def folded_cases():
    # Constant subgraphs are folded on the CPU at load time: Relu, Clip and PRelu of a constant
    # holding NaN must keep it, as ONNX Runtime's kernels do.
    c = SPECIAL.reshape(1, 12)
    x = {"x": rng_input((2, 12), 18)}
    nodes = [
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["cl"]),
        helper.make_node("HardSigmoid", ["c"], ["hs"]),
        helper.make_node("Add", ["x", "r"], ["y0"]),
        helper.make_node("Add", ["x", "cl"], ["y1"]),
        helper.make_node("Add", ["x", "hs"], ["y2"]),
    ]
    m = graph_model(nodes, x, {"c": c, "lo": np.float32(-1.0), "hi": np.float32(1.0)}, ["y0", "y1", "y2"], 13)
    case("folded_activations", m, x)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.onnx"):
        old.unlink()
    unary_cases()
    binary_cases()
    conv_cases()
    matmul_cases()
    norm_cases()
    pool_cases()
    reduce_cases()
    softmax_cases()
    layout_cases()
    folded_cases()
    doc = {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "graph_optimization": "disabled",
           "generator": "tools/nan_reference.py", "cases": CASES}
    (OUT / "cases.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {len(CASES)} cases to {OUT}")


if __name__ == "__main__":
    main()
