"""Compressed linear modules: the PyTorch reference of every exported weight format.

The modules live beside their formats in :mod:`ffsplit_export.formats` (one module per
format family); this module keeps the import path that callers use. Each module computes
``y = x @ W.T (+ b)`` with ``W`` decoded from its packed buffers exactly as the exported
kernel decodes it (same dequantisation, float32 compute), so the PyTorch model is the
reference for export validation. At ONNX export each module asks its registered format
(``module.format``) for the node(s) of the current target (see :func:`export_target`):
``ffsplit`` custom ops, TensorRT plugin nodes, or standard ONNX / ``com.microsoft`` ops.
"""

from __future__ import annotations

from .formats._module import (
    TRT_PLUGIN_DOMAIN,
    TRT_PLUGIN_NAMESPACE,
    TRT_PLUGIN_VERSION,
    CompressedLinear,
    current_target,
    export_target,
)
from .formats.dense import DenseLinear
from .formats.embedding import QuantizedEmbedding
from .formats.lowrank import LowRankLinear
from .formats.nbits import NBitsLinear
from .formats.nm24 import NM24Linear
from .formats.sparse import SparseLinear

__all__ = [
    "TRT_PLUGIN_DOMAIN",
    "TRT_PLUGIN_NAMESPACE",
    "TRT_PLUGIN_VERSION",
    "CompressedLinear",
    "DenseLinear",
    "LowRankLinear",
    "NBitsLinear",
    "NM24Linear",
    "QuantizedEmbedding",
    "SparseLinear",
    "current_target",
    "export_target",
]
