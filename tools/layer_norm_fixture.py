"""Write ``tests/fixtures/tta/tiny_tent_sgd/model_ln_gelu.onnx``: the reference tiny net with a
transformer-style block between its pooled features and its classifier — LayerNormalization
(opset 17, random scale and bias) and GELU as PyTorch exports it before opset 20
(x · 0.5 · (1 + Erf(x / √2))). cli/tests/adapt_gradients.rs checks the gradients a TENT step
passes back through them to the BatchNorm layers against finite differences.

Needs only ``onnx`` and numpy (tools/requirements.txt); the file is committed."""

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
DIR = ROOT / "tests/fixtures/tta/tiny_tent_sgd"


def main() -> None:
    model = onnx.load(DIR / "model.onnx")
    g = model.graph
    fc = next(n for n in g.node if n.op_type == "Gemm")
    features = fc.input[0]
    width = next(i for i in g.initializer if i.name == fc.input[1]).dims[1]
    rng = np.random.default_rng(17)
    g.initializer.extend([
        numpy_helper.from_array((1.0 + 0.3 * rng.standard_normal(width)).astype(np.float32), "ln.weight"),
        numpy_helper.from_array((0.2 * rng.standard_normal(width)).astype(np.float32), "ln.bias"),
        numpy_helper.from_array(np.array(np.sqrt(2.0), dtype=np.float32), "gelu.sqrt2"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "gelu.one"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "gelu.half"),
    ])
    block = [
        helper.make_node("LayerNormalization", [features, "ln.weight", "ln.bias"], ["ln"], name="ln", axis=-1,
                         epsilon=1e-5),
        helper.make_node("Div", ["ln", "gelu.sqrt2"], ["gelu.z"], name="gelu.div"),
        helper.make_node("Erf", ["gelu.z"], ["gelu.erf"], name="gelu.erf"),
        helper.make_node("Add", ["gelu.erf", "gelu.one"], ["gelu.sum"], name="gelu.add"),
        helper.make_node("Mul", ["ln", "gelu.sum"], ["gelu.prod"], name="gelu.mul"),
        helper.make_node("Mul", ["gelu.prod", "gelu.half"], ["gelu"], name="gelu.half"),
    ]
    fc.input[0] = "gelu"
    at = list(g.node).index(fc)
    for k, node in enumerate(block):
        g.node.insert(at + k, node)
    model.opset_import[0].version = 17
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, DIR / "model_ln_gelu.onnx")


if __name__ == "__main__":
    main()
