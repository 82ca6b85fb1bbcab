"""``ffsplit-export analyze``, ``generate`` and ``convert-ct2``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .options import (
    add_compress_arguments,
    compress_kwargs,
    existing_dir,
    export_dir,
    new_file_or_dir,
    positive_int,
    split_config_from_args,
)


def add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="heavy-hitter statistics and plots")
    p.add_argument("model", help="built-in name (tiny-t5, smollm2-135m, ...), model dir or hub id")
    p.add_argument("--output", required=True, type=new_file_or_dir, help="output directory")
    add_compress_arguments(p)
    p.set_defaults(func=cmd_analyze)


def add_commands(sub) -> None:
    """``generate`` and ``convert-ct2``."""
    p = sub.add_parser("generate", help="greedy text generation with an exported causal or seq2seq LM")
    p.add_argument("output", type=export_dir, help="a directory written by `ffsplit-export export`")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-new-tokens", type=positive_int, default=40)
    p.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    p.add_argument(
        "--runtime", default="ort", choices=("ort", "genai"), help="ort (optimum ORTModel, default) or genai"
    )
    p.set_defaults(func=run_generate)
    p = sub.add_parser(
        "convert-ct2", help="CTranslate2 Whisper weights (model.bin) to a transformers directory"
    )
    p.add_argument(
        "ct2_dir",
        type=existing_dir,
        help="directory with model.bin (or model.bin.part1/2), config.json, tokenizer files",
    )
    p.add_argument("out_dir", type=new_file_or_dir, help="output transformers directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.set_defaults(func=cmd_convert_ct2)


def cmd_analyze(args) -> int:
    from ..calibrate import stats_to_json
    from ..eval.report import format_table, plot_heavy_hitters, summary_rows
    from ..models.loading import load_model
    from ..pipeline import compress, model_output

    out = Path(args.output)
    t0 = time.time()
    model, pre, task = load_model(args.model, args.task)
    split_cfg = split_config_from_args(args)  # validate options before the long steps
    res = compress(model, pre, **compress_kwargs(args))
    out.mkdir(parents=True, exist_ok=True)
    data = stats_to_json(res.stats)
    data.update(model=args.model, task=task, model_type=model.config.model_type)
    (out / "heavy_hitters.json").write_text(json.dumps(data))
    plots = plot_heavy_hitters(res.stats, out)
    rows = summary_rows(res.stats)
    print(
        f"\nHeavy hitters of {args.model} ({model.config.model_type}, {len(rows)} FFNs): "
        "share of summed FFN output norm carried by the top neurons"
    )
    print(format_table(rows))
    ref = model_output(model, res.batches[0])
    new = model_output(res.model, res.batches[0])
    diff = float((ref - new).abs().max())
    rep = res.report
    print(
        f"\nSplit: heavy {(args.heavy_fraction or 0.1) if args.size_budget is None else f'budget {args.size_budget}'} / light {split_cfg.light_format} "
        f"at sparsity {split_cfg.light_sparsity} ({split_cfg.prune_method}), heavy {split_cfg.heavy_format}"
    )
    print(
        f"FFN weights: {rep.dense_bytes / 2**20:.1f} MiB dense fp32 -> {rep.bytes / 2**20:.1f} MiB "
        f"({rep.bytes / rep.dense_bytes:.3f} of dense, {100 * (1 - rep.bytes / rep.dense_bytes):.1f} % smaller)"
    )
    print(f"max |output difference| vs the original on a calibration batch: {diff:.4g}")
    summary = {
        "split": rep.to_dict(),
        "other_linear": res.other_linear,
        "embedding": res.embedding,
        "max_abs_diff": diff,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "split_summary.json").write_text(json.dumps(summary, indent=1))
    print(
        f"wrote {out / 'heavy_hitters.json'}, {', '.join(str(p) for p in plots)}, {out / 'split_summary.json'}"
    )
    return 0


def cmd_convert_ct2(args) -> int:
    from ..models.convert_ct2 import convert_ct2

    out = convert_ct2(args.ct2_dir, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out} (load it with WhisperForConditionalGeneration.from_pretrained)")
    return 0


def run_generate(args) -> int:
    """Greedy generation with an export through ONNX Runtime (the ffsplit library registered)."""
    import time

    from transformers import AutoTokenizer

    from ..runtime import load

    if getattr(args, "runtime", "ort") == "genai":
        from ..deploy.commands import run_generate_genai

        return run_generate_genai(args)

    model = load(args.output)
    tok = AutoTokenizer.from_pretrained(args.output)
    prompt = args.prompt
    if getattr(tok, "chat_template", None) and not args.raw:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    enc = tok(prompt, return_tensors="pt")
    t0 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
    dt = time.perf_counter() - t0
    new = out[0, enc["input_ids"].shape[1] :]
    print(tok.decode(new, skip_special_tokens=True).strip())
    print(
        f"\n[{len(new)} new tokens in {dt:.2f} s, {len(new) / dt if dt else 0.0:.1f} tokens/s, "
        "through ONNX Runtime with the ffsplit library]"
    )
    return 0
