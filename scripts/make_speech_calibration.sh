#!/usr/bin/env bash
# Render the built-in English calibration text to 16 kHz mono WAV speech with espeak-ng,
# for Whisper calibration that is real speech-like audio and disjoint from the LibriVox
# evaluation clips.  Usage: scripts/make_speech_calibration.sh OUT_DIR [N] [--with-real]
# --with-real also copies the 9 short real recordings of Debian's pocketsphinx-testdata that are
# not the LibriVox evaluation clips (cards/*.wav; goforward, numbers, something and a tidigits
# utterance, converted from raw 16 kHz PCM).
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
if [ "${3:-}" = "--with-real" ]; then
  data=/usr/share/pocketsphinx/test/data
  [ -d "$data/cards" ] || { echo "pocketsphinx-testdata missing: scripts/setup_eval.sh" >&2; exit 1; }
  for f in "$data"/cards/*.wav; do cp "$f" "$out/real_cards_$(basename "$f")"; i=$((i + 1)); done
  for f in goforward numbers something tidigits/dhd.2934z; do
    sox -t raw -r 16000 -e signed -b 16 -c 1 "$data/$f.raw" "$out/real_$(basename "$f").wav"
    i=$((i + 1))
  done
fi
echo "$i clips in $out"
