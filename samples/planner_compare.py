"""The measured budget planner vs a fixed heavy fraction at equal FFN bytes on SmolLM2-135M (issue 11).

The README protocol: perplexity on the first 8000 characters of the Gospel of Matthew (context 256,
stride 256), calibration on 128 verses of Genesis, statistics computed once and shared by every row.
For each fixed operating point (heavy 0.1 + a light format) the FFN byte ratio of its split is the
budget (``--size-budget``) given to the measured planner (``--planner measured``, candidates over
``--formats``) and to the old score^2 proxy planner (``--planner proxy``). Reported per row: the
perplexity (PyTorch), the FFN bytes, and the planner's objective (summed relative FFN output error
on the sampled calibration inputs) for the fixed split and the plan::

    OMP_NUM_THREADS=1 python samples/planner_compare.py --output samples/results/planner_compare
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from ffsplit_export.adapters import find_ffns
from ffsplit_export.calibrate import calibrate, make_batches
from ffsplit_export.data.evaldata import calibration_text, eval_text
from ffsplit_export.eval.evaluate import perplexity_pytorch
from ffsplit_export.pipeline import compress
from ffsplit_export.plan import (
    default_candidates,
    ffn_inputs,
    measured_error,
    plan_fraction,
    plan_measured,
)
from ffsplit_export.split import SplitConfig, split_ffn_

CTX = 256

POINTS = {
    "default": ("heavy 0.1 fp32 + sparse-int8@0.5 wanda (CLI default)", dict(light_format="sparse-int8")),
    "int4": (
        "heavy 0.1 int8 + sparse-int4 g32@0.5 wanda",
        dict(light_format="sparse-int4", heavy_format="int8", group_size=32),
    ),
    "s75": ("heavy 0.1 fp32 + sparse-int8@0.75 wanda", dict(light_format="sparse-int8", light_sparsity=0.75)),
    # uniform (no heavy set): what the measured planner mostly picks at the CLI default's bytes
    "int8u": ("heavy 0 + int8 (MatMulNBits)", dict(light_format="int8"), 0.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="samples/results/planner_compare")
    ap.add_argument("--points", default="default,int4")
    ap.add_argument("--formats", default="sparse-int8,sparse-int4,int8,int4")
    ap.add_argument("--fixed-only", action="store_true", help="only the fixed rows (no planner)")
    ap.add_argument("--objectives", default="relative,absolute", help="planner objectives, one row each")
    ap.add_argument("--no-proxy", action="store_true", help="skip the proxy planner row")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--max-chars", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    from ffsplit_export.models.loading import load_model

    model, pre, _ = load_model("smollm2-135m")
    specs = find_ffns(model)
    text = eval_text("bible", args.max_chars)
    batches = make_batches(model, pre, calibration_text("bible", 128), batch_size=8, max_length=128)
    stats = calibrate(model, batches, hessians=False, progress=False)
    dense = perplexity_pytorch(model, pre, text, context_length=CTX, stride=CTX).perplexity
    print(f"dense fp32 ppl {dense:.4f}", flush=True)
    xs = ffn_inputs(model, specs, batches, args.max_tokens)
    rows = [dict(name="dense fp32", ppl=dense)]
    formats = [f for f in args.formats.split(",") if f]

    def ppl_of(m) -> float:
        return perplexity_pytorch(m, pre, text, context_length=CTX, stride=CTX).perplexity

    def save():
        (out / "results.json").write_text(json.dumps({"dense_ppl": dense, "rows": rows}, indent=1))

    for key in [p for p in args.points.split(",") if p]:
        label, split, *hf = POINTS[key]
        hf = hf[0] if hf else 0.1
        cfg = SplitConfig(**split)
        fixed = copy.deepcopy(model)
        rep = split_ffn_(fixed, plan_fraction(stats, hf), cfg, stats, specs, progress=False)
        budget = rep.bytes / rep.dense_bytes
        err_fixed = sum(measured_error(fixed, specs, xs, model))
        rows.append(
            dict(point=key, name=f"fixed: {label}", ppl=ppl_of(fixed), ffn_bytes=rep.bytes,
                 ffn_ratio=budget, summed_rel_error=err_fixed)
        )  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        del fixed
        if args.fixed_only:
            save()
            continue
        t0 = time.time()
        cands = default_candidates(cfg, formats)
        mp = plan_measured(
            model,
            specs,
            stats,
            batches,
            cfg,
            budget,
            candidates=cands,
            max_tokens=args.max_tokens,
            progress=True,
        )
        secs = time.time() - t0
        for objective in args.objectives.split(","):
            if objective != mp.objective:  # same measurements, other objective
                mp = plan_measured(model, specs, stats, batches, cfg, budget, measures=mp.measures,
                                   objective=objective)  # fmt: skip
            planned = copy.deepcopy(model)
            rep_p = split_ffn_(planned, mp.heavy, cfg, stats, specs, progress=False, layer_configs=mp.configs)
            err_plan = sum(measured_error(planned, specs, xs, model))
            rows.append(
                dict(point=key, name=f"measured planner ({objective}) at {budget:.4f} ({len(cands)} cand./FFN)",
                     ppl=ppl_of(planned), ffn_bytes=rep_p.bytes, ffn_ratio=rep_p.bytes / rep_p.dense_bytes,
                     summed_rel_error=err_plan, plan_seconds=round(secs, 1),
                     choices=[r["choice"] for r in mp.layers])
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
            del planned
        if args.no_proxy:
            save()
            continue
        res = compress(
            model, pre, config=cfg, size_budget=budget, planner="proxy", stats=stats, batches=batches,
            progress=False,
        )  # fmt: skip
        err_proxy = sum(measured_error(res.model, specs, xs, model))
        rows.append(
            dict(point=key, name=f"proxy planner at {budget:.4f}", ppl=ppl_of(res.model),
                 ffn_bytes=res.report.bytes, ffn_ratio=res.report.bytes / res.report.dense_bytes,
                 summed_rel_error=err_proxy)
        )  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        del res
        save()
    lines = [
        f"SmolLM2-135M, Matthew 8000 chars, ctx {CTX}; dense {dense:.3f}",
        "",
        "| row | perplexity | vs dense | FFN bytes (ratio) | summed rel. FFN error |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows[1:]:
        lines.append(
            f"| {r['name']} | {r['ppl']:.3f} | x{r['ppl'] / dense:.3f} | {r['ffn_bytes']} ({r['ffn_ratio']:.4f}) | "
            f"{r['summed_rel_error']:.4f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    save()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
