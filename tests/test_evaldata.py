"""Offline evaluation data: LibriVox clips and disjoint calibration / evaluation text."""

from __future__ import annotations

import numpy as np
import pytest

from ffsplit_export.data.evaldata import calibration_text, eval_text, librispeech_clips
from ffsplit_export.errors import ConfigError, MissingResourceError


def _or_skip(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except MissingResourceError as e:
        pytest.skip(str(e))


def test_librispeech_clips():
    clips = _or_skip(librispeech_clips)
    assert len(clips) == 5
    total = sum(len(a) for a, _ in clips) / 16000
    assert 24 < total < 26  # 24.7 s
    audio, ref = clips[1]
    assert audio.dtype == np.float32 and np.abs(audio).max() <= 1.0
    assert ref == "he was not an ill disposed young man"


@pytest.mark.parametrize("source", ["bible", "fortunes"])
def test_calibration_and_eval_text_are_disjoint(source):
    calib = _or_skip(calibration_text, source)
    ev = _or_skip(eval_text, source).split("\n")
    assert len(calib) > 100 and len(ev) > 100
    overlap = set(calib) & set(ev)
    # fortune files repeat a few cookies verbatim across files; verses never repeat between the two books
    assert len(overlap) <= (0 if source == "bible" else len(ev) // 100), sorted(overlap)[:3]


def test_text_limits_and_bad_source():
    calib = _or_skip(calibration_text, "bible", num_samples=3)
    assert len(calib) == 3 and calib[0].startswith("In the beginning")
    assert len(_or_skip(eval_text, "bible", max_chars=500)) <= 500
    with pytest.raises(ConfigError, match="unknown text source"):
        eval_text("nope")
    with pytest.raises(ConfigError):
        calibration_text("bible", num_samples=0)


def test_calibration_accepts_an_offline_source_name(tmp_path, monkeypatch):
    """``--calibration bible`` is the calibration half of the text source; a file of that name wins."""
    from ffsplit_export.data.calibration import load_samples
    from ffsplit_export.models.tiny import build_tiny

    model, _, _ = build_tiny("tiny-llama")
    expected = _or_skip(calibration_text, "bible", num_samples=5)
    assert load_samples(model, "bible", 5) == expected
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bible").write_text("a local file\nwith two samples\n")
    assert load_samples(model, "bible", 5) == ["a local file", "with two samples"]
