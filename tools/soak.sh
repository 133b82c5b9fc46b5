#!/usr/bin/env bash
# Memory soak of `acclimate stream`: streams MNIST test digits (assets/mnist, from tools/setup.sh)
# through a model, samples the process's resident set size (VmRSS in /proc/<pid>/status) and the
# frames done (lines of the --jsonl output) every SOAK_INTERVAL seconds into a CSV, and prints
#
#   rss: warm-up X MB, end Y MB, growth Z % after warm-up
#
# where warm-up is the first sample with at least SOAK_WARMUP frames done and end the last sample
# taken while frames were still streaming (at most 98 % of them done: the one-off end-of-run work,
# the summary and its latency percentiles, is left out of the growth and shown as the peak).
# Exits 1 when the growth after warm-up exceeds SOAK_MAX_GROWTH percent (or the stream fails).
#
# Usage: tools/soak.sh [FRAMES]   (default 10000, the whole MNIST test set)
# Environment (defaults in brackets):
#   SOAK_BIN         the acclimate binary [target/release/acclimate, built if missing]
#   SOAK_MODEL       [assets/usps.onnx]   SOAK_PREPROCESS [size=16,channels=1,mean=0.5,std=0.5]
#   SOAK_CONFIG      an adaptation config TOML [the default preset: ETA, frame mode]
#   SOAK_SOURCE      extra `acclimate stream` flags, e.g. "--no-source" [none]
#   SOAK_WARMUP      frames before the reference sample [10 % of FRAMES, at least 200]
#   SOAK_MAX_GROWTH  percent [10]        SOAK_INTERVAL seconds between samples [1]
#   SOAK_OUT         folder for rss.csv, frames.jsonl, summary.json, stream.log [target/soak]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh

frames="${1:-10000}"
bin="${SOAK_BIN:-target/release/acclimate}"
model="${SOAK_MODEL:-assets/usps.onnx}"
preprocess="${SOAK_PREPROCESS:-size=16,channels=1,mean=0.5,std=0.5}"
warmup="${SOAK_WARMUP:-$(( frames / 10 > 200 ? frames / 10 : 200 ))}"
max_growth="${SOAK_MAX_GROWTH:-10}"
interval="${SOAK_INTERVAL:-1}"
out="${SOAK_OUT:-target/soak}"
images=assets/mnist/t10k-images-idx3-ubyte
labels=assets/mnist/t10k-labels-idx1-ubyte

for f in "$model" "$images" "$labels"; do
  [ -e "$f" ] || { echo "soak: missing $f (run bash tools/setup.sh)" >&2; exit 2; }
done
if [ ! -x "$bin" ]; then
  echo "soak: building $bin" >&2
  cargo build --release -p acclimate-cli --bin acclimate >&2
fi
if [ "$warmup" -ge "$frames" ]; then
  echo "soak: warm-up ($warmup frames) must be shorter than the run ($frames frames)" >&2
  exit 2
fi
mkdir -p "$out"
csv="$out/rss.csv"
jsonl="$out/frames.jsonl"
: > "$jsonl"
echo "seconds,frames,rss_kib" > "$csv"

args=(stream "$model" --source "idx:$images,$labels" --preprocess "$preprocess" --limit "$frames"
      --jsonl "$jsonl" --summary-json "$out/summary.json" --quiet)
[ -n "${SOAK_CONFIG:-}" ] && args+=(--config "$SOAK_CONFIG")
# shellcheck disable=SC2206 # word splitting of the extra flags is intended
[ -n "${SOAK_SOURCE:-}" ] && args+=($SOAK_SOURCE)

start=$(date +%s%N)
"$bin" "${args[@]}" > "$out/stream.log" 2>&1 &
pid=$!
sample() {
  local rss done_frames
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || return 0
  [ -n "$rss" ] || return 0
  done_frames=$(wc -l < "$jsonl")
  local ms=$(( ($(date +%s%N) - start) / 1000000 ))
  printf '%d.%03d,%d,%d\n' $(( ms / 1000 )) $(( ms % 1000 )) "$done_frames" "$rss" >> "$csv"
}
while kill -0 "$pid" 2>/dev/null; do
  sample
  sleep "$interval"
done
status=0
wait "$pid" || status=$?
if [ "$status" -ne 0 ]; then
  if [ "${ACCLIMATE_ALLOW_NO_GPU:-}" = 1 ] && grep -q "no GPU adapter found" "$out/stream.log"; then
    echo "soak: SKIPPED (ACCLIMATE_ALLOW_NO_GPU=1 and no adapter)" >&2
    exit 0
  fi
  echo "soak: acclimate stream exited with status $status:" >&2
  tail -5 "$out/stream.log" >&2
  exit 1
fi

# The reference is the first sample at or after the warm-up; the end is the last sample taken
# with at most 98 % of the frames done (the frame counts lag by the --jsonl write buffer).
awk -F, -v warmup="$warmup" -v max="$max_growth" -v frames="$frames" -v csv="$csv" '
  NR == 1 { next }
  { n++; last_t = $1; if ($3 > peak) peak = $3 }
  $2 <= 0.98 * frames { last_rss = $3; last_frames = $2 }
  warm == "" && $2 >= warmup { warm = $3; warm_frames = $2 }
  END {
    if (warm == "") {
      printf "soak: no sample after the %d warm-up frames (%d samples; last at frame %d); lower SOAK_INTERVAL\n", \
        warmup, n, last_frames > "/dev/stderr"
      exit 2
    }
    growth = 100 * (last_rss - warm) / warm
    printf "rss: warm-up %.1f MB, end %.1f MB, growth %.1f %% after warm-up\n", warm / 1024, last_rss / 1024, growth
    printf "(%d frames in %.0f s; warm-up sample at frame %d, end sample at frame %d; peak %.1f MB with the end-of-run summary; %d samples in %s)\n", \
      frames, last_t, warm_frames, last_frames, peak / 1024, n, csv
    exit (growth > max) ? 1 : 0
  }' "$csv"
