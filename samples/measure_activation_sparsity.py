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

* ``--preset NAME --models smollm2-135m whisper-tiny.en whisper-base``: the README protocol with a
  preset's recipe (``balanced``, the default; its parts fuse into ``FusedFFNNBits``), compressed
  ONCE per model and fused; perplexity (SmolLM2: Matthew, 8000 characters, Genesis calibration;
  Whisper: the dense-transcript perplexity on the dense model's own greedy tokens and the WER of
  greedy transcripts on the offline LibriVox clips, the built-in calibration clips) without
  skipping and with thresholds calibrated for each F on the same compressed model, the realised
  skipped fraction on the calibration data and, for SmolLM2, on the evaluation text.

    OMP_NUM_THREADS=1 python samples/measure_activation_sparsity.py --preset balanced \
        --models smollm2-135m whisper-tiny.en whisper-base --threads 1 \
        --output samples/results/activation_sparsity_balanced.json

* ``--input-sparsity`` (Whisper with ``--preset``): the fractions are ``--input-sparsity`` fractions
  (TEAL-style input thresholds of the ungated FFNs, :func:`ffsplit_export.fused.calibrate_input_thresholds_`;
  neuron skipping exact zeros only), with the realised fraction of skipped input channels on the
  calibration data and while transcribing.

    OMP_NUM_THREADS=1 python samples/measure_activation_sparsity.py --preset balanced --input-sparsity \
        --models whisper-tiny.en --threads 1 --output samples/results/input_sparsity_balanced.json
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


def _eval_skipped(model, run) -> dict:
    """The fraction of (token, light neuron) pairs skipped while ``run()`` evaluates (every fused
    FFN's threshold on; exact zeros included)."""
    from ffsplit_export.fused import _run_batches, fused_modules  # noqa: F401

    counts = {id(m): [0, 0] for m in fused_modules(model)}
    mods = fused_modules(model)

    def rec(module, s_light, a_light):
        skipped = (a_light == 0) | (s_light <= module.threshold)
        if module.product_threshold > 0:
            skipped |= a_light.abs() <= module.product_threshold
        c = counts[id(module)]
        c[0] += int(skipped.sum())
        c[1] += skipped.numel()

    for m in mods:
        m._recorder = rec
    try:
        out = run()
    finally:
        for m in mods:
            m._recorder = None
    per = {m.name: counts[id(m)][0] / max(1, counts[id(m)][1]) for m in mods}
    return {
        "result": out,
        "skipped_fraction_eval": per,
        "skipped_fraction_eval_mean": sum(per.values()) / max(1, len(per)),
    }


