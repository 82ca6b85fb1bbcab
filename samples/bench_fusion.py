"""Decode and prefill of a text-generation export, unfused against fused, with ONNX Runtime's profile.

The export (made with ``--no-fuse-attention``, i.e. optimum's graph around our FFN nodes) is timed
as it is (``unfused``) and after :func:`ffsplit_export.export.fusion.fuse_graph` (``fused``: the
post-export pass ``--target ort-cpu`` runs by default; with ``--ablations`` also with its packing
steps switched off, :data:`FUSED_VARIANTS`), plus, when given, the same export fused by an earlier
version of the pass (``--before NAME=PATH``) and other decoder graphs of the same model
(``--extra NAME=PATH``, e.g. the ONNX Runtime GenAI builder's ``model.onnx``), all with the same
session settings: ONNX Runtime's default graph optimisation (ORT_ENABLE_ALL),
``intra_op_num_threads`` = ``--threads``, batch 1. The machine's load (``os.getloadavg`` at start
and end, ``uptime``) goes into the JSON: on a shared machine only the interleaved medians compare.

* decode: one new token after ``--past`` cached tokens (random cache values, the same shape for
  every variant), ms per call, median of ``--repeats`` rounds run interleaved (A B C A B C ...);
* prefill: ``--prompt`` tokens with an empty cache, ms, the same way;
* profile: a separate session with ``enable_profiling``, ``--profile-steps`` decode calls, the
  kernel time summed per op type (ms per token and % of the node total).

    python samples/bench_fusion.py EXPORT_DIR --before fused-before=/path/fused-before/model.onnx \\
        --ablations --extra genai-int4=/path/genai-int4/model.onnx \\
        --output samples/results/bench_fusion_smollm2.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

# fuse_graph's switches per timed variant; "fused" is the pass as an export runs it
FUSED_VARIANTS = {
    "fused": {},
    "fused, gate/up not packed": {"pack_gate_up": False},
    "fused, no packing": {"pack_qkv": False, "split_ffn": False},
}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _session(path: Path, threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    from ffsplit_export.runtime import session_options

    so = session_options(intra_op_num_threads=threads, inter_op_num_threads=1)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(sess, n_new: int, past: int, seed: int = 0, head_dim: int = 64) -> dict:
    """Inputs of one call: ``n_new`` tokens after ``past`` cached ones, batch 1.

    ``head_dim`` fills a symbolic last cache dimension (the GenAI builder names it kv_cache_dim).
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(3, 1000, (1, n_new)).astype(np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, past + n_new), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(past, past + n_new, dtype=np.int64)[None]
        elif i.name.startswith("past_key_values."):
            heads = int(i.shape[1])
            dim = i.shape[3] if isinstance(i.shape[3], int) else head_dim
            dtype = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = rng.standard_normal((1, heads, past, dim)).astype(dtype)
        else:
            raise SystemExit(f"unexpected input {i.name!r} {i.type} {i.shape}")
    return feeds


def _profile(path: Path, threads: int, past: int, steps: int, work: Path, head_dim: int) -> dict:
    sess = _session(path, threads, str(work / f"prof-{path.parent.name}-{path.stem}"))
    feeds = _feeds(sess, 1, past, head_dim=head_dim)
    for _ in range(3):
        sess.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(steps):
        sess.run(None, feeds)
    wall = (time.perf_counter() - t0) / steps * 1e3
    prof = sess.end_profiling()
    events = json.loads(Path(prof).read_text())
    Path(prof).unlink()
    per_op: dict = collections.defaultdict(float)
    count: dict = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] += e["dur"] / 1e3
            count[op] += 1
    # the first 3 calls are warm-up: profile counts every call, so scale by the calls made
    calls = steps + 3
    total = sum(per_op.values())
    rows = [
        {
            "op": op,
            "ms_per_token": ms / calls,
            "percent": 100 * ms / total if total else 0.0,
            "nodes_per_token": count[op] / calls,
        }
        for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])
    ]
    return {"wall_ms_per_token_profiled": wall, "node_ms_per_token": total / calls, "ops": rows}


