"""Helpers shared by several test modules (imported as ``helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration


# ---------------------------------------------------------------- a byte-level tokenizer with <eos> = 256
def eos_byte_tokenizer():
    """256 byte tokens then ``<eos>`` (id 256): matches tiny test models with ``vocab_size=257``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]
_DTYPE_IDS = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("float16"): 4}


# ---------------------------------------------------------------- a small CTranslate2 writer (test only)
def ct2_bytes(variables: dict[str, np.ndarray], spec: str = "WhisperSpec", version: int = 6) -> bytes:
    """Serialise variables the way CTranslate2 lays out model.bin (version, spec, revision, vars, aliases)."""
    out = bytearray()

    def string(s: str) -> None:
        raw = s.encode() + b"\0"
        out.extend(struct.pack("<H", len(raw)) + raw)

    aliases = {k: v for k, v in variables.items() if isinstance(v, str)}
    arrays = {k: v for k, v in variables.items() if not isinstance(v, str)}
    out.extend(struct.pack("<I", version))
    string(spec)
    out.extend(struct.pack("<I", 3))
    out.extend(struct.pack("<I", len(arrays)))
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        string(name)
        out.extend(struct.pack("<B", a.ndim) + b"".join(struct.pack("<I", d) for d in a.shape))
        out.extend(struct.pack("<B", _DTYPE_IDS[a.dtype]) + struct.pack("<I", a.nbytes) + a.tobytes())
    out.extend(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        string(alias)
        string(target)
    return bytes(out)


def to_ct2(model: WhisperForConditionalGeneration, dtype=np.float32) -> dict[str, np.ndarray | str]:
    """HF Whisper state dict -> CTranslate2 Whisper variable names (fused Q/K/V and cross K/V)."""
    sd = {k: v.detach().numpy().astype(dtype) for k, v in model.state_dict().items()}
    cfg = model.config
    v: dict[str, np.ndarray | str] = {}

    def lin(dst, src, bias=True):
        v[f"{dst}/weight"] = sd[f"{src}.weight"]
        if bias:
            v[f"{dst}/bias"] = sd[f"{src}.bias"]

    def norm(dst, src):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def fused(dst, srcs):
        v[f"{dst}/weight"] = np.concatenate([sd[f"{s}.weight"] for s in srcs])
        v[f"{dst}/bias"] = np.concatenate(
            [sd.get(f"{s}.bias", np.zeros(cfg.d_model, dtype)) for s in srcs]  # k_proj has no bias
        )

    e, d = "model.encoder", "model.decoder"
    lin("encoder/conv1", f"{e}.conv1")
    lin("encoder/conv2", f"{e}.conv2")
    v["encoder/position_encodings/encodings"] = sd[f"{e}.embed_positions.weight"]
    norm("encoder/layer_norm", f"{e}.layer_norm")
    v["encoder/num_heads"] = np.array(cfg.encoder_attention_heads, np.int16)
    for i in range(cfg.encoder_layers):
        s, t = f"encoder/layer_{i}", f"{e}.layers.{i}"
        fused(f"{s}/self_attention/linear_0", [f"{t}.self_attn.{p}_proj" for p in "qkv"])
        lin(f"{s}/self_attention/linear_1", f"{t}.self_attn.out_proj")
        norm(f"{s}/self_attention/layer_norm", f"{t}.self_attn_layer_norm")
        lin(f"{s}/ffn/linear_0", f"{t}.fc1")
        lin(f"{s}/ffn/linear_1", f"{t}.fc2")
        norm(f"{s}/ffn/layer_norm", f"{t}.final_layer_norm")
    v["decoder/embeddings/weight"] = sd[f"{d}.embed_tokens.weight"]
    v["decoder/position_encodings/encodings"] = sd[f"{d}.embed_positions.weight"]
    norm("decoder/layer_norm", f"{d}.layer_norm")
    v["decoder/num_heads"] = np.array(cfg.decoder_attention_heads, np.int16)
    v["decoder/scale_embeddings"] = np.array(0, np.int8)
    v["decoder/projection/weight"] = "decoder/embeddings/weight"
    for i in range(cfg.decoder_layers):
        s, t = f"decoder/layer_{i}", f"{d}.layers.{i}"
        fused(f"{s}/self_attention/linear_0", [f"{t}.self_attn.{p}_proj" for p in "qkv"])
        lin(f"{s}/self_attention/linear_1", f"{t}.self_attn.out_proj")
        norm(f"{s}/self_attention/layer_norm", f"{t}.self_attn_layer_norm")
        lin(f"{s}/attention/linear_0", f"{t}.encoder_attn.q_proj")
        fused(f"{s}/attention/linear_1", [f"{t}.encoder_attn.{p}_proj" for p in "kv"])
        lin(f"{s}/attention/linear_2", f"{t}.encoder_attn.out_proj")
        norm(f"{s}/attention/layer_norm", f"{t}.encoder_attn_layer_norm")
        lin(f"{s}/ffn/linear_0", f"{t}.fc1")
        lin(f"{s}/ffn/linear_1", f"{t}.fc2")
        norm(f"{s}/ffn/layer_norm", f"{t}.final_layer_norm")
    return v


def tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)  # ids 256 .. 263
    return tok.to_str()


def write_ct2_dir(path, model, dtype=np.float32, spec="WhisperSpec", version=6, parts=1):
    path.mkdir(parents=True, exist_ok=True)
    blob = ct2_bytes(to_ct2(model, dtype), spec=spec, version=version)
    if parts == 1:
        (path / "model.bin").write_bytes(blob)
    else:
        step = len(blob) // parts + 1
        for i in range(parts):
            (path / f"model.bin.part{i + 1}").write_bytes(blob[i * step : (i + 1) * step])
    cfg = {
        "suppress_ids": [1, 2, 256],
        "suppress_ids_begin": [220, 256],
        "alignment_heads": [[1, 0]],
        "lang_ids": [],
    }
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "tokenizer.json").write_text(tokenizer_json())
    return path
