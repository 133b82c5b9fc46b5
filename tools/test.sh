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
# With the bindings generator (acclimate-ffi's `bindgen` feature), so the Kotlin and Swift checks
# below reuse this build (tools/bindings.sh).
cargo test --workspace --features acclimate-ffi/bindgen "$@"
echo "== phone targets (type-check of the library and the C ABI)"
bash tools/phone_check.sh
echo "== the library's API docs (rustdoc, warnings as errors: the crate apps link)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -p acclimate
echo "== Android: the Kotlin API on the host JVM (android/host-test.sh)"
bash android/host-test.sh
echo "== iOS: the Swift bindings parsed, their C header compiled (tools/swift_check.sh)"
bash tools/swift_check.sh
echo "== fuzz smoke (loader, frame, config: 20 s each on the test build)"
bash tools/fuzz.sh --profile dev --target all --seconds 20


# Memory soak, short: 2,000 MNIST digits through the tiny test net, with the dev binary `cargo
# test` just built, in frame mode (the default preset), in batch mode with ETA (a training step per
# batch) and with LAME (the output stage per batch), each about 10 s; each fails when RSS grows by
# more than 10 % after 200 warm-up frames. The full 10,000-frame soak on the USPS net:
# bash tools/soak.sh (SOAK_CONFIG=tools/soak-batch.toml, tools/soak-lame.toml for the others).
for soak_config in "" tools/soak-batch.toml tools/soak-lame.toml; do
  echo "== stream memory soak (2,000 frames, ${soak_config:-frame mode})"
  SOAK_BIN=target/debug/acclimate SOAK_MODEL=tests/fixtures/tta/tiny_tent_sgd/model.onnx \
    SOAK_PREPROCESS=size=8,channels=3,mean=0.5/0.5/0.5,std=0.25/0.25/0.25 SOAK_SOURCE=--no-source \
    SOAK_CONFIG="$soak_config" SOAK_WARMUP=200 SOAK_INTERVAL=0.2 SOAK_OUT=target/soak-ci bash tools/soak.sh 2000
done
