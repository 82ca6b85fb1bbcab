"""CLI wiring of the deployment commands: ``triton-repo`` and ``generate --runtime genai``."""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    p = sub.add_parser(
        "triton-repo",
        help="a Triton Inference Server model repository of an export (config.pbtxt per ONNX file)",
    )
    p.add_argument("output", help="a directory written by `ffsplit-export export`")
    p.add_argument("repo", help="the model repository to write")
    p.add_argument(
        "--mount",
        default=None,
        help="where REPO will be on the server (for the library path in model_operations); default: REPO here",
    )
    p.add_argument("--prefix", default="", help="prefix of every model name (default: the ONNX file's name)")
    p.add_argument(
        "--max-batch-size", type=int, default=8, help="for graphs Triton may batch (default 8; 0 = off)"
    )
    p.add_argument("--instances", type=int, default=1, help="instance_group count (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing REPO")
    p.set_defaults(func=run_triton_repo)


def run_triton_repo(args: argparse.Namespace) -> int:
    from .triton_repo import write_triton_repo

    configs = write_triton_repo(
        args.output,
        args.repo,
        mount=args.mount,
        prefix=args.prefix,
        max_batch_size=args.max_batch_size,
        instances=args.instances,
        overwrite=args.overwrite,
    )
    for c in configs:
        print(f"wrote {c}")
    print(f"serve with: tritonserver --model-repository={args.repo} (not run here)")
    return 0


def run_generate_genai(args: argparse.Namespace) -> int:
    """``generate --runtime genai``: the same prompt through ONNX Runtime GenAI's generation loop."""
    from .genai import _og, genai_generate, genai_model

    og = _og()
    model = genai_model(args.output)
    tok = og.Tokenizer(model)
    prompt = args.prompt
    if not args.raw:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(args.output)
        if getattr(hf, "chat_template", None):
            prompt = hf.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
    ids = [int(i) for i in tok.encode(prompt)]
    new, dt = genai_generate(args.output, ids, args.max_new_tokens, model=model)
    print(tok.decode(new).strip())
    print(
        f"\n[{len(new)} new tokens in {dt:.2f} s, {len(new) / dt if dt else 0.0:.1f} tokens/s, "
        "through ONNX Runtime GenAI with the bundled ffsplit library]"
    )
    return 0
