"""Host-side view of packed weights for TensorRT: the same bytes as int32 tensors.

TensorRT restricts UINT8 tensors and treats INT8 as a quantized type, so the engine
builder hands the plugin every integer weight as INT32: byte arrays become int32 words
holding the same little-endian bytes (each row zero-padded to a multiple of 4 bytes) and
``row_ptr`` becomes int32 values. The kernels take row strides in bytes, so they read
either layout; nothing is re-ordered. Pure functions on NumPy arrays.
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatError

_INT32_MAX = np.iinfo(np.int32).max


def bytes_as_int32_rows(a: np.ndarray) -> np.ndarray:
    """[R, C] (or [C]) 1-byte array -> int32 [R, ceil(C/4)] (or [ceil(C/4)]), same bytes."""
    a = np.ascontiguousarray(a)
    if a.dtype.itemsize != 1:
        raise FormatError(f"expected a 1-byte dtype, got {a.dtype}")
    lead = a.shape[:-1]
    c = a.shape[-1] if a.ndim else 0
    words = -(-c // 4)
    padded = np.zeros((*lead, words * 4), np.uint8)
    padded[..., :c] = a.view(np.uint8)
    return padded.view("<i4").astype(np.int32, copy=False).reshape(*lead, words)


def row_ptr_as_int32(row_ptr: np.ndarray) -> np.ndarray:
    """int64 row offsets -> int32; refuses more than 2**31-1 stored values."""
    row_ptr = np.asarray(row_ptr)
    if row_ptr.size and (row_ptr.max() > _INT32_MAX or row_ptr.min() < 0):
        raise FormatError(
            f"row_ptr holds offsets up to {int(row_ptr.max())}, past int32; split the layer or "
            "keep the int64 on-disk layout (the plugin accepts both)"
        )
    return row_ptr.astype(np.int32)


def device_weights(op_type: str, *weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """The packed inputs of ``op_type`` in the TensorRT int32 view (scales unchanged)."""
    if op_type in ("SparseMatMulInt8", "SparseMatMulFP32"):
        mask, values, row_ptr, *rest = weights
        vals = bytes_as_int32_rows(values) if values.dtype.itemsize == 1 else values
        return (bytes_as_int32_rows(mask), vals, row_ptr_as_int32(row_ptr), *rest)
    if op_type == "SparseMatMulInt4":
        mask, values, row_ptr, scales = weights
        return (bytes_as_int32_rows(mask), bytes_as_int32_rows(values), row_ptr_as_int32(row_ptr), scales)
    if op_type == "Sparse24MatMulInt8":
        values, meta, scales = weights
        return (bytes_as_int32_rows(values), bytes_as_int32_rows(meta), scales)
    raise FormatError(f"unknown op {op_type!r}")


def parser_widened(op_type: str, *weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """The packed inputs as TensorRT's ONNX parser hands them to the plugin from an unmodified
    export (ONNX Runtime's TensorRT EP): every UINT8 array widened to INT32 element by element
    (onnx-tensorrt ``ModelImporter.cpp``), everything else unchanged. For tests and docs."""

    def widen(a):
        return a.astype(np.int32) if a.dtype == np.uint8 else a

    if op_type not in ("SparseMatMulInt8", "SparseMatMulFP32", "SparseMatMulInt4", "Sparse24MatMulInt8"):
        raise FormatError(f"unknown op {op_type!r}")
    return tuple(widen(np.asarray(a)) for a in weights)


def _graphs(graph):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.HasField("g"):
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def follow_identities(nodes, found: dict) -> dict:
    """Add to ``found`` (name -> value) the outputs of Identity nodes among ``nodes`` whose input
    is in it, through chains in any node order (how the exporter writes a weight it de-duplicated)."""
    changed = True
    while changed:
        changed = False
        for n in nodes:
            if n.op_type == "Identity" and n.input[0] in found and n.output[0] not in found:
                found[n.output[0]] = found[n.input[0]]
                changed = True
    return found


def prepare_model(model, plugin_ops=None) -> int:
    """Rewrite an ``onnx.ModelProto`` in place: constant integer inputs of plugin nodes (also
    inside If/Loop subgraphs, and initializers reached through Identity nodes, as the exporter
    writes weights it de-duplicated) in the on-disk layout become their int32 view. Idempotent;
    returns the number of nodes changed."""
    from onnx import numpy_helper

    from .configs import OP_TYPES

    ops = set(plugin_ops or OP_TYPES)
    graphs = list(_graphs(model.graph))
    owner = {t.name: (g, t) for g in graphs for t in g.initializer}
    follow_identities([n for g in graphs for n in g.node], owner)  # weights the exporter de-duplicated
    replaced: set[str] = set()
    changed = 0
    for graph in graphs:
        for node in graph.node:
            if node.op_type not in ops:
                continue
            names = list(node.input[1:])
            missing = [n for n in names if n not in owner]
            if missing:
                raise FormatError(
                    f"node {node.name or node.op_type}: packed weights must be initializers, missing {missing}"
                )
            arrays = [numpy_helper.to_array(owner[n][1]) for n in names]
            if all(a.dtype in (np.int32, np.float32) for a in arrays):
                continue  # already the int32 view
            new = device_weights(node.op_type, *arrays)
            for i, (name, arr) in enumerate(zip(names, new)):
                if arr is arrays[i]:
                    continue
                new_name = f"{name}__trt_i32"
                if new_name not in owner:
                    g = owner[name][0]
                    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), new_name))
                    owner[new_name] = (g, g.initializer[-1])
                node.input[i + 1] = new_name
                replaced.add(name)
            changed += 1
    used = {i for g in graphs for n in g.node for i in n.input} | {o.name for o in model.graph.output}
    for g in graphs:
        keep = [t for t in g.initializer if t.name not in replaced or t.name in used]
        if len(keep) != len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(keep)
    return changed
