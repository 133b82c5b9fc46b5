#!/usr/bin/env bash
# What can be checked of the Swift package without a Swift toolchain (README "iOS"):
#   1. the committed Swift bindings, FFI header and module map are what uniffi-bindgen generates
#      from ffi/src/mobile.rs now (tools/bindings.sh);
#   2. every .swift file under ios/ parses with tree-sitter-swift (tools/swift_parse.py);
#   3. the FFI header compiles with gcc (-std=c11 -Wall -Wextra -Werror), and every function it
#      declares is exported by the library built for this machine, so Swift calls no symbol the
#      XCFramework lacks.
# Prints `N passed, M failed` for the parse and exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${ACCLIMATE_PYTHON:-.venv/bin/python}
if ! "$python" -c 'import tree_sitter, tree_sitter_swift' 2>/dev/null; then
  echo "swift_check: $python lacks tree-sitter / tree-sitter-swift: run bash tools/setup.sh (tools/requirements.txt)" >&2
  exit 1
fi
target=${CARGO_TARGET_DIR:-$PWD/target}
echo "== bindings: committed Kotlin and Swift against a fresh generation"
bash tools/bindings.sh >/dev/null
echo "== Swift parse (tree-sitter-swift)"
mapfile -t swift < <(find ios -name '*.swift' ! -path '*/build/*' ! -path '*.xcframework/*' | sort)
"$python" tools/swift_parse.py "${swift[@]}" \
  --expect ios/Package.swift:package \
  --expect ios/Sources/Acclimate/Acclimate.swift:Session \
  --expect ios/Sources/Acclimate/Acclimate.swift:pushFrame \
  --expect ios/Sources/Acclimate/Acclimate.swift:saveState \
  --expect ios/Sources/Acclimate/Acclimate.swift:loadState \
  --expect ios/Sources/Acclimate/Session+PixelBuffer.swift:pushFrame \
  --expect ios/Sample/AcclimateSample/CameraViewController.swift:captureOutput
echo "== FFI header: gcc, and its functions against the library's exports"
work=$target/swift-check
mkdir -p "$work"
printf '#include "acclimateFFI.h"\nint main(void) { return 0; }\n' >"$work/header.c"
# _Nonnull/_Nullable are clang's nullability qualifiers (Xcode compiles the header with clang);
# gcc has none, so they are defined away here and everything else is compiled as written.
gcc -std=c11 -Wall -Wextra -Werror -D_Nonnull= -D_Nullable= -I ios/include "$work/header.c" -o "$work/header"
declared=$(grep -oE '\b(uniffi|ffi)_acclimate_ffi_[A-Za-z0-9_]+\(' ios/include/acclimateFFI.h | tr -d '(' | sort -u)
# `cargo test` leaves the cdylib under deps/ only (tools/bindings.sh reads the same file).
exported=$(nm -D --defined-only "$target/debug/deps/libacclimate_ffi.so" | awk '{print $3}' | sort -u)
missing=$(comm -23 <(echo "$declared") <(echo "$exported"))
if [ -n "$missing" ]; then
  echo "FAIL: ios/include/acclimateFFI.h declares functions the library does not export:" >&2
  echo "$missing" >&2
  exit 1
fi
echo "ok   acclimateFFI.h: compiles; its $(echo "$declared" | wc -l) functions are all exported"
