#!/usr/bin/env python3
"""Tiny torchvision and timm networks exported by torch, for tests/fixtures (CI needs no torch).

torchvision's own `VisionTransformer` (nn.MultiheadAttention: its export computes head sizes
with Mod) and `SwinTransformer` (shifted windows: Mod for paddings, attention masks built by
slice assignment as ScatterND, Not), shrunk to a few thousand parameters, random weights (the
heads drawn large enough that the entropy's gradients are not vanishingly small; the ViT's is
zero-initialised), exported with
`torch.onnx.export` (TorchScript exporter, opset 17, dynamic batch):

    python tools/torch_fixtures.py      # tools/requirements-reference.txt (torch, torchvision, timm)

writes tests/fixtures/tv_vit_tiny.onnx and tests/fixtures/tv_swin_tiny.onnx, and
tests/fixtures/bit_tiny.onnx: timm's `ResNetV2` (BiT) shrunk, the GroupNorm ResNet of the TTA
papers: every convolution standardises its weights with `F.batch_norm(w, training=True)` (a
training-mode BatchNormalization on a constant, folded when the model loads), GroupNorm through
InstanceNormalization on grouped views, a zero ConstantPad before a MaxPool (which ONNX
Runtime's optimizer fuses into the pool's -inf padding: compare with its optimizations off).
And tests/fixtures/interp_tiny.onnx: an HRNet-style fusion of two resolutions with BatchNorm,
the branch brought back up by every F.interpolate form torch exports as Resize — nearest by a
scale factor (HRNet's `nn.Upsample`), bilinear to the size of another tensor (sizes computed
from Shape), bicubic with align_corners, and a bilinear shrink — then pooled to 5 classes.
Their parity with ONNX Runtime is cli/tests/parity.rs; their LayerNorm and GroupNorm
adaptation, adapt_gradients.rs (the BatchNorm gradients through Resize too).
"""
import warnings
from pathlib import Path

import torch
from functools import partial
from timm.layers import GroupNormAct
from timm.models.resnetv2 import ResNetV2
from torchvision.models import SwinTransformer, VisionTransformer

ROOT = Path(__file__).resolve().parent.parent


def export(model, path, size, **options):
    model.eval()
    torch.onnx.export(model, (torch.randn(2, 3, size, size),), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                      opset_version=17, dynamo=False, **options)


def randomise(model, head):
    """Draws the head's parameters (each with its std) and every LayerNorm and GroupNorm affine
    parameter, in that order."""
    with torch.no_grad():
        for p, std in head:
            p.normal_(0.0, std)
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)


class InterpTiny(torch.nn.Module):
    """Two branches (full and half resolution) fused after upsampling, HRNet's pattern."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.mix = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        nn = torch.nn.functional
        a = self.stem(x)
        b = self.down(a)
        y = a + self.up(b)
        y = y + nn.interpolate(self.mix(b), size=a.shape[-2:], mode="bilinear", align_corners=False)
        y = y + nn.interpolate(b, scale_factor=2.0, mode="bicubic", align_corners=True)
        y = nn.interpolate(torch.relu(y), scale_factor=0.75, mode="bilinear", align_corners=False)
        return self.fc(y.mean(dim=(2, 3)))


def main():
    warnings.filterwarnings("ignore")
    torch.manual_seed(2026)
    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                            num_classes=5)
    randomise(vit, [(vit.heads.head.weight, 0.5), (vit.heads.head.bias, 0.1)])
    export(vit, ROOT / "tests/fixtures/tv_vit_tiny.onnx", 16)
    swin = SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[2, 1], num_heads=[1, 2], window_size=[2, 2],
                           num_classes=5)
    randomise(swin, [(swin.head.weight, 0.5)])
    export(swin, ROOT / "tests/fixtures/tv_swin_tiny.onnx", 16)
    bit = ResNetV2(layers=[1, 1], channels=(16, 32), num_classes=5, stem_chs=8,
                   norm_layer=partial(GroupNormAct, num_groups=4))
    randomise(bit, [(bit.head.fc.weight, 0.5)])
    export(bit, ROOT / "tests/fixtures/bit_tiny.onnx", 16)
    torch.manual_seed(2027)
    interp = InterpTiny()
    with torch.no_grad():
        interp.fc.weight.normal_(0.0, 0.5)
        for m in interp.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    # PRESERVE keeps the BatchNorms (eval mode) instead of folding them into the convolutions.
    export(interp, ROOT / "tests/fixtures/interp_tiny.onnx", 12, training=torch.onnx.TrainingMode.PRESERVE)


if __name__ == "__main__":
    main()
