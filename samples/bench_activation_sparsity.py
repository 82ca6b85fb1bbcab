"""Decode speed of one FFN with calibrated activation sparsity (``--activation-sparsity F``), same run.

The MPT-shaped FFN of ``samples/bench_fused_ffn.py`` (d_model 2048, d_ff 8192, heavy 10 % fp32, light
sparse-int8 by magnitude; random weights, too big for the cache to matter much per token) exported as

* ``split``: today's subgraph; ``fused``: one FusedFFN node without skipping;
* ``fused-F``: the same node with ``threshold`` calibrated so that a fraction F of the light neurons
  is skipped (F-quantile of |act(up)| over 256 random calibration tokens; the benchmark token is
  another random token, and its real skipped fraction is reported);

for the ungated GELU FFN (MPT: a skipped neuron saves its down column) and a gated SiLU FFN of the same
size (Llama-like, CATS: the threshold is on |act(gate)|, a skipped neuron saves its up row and its
down column). M = 1, variants interleaved, median of ``--repeats``; with 1 thread the table shows the
calling thread's CPU time (ORT computes there; a loaded machine's waits left out), with 2 threads
wall-clock; both are in the JSON, with the load average (the machine is shared). Bytes per token from the packed sizes of what the kernel reads.

    python samples/bench_activation_sparsity.py --output bench_activation_sparsity.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fused_ffn import _export, _load, _session, _split_ffn  # noqa: E402


def _time(sessions: dict, x: np.ndarray, repeats: int) -> tuple[dict, dict]:
    """Medians in ms of wall-clock time and of this thread's CPU time (with one intra-op thread ORT
    computes on the calling thread, so CPU time is what the kernel cost, less the waits of a loaded
    machine; with 2 threads it misses the pool thread's share)."""
    wall = {k: [] for k in sessions}
    cpu = {k: [] for k in sessions}
    for s in sessions.values():  # warm-up
        s.run(None, {"X": x})
    for _ in range(repeats):
        for k, s in sessions.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            s.run(None, {"X": x})
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.thread_time() - c0)
    med = statistics.median
    return {k: med(v) * 1e3 for k, v in wall.items()}, {k: med(v) * 1e3 for k, v in cpu.items()}


class _SplitGated(nn.Module):
    def __init__(self, up, down, gate, kind):
        super().__init__()
        self.up, self.down, self.gate, self.kind = up, down, gate, kind

    def forward(self, x):
        from ffsplit_export.fused import _act

        return self.down(_act(self.kind, self.gate(x)) * self.up(x))


def _threshold(pre_light: torch.Tensor, kind: str, frac: float) -> float:
    from ffsplit_export.fused import _act

    s = _act(kind, pre_light.double()).float().abs().reshape(-1)
    return float(torch.kthvalue(s, max(1, int(np.ceil(frac * s.numel())))).values)


def main() -> None:
    from ffsplit_export.fused import FusedFFN

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--d-ff", type=int, default=8192)
    ap.add_argument("--heavy", type=float, default=0.1)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--output", default="bench_activation_sparsity.json")
    args = ap.parse_args()
    d, f = args.d_model, args.d_ff
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, d)).astype(np.float32)
    xcal = torch.from_numpy(rng.standard_normal((256, d)).astype(np.float32))
    rows = []
    up, down, h = _split_ffn(d, f, args.heavy, args.sparsity, seed=1)
    gate, _, _ = _split_ffn(d, f, args.heavy, args.sparsity, seed=2)
    hv = up.heavy.packed_nbytes() + down.heavy.packed_nbytes()
    lu, ld, lg = up.light.packed_nbytes(), down.light.packed_nbytes(), gate.light.packed_nbytes()
    for case, kind, gated in (
        ("MPT-shaped gelu (ungated)", "gelu", False),
        ("gated silu (CATS)", "silu", True),
    ):
        g = gate if gated else None
        with torch.no_grad():
            pre_cal = (gate(xcal) if gated else up(xcal))[:, h:]
            pre_tok = (gate(torch.from_numpy(x)) if gated else up(torch.from_numpy(x)))[:, h:]
        models = {
            "split": _export(_SplitGated(up, down, gate, kind) if gated else _SplitFFNU(up, down, kind), d),
            "fused": _export(FusedFFN(up, down, g, kind, 0), d),
        }
        info = {}
        for frac in args.fractions:
            t = _threshold(pre_cal, kind, frac)
            m = FusedFFN(up, down, g, kind, 1, threshold=t)
            models[f"fused-{frac:g}"] = _export(m, d)
            from ffsplit_export.fused import _act

            skipped = float((_act(kind, pre_tok.double()).float().abs() <= m.threshold).double().mean())
            base = hv + (up.heavy.packed_nbytes() if gated else 0)  # gate heavy has the up heavy's size
            read = base + (lg + (lu + ld) * (1 - skipped) if gated else lu + ld * (1 - skipped))
            info[f"fused-{frac:g}"] = {
                "threshold": m.threshold,
                "skipped_on_token": skipped,
                "bytes": int(read),
            }
        all_bytes = hv + (up.heavy.packed_nbytes() + lg if gated else 0) + lu + ld
        for threads in args.threads:
            sess = {k: _session(mm, threads) for k, mm in models.items()}
            ref = sess["split"].run(None, {"X": x})[0]
            diffs = {k: float(np.abs(s.run(None, {"X": x})[0] - ref).max()) for k, s in sess.items()}
            assert diffs["fused"] < 1e-3, diffs
            load0 = _load()
            wall, cpu = _time(sess, x, args.repeats)
            ms = cpu if threads == 1 else wall  # 1 thread: the loaded machine's waits left out
            row = {
                "case": case,
                "threads": threads,
                "clock": "thread CPU time" if threads == 1 else "wall-clock",
                "ms": ms,
                "wall_ms": wall,
                "bytes_per_token_all": int(all_bytes),
                "skip": info,
                "max_abs_diff_vs_split": diffs,
                "speedup_vs_fused": {k: ms["fused"] / v for k, v in ms.items() if k.startswith("fused-")},
                "load": [load0, _load()],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(
        f"{'case':28s} {'thr':>3s} {'split ms':>9s} {'fused ms':>9s} "
        + " ".join(f"{'F=' + k[6:] + ' ms':>9s} {'x':>5s} {'MB':>5s}" for k in rows[0]["skip"])
        + f" {'MB all':>6s}  load"
    )
    for r in rows:
        cells = " ".join(
            f"{r['ms'][k]:9.2f} {r['speedup_vs_fused'][k]:5.2f} {v['bytes'] / 1e6:5.1f}"
            for k, v in r["skip"].items()
        )
        print(
            f"{r['case']:28s} {r['threads']:3d} {r['ms']['split']:9.2f} {r['ms']['fused']:9.2f} {cells} "
            f"{r['bytes_per_token_all'] / 1e6:6.1f}  {'-'.join(r['load'])}"
        )
    with open(args.output, "w") as fh:
        json.dump({"args": vars(args), "cpu_count": os.cpu_count(), "rows": rows}, fh, indent=1)


class _SplitFFNU(nn.Module):
    def __init__(self, up, down, kind):
        super().__init__()
        self.up, self.down, self.kind = up, down, kind

    def forward(self, x):
        from ffsplit_export.fused import _act

        return self.down(_act(self.kind, self.up(x)))


if __name__ == "__main__":
    main()
