#!/usr/bin/env python3
"""Export timm classifiers with random weights and compare the runtime with ONNX Runtime.

For each architecture: `timm.create_model(name, num_classes=10)` (weights left all-zero by the
model's init are drawn from N(0, 0.05) so that the comparison is not of zeros), exported by
`torch.onnx.export` (TorchScript exporter, opset 17, BatchNorm kept: TrainingMode.PRESERVE) at
128x128 where the model allows (else its own input size), run by `acclimate run` (the GPU
engine) and by ONNX Runtime on one random image; prints max |acclimate - ORT| / max |ORT|, or
why the export, ONNX Runtime or the runtime refused. Needs tools/requirements-reference.txt
(torch, timm) and a release build:

    cargo build --release
    python tools/timm_sweep.py resnet50 vit_small_patch16_224 ...   # no names: the README's list
"""
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch

ROOT = Path(__file__).resolve().parent.parent
ACCLIMATE = ROOT / "target/release/acclimate"
# The README's sweep (README, "Supported operators").
MODELS = """cspdarknet53 dpn68 gernet_s inception_resnet_v2 inception_v4 mixnet_s res2net50_14w_8s resnest14d
selecsls42b seresnext26d_32x4d skresnet18 tresnet_m vovnet39a xception41 coat_lite_tiny crossvit_9_240
twins_svt_small visformer_tiny cait_xxs24_224 convit_tiny nfnet_l0 regnetz_b16 edgenext_xx_small efficientvit_b0
efficientvit_m0 mobileone_s0 tiny_vit_5m_224 inception_next_tiny sequencer2d_s gmlp_ti16_224 ecaresnet26t
davit_tiny efficientformerv2_s0 focalnet_tiny_srf hgnet_tiny repvit_m1 volo_d1_224 ghostnetv2_100
lambda_resnet26t halonet26t botnet26t_256 resnet50_gn nf_resnet26 dm_nfnet_f0 poolformerv2_s12
convmixer_768_32 mobilevitv2_050 levit_conv_128s rdnet_tiny fasternet_t0 starnet_s1 deit3_small_patch16_224
flexivit_small vit_relpos_small_patch16_224 vit_srelpos_small_patch16_224 swinv2_cr_tiny_ns_224
swin_s3_tiny_224 pit_ti_224 tnt_s_patch16_224 coat_tiny maxxvit_rmlp_nano_rw_256 coatnet_nano_rw_224
gcvit_xxtiny mvitv2_tiny hiera_tiny_224 nextvit_small convformer_s18 caformer_s18 hgnetv2_b0
efficientnetv2_rw_t tf_efficientnet_b0 tf_mobilenetv3_small_100 spnasnet_100 fbnetv3_b hardcorenas_a
resnetrs50 resnetblur18 resnetaa50 ese_vovnet19b_dw cs3darknet_s darknet53 sebotnet33ts_256
eca_halonext26ts gc_efficientnetv2_rw_t regnetx_002 resnet10t legacy_xception nasnetalarge cspresnext50
hrnet_w18_small_v2 repghostnet_050 nest_tiny deit_tiny_distilled_patch16_224 convnextv2_atto mambaout_femto
vitamin_small_224""".split()


def sweep(name: str, work: Path) -> str:
    torch.manual_seed(0)
    try:
        m = timm.create_model(name, pretrained=False, num_classes=10).eval()
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() >= 2 and not p.any():
                    p.normal_(0.0, 0.05)
        cfg = m.pretrained_cfg
        size = cfg.get("input_size", (3, 224, 224))
        hw = size[1:] if cfg.get("fixed_input_size", False) else (min(size[1], 128), min(size[2], 128))
        x = torch.randn(1, 3, *hw)
        path, xin, out = work / f"{name}.onnx", work / f"{name}_x.npy", work / f"{name}_out.npy"
        with torch.no_grad():
            torch.onnx.export(m, (x,), str(path), input_names=["input"], output_names=["logits"], opset_version=17,
                              dynamo=False, training=torch.onnx.TrainingMode.PRESERVE)
    except Exception as e:  # noqa: BLE001 - report any exporter failure and go on
        return f"export failed: {type(e).__name__}: {str(e)[:120]}"
    np.save(xin, x.numpy())
    try:
        ref = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    except Exception as e:  # noqa: BLE001
        return f"ONNX Runtime failed: {str(e)[:160]}"
    r = subprocess.run([str(ACCLIMATE), "run", str(path), "-i", str(xin), "-o", str(out)], capture_output=True,
                       text=True)
    for f in (path, xin):
        os.remove(f)
    if r.returncode != 0:
        return f"acclimate failed (exit {r.returncode}): {r.stderr.strip()[:300]}"
    got = np.load(out)
    os.remove(out)
    err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12)
    return f"ok, max relative |acclimate - ORT| {err:.2e} at {hw[0]}x{hw[1]}"


def main():
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        for name in sys.argv[1:] or MODELS:
            t0 = time.time()
            print(f"{name}: {sweep(name, Path(d))} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
