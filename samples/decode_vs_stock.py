"""Decode speed of finished exports against stock ONNX Runtime models, one run, interleaved.

A quicker companion of ``samples/frontier.py`` for exports that already exist (no exporting, no
perplexity): each named model folder is timed

* through a plain ``onnxruntime.InferenceSession`` (frontier.py's ``Runner``: IOBinding, past
  key/values fed back, batch 1) where the graph has optimum's interface (ours, ONNX Runtime's
  quantizer), and
* in onnxruntime-genai's own generation loop (``genai_decode_ms``) where the folder has a
  ``genai_config.json`` (ours and the GenAI model builder's),

``--runs`` rounds, every variant in turn per round (A B C ... A B C ...), ``--threads`` intra-op
threads, the same random prompt of ``--prompt`` tokens and ``--tokens`` timed steps. Prints a
markdown table of medians and writes JSON (with the load average at start and end).

    python samples/decode_vs_stock.py new=/tmp/out genai=/tmp/genai-int4 \\
        ort-int4-b32-hqq-l4=/tmp/ORT-int4-b32-HQQ-L4 --output decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import frontier  # noqa: E402  (samples/frontier.py: Runner, genai_decode_ms)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", metavar="NAME=DIR")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--output", type=Path, default=Path("decode_vs_stock.json"))
    args = ap.parse_args(argv)
    models = {}
    for spec in args.models:
        name, _, d = spec.partition("=")
        if not d or not (Path(d) / "model.onnx").is_file():
            ap.error(f"{spec!r}: expected NAME=DIR with DIR/model.onnx")
        models[name] = Path(d)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, args.vocab, (1, args.prompt), dtype=np.int64)
    toks = rng.integers(3, args.vocab, args.tokens, dtype=np.int64)
    # optimum's interface: ours (ffsplit.json) and ONNX Runtime quantizer outputs (no genai_config)
    plain = {
        n
        for n, p in models.items()
        if (p / "ffsplit.json").exists() or not (p / "genai_config.json").exists()
    }
    loop = {n for n, p in models.items() if (p / "genai_config.json").exists()}
    load0 = os.getloadavg()
    ort_ms = {n: [] for n in models if n in plain}
    genai_ms = {n: [] for n in models if n in loop}
    for r in range(args.runs):
        for n, p in models.items():
            if n in ort_ms:
                run = frontier.Runner(p / "model.onnx", args.threads)
                run.decode(prompt, toks[:2])  # warm-up
                ort_ms[n].append(1e3 * statistics.mean(run.decode(prompt, toks)))
                del run
            if n in genai_ms:
                genai_ms[n].append(frontier.genai_decode_ms(p, prompt[0].tolist(), args.tokens, args.threads))
        print(f"round {r + 1}/{args.runs}", file=sys.stderr, flush=True)
    rows = []
    for n, p in models.items():
        rows.append(
            {
                "name": n,
                "path": str(p),
                "file_mib": sum(f.stat().st_size for f in p.glob("*.onnx*")) / 2**20,
                "ort_decode_ms": statistics.median(ort_ms[n]) if n in ort_ms else None,
                "ort_decode_runs": ort_ms.get(n, []),
                "genai_decode_ms": statistics.median(genai_ms[n]) if n in genai_ms else None,
                "genai_decode_runs": genai_ms.get(n, []),
            }
        )
    out = {
        "command": " ".join(sys.argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_start": load0,
        "load_end": os.getloadavg(),
        "rows": rows,
    }
    lines = [
        "| model | file MiB | ORT session decode ms/token | GenAI loop decode ms/token |",
        "|---|--:|--:|--:|",
    ]
    for r in rows:
        f = lambda x: "" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(
            f"| {r['name']} | {r['file_mib']:.1f} | {f(r['ort_decode_ms'])} | {f(r['genai_decode_ms'])} |"
        )
    lines.append(
        f"\n{args.threads} threads, batch 1, prompt {args.prompt}, {args.tokens} timed steps, median of "
        f"{args.runs} interleaved rounds; load {load0} -> {out['load_end']}"
    )
    print("\n".join(lines))
    args.output.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
