"""Shared fixtures: built-in tiny models (built from configs in code) and calibration data."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def plugin_built() -> bool:
    """Whether the ffsplit ONNX Runtime library can be found (``from conftest import needs_plugin``)."""
    from ffsplit_export.errors import PluginNotFoundError
    from ffsplit_export.runtime import plugin_path

    try:
        plugin_path()
        return True
    except PluginNotFoundError:
        return False


needs_plugin = pytest.mark.skipif(
    not plugin_built(), reason="ffsplit ONNX Runtime library not built (scripts/setup.sh)"
)


@pytest.fixture(scope="session")
def tiny_calibrated():
    """(model, preprocessor, task, batches, stats) per tiny model name, computed once per session."""
    from ffsplit_export.calibrate import calibrate, make_batches
    from ffsplit_export.data.calibration import load_samples
    from ffsplit_export.models.tiny import build_tiny

    cache = {}

    def get(name: str, hessians: bool = False):
        key = (name, hessians)
        if key not in cache:
            model, pre, task = build_tiny(name)
            samples = load_samples(model, None, 8 if name != "tiny-whisper" else 2)
            batches = make_batches(model, pre, samples, batch_size=4, max_length=48)
            stats = calibrate(model, batches, hessians=hessians, progress=False)
            cache[key] = (model, pre, task, batches, stats)
        return cache[key]

    return get
