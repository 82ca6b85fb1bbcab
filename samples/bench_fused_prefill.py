"""One FFN layer at prefill (M rows at once): ``ffsplit::FusedFFNNBits`` against the stock MatMulNBits
subgraph of the same parts, same run.

Parts (``--kind``), random weights of a realistic shape packed by
:func:`ffsplit_export.ops._ffn.pack_nbits_part`, accuracy_level 4 (what the export ships):

* ``balanced``: heavy int8 per channel in blocks of 128, light int4 in groups of 64 with zero points
  (the ``balanced`` preset's parts);
* ``accurate``: heavy dense float32, light int8 in blocks of 128 (the ``accurate`` preset's parts).

Shapes (``--shape``): ``whisper-tiny`` (GELU, D = 384, F = 1536, H = 154: the encoder's FFN, whose
prefill is 1500 frames per 30 s window), ``smollm2`` (gated SiLU, D = 576, F = 1536, H = 154) and
``mpt`` (GELU, D = 2048, F = 8192, H = 819).

Variants, interleaved (A B C ... A B C ...), median of ``--repeats`` timings, for each M of
``--rows``: ``stock`` (the subgraph the export writes without the op, built with onnx.helper),
``fused`` (this build of the library, or the one ``FFSPLIT_ORT_LIBRARY`` names) and, with
``--baseline-library PATH``, ``fused@base`` (another build, e.g. main's before a change: ONNX Runtime
keeps each session's custom-op library apart). ``--threads`` intra-op threads (default 2).

    python samples/bench_fused_prefill.py --output samples/results/bench_fused_prefill.json
    python samples/bench_fused_prefill.py --shape whisper-tiny --kind accurate --rows 64 1500 \\
        --baseline-library /tmp/mainlib/plugins/onnxruntime/libffsplit_ort.so
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fused_ffn_nbits import _load, _session  # noqa: E402

SHAPES = {
    "whisper-tiny": dict(d=384, f=1536, h=154, activation="gelu", gated=0),
    "smollm2": dict(d=576, f=1536, h=154, activation="silu", gated=1),
    "mpt": dict(d=2048, f=8192, h=819, activation="gelu", gated=0),
}
KINDS = {
    "balanced": dict(heavy_bits=8, light_bits=4, heavy_block_size=128, light_block_size=64),
    "accurate": dict(heavy_bits=32, light_bits=8, heavy_block_size=32, light_block_size=128),
}


def _inputs(rng, shape: dict, kind: dict) -> list:
    from ffsplit_export.ops._ffn import random_nbits_ffn_inputs

    d, f, h, gated = shape["d"], shape["f"], shape["h"], bool(shape["gated"])
    ins = random_nbits_ffn_inputs(rng, d, f, h, zero_points=True, gated=gated, **kind)
    if (
        kind["heavy_bits"] == 8
    ):  # the heavy int8 part is symmetric (per channel, as formats/nbits.py stores it)
        heavy = random_nbits_ffn_inputs(rng, d, f, h, zero_points=False, gated=gated, **kind)
        for i in (0, 1, 2, 7, 8, 9) + ((14, 15, 16) if gated else ()):
            ins[i] = heavy[i]
    return ins


def main() -> None:
    from ffsplit_export.ops._ffn import fused_ffn_nbits_model, stock_nbits_ffn_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--kind", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256, 1500])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline-library", default=None, help="another libffsplit_ort.so, run as 'fused@base'")
    ap.add_argument("--output", default="samples/results/bench_fused_prefill.json")
    args = ap.parse_args()

    rows = []
    print(f"load average at start: {_load()}; {args.threads} threads")
    for sname in args.shape:
        shape = SHAPES[sname]
        for kname in args.kind:
            kind = KINDS[kname]
            rng = np.random.default_rng(args.seed)
            ins = _inputs(rng, shape, kind)
            base = dict(activation=shape["activation"], gated=shape["gated"], accuracy_level=4, **kind)
            fused = fused_ffn_nbits_model(ins, **base, skip=0)
            sessions = {
                "stock": _session(stock_nbits_ffn_model(ins, **base), args.threads),
                "fused": _session(fused, args.threads),
            }
            if args.baseline_library:
                sessions["fused@base"] = _session(fused, args.threads, None, args.baseline_library)
            print(f"\n{sname} (D={shape['d']}, F={shape['f']}, H={shape['h']}), {kname} parts: ms per call")
            print(f"{'M':>6} " + " ".join(f"{k:>12}" for k in sessions) + "   fused x stock   load")
            for m in args.rows:
                x = rng.standard_normal((m, shape["d"])).astype(np.float32)
                for s in sessions.values():  # warm-up
                    s.run(None, {"X": x})
                inner = max(1, min(20, 2000 // m))
                load0 = _load()
                times = {k: [] for k in sessions}
                for _ in range(args.repeats):
                    for k, s in sessions.items():
                        t0 = time.perf_counter()
                        for _ in range(inner):
                            s.run(None, {"X": x})
                        times[k].append((time.perf_counter() - t0) / inner * 1e3)
                ms = {k: statistics.median(v) for k, v in times.items()}
                load = f"{load0} -> {_load()}"
                for k, v in ms.items():
                    rows.append(
                        {
                            "shape": sname,
                            "kind": kname,
                            "rows": m,
                            "threads": args.threads,
                            "variant": k,
                            "ms": v,
                            "vs_stock": ms["stock"] / v,
                            "load": load,
                        }
                    )
                print(
                    f"{m:>6} "
                    + " ".join(f"{v:>12.3f}" for v in ms.values())
                    + f"   {ms['stock'] / ms['fused']:>13.2f}   {load}"
                )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"args": vars(args), "cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
