"""``ffsplit-export triton-repo``: its options (checked at parse time); the runner is in :mod:`..deploy.commands`."""

from __future__ import annotations

from .options import export_dir, new_file_or_dir, nonnegative_int, positive_int


def add_commands(sub) -> None:
    from ..deploy.commands import run_triton_repo

    p = sub.add_parser(
        "triton-repo",
        help="a Triton Inference Server model repository of an export (config.pbtxt per ONNX file)",
    )
    p.add_argument("output", type=export_dir, help="a directory written by `ffsplit-export export`")
    p.add_argument("repo", type=new_file_or_dir, help="the model repository to write")
    p.add_argument(
        "--mount",
        default=None,
        help="where REPO will be on the server (for the library path in model_operations); default: REPO here",
    )
    p.add_argument("--prefix", default="", help="prefix of every model name (default: the ONNX file's name)")
    p.add_argument(
        "--max-batch-size",
        type=nonnegative_int,
        default=8,
        help="for graphs Triton may batch (default 8; 0 = off)",
    )
    p.add_argument("--instances", type=positive_int, default=1, help="instance_group count (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing REPO")
    p.set_defaults(func=run_triton_repo)
