"""The parser-widened layout: TensorRT's ONNX parser converts every UINT8 initializer feeding a
plugin to INT32 element by element (onnx-tensorrt ModelImporter.cpp), which is what the plugin
receives when ONNX Runtime's TensorRT EP parses an unmodified export. The kernels read it with
an int32 pointer and element strides; checked here in the Triton interpreter against the
NumPy reference, on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

OPS = ["SparseMatMulInt8", "SparseMatMulFP32", "SparseMatMulInt4", "Sparse24MatMulInt8"]
INT4_GROUP = 16  # SparseMatMulInt4's group_size attribute in these cases
SHAPES = [(1, 33, 72), (5, 40, 200), (17, 24, 130)]  # (M, N, K); K not a multiple of 32 or 8
ATOL, RTOL = 1e-5, 1e-5  # fp32 accumulate vs float64 reference; measured <= 4e-6


def _weights(op_type, n, k, rng):
    from ffsplit_export.formats import packing

    w = rng.standard_normal((n, k)).astype(np.float32)
    if op_type == "Sparse24MatMulInt8":
        pad = (-k) % 4
        g = np.pad(w, ((0, 0), (0, pad))).reshape(n, -1, 4)
        np.put_along_axis(g, np.argsort(np.abs(g), axis=2)[:, :, :2], 0, axis=2)
        q, s = packing.quantize_int8_per_channel(g.reshape(n, -1)[:, :k].copy())
        p = packing.pack_nm24(q)
        return (p.values, p.meta, s)
    w[rng.random((n, k)) < 0.6] = 0
    if op_type == "SparseMatMulInt4":
        q, s = packing.quantize_sparse_int4(w, w != 0, INT4_GROUP)
        p = packing.pack_sparse_int4(q, w != 0, s, INT4_GROUP)
        return (p.mask, p.values, p.row_ptr, p.scales)
    if op_type == "SparseMatMulInt8":
        q, s = packing.quantize_int8_per_channel(w)
        p = packing.pack_bitmask(q)
        return (p.mask, p.values, p.row_ptr, s)
    p = packing.pack_bitmask(w)
    return (p.mask, p.values, p.row_ptr)


def _worker(op_type: str) -> None:
    import torch

    from ffsplit_export.ops import reference_matmul
    from ffsplit_export.trt.configs import CONFIGS
    from ffsplit_export.trt.kernels import launch
    from ffsplit_export.trt.layout import parser_widened

    rng = np.random.default_rng(7)
    attrs = {"group_size": INT4_GROUP} if op_type == "SparseMatMulInt4" else {}
    for m, n, k in SHAPES:
        weights = _weights(op_type, n, k, rng)
        wide = parser_widened(op_type, *weights)
        x = rng.standard_normal((m, k)).astype(np.float32)
        ref = reference_matmul(op_type, x, *weights, **attrs)
        for cfg in CONFIGS:
            y = launch(
                op_type,
                torch.from_numpy(x),
                *(torch.from_numpy(a) for a in wide),
                config=cfg,
                byte_elems="i32",
                **attrs,
            )
            err = float(np.abs(y.numpy() - ref).max())
            print(
                json.dumps(
                    {"case": f"{m}x{n}x{k}/{cfg.name}", "err": err, "ref_max": float(np.abs(ref).max())}
                )
            )


@pytest.mark.parametrize("op_type", OPS)
def test_widened_layout_matches_reference_in_interpreter(op_type):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), op_type],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from ffsplit_export.trt.configs import CONFIGS

    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(SHAPES) * len(CONFIGS)
    bad = [r for r in results if not r["err"] <= ATOL + RTOL * r["ref_max"]]
    assert not bad, bad[:5]


def test_parser_widened_and_specs():
    from ffsplit_export.errors import ConfigError, FormatError
    from ffsplit_export.trt.configs import all_specs, kernel_spec
    from ffsplit_export.trt.layout import parser_widened

    rng = np.random.default_rng(0)
    mask, values, row_ptr, s = _weights("SparseMatMulInt8", 6, 20, rng)
    wm, wv, wr, ws = parser_widened("SparseMatMulInt8", mask, values, row_ptr, s)
    assert wm.dtype == np.int32 and wm.shape == mask.shape and (wm == mask).all()
    assert wv is values or (wv.dtype == np.int8 and (wv == values).all())  # INT8 is not widened
    assert wr.dtype == np.int64 and ws.dtype == np.float32
    with pytest.raises(FormatError):
        parser_widened("MatMulNBits", mask)
    spec = kernel_spec("SparseMatMulInt8", "i64", "i32")
    assert spec.signature["mask_ptr"] == "*i32" and spec.variant == "row_ptr_i64_wide"
    assert kernel_spec("Sparse24MatMulInt8", byte_elems="i32").signature["meta_ptr"] == "*i32"
    assert kernel_spec("SparseMatMulFP32").signature["mask_ptr"] == "*u8"
    assert len({(sp.op_type, sp.variant) for sp in all_specs()}) == len(all_specs()) == 11
    # the nibble stream is UINT8 on disk, so the parser widens it like the mask
    wide4 = kernel_spec("SparseMatMulInt4", "i64", "i32").signature
    assert wide4["mask_ptr"] == wide4["values_ptr"] == "*i32"
    m4, v4, r4, s4 = parser_widened("SparseMatMulInt4", *_weights("SparseMatMulInt4", 6, 20, rng))
    assert m4.dtype == v4.dtype == np.int32 and r4.dtype == np.int64 and s4.dtype == np.float32
    with pytest.raises(ConfigError, match="byte_elems"):
        kernel_spec("SparseMatMulInt8", byte_elems="u16")


if __name__ == "__main__":
    _worker(sys.argv[1])
