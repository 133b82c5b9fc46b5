#!/usr/bin/env bash
# Builds ios/AcclimateFFI.xcframework, the binary target of ios/Package.swift: libacclimate_ffi.a
# for aarch64-apple-ios (devices), aarch64-apple-ios-sim (simulator on Apple silicon) and
# aarch64-apple-darwin (macOS), each with the generated FFI header and its module map. A release
# step on macOS with Xcode: this CI machine has no Swift toolchain or Apple linker, and
# tools/swift_check.sh checks the committed Swift bindings there instead.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname)" != Darwin ]; then
  echo "build-xcframework.sh: needs macOS with Xcode (xcodebuild -create-xcframework, Apple's linker);" >&2
  echo "on $(uname) run tools/swift_check.sh to check the Swift bindings instead." >&2
  exit 2
fi
command -v xcodebuild >/dev/null || { echo "build-xcframework.sh: xcodebuild not found: install Xcode" >&2; exit 2; }
targets=(aarch64-apple-ios aarch64-apple-ios-sim aarch64-apple-darwin)
rustup target add "${targets[@]}"
# The deployment targets of Package.swift's platforms (README "iOS").
export IPHONEOS_DEPLOYMENT_TARGET=15.0 MACOSX_DEPLOYMENT_TARGET=12.0
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
for t in "${targets[@]}"; do
  cargo build --release -p acclimate-ffi --lib --target "$t"
done
# The committed bindings must be what this library generates.
bash tools/bindings.sh >/dev/null
headers=ios/build/headers
rm -rf "$headers" ios/AcclimateFFI.xcframework
mkdir -p "$headers"
cp ios/include/acclimateFFI.h "$headers/"
cp ios/include/acclimateFFI.modulemap "$headers/module.modulemap"
args=()
for t in "${targets[@]}"; do
  args+=(-library "$target_dir/$t/release/libacclimate_ffi.a" -headers "$headers")
done
xcodebuild -create-xcframework "${args[@]}" -output ios/AcclimateFFI.xcframework
echo "ios/AcclimateFFI.xcframework: add the package at ios/ to an Xcode project (File > Add Package Dependencies > Add Local)"
