"""``ffsplit-export recover`` and ``ffsplit-export eval``.

``recover MODEL OUTPUT`` compresses MODEL (the export options), fine-tunes the student with
SquareHead against the original, and writes an ordinary ffsplit export to OUTPUT (the same
files as ``export``; ``ffsplit.json`` gains a ``recover`` section), so ``eval``, ``bench``
and ``runtime.load`` use it unchanged. ``eval`` measures perplexity (causal LMs) or WER
(Whisper) of an export through ONNX Runtime, or of a PyTorch model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import ConfigError
from .options import (
    PROVIDERS,
    add_compress_arguments,
    add_export_arguments,
    check_export,
    compress_kwargs,
    data_source,
    device,
    export_options_from_args,
    fraction,
    new_file_or_dir,
    nonnegative_float,
    one_of,
    output_file,
    positive_float,
    positive_int,
    skip_criterion,
    text_source,
)


def add_recover_arguments(p: argparse.ArgumentParser) -> None:
    add_export_arguments(p)
    p.set_defaults(preset="none")  # recovery keeps each option's own default (sparse light part)
    g = p.add_argument_group("recovery (SquareHead)")
    g.add_argument("--steps", type=positive_int, default=200, help="optimizer steps (default 200)")
    g.add_argument("--lr", type=positive_float, default=1e-4, help="peak AdamW learning rate (default 1e-4)")
    g.add_argument(
        "--seq-len", type=positive_int, default=128, help="tokens per training sequence (default 128)"
    )
    g.add_argument("--train-batch-size", type=positive_int, default=4, help="sequences per step (default 4)")
    g.add_argument(
        "--train-data",
        type=data_source,
        default=None,
        help="text file (one sample per line) or WAV folder; default: the --calibration source",
    )
    g.add_argument(
        "--train-samples",
        type=positive_int,
        default=2000,
        help="at most this many training samples (default 2000)",
    )
    g.add_argument("--task-loss-weight", type=nonnegative_float, default=1.0)
    g.add_argument("--squarehead-weight", type=nonnegative_float, default=1.0)
    g.add_argument(
        "--kd-logits-weight", type=nonnegative_float, default=0.0, help="KL(teacher || student) on the logits"
    )
    g.add_argument(
        "--gradual-start", type=fraction, default=None, help="gradual sparsity: start at this light sparsity"
    )
    g.add_argument(
        "--gradual-end-step", type=positive_int, default=None, help="... and reach the target at this step"
    )
    g.add_argument(
        "--checkpoint-dir",
        type=new_file_or_dir,
        default=None,
        help="safetensors checkpoints here; re-running resumes",
    )
    g.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    g.add_argument("--device", type=device, default="cpu", help="cpu (default), cuda, cuda:1, ...")
    g.add_argument(
        "--backend",
        choices=("gloo", "nccl"),
        default=None,
        help="under torchrun: the process-group backend (default nccl on cuda, gloo on cpu)",
    )
    g.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the trained weights and Adam state over the ranks (FSDP2) "
        "instead of replicating them (DDP)",
    )


def run_recover(args) -> int:
    """One-shot compression, SquareHead recovery, export: ``export()`` with recovery as its hook.

    Under ``torchrun`` / ``accelerate launch`` every rank compresses the model the same way and
    trains on its share of each global batch; rank 0 alone writes checkpoints and the export
    while the others wait.
    """
    import torch

    from ..calibrate import modality
    from ..config import CompressionConfig
    from ..data.calibration import load_samples
    from ..export.api import export
    from ..recover import RecoverConfig, check_global_batch, init_processes, recover

    config = CompressionConfig.from_args(args)
    rcfg = RecoverConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.train_batch_size,
        seq_len=args.seq_len,
        task_loss_weight=args.task_loss_weight,
        squarehead_weight=args.squarehead_weight,
        kd_logits_weight=args.kd_logits_weight,
        gradual_start_sparsity=args.gradual_start,
        gradual_end_step=args.gradual_end_step,
        seed=args.seed,
    )
    options = export_options_from_args(args)
    if args.device != "cpu" and not torch.cuda.is_available() and args.device.startswith("cuda"):
        raise ConfigError(f"--device {args.device}: no CUDA device here; use --device cpu")
    if Path(args.output).exists() and not options.overwrite:  # every rank stops, not only rank 0
        raise ConfigError(
            f"output {args.output!r} exists; pass --overwrite to replace it, or choose another directory"
        )
    procs = init_processes(args.device, args.backend)
    check_global_batch(rcfg.batch_size, procs.world_size)  # before the ranks load anything
    quiet = args.quiet or not procs.is_main

    def train(teacher, res, pre) -> dict:
        source = args.train_data or args.calibration
        if source is None and modality(teacher) == "text":
            from ..data import readers

            data = readers.builtin_text()[: args.train_samples]  # the built-in sample, not repeated
        else:
            data = load_samples(teacher, source, args.train_samples)
        report = recover(
            teacher,
            res.model,
            data,
            rcfg,
            preprocessor=pre,
            plan=res.plan,
            device=args.device,
            checkpoint_dir=args.checkpoint_dir,
            resume=not args.no_resume,
            progress=not quiet,
            fsdp=args.fsdp,
            backend=args.backend,
        )
        teacher.cpu()
        res.model.cpu()
        if not procs.is_main:
            return {}
        print(
            f"recover: {report.steps - report.start_step} steps in {report.seconds:.0f} s; loss "
            f"{report.mean_loss(first=10):.4f} (first 10) -> {report.mean_loss(last=10):.4f} (last 10)"
        )
        return {
            "recover": {
                "config": rcfg.__dict__,
                "steps_run": report.steps - report.start_step,
                "seconds": report.seconds,
                "loss_first10": report.mean_loss(first=10),
                "loss_last10": report.mean_loss(last=10),
                "losses": [r["loss"] for r in report.history],  # per step run
                "processes": procs.world_size,
                "fsdp": bool(args.fsdp and procs.active),
            }
        }

    t0 = time.time()
    try:
        if procs.is_main:
            export(
                args.model,
                args.output,
                task=args.task,
                config=config,
                options=options,
                before_export=train,
                progress=not args.quiet,
            )
            print(f"wrote the recovered export to {args.output} ({time.time() - t0:.0f} s in all)")
        else:  # the same model and compression as export() builds on rank 0, then training only
            from ..models.loading import load_model
            from ..pipeline import compress

            model, pre, _ = load_model(args.model, args.task)
            train(model, compress(model, pre, **config.compress_kwargs(), progress=False), pre)
        procs.wait_for_main()
    finally:
        procs.close()
    return 0


# ------------------------------------------------------------------------------ eval


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an ffsplit export directory, or (with --pytorch) a model name / directory")
    add_compress_arguments(p)
    p.add_argument(
        "--pytorch",
        action="store_true",
        help="evaluate the PyTorch model (for an export dir: its dense source model)",
    )
    p.add_argument(
        "--compress", action="store_true", help="with --pytorch: evaluate the one-shot compressed model"
    )
    p.add_argument(
        "--activation-sparsity",
        default="0",
        help="with --pytorch --compress: 0 (off), 'exact' or a fraction 0 < F < 1 of light neurons skipped "
        "per token (fused FFNs, thresholds calibrated as export does)",
    )
    p.add_argument(
        "--skip-criterion",
        type=skip_criterion,
        default=None,
        help="with --activation-sparsity F: mixed (default for the presets' gated FFNs), gate or product "
        "(as export)",
    )
    p.add_argument(
        "--input-sparsity",
        default="0",
        help="with --pytorch --compress: 0 (off) or a fraction 0 < F < 1 of the input channels of ungated FFNs "
        "skipped by their light up projection (input thresholds calibrated as export does)",
    )
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--text",
        type=text_source,
        default=None,
        help="perplexity on this held-out text source (bible, fortunes, gensim)",
    )
    kind.add_argument("--speech", action="store_true", help="WER on the LibriVox clips")
    p.add_argument(
        "--max-chars", type=positive_int, default=None, help="evaluate on the first N characters of the text"
    )
    p.add_argument("--context-length", type=_context_length, default=512)
    p.add_argument("--stride", type=positive_int, default=256)
    p.add_argument("--clips", type=positive_int, default=None, help="at most this many speech clips")
    p.add_argument(
        "--provider",
        type=one_of(PROVIDERS),
        default="cpu",
        help="ONNX Runtime provider: cpu (default), cuda, tensorrt",
    )
    p.add_argument("--json", type=output_file, default=None, help="also write the result to this JSON file")


def _context_length(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"{value} is too short; use a context of at least 2 tokens, e.g. 512"
        )
    return value


def _is_export(path: str) -> bool:
    from ..manifest import MANIFEST

    return (Path(path) / MANIFEST).is_file()


def _export_manifest(path: str) -> dict:
    """The manifest of a complete export folder; a ConfigError (one line) if it is incomplete."""
    try:
        return check_export(Path(path))
    except argparse.ArgumentTypeError as e:
        raise ConfigError(str(e)) from None


def _check_model_arg(name: str) -> None:
    """Reject a MODEL that is a file, or a folder that is neither an export nor a transformers model."""
    path = Path(name)
    if path.is_file():
        raise ConfigError(
            f"{name!r} is a file; pass an export folder (or, with --pytorch, a model folder or built-in name)"
        )
    if path.is_dir() and not _is_export(name) and not (path / "config.json").is_file():
        raise ConfigError(
            f"{name!r} is neither an ffsplit export (no ffsplit.json) nor a transformers model (no "
            "config.json); pass a folder written by `ffsplit-export export`"
        )
    if not path.exists() and (name.startswith((".", "/", "~")) or name.endswith("/")):
        raise ConfigError(
            f"{name!r} does not exist; pass an export folder, a model folder or a built-in name"
        )


def run_eval(args) -> int:
    from ..data.evaldata import eval_text, librispeech_clips
    from ..eval import evaluate as ev

    on_export = _is_export(args.model) and not args.pytorch
    if args.stride > args.context_length:
        raise ConfigError(
            f"--stride {args.stride} is longer than --context-length {args.context_length}: tokens between "
            "windows would never be scored; use a stride <= the context length"
        )
    if args.compress and not args.pytorch:
        raise ConfigError(
            "--compress applies to the PyTorch model only; pass --pytorch --compress, or evaluate the "
            "export without --compress"
        )
    if on_export:
        from ..runtime import load

        manifest = _export_manifest(args.model)
        model_type, task = manifest.get("model_type", ""), manifest["task"]
        if args.speech and model_type != "whisper":
            raise ConfigError(
                f"--speech: {args.model!r} is a {model_type or 'non-speech'} export ({task}); WER needs a "
                "Whisper export; use --text for a causal LM"
            )
    else:
        from ..models.loading import load_model

        _check_model_arg(args.model)
        name = args.model
        if _is_export(name):
            name = _export_manifest(name)["source_model"]
        model, pre, task = load_model(name, args.task)
        from ..fused import check_skip_criterion, parse_activation_sparsity, parse_input_sparsity

        sparsity = parse_activation_sparsity(args.activation_sparsity)
        if getattr(args, "skip_criterion", None) is not None and sparsity.fraction <= 0:
            raise ConfigError(
                f"--skip-criterion {args.skip_criterion} needs --activation-sparsity F (0 < F < 1); "
                "pass both, or leave it out"
            )
        input_sparsity = parse_input_sparsity(getattr(args, "input_sparsity", "0"))
        if input_sparsity and not args.compress:
            raise ConfigError(
                f"--input-sparsity={args.input_sparsity} applies to the compressed model; pass "
                "--pytorch --compress (an export folder carries its own thresholds)"
            )
        if sparsity.skip and not args.compress:
            raise ConfigError(
                f"--activation-sparsity={args.activation_sparsity} applies to the compressed model; add "
                "--pytorch --compress (an export folder carries its own thresholds)"
            )
        if args.compress:
            from ..pipeline import compress

            res = compress(model, pre, **compress_kwargs(args))
            model = res.model
            if sparsity.skip or input_sparsity:
                from ..fused import fuse_ffns_

                rec = fuse_ffns_(
                    model,
                    sparsity,
                    batches=res.batches,
                    progress=not args.quiet,
                    criterion=check_skip_criterion(getattr(args, "skip_criterion", None)),
                    input_sparsity=input_sparsity,
                )
                if input_sparsity:
                    print(
                        f"input sparsity {input_sparsity}: {rec['input_skipped_fraction_mean']:.3f} of the input "
                        "channels skipped on the calibration data"
                    )
                if sparsity.fraction:
                    print(
                        f"activation sparsity {sparsity.fraction}: {rec['skipped_fraction_mean']:.3f} of the light "
                        "neurons skipped on the calibration data"
                    )
        model_type = model.config.model_type
    speech = args.speech or (args.text is None and model_type == "whisper")
    t0 = time.time()
    result: dict = {"model": args.model, "runtime": "onnxruntime" if on_export else "pytorch", "task": task}
    if speech:
        clips = librispeech_clips(args.clips)
        if on_export:
            from transformers import AutoProcessor

            model, pre = load(args.model, provider=args.provider), AutoProcessor.from_pretrained(args.model)
            r = ev.word_error_rate([c[1] for c in clips], ev.transcribe(model, pre, clips))
        else:
            r = ev.wer_pytorch(model, pre, clips)
        tp = ev.transcript_perplexity(model, pre, clips)
        result.update(
            metric="wer",
            value=r.wer,
            words=r.num_words,
            clips=len(clips),
            transcript_perplexity=tp.perplexity,
            hypotheses=r.hypotheses,
        )
        print(
            f"WER {100 * r.wer:.2f} % ({r.substitutions} S, {r.deletions} D, {r.insertions} I / {r.num_words} words); "
            f"transcript perplexity {tp.perplexity:.4f} over {tp.num_tokens} tokens"
        )
    else:
        if "generation" not in task or model_type in ("t5", "whisper"):
            raise ConfigError(
                f"perplexity needs a causal LM; {args.model!r} is {model_type} ({task}); use --speech "
                "for Whisper"
            )
        text = eval_text(args.text or "bible", args.max_chars)
        if on_export:
            import torch
            from transformers import AutoTokenizer

            ort = load(args.model, provider=args.provider)
            tok = AutoTokenizer.from_pretrained(args.model)

            def logits_fn(ids):
                with torch.no_grad():
                    return ort(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

            r = ev.perplexity_from_logits(logits_fn, tok, text, args.context_length, args.stride)
        else:
            r = ev.perplexity_pytorch(model, pre, text, args.context_length, args.stride)
        result.update(
            metric="perplexity",
            value=r.perplexity,
            tokens=r.num_tokens,
            context_length=r.context_length,
            stride=r.stride,
        )
        print(
            f"perplexity {r.perplexity:.4f} over {r.num_tokens} tokens (context {r.context_length}, "
            f"stride {r.stride})"
        )
    result["seconds"] = round(time.time() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def add_commands(sub) -> None:
    """Register ``recover`` and ``eval`` on the ``ffsplit-export`` subparsers."""
    p = sub.add_parser("recover", help="SquareHead sparse fine-tuning of the split model, then export")
    add_recover_arguments(p)
    p.set_defaults(func=run_recover)
    p = sub.add_parser("eval", help="perplexity / WER of an export (ONNX Runtime) or a PyTorch model")
    add_eval_arguments(p)
    p.set_defaults(func=run_eval)
