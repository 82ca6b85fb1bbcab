"""GPU path: Triton kernels of the ``ffsplit`` ops, their AOT compilation, the TensorRT
plugin and engine builds. Importing this package needs neither tensorrt, a GPU nor
triton; :mod:`.kernels` and :mod:`.aot` need triton, :mod:`.plugin` needs tensorrt."""

from __future__ import annotations

from ..ops._spec import DOMAIN, TRT_PLUGIN_NAMESPACE, TRT_PLUGIN_VERSION
from .configs import CONFIGS, OP_TYPES, TileConfig, kernel_spec
from .engine import (
    TensorRTUnavailableError,
    build_engine,
    build_engines,
    cuda_device_count,
    tensorrt_provider_options,
)
from .layout import device_weights, prepare_model

#: ONNX node convention for --target tensorrt (see plugins/tensorrt/README.md)
NODE_DOMAIN = DOMAIN
NODE_ATTRIBUTES = {"plugin_namespace": TRT_PLUGIN_NAMESPACE, "plugin_version": TRT_PLUGIN_VERSION}

__all__ = [
    "CONFIGS",
    "NODE_ATTRIBUTES",
    "NODE_DOMAIN",
    "OP_TYPES",
    "TensorRTUnavailableError",
    "TileConfig",
    "build_engine",
    "build_engines",
    "cuda_device_count",
    "device_weights",
    "kernel_spec",
    "prepare_model",
    "tensorrt_provider_options",
]
