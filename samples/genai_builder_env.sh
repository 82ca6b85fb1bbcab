#!/usr/bin/env bash
# A virtual environment of its own for ONNX Runtime GenAI's model builder.
#
# The builder (python -m onnxruntime_genai.models.builder) imports transformers 5.x, while
# optimum-onnx 0.1 (the main environment) needs transformers < 4.58, so the two cannot share
# one environment. Usage: samples/genai_builder_env.sh [VENV_DIR]   (default /tmp/ffsplit-genai-venv)
# Prints the venv's python on the last line. Reuses an existing, complete venv.
set -euo pipefail
VENV=${1:-/tmp/ffsplit-genai-venv}
PY=${PYTHON:-python3}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import onnxruntime_genai, onnx_ir, transformers, torch; assert int(transformers.__version__.split('.')[0]) >= 5" 2>/dev/null; then
  echo "$VENV/bin/python"
  exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# the pinned CPU torch first: a bare `torch` can pull a multi-GB CUDA build
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "onnxruntime-genai>=0.18" "transformers>=5,<6" onnx onnx-ir sentencepiece protobuf safetensors
echo "$VENV/bin/python"
