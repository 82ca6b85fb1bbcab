"""Mixed precision by heavy hitters vs uniform GPTQ int4 at (about) equal FFN bytes on SmolLM2-135M.

A small heavy set (1-3 % of each FFN's neurons, chosen by the Hessian OBS saliency
``--heavy-selection hessian``, or by the activation score for the ablation) in int8 / fp16, the
rest int4 (MatMulNBits) with GPTQ; against ``--heavy-fraction 0 --light-format int4 --quantizer gptq``
at group sizes 128 / 64 / 32 (4.25 / 4.5 / 5 bits a weight). Attention and lm_head stay fp32 in every
row, so only the FFNs differ. The README protocol (Matthew 8000 chars, context 256; 128 Genesis
verses for calibration, statistics with Hessians computed once)::

    OMP_NUM_THREADS=1 python samples/mixed_precision.py --output samples/results/mixed_precision
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ffsplit_export.calibrate import calibrate, make_batches
from ffsplit_export.data.evaldata import calibration_text, eval_text
from ffsplit_export.eval.evaluate import perplexity_pytorch
from ffsplit_export.pipeline import compress
from ffsplit_export.split import SplitConfig

CTX = 256
ROWS = {
    "u128": ("uniform int4 g128 gptq", 0.0, "score", dict(group_size=128)),
    "u64": ("uniform int4 g64 gptq", 0.0, "score", dict(group_size=64)),
    "u32": ("uniform int4 g32 gptq", 0.0, "score", dict(group_size=32)),
    "h1": (
        "heavy 1% int8 (hessian) + int4 g128 gptq",
        0.01,
        "hessian",
        dict(group_size=128, heavy_format="int8"),
    ),
    "h3": (
        "heavy 3% int8 (hessian) + int4 g128 gptq",
        0.03,
        "hessian",
        dict(group_size=128, heavy_format="int8"),
    ),
    "s3": (
        "heavy 3% int8 (score) + int4 g128 gptq",
        0.03,
        "score",
        dict(group_size=128, heavy_format="int8"),
    ),
    "h1g64": (
        "heavy 1% int8 (hessian) + int4 g64 gptq",
        0.01,
        "hessian",
        dict(group_size=64, heavy_format="int8"),
    ),
    "h3g64": (
        "heavy 3% int8 (hessian) + int4 g64 gptq",
        0.03,
        "hessian",
        dict(group_size=64, heavy_format="int8"),
    ),
    "f1": (
        "heavy 1% fp16 (hessian) + int4 g128 gptq",
        0.01,
        "hessian",
        dict(group_size=128, heavy_format="fp16"),
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="samples/results/mixed_precision")
    ap.add_argument("--rows", default="u128,u64,h1,h3,s3,f1,u32")
    ap.add_argument("--max-chars", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    from ffsplit_export.models.loading import load_model

    model, pre, _ = load_model("smollm2-135m")
    text = eval_text("bible", args.max_chars)
    batches = make_batches(model, pre, calibration_text("bible", 128), batch_size=8, max_length=128)
    stats = calibrate(model, batches, hessians=True, progress=False)
    dense = perplexity_pytorch(model, pre, text, context_length=CTX, stride=CTX).perplexity
    print(f"dense fp32 ppl {dense:.4f}", flush=True)
    rows = []
    for key in [r for r in args.rows.split(",") if r]:
        name, hf, sel, split = ROWS[key]
        t0 = time.time()
        res = compress(
            model, pre, config=SplitConfig(light_format="int4", quantizer="gptq", **split), heavy_fraction=hf,
            selection=sel, stats=stats, batches=batches, progress=False,
        )  # fmt: skip
        secs = time.time() - t0
        ppl = perplexity_pytorch(res.model, pre, text, context_length=CTX, stride=CTX).perplexity
        rows.append(
            dict(key=key, name=name, ppl=ppl, vs_dense=ppl / dense, ffn_bytes=res.report.bytes,
                 ffn_ratio=res.report.bytes / res.report.dense_bytes, compress_seconds=round(secs, 1))
        )  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        (out / "results.json").write_text(json.dumps({"dense_ppl": dense, "rows": rows}, indent=1))
        del res
    lines = [
        f"SmolLM2-135M, Matthew 8000 chars, ctx {CTX}; dense {dense:.3f}; attention / lm_head fp32 in every row",
        "",
        "| FFN configuration | perplexity | vs dense | FFN MiB | FFN bytes / dense fp32 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['ppl']:.3f} | x{r['vs_dense']:.3f} | {r['ffn_bytes'] / 2**20:.2f} | {r['ffn_ratio']:.4f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
