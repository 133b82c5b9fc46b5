#!/usr/bin/env bash
# `auto` on a network nothing was tuned on: the USPS network (ccexam USPSNet, 16×16 grayscale,
# 2 BatchNorm layers) on the MNIST test digits, a real USPS→MNIST shift, clean, with Gaussian
# noise 3 and with contrast 3, in the test-set order and in a Dirichlet 0.1 class-correlated
# order; first 2,048 digits, seed 1. Batch mode (batches of 64): auto (no config) against the
# unadapted model and the presets source, norm (batch statistics), BN-α (α 0.1), LAME, label
# shift (EMA over the source model) and ETA (Adam 5e-3, the best SVHN preset). Frame mode (the
# stream's defaults: window 64, a step every 16): auto against the source. Then the sweep: eight
# more corruptions, the sorted and Dirichlet 0.01 orders, 128-digit streams and contrast and
# defocus blur in the class-correlated orders, auto against norm, ETA and LAME (batch mode). One
# line per run; docs/accuracy.md has both tables. About 27 minutes on 2 cores with lavapipe.
# Usage: tools/unseen_model.sh [path/to/acclimate]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
A="${1:-target/release/acclimate}"
SRC=idx:assets/mnist/t10k-images-idx3-ubyte,assets/mnist/t10k-labels-idx1-ubyte
PRE=size=16,channels=1,mean=0.2471,std=0.2994
CFG=$(mktemp -d)
trap 'rm -rf "$CFG"' EXIT
BATCH=$'[stream]\nmode = "batch"\nbatch = 64\n'
printf '[adapt]\nmethod = "auto"\n%s' "$BATCH" > "$CFG/auto.toml"
printf '[adapt]\nmethod = "norm"\n%s' "$BATCH" > "$CFG/norm.toml"
printf '[adapt]\nmethod = "norm"\nnorm = "alpha"\n%s' "$BATCH" > "$CFG/alpha.toml"
printf '[adapt]\nmethod = "lame"\n%s' "$BATCH" > "$CFG/lame.toml"
printf '[adapt]\nmethod = "source"\n[label_shift]\nmode = "ema"\n%s' "$BATCH" > "$CFG/label_shift.toml"
printf '[adapt]\nmethod = "eta"\n[optimizer]\nkind = "adam"\nlr = 0.005\n[eata]\nd_margin = 0.4\n%s' "$BATCH" \
  > "$CFG/eta.toml"
printf '[adapt]\nmethod = "auto"\n[stream]\nmode = "frame"\n' > "$CFG/auto_frame.toml"
run() { # config corruption order
  local out
  out=$("$A" stream assets/usps.onnx --config "$CFG/$1.toml" --source "$SRC" --preprocess "$PRE" --corrupt "$2" \
    --order "$3" --limit 2048 --seed 1 --quiet 2>&1 | grep 'accuracy:')
  echo "$1 | $2 | $3 | $out"
}
for c in none gaussian_noise:3 contrast:3; do
  for o in iid dirichlet:0.1; do
    for m in auto norm alpha lame label_shift eta auto_frame; do run "$m" "$c" "$o"; done
  done
done
run_n() { # config corruption order frames
  local out
  out=$("$A" stream assets/usps.onnx --config "$CFG/$1.toml" --source "$SRC" --preprocess "$PRE" --corrupt "$2" \
    --order "$3" --limit "$4" --seed 1 --quiet 2>&1 | grep 'accuracy:')
  echo "$1 | $2 | $3 | $4 | $out"
}
for row in "pixelate:4 iid 1024" "motion_blur:3 iid 1024" "jpeg_compression:5 iid 1024" "brightness:4 iid 1024" \
  "low_light:3 iid 1024" "impulse_noise:3 iid 1024" "defocus_blur:3 iid 1024" "fog:3 iid 1024" "none sorted 1024" \
  "gaussian_noise:3 sorted 1024" "none dirichlet:0.01 1024" "none iid 128" "contrast:3 iid 128" \
  "gaussian_noise:3 iid 128" "contrast:3 sorted 1024" "contrast:3 dirichlet:0.01 1024" "defocus_blur:3 dirichlet:0.1 1024" \
  "defocus_blur:3 dirichlet:0.01 1024"; do
  read -r c o n <<< "$row"
  for m in auto norm eta lame; do run_n "$m" "$c" "$o" "$n"; done
done
