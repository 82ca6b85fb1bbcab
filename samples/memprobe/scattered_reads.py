"""Useful read bandwidth of scattered pieces (the memory pattern of skipped neurons), as a table.

Compiles ``scattered_reads.c`` (gcc with AVX-512 and OpenMP) and runs it for each piece size at
the kept fraction, at each thread count, and the whole buffer read sequentially as the reference;
prints a table and writes JSON. Best of 5 passes over 1 GiB each. Needs a CPU with AVX-512.

    python samples/memprobe/scattered_reads.py --pieces 128 256 512 1024 4096 --keep 0.5 \\
        --threads 1 2 --output samples/results/scattered_reads.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pieces", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument(
        "--ahead", type=int, nargs="+", default=[0], help="software prefetch distance in pieces (0: none)"
    )
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()
    src = Path(__file__).with_name("scattered_reads.c")
    exe = Path(tempfile.mkdtemp(prefix="ffsplit_memprobe_")) / "scattered_reads"
    subprocess.run(
        ["gcc", "-O2", "-mavx512f", "-mavx512bw", "-fopenmp", str(src), "-o", str(exe)], check=True
    )

    def run(threads: int, *a) -> dict:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([str(exe), *map(str, a)], env=env, check=True, capture_output=True, text=True)
        return json.loads(out.stdout)

    rows = []
    for t in args.threads:
        first = run(t, 4096, 1.0)["useful_gb_s"]
        these = [run(t, p, args.keep, ahead) for p in args.pieces for ahead in args.ahead]
        full = max(first, run(t, 4096, 1.0)["useful_gb_s"])  # before and after: the better of the two
        for r in these:
            r["vs_sequential"] = r["useful_gb_s"] / full
            r["sequential_gb_s"] = full
        rows += these
    print(
        f"{'threads':>7} {'piece B':>8} {'ahead':>6} {'useful GB/s':>12} {'sequential':>11} {'x sequential':>13}"
    )
    for r in rows:
        print(
            f"{r['threads']:>7} {r['piece']:>8} {r['ahead']:>6} {r['useful_gb_s']:>12.2f} {r['sequential_gb_s']:>11.2f} "
            f"{r['vs_sequential']:>13.2f}"
        )
    if args.output:
        args.output.write_text(json.dumps({"keep": args.keep, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
