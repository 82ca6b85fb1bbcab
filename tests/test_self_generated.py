"""Calibration text a decoder-only model writes itself (the default for error-compensated recipes)."""

from __future__ import annotations

import pytest
import torch

from ffsplit_export.data import calibration as cal
from ffsplit_export.data import readers
from ffsplit_export.models.tiny import build_tiny
from ffsplit_export.pipeline import compress
from ffsplit_export.split import SplitConfig


@pytest.fixture(scope="module")
def llama():
    model, tok, _ = build_tiny("tiny-llama")
    return model, tok


def test_samples_are_seeded_continuations_and_leave_the_global_rng_alone(llama):
    model, tok = llama
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = cal.self_generated(model, tok, 5, max_length=64, seed=7, batch_size=2)
    after = torch.rand(3)
    assert torch.equal(before, after)  # fork_rng: the caller's random stream is unchanged
    assert a == cal.self_generated(model, tok, 5, max_length=64, seed=7, batch_size=2)
    assert a != cal.self_generated(model, tok, 5, max_length=64, seed=8, batch_size=2)
    assert len(a) == 5
    lines = readers.builtin_text()
    prompts = [" ".join(lines[i].split()[: cal.PROMPT_WORDS]) for i in range(5)]
    assert all(text.startswith(p) for text, p in zip(a, prompts, strict=True))
    # continued past the prompts (a random tiny model writes some tokens that decode to blanks)
    assert sum(len(t) for t in a) > sum(len(p) for p in prompts) + 5 * 8
    assert tok.padding_side == "right" and not model.training  # restored


def test_compress_uses_it_only_for_error_compensation_without_calibration(llama, monkeypatch):
    model, tok = llama
    calls = []
    real = cal.self_generated

    def spy(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    import ffsplit_export.pipeline as pipeline

    monkeypatch.setattr(pipeline, "self_generated", spy)
    gptq = SplitConfig(light_format="int4", quantizer="gptq")
    r = compress(model, tok, config=gptq, num_samples=4, max_length=32, progress=False)
    assert calls == [4] and r.calibration_source.startswith(cal.SELF_GENERATED)
    assert sum(b.inputs["input_ids"].shape[0] for b in r.batches) == 4
    # round-to-nearest and Wanda read only activation norms: the built-in sentences, as before
    r = compress(model, tok, config=SplitConfig(), num_samples=4, progress=False)
    assert calls == [4] and r.calibration_source == "builtin"
    # --calibration builtin forces the built-in sentences even for GPTQ
    r = compress(model, tok, config=gptq, calibration="builtin", num_samples=4, progress=False)
    assert calls == [4] and r.calibration_source == "builtin"
    first = tok(readers.builtin_text()[0])["input_ids"]
    assert r.batches[0].inputs["input_ids"][0, : len(first)].tolist() == first


def test_encoder_decoder_and_speech_models_keep_the_builtin_sample():
    t5, _, _ = build_tiny("tiny-t5")
    whisper, _, _ = build_tiny("tiny-whisper")
    gpt2, _, _ = build_tiny("tiny-gpt2")
    assert not cal.generates_text(t5) and not cal.generates_text(whisper) and cal.generates_text(gpt2)
