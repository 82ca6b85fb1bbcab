"""Resolve MODEL arguments: built-in tiny models, offline real models, local dirs or hub ids."""

from __future__ import annotations

from pathlib import Path

from ..errors import UnsupportedModelError
from .tiny import TINY, build_tiny

TASK_ALIASES = {"auto": None}


def builtin_names() -> list[str]:
    from .realmodels import real_model_names

    return list(TINY) + list(real_model_names())


def default_task(model) -> str:
    """The optimum task a split model is exported for when ``--task auto``."""
    from optimum.exporters.tasks import TasksManager

    mt = model.config.model_type
    by_type = {
        "t5": "text2text-generation-with-past",
        "whisper": "automatic-speech-recognition-with-past",
        "bert": "feature-extraction",
    }
    if mt in by_type:
        return by_type[mt]
    try:
        task = TasksManager.infer_task_from_model(model)
    except Exception:  # noqa: BLE001 - fall back to the common causal-LM task
        task = "text-generation"
    return task + "-with-past" if task in ("text-generation", "text2text-generation") else task


def load_model(name_or_path: str, task: str | None = "auto"):
    """``(model, preprocessor, task)`` in float32, eval mode.

    ``name_or_path`` is a built-in tiny name (``tiny-t5``, ...), an offline real model
    (``smollm2-135m``, ``whisper-tiny.en``, ``whisper-base``), a local transformers
    directory, or a hub id.
    """
    task = None if task in (None, "auto") else task
    if name_or_path in TINY:
        model, pre, default = build_tiny(name_or_path)
        return model, pre, task or default
    from .realmodels import load_real_model, real_model_names

    if name_or_path in real_model_names():
        model, pre = load_real_model(name_or_path)
        model.float().eval()
        return model, pre, task or default_task(model)
    return _load_transformers(name_or_path, task)


def _is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(name: str) -> None:
    """One request to the hub for ``name`` (no retries); a typed error naming the fix when it fails."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=10)
    except RepositoryNotFoundError as e:
        raise UnsupportedModelError(
            f"model {name!r} is not a local directory, a built-in name ({', '.join(builtin_names())}) "
            "or a model on the hub; check the spelling or pass a transformers model directory"
        ) from e
    except (OSError, HfHubHTTPError, ValueError) as e:  # requests' ConnectionError is an OSError
        raise UnsupportedModelError(
            f"model {name!r} is not a local directory or a built-in name, and the model hub is not "
            f"reachable ({type(e).__name__}); download it (huggingface-cli download {name}) and pass "
            "its directory, or set HF_HUB_OFFLINE=1 to use the local cache"
        ) from e


def _task_from_config(config) -> str:
    """``--task auto`` for a transformers config (optimum infers tasks only for hub ids)."""
    import transformers
    from optimum.exporters.tasks import TasksManager

    by_type = {
        "t5": "text2text-generation-with-past",
        "whisper": "automatic-speech-recognition-with-past",
        "bert": "feature-extraction",
    }
    if config.model_type in by_type:
        return by_type[config.model_type]
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise UnsupportedModelError(
            f"cannot tell the task of a {config.model_type} model with architectures "
            f"{getattr(config, 'architectures', None)}; pass --task (e.g. text-generation-with-past)"
        )
    task = TasksManager.infer_task_from_model(cls)
    return task + "-with-past" if task in ("text-generation", "text2text-generation") else task


def _load_transformers(name_or_path: str, task: str | None):
    """A local directory (never touches the network) or a hub id (the cache first, then one request)."""
    local = Path(name_or_path).is_dir()
    if not local and Path(name_or_path).exists():
        raise UnsupportedModelError(
            f"model {name_or_path!r} is a file; pass a transformers model directory, a hub id, or a "
            f"built-in name ({', '.join(builtin_names())})"
        )
    if local and not (Path(name_or_path) / "config.json").is_file():
        raise UnsupportedModelError(
            f"model directory {name_or_path!r} has no config.json; pass a transformers model directory "
            f"(save_pretrained output), a hub id, or a built-in name ({', '.join(builtin_names())})"
        )
    if not local:
        try:  # already in the local cache: load it from there, no request at all
            return _load_from(name_or_path, task, local_files_only=True)
        except UnsupportedModelError:
            if _is_offline():
                raise
        _hub_reachable(name_or_path)
    return _load_from(name_or_path, task, local_files_only=local)


def _load_from(name_or_path: str, task: str | None, local_files_only: bool):
    import torch
    from optimum.exporters.tasks import TasksManager
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    kw = {"local_files_only": True} if local_files_only else {}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **kw)
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(
            f"cannot load model {name_or_path!r} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            f"pass a transformers model directory, a hub id, or a built-in name ({', '.join(builtin_names())})"
        ) from e
    if task is None:
        task = _task_from_config(config)
    what = "processor" if config.model_type == "whisper" else "tokenizer"
    try:
        if local_files_only and Path(name_or_path).is_dir() and not _has_tokenizer_files(Path(name_or_path)):
            # checked before transformers tries: without sentencepiece, a T5 folder with no tokenizer
            # files fails inside transformers' slow->fast conversion with an AttributeError
            raise OSError("no tokenizer.json, tokenizer_config.json or *.model file in it")
        if config.model_type == "whisper":
            pre = AutoProcessor.from_pretrained(name_or_path, **kw)
        else:
            pre = AutoTokenizer.from_pretrained(name_or_path, **kw)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        detail = _first_line(e)
        raise UnsupportedModelError(
            f"model {name_or_path!r} has a config but no usable {what} ({detail}); save the "
            "tokenizer / processor of the model into that directory (tokenizer.save_pretrained(DIR)), or "
            "compress it from Python with ffsplit_export.pipeline.compress(model, tokenizer, ...)"
        ) from e
    try:
        model = TasksManager.get_model_from_task(
            task.replace("-with-past", ""), name_or_path, framework="pt", torch_dtype=torch.float32, **kw
        )
    except (KeyError, ValueError) as e:
        raise UnsupportedModelError(f"task {task!r} is not available for {name_or_path!r}: {e}") from e
    except OSError as e:
        raise UnsupportedModelError(
            f"cannot load the weights of {name_or_path!r} ({str(e).splitlines()[0]}); pass a complete "
            "transformers model directory (config and weights)"
        ) from e
    model.float().eval()
    return model, pre, task


def _has_tokenizer_files(path: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")
    return any((path / n).is_file() for n in names) or any(path.glob("*.model"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
