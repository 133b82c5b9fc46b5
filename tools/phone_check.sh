#!/usr/bin/env bash
# Type-checks the library, the C ABI and the UniFFI bindings (crate acclimate-ffi) for the
# phones: aarch64-linux-android and aarch64-apple-ios (`cargo check`: no linking, so no NDK or
# Xcode is needed; building the AAR and the XCFramework are release steps on a machine that has
# them, README "Android" and "iOS"). A target rustup
# cannot fetch (offline machine, no rustup) is reported as a skip line, not a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
for target in aarch64-linux-android aarch64-apple-ios; do
  if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    if ! timeout 300 rustup target add "$target" >/dev/null 2>&1; then
      echo "SKIP $target: rustup could not add the target (offline?)"
      continue
    fi
  fi
  echo "== cargo check -p acclimate-ffi --target $target"
  cargo check --quiet -p acclimate-ffi --target "$target"
done
