"""A small ONNX -> PyTorch interpreter for Acclimate's adaptation reference (tools/tta_reference.py).

`OnnxTorch(path, norm=...)` is an `nn.Module` that evaluates an ONNX graph with torch ops, from the
same initializers the runtime loads. It covers the ops of the test networks: Conv (groups, strides,
pads, dilations), BatchNormalization, Relu, Clip, MaxPool, GlobalAveragePool, Flatten, Gemm, Add,
Mul and Reshape. Anything else is refused.

Names. Every initializer is registered under its ONNX name: the dotted name is split into nested
holder modules, so `dict(model.named_parameters())` and `dict(model.named_buffers())` are keyed by
the ONNX initializer names themselves (`"bn1.weight"`, `"features.0.1.running_var"`, ...). The BN
scale and bias (inputs 1 and 2 of each BatchNormalization) are `nn.Parameter`s; those of layers that
are not adapted have `requires_grad=False`. All other initializers are frozen buffers. The BN running
mean and variance buffers hold the *current* statistics (updated by the `ema` mode); the source
values are kept aside for `reset()`.

Normalization modes (one per model, every BN layer uses it), for per-channel statistics over
(N, H, W) (dims 0, 2, 3):
  source  running statistics (eval-mode BN)
  batch   batch mean and biased variance; gradients flow through them (TENT); source stats unused
  ema     RoTTA's RobustBN2d: mu <- (1-a) mu + a mu_B, var <- (1-a) var + a var_B (biased), from the
          source stats; normalises with the updated values; gradients flow through mu_B and var_B,
          the stored running statistics are detached copies (a = `momentum`, 0.05 by default)
  alpha   BN-alpha: mean = (1-a) mu_src + a mu_B, var = (1-a) var_src + a var_B * m/(m-1) with
          m = N*H*W (unbiased batch variance); gradients through the batch statistics; nothing is
          stored (a = `alpha`, 0.1 by default)
The BN epsilon is the node's attribute (ONNX default 1e-5).
"""
import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

NORM_MODES = ("source", "batch", "ema", "alpha")


def _holder(root, dotted, create):
    """The module that owns the last component of `dotted`, creating holder modules on the way."""
    parts = dotted.split(".")
    if any(p == "" for p in parts):
        raise ValueError(f"initializer name {dotted!r} cannot be used as a module path")
    mod = root
    for p in parts[:-1]:
        sub = mod._modules.get(p)
        if sub is None:
            if not create:
                raise KeyError(dotted)
            if p in mod._parameters or p in mod._buffers:
                raise ValueError(f"initializer name {dotted!r} clashes with another initializer")
            sub = torch.nn.Module()
            mod.add_module(p, sub)
        mod = sub
    return mod, parts[-1]


