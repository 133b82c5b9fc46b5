#!/usr/bin/env bash
# The main job on a fresh machine: install what is missing, build the assets and the release
# binary, then show the engine on real models and data — MobileNetV2 (ImageNet) on two photos and
# the SVHN digit network on real MNIST digits — on the GPU (lavapipe when there is none) beside
# ONNX Runtime, and a short benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/prereqs.sh
bash tools/setup.sh
echo "== building (release)"
cargo build --release -q
source tools/env.sh
A=target/release/acclimate
PY=.venv/bin/python
OUT="${TMPDIR:-/tmp}/acclimate-demo"
mkdir -p "$OUT"

echo; echo "== acclimate info assets/mobilenetv2.onnx"
$A info assets/mobilenetv2.onnx | sed -n '1,6p;/BatchNormalization:/p;/unsupported/p;/GPU engine/p'

echo; echo "== MobileNetV2 on photos (GPU vs ONNX Runtime)"
$PY tools/demo_report.py photos "$OUT/photos.npy" assets/photos/*.png
$A run assets/mobilenetv2.onnx --input "$OUT/photos.npy" --output "$OUT/photos_gpu.npy" >/dev/null
$A run assets/mobilenetv2.onnx --input "$OUT/photos.npy" --output "$OUT/photos_ort.npy" --backend ort >/dev/null
$PY tools/demo_report.py classify "$OUT/photos_gpu.npy" "$OUT/photos_ort.npy" assets/photos/*.png

echo; echo "== SVHN network on MNIST digits (GPU vs ONNX Runtime)"
$A run assets/svhn.onnx --input assets/mnist32_first64.npy --output "$OUT/digits_gpu.npy" >/dev/null
$A run assets/svhn.onnx --input assets/mnist32_first64.npy --output "$OUT/digits_ort.npy" --backend ort >/dev/null
$PY tools/demo_report.py digits "$OUT/digits_gpu.npy" "$OUT/digits_ort.npy" assets/mnist32_first64_labels.npy

echo; echo "== acclimate bench assets/svhn.onnx"
$A bench assets/svhn.onnx --batch 1,16 --backend gpu,ort --warmup 2 --iters 10
