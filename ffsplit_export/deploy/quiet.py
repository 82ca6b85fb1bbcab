"""Quiet exports: PyTorch's tracer warnings and optimum's / transformers' chatter filtered, scoped.

Everything is restored on exit (warning filters by ``warnings.catch_warnings``, logger levels
one by one), so a library user's own settings are untouched; ``verbose=True`` changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

# loggers whose INFO / WARNING lines are progress chatter during an export, not errors
CHATTY_LOGGERS = ("optimum", "transformers", "torch.onnx", "torch._dynamo")
# modules whose UserWarning / FutureWarning / DeprecationWarning lines an export user cannot act on
_NOISY_MODULES = r"(torch|transformers|optimum|onnxscript|onnx_ir)(\.|$)"


@contextlib.contextmanager
def quiet_export(verbose: bool = False):
    """Filter tracer warnings and library chatter inside the block unless ``verbose``."""
    if verbose:
        yield
        return
    import torch

    for lib in ("optimum", "transformers"):  # configure their root loggers now, or the first
        try:  # import inside the block resets the level we set
            __import__(f"{lib}.utils.logging", fromlist=["get_logger"]).get_logger()
        except ImportError:
            pass
    saved = {name: logging.getLogger(name).level for name in CHATTY_LOGGERS}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        for cat in (UserWarning, FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=cat, module=_NOISY_MODULES)
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)
