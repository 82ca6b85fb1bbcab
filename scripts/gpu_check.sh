#!/usr/bin/env bash
# The first thing to run on a machine with an NVIDIA GPU (driver + CUDA, `pip install tensorrt`
# reachable): installs the project with its gpu/tensorrt extras into the project's venv, runs
# the GPU/TensorRT tests, then `python -m ffsplit_export.trt.gpu_check` (engines for tiny T5,
# Whisper, MPT and the MPT-shaped benchmark model vs ONNX Runtime CPU, decode ms/token against
# a dense TensorRT engine and ONNX Runtime's CUDA EP, ONNX Runtime's TensorRT EP with our
# plugins). Prints one table, writes gpu_check_work/gpu_check.json.
# Exit: 0 = all checks passed, or no GPU here (a skip, with a one-line message);
#       1 = a mismatch or a failed step (one line on stderr names the first).
# Usage: bash scripts/gpu_check.sh [--shape quick|full] [--tokens N] [--work DIR]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }; then
  echo "gpu_check: no GPU (nvidia-smi finds no NVIDIA GPU): nothing to check here, skipped"
  exit 0
fi

venv=${VENV:-$root/.venv}
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import ffsplit_export.runtime as r; r.plugin_path()" 2>/dev/null; then
  bash "$root/scripts/setup.sh" --no-eval
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
# the install below rebuilds the ONNX Runtime custom-op library: it needs ORT's headers
ONNXRUNTIME_INCLUDE_DIR=${ONNXRUNTIME_INCLUDE_DIR:-$(bash "$root/scripts/get_ort_headers.sh")}
export ONNXRUNTIME_INCLUDE_DIR
# onnxruntime-gpu replaces the CPU wheel (both install the `onnxruntime` module)
"$venv/bin/python" -m pip uninstall -y -q onnxruntime >/dev/null 2>&1 || true
"${pip[@]}" "$root[gpu,tensorrt,dev]"
# the TensorRT wheel's libraries on the loader path, so ONNX Runtime's TensorRT EP and the
# `tensorrt` module load the same libnvinfer (where our Python plugins register)
trt_libs=$("$venv/bin/python" -c "import os, tensorrt_libs; print(os.path.dirname(tensorrt_libs.__file__))" 2>/dev/null || true)
[[ -n "$trt_libs" ]] && export LD_LIBRARY_PATH="$trt_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false

"$venv/bin/python" -m pytest -q -p no:cacheprovider -m "gpu or tensorrt" tests/ \
  || { echo "gpu_check: FAIL: the GPU/TensorRT tests failed (see above)" >&2; exit 1; }
exec "$venv/bin/python" -m ffsplit_export.trt.gpu_check "$@"
