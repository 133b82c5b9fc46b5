#!/usr/bin/env bash
# Acclimate against its peers in one go, on the same models, batches and machine state:
#   - `acclimate bench --adapt tent --json` (release build): forward, TENT step, GFLOP/s, the
#     adapter's peak, dispatches, memory, cold/warm start;
#   - ONNX Runtime CPU forward (tools/bench_ort.py);
#   - where torch imports: PyTorch eager forward and TENT step, and on CUDA the TENT step in a
#     CUDA graph (tools/bench_torch.py);
# then one table of the ratios (Acclimate/ORT forward, Acclimate/PyTorch step, step/forward).
#
# Usage: tools/bench_peers.sh [--full] [--out DIR]
#   default  SVHN network at batch 1 and 16, MobileNetV2 at batch 1 (minutes on lavapipe)
#   --full   both models at batch 1, 16 and 64 (for a real GPU); same as BENCH_FULL=1
# Environment: BENCH_MODELS (default "svhn mobilenetv2", files assets/<name>.onnx),
#   BENCH_BATCHES_<NAME> (e.g. BENCH_BATCHES_SVHN=1,16,64) overrides one model's batches,
#   BENCH_WARMUP / BENCH_ITERS (default 1 / 5; --full: 3 / 20), BENCH_PEAK_REPS (default 8;
#   --full: 50), BENCH_CPU_THREADS (ONNX Runtime's and PyTorch's CPU threads; default every core:
#   on a machine shared with other jobs, 1 keeps their spinning thread pools from stalling),
#   PYTHON (default .venv/bin/python), ACCLIMATE_BIN (skip the build, use this binary).
# Raw results stay in DIR (default target/bench-peers/<UTC time>) as JSON.
# The drivers' own shader caches are disabled for the run, so the cold start is cold.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=tools/env.sh
source tools/env.sh

full="${BENCH_FULL:-0}"
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --full) full=1 ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "bench_peers.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$full" = 1 ]; then
  warmup="${BENCH_WARMUP:-3}"; iters="${BENCH_ITERS:-20}"; peak_reps="${BENCH_PEAK_REPS:-50}"
else
  warmup="${BENCH_WARMUP:-1}"; iters="${BENCH_ITERS:-5}"; peak_reps="${BENCH_PEAK_REPS:-8}"
fi
models="${BENCH_MODELS:-svhn mobilenetv2}"
py="${PYTHON:-.venv/bin/python}"
cpu_threads=()
if [ -n "${BENCH_CPU_THREADS:-}" ]; then cpu_threads=(--threads "$BENCH_CPU_THREADS"); fi
out="${out:-${CARGO_TARGET_DIR:-target}/bench-peers/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"

if [ -n "${ACCLIMATE_BIN:-}" ]; then
  bin="$ACCLIMATE_BIN"
else
  cargo build --release -q -p acclimate-cli
  bin="${CARGO_TARGET_DIR:-target}/release/acclimate"
fi

batches_for() {
  local var
  var="BENCH_BATCHES_$(echo "$1" | tr '[:lower:]' '[:upper:]')"
  if [ -n "${!var:-}" ]; then echo "${!var}"
  elif [ "$full" = 1 ]; then echo "1,16,64"
  elif [ "$1" = svhn ]; then echo "1,16"
  else echo "1"
  fi
}

have_torch=0
if "$py" -c "import torch" 2>/dev/null; then have_torch=1; fi

