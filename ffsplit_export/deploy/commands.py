"""Runners of the deployment commands: ``triton-repo`` (options in :mod:`ffsplit_export.cli.deploy`) and
``generate --runtime genai``."""

from __future__ import annotations

import argparse


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
