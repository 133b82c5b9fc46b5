"""Write variants of ``tests/fixtures/tta/tiny_auto/model.onnx`` with the output heads real
classifiers have, which the runtime must treat as the plain model (cli/tests/auto.rs,
cli/tests/stream_policy.rs):

* ``model_logits_nc11.onnx``: the logits unsqueezed from [N, C] to [N, C, 1, 1], what a head of a
  1×1 convolution and a global pooling (SqueezeNet) puts out;
* ``model_probs.onnx``: the softmax of the logits over the classes, then an Identity, as exports
  that end in probabilities (PaddleOCR's direction classifier, Keras models) do;
* ``model_nhwc.onnx``: the input channels last, [N, 8, 8, 3], transposed to [N, 3, 8, 8] by the
  graph's first node, as TensorFlow/Keras exports take their images.

Needs only ``onnx`` (tools/requirements.txt); the files are committed."""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
DIR = ROOT / "tests/fixtures/tta/tiny_auto"


def with_head(nodes, initializers, dims, file: str) -> None:
    model = onnx.load(DIR / "model.onnx")
    g = model.graph
    out = g.output[0].name
    for node in g.node:
        node.output[:] = ["head_in" if o == out else o for o in node.output]
    g.initializer.extend(initializers)
    g.node.extend(nodes)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, dims))
    onnx.checker.check_model(model)
    onnx.save(model, DIR / file)


def nhwc() -> None:
    model = onnx.load(DIR / "model.onnx")
    g = model.graph
    image = g.input[0]
    dims = [d.dim_value or d.dim_param for d in image.type.tensor_type.shape.dim]
    for node in g.node:
        node.input[:] = ["input_nchw" if i == image.name else i for i in node.input]
    g.node.insert(0, helper.make_node("Transpose", [image.name], ["input_nchw"], name="to_nchw", perm=[0, 3, 1, 2]))
    del g.input[0]
    g.input.insert(0, helper.make_tensor_value_info(image.name, TensorProto.FLOAT, [dims[0], dims[2], dims[3], dims[1]]))
    onnx.checker.check_model(model)
    onnx.save(model, DIR / "model_nhwc.onnx")


def main() -> None:
    classes = onnx.load(DIR / "model.onnx").graph.output[0].type.tensor_type.shape.dim[1].dim_value
    axes = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "unsqueeze_axes")
    with_head(
        [helper.make_node("Unsqueeze", ["head_in", "unsqueeze_axes"], ["logits"], name="to_nc11")],
        [axes],
        ["N", classes, 1, 1],
        "model_logits_nc11.onnx",
    )
    nhwc()
    with_head(
        [
            helper.make_node("Softmax", ["head_in"], ["probs"], name="softmax", axis=1),
            helper.make_node("Identity", ["probs"], ["logits"], name="identity"),
        ],
        [],
        ["N", classes],
        "model_probs.onnx",
    )


if __name__ == "__main__":
    main()
