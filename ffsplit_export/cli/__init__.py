"""``ffsplit-export`` command line: every argparse concern of the package lives in this package.

One module per command group (:mod:`.export`, :mod:`.evaluate` for eval / recover, :mod:`.bench`,
:mod:`.trt`, :mod:`.tools` for analyze / generate / convert-ct2) and the shared options and
``type=`` checks in :mod:`.options`. Library modules never import this package.
"""

from __future__ import annotations

import logging
import sys

from ..errors import FFSplitError
from .options import (
    OneLineParser,
    add_compress_arguments,
    add_export_arguments,
    compress_kwargs,
    split_config_from_args,
)


def build_parser() -> OneLineParser:
    from . import bench, deploy, evaluate, export, tools, trt

    parser = OneLineParser(
        prog="ffsplit-export",
        description="Split transformer FFNs into heavy hitters and a compressed light part; export to ONNX.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tools.add_analyze(sub)
    export.add_commands(sub)
    tools.add_commands(sub)
    trt.add_commands(sub)
    deploy.add_commands(sub)  # triton-repo
    evaluate.add_commands(sub)
    bench.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FFSplitError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


__all__ = [
    "add_compress_arguments",
    "add_export_arguments",
    "build_parser",
    "compress_kwargs",
    "main",
    "split_config_from_args",
]
