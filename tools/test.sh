#!/usr/bin/env bash
# The test command (README; CI runs it through .ci/run). On a fresh Debian machine it installs
# what the tests need (tools/prereqs.sh), builds the Python venv and the assets from the package
# registries (tools/setup.sh), then runs the whole suite: unit tests, naga validation of every
# WGSL file, the official ONNX node tests, parity against ONNX Runtime, CLI and negative tests.
#
# GPU tests run the real kernels on lavapipe and FAIL when no adapter is found; to skip them
# explicitly set ACCLIMATE_ALLOW_NO_GPU=1. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/prereqs.sh
echo "== assets"
bash tools/setup.sh
source tools/env.sh
echo "== cargo test (ORT_DYLIB_PATH=$ORT_DYLIB_PATH)"
cargo test --workspace "$@"
echo "== fuzz smoke (loader, frame, config: 20 s each on the test build)"
bash tools/fuzz.sh --profile dev --target all --seconds 20
