"""Calibration and evaluation data: built-in samples, file readers, offline text and speech sources."""
