#!/usr/bin/env bash
# `auto` on a network that is confident and right on its own domain: the BN digit network of
# tools/train_digits_bn.py (committed as tests/fixtures/tta/digits_bn_auto_one_class/model.onnx;
# 97 % on the MNIST test digits as `acclimate stream` resizes them) on the MNIST test digits,
# clean and with twelve ImageNet-C corruptions, in the test-set order, a Dirichlet 0.1 order and
# the sorted order (the first 1,024 sorted digits are nearly all zeros: a stream of one class);
# seed 1, batch mode with batches of 64. auto (no config) against the unadapted model, norm
# (batch statistics), ETA (Adam 5e-3) and LAME; then auto in frame mode (the stream's defaults)
# on the one-class orders. One line per run; docs/accuracy.md has the table. About 15 minutes
# on 2 cores with lavapipe.
# Usage: tools/confident_model.sh [path/to/acclimate]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
A="${1:-target/release/acclimate}"
M=tests/fixtures/tta/digits_bn_auto_one_class/model.onnx
SRC=idx:assets/mnist/t10k-images-idx3-ubyte,assets/mnist/t10k-labels-idx1-ubyte
PRE=size=32,channels=1,mean=0.1309,std=0.2892
CFG=$(mktemp -d)
trap 'rm -rf "$CFG"' EXIT
BATCH=$'[stream]\nmode = "batch"\nbatch = 64\n'
printf '[adapt]\nmethod = "auto"\n%s' "$BATCH" > "$CFG/auto.toml"
printf '[adapt]\nmethod = "source"\n%s' "$BATCH" > "$CFG/source.toml"
printf '[adapt]\nmethod = "norm"\n%s' "$BATCH" > "$CFG/norm.toml"
printf '[adapt]\nmethod = "lame"\n%s' "$BATCH" > "$CFG/lame.toml"
printf '[adapt]\nmethod = "eta"\n[optimizer]\nkind = "adam"\nlr = 0.005\n[eata]\nd_margin = 0.4\n%s' "$BATCH" \
  > "$CFG/eta.toml"
printf '[adapt]\nmethod = "auto"\n[stream]\nmode = "frame"\n' > "$CFG/auto_frame.toml"
run() { # config corruption order frames
  local out
  out=$("$A" stream "$M" --config "$CFG/$1.toml" --source "$SRC" --preprocess "$PRE" --corrupt "$2" \
    --order "$3" --limit "$4" --seed 1 --quiet 2>&1 | grep 'accuracy:')
  echo "$1 | $2 | $3 | $4 | $out"
}
for row in "none iid 1024" "gaussian_noise:3 iid 1024" "gaussian_noise:5 iid 1024" "defocus_blur:3 iid 1024" \
  "motion_blur:3 iid 1024" "contrast:3 iid 1024" "jpeg_compression:5 iid 1024" "pixelate:4 iid 1024" \
  "fog:3 iid 1024" "brightness:4 iid 1024" "impulse_noise:3 iid 1024" "low_light:3 iid 1024" \
  "none dirichlet:0.1 1024" "none sorted 1024" "gaussian_noise:3 dirichlet:0.1 1024" \
  "contrast:3 dirichlet:0.1 1024" "motion_blur:3 dirichlet:0.1 1024" "none iid 128" "gaussian_noise:3 iid 128"; do
  read -r c o n <<< "$row"
  for m in auto source norm eta lame; do run "$m" "$c" "$o" "$n"; done
done
for o in dirichlet:0.1 sorted; do run auto_frame none "$o" 512; done
