#!/usr/bin/env bash
# Render the built-in English calibration text to 16 kHz mono WAV speech with espeak-ng,
# for Whisper calibration that is real speech-like audio and disjoint from the LibriVox
# evaluation clips.  Usage: scripts/make_speech_calibration.sh OUT_DIR [N]
set -euo pipefail
out=${1:?usage: make_speech_calibration.sh OUT_DIR [N]}
n=${2:-32}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
command -v espeak-ng >/dev/null || { echo "espeak-ng missing: apt-get install espeak-ng" >&2; exit 1; }
command -v sox >/dev/null || { echo "sox missing: apt-get install sox" >&2; exit 1; }
mkdir -p "$out"
i=0
while IFS= read -r line && [ "$i" -lt "$n" ]; do
  [ -z "$line" ] && continue
  i=$((i + 1))
  voice=$([ $((i % 2)) -eq 0 ] && echo en-us || echo en-gb)
  espeak-ng -v "$voice" -s $((140 + (i * 7) % 40)) -w "$out/tmp.wav" "$line"
  sox "$out/tmp.wav" -r 16000 -c 1 -b 16 "$(printf '%s/%03d.wav' "$out" "$i")"
done < "$root/ffsplit_export/data/calibration_en.txt"
rm -f "$out/tmp.wav"
echo "$i clips in $out"
