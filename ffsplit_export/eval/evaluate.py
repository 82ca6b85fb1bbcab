"""Accuracy evaluation: word error rate (Whisper) and perplexity (causal LMs), PyTorch and ONNX Runtime.

WER normalisation (both hypothesis and reference): lowercase; the titles mr / mrs / dr
become mister / missus / doctor (LibriVox transcripts spell them out); hyphens and
slashes become spaces; every other character that is not a letter, digit, apostrophe
or space is dropped; whitespace is collapsed. WER = (S + D + I) / N over all clips
together (``jiwer``), N = reference words.

Perplexity: the text is tokenized once (no special tokens added) and scored with a sliding
window of ``context_length`` tokens moved by ``stride`` (at most ``context_length - 1``):
every token but the first is predicted exactly once, with at least
``context_length - stride`` tokens of left context once the first window is full. Perplexity = exp(mean negative log-likelihood over all predicted tokens).
Decoding for WER is greedy (one beam, no sampling).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, MissingResourceError

__all__ = [
    "PerplexityResult",
    "WerResult",
    "normalize_text",
    "perplexity_from_logits",
    "perplexity_onnx",
    "perplexity_pytorch",
    "transcribe",
    "transcript_perplexity",
    "word_error_rate",
    "wer_onnx",
    "wer_pytorch",
]

DEFAULT_CONTEXT_LENGTH = 512
DEFAULT_STRIDE = 256

_TITLES = {"mr": "mister", "mrs": "missus", "dr": "doctor"}


@dataclass
class WerResult:
    """Corpus-level word error rate and its parts."""

    wer: float
    substitutions: int
    deletions: int
    insertions: int
    num_words: int
    hypotheses: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)


@dataclass
class PerplexityResult:
    """Sliding-window perplexity over one text."""

    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    num_tokens: int  # predicted tokens
    context_length: int
    stride: int


def normalize_text(text: str) -> str:
    """English WER normalisation (see the module docstring)."""
    text = text.lower()
    text = re.sub(r"[-/]", " ", text)
    text = re.sub(r"[^\w' ]+", " ", text)
    words = [_TITLES.get(w, w) for w in text.replace("_", " ").split()]
    words = [w.strip("'") for w in words]
    return " ".join(w for w in words if w)


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> WerResult:
    """Corpus WER of normalised hypotheses against normalised references."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ConfigError(f"{len(references)} references but {len(hypotheses)} hypotheses; pass one per clip")
    if not references:
        raise ConfigError("no references given; pass at least one (reference, hypothesis) pair")
    refs = [normalize_text(r) for r in references]
    hyps = [normalize_text(h) for h in hypotheses]
    if not any(refs):
        raise ConfigError("all references are empty after normalisation")
    # jiwer rejects empty references; score an empty one as pure insertions
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    extra_ins = sum(len(h.split()) for r, h in zip(refs, hyps) if not r)
    out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    n = sum(len(r.split()) for r, _ in pairs)
    s, d, i = out.substitutions, out.deletions, out.insertions + extra_ins
    return WerResult((s + d + i) / n, s, d, i, n, hyps, refs)


def _check_clips(clips) -> None:
    if not clips:
        raise ConfigError(
            "no clips given; pass a list of (audio, reference) pairs, e.g. evaldata.librispeech_clips()"
        )


