"""TensorRT plugins of the ``ffsplit`` ops, written with ``tensorrt.plugin`` (quickly
deployable plugins) and ahead-of-time-compiled Triton kernels.

Importing this module registers ``ffsplit::SparseMatMulInt8``, ``ffsplit::SparseMatMulFP32``,
``ffsplit::SparseMatMulInt4`` (attribute ``group_size``) and ``ffsplit::Sparse24MatMulInt8`` in TensorRT's plugin registry; it needs ``tensorrt``
(10.12+ / 11, with ``tensorrt.plugin.aot_impl``) and ``triton``. The engine embeds the
kernel, so running a built engine needs no Python.

Inputs arrive in the op order (X first, then the packed weights as constant tensors),
either in the on-disk dtypes (uint8 / int8 / int64, as ONNX Runtime's TensorRT EP hands
them over) or in the int32 view that :func:`ffsplit_export.trt.layout.prepare_model`
makes for :func:`ffsplit_export.trt.engine.build_engines`. Tactics are the tile configs
of :data:`ffsplit_export.trt.configs.CONFIGS` (tactic = index + 1).

Not run on hardware: written against the documented API and the tensorrt.plugin sources.
"""

from __future__ import annotations

import numpy as np
import tensorrt as trt
import tensorrt.plugin as trtp

from ..errors import PluginNotFoundError
from .aot import compile_kernel
from .configs import CONFIGS, config_for_tactic, kernel_spec
from .onnx_nodes import PLUGIN_NAMESPACE as NAMESPACE
from .onnx_nodes import PLUGIN_VERSION as VERSION

TACTICS = list(range(1, len(CONFIGS) + 1))

if not hasattr(trtp, "aot_impl"):
    raise PluginNotFoundError(
        f"tensorrt {trt.__version__} has no tensorrt.plugin.aot_impl; install tensorrt>=10.12 "
        "(pip install 'ffsplit-export[tensorrt]')"
    )


def _itemsize(dtype) -> int:
    return {trt.uint8: 1, trt.int8: 1, trt.int32: 4, trt.int64: 8, trt.float32: 4}[dtype]


def _row_ptr_variant(row_ptr: trtp.TensorDesc) -> str:
    return "i64" if row_ptr.dtype == trt.int64 else "i32"


def _out_like_x(x: trtp.TensorDesc, n) -> trtp.TensorDesc:
    """Y has X's shape with the last dim replaced by N."""
    y = x.like()
    y.shape_expr[x.ndim - 1] = n
    return y


def _rows(x: trtp.TensorDesc):
    """M = product of X's leading dims (1 for a rank-1 X)."""
    m = None
    for i in range(x.ndim - 1):
        m = x.shape_expr[i] if m is None else m * x.shape_expr[i]
    return m


def _launch(spec, cfg, x, n, extra):
    """Compile for the current GPU and build KernelLaunchParams + SymIntExprs."""
    ck = compile_kernel(spec, cfg, arch=None)
    m = _rows(x)
    k = x.shape_expr[x.ndim - 1]
    lp = trtp.KernelLaunchParams()
    lp.grid_x = trtp.cdiv(n, cfg.block_n)
    lp.grid_y = trtp.cdiv(m, cfg.block_m) if m is not None else 1
    lp.block_x = ck.num_warps * 32
    lp.shared_mem = ck.shared
    args = [m if m is not None else 1, n, k, *extra]
    sym = trtp.SymIntExprs(len(args))
    for i, a in enumerate(args):
        sym[i] = trtp.SymInt32(a)
    return ck.name, ck.ptx, lp, sym


def _combos(on_disk: str, int32_view: str, widened: str) -> list:
    """Type combinations: the on-disk dtypes, the int32 view of :func:`.layout.prepare_model`
    (``build_engine``), and what TensorRT's ONNX parser makes of an unmodified export (UINT8
    initializers widened to INT32 element by element; ONNX Runtime's TensorRT EP)."""
    return [
        trtp.AutoTuneCombination(on_disk, "LINEAR", TACTICS),
        trtp.AutoTuneCombination(int32_view, "LINEAR", TACTICS),
        trtp.AutoTuneCombination(widened, "LINEAR", TACTICS),
    ]


def _bitmask_layout(mask: trtp.TensorDesc, row_ptr: trtp.TensorDesc):
    """(byte_elems, MASK_STRIDE): an INT32 mask next to an INT64 row_ptr is the parser-widened
    form (one byte per element, stride in elements); the int32 view comes with INT32 row_ptr."""
    if mask.dtype == trt.int32 and row_ptr.dtype == trt.int64:
        return "i32", mask.shape_expr[1]
    return "u8", mask.shape_expr[1] * _itemsize(mask.dtype)


# --------------------------------------------------------------------------- SparseMatMulInt8


@trtp.register(f"{NAMESPACE}::SparseMatMulInt8")
def _sparse_int8_desc(
    x: trtp.TensorDesc,
    mask: trtp.TensorDesc,
    values: trtp.TensorDesc,
    row_ptr: trtp.TensorDesc,
    scales: trtp.TensorDesc,
) -> tuple[trtp.TensorDesc]:
    return (_out_like_x(x, mask.shape_expr[0]),)


