"""One FFN layer: the fused ``ffsplit::FusedFFN`` node against today's split subgraph, same run.

The FFN is built from the package's own modules (heavy ``fp32`` rows, light ``sparse-int8`` by
magnitude pruning, split as :mod:`ffsplit_export.split` splits) and exported twice with the
package's exporter code paths: the split subgraph (MatMul + SparseMatMulInt8 + Concat +
activation + Slice + MatMul + SparseMatMulInt8 + Add) and one FusedFFN node (skip 0, and
skip 1 = ``exact``). Rows (default the MPT-7B-like shape scaled to d_model 2048, d_ff 8192):

* ``split`` / ``fused`` / ``fused-exact`` for the model's activation (MPT: gelu), M = 1, light
  sparsity 50 % and 75 %, heavy 10 % fp32;
* the ReLU variant with a chosen fraction of light neurons silent for the benchmark token (the
  up bias is set so that exactly that fraction of the light pre-activations is <= 0), to time
  ``exact`` skipping at the zero fraction of a real ReLU model.

Variants run interleaved (A B C A B C ...), median of ``--repeats``; ``uptime`` load is recorded
beside the numbers (the machine is shared). Bytes read per token are computed from the packed
sizes: the heavy parts, the light up/gate, and the light down columns of the active neurons.

    python samples/bench_fused_ffn.py --output bench_fused_ffn.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time

import numpy as np
import torch
from torch import nn


def _split_ffn(d: int, f: int, heavy_frac: float, sparsity: float, seed: int):
    from ffsplit_export.split import SplitConfig, SplitLinear, make_heavy, make_light

    g = torch.Generator().manual_seed(seed)
    w_up = torch.randn(f, d, generator=g) / d**0.5
    w_down = torch.randn(d, f, generator=g) / f**0.5
    h = int(round(heavy_frac * f))
    cfg = SplitConfig(light_sparsity=sparsity, prune_method="magnitude")
    up = SplitLinear("out", make_heavy(w_up[:h], None, "fp32"), make_light(w_up[h:], None, cfg), h)
    down = SplitLinear("in", make_heavy(w_down[:, :h], None, "fp32"), make_light(w_down[:, h:], None, cfg), h)
    return up, down, h


class _SplitFFN(nn.Module):
    def __init__(self, up, down, kind):
        super().__init__()
        self.up, self.down, self.kind = up, down, kind

    def forward(self, x):
        from ffsplit_export.fused import _act

        return self.down(_act(self.kind, self.up(x)))


def _export(module, d: int) -> bytes:
    from ffsplit_export.linear import export_target

    buf = io.BytesIO()
    x = torch.randn(1, d)
    with export_target("ort-cpu"), torch.no_grad():
        torch.onnx.export(
            module,
            (x,),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["X"],
            output_names=["Y"],
            dynamic_axes={"X": {0: "m"}, "Y": {0: "m"}},
            custom_opsets={"ffsplit": 1},
        )
    return buf.getvalue()


def _session(model: bytes, threads: int):
    import onnxruntime as ort

    from ffsplit_export.runtime import session_options

    so = session_options()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _bytes_per_token(up, down, active_light: float) -> dict:
    hv = up.heavy.packed_nbytes() + down.heavy.packed_nbytes()
    lu = up.light.packed_nbytes()
    ld = down.light.packed_nbytes()
    return {"all": hv + lu + ld, "exact": int(hv + lu + ld * active_light)}


def _time(sessions: dict, x: np.ndarray, repeats: int) -> dict:
    times = {k: [] for k in sessions}
    for s in sessions.values():  # warm-up
        s.run(None, {"X": x})
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {"X": x})
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def main() -> None:
    from ffsplit_export.fused import FusedFFN

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--d-ff", type=int, default=8192)
    ap.add_argument("--heavy", type=float, default=0.1)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--activation", default="gelu")
    ap.add_argument("--relu-zero", type=float, nargs="+", default=[0.5, 0.9])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--output", default="bench_fused_ffn.json")
    args = ap.parse_args()
    d, f = args.d_model, args.d_ff
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, d)).astype(np.float32)
    rows = []
    for sp in args.sparsity:
        up, down, h = _split_ffn(d, f, args.heavy, sp, seed=1)
        models = {
            "split": _export(_SplitFFN(up, down, args.activation), d),
            "fused": _export(FusedFFN(up, down, None, args.activation, 0), d),
            "fused-exact": _export(FusedFFN(up, down, None, args.activation, 1), d),
        }
        # the ReLU FFN: light up bias chosen so that a fraction z of the light neurons is silent for x
        u_light = (x @ up.light.dense_weight().numpy().T)[0]
        for threads in args.threads:
            sess = {k: _session(m, threads) for k, m in models.items()}
            ref = sess["split"].run(None, {"X": x})[0]
            for k, s in sess.items():
                diff = float(np.abs(s.run(None, {"X": x})[0] - ref).max())
                assert diff < 1e-3, (k, diff)
            load0 = _load()
            t = _time(sess, x, args.repeats)
            rows.append(
                {
                    "case": f"{args.activation} sparsity {sp}",
                    "threads": threads,
                    "ms": t,
                    "speedup_fused_vs_split": t["split"] / t["fused"],
                    "bytes_per_token": _bytes_per_token(up, down, 1.0),
                    "load": [load0, _load()],
                }
            )
            print(json.dumps(rows[-1]))
        for z in args.relu_zero:
            silent = rng.permutation(f - h)[: int(round(z * (f - h)))]
            bias = -u_light + np.abs(rng.standard_normal(f - h)).astype(np.float32) + 0.1
            bias[silent] = -u_light[silent] - 1.0
            relu_up = _with_light_bias(up, torch.from_numpy(bias.astype(np.float32)))
            relu_models = {
                "split": _export(_SplitFFN(relu_up, down, "relu"), d),
                "fused": _export(FusedFFN(relu_up, down, None, "relu", 0), d),
                "fused-exact": _export(FusedFFN(relu_up, down, None, "relu", 1), d),
            }
            for threads in args.threads:
                sess = {k: _session(m, threads) for k, m in relu_models.items()}
                outs = {k: s.run(None, {"X": x})[0] for k, s in sess.items()}
                diff = float(np.abs(outs["fused-exact"] - outs["fused"]).max())
                load0 = _load()
                t = _time(sess, x, args.repeats)
                rows.append(
                    {
                        "case": f"relu sparsity {sp}, {z:.0%} light neurons silent",
                        "threads": threads,
                        "ms": t,
                        "speedup_exact_vs_fused": t["fused"] / t["fused-exact"],
                        "speedup_exact_vs_split": t["split"] / t["fused-exact"],
                        "max_abs_diff_exact_vs_fused": diff,
                        "bytes_per_token": _bytes_per_token(up, down, 1.0 - z),
                        "load": [load0, _load()],
                    }
                )
                print(json.dumps(rows[-1]))
    print()
    print(
        f"{'case':44s} {'thr':>3s} {'split ms':>9s} {'fused ms':>9s} {'exact ms':>9s}  {'MB/token all/exact':>18s}  load"
    )
    for r in rows:
        b = r["bytes_per_token"]
        print(
            f"{r['case']:44s} {r['threads']:3d} {r['ms']['split']:9.2f} {r['ms']['fused']:9.2f} "
            f"{r['ms']['fused-exact']:9.2f}  {b['all'] / 1e6:8.1f}/{b['exact'] / 1e6:<8.1f}  {'-'.join(r['load'])}"
        )
    with open(args.output, "w") as fh:
        json.dump({"args": vars(args), "cpu_count": os.cpu_count(), "rows": rows}, fh, indent=1)


def _with_light_bias(up, bias: torch.Tensor):
    """A copy of the split up projection whose light part has ``bias``."""
    import copy

    new = copy.copy(up)
    light = copy.copy(up.light)
    light._parameters = dict(up.light._parameters)
    light.bias = nn.Parameter(bias, requires_grad=False)
    new._modules = dict(up._modules)
    new._modules["light"] = light
    return new


if __name__ == "__main__":
    main()
