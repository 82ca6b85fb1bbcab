"""One MatMulNBits int4 node, symmetric vs asymmetric grid (``zero_points``), decode-shaped (M = 1).

SmolLM2-135M's shapes (attention / gate-up [1536 x 576], down [576 x 1536], tied lm_head
[49152 x 576]) at block 32 and 64 and accuracy_level 4 (and 0 with ``--levels 0,4``); the two
grids are timed interleaved, ``--rounds`` rounds, median microseconds per call, one intra-op
thread. Prints a table and writes JSON::

    OMP_NUM_THREADS=1 python samples/bench_int4_grid_speed.py --json samples/results/int4_grid/speed.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ffsplit_export.formats import packing

SHAPES = ((1536, 576), (576, 1536), (49152, 576))


def session(p: packing.NBits, n: int, level: int, threads: int) -> ort.InferenceSession:
    names = ["X", "B", "S"] + (["Z"] if p.zero_points is not None else [])
    inits = [numpy_helper.from_array(p.b, "B"), numpy_helper.from_array(p.scales, "S")]
    if p.zero_points is not None:
        inits.append(numpy_helper.from_array(p.zero_points, "Z"))
    node = helper.make_node(
        "MatMulNBits", names, ["Y"], domain="com.microsoft", K=p.k, N=n, bits=4,
        block_size=p.block_size, accuracy_level=level,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, p.k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--levels", default="4")
    ap.add_argument("--blocks", default="32,64")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    print("| N x K | block | level | symmetric us | asymmetric us | asym / sym |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for n, k in SHAPES:
        w = rng.standard_normal((n, k)).astype(np.float32)
        x = rng.standard_normal((1, k)).astype(np.float32)
        for bs in (int(b) for b in args.blocks.split(",")):
            q, s = packing.quantize_int4_groupwise(w, bs)
            u, s2, z = packing.quantize_int4_asymmetric(w, bs)
            packs = (packing.pack_matmulnbits(q, s, 4, bs), packing.pack_matmulnbits(u, s2, 4, bs, z))
            for level in (int(v) for v in args.levels.split(",")):
                sessions = [session(p, n, level, args.threads) for p in packs]
                reps = max(5, int(2e7 // (n * k)))
                times: list[list[float]] = [[], []]
                for _ in range(args.rounds):
                    for i, sess in enumerate(sessions):
                        sess.run(None, {"X": x})
                        t0 = time.perf_counter()
                        for _ in range(reps):
                            sess.run(None, {"X": x})
                        times[i].append((time.perf_counter() - t0) / reps * 1e6)
                sym, asym = (float(np.median(t)) for t in times)
                rows.append(
                    dict(n=n, k=k, block=bs, level=level, symmetric_us=sym, asymmetric_us=asym, runs=times)
                )
                print(
                    f"| {n} x {k} | {bs} | {level} | {sym:.0f} | {asym:.0f} | {asym / sym:.2f} |", flush=True
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
