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


def _load_transformers(name_or_path: str, task: str | None):
    import torch
    from optimum.exporters.tasks import TasksManager
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    path = Path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(
            f"cannot load model {name_or_path!r} ({e}); pass a transformers model directory, a hub id, "
            f"or a built-in name ({', '.join(builtin_names())})"
        ) from e
    if task is None:
        task = TasksManager.infer_task_from_model(name_or_path)
        if config.model_type in ("t5", "whisper") or task == "text-generation":
            task = task + "-with-past" if not task.endswith("-with-past") else task
        if config.model_type == "whisper":
            task = "automatic-speech-recognition-with-past"
    try:
        model = TasksManager.get_model_from_task(
            task.replace("-with-past", ""), name_or_path, framework="pt", torch_dtype=torch.float32
        )
    except (KeyError, ValueError) as e:
        raise UnsupportedModelError(f"task {task!r} is not available for {name_or_path!r}: {e}") from e
    model.float().eval()
    if config.model_type == "whisper":
        pre = AutoProcessor.from_pretrained(name_or_path)
    else:
        pre = AutoTokenizer.from_pretrained(name_or_path)
    del path
    return model, pre, task
