#!/usr/bin/env bash
# Generates the Kotlin and Swift bindings from the library's UniFFI metadata (library mode, the
# `#[uniffi::export]` items of ffi/src/mobile.rs) with the uniffi-bindgen built from the same
# uniffi version, and compares them with the committed copies:
#   android/acclimate/src/main/kotlin/dev/acclimate/acclimate.kt
#   ios/Sources/Acclimate/Acclimate.swift, ios/include/acclimateFFI.h, ios/include/acclimateFFI.modulemap
# A difference fails (the bindings are stale: an API change without them, or a hand edit);
# `tools/bindings.sh --bless` writes the fresh ones instead. Prints the generated directory last.
set -euo pipefail
cd "$(dirname "$0")/.."
bless=0
[ "${1:-}" = --bless ] && bless=1
target=${CARGO_TARGET_DIR:-$PWD/target}
# The library, the generator (ffi/src/bin) and android/host-test.sh's reference (ffi/examples),
# built with exactly the package selection and features of tools/test.sh's `cargo test
# --workspace --features acclimate-ffi/bindgen`, so that after it this is a no-op: any other
# selection unifies the dependencies' features differently and rebuilds wgpu and the library
# (minutes on CI's two cores). ACCLIMATE_BINDINGS_BUILD=package builds acclimate-ffi alone
# (faster on its own while developing, in a separate feature set).
if [ "${ACCLIMATE_BINDINGS_BUILD:-workspace}" = package ]; then
  cargo build --quiet -p acclimate-ffi --features bindgen --lib --bins --examples
else
  cargo test --quiet --workspace --features acclimate-ffi/bindgen --no-run 2>/dev/null ||
    cargo test --quiet --workspace --features acclimate-ffi/bindgen --no-run
fi
suffix=so
[ "$(uname)" = Darwin ] && suffix=dylib
lib=$target/debug/deps/libacclimate_ffi.$suffix
gen=$target/bindings
rm -rf "$gen"
for language in kotlin swift; do
  "$target/debug/uniffi-bindgen" generate --no-format --metadata-no-deps --language "$language" \
    --out-dir "$gen/$language" "$lib" >/dev/null
done
pairs=(
  "$gen/kotlin/dev/acclimate/acclimate.kt android/acclimate/src/main/kotlin/dev/acclimate/acclimate.kt"
  "$gen/swift/Acclimate.swift ios/Sources/Acclimate/Acclimate.swift"
  "$gen/swift/acclimateFFI.h ios/include/acclimateFFI.h"
  "$gen/swift/acclimateFFI.modulemap ios/include/acclimateFFI.modulemap"
)
stale=0
for pair in "${pairs[@]}"; do
  read -r fresh committed <<<"$pair"
  [ -f "$fresh" ] || { echo "uniffi-bindgen wrote no $fresh" >&2; exit 1; }
  if [ "$bless" = 1 ]; then
    cp "$fresh" "$committed"
  elif ! cmp -s "$fresh" "$committed"; then
    echo "STALE $committed: it differs from what uniffi-bindgen generates from ffi/src/mobile.rs" >&2
    diff -u "$committed" "$fresh" | head -20 >&2 || true
    stale=1
  fi
done
if [ "$stale" = 1 ]; then
  echo "regenerate with: bash tools/bindings.sh --bless  (and commit the files)" >&2
  exit 1
fi
echo "$gen"
