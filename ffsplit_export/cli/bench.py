"""``ffsplit-export bench`` (and ``samples/bench_e2e.py``): the options of the end-to-end benchmark.

Every value is checked here, before :func:`ffsplit_export.bench.run` builds anything into ``--work``.
"""

from __future__ import annotations

import argparse

from ..formats import HeavyFormat, LightFormat
from .options import (
    OneLineParser,
    format_name,
    fraction,
    fraction_list,
    isa_list,
    new_file_or_dir,
    nonnegative_int,
    positive_int,
    positive_int_list,
    preset_list,
)


def _output_file(text: str) -> str:
    """The JSON results file: anything but an existing folder."""
    import os

    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; pass a JSON file path")
    return text


def _sparsities(text: str) -> list[float]:
    return [] if text.strip().lower() == "none" else fraction_list(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``bench`` / ``samples/bench_e2e.py``."""
    p.add_argument(
        "--work", type=new_file_or_dir, default="bench-work", help="cache of built / exported models (reused)"
    )
    p.add_argument("--output", type=_output_file, default="bench_e2e.json", help="JSON results file")
    p.add_argument("--threads", type=positive_int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--runs", type=positive_int, default=5, help="timed runs per variant (interleaved)")
    p.add_argument("--tokens", type=positive_int, default=32, help="decode steps per run")
    p.add_argument(
        "--prompt", type=positive_int, default=32, help="prompt length before the timed decode steps"
    )
    p.add_argument("--prefill", default="32,256", type=positive_int_list, help="prefill lengths to time")
    p.add_argument(
        "--sparsities",
        default="0.5,0.75,0.9",
        type=_sparsities,
        help="ffsplit light sparsities (with the options below), or none",
    )
    p.add_argument(
        "--presets",
        default="",
        type=preset_list,
        help="also export each named preset (e.g. accurate,balanced,fast; quantizer rtn: random weights)",
    )
    p.add_argument("--light-format", type=format_name(LightFormat), default="sparse-int8")
    p.add_argument("--heavy-format", type=format_name(HeavyFormat), default="int8")
    p.add_argument("--heavy-fraction", type=fraction, default=0.1)
    p.add_argument(
        "--num-samples", type=positive_int, default=8, help="calibration samples (random weights: speed only)"
    )
    p.add_argument(
        "--untied-int4",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also a MatMulNBits int4 row whose tied lm_head is quantized (as ffsplit's --other-linear does)",
    )
    p.add_argument(
        "--isa",
        default="auto",
        type=isa_list,
        help="FFSPLIT_ISA values to run each ffsplit export under, e.g. auto,avx512vnni (one row each)",
    )
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument(
        "--flush-cache",
        action="store_true",
        help="read 1 GiB before every decode step (untimed) so weights come from DRAM",
    )
    p.add_argument(
        "--quick", action="store_true", help="small shape (d_model 1024, 4 layers) for a smoke run"
    )


def run_bench(args) -> int:
    from .. import bench

    args._load0 = bench._loadavg()
    bench.run(args)
    return 0


def add_commands(sub) -> None:
    """Register ``bench`` on an argparse subparsers object."""
    from .. import bench

    p = sub.add_parser(
        "bench",
        help="end-to-end decode / prefill speed against dense fp32 and MatMulNBits",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run_bench)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``samples/bench_e2e.py``."""
    import sys

    from .. import bench
    from ..errors import FFSplitError

    p = OneLineParser(description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    try:
        return run_bench(p.parse_args(argv))
    except FFSplitError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
