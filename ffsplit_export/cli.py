"""``ffsplit-export`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .errors import FFSplitError


def add_compress_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by analyze / export / eval / bench (the table of DESIGN.md)."""
    p.add_argument("--task", default="auto", help="optimum task name, or auto (default)")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--heavy-fraction",
        type=float,
        default=None,
        help="fraction of FFN neurons kept dense per layer (default 0.1)",
    )
    g.add_argument(
        "--size-budget",
        type=float,
        default=None,
        help="target FFN bytes as a fraction of dense fp32; the planner allocates heavy neurons across layers",
    )
    p.add_argument(
        "--light-format",
        default="sparse-int8",
        help="sparse-int8 (default), sparse-int4, sparse-fp32, 2:4-int8, int8, int4, lowrank, dense",
    )
    p.add_argument(
        "--light-sparsity",
        type=float,
        default=0.5,
        help="unstructured sparsity of the light part (default 0.5)",
    )
    p.add_argument("--prune-method", default="wanda", help="magnitude, wanda (default), sparsegpt")
    p.add_argument("--heavy-format", default="fp32", help="fp32 (default), fp16, int8")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="prune FFN by FFN from the statistics of the already compressed model (slower, more accurate)",
    )
    p.add_argument(
        "--other-linear",
        default="fp32",
        help="fp32 (default), int8, int4: attention and lm_head as MatMulNBits",
    )
    p.add_argument(
        "--embedding",
        default="fp32",
        help="fp32 (default), int8: the token embedding table as block-wise int8 (GatherBlockQuantized)",
    )
    p.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64, 128 (default)")
    p.add_argument(
        "--heavy-selection", default="score", help="score (default), act_norm, random (for ablations)"
    )
    p.add_argument(
        "--calibration",
        default=None,
        help=(
            "text file (one sample per line), WAV folder, datasets dir, or an offline text source "
            "(bible, fortunes, gensim: the half disjoint from eval's); default: built-in sample"
        ),
    )
    p.add_argument("--num-samples", type=int, default=64, help="calibration samples (default 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128, help="calibration tokens per text sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def split_config_from_args(args):
    from .split import SplitConfig

    return SplitConfig(
        light_format=args.light_format,
        light_sparsity=args.light_sparsity,
        prune_method=args.prune_method,
        heavy_format=args.heavy_format,
        group_size=args.group_size,
    )


def compress_kwargs(args) -> dict:
    return dict(
        config=split_config_from_args(args),
        heavy_fraction=args.heavy_fraction if args.size_budget is None else None,
        size_budget=args.size_budget,
        selection=args.heavy_selection,
        other_linear=args.other_linear,
        embedding=args.embedding,
        calibration=args.calibration,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        sequential=args.sequential,
        progress=not args.quiet,
    )


# ------------------------------------------------------------------------------ analyze


def cmd_analyze(args) -> int:
    from .calibrate import stats_to_json
    from .loading import load_model
    from .pipeline import compress, model_output
    from .report import format_table, plot_heavy_hitters, summary_rows

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
    from .convert_ct2 import convert_ct2

    out = convert_ct2(args.ct2_dir, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out} (load it with WhisperForConditionalGeneration.from_pretrained)")
    return 0


# ------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ffsplit-export",
        description="Split transformer FFNs into heavy hitters and a compressed light part; export to ONNX.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="heavy-hitter statistics and plots")
    p.add_argument("model", help="built-in name (tiny-t5, smollm2-135m, ...), model dir or hub id")
    p.add_argument("--output", required=True, help="output directory")
    add_compress_arguments(p)
    p.set_defaults(func=cmd_analyze)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """Commands implemented in their own modules (imported lazily when run)."""
    from .export.command import add_commands as add_export

    add_export(sub)
    from .deploy.commands import add_commands as add_deploy

    add_deploy(sub)  # triton-repo
    from .trt import commands as trt

    p = sub.add_parser(
        "trt-plugin", help="compile the Triton kernels of the TensorRT plugin ahead of time (no GPU needed)"
    )
    trt.add_trt_plugin_arguments(p)
    p.set_defaults(func=trt.run_trt_plugin)
    p = sub.add_parser(
        "trt-build", help="build TensorRT engines of a --target tensorrt export (needs TensorRT + GPU)"
    )
    trt.add_trt_build_arguments(p)
    p.set_defaults(func=trt.run_trt_build)
    p = sub.add_parser(
        "convert-ct2", help="CTranslate2 Whisper weights (model.bin) to a transformers directory"
    )
    p.add_argument(
        "ct2_dir", help="directory with model.bin (or model.bin.part1/2), config.json, tokenizer files"
    )
    p.add_argument("out_dir", help="output transformers directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.set_defaults(func=cmd_convert_ct2)
    import importlib
    import importlib.util

    for module in ("ffsplit_export.commands_eval", "ffsplit_export.bench"):  # eval / recover, bench
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).add_commands(sub)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FFSplitError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
