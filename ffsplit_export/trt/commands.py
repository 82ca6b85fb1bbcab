"""CLI handlers of ``ffsplit-export trt-plugin`` and ``ffsplit-export trt-build`` (wired in cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_trt_plugin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--aot-only", action="store_true", help="only compile the kernels (no TensorRT, no GPU)"
    )
    parser.add_argument(
        "--arch", default="sm_80,sm_90", help="comma list of GPU archs (default: sm_80,sm_90)"
    )
    parser.add_argument("--output", required=True, type=Path, help="folder for PTX, cubin and summary.json")


def run_trt_plugin(args: argparse.Namespace) -> int:
    """Compile every kernel x tile config x arch; print the resource table."""
    from .aot import compile_all, format_table, parse_archs

    archs = parse_archs(args.arch)
    if not args.aot_only:
        from .engine import require_tensorrt

        require_tensorrt(need_gpu=False)  # checks the plugins register with this TensorRT
    summary = compile_all(args.output, archs)
    print(format_table(summary))
    print(f"wrote {len(summary['kernels'])} kernels and summary.json to {args.output}")
    return 0


def add_trt_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", type=Path, help="export directory (ONNX files + ffsplit.json)")
    prec = parser.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="allow FP16 (TensorRT 10 weakly typed build only)")
    prec.add_argument("--bf16", action="store_true", help="allow BF16 (TensorRT 10 weakly typed build only)")
    parser.add_argument(
        "--engine-dir", type=Path, default=None, help="where engines go (default OUTPUT/tensorrt)"
    )


def run_trt_build(args: argparse.Namespace) -> int:
    from .engine import build_engines

    for p in build_engines(args.output, args.engine_dir, fp16=args.fp16, bf16=args.bf16):
        print(p)
    return 0