def _graph_ops(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    c = collections.Counter(n.op_type for n in m.graph.node)
    return dict(sorted(c.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export", type=Path, help="an ffsplit export made with --no-fuse-attention")
    ap.add_argument("--onnx", default="model.onnx", help="file inside EXPORT to time")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=PATH", help="another decoder graph")
    ap.add_argument(
        "--before",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="the same export fused by an earlier version of the pass (listed right after unfused)",
    )
    ap.add_argument(
        "--ablations",
        action="store_true",
        help="also time the pass with its packing steps switched off (see FUSED_VARIANTS)",
    )
    ap.add_argument(
        "--note", action="append", default=[], help="a line recorded in the JSON (how --before was made)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--past", type=int, default=48)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--decode-calls", type=int, default=20, help="decode calls per round")
    ap.add_argument("--profile-steps", type=int, default=30)
    ap.add_argument("--output", type=Path, default=Path("bench_fusion.json"))
    args = ap.parse_args()

    from ffsplit_export.export.fusion import fuse_graph

    manifest = args.export / "ffsplit.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("options", {}).get("fuse_attention"):
        raise SystemExit(f"{args.export} is already fused: export it again with --no-fuse-attention")

    work = Path(tempfile.mkdtemp(prefix="bench-fusion-"))
    load_start = os.getloadavg()
    try:
        unfused = args.export / args.onnx
        cfg = json.loads((args.export / "config.json").read_text())
        heads = cfg.get("num_attention_heads")
        variants = {"unfused": unfused}
        for e in args.before:  # graphs fused by an earlier version of the pass, timed beside ours
            name, _, path = e.partition("=")
            variants[name] = Path(path)
        stats, fuse_s = {}, {}
        for name, flags in FUSED_VARIANTS.items():
            if name != "fused" and not args.ablations:
                continue
            out = work / f"v{len(variants)}" / args.onnx
            out.parent.mkdir()
            for p in args.export.iterdir():  # external data files travel with the graph
                if p.name != args.onnx and (
                    p.suffix in (".onnx_data", ".data") or p.name.endswith(".onnx.data")
                ):
                    shutil.copy(p, out.parent / p.name)
            t0 = time.time()
            stats[name] = fuse_graph(
                unfused,
                out,
                num_heads=heads,
                kv_num_heads=cfg.get("num_key_value_heads") or heads,
                max_positions=cfg.get("max_position_embeddings"),
                **flags,
            )
            fuse_s[name] = round(time.time() - t0, 1)
            variants[name] = out
        for e in args.extra:
            name, _, path = e.partition("=")
            variants[name] = Path(path)

        sessions = {k: _session(p, args.threads) for k, p in variants.items()}
        hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
        dec = {k: _feeds(s, 1, args.past, head_dim=hd) for k, s in sessions.items()}
        pre = {k: _feeds(s, args.prompt, 0, head_dim=hd) for k, s in sessions.items()}
        for k, s in sessions.items():  # warm-up
            s.run(None, dec[k])
            s.run(None, pre[k])
        decode: dict = {k: [] for k in sessions}
        prefill: dict = {k: [] for k in sessions}
        for _ in range(args.repeats):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                for _ in range(args.decode_calls):
                    s.run(None, dec[k])
                decode[k].append((time.perf_counter() - t0) / args.decode_calls * 1e3)
                t0 = time.perf_counter()
                s.run(None, pre[k])
                prefill[k].append((time.perf_counter() - t0) * 1e3)
        del sessions
        profiles = {
            k: _profile(p, args.threads, args.past, args.profile_steps, work, hd) for k, p in variants.items()
        }
    finally:
        keep = work
    result = {
        "export": str(args.export),
        "settings": {
            "threads": args.threads,
            "past": args.past,
            "prompt": args.prompt,
            "repeats": args.repeats,
            "decode_calls": args.decode_calls,
            "graph_optimization_level": "ORT_ENABLE_ALL",
        },
        "fusion": {"stats": stats, "seconds": fuse_s, "flags": {k: FUSED_VARIANTS[k] for k in stats}},
        "notes": args.note,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_at_start": load_start,
            "load": os.getloadavg(),
            "uptime": _uptime(),
        },
        "variants": {
            k: {
                "path": str(variants[k]),
                "decode_ms": statistics.median(decode[k]),
                "decode_ms_all": decode[k],
                "prefill_ms": statistics.median(prefill[k]),
                "prefill_ms_all": prefill[k],
                "graph_ops": _graph_ops(variants[k]),
                "profile": profiles[k],
            }
            for k in variants
        },
    }
    shutil.rmtree(keep, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))

    base = result["variants"]["unfused"]["decode_ms"]
    print(
        f"\n{args.export} (past {args.past}, prompt {args.prompt}, {args.threads} threads, load {os.getloadavg()[0]:.1f})"
    )
    print(
        f"| variant | decode ms/token | vs unfused | prefill ms ({args.prompt} tok) | graph nodes | MatMulNBits |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for k, v in result["variants"].items():
        print(
            f"| {k} | {v['decode_ms']:.2f} | {base / v['decode_ms']:.2f}x | {v['prefill_ms']:.1f} | "
            f"{sum(v['graph_ops'].values())} | {v['graph_ops'].get('MatMulNBits', 0)} |"
        )
    for k, v in result["variants"].items():
        p = v["profile"]
        print(
            f"\nprofile {k}: node time {p['node_ms_per_token']:.2f} ms/token (wall {p['wall_ms_per_token_profiled']:.2f})"
        )
        print("| op type | ms/token | % | nodes/token |")
        print("| --- | --- | --- | --- |")
        for r in p["ops"][:14]:
            print(
                f"| {r['op']} | {r['ms_per_token']:.3f} | {r['percent']:.1f} | {r['nodes_per_token']:.0f} |"
            )
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
