#!/usr/bin/env bash
# `auto` on the corruptions added last (zoom_blur, glass_blur, elastic_transform, snow, frost and the
# extras gaussian_blur, speckle_noise, saturate, spatter), which nothing in it was chosen on: the SVHN and USPS
# networks and the MNIST BatchNorm network of tools/train_digits_bn.py on the MNIST test digits,
# first 1,024 in the test-set order (i.i.d.), seed 1, batches of 64. auto with no config (the
# CLI's default) against the unadapted model, norm (batch statistics), ETA (Adam 5e-3) and LAME;
# then auto in frame mode (the library's default) on the SVHN network. One line per run;
# docs/accuracy.md has the table. About 40 minutes on 2 cores with lavapipe.
# Usage: [ONLY=REGEX] tools/new_corruptions.sh [path/to/acclimate]   (ONLY: the corruptions to run,
# e.g. ONLY=frost)
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
A="${1:-target/release/acclimate}"
SRC=idx:assets/mnist/t10k-images-idx3-ubyte,assets/mnist/t10k-labels-idx1-ubyte
CFG=$(mktemp -d)
trap 'rm -rf "$CFG"' EXIT
BATCH=$'[stream]\nmode = "batch"\nbatch = 64\n'
printf '[adapt]\nmethod = "norm"\n%s' "$BATCH" > "$CFG/norm.toml"
printf '[adapt]\nmethod = "lame"\n%s' "$BATCH" > "$CFG/lame.toml"
printf '[adapt]\nmethod = "eta"\n[optimizer]\nkind = "adam"\nlr = 0.005\n[eata]\nd_margin = 0.4\n%s' "$BATCH" \
  > "$CFG/eta.toml"
printf '[adapt]\nmethod = "auto"\n[stream]\nmode = "frame"\n' > "$CFG/auto_frame.toml"
run() { # network model preprocess method corruption
  [[ "$5" =~ ${ONLY:-.} ]] || return 0
  local cfg=() out
  [ "$4" = auto ] || cfg=(--config "$CFG/$4.toml")
  out=$("$A" stream "$2" "${cfg[@]}" --source "$SRC" --preprocess "$3" --corrupt "$5" --order iid --limit 1024 \
    --seed 1 --quiet 2>&1 | grep 'accuracy:')
  echo "$1 | $4 | $5 | $out"
}
NETS=(
  "svhn assets/svhn.onnx size=32,channels=3,mean=0.4377/0.4438/0.4728,std=0.1980/0.2010/0.1970"
  "usps assets/usps.onnx size=16,channels=1,mean=0.2471,std=0.2994"
  "mnist_bn tests/fixtures/tta/digits_bn_auto_one_class/model.onnx size=32,channels=1,mean=0.1309,std=0.2892"
)
for net in "${NETS[@]}"; do
  read -r name model pre <<< "$net"
  for c in zoom_blur:3 glass_blur:3 elastic_transform:3 snow:3 frost:3 gaussian_blur:3 speckle_noise:3 saturate:5 \
    spatter:3; do
    for m in auto norm eta lame; do run "$name" "$model" "$pre" "$m" "$c"; done
  done
done
read -r name model pre <<< "${NETS[0]}"
for c in zoom_blur:5 glass_blur:5 elastic_transform:5 frost:5 spatter:5; do
  for m in auto norm eta lame; do run "$name" "$model" "$pre" "$m" "$c"; done
done
for c in zoom_blur:3 glass_blur:3 elastic_transform:3 snow:3 frost:3 spatter:3; do run "$name" "$model" "$pre" auto_frame "$c"; done
