"""Per-layer kernel benchmark of the ffsplit ONNX Runtime ops (sparse-int8, 2:4, sparse-int4 with
group_size 32) against dense fp32 MatMul and
MatMulNBits (int8 / int4, block 128, accuracy_level 4), in one process.

Shapes: an FFN of d_model x d_ff (default 4096 x 16384): up [d_ff, d_model] and down
[d_model, d_ff]. For each layer and M, all variants run interleaved (A B A B ...) and the
median of ``--repeats`` runs is reported. For M=1 the last-level cache is flushed before every
timed run (a >= 1 GiB read, which is also the memory-bandwidth measurement), so decoding is
measured from DRAM as in a model whose weights do not fit in cache. The machine is shared and
small: numbers are noisy, read the medians.

    python samples/bench_kernels.py --output bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ffsplit_export.formats import packing
from ffsplit_export.ops import DOMAIN, VERSION
from ffsplit_export.runtime._plugin import plugin_path, session_options


def _model(nodes, inits, k: int) -> bytes:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", k])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "bench", [x], [y], initializer=inits)
    m = helper.make_model(
        g,
        opset_imports=[
            helper.make_opsetid("", 17),
            helper.make_opsetid(DOMAIN, VERSION),
            helper.make_opsetid("com.microsoft", 1),
        ],
    )
    m.ir_version = 10
    return m.SerializeToString()


def dense_model(w: np.ndarray) -> tuple[bytes, int]:
    wt = np.ascontiguousarray(w.T)
    return _model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], [numpy_helper.from_array(wt, "W")], w.shape[1]
    ), wt.nbytes


def nbits_model(w: np.ndarray, bits: int, block: int = 128) -> tuple[bytes, int]:
    n, k = w.shape
    if bits == 4:
        q, scales = packing.quantize_int4_groupwise(w, block)
    else:
        nb = -(-k // block)
        pad = np.zeros((n, nb * block), np.float32)
        pad[:, :k] = w
        amax = np.abs(pad.reshape(n, nb, block)).max(axis=2)
        scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(pad.reshape(n, nb, block) / scales[:, :, None]), -127, 127).astype(np.int8)
        q = q.reshape(n, -1)[:, :k]
    p = packing.pack_matmulnbits(q, scales, bits, block)
    node = helper.make_node(
        "MatMulNBits",
        ["X", "B", "S"],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=4,
    )
    inits = [numpy_helper.from_array(p.b, "B"), numpy_helper.from_array(p.scales, "S")]
    return _model([node], inits, k), p.nbytes


def ffsplit_model(
    op: str, w: np.ndarray, sparsity: float, rng, accuracy_level: int = 0, group_size: int = 32
) -> tuple[bytes, int]:
    n, k = w.shape
    if op == "Sparse24MatMulInt8":
        rank = rng.random((n, k // 4, 4)).argsort(axis=2)
        keep = (rank < 2).reshape(n, k)
    else:
        keep = rng.random((n, k), dtype=np.float32) >= sparsity
    ws = np.where(keep, w, 0).astype(np.float32)
    attrs = {"accuracy_level": accuracy_level} if accuracy_level else {}
    if op == "SparseMatMulInt4":
        q4, s4 = packing.quantize_sparse_int4(ws, keep, group_size)
        p4 = packing.pack_sparse_int4(q4, keep, s4, group_size)
        arrays, names = (p4.mask, p4.values, p4.row_ptr, p4.scales), ("mask", "values", "row_ptr", "scales")
        attrs["group_size"] = group_size
    elif op == "SparseMatMulFP32":
        p = packing.pack_bitmask(ws, keep)
        arrays, names = (p.mask, p.values, p.row_ptr), ("mask", "values", "row_ptr")
    else:
        q, scales = packing.quantize_int8_per_channel(ws)
        if op == "SparseMatMulInt8":
            p = packing.pack_bitmask(q, keep)
            arrays, names = (p.mask, p.values, p.row_ptr, scales), ("mask", "values", "row_ptr", "scales")
        else:
            p24 = packing.pack_nm24(q)
            arrays, names = (p24.values, p24.meta, scales), ("values", "meta", "scales")
    inits = [numpy_helper.from_array(a, nm) for a, nm in zip(arrays, names)]
    node = helper.make_node(op, ["X", *names], ["Y"], domain=DOMAIN, **attrs)
    return _model([node], inits, k), int(sum(a.nbytes for a in arrays))


class Flusher:
    """Reads a buffer larger than the last-level cache; its throughput is the memory bandwidth."""

    def __init__(self, mib: int):
        self.buf = np.ones(mib * (1 << 20) // 8, np.float64)
        self.gbps: list[float] = []

    def __call__(self):
        t0 = time.perf_counter()
        self.buf.sum()
        self.gbps.append(self.buf.nbytes / (time.perf_counter() - t0) / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--d-ff", type=int, default=16384)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", nargs="+", default=["up", "down"], choices=["up", "down"])
    ap.add_argument(
        "--ops",
        nargs="+",
        default=["SparseMatMulInt8", "Sparse24MatMulInt8", "SparseMatMulInt4"],
        choices=["SparseMatMulInt8", "SparseMatMulFP32", "Sparse24MatMulInt8", "SparseMatMulInt4"],
    )
    ap.add_argument(
        "--accuracy-levels",
        type=int,
        nargs="+",
        default=[0, 4],
        help="accuracy_level attribute of the ffsplit nodes (4: int8 activations on int8-weight ops)",
    )
    ap.add_argument("--no-nbits", action="store_true", help="skip the MatMulNBits baselines")
    ap.add_argument("--flush-mib", type=int, default=1024, help="cache flush / bandwidth buffer (> L3)")
    ap.add_argument("--output", default="bench_kernels.json")
    args = ap.parse_args()

    import onnxruntime as ort

    rng = np.random.default_rng(0)
    flush = Flusher(args.flush_mib)
    for _ in range(3):
        flush()
    results = []
    print(
        f"library {plugin_path()}  FFSPLIT_ISA={os.environ.get('FFSPLIT_ISA', 'auto')}  "
        f"threads={args.threads}  onnxruntime {ort.__version__}"
    )
    for layer in args.layers:
        n, k = (args.d_ff, args.d_model) if layer == "up" else (args.d_model, args.d_ff)
        w = (rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
        variants: list[tuple[str, float | None, bytes, int]] = []
        variants.append(("dense-fp32", None, *dense_model(w)))
        if not args.no_nbits:
            variants.append(("nbits-int8", None, *nbits_model(w, 8)))
            variants.append(("nbits-int4", None, *nbits_model(w, 4)))
        for op in args.ops:
            for s in [0.5] if op == "Sparse24MatMulInt8" else args.sparsity:
                for lvl in args.accuracy_levels:
                    if lvl and op in ("SparseMatMulFP32", "SparseMatMulInt4"):  # exact at every level
                        continue
                    name = op if not lvl else f"{op}/al{lvl}"
                    variants.append((name, s, *ffsplit_model(op, w, s, rng, lvl)))
        del w
        sessions = []
        for name, s, model, nbytes in variants:
            so = session_options(intra_op_num_threads=args.threads, inter_op_num_threads=1)
            sessions.append(
                (name, s, ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]), nbytes)
            )
        del variants
        for m in args.m:
            x = rng.standard_normal((m, k), dtype=np.float32)
            times = {i: [] for i in range(len(sessions))}
            for _name, _s, sess, _nb in sessions:  # warm-up
                sess.run(None, {"X": x})
            for _ in range(args.repeats):
                for i, (_, _, sess, _) in enumerate(sessions):  # A B A B ...
                    if m == 1:
                        flush()
                    t0 = time.perf_counter()
                    sess.run(None, {"X": x})
                    times[i].append(time.perf_counter() - t0)
            bw = statistics.median(flush.gbps[-max(5, len(sessions) * args.repeats) :])
            dense_t = statistics.median(times[0])
            for i, (name, s, _, nbytes) in enumerate(sessions):
                t = statistics.median(times[i])
                floor = nbytes / (bw * 1e9)
                results.append(
                    dict(
                        layer=layer,
                        n=n,
                        k=k,
                        m=m,
                        variant=name,
                        sparsity=s,
                        threads=args.threads,
                        median_ms=t * 1e3,
                        runs_ms=[v * 1e3 for v in times[i]],
                        weight_bytes=nbytes,
                        achieved_gbps=nbytes / t / 1e9,
                        bandwidth_gbps=bw,
                        floor_ms=floor * 1e3,
                        ratio_to_floor=t / floor,
                        speedup_vs_dense=dense_t / t,
                        gflops_effective=2.0 * m * n * k / t / 1e9,
                    )
                )
        del sessions
    hdr = f"{'layer':5} {'M':>4} {'variant':24} {'spars':>5} {'ms':>9} {'MB':>7} {'GB/s':>6} {'floor ms':>8} {'x floor':>7} {'vs dense':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        sp = "" if r["sparsity"] is None else f"{r['sparsity']:.2f}"
        print(
            f"{r['layer']:5} {r['m']:>4} {r['variant']:24} {sp:>5} {r['median_ms']:9.3f} "
            f"{r['weight_bytes'] / 1e6:7.1f} {r['achieved_gbps']:6.1f} {r['floor_ms']:8.3f} "
            f"{r['ratio_to_floor']:7.2f} {r['speedup_vs_dense']:8.2f}"
        )
    print(
        f"memory read bandwidth (numpy sum of {args.flush_mib} MiB, 1 thread, median): "
        f"{statistics.median(flush.gbps):.1f} GB/s"
    )
    meta = dict(
        machine=platform.machine(),
        processor=platform.processor(),
        cpu_count=os.cpu_count(),
        onnxruntime=ort.__version__,
        isa=os.environ.get("FFSPLIT_ISA", "auto"),
        bandwidth_gbps_median=statistics.median(flush.gbps),
        repeats=args.repeats,
    )
    with open(args.output, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
