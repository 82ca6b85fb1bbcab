"""Op specifications, schemas and reference implementations of the ``ffsplit`` domain."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import defs

from ..errors import FormatError
from ..formats import packing

DOMAIN = "ffsplit"
VERSION = 1
#: TensorRT plugin namespace / version carried by --target tensorrt nodes (defined only here)
TRT_PLUGIN_NAMESPACE = "ffsplit"
TRT_PLUGIN_VERSION = "1"
#: INT attribute ``aot`` = 1: TensorRT's ONNX parser uses the plugin's ahead-of-time implementation
#: (see ffsplit_export/trt/onnx_nodes.py for the sources)
TRT_PLUGIN_AOT = 1


def trt_node_attributes() -> dict:
    """The attributes of every ``--target tensorrt`` plugin node, as keyword arguments of
    ``torch.onnx`` ``g.op`` (typed suffixes)."""
    return {
        "plugin_namespace_s": TRT_PLUGIN_NAMESPACE,
        "plugin_version_s": TRT_PLUGIN_VERSION,
        "aot_i": TRT_PLUGIN_AOT,
    }


# The semantics every kernel of the domain implements (ONNX Runtime C++ on every ISA path, batch
# size and accuracy level; Triton), stated once and appended to each op's schema doc.
SEMANTICS = """\
Y[..., n] = sum over k with code[n, k] != 0 of X[..., k] * w[n, k], where code is the stored int8
code (int8 ops; w = code * scales[n]), the stored int4 code (SparseMatMulInt4; w = code * the scale
of its group) or the stored float32 value (SparseMatMulFP32; w = code).
Zero codes, stored or not, are structural zeros and are skipped as sparse BLAS does: a NaN or inf
in X at a column that row n does not use does not reach Y[..., n], so the result never depends on
which kernel path, batch size or accuracy level ran. Every used term follows IEEE arithmetic: a
NaN or inf in X at a used column, or a NaN or inf scale or value, makes Y[..., n] NaN or +-inf
(never finite); 0 * inf is NaN. The result is the float32 rounding of the exact sum (float32
accumulation error allowed); it is inf only where the exact sum is beyond float32 range, never
through an intermediate overflow (the kernels recompute any non-finite output in float64).
accuracy_level 4 on the int8 ops (SparseMatMulInt4: accepted, computed exactly) may quantize each finite row of X to int8 (relative error ~1e-2);
a row of X holding NaN or inf is never quantized, it is computed by these semantics."""

# Why structural zeros are skipped rather than multiplied (the dense product's 0 * inf = NaN): the
# fast kernels only touch stored weights, so the sparse semantics cost nothing on the hot path;
# the dense semantics would need a scan of every row of X for non-finite values on every call
# and a per-output test of which non-finite columns a row leaves unused.


@dataclass(frozen=True)
class OpSpec:
    """One op of the domain: its inputs (after X), their element types and its decoders."""

    name: str
    doc: str
    weight_inputs: tuple[tuple[str, str], ...]  # (name, onnx type string) after X
    decode: Callable[..., np.ndarray]  # (k, *weights) -> float32 W [N, K]
    check: Callable[..., None]  # (k, *weights) -> raises FormatError
    terms: Callable[
        ..., tuple[np.ndarray, np.ndarray | None]
    ]  # (k, *weights) -> codes [N, K], scales [N] or [N, K]
    attrs: tuple[str, ...] = ()  # required int attributes, passed to decode / check / terms by keyword


def _terms_sparse_int8(k, mask, values, row_ptr, scales):
    _check_sparse_int8(k, mask, values, row_ptr, scales)
    return packing.unpack_bitmask(packing.BitmaskSparse(mask, values, row_ptr, k)), scales


def _terms_sparse_fp32(k, mask, values, row_ptr):
    _check_sparse_fp32(k, mask, values, row_ptr)
    return packing.unpack_bitmask(packing.BitmaskSparse(mask, values, row_ptr, k)), None


def _terms_nm24_int8(k, values, meta, scales):
    _check_nm24_int8(k, values, meta, scales)
    if values.shape[0] == 0:
        return np.zeros((0, k), np.int8), scales
    return packing.unpack_nm24(packing.NM24(values, meta, k)), scales


def _scaled(codes: np.ndarray, scales: np.ndarray | None, dtype) -> np.ndarray:
    """w = code * scale where code != 0, else exactly 0 (a structural zero, whatever the scale).

    ``scales`` is per row [N] or per entry [N, K] (SparseMatMulInt4's group scales)."""
    c = codes.astype(dtype)
    if scales is None:
        return c
    s = scales.astype(dtype)
    with np.errstate(all="ignore"):
        return np.where(codes != 0, c * (s if s.ndim == 2 else s[:, None]), dtype(0))


def _int4(k, mask, values, row_ptr, scales, group_size) -> packing.SparseInt4:
    if not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool):
        raise FormatError(f"SparseMatMulInt4 needs an int attribute group_size >= 8, got {group_size!r}")
    return packing.SparseInt4(mask, values, row_ptr, scales, k, int(group_size))


