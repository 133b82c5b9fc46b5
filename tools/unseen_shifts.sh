#!/usr/bin/env bash
# `auto` (the library's default, no config) against the unadapted model on shifts and orders
# that no constant of it was chosen on: ImageNet-C corruptions other than the tuning sets' noise
# and blur, low light, the sorted (one class after another) and Dirichlet 0.01 orders, short
# streams. SVHN network on the MNIST test digits, `acclimate stream` (batch mode, batches of 64),
# seed 1. Prints one line per row; docs/accuracy.md has the table. About 20 minutes on 2 cores
# with lavapipe. Usage: [MODE=frame] [ROWS=iid] tools/unseen_shifts.sh [path/to/acclimate]
# MODE=frame: the library's default stream mode instead of the CLI's batches (`[adapt] method =
# "auto"` and `[stream] mode = "frame"`: a window of 64, a step every 16); ROWS=iid: the eight
# i.i.d. corruption rows only (frame mode runs at 3-7 frames/s here: about 30 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
A="${1:-target/release/acclimate}"
SRC=idx:assets/mnist/t10k-images-idx3-ubyte,assets/mnist/t10k-labels-idx1-ubyte
PRE=size=32,channels=3,mean=0.4377/0.4438/0.4728,std=0.1980/0.2010/0.1970
CFG=()
if [ "${MODE:-batch}" = frame ]; then
  CONFIG=$(mktemp)
  trap 'rm -f "$CONFIG"' EXIT
  printf '[adapt]\nmethod = "auto"\n[stream]\nmode = "frame"\n' > "$CONFIG"
  CFG=(--config "$CONFIG")
fi
row() { # corruption order frames
  local out
  out=$("$A" stream assets/svhn.onnx --source "$SRC" --preprocess "$PRE" --corrupt "$1" --order "$2" \
    --limit "$3" --seed 1 "${CFG[@]}" --quiet 2>&1 | grep 'accuracy:')
  echo "$1 | $2 | $3 | ${MODE:-batch} | $out"
}
for c in contrast:3 pixelate:4 jpeg_compression:5 low_light:3 brightness:4 impulse_noise:3 motion_blur:3 shot_noise:5; do
  row "$c" iid 1024
done
[ "${ROWS:-all}" = iid ] && exit 0
for o in sorted dirichlet:0.01; do
  for c in none gaussian_noise:3; do row "$c" "$o" 1024; done
done
row none iid 128
row gaussian_noise:5 iid 128
row none dirichlet:0.1 256
