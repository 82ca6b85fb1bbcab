"""GPU path: Triton kernels of the ``ffsplit`` ops, their AOT compilation, the TensorRT
plugin and engine builds. Importing this package needs neither tensorrt, a GPU nor
triton; :mod:`.kernels` and :mod:`.aot` need triton, :mod:`.plugin` needs tensorrt."""

from __future__ import annotations

from .configs import CONFIGS, OP_TYPES, TileConfig, kernel_spec
from .engine import (
    TensorRTUnavailableError,
    build_engine,
    build_engines,
    cuda_device_count,
    tensorrt_provider_options,
)
from .layout import device_weights, prepare_model
from .onnx_nodes import (
    NODE_DOMAIN,
    ORT_TRT_DOMAIN,
    set_plugin_domain,
    trt_node_attributes,
    trt_plugin_attributes,
)

#: ONNX node convention for --target tensorrt (see onnx_nodes.py and plugins/tensorrt/README.md)
NODE_ATTRIBUTES = trt_plugin_attributes()

__all__ = [
    "CONFIGS",
    "NODE_ATTRIBUTES",
    "NODE_DOMAIN",
    "ORT_TRT_DOMAIN",
    "OP_TYPES",
    "TensorRTUnavailableError",
    "TileConfig",
    "build_engine",
    "build_engines",
    "cuda_device_count",
    "device_weights",
    "kernel_spec",
    "prepare_model",
    "set_plugin_domain",
    "tensorrt_provider_options",
    "trt_node_attributes",
    "trt_plugin_attributes",
]
