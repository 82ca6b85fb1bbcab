"""Evaluation and calibration data from offline sources (Debian packages, installed Python packages).

Speech: the 5 LibriVox clips of Debian ``pocketsphinx-testdata`` (16 kHz mono, 24.7 s, with a
``transcription`` file).

Text (calibration and evaluation never overlap):

- ``"bible"`` (Debian ``bible-kjv``): calibration = the Old Testament, Genesis first (23145
  verses; the first 1533 are Genesis), evaluation = the Gospel of Matthew (King James Version,
  verse numbers removed, one verse per line). The other Gospels are left out of both: they
  retell Matthew's passages.
- ``"fortunes"`` (Debian ``fortunes``): the fortune files are read in sorted order and
  split into cookies; even-numbered cookies are calibration, odd-numbered ones evaluation.
- ``"gensim"`` (``gensim`` package, if installed): ``lee_background.cor``; the first 150
  articles are calibration, the other 150 evaluation.

Nothing is copied into the repository: all of it is read from the installed packages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np

from ..errors import ConfigError, FormatError, MissingResourceError

__all__ = [
    "LIBRIVOX_DIR",
    "TEXT_SOURCES",
    "calibration_text",
    "eval_text",
    "librispeech_clips",
    "load_wav",
]

LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
TEXT_SOURCES = ("bible", "fortunes", "gensim")
SAMPLE_RATE = 16000

_SETUP_HINT = "run scripts/setup_eval.sh (as root), or: apt-get install {pkg}"
# (calibration, evaluation) verse ranges for the `bible` program
_BIBLE_RANGES = {"calibration": "ge1:1-mal4:6", "eval": "mt1:1-mt28:20"}  # Old Testament / Matthew


def load_wav(path: str | os.PathLike) -> np.ndarray:
    """Read a 16-bit PCM mono 16 kHz WAV file as float32 in [-1, 1]."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as w:
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise FormatError(f"{path} is not a readable WAV file ({e})") from e
    if rate != SAMPLE_RATE or channels != 1 or width != 2:
        raise FormatError(
            f"{path}: {rate} Hz, {channels} channel(s), {8 * width}-bit; expected 16000 Hz mono 16-bit PCM "
            "(resample it first, e.g. with sox)"
        )
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0


def librispeech_clips(limit: int | None = None) -> list[tuple[np.ndarray, str]]:
    """The LibriVox clips of ``pocketsphinx-testdata`` as (float32 16 kHz audio, lowercase reference)."""
    trans = LIBRIVOX_DIR / "transcription"
    if not trans.is_file():
        raise MissingResourceError(
            f"{trans} not found: the LibriVox test clips are missing; {_SETUP_HINT.format(pkg='pocketsphinx-testdata')}"
        )
    clips: list[tuple[np.ndarray, str]] = []
    for line in trans.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s*(?:<s>)?\s*(.*?)\s*(?:</s>)?\s*\(([^()]+)\)\s*$", line)
        if not line.strip():
            continue
        if m is None:
            raise FormatError(f"{trans}: cannot parse line {line!r}")
        text, file_id = m.group(1), m.group(2)
        clips.append((load_wav(LIBRIVOX_DIR / f"{file_id}.wav"), text))
        if limit is not None and len(clips) >= limit:
            break
    return clips


def _bible(part: str) -> list[str]:
    exe = shutil.which("bible")
    if exe is None:
        raise MissingResourceError(
            f"the `bible` program (King James text) is not installed; {_SETUP_HINT.format(pkg='bible-kjv')}"
        )
    out = subprocess.run([exe, "-f", _BIBLE_RANGES[part]], capture_output=True, text=True, check=True).stdout
    verses = [m.group(1) for m in re.finditer(r"^\S+?\d+:\d+ (.+)$", out, flags=re.M)]
    if not verses:
        raise FormatError(f"`bible -f {_BIBLE_RANGES[part]}` printed no verses; reinstall bible-kjv")
    return verses


def _fortunes(part: str) -> list[str]:
    files = sorted(p for p in FORTUNES_DIR.glob("*") if p.is_file() and not p.suffix and "off" not in p.parts)
    if not files:
        raise MissingResourceError(
            f"no fortune files in {FORTUNES_DIR}; {_SETUP_HINT.format(pkg='fortunes')}"
        )
    cookies: list[str] = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        cookies += [" ".join(c.split()) for c in text.split("\n%\n") if c.strip()]
    return cookies[part == "eval" :: 2]


def _gensim(part: str) -> list[str]:
    try:
        import gensim.test.utils as gtu
    except ImportError as e:
        raise MissingResourceError(
            "gensim is not installed: pip install gensim (its test corpus lee_background.cor is used)"
        ) from e
    docs = [
        d.strip() for d in Path(gtu.datapath("lee_background.cor")).read_text(errors="replace").splitlines()
    ]
    docs = [d for d in docs if d]
    half = len(docs) // 2
    return docs[:half] if part == "calibration" else docs[half:]


def _text(part: str, source: str, max_chars: int | None) -> list[str]:
    readers = {"bible": _bible, "fortunes": _fortunes, "gensim": _gensim}
    if source not in readers:
        raise ConfigError(f"unknown text source {source!r}; choose one of {', '.join(TEXT_SOURCES)}")
    if max_chars is not None and max_chars <= 0:
        raise ConfigError(f"max_chars must be positive, got {max_chars}")
    lines = readers[source](part)
    if max_chars is not None:
        kept, total = [], 0
        for line in lines:
            if total + len(line) > max_chars and kept:
                break
            kept.append(line)
            total += len(line) + 1
        lines = kept
    return lines


def eval_text(source: str = "bible", max_chars: int | None = None) -> str:
    """Evaluation text (newline-joined samples), disjoint from :func:`calibration_text` of any source."""
    return "\n".join(_text("eval", source, max_chars))


def calibration_text(
    source: str = "bible", num_samples: int | None = None, max_chars: int | None = None
) -> list[str]:
    """Calibration samples (one string each), disjoint from :func:`eval_text`."""
    lines = _text("calibration", source, max_chars)
    if num_samples is not None:
        if num_samples <= 0:
            raise ConfigError(f"num_samples must be positive, got {num_samples}")
        lines = lines[:num_samples]
    return lines