@trtp.autotune(f"{NAMESPACE}::SparseMatMulInt8")
def _sparse_int8_tune(x, mask, values, row_ptr, scales, outputs) -> list:
    return _combos(
        "FP32, UINT8, INT8, INT64, FP32, FP32",
        "FP32, INT32, INT32, INT32, FP32, FP32",
        "FP32, INT32, INT8, INT64, FP32, FP32",
    )


@trtp.aot_impl(f"{NAMESPACE}::SparseMatMulInt8")
def _sparse_int8_aot(x, mask, values, row_ptr, scales, outputs, tactic):
    elems, stride = _bitmask_layout(mask, row_ptr)
    spec = kernel_spec("SparseMatMulInt8", _row_ptr_variant(row_ptr), elems)
    return _launch(spec, config_for_tactic(tactic), x, mask.shape_expr[0], [stride])


# --------------------------------------------------------------------------- SparseMatMulFP32


@trtp.register(f"{NAMESPACE}::SparseMatMulFP32")
def _sparse_fp32_desc(
    x: trtp.TensorDesc, mask: trtp.TensorDesc, values: trtp.TensorDesc, row_ptr: trtp.TensorDesc
) -> tuple[trtp.TensorDesc]:
    return (_out_like_x(x, mask.shape_expr[0]),)


@trtp.autotune(f"{NAMESPACE}::SparseMatMulFP32")
def _sparse_fp32_tune(x, mask, values, row_ptr, outputs) -> list:
    return _combos(
        "FP32, UINT8, FP32, INT64, FP32", "FP32, INT32, FP32, INT32, FP32", "FP32, INT32, FP32, INT64, FP32"
    )


@trtp.aot_impl(f"{NAMESPACE}::SparseMatMulFP32")
def _sparse_fp32_aot(x, mask, values, row_ptr, outputs, tactic):
    elems, stride = _bitmask_layout(mask, row_ptr)
    spec = kernel_spec("SparseMatMulFP32", _row_ptr_variant(row_ptr), elems)
    return _launch(spec, config_for_tactic(tactic), x, mask.shape_expr[0], [stride])


# --------------------------------------------------------------------------- SparseMatMulInt4


@trtp.register(f"{NAMESPACE}::SparseMatMulInt4")
def _sparse_int4_desc(
    x: trtp.TensorDesc,
    mask: trtp.TensorDesc,
    values: trtp.TensorDesc,
    row_ptr: trtp.TensorDesc,
    scales: trtp.TensorDesc,
    group_size: int,
) -> tuple[trtp.TensorDesc]:
    return (_out_like_x(x, mask.shape_expr[0]),)


@trtp.autotune(f"{NAMESPACE}::SparseMatMulInt4")
def _sparse_int4_tune(x, mask, values, row_ptr, scales, outputs) -> list:
    # values is UINT8 on disk, so the parser widens it too (INT32, one byte per element)
    return _combos(
        "FP32, UINT8, UINT8, INT64, FP32, FP32",
        "FP32, INT32, INT32, INT32, FP32, FP32",
        "FP32, INT32, INT32, INT64, FP32, FP32",
    )


@trtp.aot_impl(f"{NAMESPACE}::SparseMatMulInt4")
def _sparse_int4_aot(x, mask, values, row_ptr, scales, group_size, outputs, tactic):
    elems, stride = _bitmask_layout(mask, row_ptr)
    spec = kernel_spec("SparseMatMulInt4", _row_ptr_variant(row_ptr), elems)
    return _launch(spec, config_for_tactic(tactic), x, mask.shape_expr[0], [stride, int(group_size)])


# --------------------------------------------------------------------------- Sparse24MatMulInt8


@trtp.register(f"{NAMESPACE}::Sparse24MatMulInt8")
def _nm24_desc(
    x: trtp.TensorDesc, values: trtp.TensorDesc, meta: trtp.TensorDesc, scales: trtp.TensorDesc
) -> tuple[trtp.TensorDesc]:
    return (_out_like_x(x, values.shape_expr[0]),)


@trtp.autotune(f"{NAMESPACE}::Sparse24MatMulInt8")
def _nm24_tune(x, values, meta, scales, outputs) -> list:
    return _combos(
        "FP32, INT8, UINT8, FP32, FP32", "FP32, INT32, INT32, FP32, FP32", "FP32, INT8, INT32, FP32, FP32"
    )


@trtp.aot_impl(f"{NAMESPACE}::Sparse24MatMulInt8")
def _nm24_aot(x, values, meta, scales, outputs, tactic):
    # INT32 meta next to INT8 values: the parser-widened form (one byte per element)
    wide = meta.dtype == trt.int32 and values.dtype == trt.int8
    spec = kernel_spec("Sparse24MatMulInt8", byte_elems="i32" if wide else "u8")
    v_stride = values.shape_expr[1] * _itemsize(values.dtype)
    m_stride = meta.shape_expr[1] * (1 if wide else _itemsize(meta.dtype))
    return _launch(spec, config_for_tactic(tactic), x, values.shape_expr[0], [v_stride, m_stride])


PLUGIN_IDS = tuple(
    f"{NAMESPACE}::{op}"
    for op in ("SparseMatMulInt8", "SparseMatMulFP32", "SparseMatMulInt4", "Sparse24MatMulInt8")
)

__all__ = ["NAMESPACE", "PLUGIN_IDS", "TACTICS", "VERSION", "np"]