def _check_sparse_int4(k, mask, values, row_ptr, scales, *, group_size=None):
    p = _int4(k, mask, values, row_ptr, scales, group_size)
    packing.check_sparse_int4(p.mask, p.values, p.row_ptr, p.scales, k, p.group_size)


def _terms_sparse_int4(k, mask, values, row_ptr, scales, *, group_size=None):
    p = _int4(k, mask, values, row_ptr, scales, group_size)
    codes, _, _ = packing.unpack_sparse_int4(p)
    return codes, packing.sparse_int4_scale_matrix(p)


def _decode_sparse_int4(k, mask, values, row_ptr, scales, *, group_size=None):
    return _scaled(*_terms_sparse_int4(k, mask, values, row_ptr, scales, group_size=group_size), np.float32)


def _decode_sparse_int8(k, mask, values, row_ptr, scales):
    return _scaled(*_terms_sparse_int8(k, mask, values, row_ptr, scales), np.float32)


def _check_sparse_int8(k, mask, values, row_ptr, scales):
    packing.check_bitmask(mask, values, row_ptr, k)
    if values.dtype != np.int8:
        raise FormatError(f"SparseMatMulInt8 values must be int8, got {values.dtype}")
    if scales.dtype != np.float32 or scales.shape != (mask.shape[0],):
        raise FormatError(f"scales must be float32 [N]={mask.shape[0]}, got {scales.dtype} {scales.shape}")


def _decode_sparse_fp32(k, mask, values, row_ptr):
    _check_sparse_fp32(k, mask, values, row_ptr)
    return packing.unpack_bitmask(packing.BitmaskSparse(mask, values, row_ptr, k)).astype(np.float32)


def _check_sparse_fp32(k, mask, values, row_ptr):
    packing.check_bitmask(mask, values, row_ptr, k)
    if values.dtype != np.float32:
        raise FormatError(f"SparseMatMulFP32 values must be float32, got {values.dtype}")


def _decode_nm24_int8(k, values, meta, scales):
    return _scaled(*_terms_nm24_int8(k, values, meta, scales), np.float32)


