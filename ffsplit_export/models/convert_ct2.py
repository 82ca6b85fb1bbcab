"""Convert a CTranslate2 Whisper model directory into a transformers Whisper directory.

CTranslate2 stores a model as one binary ``model.bin`` (format version 6): a little-endian
header (version, spec name, spec revision), then named variables (rank, shape, dtype id,
byte count, raw data), then aliases (name -> other variable). Whisper models fuse the
encoder / decoder self-attention Q, K, V into one linear and the decoder cross-attention
K, V into another; K has no bias in transformers (CTranslate2 stores zeros there).

Some packages ship ``model.bin`` split into ``model.bin.part1``, ``model.bin.part2``, ...
(byte-wise pieces of the same file); they are joined in order.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._io import atomic_dir
from ..errors import ConfigError, FormatError, MissingResourceError, UnsupportedModelError

__all__ = ["Ct2Model", "convert_ct2", "read_ct2_model"]

SUPPORTED_BINARY_VERSIONS = (6,)
SUPPORTED_SPECS = ("WhisperSpec",)

# dtype ids of CTranslate2's DataType enum, in order
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),  # bfloat16, widened to float32 on read
}


@dataclass
class Ct2Model:
    """The parsed content of a CTranslate2 ``model.bin``."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]


class _Reader:
    """Bounds-checked little-endian reader over a bytes buffer."""

    def __init__(self, buf: bytes | memoryview, source: str):
        self.buf = memoryview(buf)
        self.pos = 0
        self.source = source

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise FormatError(
                f"{self.source} is truncated or corrupt: needs {n} bytes at offset {self.pos}, "
                f"file has {len(self.buf)}; re-install or re-download the model files"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.unpack("H")
        raw = bytes(self.take(n))
        if n == 0 or raw[-1] != 0:
            raise FormatError(
                f"{self.source}: malformed string at offset {self.pos - n}; the file is corrupt"
            )
        return raw[:-1].decode("utf-8", errors="replace")


def _model_files(ct2_dir: Path) -> list[Path]:
    single = ct2_dir / "model.bin"
    if single.is_file():
        return [single]
    parts: list[Path] = []
    while (ct2_dir / f"model.bin.part{len(parts) + 1}").is_file():
        parts.append(ct2_dir / f"model.bin.part{len(parts) + 1}")
    if parts:
        return parts
    raise MissingResourceError(
        f"no CTranslate2 weights in {ct2_dir}: expected {single} (or model.bin.part1, model.bin.part2, ...); "
        "pass a CTranslate2 Whisper model directory as ct2_dir"
    )


def _read_bytes(files: list[Path]) -> bytes:
    if len(files) == 1:
        return files[0].read_bytes()
    return b"".join(f.read_bytes() for f in files)


def read_ct2_model(path: str | os.PathLike) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin`` (or a directory holding it, possibly in parts)."""
    path = Path(path)
    files = _model_files(path) if path.is_dir() else [path]
    if not files[0].is_file():
        raise MissingResourceError(
            f"{files[0]} does not exist; pass a CTranslate2 model.bin or its directory"
        )
    source = str(files[0]) if len(files) == 1 else f"{files[0]} (+{len(files) - 1} parts)"
    r = _Reader(_read_bytes(files), source)

    version = r.unpack("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise FormatError(
            f"{source}: CTranslate2 binary version {version} is not supported (supported: "
            f"{SUPPORTED_BINARY_VERSIONS}); re-convert the model with a current ctranslate2 release"
        )
    spec = r.string()
    revision = r.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.unpack("I")):
        name = r.string()
        rank = r.unpack("B")
        shape = tuple(r.unpack("I") for _ in range(rank))
        type_id = r.unpack("B")
        nbytes = r.unpack("I")
        if type_id not in _DTYPES:
            raise FormatError(
                f"{source}: variable {name!r} has unknown dtype id {type_id}; the file is corrupt"
            )
        dtype = _DTYPES[type_id]
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * dtype.itemsize != nbytes:
            raise FormatError(
                f"{source}: variable {name!r} of shape {shape} and dtype {dtype} declares {nbytes} bytes; "
                "the file is corrupt"
            )
        arr = np.frombuffer(r.take(nbytes), dtype=dtype).reshape(shape)
        if type_id == 5:
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        variables[name] = arr
    aliases: dict[str, str] = {}
    for _ in range(r.unpack("I")):
        alias = r.string()
        aliases[alias] = r.string()
    for alias, target in aliases.items():
        if target not in variables:
            raise FormatError(f"{source}: alias {alias!r} points to missing variable {target!r}")
        variables[alias] = variables[target]
    return Ct2Model(version, spec, revision, variables, aliases)


def _weight(v: dict[str, np.ndarray], name: str, source: str) -> np.ndarray:
    """A float32 copy of a variable, dequantizing int8 / int16 weights with their scale."""
    if name not in v:
        raise FormatError(f"{source}: missing variable {name!r}; this is not a complete Whisper model")
    arr = v[name]
    if arr.dtype.kind in "iu" and f"{name}_scale" in v:
        scale = v[f"{name}_scale"].astype(np.float32)
        out = arr.astype(np.float32)
        return out / (scale[:, None] if scale.ndim == 1 else scale)
    return arr.astype(np.float32)


def _scalar(v: dict[str, np.ndarray], name: str, source: str) -> int:
    if name not in v or v[name].size != 1:
        raise FormatError(f"{source}: missing scalar {name!r}; this is not a complete Whisper model")
    return int(v[name].reshape(()))


def _count_layers(v: dict[str, np.ndarray], prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in v:
        n += 1
    return n


def _state_dict(ct2: Ct2Model, source: str) -> tuple[dict[str, np.ndarray], dict]:
    """Map CTranslate2 Whisper variables to transformers names; also returns the shape facts."""
    v = ct2.variables

    def w(name: str) -> np.ndarray:
        return _weight(v, name, source)

    sd: dict[str, np.ndarray] = {}
    d_model, n_mels, _ = w("encoder/conv1/weight").shape
    n_enc, n_dec = _count_layers(v, "encoder"), _count_layers(v, "decoder")
    if n_enc == 0 or n_dec == 0:
        raise FormatError(
            f"{source}: found {n_enc} encoder and {n_dec} decoder layers; the file is not a Whisper model"
        )

    def linear(dst: str, src: str, bias: bool = True) -> None:
        sd[f"{dst}.weight"] = w(f"{src}/weight")
        if bias:
            sd[f"{dst}.bias"] = w(f"{src}/bias")

    def norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"] = w(f"{src}/gamma")
        sd[f"{dst}.bias"] = w(f"{src}/beta")

    def split_rows(src: str, dsts: list[str | None]) -> None:
        weight, bias = w(f"{src}/weight"), w(f"{src}/bias")
        k = len(dsts)
        if weight.shape[0] != k * d_model:
            raise FormatError(
                f"{source}: {src}/weight has shape {weight.shape}, expected ({k * d_model}, {d_model})"
            )
        for i, dst in enumerate(dsts):
            rows = slice(i * d_model, (i + 1) * d_model)
            sd[f"{dst}.weight"] = weight[rows].copy()
            if dst.endswith("k_proj"):
                continue  # transformers' Whisper K projection has no bias (CTranslate2 stores zeros)
            sd[f"{dst}.bias"] = bias[rows].copy()

    e, d = "model.encoder", "model.decoder"
    linear(f"{e}.conv1", "encoder/conv1")
    linear(f"{e}.conv2", "encoder/conv2")
    sd[f"{e}.embed_positions.weight"] = w("encoder/position_encodings/encodings")
    norm(f"{e}.layer_norm", "encoder/layer_norm")
    for i in range(n_enc):
        s, t = f"encoder/layer_{i}", f"{e}.layers.{i}"
        split_rows(f"{s}/self_attention/linear_0", [f"{t}.self_attn.{p}_proj" for p in "qkv"])
        linear(f"{t}.self_attn.out_proj", f"{s}/self_attention/linear_1")
        norm(f"{t}.self_attn_layer_norm", f"{s}/self_attention/layer_norm")
        linear(f"{t}.fc1", f"{s}/ffn/linear_0")
        linear(f"{t}.fc2", f"{s}/ffn/linear_1")
        norm(f"{t}.final_layer_norm", f"{s}/ffn/layer_norm")

    sd[f"{d}.embed_tokens.weight"] = w("decoder/embeddings/weight")
    sd[f"{d}.embed_positions.weight"] = w("decoder/position_encodings/encodings")
    norm(f"{d}.layer_norm", "decoder/layer_norm")
    for i in range(n_dec):
        s, t = f"decoder/layer_{i}", f"{d}.layers.{i}"
        split_rows(f"{s}/self_attention/linear_0", [f"{t}.self_attn.{p}_proj" for p in "qkv"])
        linear(f"{t}.self_attn.out_proj", f"{s}/self_attention/linear_1")
        norm(f"{t}.self_attn_layer_norm", f"{s}/self_attention/layer_norm")
        linear(f"{t}.encoder_attn.q_proj", f"{s}/attention/linear_0")
        split_rows(f"{s}/attention/linear_1", [f"{t}.encoder_attn.{p}_proj" for p in "kv"])
        linear(f"{t}.encoder_attn.out_proj", f"{s}/attention/linear_2")
        norm(f"{t}.encoder_attn_layer_norm", f"{s}/attention/layer_norm")
        linear(f"{t}.fc1", f"{s}/ffn/linear_0")
        linear(f"{t}.fc2", f"{s}/ffn/linear_1")
        norm(f"{t}.final_layer_norm", f"{s}/ffn/layer_norm")

    proj = v.get("decoder/projection/weight")
    if proj is not None and not np.array_equal(proj, v["decoder/embeddings/weight"]):
        raise UnsupportedModelError(
            f"{source}: the output projection is not tied to the token embeddings; transformers' Whisper "
            "requires tied weights"
        )
    facts = {
        "d_model": int(d_model),
        "num_mel_bins": int(n_mels),
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "encoder_attention_heads": _scalar(v, "encoder/num_heads", source),
        "decoder_attention_heads": _scalar(v, "decoder/num_heads", source),
        "encoder_ffn_dim": int(sd[f"{e}.layers.0.fc1.weight"].shape[0]),
        "decoder_ffn_dim": int(sd[f"{d}.layers.0.fc1.weight"].shape[0]),
        "vocab_size": int(sd[f"{d}.embed_tokens.weight"].shape[0]),
        "max_source_positions": int(sd[f"{e}.embed_positions.weight"].shape[0]),
        "max_target_positions": int(sd[f"{d}.embed_positions.weight"].shape[0]),
    }
    return sd, facts


def _load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise MissingResourceError(f"{path} is missing: a CTranslate2 Whisper directory needs its {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON ({e}); re-install the model files") from e


def _special_ids(tokenizer: dict, path: Path) -> dict[str, int]:
    ids = {t["content"]: int(t["id"]) for t in tokenizer.get("added_tokens", [])}
    for needed in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
        if needed not in ids:
            raise FormatError(f"{path} has no special token {needed}; it is not a Whisper tokenizer")
    return ids


def _write_tokenizer(tokenizer: dict, ids: dict[str, int], out: Path) -> None:
    """tokenizer.json plus the slow-tokenizer files derived from it."""
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    model = tokenizer["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "added_tokens.json").write_text(json.dumps(ids, ensure_ascii=False, indent=1), encoding="utf-8")
    eot = "<|endoftext|>"
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": eot}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1), encoding="utf-8")
    tok_cfg = {
        "tokenizer_class": "WhisperTokenizer",
        "model_max_length": 1024,
        "add_prefix_space": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": True,
        "processor_class": "WhisperProcessor",
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1), encoding="utf-8")


def _generation_config(facts: dict, ids: dict[str, int], ct2_cfg: dict):
    from transformers import GenerationConfig

    multilingual = facts["vocab_size"] >= 51865
    eot, sot, no_ts = ids["<|endoftext|>"], ids["<|startoftranscript|>"], ids["<|notimestamps|>"]
    kw = dict(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=facts["max_target_positions"],
        suppress_tokens=[int(t) for t in ct2_cfg.get("suppress_ids", [])],
        begin_suppress_tokens=[int(t) for t in ct2_cfg.get("suppress_ids_begin", [220, eot])],
        alignment_heads=[[int(a), int(b)] for a, b in ct2_cfg.get("alignment_heads", [])],
        no_timestamps_token_id=no_ts,
        is_multilingual=multilingual,
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )
    if "<|startofprev|>" in ids:
        kw["prev_sot_token_id"] = ids["<|startofprev|>"]
    if multilingual:
        lang_ids = {int(i) for i in ct2_cfg.get("lang_ids", [])}
        kw["lang_to_id"] = {t: i for t, i in ids.items() if i in lang_ids}
        kw["task_to_id"] = {k: ids[f"<|{k}|>"] for k in ("transcribe", "translate") if f"<|{k}|>" in ids}
        # English transcription by default; pass language=/task= to generate() to change it
        kw["forced_decoder_ids"] = [[1, ids.get("<|en|>")], [2, ids.get("<|transcribe|>")]]
    else:
        kw["forced_decoder_ids"] = [[1, no_ts]]
    return GenerationConfig(**kw)


def _build_hf(sd: dict[str, np.ndarray], facts: dict, ids: dict[str, int], ct2_cfg: dict):
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    gen = _generation_config(facts, ids, ct2_cfg)
    config = WhisperConfig(
        **facts,
        activation_function="gelu",
        scale_embedding=False,
        decoder_start_token_id=gen.decoder_start_token_id,
        bos_token_id=gen.bos_token_id,
        eos_token_id=gen.eos_token_id,
        pad_token_id=gen.pad_token_id,
        suppress_tokens=None,  # these live in generation_config.json
        begin_suppress_tokens=None,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    model = WhisperForConditionalGeneration(config)
    state = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in sd.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise FormatError(f"weight mapping mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config = gen
    return model.eval()


def convert_ct2(ct2_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Convert a CTranslate2 Whisper directory into a transformers directory (float32 safetensors).

    Writes config, generation config, ``model.safetensors``, tokenizer files and
    ``preprocessor_config.json`` into a temporary directory next to ``out_dir`` and renames it
    into place when complete (:func:`ffsplit_export._io.atomic_dir`). Refuses an existing
    ``out_dir`` unless ``overwrite=True``.
    """
    from transformers import WhisperFeatureExtractor

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    if not ct2_dir.is_dir():
        raise MissingResourceError(
            f"{ct2_dir} is not a directory; pass a CTranslate2 Whisper model directory"
        )
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")

    ct2 = read_ct2_model(ct2_dir)
    source = str(_model_files(ct2_dir)[0])
    if ct2.spec not in SUPPORTED_SPECS:
        raise UnsupportedModelError(
            f"{source}: model spec {ct2.spec!r} is not supported; supported specs: {', '.join(SUPPORTED_SPECS)}"
        )
    ct2_cfg = _load_json(ct2_dir / "config.json", "config.json")
    tokenizer = _load_json(ct2_dir / "tokenizer.json", "tokenizer.json")
    ids = _special_ids(tokenizer, ct2_dir / "tokenizer.json")
    sd, facts = _state_dict(ct2, source)
    model = _build_hf(sd, facts, ids, ct2_cfg)

    with atomic_dir(out_dir, replace=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _write_tokenizer(tokenizer, ids, tmp)
        WhisperFeatureExtractor(feature_size=facts["num_mel_bins"]).save_pretrained(tmp)
        (tmp / "ffsplit_ct2_source.json").write_text(
            json.dumps({"ct2_dir": str(ct2_dir), "spec": ct2.spec, "revision": ct2.revision}, indent=1),
            encoding="utf-8",
        )
    return out_dir