for m in $models; do
  model="assets/$m.onnx"
  [ -f "$model" ] || { echo "bench_peers.sh: $model is missing: run tools/setup.sh (tools/fetch_assets.py)" >&2; exit 1; }
  b="$(batches_for "$m")"
  echo "== $m, batch $b" >&2
  echo "   acclimate" >&2
  MESA_SHADER_CACHE_DISABLE=true __GL_SHADER_DISK_CACHE=0 \
    "$bin" bench "$model" --adapt tent --batch "$b" --warmup "$warmup" --iters "$iters" \
    --peak-reps "$peak_reps" --json > "$out/$m.acclimate.json"
  echo "   onnxruntime" >&2
  "$py" tools/bench_ort.py "$model" --batch "$b" --warmup "$warmup" --iters "$iters" "${cpu_threads[@]}" \
    > "$out/$m.ort.jsonl"
  if [ "$have_torch" = 1 ]; then
    echo "   pytorch" >&2
    "$py" tools/bench_torch.py "$model" --batch "$b" --warmup "$warmup" --iters "$iters" "${cpu_threads[@]}" \
      > "$out/$m.torch.jsonl"
  fi
done

"$py" - "$out" $models <<'EOF'
import json, os, sys

out, models = sys.argv[1], sys.argv[2:]

def jsonl(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["batch"]: r for r in map(json.loads, filter(str.strip, f))}

def f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)

def ratio(a, b):
    return None if a is None or not b else a / b

head = None
rows = []
for m in models:
    with open(os.path.join(out, f"{m}.acclimate.json")) as fh:
        acc = json.load(fh)
    ort, torch = jsonl(os.path.join(out, f"{m}.ort.jsonl")), jsonl(os.path.join(out, f"{m}.torch.jsonl"))
    if head is None:
        head = acc
    st = acc.get("start") or {}
    for c in acc["cases"]:
        b = c["batch"]
        o, t = ort.get(b, {}), torch.get(b, {})
        fwd, step = c["forward"]["median_ms"], c["step"]["median_ms"]
        rows.append([
            m, str(b), f(fwd), f(o.get("forward_ms")), f(ratio(fwd, o.get("forward_ms"))),
            f(step), f(t.get("step_eager_ms")), f(ratio(step, t.get("step_eager_ms"))),
            f(t.get("step_cuda_graph_ms")), f(ratio(step, t.get("step_cuda_graph_ms"))),
            f(c["step_over_forward"]), f(t.get("step_over_forward")),
            f(c["forward_gflops"], "{:.3g}"), f(c["step_gflops"], "{:.3g}"),
            str(c["forward_dispatches"]), str(c["step_dispatches"]),
            f(c["step_peak_bytes"] / 2**20, "{:.1f}"),
            f(t["step_peak_bytes"] / 2**20 if "step_peak_bytes" in t else None, "{:.1f}"),
            f(st.get("cold_ms"), "{:.0f}") + " / " + f(st.get("warm_ms"), "{:.0f}") if st and b == st.get("batch") else "",
        ])

print(f"GPU: {head['gpu_adapter']}, driver {head['gpu_driver']}")
p = head.get("peak") or {}
print(f"peak: {f(head.get('peak_gflops'), '{:.3g}')} GFLOP/s ({p.get('n')}^3 MatMul, {p.get('reps')} runs)")
tdev = next((r.get("device_name") for m in models for r in jsonl(os.path.join(out, f"{m}.torch.jsonl")).values()), None)
odev = next((r for m in models for r in jsonl(os.path.join(out, f"{m}.ort.jsonl")).values()), None)
if odev:
    print(f"ONNX Runtime {odev['onnxruntime']} CPU, {odev['threads']} threads; PyTorch: {tdev or 'not installed'}")
print(f"times: median ms; Acclimate/ORT < 1 means Acclimate is faster; raw JSON in {out}\n")
cols = ["model", "batch", "fwd ms", "ORT fwd", "Acc/ORT", "step ms", "torch step", "Acc/torch",
        "graph step", "Acc/graph", "step/fwd", "torch s/f", "fwd GF/s", "step GF/s", "fwd disp",
        "step disp", "step MiB", "torch MiB", "start cold/warm ms"]
print("| " + " | ".join(cols) + " |")
print("|" + "|".join("---" for _ in cols) + "|")
for r in rows:
    print("| " + " | ".join(r) + " |")
EOF
