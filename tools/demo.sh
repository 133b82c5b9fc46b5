#!/usr/bin/env bash
# The main job on a fresh machine: install what is missing, build the assets and the release
# binary, then `acclimate demo` — the SVHN digit network adapting on a stream of MNIST digits
# through corruptions and a class-correlated segment (report in ./acclimate-demo/) — followed by
# the engine on real models beside ONNX Runtime and a short benchmark. The GPU is lavapipe when
# there is no real one.
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

echo; echo "== acclimate demo (the SVHN network streaming MNIST digits, adapting as it goes)"
$A demo --out "$OUT/stream"

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

echo; echo "== TENT on the GPU: acclimate replay, SVHN network on the same digits in batches of 16"
$PY tools/demo_report.py split assets/mnist32_first64.npy 16 "$OUT/batches"
printf '[adapt]\nmethod = "tent"\n[optimizer]\nkind = "adam"\nlr = 0.001\n' > "$OUT/tent.toml"
$A replay assets/svhn.onnx --config "$OUT/tent.toml" --batches "$OUT/batches" --out "$OUT/tent.json" \
  --save-state "$OUT/tent.safetensors"
$PY tools/demo_report.py replay "$OUT/tent.json" assets/mnist32_first64_labels.npy "$OUT/digits_gpu.npy"

echo; echo "== acclimate bench assets/svhn.onnx"
$A bench assets/svhn.onnx --batch 1,16 --backend gpu,ort --warmup 2 --iters 10
