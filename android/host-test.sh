#!/usr/bin/env bash
# The Kotlin API on the host JVM (README "Android"): builds libacclimate_ffi.so for this machine,
# checks the committed Kotlin (and Swift) bindings against a fresh generation (tools/bindings.sh),
# computes reference predictions with the library itself (ffi/examples/camera_reference.rs),
# compiles the generated bindings, Frames.kt and android/host-test/SessionTest.kt with kotlinc
# (npm kotlin-compiler, pinned in android/host-test/package-lock.json) against JNA (Debian
# libjna-java / libjna-jni), and runs the suite on the JVM against the .so, on lavapipe here.
# Prints `N passed, M failed`; exits non-zero on any failure. CameraFrames.kt (android.media.Image,
# ImageProxy) needs android.jar and is compiled by Gradle only.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
target=${CARGO_TARGET_DIR:-$PWD/target}
work=$target/android-host-test
model=${ACCLIMATE_ASSETS:-assets}/svhn.onnx
[ -f "$model" ] || { echo "host-test: missing $model: run bash tools/setup.sh first" >&2; exit 1; }
mkdir -p "$work"

kotlin_home=android/host-test/node_modules/kotlin-compiler
if [ ! -x "$kotlin_home/bin/kotlinc" ]; then
  echo "== kotlinc: npm ci (android/host-test/package-lock.json)"
  (cd android/host-test && npm ci --no-audit --no-fund --loglevel=error)
fi

# JNA: Debian's packages when installed (tools/prereqs.sh), else unpacked here from their .debs.
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo "$(uname -m)-linux-gnu")
jna_jar=/usr/share/java/jna.jar
jna_lib=/usr/lib/$multiarch/jni
if [ ! -f "$jna_jar" ] || ! ls "$jna_lib"/libjnidispatch*.so >/dev/null 2>&1; then
  deps=$PWD/android/host-test/.deps
  if [ ! -f "$deps/usr/share/java/jna.jar" ]; then
    echo "== JNA: apt-get download libjna-java libjna-jni into android/host-test/.deps"
    mkdir -p "$deps/debs"
    (cd "$deps/debs" && apt-get download libjna-java libjna-jni >/dev/null 2>&1 ||
      apt-get -o APT::Sandbox::User=root download libjna-java libjna-jni >/dev/null)
    for deb in "$deps"/debs/*.deb; do dpkg -x "$deb" "$deps"; done
  fi
  jna_jar=$deps/usr/share/java/jna.jar
  jna_lib=$deps/usr/lib/$multiarch/jni
fi

echo "== host library, generator and reference; committed Kotlin and Swift against a fresh generation"
bash tools/bindings.sh >/dev/null
echo "== reference predictions (the library on packed frames)"
rm -rf "$work/reference" "$work/scratch"
"$target/debug/examples/camera_reference" "$model" "$work/reference" >/dev/null

sources=(
  android/acclimate/src/main/kotlin/dev/acclimate/acclimate.kt
  android/acclimate/src/main/kotlin/dev/acclimate/Frames.kt
  android/host-test/SessionTest.kt
)
# kotlinc takes most of this script's time: reuse the jar while its sources are unchanged.
stamp=$(cat "${sources[@]}" "$kotlin_home/package.json" | sha256sum | cut -c1-16)
jar=$work/session-test-$stamp.jar
if [ ! -f "$jar" ]; then
  echo "== kotlinc ($(basename "$(dirname "$kotlin_home")")/kotlin-compiler $(sed -n 's/.*"version": "\(.*\)".*/\1/p' "$kotlin_home/package.json"))"
  rm -f "$work"/session-test-*.jar
  "$kotlin_home/bin/kotlinc" -nowarn -jvm-target 17 -cp "$jna_jar" -include-runtime -d "$jar.tmp.jar" "${sources[@]}"
  mv "$jar.tmp.jar" "$jar"
fi

echo "== Kotlin suite on the JVM ($(java -version 2>&1 | head -1))"
# Debian's JNA looks for its native part (libjnidispatch.system.so) in /usr/lib/jni and
# /usr/lib/<multiarch>/jni, then through System.loadLibrary: java.library.path finds an unpacked one.
java -Djna.library.path="$target/debug/deps" -Djna.nosys=false -Djava.library.path="$jna_lib" \
  -cp "$jar:$jna_jar" SessionTestKt "$model" "$work/reference" "$work/scratch"
