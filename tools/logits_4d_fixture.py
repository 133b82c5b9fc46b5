"""Write ``tests/fixtures/tta/tiny_auto/model_logits_nc11.onnx``: the ``tiny_auto`` model with its
logits unsqueezed from [N, C] to [N, C, 1, 1], the shape classifiers whose head is a 1×1
convolution and a global pooling (SqueezeNet) put out. The runtime must treat such logits as
[N, C] (cli/tests/auto.rs)."""

from pathlib import Path

import onnx
from onnx import TensorProto, helper, numpy_helper
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DIR = ROOT / "tests/fixtures/tta/tiny_auto"


def main() -> None:
    model = onnx.load(DIR / "model.onnx")
    g = model.graph
    out = g.output[0]
    classes = out.type.tensor_type.shape.dim[1].dim_value
    for node in g.node:
        node.output[:] = ["logits_nc" if o == out.name else o for o in node.output]
    g.initializer.append(numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "unsqueeze_axes"))
    g.node.append(helper.make_node("Unsqueeze", ["logits_nc", "unsqueeze_axes"], [out.name], name="to_nc11"))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(out.name, TensorProto.FLOAT, ["N", classes, 1, 1]))
    onnx.checker.check_model(model)
    onnx.save(model, DIR / "model_logits_nc11.onnx")


if __name__ == "__main__":
    main()