class OnnxTorch(torch.nn.Module):
    def __init__(self, model, norm="source", momentum=0.05, alpha=0.1, adapted=lambda node_name: True):
        super().__init__()
        if norm not in NORM_MODES:
            raise ValueError(f"norm mode {norm!r} is not one of {NORM_MODES}")
        self.proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        g = self.proto.graph
        self.norm, self.momentum, self.alpha = norm, float(momentum), float(alpha)
        self.nodes = list(g.node)
        self.attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in self.nodes]
        inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.input_name = next(i.name for i in g.input if i.name not in inits)
        self.output_name = g.output[0].name
        self.bn_nodes = [n for n in self.nodes if n.op_type == "BatchNormalization"]
        affine = {}
        self.stat_names = []
        for n in self.bn_nodes:
            for k in n.input[1:3]:
                affine[k] = affine.get(k, False) or bool(adapted(n.name))
            self.stat_names += list(n.input[3:5])
        self.source = {}
        for name, arr in inits.items():
            t = torch.from_numpy(np.array(arr, copy=True))
            if t.is_floating_point():
                t = t.to(torch.float32)
            mod, leaf = _holder(self, name, create=True)
            if name in affine:
                mod.register_parameter(leaf, torch.nn.Parameter(t.clone(), requires_grad=affine[name]))
            else:
                mod.register_buffer(leaf, t.clone())
            self.source[name] = t.clone()
        # `capture`: when a dict, every BN forward stores (its input, the normalised pre-affine
        # value) there by node name, for the checks in tta_reference.py.
        self.capture = None
        # `use_source`: when True, BN scale and bias read their source values (the "original model"
        # of WoC), the statistics still follow the mode.
        self.use_source = False

    # ---- state -------------------------------------------------------------------------------
    def tensor(self, name):
        mod, leaf = _holder(self, name, create=False)
        if leaf in mod._parameters:
            return self.source[name] if self.use_source else mod._parameters[leaf]
        return mod._buffers[leaf]

    def _set_buffer(self, name, value):
        mod, leaf = _holder(self, name, create=False)
        mod._buffers[leaf] = value

    def adapted_parameters(self):
        """(ONNX name, parameter) for every BN scale/bias that is adapted, in graph order."""
        out, seen = [], set()
        for n in self.bn_nodes:
            for k in n.input[1:3]:
                p = self.tensor(k)
                if k not in seen and p.requires_grad:
                    out.append((k, p))
                    seen.add(k)
        return out

    def running_stats(self):
        """{ONNX name: current running mean/var} for every BN layer, in graph order."""
        return {k: self.tensor(k) for k in self.stat_names}

    def reset(self):
        """Back to the source: BN parameters and running statistics (the optimizer is the caller's)."""
        with torch.no_grad():
            for k, p in self.named_parameters():
                p.copy_(self.source[k])
            for k in self.stat_names:
                self._set_buffer(k, self.source[k].clone())

    # ---- ops ---------------------------------------------------------------------------------
    def _bn(self, n, x, a):
        eps = a.get("epsilon", 1e-5)
        g, b = self.tensor(n.input[1]), self.tensor(n.input[2])
        km, kv = n.input[3], n.input[4]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        if self.norm == "source":
            mean, var = self.tensor(km), self.tensor(kv)
        else:
            var_b, mean_b = torch.var_mean(x, dim=dims, unbiased=False)
            if self.norm == "batch":
                mean, var = mean_b, var_b
            elif self.norm == "ema":
                m_ = self.momentum
                mean = (1 - m_) * self.tensor(km) + m_ * mean_b
                var = (1 - m_) * self.tensor(kv) + m_ * var_b
                self._set_buffer(km, mean.detach().clone())
                self._set_buffer(kv, var.detach().clone())
            else:  # alpha
                m = x.numel() // x.shape[1]
                a_ = self.alpha
                mean = (1 - a_) * self.tensor(km) + a_ * mean_b
                var = (1 - a_) * self.tensor(kv) + a_ * var_b * m / (m - 1)
        xhat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
        if self.capture is not None:
            self.capture[n.name] = (x.detach().clone(), xhat.detach().clone())
        return xhat * g.view(shape) + b.view(shape)

    @staticmethod
    def _pads(a, nd=2):
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise ValueError("auto_pad is not supported by the reference interpreter")
        p = list(a.get("pads", [0] * (2 * nd)))
        return p[:nd], p[nd:]

    def _conv(self, x, w, b, a):
        begin, end = self._pads(a)
        strides, dil = a.get("strides", [1, 1]), a.get("dilations", [1, 1])
        if begin != end:
            x = F.pad(x, (begin[1], end[1], begin[0], end[0]))
            begin = [0, 0]
        return F.conv2d(x, w, b, stride=strides, padding=tuple(begin), dilation=dil, groups=a.get("group", 1))

    def _maxpool(self, x, a):
        begin, end = self._pads(a)
        k = a["kernel_shape"]
        if begin != end:
            x = F.pad(x, (begin[1], end[1], begin[0], end[0]), value=float("-inf"))
            begin = [0, 0]
        return F.max_pool2d(x, k, a.get("strides", [1, 1]), padding=tuple(begin),
                            dilation=a.get("dilations", [1, 1]), ceil_mode=bool(a.get("ceil_mode", 0)))

    @staticmethod
    def _reshape(x, shape, a):
        shape = [int(s) for s in shape.tolist()]
        if not a.get("allowzero", 0):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)

    def forward(self, x):
        env = {self.input_name: x}
        for n, a in zip(self.nodes, self.attrs):
            i = [env[k] if k in env else (self.tensor(k) if k else None) for k in n.input]
            t = n.op_type
            if t == "Conv":
                y = self._conv(i[0], i[1], i[2] if len(i) > 2 else None, a)
            elif t == "BatchNormalization":
                y = self._bn(n, i[0], a)
            elif t == "Relu":
                y = torch.relu(i[0])
            elif t == "Clip":
                if len(i) > 1:
                    lo = float(i[1]) if i[1] is not None else float("-inf")
                    hi = float(i[2]) if len(i) > 2 and i[2] is not None else float("inf")
                else:  # opset < 11: attributes
                    lo, hi = a.get("min", float("-inf")), a.get("max", float("inf"))
                y = torch.clamp(i[0], lo, hi)
            elif t == "Add":
                y = i[0] + i[1]
            elif t == "Mul":
                y = i[0] * i[1]
            elif t == "MaxPool":
                y = self._maxpool(i[0], a)
            elif t == "GlobalAveragePool":
                y = i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True)
            elif t == "Flatten":
                y = torch.flatten(i[0], a.get("axis", 1))
            elif t == "Reshape":
                y = self._reshape(i[0], i[1], a)
            elif t == "Gemm":
                am = i[0].T if a.get("transA", 0) else i[0]
                bm = i[1].T if a.get("transB", 0) else i[1]
                y = a.get("alpha", 1.0) * (am @ bm)
                if len(i) > 2 and i[2] is not None:
                    y = y + a.get("beta", 1.0) * i[2]
            else:
                raise ValueError(f"op {t} (node {n.name}) is not in the reference interpreter")
            env[n.output[0]] = y
        return env[self.output_name]