def _eval_input_skipped(model, run) -> dict:
    """The fraction of (token, input channel) pairs the light up skips while ``run()`` evaluates
    (every fused FFN's input threshold on)."""
    from ffsplit_export.fused import fused_modules

    mods = [m for m in fused_modules(model) if m.input_threshold > 0]
    counts = {id(m): [0, 0] for m in mods}

    def rec(module, x):
        c = counts[id(module)]
        c[0] += int((x.abs() <= module.input_threshold).sum())
        c[1] += x.numel()

    for m in mods:
        m._input_recorder = rec
    try:
        out = run()
    finally:
        for m in mods:
            m._input_recorder = None
    per = {m.name: counts[id(m)][0] / max(1, counts[id(m)][1]) for m in mods}
    return {
        "result": out,
        "input_skipped_fraction_eval": per,
        "input_skipped_fraction_eval_mean": sum(per.values()) / max(1, len(per)),
    }


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def preset_lm(name: str, preset: str, fractions, max_chars: int, num_samples: int, criteria=(None,)) -> dict:
    """A causal LM (SmolLM2) under ``preset``, README protocol, skipping at each F (PyTorch)."""
    from ffsplit_export.calibrate import make_batches
    from ffsplit_export.config import CompressionConfig
    from ffsplit_export.data.evaldata import calibration_text, eval_text
    from ffsplit_export.eval.evaluate import perplexity_pytorch
    from ffsplit_export.fused import calibrate_thresholds_, fuse_ffns_, fused_modules
    from ffsplit_export.models.loading import load_model
    from ffsplit_export.pipeline import compress

    t0 = time.time()
    model, pre, _ = load_model(name)
    batches = make_batches(model, pre, calibration_text("bible", num_samples), batch_size=8, max_length=128)
    text = eval_text("bible", max_chars)
    cfg = CompressionConfig.from_preset(preset)
    res = compress(model, pre, **cfg.compress_kwargs(), batches=batches, progress=False)
    del model
    _log(f"{name}: compressed with --preset {preset} in {time.time() - t0:.0f} s")
    rec = fuse_ffns_(res.model, 1)

    def ppl():
        with torch.no_grad():
            return perplexity_pytorch(res.model, pre, text, context_length=CTX, stride=CTX).perplexity

    out = {
        "model": name,
        "preset": preset,
        "compression_config": cfg.to_dict(),
        "protocol": f"perplexity on the first {max_chars} characters of Matthew, context = stride = {CTX}; "
        f"calibration {num_samples} verses of Genesis (batch 8, max length 128)",
        "fused": rec,
        "rows": [],
    }
    runs = [(0.0, None)] + [(f, c) for c in criteria for f in fractions]
    for f, crit in runs:
        if f > 0:
            cal = calibrate_thresholds_(res.model, batches, f, criterion=crit)
        else:
            cal = {}
            for m in fused_modules(res.model):
                m.set_threshold(0.0)
                m.product_threshold = 0.0
        ev = _eval_skipped(res.model, ppl)
        p = ev.pop("result")
        base = p if f == 0 else out["rows"][0]["perplexity"]
        row = {"fraction": f, "perplexity": p, "ratio": p / base, **ev, **cal}
        out["rows"].append(row)
        _log(
            f"{name} {preset} F={f:.2f} {cal.get('skip_criterion', '')}: perplexity {p:.4f} (x{p / base:.4f}); "
            f"skipped on calibration {cal.get('skipped_fraction_mean', 0.0):.3f}, on the text "
            f"{ev['skipped_fraction_eval_mean']:.3f}"
        )
    out["seconds"] = round(time.time() - t0, 1)
    return out


