"""Calibrated activation sparsity (``--activation-sparsity F``): skipped fractions and accuracy.

* ``--tiny``: every tiny family, compressed with the CLI defaults and fused; per FFN the calibrated
  threshold and the fraction of (token, light neuron) pairs skipped on the calibration data with
  every layer's threshold on, for each F.
* ``--smollm2``: SmolLM2-135M-Instruct (offline weights), the README protocol (perplexity on the
  first 8000 characters of Matthew, context = stride = 256, calibration on 128 verses of Genesis),
  the same compressed model (CLI defaults: heavy 0.1 fp32 + light sparse-int8 @ 0.5 wanda) fused,
  without skipping and with thresholds calibrated for each F (PyTorch; the FusedFFN module computes
  what the op computes).

    python samples/measure_activation_sparsity.py --tiny --smollm2 --output activation_sparsity.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

FRACTIONS = (0.25, 0.4, 0.5)
CTX = 256


def tiny(fractions) -> list[dict]:
    from ffsplit_export.fused import calibrate_thresholds_, fuse_ffns_
    from ffsplit_export.models.tiny import build_tiny
    from ffsplit_export.pipeline import compress

    rows = []
    for name in (
        "tiny-llama",
        "tiny-t5",
        "tiny-t5-gated",
        "tiny-opt",
        "tiny-mpt",
        "tiny-gpt2",
        "tiny-whisper",
    ):
        model, pre, _ = build_tiny(name)
        res = compress(model, pre, num_samples=32, progress=False)
        rec = fuse_ffns_(res.model, 1)
        for f in fractions:
            cal = calibrate_thresholds_(res.model, res.batches, f)
            rows.append({"model": name, "fraction": f, "kept_subgraph": rec["kept_subgraph"], **cal})
            per = " ".join(f"{v:.3f}" for v in cal["skipped_fraction"].values())
            print(f"{name:14s} F={f:.2f} skipped per FFN: {per}", flush=True)
    return rows


def smollm2(fractions, max_chars: int) -> dict:
    from ffsplit_export.calibrate import make_batches
    from ffsplit_export.data.evaldata import calibration_text, eval_text
    from ffsplit_export.eval.evaluate import perplexity_pytorch
    from ffsplit_export.fused import calibrate_thresholds_, fuse_ffns_, fused_modules
    from ffsplit_export.models.loading import load_model
    from ffsplit_export.pipeline import compress

    model, pre, _ = load_model("smollm2-135m")
    batches = make_batches(model, pre, calibration_text("bible", 128), batch_size=8, max_length=128)
    text = eval_text("bible", max_chars)
    t0 = time.time()
    res = compress(model, pre, batches=batches, progress=False)
    rec = fuse_ffns_(res.model, 1)
    out = {"recipe": "heavy 0.1 fp32 + light sparse-int8@0.5 wanda (CLI defaults)", "fused": rec, "rows": []}

    def ppl():
        with torch.no_grad():
            return perplexity_pytorch(res.model, pre, text, context_length=CTX, stride=CTX).perplexity

    base = ppl()
    out["rows"].append({"fraction": 0.0, "perplexity": base, "ratio": 1.0})
    print(f"smollm2 F=0.00 perplexity {base:.4f}", flush=True)
    for f in fractions:
        cal = calibrate_thresholds_(res.model, batches, f)
        p = ppl()
        out["rows"].append({"fraction": f, "perplexity": p, "ratio": p / base, **cal})
        print(
            f"smollm2 F={f:.2f} perplexity {p:.4f} (x{p / base:.4f}); skipped on calibration data "
            f"{cal['skipped_fraction_mean']:.3f}",
            flush=True,
        )
    for m in fused_modules(res.model):
        m.set_threshold(0.0)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--smollm2", action="store_true")
    ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    ap.add_argument("--max-chars", type=int, default=8000)
    ap.add_argument("--output", default="activation_sparsity.json")
    args = ap.parse_args()
    result = {"threads": torch.get_num_threads()}
    if args.tiny:
        result["tiny"] = tiny(args.fractions)
    if args.smollm2:
        result["smollm2"] = smollm2(args.fractions, args.max_chars)
    with open(args.output, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
