"""TensorRT plugins of the ``ffsplit`` ops, written with ``tensorrt.plugin`` (quickly
deployable plugins) and ahead-of-time-compiled Triton kernels.

Importing this module registers ``ffsplit::SparseMatMulInt8``, ``ffsplit::SparseMatMulFP32``,
``ffsplit::SparseMatMulInt4`` (attribute ``group_size``), ``ffsplit::Sparse24MatMulInt8`` and the two
halves of ``ffsplit::FusedFFNNBits`` (``FusedFFNNBitsUp`` / ``FusedFFNNBitsDown``, written by
:func:`ffsplit_export.trt.fused_nodes.split_fused_ffn`) in TensorRT's plugin registry; it needs ``tensorrt``
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
from .fused_kernels import threshold_bits
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


# ------------------------------------------------------------ FusedFFNNBits (Up + Down nodes)
# fused_nodes.split_fused_ffn writes each FusedFFNNBits node as these two plugin nodes: every input
# present (dummies where the op's input is absent), byte arrays in the int32 view, H / L / the part
# kinds / the three thresholds as attributes. Kernels: fused_kernels.ffn_nbits_up_kernel / _down_kernel.


def _fused_part_types(heavy_bits: int) -> str:
    """Types of heavy B, s, z, light B, s, z, bias: packed bytes and dummies arrive as INT32 (the
    int32 view of fused_nodes.node_arrays), a dense heavy B as FP32."""
    hb = "FP32" if int(heavy_bits) == 32 else "INT32"
    return f"{hb}, FP32, INT32, INT32, FP32, INT32, FP32"


def _fused_launch(spec, cfg, rows, n_cols, args):
    """Compile for the current GPU; grid over ``n_cols`` outputs x ``rows`` tokens; int32 ``args``."""
    ck = compile_kernel(spec, cfg, arch=None)
    lp = trtp.KernelLaunchParams()
    lp.grid_x = -(-n_cols // cfg.block_n) if isinstance(n_cols, int) else trtp.cdiv(n_cols, cfg.block_n)
    lp.grid_y = trtp.cdiv(rows, cfg.block_m) if rows is not None else 1
    lp.block_x = ck.num_warps * 32
    lp.shared_mem = ck.shared
    sym = trtp.SymIntExprs(len(args))
    for i, a in enumerate(args):
        sym[i] = trtp.SymInt32(a)
    return ck.name, ck.ptx, lp, sym


def _fused_specs(heavy_bits, light_bits, heavy_zp, light_zp, skip, gated=0, activation="relu",
                 has_up_bias=0, has_gate_bias=0, has_down_bias=0):  # fmt: skip
    from .configs import fused_ffn_kernel_specs

    return fused_ffn_kernel_specs(
        heavy_bits=int(heavy_bits), light_bits=int(light_bits), heavy_zp=bool(heavy_zp),
        light_zp=bool(light_zp), gated=bool(gated), activation=str(activation), skip=bool(skip),
        up_bias=bool(has_up_bias), gate_bias=bool(has_gate_bias), down_bias=bool(has_down_bias),
    )  # fmt: skip


@trtp.register(f"{NAMESPACE}::FusedFFNNBitsUp")
def _ffn_up_desc(
    x: trtp.TensorDesc, uh_b: trtp.TensorDesc, uh_s: trtp.TensorDesc, uh_z: trtp.TensorDesc,
    ul_b: trtp.TensorDesc, ul_s: trtp.TensorDesc, ul_z: trtp.TensorDesc, up_bias: trtp.TensorDesc,
    gh_b: trtp.TensorDesc, gh_s: trtp.TensorDesc, gh_z: trtp.TensorDesc, gl_b: trtp.TensorDesc,
    gl_s: trtp.TensorDesc, gl_z: trtp.TensorDesc, gate_bias: trtp.TensorDesc,
    heavy_neurons: int, light_neurons: int, heavy_bits: int, light_bits: int, heavy_block_size: int,
    light_block_size: int, heavy_zp: int, light_zp: int, skip: int, gated: int, activation: str,
    threshold: float, product_threshold: float, input_threshold: float, has_up_bias: int, has_gate_bias: int,
) -> tuple[trtp.TensorDesc]:  # fmt: skip
    # a[..., H + L]: the up light B's rows (L) plus H
    return (_out_like_x(x, ul_b.shape_expr[0] + heavy_neurons),)


@trtp.autotune(f"{NAMESPACE}::FusedFFNNBitsUp")
def _ffn_up_tune(x, uh_b, uh_s, uh_z, ul_b, ul_s, ul_z, up_bias, gh_b, gh_s, gh_z, gl_b, gl_s, gl_z,
                 gate_bias, heavy_bits, outputs) -> list:  # fmt: skip
    part = _fused_part_types(heavy_bits)
    return [trtp.AutoTuneCombination(f"FP32, {part}, {part}, FP32", "LINEAR", TACTICS)]  # X, up, gate, a


@trtp.aot_impl(f"{NAMESPACE}::FusedFFNNBitsUp")
def _ffn_up_aot(x, uh_b, uh_s, uh_z, ul_b, ul_s, ul_z, up_bias, gh_b, gh_s, gh_z, gl_b, gl_s, gl_z, gate_bias,
                heavy_neurons, light_neurons, heavy_bits, light_bits, heavy_block_size, light_block_size,
                heavy_zp, light_zp, skip, gated, activation, threshold, product_threshold, input_threshold,
                has_up_bias, has_gate_bias, outputs, tactic):  # fmt: skip
    up, _ = _fused_specs(heavy_bits, light_bits, heavy_zp, light_zp, skip, gated, activation,
                         has_up_bias, has_gate_bias)  # fmt: skip
    h, n_light = int(heavy_neurons), int(light_neurons)
    m = _rows(x)
    d = x.shape_expr[x.ndim - 1]
    args = [m if m is not None else 1, h, n_light, d, int(heavy_block_size), int(light_block_size),
            threshold_bits(threshold), threshold_bits(product_threshold), threshold_bits(input_threshold)]  # fmt: skip
    return _fused_launch(up, config_for_tactic(tactic), m, h + n_light, args)


@trtp.register(f"{NAMESPACE}::FusedFFNNBitsDown")
def _ffn_down_desc(
    a: trtp.TensorDesc, dh_b: trtp.TensorDesc, dh_s: trtp.TensorDesc, dh_z: trtp.TensorDesc,
    dl_b: trtp.TensorDesc, dl_s: trtp.TensorDesc, dl_z: trtp.TensorDesc, down_bias: trtp.TensorDesc,
    heavy_neurons: int, light_neurons: int, heavy_bits: int, light_bits: int, heavy_block_size: int,
    light_block_size: int, heavy_zp: int, light_zp: int, skip: int, has_down_bias: int,
) -> tuple[trtp.TensorDesc]:  # fmt: skip
    return (_out_like_x(a, dl_b.shape_expr[0]),)  # Y[..., D]: the down light B's rows


@trtp.autotune(f"{NAMESPACE}::FusedFFNNBitsDown")
def _ffn_down_tune(a, dh_b, dh_s, dh_z, dl_b, dl_s, dl_z, down_bias, heavy_bits, outputs) -> list:
    return [trtp.AutoTuneCombination(f"FP32, {_fused_part_types(heavy_bits)}, FP32", "LINEAR", TACTICS)]


@trtp.aot_impl(f"{NAMESPACE}::FusedFFNNBitsDown")
def _ffn_down_aot(a, dh_b, dh_s, dh_z, dl_b, dl_s, dl_z, down_bias, heavy_neurons, light_neurons, heavy_bits,
                  light_bits, heavy_block_size, light_block_size, heavy_zp, light_zp, skip, has_down_bias,
                  outputs, tactic):  # fmt: skip
    _, down = _fused_specs(heavy_bits, light_bits, heavy_zp, light_zp, skip, has_down_bias=has_down_bias)
    m = _rows(a)
    d = dl_b.shape_expr[0]
    args = [m if m is not None else 1, d, int(heavy_neurons), int(light_neurons), int(heavy_block_size),
            int(light_block_size)]  # fmt: skip
    return _fused_launch(down, config_for_tactic(tactic), m, d, args)


PLUGIN_IDS = tuple(
    f"{NAMESPACE}::{op}"
    for op in ("SparseMatMulInt8", "SparseMatMulFP32", "SparseMatMulInt4", "Sparse24MatMulInt8")
)
#: the two plugin nodes of a FusedFFNNBits (ffsplit_export.trt.fused_nodes); not run on a GPU here
FUSED_PLUGIN_IDS = (f"{NAMESPACE}::FusedFFNNBitsUp", f"{NAMESPACE}::FusedFFNNBitsDown")

__all__ = ["FUSED_PLUGIN_IDS", "NAMESPACE", "PLUGIN_IDS", "TACTICS", "VERSION", "np"]
