"""CTranslate2 -> transformers Whisper conversion: exact round trip on a tiny random model, bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import ct2_bytes, to_ct2, write_ct2_dir  # noqa: E402
from transformers import WhisperConfig, WhisperForConditionalGeneration  # noqa: E402

from ffsplit_export.errors import (  # noqa: E402
    ConfigError,
    FormatError,
    MissingResourceError,
    UnsupportedModelError,
)
from ffsplit_export.models.convert_ct2 import convert_ct2, read_ct2_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_whisper() -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=300,
        num_mel_bins=80,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=32,
        decoder_start_token_id=257,
        pad_token_id=256,
        eos_token_id=256,
        bos_token_id=256,
    )
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random, non-zero biases and norms so that every mapping is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _check_same(model, out_dir, atol=1e-6):
    conv = WhisperForConditionalGeneration.from_pretrained(out_dir).eval()
    ref_sd, got_sd = model.state_dict(), conv.state_dict()
    assert set(ref_sd) == set(got_sd)
    for k in ref_sd:
        torch.testing.assert_close(got_sd[k], ref_sd[k], rtol=0, atol=0, msg=k)
    torch.manual_seed(1)
    feats = torch.randn(1, 80, 3000)
    dec = torch.tensor([[257, 263, 10, 20, 30]])
    with torch.no_grad():
        a = model(input_features=feats, decoder_input_ids=dec).logits
        b = conv(input_features=feats, decoder_input_ids=dec).logits
    assert (a - b).abs().max().item() <= atol  # measured 0.0
    return conv


def test_round_trip_exact(tiny_whisper, tmp_path):
    src = write_ct2_dir(tmp_path / "ct2", tiny_whisper)
    out = convert_ct2(src, tmp_path / "hf")
    conv = _check_same(tiny_whisper, out)
    assert conv.config.encoder_attention_heads == 4 and conv.config.decoder_ffn_dim == 64
    gen = conv.generation_config
    assert gen.decoder_start_token_id == 257 and gen.no_timestamps_token_id == 263
    assert gen.forced_decoder_ids == [[1, 263]] and gen.begin_suppress_tokens == [220, 256]
    assert not gen.is_multilingual
    # no temp dirs left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2", "hf"]


def test_tokenizer_and_processor_load(tiny_whisper, tmp_path):
    from transformers import WhisperFeatureExtractor, WhisperTokenizer, WhisperTokenizerFast

    out = convert_ct2(write_ct2_dir(tmp_path / "ct2", tiny_whisper), tmp_path / "hf")
    fast = WhisperTokenizerFast.from_pretrained(out)
    slow = WhisperTokenizer.from_pretrained(out)
    ids = fast("hello world", add_special_tokens=False).input_ids
    assert slow("hello world", add_special_tokens=False).input_ids == ids
    assert fast.decode(ids) == "hello world"
    assert fast.convert_tokens_to_ids("<|notimestamps|>") == 263
    fe = WhisperFeatureExtractor.from_pretrained(out)
    assert fe.feature_size == 80 and fe.sampling_rate == 16000


def test_split_parts_and_fp16(tiny_whisper, tmp_path):
    src = write_ct2_dir(tmp_path / "ct2", tiny_whisper, parts=3)
    assert not (src / "model.bin").exists()
    _check_same(tiny_whisper, convert_ct2(src, tmp_path / "hf"))

    half = write_ct2_dir(tmp_path / "ct2h", tiny_whisper, dtype=np.float16)
    parsed = read_ct2_model(half)
    w = tiny_whisper.model.encoder.layers[0].fc1.weight.detach().numpy()
    np.testing.assert_array_equal(
        parsed.variables["encoder/layer_0/ffn/linear_0/weight"], w.astype(np.float16)
    )
    conv = WhisperForConditionalGeneration.from_pretrained(convert_ct2(half, tmp_path / "hfh"))
    assert conv.model.encoder.layers[0].fc1.weight.dtype == torch.float32
    np.testing.assert_array_equal(
        conv.model.encoder.layers[0].fc1.weight.detach().numpy(), w.astype(np.float16)
    )


def test_int8_weights_are_dequantized(tiny_whisper, tmp_path):
    v = to_ct2(tiny_whisper)
    w = v["encoder/layer_0/ffn/linear_0/weight"]
    scale = (127.0 / np.abs(w).max(axis=1)).astype(np.float32)
    v["encoder/layer_0/ffn/linear_0/weight"] = np.rint(w * scale[:, None]).astype(np.int8)
    v["encoder/layer_0/ffn/linear_0/weight_scale"] = scale
    src = write_ct2_dir(tmp_path / "ct2", tiny_whisper)
    (src / "model.bin").write_bytes(ct2_bytes(v))
    conv = WhisperForConditionalGeneration.from_pretrained(convert_ct2(src, tmp_path / "hf"))
    got = conv.model.encoder.layers[0].fc1.weight.detach().numpy()
    assert np.abs(got - w).max() <= np.abs(w).max() / 127  # within one int8 step


def test_refuses_existing_output_and_overwrites(tiny_whisper, tmp_path):
    src = write_ct2_dir(tmp_path / "ct2", tiny_whisper)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="overwrite"):
        convert_ct2(src, out)
    assert (out / "keep.txt").exists()
    convert_ct2(src, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_missing_model_bin(tmp_path):
    (tmp_path / "ct2").mkdir()
    with pytest.raises(MissingResourceError, match="model.bin"):
        convert_ct2(tmp_path / "ct2", tmp_path / "hf")
    with pytest.raises(MissingResourceError, match="not a directory"):
        convert_ct2(tmp_path / "nope", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("cut", [3, 40, 5000, -7])
def test_truncated_file(tiny_whisper, tmp_path, cut):
    src = write_ct2_dir(tmp_path / "ct2", tiny_whisper)
    blob = (src / "model.bin").read_bytes()
    (src / "model.bin").write_bytes(blob[:cut])
    with pytest.raises(FormatError, match="model.bin"):
        convert_ct2(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2"]


def test_unknown_spec_and_version(tiny_whisper, tmp_path):
    src = write_ct2_dir(tmp_path / "ct2", tiny_whisper, spec="TransformerSpec")
    with pytest.raises(UnsupportedModelError, match="TransformerSpec"):
        convert_ct2(src, tmp_path / "hf")
    src = write_ct2_dir(tmp_path / "ct2v", tiny_whisper, version=2)
    with pytest.raises(FormatError, match="binary version 2"):
        convert_ct2(src, tmp_path / "hf")


def test_missing_tokenizer(tiny_whisper, tmp_path):
    src = write_ct2_dir(tmp_path / "ct2", tiny_whisper)
    (src / "tokenizer.json").unlink()
    with pytest.raises(MissingResourceError, match="tokenizer.json"):
        convert_ct2(src, tmp_path / "hf")


@pytest.mark.slow
def test_real_tiny_en_transcribes_librivox(tmp_path):
    from transformers import WhisperProcessor

    from ffsplit_export.data.evaldata import librispeech_clips
    from ffsplit_export.eval.evaluate import wer_pytorch
    from ffsplit_export.models.realmodels import whisper_tiny_en_ct2_dir

    try:
        src = whisper_tiny_en_ct2_dir()
    except MissingResourceError as e:
        pytest.skip(str(e))
    try:
        clips = librispeech_clips(limit=2)
    except MissingResourceError as e:
        pytest.skip(str(e))
    out = convert_ct2(src, tmp_path / "tiny.en")
    model = WhisperForConditionalGeneration.from_pretrained(out)
    result = wer_pytorch(model, WhisperProcessor.from_pretrained(out), clips)
    # measured: 2 errors in 29 words (0.069) on these 2 clips; 3 / 71 (0.042) on all 5
    assert result.wer < 0.15, result


def test_cli_convert_ct2(tiny_whisper, tmp_path, capsys):
    from ffsplit_export.cli import main

    src, out = tmp_path / "ct2", tmp_path / "hf"
    write_ct2_dir(src, tiny_whisper)
    assert main(["convert-ct2", str(src), str(out)]) == 0
    _check_same(tiny_whisper, out)
    assert main(["convert-ct2", str(src), str(out)]) == 2  # exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert-ct2", str(src), str(out), "--overwrite"]) == 0
