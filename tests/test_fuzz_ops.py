"""Fuzz test of the ONNX Runtime custom-op library: hostile single-op models in subprocesses.

Seeded and reproducible: case ``i`` is built from ``numpy.random.default_rng([SEED, i])``. Each
case is one mutated single-op model (every input of every op: masks inconsistent with row_ptr /
values, non-monotonic or out-of-range row_ptr, truncated values, NaN / inf / zero / negative /
huge scales, wrong dtypes and ranks, empty and omitted inputs, missing and extra inputs, huge
dims, bad 2:4 metadata, X with a wrong last dim, rank 0 / 1 / 4, NaN / inf / huge X, M = 0,
weights as run-time inputs, bad accuracy_level). Every case runs on every ISA path this CPU has
(``FFSPLIT_ISA``) with X of M = 1 and M = 16 rows (plus the case's own X), in a worker
subprocess, many cases per worker; a worker that dies is re-run case by case to name the culprit.

Every run must be a clean error (an ONNX Runtime exception at session creation or at run) or
match :func:`ffsplit_export.ops.reference_matmul` under the contract's non-finite semantics
(:data:`ffsplit_export.ops.SEMANTICS`: same NaN / +inf / -inf positions, finite values within
float32 accumulation error, or the int8-activation error bound on the VNNI path). A model the
reference accepts must not be refused, and one it refuses must not run.

    python tests/test_fuzz_ops.py --worker 0 100   # run cases 0..99 here, one JSON line each
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

SEED = 16
N_CASES = 1200
N_CASES_SLOW = 4000
BATCH = 150
OPS = ("SparseMatMulInt8", "SparseMatMulFP32", "Sparse24MatMulInt8", "SparseMatMulInt4")
ISAS = ("scalar", "avx2", "avx512", "avx512vbmi2", "avx512vnni")
WEIGHTS = {  # name, ONNX type, numpy dtype
    "SparseMatMulInt8": (
        ("mask", TensorProto.UINT8, np.uint8),
        ("values", TensorProto.INT8, np.int8),
        ("row_ptr", TensorProto.INT64, np.int64),
        ("scales", TensorProto.FLOAT, np.float32),
    ),
    "SparseMatMulFP32": (
        ("mask", TensorProto.UINT8, np.uint8),
        ("values", TensorProto.FLOAT, np.float32),
        ("row_ptr", TensorProto.INT64, np.int64),
    ),
    "Sparse24MatMulInt8": (
        ("values", TensorProto.INT8, np.int8),
        ("meta", TensorProto.UINT8, np.uint8),
        ("scales", TensorProto.FLOAT, np.float32),
    ),
    "SparseMatMulInt4": (
        ("mask", TensorProto.UINT8, np.uint8),
        ("values", TensorProto.UINT8, np.uint8),
        ("row_ptr", TensorProto.INT64, np.int64),
        ("scales", TensorProto.FLOAT, np.float32),
    ),
}
_INT4 = "SparseMatMulInt4"
_SCALED = ("SparseMatMulInt8", "Sparse24MatMulInt8", _INT4)  # ops with a scales input
_BITMASK = ("SparseMatMulInt8", "SparseMatMulFP32", _INT4)  # ops with mask + row_ptr
_NP2ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64,
}
BIG = 2**63 - 1


# ----------------------------------------------------------------------------- case generation

MUTATIONS = (
    # (name, ops it applies to or None for all)
    ("valid", None),
    ("valid_dense", None),
    ("valid_empty_rows", None),
    ("x_nan", None),
    ("x_inf", None),
    ("x_nan_inf_mix", None),
    ("x_huge", None),
    ("m0", None),
    ("x_wrong_k", None),
    ("x_rank0", None),
    ("x_rank1", None),
    ("x_rank4", None),
    ("x_wrong_dtype", None),
    ("scale_nan", _SCALED),
    ("scale_inf", _SCALED),
    ("scale_zero", _SCALED),
    ("scale_negative", _SCALED),
    ("scale_huge", _SCALED),
    ("scale_denormal", _SCALED),
    ("value_nonfinite", ("SparseMatMulFP32",)),
    ("value_huge", ("SparseMatMulFP32",)),
    ("mask_flip_bit", _BITMASK),
    ("mask_bits_past_k", _BITMASK),
    ("mask_wrong_cols", _BITMASK),
    ("row_ptr_nonmonotonic", _BITMASK),
    ("row_ptr_out_of_range", _BITMASK),
    ("row_ptr_negative", _BITMASK),
    ("row_ptr_first_nonzero", _BITMASK),
    ("row_ptr_wrong_len", _BITMASK),
    ("values_truncated", None),
    ("values_extra", _BITMASK),
    ("meta_bad_order", ("Sparse24MatMulInt8",)),
    ("meta_high_nibble", ("Sparse24MatMulInt8",)),
    ("meta_wrong_shape", ("Sparse24MatMulInt8",)),
    ("values_odd_cols", ("Sparse24MatMulInt8",)),
    ("values_padded_nonzero", ("Sparse24MatMulInt8",)),
    ("n0", None),
    ("k0", None),
    ("wrong_dtype", None),
    ("wrong_rank", None),
    ("empty_input", None),
    ("omitted_input", None),
    ("missing_inputs", None),
    ("extra_input", None),
    ("huge_dims", None),
    ("huge_dims_input", None),
    ("x_huge_k", None),
    ("scales_wrong_len", _SCALED),
    ("accuracy_level_bad", None),
    ("as_inputs_valid", None),
    ("as_inputs_malformed", None),
    ("group_size_bad", (_INT4,)),
    ("nibble_pad_set", (_INT4,)),
    ("zero_codes", (_INT4,)),
)


def _packed(
    op: str,
    rng: np.random.Generator,
    n: int,
    k: int,
    density: float,
    dense: bool = False,
    group_size: int = 8,
):
    from ffsplit_export.formats import packing

    w = rng.standard_normal((n, k)).astype(np.float32)
    if op == "Sparse24MatMulInt8":
        g = -(-k // 4)
        keep = np.zeros((n, g * 4), bool)
        rank = rng.random((n, g, 4)).argsort(axis=2)
        keep.reshape(n, g, 4)[...] = rank < 2
        keep = keep[:, :k]
    else:
        keep = np.ones((n, k), bool) if dense else rng.random((n, k)) < density
    w = np.where(keep, w, 0.0).astype(np.float32)
    if op == "SparseMatMulFP32":
        p = packing.pack_bitmask(w, keep)
        return [p.mask, p.values, p.row_ptr]
    if op == _INT4:
        q4, s4 = packing.quantize_sparse_int4(w, keep, group_size)
        p4 = packing.pack_sparse_int4(q4, keep, s4, group_size)
        return [p4.mask, p4.values, p4.row_ptr, p4.scales]
    q, scales = packing.quantize_int8_per_channel(w)
    if op == "SparseMatMulInt8":
        p = packing.pack_bitmask(q, keep)  # keeps codes that rounded to 0
        return [p.mask, p.values, p.row_ptr, scales]
    p24 = packing.pack_nm24(q)
    return [p24.values, p24.meta, scales]


def _x(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    return rng.standard_normal((m, k)).astype(np.float32)


def make_case(i: int) -> dict:
    """Case ``i``: op, weights (list; None = omitted), graph layout, attributes and the Xs to run."""
    rng = np.random.default_rng([SEED, i])
    mutation, ops = MUTATIONS[i % len(MUTATIONS)]
    op = OPS[(i // len(MUTATIONS)) % len(OPS)] if ops is None else ops[(i // len(MUTATIONS)) % len(ops)]
    k = int(rng.choice([1, 3, 8, 13, 37, 64, 65, 100, 130]))
    n = int(rng.integers(1, 24))
    density = float(rng.choice([0.0, 0.1, 0.5, 0.9]))
    specs = WEIGHTS[op]
    names = [s[0] for s in specs]
    gs = int(rng.choice([8, 16, 32]))
    weights = _packed(op, rng, n, k, density, dense=mutation == "valid_dense", group_size=gs)
    case = {
        "i": i,
        "op": op,
        "mutation": mutation,
        "k": k,
        "weights": weights,
        "input_names": list(names),
        "as_inputs": False,
        "x_shape": ["m", k],
        "attrs": {},
        "xs": [_x(rng, 1, k), _x(rng, 16, k)],
    }
    if op == _INT4:
        case["attrs"]["group_size"] = gs
    if op != "SparseMatMulFP32" and rng.random() < 0.35:
        case["attrs"]["accuracy_level"] = 4
    if rng.random() < 0.3:
        case["x_shape"] = None  # K unknown until run time

    def widx(name: str) -> int:
        return names.index(name)

    def nonfinite_rows(xs, kinds):
        for x in xs:
            for r in range(x.shape[0]):
                if rng.random() < 0.6:
                    cols = rng.integers(0, k, size=int(rng.integers(1, 3)))
                    x[r, cols] = rng.choice(kinds, size=cols.size)

    if mutation == "valid_empty_rows":
        # N rows with nothing stored: zero the whole weight
        if op == "Sparse24MatMulInt8":
            weights[0][::2] = 0
        elif op == _INT4:
            w0 = rng.standard_normal((n, k)).astype(np.float32)
            keep = rng.random((n, k)) < max(density, 0.5)
            keep[::2] = False
            from ffsplit_export.formats import packing

            q4, s4 = packing.quantize_sparse_int4(w0, keep, gs)
            p4 = packing.pack_sparse_int4(q4, keep, s4, gs)
            case["weights"] = weights = [p4.mask, p4.values, p4.row_ptr, p4.scales]
        else:
            from ffsplit_export.formats import packing

            m_, v_, rp_ = weights[0], weights[1], weights[2]
            dense = packing.unpack_bitmask(packing.BitmaskSparse(m_, v_, rp_, k))
            dense[::2] = 0
            p = packing.pack_bitmask(dense, dense != 0)
            weights[0], weights[1], weights[2] = p.mask, p.values, p.row_ptr
    elif mutation == "x_nan":
        nonfinite_rows(case["xs"], [np.nan])
    elif mutation == "x_inf":
        nonfinite_rows(case["xs"], [np.inf, -np.inf])
    elif mutation == "x_nan_inf_mix":
        nonfinite_rows(case["xs"], [np.nan, np.inf, -np.inf])
    elif mutation == "x_huge":
        for x in case["xs"]:
            for r in range(x.shape[0]):
                x[r, rng.integers(0, k)] = rng.choice([-1.0, 1.0]) * 10.0 ** rng.uniform(36, 38.5)
    elif mutation == "m0":
        case["xs"] = [np.zeros((0, k), np.float32), np.zeros((0, 3, k), np.float32)]
        case["x_shape"] = None
    elif mutation == "x_wrong_k":
        kk = int(rng.choice([k - 1, k + 1, k + 8, 0])) if k > 1 else k + 8
        case["xs"] = [_x(rng, 1, kk), _x(rng, 16, kk)]
        case["x_shape"] = None
    elif mutation == "x_rank0":
        case["xs"] = [np.array(1.5, np.float32)]
        case["x_shape"] = None
    elif mutation == "x_rank1":
        case["xs"] = [rng.standard_normal(k).astype(np.float32)]
        case["x_shape"] = None
    elif mutation == "x_rank4":
        case["xs"] = [rng.standard_normal((2, 1, 3, k)).astype(np.float32)]
        case["x_shape"] = None
    elif mutation == "x_wrong_dtype":
        case["xs"] = [x.astype(np.float16) for x in case["xs"]]
        case["x_dtype"] = TensorProto.FLOAT16
    elif mutation.startswith("scale_"):
        s = weights[widx("scales")]
        rows = rng.random(s.shape[0]) < 0.5
        if s.shape[0]:  # int4 with nothing kept has no scales
            rows[rng.integers(0, s.shape[0])] = True
        val = {
            "scale_nan": np.nan,
            "scale_inf": float(rng.choice([np.inf, -np.inf])),
            "scale_zero": 0.0,
            "scale_negative": -0.02,
            "scale_huge": 3e37,
            "scale_denormal": 1e-43,
        }[mutation]
        s[rows] = val
        if mutation == "scale_zero" and rng.random() < 0.5:
            nonfinite_rows(case["xs"], [np.inf])
    elif mutation in ("value_nonfinite", "value_huge"):
        v = weights[1]
        if v.size:
            idx = rng.integers(0, v.size, size=max(1, v.size // 8))
            v[idx] = rng.choice(
                [np.nan, np.inf, -np.inf] if mutation == "value_nonfinite" else [3e38, -3e38], idx.size
            )
    elif mutation == "mask_flip_bit":
        mask = weights[0]
        if mask.size:
            r, c = int(rng.integers(0, mask.shape[0])), int(rng.integers(0, k))
            mask[r, c // 8] ^= np.uint8(1 << (c % 8))
    elif mutation == "mask_bits_past_k":
        mask = weights[0]
        if k % 8:
            mask[int(rng.integers(0, mask.shape[0])), -1] |= np.uint8(0x80)
        else:
            weights[0] = np.concatenate([mask, np.full((mask.shape[0], 1), 1, np.uint8)], axis=1)
    elif mutation == "mask_wrong_cols":
        weights[0] = weights[0][:, :-1] if weights[0].shape[1] > 1 else np.zeros((n, 3), np.uint8)
    elif mutation.startswith("row_ptr_"):
        rp = weights[2]
        if mutation == "row_ptr_nonmonotonic":
            if n >= 2:
                rp[1], rp[2] = rp[2] + 1, rp[1]
            else:
                rp[1] = -1
        elif mutation == "row_ptr_out_of_range":
            rp[int(rng.integers(1, n + 1))] = int(rng.choice([BIG, 2**40, rp[-1] + 1000]))
        elif mutation == "row_ptr_negative":
            rp[int(rng.integers(0, n + 1))] = -int(rng.choice([1, 2**62]))
        elif mutation == "row_ptr_first_nonzero":
            rp[0] = 1
        else:
            weights[2] = rp[:-1] if rng.random() < 0.5 else np.concatenate([rp, rp[-1:]])
    elif mutation == "values_truncated":
        v = weights[widx("values")]
        if op == "Sparse24MatMulInt8":
            weights[0] = v[:, :-2] if v.shape[1] >= 2 else v[:0]
        else:
            weights[1] = v[: max(0, v.size - int(rng.integers(1, 9)))]
    elif mutation == "values_extra":
        v = weights[1]
        weights[1] = np.concatenate([v, np.ones(3, v.dtype)])
    elif mutation == "meta_bad_order":
        meta = weights[1]
        meta[int(rng.integers(0, n)), 0] = np.uint8(
            rng.choice([0x00, 0x05, 0x0F, 0x03 | 0x30]) & (0x0F if -(-k // 4) == 1 else 0xFF)
        )
        if -(-k // 4) == 1 and (meta[:, 0] & 0x0F == 0x0E).all():
            meta[0, 0] = 0
    elif mutation == "meta_high_nibble":
        g = -(-k // 4)
        if g % 2:
            weights[1][int(rng.integers(0, n)), -1] |= np.uint8(0x40)
        else:
            weights[1] = np.concatenate([weights[1], np.full((n, 1), 0x0E, np.uint8)], axis=1)
    elif mutation == "meta_wrong_shape":
        weights[1] = weights[1][:-1] if rng.random() < 0.5 else weights[1].reshape(-1)
    elif mutation == "values_odd_cols":
        weights[0] = np.concatenate([weights[0], np.zeros((n, 1), np.int8)], axis=1)
    elif mutation == "values_padded_nonzero":
        if k % 4:
            # a value whose meta index points past K
            weights[1][:, -1] = np.uint8(0x0E) if -(-k // 4) % 2 else (weights[1][:, -1] & 0x0F) | 0xE0
            weights[0][:, -1] = 5
        else:
            weights[0] = np.concatenate([weights[0], np.full((n, 2), 3, np.int8)], axis=1)
    elif mutation == "n0":
        from ffsplit_export.formats import packing

        if op == "SparseMatMulFP32":
            p = packing.pack_bitmask(np.zeros((0, k), np.float32))
            case["weights"] = weights = [p.mask, p.values, p.row_ptr]
        elif op == _INT4:
            p = packing.pack_bitmask(np.zeros((0, k), np.int8))
            case["weights"] = weights = [p.mask, np.zeros(0, np.uint8), p.row_ptr, np.zeros(0, np.float32)]
        elif op == "SparseMatMulInt8":
            p = packing.pack_bitmask(np.zeros((0, k), np.int8))
            case["weights"] = weights = [p.mask, p.values, p.row_ptr, np.zeros(0, np.float32)]
        else:
            g = -(-k // 4)
            case["weights"] = weights = [
                np.zeros((0, 2 * g), np.int8),
                np.zeros((0, -(-g // 2)), np.uint8),
                np.zeros(0, np.float32),
            ]
    elif mutation == "k0":
        case["k"] = 0
        case["weights"] = weights = _packed(op, rng, n, 0, 0.5, group_size=gs)
        case["xs"] = [np.zeros((1, 0), np.float32), np.zeros((16, 0), np.float32)]
        case["x_shape"] = ["m", 0]
    elif mutation == "wrong_dtype":
        j = int(rng.integers(0, len(weights)))
        alt = [
            d
            for d in (np.float32, np.float64, np.int8, np.uint8, np.int32, np.int64, np.float16)
            if d != specs[j][2]
        ]
        weights[j] = weights[j].astype(alt[int(rng.integers(0, len(alt)))])
    elif mutation == "wrong_rank":
        j = int(rng.integers(0, len(weights)))
        a = weights[j]
        choice = int(rng.integers(0, 3))
        weights[j] = (
            a.reshape(-1)
            if (choice == 0 and a.ndim == 2)
            else (
                a.reshape(1, *a.shape)
                if choice < 2
                else np.asarray(a.reshape(-1)[:1].reshape(()) if a.size else np.zeros((), a.dtype))
            )
        )
    elif mutation == "empty_input":
        j = int(rng.integers(0, len(weights)))
        weights[j] = np.zeros((0,) * weights[j].ndim, weights[j].dtype)
    elif mutation == "omitted_input":
        j = int(rng.integers(0, len(weights) + 1))
        if j == len(weights):
            case["omit_x"] = True
        else:
            weights[j] = None
    elif mutation == "missing_inputs":
        drop = int(rng.integers(1, len(weights) + 1))
        del weights[len(weights) - drop :]
    elif mutation == "extra_input":
        weights.append(np.ones(3, np.float32))
        case["input_names"].append("extra")
    elif mutation == "huge_dims":
        j = int(rng.integers(0, len(weights)))
        a = weights[j]
        if a.ndim == 1:
            shape = [BIG]  # dims that the (empty) data cannot fill
        elif rng.random() < 0.5:
            shape = [BIG, 0]
        else:
            shape = [0, BIG]
        weights[j] = np.zeros([0] * len(shape), a.dtype)
        case["huge_shape"] = (j, shape)
    elif mutation == "huge_dims_input":
        # a run-time weight of zero elements whose other dim is near 2^63 (N + 1, K overflow)
        case["as_inputs"] = True
        j = int(rng.integers(0, len(weights)))
        a = weights[j]
        big = BIG // a.itemsize
        shape = [big] if a.ndim == 1 else ([big, 0] if rng.random() < 0.5 else [0, big])
        if a.ndim == 1:
            shape = [0]  # a 1-D input cannot be huge and empty; make the 2-D ones huge instead
            j2 = next(jj for jj, w in enumerate(weights) if w.ndim == 2)
            j, a = j2, weights[j2]
            shape = [BIG // a.itemsize, 0]
        weights[j] = np.zeros(shape, a.dtype)
    elif mutation == "x_huge_k":
        case["xs"] = [np.zeros((0, (2**63 - 1) // 4), np.float32), np.zeros((0, 0, 2**40), np.float32)]
        case["x_shape"] = None
    elif mutation == "scales_wrong_len":
        s = weights[widx("scales")]
        weights[widx("scales")] = s[:-1] if rng.random() < 0.5 else np.concatenate([s, s[:1]])
    elif mutation == "accuracy_level_bad":
        case["attrs"]["accuracy_level"] = int(rng.choice([-1, 5, 1 << 40]))
    elif mutation == "group_size_bad":
        bad = rng.choice([None, 0, 4, 7, -8, 1 << 40])
        if bad is None:
            del case["attrs"]["group_size"]
        else:
            case["attrs"]["group_size"] = int(bad)
    elif mutation == "nibble_pad_set":
        v = weights[1]
        if int(weights[2][-1]) % 2:
            v[-1] |= np.uint8(0x10 << int(rng.integers(0, 4)))
        else:
            weights[1] = np.concatenate([v, np.zeros(1, np.uint8)])  # one byte too many
    elif mutation == "zero_codes":
        # stored zero codes (and the nibble -8): structural zeros / the most negative code
        v = weights[1]
        if v.size:
            idx = rng.integers(0, v.size, size=max(1, v.size // 4))
            v[idx] = rng.choice([0x00, 0x80, 0x08, 0x88], idx.size).astype(np.uint8)
            if int(weights[2][-1]) % 2:
                v[-1] &= np.uint8(0x0F)
            nonfinite_rows(case["xs"], [np.nan, np.inf])
    elif mutation == "as_inputs_valid":
        case["as_inputs"] = True
    elif mutation == "as_inputs_malformed":
        case["as_inputs"] = True
        j = int(rng.integers(0, len(weights)))
        a = weights[j]
        if a.size:
            flat = a.reshape(-1).copy()
            flat[int(rng.integers(0, flat.size))] = (
                np.array(rng.integers(-128, 127)).astype(a.dtype) if a.dtype.kind in "iu" else np.nan
            )
            weights[j] = flat.reshape(a.shape)
        else:
            weights[j] = np.ones(1, a.dtype)
    return case


def _tensor(name: str, a: np.ndarray, huge_shape=None):
    t = numpy_helper.from_array(np.array(a, order="C"), name)  # keeps 0-d (ascontiguousarray would not)
    if huge_shape is not None:
        # a zero-element tensor whose dims say 2^63 - 1: dims alone, no data
        del t.dims[:]
        t.dims.extend(huge_shape)
    return t


def build_model(case: dict) -> bytes:
    from ffsplit_export.ops import DOMAIN, VERSION

    x_type = case.get("x_dtype", TensorProto.FLOAT)
    inputs = [helper.make_tensor_value_info("X", x_type, case["x_shape"])]
    inits = []
    node_inputs = ["" if case.get("omit_x") else "X"]
    huge = case.get("huge_shape")
    for j, (name, arr) in enumerate(zip(case["input_names"], case["weights"])):
        if arr is None:
            node_inputs.append("")
            continue
        node_inputs.append(name)
        if case["as_inputs"]:
            inputs.append(helper.make_tensor_value_info(name, _NP2ONNX[arr.dtype], list(arr.shape)))
        else:
            inits.append(_tensor(name, arr, huge[1] if huge and huge[0] == j else None))
    node = helper.make_node(case["op"], node_inputs, ["Y"], domain=DOMAIN, name="fuzz", **case["attrs"])
    graph = helper.make_graph(
        [node],
        "fuzz",
        inputs,
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, VERSION)]
    )
    model.ir_version = 10
    return model.SerializeToString()


# ----------------------------------------------------------------------------- checking


def _reference(case: dict, x: np.ndarray):
    """(y, None) or (None, why) when the op contract rejects the inputs."""
    from ffsplit_export.errors import FormatError
    from ffsplit_export.ops import reference_matmul

    if case.get("omit_x") or len(case["weights"]) != len(WEIGHTS[case["op"]]):
        return None, "input count"
    if case.get("huge_shape") is not None:
        return None, "huge dims"
    level = case["attrs"].get("accuracy_level", 0)
    if not 0 <= level <= 4:
        return None, "accuracy_level"
    try:
        return reference_matmul(case["op"], x, *case["weights"], **case["attrs"]), None
    except FormatError as e:
        return None, str(e)


def _bound(case: dict, x: np.ndarray, approx: bool) -> np.ndarray:
    """Allowed |y - ref| per output: float32 accumulation (and int8 activation rounding)."""
    from ffsplit_export.ops._spec import OPS, _scaled

    k = x.shape[-1]
    spec = OPS[case["op"]]
    codes, scales = spec.terms(k, *case["weights"], **{a: case["attrs"][a] for a in spec.attrs})
    w = np.abs(_scaled(codes, scales, np.float64))
    m = int(np.prod(x.shape[:-1], dtype=np.int64))
    x64 = np.abs(x.reshape(m, k).astype(np.float64))
    with np.errstate(all="ignore"):
        l1 = np.nan_to_num(x64, posinf=0.0) @ np.nan_to_num(w, posinf=0.0).T
        bound = (2e-7 * (k + 4)) * l1 + 1e-44
        if approx:
            xs = x64.max(axis=1, initial=0.0) / 127.0
            bound += 0.51 * xs[:, None] * w.sum(axis=1)[None, :] + 1e-6 * l1
    return bound.reshape(*x.shape[:-1], w.shape[0])


def _compare(case: dict, isa: str, x: np.ndarray, y: np.ndarray, ref: np.ndarray) -> str | None:
    if y.shape != ref.shape or y.dtype != np.float32:
        return f"shape/dtype {y.shape} {y.dtype} != {ref.shape} float32"
    approx = isa == "avx512vnni" and case["op"] not in ("SparseMatMulFP32", _INT4)
    bound = _bound(case, x, approx)
    # int8 activations may round a result near float32's largest value to the other side of
    # overflow: an inf against a same-signed finite value within the error bound of it is allowed
    near = np.zeros(ref.shape, bool)
    if approx:
        top = float(np.finfo(np.float32).max)
        with np.errstate(invalid="ignore", over="ignore"):
            y64, r64 = y.astype(np.float64), ref.astype(np.float64)
            reach = lambda v: np.abs(v) + bound >= top  # noqa: E731
            near = (np.sign(y64) == np.sign(r64)) & (
                (np.isinf(r64) & np.isfinite(y64) & reach(y64)) | (np.isinf(y64) & np.isfinite(r64) & reach(r64))
            )
    for what, f in (("NaN", np.isnan), ("+inf", lambda a: a == np.inf), ("-inf", lambda a: a == -np.inf)):
        if ((f(y) != f(ref)) & ~near).any():
            at = np.argwhere((f(y) != f(ref)) & ~near)[0]
            return f"{what} positions differ at {tuple(at)}: y={y[tuple(at)]} ref={ref[tuple(at)]}"
    fin = np.isfinite(ref) & np.isfinite(y)
    with np.errstate(all="ignore"):
        diff = np.abs(y.astype(np.float64) - ref.astype(np.float64))
        bad = fin & (diff > bound + 1e-6 * np.abs(ref))
    if bad.any():
        at = tuple(np.argwhere(bad)[0])
        return f"value differs at {at}: y={y[at]!r} ref={ref[at]!r} bound={bound[at]:.3g}"
    return None


def run_case(i: int, isas: list[str]) -> dict:
    """All runs of case ``i`` in this process: outcome per (isa, x)."""
    import onnxruntime as ort

    from ffsplit_export.runtime._plugin import session_options

    case = make_case(i)
    model = build_model(case)
    out = {"i": i, "op": case["op"], "mutation": case["mutation"], "runs": []}
    for isa in isas:
        os.environ["FFSPLIT_ISA"] = isa  # read when the kernel is created
        so = session_options(intra_op_num_threads=1, log_severity_level=4)
        try:
            sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # an ONNX Runtime error raised as a Python exception: clean
            msg = str(e).splitlines()[0][:300]
            ref_ok = (
                all(_reference(case, x)[0] is not None for x in case["xs"])
                if "FFSPLIT_ISA" not in msg
                else False
            )
            out["runs"].append(
                {"isa": isa, "outcome": "error_ref_accepts" if ref_ok else "create_error", "msg": msg}
            )
            continue
        for xi, x in enumerate(case["xs"]):
            feeds = {} if case.get("omit_x") else {"X": x}
            if case["as_inputs"]:
                feeds.update({nm: a for nm, a in zip(case["input_names"], case["weights"]) if a is not None})
            ref, why = _reference(case, x)
            try:
                (y,) = sess.run(None, feeds)
            except Exception as e:
                msg = str(e).splitlines()[0][:300]
                out["runs"].append(
                    {
                        "isa": isa,
                        "x": xi,
                        "outcome": "error_ref_accepts" if ref is not None else "run_error",
                        "msg": msg,
                    }
                )
                continue
            if ref is None:
                out["runs"].append({"isa": isa, "x": xi, "outcome": "ran_ref_rejects", "msg": why[:300]})
                continue
            err = _compare(case, isa, x, y, ref)
            out["runs"].append(
                {"isa": isa, "x": xi, "outcome": "mismatch" if err else "match", "msg": err or ""}
            )
    return out


def _isas() -> list[str]:
    """ISA paths this CPU has (the library refuses the others at session creation)."""
    env = dict(os.environ)
    probe = [sys.executable, __file__, "--isas"]
    res = subprocess.run(probe, capture_output=True, text=True, timeout=120, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _worker_isas() -> list[str]:
    import onnxruntime as ort

    from ffsplit_export.runtime._plugin import session_options

    ok = []
    model = build_model(make_case(0))
    for isa in ISAS:
        os.environ["FFSPLIT_ISA"] = isa
        try:
            ort.InferenceSession(
                model, session_options(log_severity_level=4), providers=["CPUExecutionProvider"]
            )
            ok.append(isa)
        except Exception as e:
            if "not supported by this CPU" not in str(e):
                raise
    return ok


# ----------------------------------------------------------------------------- driver


def _worker(indices: list[int], isas: list[str]) -> tuple[int, dict[int, dict], str]:
    cmd = [sys.executable, __file__, "--worker", ",".join(map(str, indices)), ",".join(isas)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    done = {}
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            done[rec["i"]] = rec
    err = res.stderr
    at = min(
        (err.find(t) for t in ("runtime error", "ERROR: AddressSanitizer", "Fatal Python") if t in err),
        default=-1,
    )
    return res.returncode, done, err[at : at + 600] if at >= 0 else err[-600:]


def _run_batch(indices: list[int], isas: list[str]) -> list[dict]:
    """Run cases in one worker; if it dies, re-run the first unreported case alone (the culprit)
    and go on with the rest of the batch in a fresh worker."""
    out: list[dict] = []
    rest = list(indices)
    while rest:
        rc, done, err = _worker(rest, isas)
        out += done.values()
        missing = [i for i in rest if i not in done]
        if rc == 0 and not missing:
            break
        if not missing:  # died after its last case: nothing to attribute
            out.append(
                {"i": -1, "op": "?", "mutation": "?", "runs": [{"isa": "", "outcome": "crash", "msg": err}]}
            )
            break
        culprit, rest = missing[0], missing[1:]
        rc1, done1, err1 = _worker([culprit], isas)
        if rc1 == 0 and culprit in done1:
            out.append(done1[culprit])  # did not reproduce alone
        else:
            mutation = MUTATIONS[culprit % len(MUTATIONS)][0]
            out.append(
                {
                    "i": culprit,
                    "op": "?",
                    "mutation": mutation,
                    "runs": [{"isa": ",".join(isas), "outcome": "crash", "msg": f"exit {rc1}: {err1}"}],
                }
            )
    return out


def fuzz(n_cases: int, workers: int = 2) -> tuple[collections.Counter, list[dict]]:
    isas = _isas()
    batches = [list(range(s, min(n_cases, s + BATCH))) for s in range(0, n_cases, BATCH)]
    with ThreadPoolExecutor(workers) as pool:
        results = [r for rs in pool.map(lambda b: _run_batch(b, isas), batches) for r in rs]
    counts = collections.Counter(run["outcome"] for r in results for run in r["runs"])
    bad = [
        {"i": r["i"], "op": r["op"], "mutation": r["mutation"], **run}
        for r in results
        for run in r["runs"]
        if run["outcome"] not in ("create_error", "run_error", "match")
    ]
    return counts, bad, isas, results


def _check(n_cases: int) -> None:
    pytest.importorskip("onnxruntime")
    from ffsplit_export.errors import PluginNotFoundError
    from ffsplit_export.runtime._plugin import plugin_path

    try:
        plugin_path()
    except PluginNotFoundError as e:
        pytest.skip(f"ffsplit ORT library not built: {e}")
    counts, bad, isas, results = fuzz(n_cases)
    models = len(results)
    by_mutation = collections.Counter(r["mutation"] for r in results)
    print(f"\nfuzz: {models} models, ISA paths {isas}, outcomes {dict(counts)}")
    print(f"fuzz: mutations {dict(by_mutation)}")
    assert models == n_cases
    assert counts["match"] > 0 and counts["create_error"] > 0 and counts["run_error"] > 0
    assert not bad, f"{len(bad)} runs neither a clean error nor a reference match, e.g. {bad[:5]}"


def test_fuzz_ops():
    """>= 1,000 mutated single-op models: every run a clean error or a match with the reference."""
    _check(N_CASES)


@pytest.mark.slow
def test_fuzz_ops_sweep():
    """The larger sweep: more seeds per mutation (different shapes, densities, positions)."""
    _check(N_CASES_SLOW)


if __name__ == "__main__":
    if sys.argv[1] == "--isas":
        print(json.dumps(_worker_isas()))
    elif sys.argv[1] == "--worker":
        idx = [int(s) for s in sys.argv[2].split(",") if s]
        isas = sys.argv[3].split(",")
        for i in idx:
            print(json.dumps(run_case(i, isas)), flush=True)
    elif sys.argv[1] == "--show":
        print(make_case(int(sys.argv[2])))