def transcribe(
    model, processor, clips, generate_kwargs: dict | None = None, token_ids: bool = False
) -> list[str] | list[list[int]]:
    """Greedy transcripts of (audio, reference) clips by a Whisper model: a transformers model or an
    optimum ``ORTModelForSpeechSeq2Seq`` (e.g. ``runtime.load(export_dir, provider=...)``).

    ``token_ids``: the generated text tokens (special tokens dropped) instead of the decoded text,
    e.g. as exact references for :func:`transcript_perplexity` (re-tokenizing the text need not give
    back the tokens the model wrote: BPE has several spellings of one string)."""
    import torch

    hyps = []
    kwargs = {"num_beams": 1, "do_sample": False}
    gen_cfg = getattr(model, "generation_config", None)
    if getattr(gen_cfg, "is_multilingual", False):
        kwargs.update(language="en", task="transcribe")
    kwargs.update(generate_kwargs or {})
    for audio, _ in clips:
        feats = processor(np.asarray(audio, dtype=np.float32), sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(feats.input_features, **kwargs)
        if token_ids:
            special = set(processor.tokenizer.all_special_ids)
            hyps.append([int(t) for t in ids[0].tolist() if int(t) not in special])
        else:
            hyps.append(processor.batch_decode(ids, skip_special_tokens=True)[0])
    return hyps


def wer_pytorch(model, processor, clips, generate_kwargs: dict | None = None) -> WerResult:
    """WER of a transformers Whisper model on (audio, reference) clips, greedy decoding."""
    _check_clips(clips)
    model.eval()
    hyps = transcribe(model, processor, clips, generate_kwargs)
    return word_error_rate([r for _, r in clips], hyps)


def _decoder_prompt(model, tok) -> list[int]:
    """The decoder prompt of a transcription: the tokenizer's prefix (start of transcript, language,
    task, no timestamps) for Whisper tokenizers, else the model's decoder start token."""
    prefix = list(getattr(tok, "prefix_tokens", None) or [])
    if prefix:
        return prefix
    start = getattr(getattr(model, "config", None), "decoder_start_token_id", None)
    if start is None:
        raise ConfigError(
            "no decoder prompt: the tokenizer has no prefix tokens and the model no decoder_start_token_id"
        )
    return [int(start)]


def transcript_perplexity(model, processor, clips) -> PerplexityResult:
    """Teacher-forced perplexity of the reference transcripts given the audio (Whisper, PyTorch or
    an optimum ``ORTModelForSpeechSeq2Seq``).

    A smooth companion to WER on few clips, where one word is a big step: every reference is
    tokenized after the decoder prompt (start of transcript, language / task, no timestamps)
    and followed by end of text; the text tokens and end of text are scored. A reference may also
    be a list of text token ids (``transcribe(..., token_ids=True)``), scored as given.
    ``context_length`` / ``stride`` of the result hold the longest sequence and 0.
    """
    import torch

    _check_clips(clips)
    if hasattr(model, "eval"):
        model.eval()
    tok = processor.tokenizer
    if getattr(getattr(model, "generation_config", None), "is_multilingual", False):
        tok.set_prefix_tokens(language="english", task="transcribe", predict_timestamps=False)
    prompt_ids = _decoder_prompt(model, tok)
    eos = tok.eos_token_id if tok.eos_token_id is not None else model.config.eos_token_id
    total, count, longest = 0.0, 0, 0
    for audio, ref in clips:
        text = tok(" " + ref.strip(), add_special_tokens=False).input_ids if isinstance(ref, str) else ref
        ids = prompt_ids + [int(t) for t in text] + [eos]
        prompt = len(prompt_ids)
        feats = processor(np.asarray(audio, dtype=np.float32), sampling_rate=16000, return_tensors="pt")
        dec = torch.tensor([ids[:-1]])
        with torch.no_grad():
            logits = torch.as_tensor(
                model(input_features=feats.input_features, decoder_input_ids=dec).logits
            )[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(ids[1:])
        nll = -logp.gather(-1, targets[:, None])[prompt - 1 :, 0]
        total += float(nll.sum())
        count += len(nll)
        longest = max(longest, len(ids))
    return PerplexityResult(math.exp(total / count), total / count, count, longest, 0)


def _require_dir(output_dir) -> Path:
    path = Path(output_dir)
    if not path.is_dir() or not any(path.glob("*.onnx")):
        raise MissingResourceError(
            f"{path} holds no ONNX files; export the model there first (ffsplit-export export)"
        )
    return path


def wer_onnx(
    output_dir: str | os.PathLike,
    clips,
    session_options=None,
    generate_kwargs: dict | None = None,
    provider: str | None = None,
) -> WerResult:
    """WER of an ONNX Whisper export (optimum layout) in ONNX Runtime, greedy decoding.

    With ``provider`` (``cpu``, ``cuda``, ``tensorrt``) an ffsplit export is loaded through
    :func:`ffsplit_export.runtime.load` (the ffsplit library registered); without it, a plain
    optimum ``ORTModelForSpeechSeq2Seq`` with ``session_options``.
    """
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq
    from transformers import AutoProcessor

    _check_clips(clips)
    path = _require_dir(output_dir)
    if provider is not None:
        from ..runtime import load

        model = load(path, provider=provider, session_options_=session_options)
    else:
        model = ORTModelForSpeechSeq2Seq.from_pretrained(path, session_options=session_options)
    processor = AutoProcessor.from_pretrained(path)
    hyps = transcribe(model, processor, clips, generate_kwargs)
    return word_error_rate([r for _, r in clips], hyps)


def _sliding_nll(logits_fn: Callable, ids: np.ndarray, context_length: int, stride: int) -> tuple[float, int]:
    """Sum of NLL (nats) and number of predicted tokens; logits_fn maps int64 [1, T] ids to [1, T, V]."""
    import torch

    if context_length < 2 or not 0 < stride <= context_length:
        raise ConfigError(
            f"context_length={context_length}, stride={stride}: need context_length >= 2 and 0 < stride <= context_length"
        )
    n = len(ids)
    if n < 2:
        raise ConfigError(f"the text has {n} token(s); perplexity needs at least 2")
    total, count, scored_until = 0.0, 0, 1  # token 0 is never predicted
    begin = 0
    while scored_until < n:
        end = min(begin + context_length, n)
        window = torch.as_tensor(ids[begin:end], dtype=torch.long)[None]
        logits = torch.as_tensor(logits_fn(window))[0, :-1].float()
        targets = window[0, 1:]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
        first = scored_until - begin - 1  # index into targets of the first token not yet scored
        total += float(-logp[first:].sum())
        count += len(targets) - first
        scored_until = end
        # windows overlap by >= 1 token so that each window's first target has context
        begin = max(0, min(begin + stride, end - 1, n - context_length)) if end < n else n
    return total, count


def perplexity_from_logits(
    logits_fn: Callable,
    tokenizer,
    text: str,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    stride: int = DEFAULT_STRIDE,
) -> PerplexityResult:
    """Sliding-window perplexity of ``text``; ``logits_fn`` maps int64 [1, T] ids to [1, T, V] logits."""
    if not text or not text.strip():
        raise ConfigError("the text is empty; pass e.g. evaldata.eval_text()")
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    total, count = _sliding_nll(logits_fn, ids, context_length, stride)
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, context_length, stride)


def perplexity_pytorch(
    model, tokenizer, text: str, context_length: int = DEFAULT_CONTEXT_LENGTH, stride: int = DEFAULT_STRIDE
) -> PerplexityResult:
    """Sliding-window perplexity of a transformers causal LM on ``text``."""
    import torch

    model.eval()

    def logits_fn(ids):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits

    return perplexity_from_logits(logits_fn, tokenizer, text, context_length, stride)


def perplexity_onnx(
    output_dir: str | os.PathLike,
    text: str,
    session_options=None,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    stride: int = DEFAULT_STRIDE,
    provider: str | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of an ONNX causal-LM export (optimum layout) in ONNX Runtime.

    ``provider``: as in :func:`wer_onnx`.
    """
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    path = _require_dir(output_dir)
    if provider is not None:
        from ..runtime import load

        model = load(path, provider=provider, session_options_=session_options)
    else:
        model = ORTModelForCausalLM.from_pretrained(path, session_options=session_options)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def logits_fn(ids):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    return perplexity_from_logits(logits_fn, tokenizer, text, context_length, stride)
