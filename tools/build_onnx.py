"""Build ONNX graphs for the shipped PyTorch checkpoints with ``onnx.helper``.

Every graph:

* uses opset 13 and IR version 8 (loadable by onnxruntime 1.31 and by our runtime);
* has one input ``input`` and one output ``logits``, both with a symbolic batch
  dimension ``N``;
* keeps BatchNormalization as its own node (the runtime adapts BN statistics,
  so BN must never be folded into the preceding Conv);
* stores weights as initializers named exactly as in the checkpoint
  (``features.0.1.running_mean`` ...), so a tensor can be traced back to the
  PyTorch module it came from;
* omits Dropout (identity at inference).

The architectures are written out from torchvision's MobileNetV2 definition, from
``efficientnet_lite_pytorch`` (EfficientNet-Lite0, TensorFlow's "SAME" padding
written as asymmetric Conv pads) and from ``ccexam/models.py``. ``GraphBuilder`` records which checkpoint tensors it
consumed, and building fails if any weight is left over or has an unexpected
shape, which catches a mis-transcribed architecture early.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
IR_VERSION = 8
BN_EPS = 1e-5  # nn.BatchNorm2d default; used by torchvision MobileNetV2 and ccexam


class GraphBuilder:
    def __init__(self, weights: dict[str, np.ndarray], name: str):
        self.weights = weights
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.used: set[str] = set()
        self._consts: dict[tuple, str] = {}

    # -- weights -----------------------------------------------------------
    def param(self, key: str, shape=None) -> str:
        """Register checkpoint tensor ``key`` as an initializer and return its name."""
        if key not in self.weights:
            raise KeyError(f"{self.name}: checkpoint has no tensor {key!r}")
        arr = self.weights[key]
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise ValueError(f"{self.name}: {key} has shape {arr.shape}, architecture expects {tuple(shape)}")
        if key not in self.initializers:
            self.initializers[key] = numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), key)
            self.used.add(key)
        return key

    def const(self, name: str, value: float) -> str:
        """A shared scalar float initializer (e.g. Clip bounds)."""
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.array(value, dtype=np.float32), name)
        return name

    # -- ops -----------------------------------------------------------------
    def _node(self, op: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, prefix: str, stride=1, group=1, bias=False, pads=None) -> str:
        """Conv with checkpoint weight ``prefix.weight`` (and ``prefix.bias``); 'same' padding for odd k
        unless ``pads`` ([top, left, bottom, right]) is given."""
        w = self.weights.get(prefix + ".weight")
        if w is None:
            raise KeyError(f"{self.name}: checkpoint has no tensor {prefix + '.weight'!r}")
        k = w.shape[2]
        pad = (k - 1) // 2
        pads = list(pads) if pads is not None else [pad, pad, pad, pad]
        inputs = [x, self.param(prefix + ".weight")]
        if bias:
            inputs.append(self.param(prefix + ".bias", (w.shape[0],)))
        return self._node("Conv", inputs, prefix, kernel_shape=[k, k], strides=[stride, stride],
                          pads=pads, group=group, dilations=[1, 1])

    def bn(self, x: str, prefix: str, channels: int, eps: float = BN_EPS) -> str:
        ins = [x] + [self.param(f"{prefix}.{p}", (channels,))
                     for p in ("weight", "bias", "running_mean", "running_var")]
        # num_batches_tracked only matters for training; mark it as consumed.
        if prefix + ".num_batches_tracked" in self.weights:
            self.used.add(prefix + ".num_batches_tracked")
        return self._node("BatchNormalization", ins, prefix, epsilon=eps, momentum=0.9)

    def relu(self, x: str, out: str) -> str:
        return self._node("Relu", [x], out)

    def relu6(self, x: str, out: str) -> str:
        # Opset >= 11 takes Clip bounds as inputs, not attributes.
        return self._node("Clip", [x, self.const("clip_min_0", 0.0), self.const("clip_max_6", 6.0)], out)

    def maxpool2(self, x: str, out: str) -> str:
        return self._node("MaxPool", [x], out, kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0])

    def global_avg_pool(self, x: str, out: str) -> str:
        return self._node("GlobalAveragePool", [x], out)

    def flatten(self, x: str, out: str) -> str:
        return self._node("Flatten", [x], out, axis=1)

    def linear(self, x: str, prefix: str, in_features: int, out_features: int, out: str | None = None) -> str:
        # nn.Linear stores weight as [out, in]: Gemm with transB=1 uses it as is.
        w = self.param(prefix + ".weight", (out_features, in_features))
        b = self.param(prefix + ".bias", (out_features,))
        return self._node("Gemm", [x, w, b], out or prefix, alpha=1.0, beta=1.0, transA=0, transB=1)

    # -- finish ----------------------------------------------------------------
    def finish(self, in_shape: list[int], out_dim: int, output: str, doc: str) -> onnx.ModelProto:
        leftover = sorted(set(self.weights) - self.used)
        if leftover:
            raise ValueError(f"{self.name}: checkpoint tensors not used by the graph: {leftover[:8]}...")
        # Rename the last node's output to "logits".
        last = self.nodes[-1]
        assert last.output[0] == output
        last.output[0] = "logits"
        graph = helper.make_graph(
            self.nodes,
            self.name,
            inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N"] + list(in_shape))],
            outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", out_dim])],
            initializer=list(self.initializers.values()),
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="acclimate-tools", producer_version="1")
        model.ir_version = IR_VERSION
        model.doc_string = doc
        onnx.checker.check_model(model, full_check=True)
        return model


# ---------------------------------------------------------------------------- MobileNetV2

# torchvision MobileNetV2 inverted-residual settings: expand ratio t, output channels c,
# repeats n, first stride s.
_MBV2_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                  (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_v2(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """torchvision ``mobilenet_v2`` (width 1.0), ImageNet 1000 classes, input [N,3,224,224]."""
    g = GraphBuilder(weights, "mobilenet_v2")

    def conv_bn_relu6(x, prefix, cout, stride=1, group=1):
        # Conv2dNormActivation: prefix.0 = Conv (no bias), prefix.1 = BN, then ReLU6.
        x = g.conv(x, prefix + ".0", stride=stride, group=group)
        x = g.bn(x, prefix + ".1", cout)
        return g.relu6(x, prefix + ".2")

    x = conv_bn_relu6("input", "features.0", 32, stride=2)
    cin, idx = 32, 1
    for t, c, n, s in _MBV2_SETTINGS:
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{idx}.conv"
            hidden = cin * t
            block_in, j = x, 0
            if t != 1:  # 1x1 expansion
                x = conv_bn_relu6(x, f"{p}.{j}", hidden)
                j += 1
            x = conv_bn_relu6(x, f"{p}.{j}", hidden, stride=stride, group=hidden)  # 3x3 depthwise
            x = g.conv(x, f"{p}.{j + 1}")  # 1x1 linear projection
            x = g.bn(x, f"{p}.{j + 2}", c)
            if stride == 1 and cin == c:
                x = g._node("Add", [block_in, x], f"features.{idx}.add")
            cin, idx = c, idx + 1
    x = conv_bn_relu6(x, f"features.{idx}", 1280)  # features.18: 320 -> 1280
    x = g.global_avg_pool(x, "avgpool")
    x = g.flatten(x, "flatten")
    x = g.linear(x, "classifier.1", 1280, 1000)  # classifier.0 is Dropout
    return g.finish([3, 224, 224], 1000, x, "torchvision MobileNetV2 IMAGENET1K_V1, BN unfused")


# ---------------------------------------------------------------------------- EfficientNet-Lite0

# efficientnet_lite_pytorch's blocks for lite0 (width and depth 1.0): repeats r, kernel k, first stride s,
# expand ratio e, input and output channels; no squeeze-excitation, ReLU6, BN eps 1e-3.
_LITE0_BLOCKS = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                 (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
LITE_BN_EPS = 1e-3


def same_pads(size: int, k: int, stride: int) -> tuple[list[int], int]:
    """TensorFlow's "SAME" padding of ``Conv2dStaticSamePadding`` for a square input of ``size``:
    the extra pixel goes after (bottom/right). Returns ONNX pads [top, left, bottom, right] and the output size."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    lo, hi = total // 2, total - total // 2
    return [lo, lo, hi, hi], out


