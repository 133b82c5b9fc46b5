# Sourced by tools/test.sh and tools/demo.sh: where the reference backend's library is, and a
# private XDG_RUNTIME_DIR (wgpu/Mesa warn without one).
ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(ls "$(pwd)"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -1)}"
export ORT_DYLIB_PATH
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  XDG_RUNTIME_DIR="$(mktemp -d)"; chmod 700 "$XDG_RUNTIME_DIR"; export XDG_RUNTIME_DIR
fi
