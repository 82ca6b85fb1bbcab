"""WER / perplexity evaluation: known strings, sliding-window maths, PyTorch vs ONNX Runtime on tiny models."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import eos_byte_tokenizer, write_ct2_dir  # noqa: E402

from ffsplit_export.errors import ConfigError, MissingResourceError  # noqa: E402
from ffsplit_export.eval.evaluate import (  # noqa: E402
    _sliding_nll,
    normalize_text,
    perplexity_onnx,
    perplexity_pytorch,
    wer_onnx,
    wer_pytorch,
    word_error_rate,
)


# ---------------------------------------------------------------- WER
def test_normalize_text():
    assert normalize_text("Mr. Smith's cold-hearted, dog!") == "mister smith's cold hearted dog"
    assert (
        normalize_text("  He was NOT an ill-disposed young man.  ") == "he was not an ill disposed young man"
    )
    assert normalize_text("...") == ""


def test_word_error_rate_known_strings():
    r = word_error_rate(["the cat sat on the mat"], ["The cat sat on the mat."])
    assert r.wer == 0.0 and r.num_words == 6
    r = word_error_rate(["the cat sat", "a dog"], ["the bat sat down", "dog"])
    # ref words 5; errors: cat->bat (S), +down (I), -a (D)
    assert (r.substitutions, r.deletions, r.insertions, r.num_words) == (1, 1, 1, 5)
    assert r.wer == pytest.approx(3 / 5)
    with pytest.raises(ConfigError):
        word_error_rate(["a"], [])
    with pytest.raises(ConfigError):
        word_error_rate([], [])


# ---------------------------------------------------------------- sliding-window perplexity
class _Bigram:
    """A fixed random bigram 'model': logits depend on the previous token only."""

    def __init__(self, vocab=50, seed=0):
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))

    def __call__(self, ids):
        return self.table[ids]


def _direct_nll(model, ids):
    logp = torch.log_softmax(model(torch.as_tensor(ids)[None])[0, :-1], -1)
    return float(-logp.gather(-1, torch.as_tensor(ids[1:])[:, None]).sum())


@pytest.mark.parametrize("ctx,stride", [(8, 8), (8, 3), (16, 1), (200, 50)])
def test_sliding_window_scores_each_token_once(ctx, stride):
    model = _Bigram()
    ids = np.random.default_rng(0).integers(0, 50, size=101)
    total, count = _sliding_nll(model, ids, ctx, stride)
    assert count == len(ids) - 1
    # a bigram model needs one token of context, so windowing must not change the sum
    assert total == pytest.approx(_direct_nll(model, ids), rel=1e-5)


def test_sliding_window_rejects_bad_arguments():
    with pytest.raises(ConfigError):
        _sliding_nll(_Bigram(), np.arange(10), 8, 0)
    with pytest.raises(ConfigError):
        _sliding_nll(_Bigram(), np.arange(10), 8, 9)
    with pytest.raises(ConfigError):
        _sliding_nll(_Bigram(), np.arange(1), 8, 4)


# ---------------------------------------------------------------- tiny causal LM, PyTorch vs ONNX
@pytest.fixture(scope="module")
def tiny_lm_export(tmp_path_factory):
    from optimum.exporters.onnx import main_export
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=256,
        pad_token_id=256,
        bos_token_id=256,
    )
    model = LlamaForCausalLM(cfg).eval()
    src = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(src)
    tok = eos_byte_tokenizer()
    tok.save_pretrained(src)
    out = tmp_path_factory.mktemp("tiny_llama_onnx")
    main_export(str(src), out, task="text-generation-with-past", do_validation=False, no_post_process=False)
    return model, tok, out


TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void."


def test_perplexity_pytorch_matches_onnx(tiny_lm_export):
    model, tok, out = tiny_lm_export
    pt = perplexity_pytorch(model, tok, TEXT, context_length=32, stride=16)
    ort = perplexity_onnx(out, TEXT, context_length=32, stride=16)
    assert pt.num_tokens == ort.num_tokens == len(TEXT.encode()) - 1
    assert math.isfinite(pt.perplexity) and pt.perplexity > 1
    assert ort.perplexity == pytest.approx(pt.perplexity, rel=1e-4)  # measured rel diff ~1e-7


def test_perplexity_onnx_missing_dir(tmp_path):
    with pytest.raises(MissingResourceError, match="no ONNX"):
        perplexity_onnx(tmp_path, TEXT)


# ---------------------------------------------------------------- tiny Whisper, PyTorch vs ONNX
def test_wer_pytorch_matches_onnx_tiny_whisper(tmp_path):
    from optimum.exporters.onnx import main_export
    from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    from ffsplit_export.models.convert_ct2 import convert_ct2

    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=300,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_target_positions=32,
        decoder_start_token_id=257,
        pad_token_id=256,
        eos_token_id=256,
        bos_token_id=256,
    )
    model = WhisperForConditionalGeneration(cfg)
    # only letters get a non-zero output embedding, so greedy decoding emits words (never EOS)
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    keep = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    keep[[alphabet.index(c) for c in "abcdefghijklmnopqrstuvwxyz"]] = True
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight[~keep] = 0.0
    hf = convert_ct2(write_ct2_dir(tmp_path / "ct2", model), tmp_path / "hf")
    out = tmp_path / "onnx"
    main_export(str(hf), out, task="automatic-speech-recognition-with-past", do_validation=False)
    rng = np.random.default_rng(0)
    clips = [(rng.standard_normal(16000).astype(np.float32) * 0.1, "hello world")]
    kw = {"max_new_tokens": 6}
    model = WhisperForConditionalGeneration.from_pretrained(hf)
    pt = wer_pytorch(model, WhisperProcessor.from_pretrained(hf), clips, generate_kwargs=kw)
    ort = wer_onnx(out, clips, generate_kwargs=kw)
    assert pt.hypotheses == ort.hypotheses  # greedy decoding: identical text
    assert pt.hypotheses[0].strip(), "random model decoded to nothing: the comparison would be vacuous"
    # teacher-forced transcript perplexity: ONNX Runtime (merged decoder, no past) == PyTorch
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq

    from ffsplit_export.eval.evaluate import transcript_perplexity

    proc = WhisperProcessor.from_pretrained(hf)
    tp_pt = transcript_perplexity(model, proc, clips)
    tp_ort = transcript_perplexity(ORTModelForSpeechSeq2Seq.from_pretrained(out), proc, clips)
    assert tp_pt.num_tokens == tp_ort.num_tokens > 0
    assert tp_ort.perplexity == pytest.approx(tp_pt.perplexity, rel=1e-4)


def test_transcript_perplexity_matches_the_model_loss():
    """Teacher-forced transcript perplexity == exp(HF cross-entropy with the prompt masked out)."""
    from ffsplit_export.eval.evaluate import _decoder_prompt, transcript_perplexity
    from ffsplit_export.models.tiny import build_tiny

    model, proc, _ = build_tiny("tiny-whisper")
    rng = np.random.default_rng(0)
    clips = [
        (0.1 * rng.standard_normal(16000 * s).astype(np.float32), t)
        for s, t in ((1, "hello"), (2, "a cat sat"))
    ]
    res = transcript_perplexity(model, proc, clips)
    total, count = 0.0, 0
    for audio, ref in clips:
        prompt_ids = _decoder_prompt(model, proc.tokenizer)  # the tokenizer's prefix tokens
        ids = prompt_ids + proc.tokenizer(" " + ref, add_special_tokens=False).input_ids
        ids, prompt = ids + [proc.tokenizer.eos_token_id], len(prompt_ids)
        labels = torch.tensor([ids[1:]])
        labels[0, : prompt - 1] = -100
        feats = proc(audio, sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            loss = model(input_features=feats, decoder_input_ids=torch.tensor([ids[:-1]]), labels=labels).loss
        n = int((labels != -100).sum())
        total, count = total + float(loss) * n, count + n
    assert res.num_tokens == count > 0
    # every text token and the end of text are scored, not just the last one
    n_text = sum(len(proc.tokenizer(" " + ref, add_special_tokens=False).input_ids) for _, ref in clips)
    assert count == n_text + len(clips)
    assert res.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    # token-id references are scored as given: the same ids as the text gives the same result,
    # other ids (the text's tokens reversed) a different one over as many tokens
    as_ids = [(a, proc.tokenizer(" " + r, add_special_tokens=False).input_ids) for a, r in clips]
    assert transcript_perplexity(model, proc, as_ids).perplexity == pytest.approx(res.perplexity, rel=1e-6)
    other = transcript_perplexity(model, proc, [(a, ids[::-1]) for a, ids in as_ids])
    assert other.num_tokens == res.num_tokens
    assert other.perplexity != pytest.approx(res.perplexity, rel=1e-3)
