"""Calibration samples for a model: a file, folder or dataset, an offline text source, text the
model writes itself (decoder-only language models without ``--calibration``), or the built-in sample."""

from __future__ import annotations

from pathlib import Path

import torch

from ..calibrate import modality
from ..errors import CalibrationError
from . import readers
from .evaldata import TEXT_SOURCES


def _is_offline_source(calibration: str) -> bool:
    """``bible`` / ``fortunes`` / ``gensim``: the calibration half of an offline text source (``eval`` extra),
    unless a file of that name exists."""
    return calibration in TEXT_SOURCES and not Path(calibration).exists()


BUILTIN = "builtin"  # --calibration builtin: the built-in sentences, never generated text
SELF_GENERATED = "self-generated"  # what the manifest records when the model wrote its calibration text
PROMPT_WORDS = 4  # the start of each built-in sentence the model continues


def generates_text(model) -> bool:
    """A decoder-only language model with ``generate()`` (Llama, GPT-2, OPT, MPT, ...)."""
    cfg = model.config
    return (
        modality(model) == "text"
        and not getattr(cfg, "is_encoder_decoder", False)
        and callable(getattr(model, "generate", None))
        and getattr(model, "can_generate", lambda: False)()
    )


def self_generated(
    model,
    tokenizer,
    num_samples: int,
    max_length: int = 128,
    seed: int = 0,
    batch_size: int = 64,
    progress=False,
) -> list[str]:
    """Calibration text written by ``model`` itself: ``num_samples`` continuations (nucleus sampling,
    top-k 50, top-p 0.95, seeded) of the first words of the built-in sentences, up to ``max_length`` tokens.

    The built-in sample is about 1,100 tokens of short sentences, too few for error compensation:
    GPTQ's Hessians of the 1,536-wide down projections are then rank-deficient, and on
    SmolLM2-135M the ``balanced`` export calibrated on it reached perplexity 21.4 on the Gospel of
    Matthew, worse than round-to-nearest (19.5); on 64 x 128 tokens the model wrote itself, 17.0
    (README protocol otherwise; in-domain Genesis verses give 15.4). Text in the model's own
    distribution, no dataset needed. The global random state is left as it was.
    """
    from tqdm.auto import tqdm

    from . import readers

    lines = readers.builtin_text()
    prompts = [" ".join(lines[i % len(lines)].split()[:PROMPT_WORDS]) for i in range(num_samples)]
    side = getattr(tokenizer, "padding_side", "right")
    if tokenizer.pad_token is None:  # as make_batches does
        tokenizer.pad_token = tokenizer.eos_token
    pad = tokenizer.pad_token_id
    out: list[str] = []
    was_training = model.training
    model.eval()
    try:
        tokenizer.padding_side = "left"  # decoder-only generation continues the last token
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for i in tqdm(
                range(0, num_samples, batch_size), desc="calibration text", disable=not progress, unit="batch"
            ):
                chunk = prompts[i : i + batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True)
                n_new = max(1, max_length - enc["input_ids"].shape[1])
                ids = model.generate(
                    input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"],
                    do_sample=True,
                    top_p=0.95,
                    temperature=1.0,
                    top_k=50,
                    max_new_tokens=n_new,
                    min_new_tokens=n_new,
                    pad_token_id=pad,
                )
                out += [
                    t.replace("\n", " ").strip()
                    for t in tokenizer.batch_decode(ids, skip_special_tokens=True)
                ]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [t for t in out if t] or prompts


def load_samples(model, calibration: str | None, num_samples: int) -> list:
    """Calibration samples (strings or 16 kHz waveforms) from PATH, or the built-in sample."""
    if num_samples < 1:
        raise CalibrationError(f"--num-samples={num_samples}; use a positive number of calibration samples")
    if modality(model) == "audio":
        samples = (
            readers.read_audio(calibration, num_samples)
            if calibration
            else readers.builtin_audio(min(num_samples, 16))
        )
    else:
        if calibration and _is_offline_source(calibration):
            from .evaldata import calibration_text

            samples = calibration_text(calibration, num_samples)
        elif calibration and calibration != BUILTIN:
            samples = readers.read_text(calibration, num_samples)
        else:
            text = readers.builtin_text()
            samples = (text * (1 + num_samples // len(text)))[:num_samples]
    if not samples:
        raise CalibrationError(f"calibration source {calibration!r} gave no sample")
    return samples
