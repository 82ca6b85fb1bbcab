"""Typed errors. Every message names the bad value and says how to fix it."""

from __future__ import annotations


class FFSplitError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(FFSplitError, ValueError):
    """An option or argument is out of range or does not fit the others."""


class UnsupportedModelError(FFSplitError, ValueError):
    """The model type, task or architecture is not supported."""


class FormatError(FFSplitError, ValueError):
    """A packed weight or a format name is malformed."""


class CalibrationError(FFSplitError, ValueError):
    """Calibration data cannot be read or is empty."""


class BudgetError(FFSplitError, ValueError):
    """A size budget cannot be met with the given formats."""


class PluginNotFoundError(FFSplitError, RuntimeError):
    """The compiled runtime plugin library is missing."""


class ExportError(FFSplitError, RuntimeError):
    """The ONNX export failed or its output is unusable."""


class ValidationError(FFSplitError, RuntimeError):
    """An exported graph does not reproduce the PyTorch model within tolerance."""


class MissingResourceError(FFSplitError, RuntimeError):
    """Real weights, evaluation data or an optional package are not installed."""
