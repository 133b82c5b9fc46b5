#!/usr/bin/env python3
"""Trains the BatchNorm digit network that `auto`'s source-bias fixture and regression test use
(tests/fixtures/tta/digits_bn_auto_one_class/model.onnx), a network nothing in `auto` was tuned
on: five Conv-BN-ReLU blocks (16, 32, 32, 64, 64 channels; strides 1, 2, 1, 2, 2), global
average pooling and a linear layer, on 32x32 grayscale inputs (the 28x28 digits resized
bilinearly, as `acclimate stream` resizes them), normalised with the training set's mean and
standard deviation (printed; MNIST 0.1309 and 0.2892). Adam 2e-3, batches of 128, two epochs,
seed 0, CPU; about 4 minutes on 2 cores. Exported with BatchNormalization kept (opset 13,
dynamic batch).

Unlike the SVHN and USPS networks it is confident and right on its own domain (97 % on the MNIST
test digits as the runtime resizes them), which is what showed that a stream of one class reads
like a covariate shift that crowds the predictions (docs/accuracy.md). The same script trained
on Fashion-MNIST (Debian's `dataset-fashion-mnist`) gave the second network of that
measurement. Needs torch (tools/requirements-reference.txt); CI does not run it.

    python tools/train_digits_bn.py assets/mnist/train-images-idx3-ubyte \
        assets/mnist/train-labels-idx1-ubyte out.onnx
"""
import gzip
import sys

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F


def read_idx(path):
    data = (gzip.open if str(path).endswith(".gz") else open)(path, "rb").read()
    nd = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * nd).reshape(dims)


def block(i, o, stride):
    return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())


def main():
    images, labels, out = sys.argv[1:4]
    torch.manual_seed(0)
    torch.set_num_threads(2)
    x = torch.tensor(read_idx(images)).float().div(255).unsqueeze(1)
    y = torch.tensor(read_idx(labels)).long()
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    mean, std = x.mean().item(), x.std().item()
    print("mean", mean, "std", std)
    x = (x - mean) / std
    net = nn.Sequential(block(1, 16, 1), block(16, 32, 2), block(32, 32, 1), block(32, 64, 2), block(64, 64, 2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    for epoch in range(2):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            b = perm[i:i + 128]
            loss = F.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print("epoch", epoch, loss.item())
    net.eval()
    torch.onnx.export(net, x[:2], out, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
                      opset_version=13)
    ops = sorted({n.op_type for n in onnx.load(out).graph.node})
    assert "BatchNormalization" in ops, ops
    print(ops)


if __name__ == "__main__":
    main()
