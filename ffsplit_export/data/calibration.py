"""Calibration samples for a model: a file, folder or dataset, an offline text source, or the built-in sample."""

from __future__ import annotations

from pathlib import Path

from ..calibrate import modality
from ..errors import CalibrationError
from . import readers
from .evaldata import TEXT_SOURCES


def _is_offline_source(calibration: str) -> bool:
    """``bible`` / ``fortunes`` / ``gensim``: the calibration half of an offline text source (``eval`` extra),
    unless a file of that name exists."""
    return calibration in TEXT_SOURCES and not Path(calibration).exists()


def load_samples(model, calibration: str | None, num_samples: int) -> list:
    """Calibration samples (strings or 16 kHz waveforms) from PATH, or the built-in sample."""
    if num_samples < 1:
        raise CalibrationError(f"--num-samples={num_samples}; use a positive number of calibration samples")
    if modality(model) == "audio":
        samples = (
            readers.read_audio(calibration, num_samples)
            if calibration
            else readers.builtin_audio(min(num_samples, 16))
        )
    else:
        if calibration and _is_offline_source(calibration):
            from .evaldata import calibration_text

            samples = calibration_text(calibration, num_samples)
        elif calibration:
            samples = readers.read_text(calibration, num_samples)
        else:
            text = readers.builtin_text()
            samples = (text * (1 + num_samples // len(text)))[:num_samples]
    if not samples:
        raise CalibrationError(f"calibration source {calibration!r} gave no sample")
    return samples