def efficientnet_lite0(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """efficientnet_lite_pytorch ``efficientnet-lite0``, ImageNet 1000 classes, input [N,3,224,224],
    normalized as (x - 127) / 128 on 0..255 pixels."""
    g = GraphBuilder(weights, "efficientnet_lite0")
    size = 224

    def conv_bn(x, conv, bn, cout, stride=1, group=1, relu6=True):
        nonlocal size
        k = weights[conv + ".weight"].shape[2]
        pads, out = same_pads(size, k, stride)
        x = g.conv(x, conv, stride=stride, group=group, pads=pads)
        size = out
        x = g.bn(x, bn, cout, eps=LITE_BN_EPS)
        return g.relu6(x, bn + ".relu6") if relu6 else x

    x = conv_bn("input", "_conv_stem", "_bn0", 32, stride=2)
    idx = 0
    for repeats, _k, first_stride, expand, cin, cout in _LITE0_BLOCKS:
        for i in range(repeats):
            stride, block_in = (first_stride, cin) if i == 0 else (1, cout)
            p = f"_blocks.{idx}"
            inp, hidden = x, block_in * expand
            if expand != 1:
                x = conv_bn(x, p + "._expand_conv", p + "._bn0", hidden)
            x = conv_bn(x, p + "._depthwise_conv", p + "._bn1", hidden, stride=stride, group=hidden)
            x = conv_bn(x, p + "._project_conv", p + "._bn2", cout, relu6=False)
            if stride == 1 and block_in == cout:
                x = g._node("Add", [x, inp], p + ".add")
            idx += 1
    x = conv_bn(x, "_conv_head", "_bn1", 1280)
    x = g.global_avg_pool(x, "avgpool")
    x = g.flatten(x, "flatten")
    x = g.linear(x, "_fc", 1280, 1000)  # _dropout is the identity at inference
    return g.finish([3, 224, 224], 1000, x, "EfficientNet-Lite0 (efficientnet_lite_pytorch), BN unfused, SAME pads")


# ---------------------------------------------------------------------------- ccexam digits

def svhn_net(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """ccexam SVHNNet: 3 x [Conv-BN-ReLU x2, MaxPool], Linear 2048->256->10, input [N,3,32,32]."""
    g = GraphBuilder(weights, "svhn_net")
    x = "input"
    for b, cout in enumerate((32, 64, 128)):
        # block = Conv(0) BN(1) ReLU(2) Conv(3) BN(4) ReLU(5) MaxPool(6)
        for conv_i in (0, 3):
            x = g.conv(x, f"features.{b}.{conv_i}", bias=True)
            x = g.bn(x, f"features.{b}.{conv_i + 1}", cout)
            x = g.relu(x, f"features.{b}.{conv_i + 2}")
        x = g.maxpool2(x, f"features.{b}.6")
    x = g.flatten(x, "flatten")
    # classifier = Dropout(0) Linear(1) ReLU(2) Dropout(3) Linear(4)
    x = g.linear(x, "classifier.1", 128 * 4 * 4, 256)
    x = g.relu(x, "classifier.2")
    x = g.linear(x, "classifier.4", 256, 10)
    return g.finish([3, 32, 32], 10, x, "ccexam SVHNNet (32x32 RGB digits), BN unfused")


def usps_net(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """ccexam USPSNet: Conv-BN-ReLU-MaxPool x2, Linear 1024->128->10, input [N,1,16,16]."""
    g = GraphBuilder(weights, "usps_net")
    # features = Conv(0) BN(1) ReLU(2) MaxPool(3) Conv(4) BN(5) ReLU(6) MaxPool(7)
    x = g.conv("input", "features.0", bias=True)
    x = g.bn(x, "features.1", 32)
    x = g.relu(x, "features.2")
    x = g.maxpool2(x, "features.3")
    x = g.conv(x, "features.4", bias=True)
    x = g.bn(x, "features.5", 64)
    x = g.relu(x, "features.6")
    x = g.maxpool2(x, "features.7")
    x = g.flatten(x, "flatten")
    # classifier = Dropout(0) Linear(1) ReLU(2) Dropout(3) Linear(4)
    x = g.linear(x, "classifier.1", 64 * 4 * 4, 128)
    x = g.relu(x, "classifier.2")
    x = g.linear(x, "classifier.4", 128, 10)
    return g.finish([1, 16, 16], 10, x, "ccexam USPSNet (16x16 grayscale digits), BN unfused")


def mnist_net(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """ccexam MNISTNet: Conv-ReLU-MaxPool x2 (no BN), Linear 3136->128->10, input [N,1,28,28]."""
    g = GraphBuilder(weights, "mnist_net")
    # features = Conv(0) ReLU(1) MaxPool(2) Conv(3) ReLU(4) MaxPool(5)
    x = g.conv("input", "features.0", bias=True)
    x = g.relu(x, "features.1")
    x = g.maxpool2(x, "features.2")
    x = g.conv(x, "features.3", bias=True)
    x = g.relu(x, "features.4")
    x = g.maxpool2(x, "features.5")
    x = g.flatten(x, "flatten")
    # classifier = Linear(0) ReLU(1) Linear(2)
    x = g.linear(x, "classifier.0", 64 * 7 * 7, 128)
    x = g.relu(x, "classifier.1")
    x = g.linear(x, "classifier.2", 128, 10)
    return g.finish([1, 28, 28], 10, x, "ccexam MNISTNet (28x28 grayscale digits), no BatchNorm")


BUILDERS = {
    "mobilenetv2": mobilenet_v2,
    "efficientnet_lite0": efficientnet_lite0,
    "svhn": svhn_net,
    "usps": usps_net,
    "mnist": mnist_net,
}
