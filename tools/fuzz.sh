#!/usr/bin/env bash
# Fuzzes the ONNX loader, the frame validator and the config parser with the stable-Rust driver
# (fuzz/, crate acclimate-fuzz; `cargo fuzz` would need a nightly toolchain) and prints, per
# target, "loader: N executions, P panics, H hangs, C crashes". Exits non-zero on any finding;
# each finding's input is saved under fuzz-artifacts/<target>/ with its seed and the command
# that replays it.
#
#   tools/fuzz.sh [--target loader|frame|config|all] [--execs N] [--seconds S] [--seed N]
#                 [--timeout S] [--profile fuzz|dev]
#
# --seconds is per target. Without --execs or --seconds each target runs 10,000 executions.
# The default profile `fuzz` is release with overflow checks and debug assertions (so an
# overflow is a panic, not a silent wrap); `--profile dev` reuses the test build (CI's smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=fuzz
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
dir=$profile
if [ "$profile" = dev ]; then
  # The workspace's features, as `cargo test --workspace` built them: nothing to recompile.
  cargo build --quiet --workspace --bins
  dir=debug
else
  cargo build --quiet --profile "$profile" -p acclimate-fuzz
fi
ACCLIMATE_ROOT="$(pwd)" exec "target/$dir/acclimate-fuzz" "${args[@]}"
