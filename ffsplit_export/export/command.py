"""``ffsplit-export export`` and ``optimum-cli export ffsplit``: one set of options, one runner."""

from __future__ import annotations

import argparse
import json


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import add_compress_arguments

    p.add_argument(
        "model", help="built-in name (tiny-t5, smollm2-135m, whisper-tiny.en, ...), model dir or hub id"
    )
    p.add_argument("output", help="output directory (written atomically)")
    add_compress_arguments(p)
    p.add_argument(
        "--target", default="ort-cpu", help="ort-cpu (default, ffsplit custom ops), portable, tensorrt"
    )
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.add_argument(
        "--atol", type=float, default=None, help="validation tolerance (default 2e-3; 0.5 with int8 compute)"
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: optimum's for the model)")
    p.add_argument(
        "--nbits-accuracy-level",
        type=int,
        default=0,
        help="MatMulNBits accuracy_level: 0 = exact fp32 compute (default), 4 = int8 activations (faster)",
    )
    p.add_argument(
        "--trt-dense-24",
        action="store_true",
        help="with --target tensorrt and 2:4-int8: dense 2:4 weights for TensorRT's sparse tensor cores",
    )
    p.add_argument(
        "--fused-ffn",
        action="store_true",
        help="ort-cpu: one ffsplit::FusedFFN node per split FFN (heavy fp32, light sparse-int8)",
    )
    p.add_argument(
        "--activation-sparsity",
        default="0",
        help="0 (default, off) or 'exact': skip light neurons whose activation is exactly zero "
        "(lossless; ReLU models); implies --fused-ffn",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="show PyTorch tracer warnings and optimum's messages"
    )


def export_options_from_args(args):
    """The ExportOptions of the options that :func:`add_export_arguments` adds."""
    from .core import ExportOptions

    return ExportOptions(
        target=args.target,
        validate=not args.no_validate,
        overwrite=args.overwrite,
        atol=args.atol,
        opset=args.opset,
        nbits_accuracy_level=args.nbits_accuracy_level,
        trt_dense_24=args.trt_dense_24,
        fused_ffn=getattr(args, "fused_ffn", False),
        activation_sparsity=getattr(args, "activation_sparsity", "0"),
    )


def run_export(args) -> int:
    from ..cli import compress_kwargs
    from .api import export

    kw = compress_kwargs(args)
    config = kw.pop("config")
    options = export_options_from_args(args)
    from ..deploy.quiet import quiet_export

    with quiet_export(getattr(args, "verbose", False)):
        manifest = export(args.model, args.output, task=args.task, config=config, options=options, **kw)
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
    p = sub.add_parser("generate", help="greedy text generation with an exported causal or seq2seq LM")
    p.add_argument("output", help="a directory written by `ffsplit-export export`")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    p.add_argument(
        "--runtime", default="ort", choices=("ort", "genai"), help="ort (optimum ORTModel, default) or genai"
    )
    p.set_defaults(func=run_generate)


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
