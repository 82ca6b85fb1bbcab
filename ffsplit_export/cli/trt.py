"""``ffsplit-export trt-plugin`` and ``ffsplit-export trt-build``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import export_dir, new_file_or_dir


def _archs(text: str) -> str:
    """The --arch text itself, once every part names a supported GPU arch."""
    from ..errors import ConfigError
    from ..trt.aot import parse_archs

    try:
        parse_archs(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--arch ")) from None
    return text


def add_trt_plugin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--aot-only", action="store_true", help="only compile the kernels (no TensorRT, no GPU)"
    )
    parser.add_argument(
        "--arch", type=_archs, default="sm_80,sm_90", help="comma list of GPU archs (default: sm_80,sm_90)"
    )
    parser.add_argument(
        "--output",
        required=True,
        type=lambda text: Path(new_file_or_dir(text)),
        help="folder for PTX, cubin and summary.json",
    )


def run_trt_plugin(args: argparse.Namespace) -> int:
    """Compile every kernel x tile config x arch; print the resource table."""
    from ..trt.aot import compile_all, format_table, parse_archs

    archs = parse_archs(args.arch)
    if not args.aot_only:
        from ..trt.engine import require_tensorrt

        require_tensorrt(need_gpu=False)  # checks the plugins register with this TensorRT
    summary = compile_all(args.output, archs)
    print(format_table(summary))
    print(f"wrote {len(summary['kernels'])} kernels and summary.json to {args.output}")
    return 0


def add_trt_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "output",
        type=lambda text: Path(export_dir(text)),
        help="export directory (ONNX files + ffsplit.json)",
    )
    prec = parser.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="allow FP16 (TensorRT 10 weakly typed build only)")
    prec.add_argument("--bf16", action="store_true", help="allow BF16 (TensorRT 10 weakly typed build only)")
    parser.add_argument(
        "--engine-dir", type=Path, default=None, help="where engines go (default OUTPUT/tensorrt)"
    )


def run_trt_build(args: argparse.Namespace) -> int:
    from ..trt.engine import build_engines

    for p in build_engines(args.output, args.engine_dir, fp16=args.fp16, bf16=args.bf16):
        print(p)
    return 0


def add_commands(sub) -> None:
    """``trt-plugin`` and ``trt-build``."""
    p = sub.add_parser(
        "trt-plugin", help="compile the Triton kernels of the TensorRT plugin ahead of time (no GPU needed)"
    )
    add_trt_plugin_arguments(p)
    p.set_defaults(func=run_trt_plugin)
    p = sub.add_parser(
        "trt-build", help="build TensorRT engines of a --target tensorrt export (needs TensorRT + GPU)"
    )
    add_trt_build_arguments(p)
    p.set_defaults(func=run_trt_build)
