"""``ffsplit-export export`` and ``optimum-cli export ffsplit``: one set of options, one runner."""

from __future__ import annotations

import json

from .options import add_export_arguments, export_options_from_args


def run_export(args) -> int:
    from ..config import CompressionConfig
    from ..deploy.quiet import quiet_export
    from ..export.api import export

    config = CompressionConfig.from_args(args)
    options = export_options_from_args(args)
    with quiet_export(getattr(args, "verbose", False)):
        manifest = export(
            args.model, args.output, task=args.task, config=config, options=options, progress=not args.quiet
        )
    wb = manifest["weight_bytes"]
    ffn = manifest["ffn"]
    onnx_total = sum(manifest["onnx_files"].values())
    print(
        f"\nexported {args.model} ({manifest['model_type']}, task {manifest['task']}, target {manifest['target']}) "
        f"to {args.output}"
    )
    for name, size in manifest["onnx_files"].items():
        print(f"  {name}: {size / 2**20:.2f} MiB")
    print(
        f"FFN weights {ffn['ffn_dense_bytes'] / 2**20:.2f} -> {ffn['ffn_bytes'] / 2**20:.2f} MiB "
        f"({ffn['ffn_size_ratio']:.3f} of dense); all weights {wb['dense_fp32'] / 2**20:.2f} -> "
        f"{wb['compressed'] / 2**20:.2f} MiB ({wb['ratio']:.3f}); ONNX files {onnx_total / 2**20:.2f} MiB"
    )
    if manifest.get("validation"):
        worst = max(
            (max(r.get("outputs", {}).values(), default=0.0) for r in manifest["validation"].values()),
            default=0.0,
        )
        print(
            f"validation: max |ONNX Runtime - PyTorch| = {worst:.3g} over {len(manifest['validation'])} files"
        )
    if manifest.get("note"):
        print("note:", manifest["note"])
    if getattr(args, "json", False):
        print(json.dumps(manifest, indent=1))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "export", help="split, compress and export to ONNX (optimum file layout + ffsplit.json)"
    )
    add_export_arguments(p)
    p.set_defaults(func=run_export)