def _check_nm24_int8(k, values, meta, scales):
    if values.dtype != np.int8:
        raise FormatError(f"Sparse24MatMulInt8 values must be int8, got {values.dtype}")
    if values.ndim == 2 and values.shape[0] == 0:
        # N = 0 (which the kernels accept): only the shapes can be checked
        g = -(-k // 4)
        if values.shape[1] != 2 * g:
            raise FormatError(f"2:4 values must be [N, {2 * g}] for K={k}, got {values.shape}")
        if meta.dtype != np.uint8 or meta.shape != (0, -(-g // 2)):
            raise FormatError(f"2:4 meta must be uint8 [N, {-(-g // 2)}], got {meta.dtype} {meta.shape}")
    else:
        packing.check_nm24(values, meta, k)
    if scales.dtype != np.float32 or scales.shape != (values.shape[0],):
        raise FormatError(f"scales must be float32 [N]={values.shape[0]}, got {scales.dtype} {scales.shape}")


OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec(
            "SparseMatMulInt8",
            "Y = X @ W.T, W unstructured sparse: bitmask + int8 values + row_ptr, per-row scales.",
            (
                ("mask", "tensor(uint8)"),
                ("values", "tensor(int8)"),
                ("row_ptr", "tensor(int64)"),
                ("scales", "tensor(float)"),
            ),
            _decode_sparse_int8,
            _check_sparse_int8,
            _terms_sparse_int8,
        ),
        OpSpec(
            "SparseMatMulFP32",
            "Y = X @ W.T, W unstructured sparse: bitmask + float32 values + row_ptr.",
            (("mask", "tensor(uint8)"), ("values", "tensor(float)"), ("row_ptr", "tensor(int64)")),
            _decode_sparse_fp32,
            _check_sparse_fp32,
            _terms_sparse_fp32,
        ),
        OpSpec(
            "Sparse24MatMulInt8",
            "Y = X @ W.T, W 2:4 sparse: int8 values [N, 2G] + 4-bit group metadata, per-row scales.",
            (("values", "tensor(int8)"), ("meta", "tensor(uint8)"), ("scales", "tensor(float)")),
            _decode_nm24_int8,
            _check_nm24_int8,
            _terms_nm24_int8,
        ),
        OpSpec(
            "SparseMatMulInt4",
            "Y = X @ W.T, W unstructured sparse: bitmask + int4 codes of the kept weights (a nibble "
            "stream) + row_ptr, float32 scales per group of group_size kept values of a row "
            "(attribute group_size, required, >= 8; layout in ffsplit_export/formats/packing.py).",
            (
                ("mask", "tensor(uint8)"),
                ("values", "tensor(uint8)"),
                ("row_ptr", "tensor(int64)"),
                ("scales", "tensor(float)"),
            ),
            _decode_sparse_int4,
            _check_sparse_int4,
            _terms_sparse_int4,
            ("group_size",),
        ),
    )
}


def _spec(op_type: str) -> OpSpec:
    try:
        return OPS[op_type]
    except KeyError as e:
        raise FormatError(f"unknown op {DOMAIN}::{op_type}; the domain has {sorted(OPS)}") from e


def _op_attrs(spec: OpSpec, attrs: dict) -> dict:
    """The op's attributes from ``attrs`` (others, e.g. accuracy_level, are dropped); a missing one raises."""
    missing = [a for a in spec.attrs if attrs.get(a) is None]
    if missing:
        raise FormatError(f"{spec.name} needs the attribute(s) {', '.join(missing)}")
    return {a: attrs[a] for a in spec.attrs}


def check_op_weights(op_type: str, k: int, *weights: np.ndarray, **attrs) -> None:
    """Raise FormatError unless ``weights`` are valid packed inputs of ``op_type`` for K=k."""
    spec = _spec(op_type)
    if len(weights) != len(spec.weight_inputs):
        raise FormatError(f"{op_type} takes {len(spec.weight_inputs)} weight inputs, got {len(weights)}")
    spec.check(k, *weights, **_op_attrs(spec, attrs))


def decode_weight(op_type: str, k: int, *weights: np.ndarray, **attrs) -> np.ndarray:
    """The float32 W [N, K] that ``op_type`` multiplies by (``attrs``: the op's attributes)."""
    spec = _spec(op_type)
    return spec.decode(k, *weights, **_op_attrs(spec, attrs))


def reference_matmul(op_type: str, x: np.ndarray, *weights: np.ndarray, **attrs) -> np.ndarray:
    """Reference semantics (:data:`SEMANTICS`): ``x[..., K] @ W.T`` summed in float64 over the
    non-zero weights only (structural zeros skipped), rounded to float32. ``attrs``: the node's
    attributes (SparseMatMulInt4 needs ``group_size``; others are ignored)."""
    spec = _spec(op_type)
    op_attrs = _op_attrs(spec, attrs)
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise FormatError(f"{op_type}: X must be float32, got {x.dtype}")
    if x.ndim < 1:
        raise FormatError(f"{op_type}: X must have rank >= 1, got a scalar")
    if len(weights) != len(spec.weight_inputs):
        raise FormatError(f"{op_type} takes {len(spec.weight_inputs)} weight inputs, got {len(weights)}")
    for (name, _), arr in zip(spec.weight_inputs, weights):
        if arr is None:
            raise FormatError(f"{op_type}: input {name!r} is omitted; every input of the op is required")
    weights = tuple(np.asarray(a) for a in weights)
    k = x.shape[-1]
    codes, scales = spec.terms(k, *weights, **op_attrs)
    w = _scaled(codes, scales, np.float64)  # code * scale is exact in float64
    nz = codes != 0
    m = int(np.prod(x.shape[:-1], dtype=np.int64))
    x64 = x.reshape(m, k).astype(np.float64)
    with np.errstate(all="ignore"):
        y = x64 @ w.T  # exact semantics wherever X and W are finite (0 * finite = 0)
        # elsewhere only the non-zero weights may multiply: 0 * inf must not make a NaN
        for r in np.flatnonzero(~np.isfinite(x64).all(axis=1)):
            y[r] = np.where(nz, x64[r][None, :] * w, 0.0).sum(axis=1)
        for n in np.flatnonzero(~np.isfinite(w).all(axis=1)):
            y[:, n] = np.where(nz[n][None, :], x64 * w[n][None, :], 0.0).sum(axis=1)
        y32 = y.astype(np.float32)
    return y32.reshape(*x.shape[:-1], w.shape[0])


def _schema(spec: OpSpec) -> defs.OpSchema:
    P = defs.OpSchema.FormalParameter
    inputs = [P("X", "T", "activations [..., K]")]
    inputs += [P(name, ty, f"packed weight input {name!r}") for name, ty in spec.weight_inputs]
    schema = defs.OpSchema(
        spec.name,
        DOMAIN,
        VERSION,
        inputs=inputs,
        outputs=[P("Y", "T", "[..., N]")],
        type_constraints=[("T", ["tensor(float)"], "activations are float32")],
        doc=spec.doc + "\n\n" + SEMANTICS,
        attributes=[
            defs.OpSchema.Attribute(
                "plugin_namespace", defs.OpSchema.AttrType.STRING, "TensorRT plugin namespace", required=False
            ),
            defs.OpSchema.Attribute(
                "plugin_version", defs.OpSchema.AttrType.STRING, "TensorRT plugin version", required=False
            ),
            defs.OpSchema.Attribute(
                "aot",
                defs.OpSchema.AttrType.INT,
                "1: TensorRT's ONNX parser uses the plugin's ahead-of-time implementation",
                required=False,
            ),
            defs.OpSchema.Attribute(
                "accuracy_level",
                defs.OpSchema.AttrType.INT,
                "0 (default): exact float32 compute; 4: activations may be quantized to int8 per row "
                "(as MatMulNBits accuracy_level 4); the reference always computes in float32",
                required=False,
            ),
        ]
        + [
            defs.OpSchema.Attribute(a, defs.OpSchema.AttrType.INT, f"{a} (required)", required=True)
            for a in spec.attrs
        ],
    )
    return schema


#: ops written in other modules of this package (ops/_ffn.py: FusedFFN) add their schema factory
#: and reference-op-class factory here when imported (ops/__init__ imports them), so this module
#: never imports them back
EXTRA_SCHEMAS: list = []
EXTRA_REFERENCE_OPS: list = []


def register_schemas() -> None:
    """Register the domain's schemas with ``onnx.defs`` (idempotent)."""
    for spec in OPS.values():
        if not defs.has(spec.name, DOMAIN):
            defs.register_schema(_schema(spec))
    for make_schema in EXTRA_SCHEMAS:
        schema = make_schema()
        if not defs.has(schema.name, DOMAIN):
            defs.register_schema(schema)


def matmulnbits_reference(
    x: np.ndarray,
    b: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None = None,
    *,
    K: int,
    N: int,
    bits: int,
    block_size: int,
) -> np.ndarray:
    """``com.microsoft::MatMulNBits`` as this package emits it: the default zero point, or uint8
    ``zero_points`` packed like B ([N * ceil(n_blocks * bits / 8)], the asymmetric int4 grid)."""
    if zero_points is not None and zero_points.dtype != np.uint8:
        raise FormatError(
            f"the MatMulNBits reference reads uint8 (packed) zero_points, got {zero_points.dtype}"
        )
    w = packing.dequantize_matmulnbits(packing.NBits(b, scales, K, bits, block_size, zero_points))
    if w.shape[0] != N:
        raise FormatError(f"MatMulNBits N={N} does not match B with {w.shape[0]} rows")
    return (x.astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32)


def reference_ops(include_contrib: bool = False, domain: str = DOMAIN) -> list[type]:
    """The ops as ``onnx.reference.op_run.OpRun`` classes for ``ReferenceEvaluator(new_ops=...)``.

    ``include_contrib`` adds ``com.microsoft::MatMulNBits`` (int8 / int4 weights) and
    ``GatherBlockQuantized`` (int8 / int4 embedding tables);
    ``domain`` selects the node domain: ``ffsplit`` (the default, also that of ``--target
    tensorrt`` graphs) or ``trt.plugins`` for a graph rewritten by
    :func:`ffsplit_export.trt.onnx_nodes.set_plugin_domain`.
    """
    from onnx.reference.op_run import OpRun

    classes = []
    for spec in OPS.values():

        def _run(self, x, *weights, _name=spec.name, **attrs):
            return (reference_matmul(_name, x, *weights, **attrs),)

        classes.append(type(spec.name, (OpRun,), {"op_domain": domain, "_run": _run}))
    classes.extend(make_class(domain) for make_class in EXTRA_REFERENCE_OPS)
    if include_contrib:

        def _run_nbits(
            self,
            x,
            b,
            scales,
            zero_points=None,
            *rest,
            K=None,
            N=None,
            bits=None,
            block_size=None,
            accuracy_level=None,
        ):
            if rest and any(r is not None for r in rest):
                raise FormatError("the MatMulNBits reference supports no g_idx / bias inputs")
            y = matmulnbits_reference(x, b, scales, zero_points, K=K, N=N, bits=bits, block_size=block_size)
            return (y,)

        classes.append(type("MatMulNBits", (OpRun,), {"op_domain": "com.microsoft", "_run": _run_nbits}))
        classes.append(
            type(
                "GatherBlockQuantized",
                (OpRun,),
                {"op_domain": "com.microsoft", "_run": _run_gather_block_quantized},
            )
        )
    return classes


def gather_block_quantized_reference(
    data: np.ndarray,
    indices: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None = None,
    *,
    block_size: int = 128,
    bits: int = 4,
    gather_axis: int = 0,
    quantize_axis: int = 1,
) -> np.ndarray:
    """NumPy reference of ``com.microsoft::GatherBlockQuantized`` for the tables we export.

    ``data`` uint8 [V, ..., W] quantized along its last axis (``quantize_axis``): 8 bits (zero
    point 128 unless given) or 4 bits (two codes per byte, the even element in the low nibble, so
    the logical last axis is 2W; zero point 8 unless given, unpacked or packed like ``data``); rows
    gathered on axis 0; ``scales`` of the same rank, the last axis holding one scale per block of
    ``block_size``: ``out[i, ..., j] = (code[ids[i], ..., j] - zero_point) * scale[ids[i], ..., j // B]``.
    Our int4 / int8 tables are [V, D] (axis 1); a table shared with a tied lm_head is the
    MatMulNBits ``B`` [V, D/B, B/2] (axis 2, scales [V, D/B, 1]).
    """
    last = data.ndim - 1
    if (
        data.dtype != np.uint8
        or data.ndim < 2
        or bits not in (4, 8)
        or gather_axis != 0
        or quantize_axis not in (last, -1)
    ):
        raise FormatError(
            "the GatherBlockQuantized reference covers uint8 tables of 8 or 4 bits gathered on axis 0 "
            f"and quantized along the last axis (got {data.dtype} {data.shape}, bits={bits}, "
            f"gather_axis={gather_axis}, quantize_axis={quantize_axis})"
        )

    def unpack(a: np.ndarray) -> np.ndarray:
        if bits == 8:
            return a.astype(np.float32)
        return np.stack([a & 0x0F, a >> 4], axis=-1).reshape(*a.shape[:-1], -1).astype(np.float32)

    codes = unpack(data)
    width = codes.shape[-1]
    if scales.shape != (*codes.shape[:-1], width // block_size) or width % block_size:
        raise FormatError(
            f"GatherBlockQuantized scales {scales.shape} do not match a {codes.shape} table "
            f"in blocks of {block_size} along the last axis"
        )
    if zero_points is None:
        zp = np.float32(1 << (bits - 1))
    else:
        zp_blocks = (
            zero_points if zero_points.shape == scales.shape else unpack(zero_points)[..., : scales.shape[-1]]
        )
        zp = np.repeat(zp_blocks.astype(np.float32), block_size, axis=-1)
    table = (codes - zp) * np.repeat(scales.astype(np.float32), block_size, axis=-1)
    return table[np.asarray(indices, dtype=np.int64)].astype(scales.dtype)


def _run_gather_block_quantized(
    self, data, indices, scales, zero_points=None, gather_axis=0, quantize_axis=1, block_size=128, bits=4
):
    return (
        gather_block_quantized_reference(
            data,
            indices,
            scales,
            zero_points,
            block_size=block_size,
            bits=bits,
            gather_axis=gather_axis,
            quantize_axis=quantize_axis,
        ),
    )


# onnx.helper needs the opset import; keep one here for graph builders
OPSET = onnx.helper.make_opsetid(DOMAIN, VERSION)
