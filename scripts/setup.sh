#!/usr/bin/env bash
# One-step set-up on a fresh Debian/Ubuntu machine (as root, or with sudo):
#   a venv in .venv (or $VENV), the pinned CPU torch first, ONNX Runtime's C/C++ headers,
#   the package itself (which builds the ONNX Runtime custom-op library with CMake),
#   and the offline evaluation data / real weights.
# Idempotent: re-running reuses what is there.  Usage: bash scripts/setup.sh [--no-eval]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=${VENV:-$root/.venv}
with_eval=1
[[ "${1:-}" == "--no-eval" ]] && with_eval=0

if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
# the CPU build of torch first: an unpinned torch would pull several GB of CUDA packages
"${pip[@]}" "torch==2.13.0"

inc=$(bash "$root/scripts/get_ort_headers.sh")
export ONNXRUNTIME_INCLUDE_DIR=${ONNXRUNTIME_INCLUDE_DIR:-$inc}
echo "ONNX Runtime headers: $ONNXRUNTIME_INCLUDE_DIR"

# a regular (non-editable) install: it builds libffsplit_ort.so and registers `optimum-cli export ffsplit`
"${pip[@]}" "$root[cpu,dev,genai]"
if [[ $with_eval == 1 ]]; then
  bash "$root/scripts/setup_eval.sh" "$venv" >/dev/null
fi
"$venv/bin/python" -c "import ffsplit_export.runtime as r; print('ffsplit ONNX Runtime library:', r.plugin_path())"
