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
        results = manifest["validation"].values()
        # the exact path (accuracy_level 0) is what max abs difference judges; int8-activation files
        # (accuracy_level 4) are judged by relative L2 error and top-1 agreement, not by that number
        worst = max(
            (
                max(
                    r.get("exact_outputs" if r.get("accuracy_level", 0) else "outputs", {}).values(),
                    default=0.0,
                )
                for r in results
            ),
            default=0.0,
        )
        line = (
            f"validation passed over {len(manifest['validation'])} files: exact path max |ONNX Runtime - "
            f"PyTorch| = {worst:.3g}"
        )
        approx = [r for r in results if r.get("accuracy_level", 0)]
        if approx:
            rel = max(
                (r["rel_l2"].get(n, 0.0) for r in approx for n in r.get("approx_gated", r.get("rel_l2", {}))),
                default=0.0,
            )
            top1 = min((min(r.get("top1_agreement", {}).values(), default=1.0) for r in approx), default=1.0)
            line += f"; accuracy_level 4: relative L2 <= {rel:.3g}, top-1 agreement {top1:.3g}"
        print(line)
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
