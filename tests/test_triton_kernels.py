"""Triton kernels vs the NumPy reference, under the Triton interpreter on CPU.

TRITON_INTERPRET=1 must be set before triton is imported and would leak into every other
test of the process, so the cases run in a child process (this file run as a script)
that prints one JSON line per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

OPS = ("SparseMatMulInt8", "SparseMatMulFP32", "SparseMatMulInt4", "Sparse24MatMulInt8")

# Max abs error allowed: float32 accumulation in a different order than the float64
# reference. Measured max over all cases x configs x layouts: 3.8e-06 (|Y| up to 26, K up to 200).
ATOL = 1e-4
RTOL = 1e-5

# (M, N, K, sparsity): M from 1 to 64, odd sizes, K not a multiple of 8 or 4, sparsity 0 and 1
SHAPES = [
    (1, 37, 45, 0.5),
    (1, 8, 8, 0.0),
    (2, 33, 19, 1.0),
    (3, 64, 200, 0.9),
    (5, 70, 130, 0.7),
    (8, 17, 3, 0.3),
    (17, 33, 64, 0.0),
    (33, 40, 77, 0.5),
    (64, 65, 33, 0.6),
]
# SparseMatMulInt4 only: more rows than the kernel's row_ptr chunk (256), so the programs past the
# first chunk find their first group scale by summing over earlier chunks
INT4_SHAPES = [(2, 601, 40, 0.5)]


def _shapes(op_type: str):
    return SHAPES + (INT4_SHAPES if op_type == "SparseMatMulInt4" else [])


def _cases(op_type: str):
    """Yield (label, x, weights, attrs) with packed weights of random sparse matrices."""
    from ffsplit_export.formats import packing

    rng = np.random.default_rng(zlib.crc32(op_type.encode()))  # stable across processes, unlike hash()
    for i, (m, n, k, sp) in enumerate(_shapes(op_type)):
        w = rng.standard_normal((n, k)).astype(np.float32)
        attrs = {}
        if op_type == "Sparse24MatMulInt8":
            pad = (-k) % 4
            g = np.pad(w, ((0, 0), (0, pad))).reshape(n, -1, 4)
            drop = np.argsort(np.abs(g) + rng.random(g.shape), axis=2)[:, :, :2]  # keep 2 of 4
            np.put_along_axis(g, drop, 0, axis=2)
            w = g.reshape(n, -1)[:, :k].copy()
            w[rng.random((n, k)) < sp] = 0  # sparser than 2:4 is still 2:4
            q, s = packing.quantize_int8_per_channel(w)
            p = packing.pack_nm24(q)
            weights = (p.values, p.meta, s)
        else:
            w[rng.random((n, k)) < sp] = 0
            if op_type == "SparseMatMulInt4":
                attrs = {"group_size": (8, 32, 16)[i % 3]}  # short last groups, several per row
                q, s = packing.quantize_sparse_int4(w, w != 0, attrs["group_size"])
                p = packing.pack_sparse_int4(q, w != 0, s, attrs["group_size"])
                weights = (p.mask, p.values, p.row_ptr, p.scales)
            elif op_type == "SparseMatMulInt8":
                q, s = packing.quantize_int8_per_channel(w)
                p = packing.pack_bitmask(q)
                weights = (p.mask, p.values, p.row_ptr, s)
            else:
                p = packing.pack_bitmask(w)
                weights = (p.mask, p.values, p.row_ptr)
        x = rng.standard_normal((m, k)).astype(np.float32)
        yield f"M{m}_N{n}_K{k}_s{sp}", x, weights, attrs


def _worker(op_type: str) -> None:
    """Child process: run every case x tile config x layout and print JSON results."""
    import torch

    from ffsplit_export.ops import reference_matmul
    from ffsplit_export.trt.configs import CONFIGS
    from ffsplit_export.trt.kernels import launch
    from ffsplit_export.trt.layout import device_weights

    for label, x, weights, attrs in _cases(op_type):
        ref = reference_matmul(op_type, x, *weights, **attrs)
        layouts = {"disk": weights, "int32": device_weights(op_type, *weights)}
        for cfg in CONFIGS:
            for lname, ws in layouts.items():
                y = launch(
                    op_type,
                    torch.from_numpy(x),
                    *(torch.from_numpy(np.ascontiguousarray(a)) for a in ws),
                    config=cfg,
                    **attrs,
                )
                err = float(np.abs(y.numpy() - ref).max()) if ref.size else 0.0
                print(
                    json.dumps(
                        {
                            "case": f"{label}/{cfg.name}/{lname}",
                            "err": err,
                            "ref_max": float(np.abs(ref).max(initial=0)),
                        }
                    )
                )
        # batched X [B, T, K] takes the reshape path
        x3 = np.concatenate([x, x])[None]
        y3 = launch(op_type, torch.from_numpy(x3), *(torch.from_numpy(a) for a in weights), **attrs)
        err = float(np.abs(y3.numpy() - reference_matmul(op_type, x3, *weights, **attrs)).max())
        print(json.dumps({"case": f"{label}/3d", "err": err, "ref_max": float(np.abs(ref).max(initial=0))}))


@pytest.mark.parametrize("op_type", OPS)
def test_kernel_matches_reference_in_interpreter(op_type):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
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
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(_shapes(op_type)) * (1 + 2 * 4)
    bad = [r for r in results if r["err"] > ATOL + RTOL * r["ref_max"]]
    assert not bad, bad[:5]


def test_launch_rejects_bad_input():
    pytest.importorskip("triton")
    torch = pytest.importorskip("torch")
    from ffsplit_export.errors import ConfigError, FormatError
    from ffsplit_export.trt.kernels import launch

    with pytest.raises(FormatError):
        launch("SparseMatMulFP32", torch.zeros(2, 8, dtype=torch.float64))
    with pytest.raises(ConfigError):
        launch("MatMulNBits", torch.zeros(2, 8))
    u8 = torch.zeros(2, 1, dtype=torch.uint8)
    with pytest.raises(FormatError, match="group_size"):  # SparseMatMulInt4 needs its attribute
        launch("SparseMatMulInt4", torch.zeros(2, 8), u8, u8[0], torch.zeros(3, dtype=torch.int64),
               torch.zeros(0))  # fmt: skip


if __name__ == "__main__":
    _worker(sys.argv[1])
