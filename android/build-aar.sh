#!/usr/bin/env bash
# Builds the Android native libraries and the AAR (a release step: needs the Android NDK r27+,
# `cargo install cargo-ndk`, and the rustup targets; none of that is on the CI machine, where
# android/host-test.sh tests the same Kotlin API on the host JVM instead).
#   1. libacclimate_ffi.so for arm64-v8a, armeabi-v7a and x86_64 (API 26) into
#      android/acclimate/src/main/jniLibs/<abi>/, linked with 16 KB pages (Google Play requires
#      16 KB-aligned native libraries for Android 15+ devices; NDK r28+ does it by default, the
#      flag makes older NDKs do it too), checked with llvm-readelf when the NDK has it;
#   2. the Kotlin bindings regenerated and checked against the committed copy (tools/bindings.sh);
#   3. `gradle :acclimate:assembleRelease` when a Gradle wrapper or gradle is present
#      -> android/acclimate/build/outputs/aar/acclimate-release.aar.
# Optional: ACCLIMATE_SAMPLE_MODEL=path.onnx is copied into the sample app's assets
# (default: assets/mobilenetv2.onnx when it exists).
set -euo pipefail
cd "$(dirname "$0")/.."
ndk=${ANDROID_NDK_HOME:-${ANDROID_NDK_ROOT:-${NDK_HOME:-}}}
if [ -z "$ndk" ] && [ -n "${ANDROID_HOME:-}" ] && [ -d "$ANDROID_HOME/ndk" ]; then
  ndk=$(ls -d "$ANDROID_HOME"/ndk/* 2>/dev/null | sort -V | tail -1)
fi
if [ -z "$ndk" ] || [ ! -d "$ndk" ]; then
  echo "build-aar.sh: no Android NDK found (set ANDROID_NDK_HOME, or install one with Android Studio's" >&2
  echo "SDK manager under \$ANDROID_HOME/ndk). The AAR is a release step on a machine with the NDK;" >&2
  echo "here, android/host-test.sh tests the Kotlin API on the host JVM." >&2
  exit 2
fi
if ! cargo ndk --version >/dev/null 2>&1; then
  echo "build-aar.sh: cargo-ndk is missing: cargo install cargo-ndk" >&2
  exit 2
fi
export ANDROID_NDK_HOME=$ndk
rustup target add aarch64-linux-android armv7-linux-androideabi x86_64-linux-android
jni=android/acclimate/src/main/jniLibs
RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-z,max-page-size=16384" \
  cargo ndk -t arm64-v8a -t armeabi-v7a -t x86_64 --platform 26 -o "$jni" build --release -p acclimate-ffi
readelf=$(ls "$ndk"/toolchains/llvm/prebuilt/*/bin/llvm-readelf 2>/dev/null | head -1 || true)
for abi in arm64-v8a armeabi-v7a x86_64; do
  so=$jni/$abi/libacclimate_ffi.so
  [ -f "$so" ] || { echo "build-aar.sh: cargo ndk wrote no $so" >&2; exit 1; }
  if [ -n "$readelf" ]; then
    # Every LOAD segment aligned to 16 KB (0x4000) or more.
    if "$readelf" -lW "$so" | awk '$1 == "LOAD" { if (strtonum($NF) < 16384) bad = 1 } END { exit bad }'; then
      echo "$abi: LOAD segments 16 KB-aligned"
    else
      echo "build-aar.sh: $so has LOAD segments aligned below 16 KB" >&2
      exit 1
    fi
  fi
done
bash tools/bindings.sh >/dev/null
model=${ACCLIMATE_SAMPLE_MODEL:-assets/mobilenetv2.onnx}
if [ -f "$model" ]; then
  mkdir -p android/sample/src/main/assets
  cp "$model" android/sample/src/main/assets/mobilenetv2.onnx
fi
cd android
if [ -x ./gradlew ]; then
  ./gradlew :acclimate:assembleRelease
elif command -v gradle >/dev/null; then
  gradle :acclimate:assembleRelease
else
  echo "native libraries are in $jni; no Gradle here: open android/ in Android Studio (or run gradle" \
    ":acclimate:assembleRelease) to build the AAR and the sample app"
  exit 0
fi
echo "AAR: android/acclimate/build/outputs/aar/acclimate-release.aar"