def preset_whisper(
    name: str, preset: str, fractions, num_samples: int = 16, input_sparsity: bool = False
) -> dict:
    """A Whisper model under ``preset`` (frontier protocol, PyTorch): WER and dense-transcript perplexity."""
    from ffsplit_export.calibrate import make_batches
    from ffsplit_export.config import CompressionConfig
    from ffsplit_export.data.calibration import load_samples
    from ffsplit_export.data.evaldata import librispeech_clips
    from ffsplit_export.eval.evaluate import transcribe, transcript_perplexity, word_error_rate
    from ffsplit_export.fused import (
        calibrate_input_thresholds_,
        calibrate_thresholds_,
        fuse_ffns_,
        fused_modules,
    )
    from ffsplit_export.models.loading import load_model
    from ffsplit_export.pipeline import compress

    t0 = time.time()
    model, pre, _ = load_model(name)
    model.eval()
    clips = librispeech_clips(None)
    refs = [r for _, r in clips]
    dense_ids = transcribe(model, pre, clips, token_ids=True)
    dense_clips = [(a, h) for (a, _), h in zip(clips, dense_ids)]
    with torch.no_grad():
        dense_tppl = transcript_perplexity(model, pre, dense_clips).perplexity
        dense_wer = word_error_rate(refs, transcribe(model, pre, clips))
    batches = make_batches(model, pre, load_samples(model, None, num_samples), batch_size=8)
    cfg = CompressionConfig.from_preset(preset)
    res = compress(model, pre, **cfg.compress_kwargs(), batches=batches, progress=False)
    del model
    _log(f"{name}: compressed with --preset {preset} in {time.time() - t0:.0f} s")
    rec = fuse_ffns_(res.model, 1)
    res.model.eval()
    out = {
        "model": name,
        "preset": preset,
        "compression_config": cfg.to_dict(),
        "protocol": f"{len(clips)} offline LibriVox clips, greedy; dense-transcript perplexity on the dense "
        f"model's own tokens; calibration {num_samples} built-in clips (batch 8)",
        "dense": {"wer": dense_wer.wer, "transcript_perplexity": dense_tppl},
        "fused": rec,
        "rows": [],
    }

    def measure():
        with torch.no_grad():
            w = word_error_rate(refs, transcribe(res.model, pre, clips))
            tp = transcript_perplexity(res.model, pre, dense_clips).perplexity
        return w, tp

    out["fractions_are"] = "--input-sparsity" if input_sparsity else "--activation-sparsity"
    for f in (0.0, *fractions):
        if f > 0 and input_sparsity:
            cal = calibrate_input_thresholds_(res.model, batches, f)
        elif f > 0:
            cal = calibrate_thresholds_(res.model, batches, f)
        else:
            cal = {}
            for m in fused_modules(res.model):
                m.set_threshold(0.0)
                m.set_input_threshold(0.0)
        ev_in = _eval_input_skipped(res.model, lambda: _eval_skipped(res.model, measure))
        ev = ev_in.pop("result")
        w, tp = ev.pop("result")
        ev.update(ev_in)
        base = tp if f == 0 else out["rows"][0]["transcript_perplexity"]
        errors = w.substitutions + w.deletions + w.insertions
        row = {
            "fraction": f,
            "wer": w.wer,
            "word_errors": errors,
            "words": w.num_words,
            "transcript_perplexity": tp,
            "ratio": tp / base,
            **ev,
            **cal,
        }
        out["rows"].append(row)
        _log(
            f"{name} {preset} F={f:.2f}: WER {w.wer:.4f} ({errors} errors), transcript ppl {tp:.4f} "
            f"(x{tp / base:.4f}); skipped on calibration "
            f"{cal.get('input_skipped_fraction_mean' if input_sparsity else 'skipped_fraction_mean', 0.0):.3f}, "
            f"while transcribing (input channels) {ev['input_skipped_fraction_eval_mean']:.3f}"
        )
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--smollm2", action="store_true")
    ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    ap.add_argument("--max-chars", type=int, default=8000)
    ap.add_argument("--preset", default=None, help="with --models: the preset's recipe (e.g. balanced)")
    ap.add_argument(
        "--models", nargs="+", default=[], help="with --preset: smollm2-135m, whisper-tiny.en, whisper-base"
    )
    ap.add_argument("--num-samples", type=int, default=128, help="SmolLM2 calibration verses")
    ap.add_argument(
        "--criteria",
        nargs="+",
        default=None,
        help="with --preset, text models: --skip-criterion values to compare on the same compressed model "
        "(mixed, gate, product; default: the op's own)",
    )
    ap.add_argument(
        "--input-sparsity",
        action="store_true",
        help="Whisper with --preset: the fractions are --input-sparsity fractions (input channels)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--output", default="activation_sparsity.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"threads": torch.get_num_threads()}
    if args.tiny:
        result["tiny"] = tiny(args.fractions)
    if args.smollm2:
        result["smollm2"] = smollm2(args.fractions, args.max_chars)
    if args.models:
        preset = args.preset or "balanced"
        result["preset"] = preset
        result["models"] = {}
        for name in args.models:
            if "whisper" in name:
                result["models"][name] = preset_whisper(
                    name, preset, args.fractions, input_sparsity=args.input_sparsity
                )
            else:
                result["models"][name] = preset_lm(
                    name, preset, args.fractions, args.max_chars, args.num_samples, args.criteria or (None,)
                )
            with open(args.output, "w") as fh:  # after every model: a long run keeps what it has
                json.dump(result, fh, indent=1)
    with open(args.output, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
