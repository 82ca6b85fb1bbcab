"""Prefill time of exported decoders under two builds of libffsplit_ort, in alternating processes.

A kernel change is judged on the same export folders: each library is loaded in its own process
(a custom-op domain registers once per process), the processes alternate ``--rounds`` times, and
each times every export at each prompt length (IOBinding session as ``samples/frontier.py``,
``--repeats`` interleaved prefills, median). Exports that do not use the library (stock
MatMulNBits graphs) are the control: their times should not move between libraries. Prints a
table and writes JSON.

    python samples/prefill_libraries.py --exports out/balanced out/balanced-fused \\
        --libraries /tmp/old.so build/plugins/onnxruntime/libffsplit_ort.so --lengths 32 256 \\
        --output samples/results/prefill_libraries.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def _child(exports: list[str], lengths: list[int], repeats: int, threads: int) -> dict:
    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    import frontier

    rng = np.random.default_rng(0)
    runs = {e: frontier.Runner(Path(e) / "model.onnx", threads) for e in exports}
    for r in runs.values():  # warm-up
        r.step(rng.integers(3, 1000, (1, min(lengths)), dtype=np.int64), None, 0)
    out = {}
    for n in lengths:
        times = {e: [] for e in exports}
        for _ in range(repeats):
            for e, r in runs.items():
                times[e].append(1e3 * r.step(rng.integers(3, 1000, (1, n), dtype=np.int64), None, 0)[1])
        out[str(n)] = {e: statistics.median(v) for e, v in times.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exports", nargs="+", required=True, help="export folders (model.onnx inside)")
    ap.add_argument("--libraries", nargs="+", default=[], help="libffsplit_ort.so builds to compare")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.exports, args.lengths, args.repeats, args.threads)))
        return
    if not args.libraries:
        raise SystemExit("--libraries: give at least one libffsplit_ort.so build")
    for lib in args.libraries:
        if not Path(lib).is_file():
            raise SystemExit(f"--libraries: {lib} is not a file; pass a built libffsplit_ort.so")
    res = {lib: [] for lib in args.libraries}
    for _ in range(args.rounds):
        for lib in args.libraries:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--exports",
                *args.exports,
                "--lengths",
                *map(str, args.lengths),
            ]
            cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
            env = {**os.environ, "FFSPLIT_ORT_LIBRARY": str(Path(lib).resolve())}
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"timing with {lib} failed:\n{done.stderr[-2000:]}")
            res[lib].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = []
    for lib, rounds in res.items():
        for n in map(str, args.lengths):
            for e in args.exports:
                vals = [r[n][e] for r in rounds]
                rows.append(
                    {
                        "library": lib,
                        "length": int(n),
                        "export": e,
                        "ms": statistics.median(vals),
                        "rounds": vals,
                    }
                )
    print(f"{'library':40} {'tokens':>6}  " + "  ".join(f"{Path(e).name[-24:]:>24}" for e in args.exports))
    for lib in args.libraries:
        for n in args.lengths:
            ms = [
                next(r["ms"] for r in rows if r["library"] == lib and r["length"] == n and r["export"] == e)
                for e in args.exports
            ]
            print(f"{lib[-40:]:40} {n:>6}  " + "  ".join(f"{m:>21.1f} ms" for m in ms))
    if args.output:
        args.output.write_text(
            json.dumps({"args": vars(args) | {"output": str(args.output)}, "rows": rows}, indent=1) + "\n"
        )
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
