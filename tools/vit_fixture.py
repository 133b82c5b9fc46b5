"""Write ``tests/fixtures/vit_tiny.onnx``: a one-block vision transformer with the node patterns
``torch.onnx.export`` (opset 17) writes for one, random weights (seeded):

* a 4×4 patch embedding (Conv) followed by BatchNormalization (a hybrid stem, so that BatchNorm
  methods have parameters to adapt), flattened to tokens by Reshape and Transpose whose shapes
  come from Shape/Gather/Unsqueeze/Concat arithmetic on the batch size;
* a class token broadcast with ``expand(n, -1, -1)`` as exported: the size list's -1 entries
  replaced through ConstantOfShape, Equal and Where, then Expand; Concat, position embedding;
* pre-norm attention: LayerNormalization, one MatMul for Q, K and V, Reshape to heads, Transpose,
  Gather of Q, K and V (axis 0 of run-time data), scaled Q·Kᵀ, Softmax, ·V, back to tokens, output
  projection, residual; then LayerNormalization, an MLP with GELU as Erf (opset < 20), residual;
* a final LayerNormalization, the class token picked by Gather (index 0 of axis 1) and a Gemm head.

Also ``tests/fixtures/gn_tiny.onnx``: a convolution with GroupNorm as ``torch.onnx.export``
writes it before opset 18 (Reshape to [N, groups, -1], InstanceNormalization with unit scale and
zero bias, Reshape back, the affine weight and bias as [C, 1, 1] Mul and Add), ReLU, pooling and
a Gemm head (the ResNet-GN family SAR evaluates on); and ``gn21_tiny.onnx`` with the
GroupNormalization op itself (opset 21: scale and bias per channel).

And ``tests/fixtures/convnext_tiny.onnx`` (opset 20): GoogLeNet's ``transform_input`` (each input
channel gathered, scaled and shifted, concatenated back: Gather of run-time data), a 4×4 patch
stem with a channels-first LayerNorm (Transpose, LayerNormalization, Transpose), one ConvNeXt
block (7×7 depthwise convolution, LayerNorm over channels last, MatMul, the Gelu op, MatMul, layer
scale, residual), pooling, a final LayerNorm and a Gemm head.

Input [N, 3, 8, 8], 5 classes. cli/tests/parity.rs compares them with ONNX Runtime and
cli/tests/adapt_gradients.rs checks a TENT step's BatchNorm gradients, which flow back through
all of it, against finite differences. Needs onnx and numpy only; the file is committed."""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/vit_tiny.onnx"
DIM, HEADS, PATCH, SIDE, CLASSES, HIDDEN = 8, 2, 4, 8, 5, 16
TOKENS = (SIDE // PATCH) ** 2


class Builder:
    """Nodes and seeded random initializers of one graph, input [N, 3, SIDE, SIDE] and output
    [N, CLASSES]."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.inits = []
        self.nodes = []

    def w(self, name, *shape, scale=0.3, offset=0.0):
        values = offset + scale * self.rng.standard_normal(shape)
        self.inits.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    def c(self, name, value, dtype=np.int64):
        self.inits.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
        return name

    def n(self, op, ins, out, **attrs):
        self.nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def save(self, name: str, opset: int, path: Path) -> None:
        graph = helper.make_graph(
            self.nodes, name,
            inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
            outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
            initializer=self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="acclimate-tools")
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, path)


def main() -> None:
    g = Builder(23)
    w, c, n = g.w, g.c, g.n

    x = n("Conv", ["input", w("patch.weight", DIM, 3, PATCH, PATCH), w("patch.bias", DIM)], "patch",
          kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH])
    x = n("BatchNormalization", [x, w("bn.weight", DIM, scale=0.2, offset=1.0), w("bn.bias", DIM, scale=0.1),
                                 w("bn.running_mean", DIM, scale=0.1), w("bn.running_var", DIM, scale=0.1, offset=1.0)],
          "bn", epsilon=1e-5)
    # batch = Shape(input)[0] as a 1-element tensor, the exporter's way.
    shape = n("Shape", ["input"], "in_shape")
    batch = n("Gather", [shape, c("zero", 0)], "batch", axis=0)
    batch1 = n("Unsqueeze", [batch, c("axes0", [0])], "batch1")
    tok_shape = n("Concat", [batch1, c("tok_dims", [DIM, -1])], "tok_shape", axis=0)
    x = n("Reshape", [x, tok_shape], "flat")
    x = n("Transpose", [x], "tokens", perm=[0, 2, 1])
    # cls_token.expand(n, -1, -1)
    sizes = n("Concat", [batch1, c("minus_ones", [-1, -1])], "cls_sizes", axis=0)
    ones = n("ConstantOfShape", [c("three", [3])], "cls_ones",
             value=numpy_helper.from_array(np.array([1], dtype=np.int64)))
    is_neg = n("Equal", [sizes, c("minus_one", -1)], "cls_is_neg")
    sizes = n("Where", [is_neg, ones, sizes], "cls_sizes_fixed")
    cls = n("Expand", [w("cls_token", 1, 1, DIM), sizes], "cls")
    x = n("Concat", [cls, x], "with_cls", axis=1)
    x = n("Add", [x, w("pos", 1, TOKENS + 1, DIM, scale=0.1)], "embedded")

    def ln(v, name):
        return n("LayerNormalization", [v, w(name + ".weight", DIM, scale=0.2, offset=1.0),
                                        w(name + ".bias", DIM, scale=0.1)], name, axis=-1, epsilon=1e-6)

    # attention
    h = ln(x, "ln1")
    qkv = n("MatMul", [h, w("qkv.weight", DIM, 3 * DIM)], "qkv")
    qkv = n("Add", [qkv, w("qkv.bias", 3 * DIM, scale=0.1)], "qkv_b")
    heads_shape = n("Concat", [batch1, c("heads_dims", [TOKENS + 1, 3, HEADS, DIM // HEADS])], "heads_shape", axis=0)
    qkv = n("Reshape", [qkv, heads_shape], "qkv_heads")
    qkv = n("Transpose", [qkv], "qkv_t", perm=[2, 0, 3, 1, 4])  # [3, N, H, T, D]
    q = n("Gather", [qkv, c("i0", 0)], "q", axis=0)
    k = n("Gather", [qkv, c("i1", 1)], "k", axis=0)
    v = n("Gather", [qkv, c("i2", 2)], "v", axis=0)
    kt = n("Transpose", [k], "kt", perm=[0, 1, 3, 2])
    att = n("MatMul", [q, kt], "scores")
    att = n("Mul", [att, c("scale", (DIM // HEADS) ** -0.5, np.float32)], "scaled")
    att = n("Softmax", [att], "attn", axis=-1)
    o = n("MatMul", [att, v], "ctx")
    o = n("Transpose", [o], "ctx_t", perm=[0, 2, 1, 3])
    o = n("Reshape", [o, n("Concat", [batch1, c("merge_dims", [TOKENS + 1, DIM])], "merge_shape", axis=0)], "merged")
    o = n("MatMul", [o, w("proj.weight", DIM, DIM)], "proj")
    x = n("Add", [x, o], "res1")
    # MLP with GELU as exported before opset 20
    h = ln(x, "ln2")
    h = n("MatMul", [h, w("fc1.weight", DIM, HIDDEN)], "fc1")
    h = n("Add", [h, w("fc1.bias", HIDDEN, scale=0.1)], "fc1_b")
    z = n("Div", [h, c("sqrt2", np.sqrt(2.0), np.float32)], "gelu_z")
    z = n("Erf", [z], "gelu_erf")
    z = n("Add", [z, c("one", 1.0, np.float32)], "gelu_1p")
    h = n("Mul", [h, z], "gelu_x")
    h = n("Mul", [h, c("half", 0.5, np.float32)], "gelu")
    h = n("MatMul", [h, w("fc2.weight", HIDDEN, DIM)], "fc2")
    x = n("Add", [x, h], "res2")
    x = ln(x, "ln_final")
    x = n("Gather", [x, c("cls_index", 0)], "cls_out", axis=1)
    n("Gemm", [x, w("head.weight", CLASSES, DIM), w("head.bias", CLASSES, scale=0.1)], "logits", transB=1)

    g.save("vit_tiny", 17, OUT)


def group_norm_net() -> None:
    g = Builder(29)
    w, c, n = g.w, g.c, g.n
    channels, groups = 8, 4

    x = n("Conv", ["input", w("conv.weight", channels, 3, 3, 3), w("conv.bias", channels)], "conv",
          kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    shape = n("Shape", [x], "conv_shape")
    x = n("Reshape", [x, c("grouped", [0, groups, -1])], "grouped_x")
    x = n("InstanceNormalization", [x, c("ones", np.ones(groups), np.float32), c("zeros", np.zeros(groups), np.float32)],
          "gn", epsilon=1e-5)
    x = n("Reshape", [x, shape], "gn_back")
    x = n("Mul", [x, w("gn.weight", channels, 1, 1, scale=0.2, offset=1.0)], "gn_scaled")
    x = n("Add", [x, w("gn.bias", channels, 1, 1, scale=0.1)], "gn_out")
    x = n("Relu", [x], "relu")
    x = n("GlobalAveragePool", [x], "gap")
    x = n("Flatten", [x], "flat", axis=1)
    n("Gemm", [x, w("head.weight", CLASSES, channels), w("head.bias", CLASSES, scale=0.1)], "logits", transB=1)
    g.save("gn_tiny", 13, ROOT / "tests/fixtures/gn_tiny.onnx")


def group_norm_op_nets() -> None:
    """The GroupNormalization op itself, opset 21 (scale and bias per channel)."""
    for opset, per in ((21, 8),):
        g = Builder(37 + opset)
        w, n = g.w, g.n
        x = n("Conv", ["input", w("conv.weight", 8, 3, 3, 3), w("conv.bias", 8)], "conv", kernel_shape=[3, 3],
              pads=[1, 1, 1, 1])
        x = n("GroupNormalization", [x, w("gn.weight", per, scale=0.2, offset=1.0), w("gn.bias", per, scale=0.1)],
              "gn", num_groups=4, epsilon=1e-5)
        x = n("Relu", [x], "relu")
        x = n("GlobalAveragePool", [x], "gap")
        x = n("Flatten", [x], "flat", axis=1)
        n("Gemm", [x, w("head.weight", CLASSES, 8), w("head.bias", CLASSES, scale=0.1)], "logits", transB=1)
        g.save(f"gn{opset}_tiny", opset, ROOT / f"tests/fixtures/gn{opset}_tiny.onnx")


def convnext_net() -> None:
    g = Builder(31)
    w, c, n = g.w, g.c, g.n
    dim = 8
    # transform_input: x_c * (std_c / 0.5) + (mean_c - 0.5) / 0.5, channel by channel.
    parts = []
    for ch, (scale, shift) in enumerate([(0.458, -0.030), (0.448, -0.088), (0.450, -0.188)]):
        x_c = n("Gather", ["input", c(f"ch{ch}", [ch])], f"in_ch{ch}", axis=1)
        x_c = n("Mul", [x_c, c(f"scale{ch}", scale, np.float32)], f"in_scaled{ch}")
        parts.append(n("Add", [x_c, c(f"shift{ch}", shift, np.float32)], f"in_shifted{ch}"))
    x = n("Concat", parts, "transformed", axis=1)
    x = n("Conv", [x, w("stem.weight", dim, 3, 4, 4), w("stem.bias", dim)], "stem", kernel_shape=[4, 4], strides=[4, 4])

    def ln_last(v, name):
        return n("LayerNormalization", [v, w(name + ".weight", dim, scale=0.2, offset=1.0),
                                        w(name + ".bias", dim, scale=0.1)], name, axis=-1, epsilon=1e-6)

    x = n("Transpose", [x], "stem_nhwc", perm=[0, 2, 3, 1])
    x = ln_last(x, "stem_ln")
    x = n("Transpose", [x], "stem_out", perm=[0, 3, 1, 2])
    h = n("Conv", [x, w("dw.weight", dim, 1, 7, 7), w("dw.bias", dim)], "dw", kernel_shape=[7, 7],
          pads=[3, 3, 3, 3], group=dim)
    h = n("Transpose", [h], "dw_nhwc", perm=[0, 2, 3, 1])
    h = ln_last(h, "block_ln")
    h = n("MatMul", [h, w("pw1.weight", dim, 4 * dim)], "pw1")
    h = n("Add", [h, w("pw1.bias", 4 * dim, scale=0.1)], "pw1_b")
    h = n("Gelu", [h], "gelu")
    h = n("MatMul", [h, w("pw2.weight", 4 * dim, dim)], "pw2")
    h = n("Mul", [h, w("layer_scale", dim, scale=0.1, offset=0.5)], "scaled")
    h = n("Transpose", [h], "block_nchw", perm=[0, 3, 1, 2])
    x = n("Add", [x, h], "res")
    x = n("ReduceMean", [x, c("pool_axes", [2, 3])], "pooled", keepdims=0)
    x = ln_last(x, "head_ln")
    n("Gemm", [x, w("head.weight", CLASSES, dim), w("head.bias", CLASSES, scale=0.1)], "logits", transB=1)
    g.save("convnext_tiny", 20, ROOT / "tests/fixtures/convnext_tiny.onnx")


if __name__ == "__main__":
    main()
    group_norm_net()
    group_norm_op_nets()
    convnext_net()
