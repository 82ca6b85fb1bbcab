"""The adapter registry: :class:`FFNSpec`, :class:`Adapter`, :func:`register_adapter`, lookup."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class FFNSpec:
    """One FFN: ``down(act(gate(x)) * up(x))`` if gated, else ``down(act(up(x)))``."""

    name: str
    up: str
    down: str
    activation: str
    gate: str | None = None
    # path of the activation module of an ungated FFN whose container also holds other layers
    # (Whisper / OPT decoder layers): the fused op replaces up, this module and down
    act_module: str | None = None

    @property
    def projections(self) -> tuple[str, ...]:
        return tuple(p for p in (self.gate, self.up, self.down) if p is not None)


class Adapter:
    """Base adapter: subclasses set ``model_types`` and implement :meth:`find_ffns`."""

    model_types: tuple[str, ...] = ()

    def find_ffns(self, model: nn.Module) -> list[FFNSpec]:  # pragma: no cover - abstract
        raise NotImplementedError

    def ffns(self, model: nn.Module) -> list[FFNSpec]:
        specs = self.find_ffns(model)
        if not specs:
            raise UnsupportedModelError(
                f"no FFN found in {type(model).__name__} (model_type {model.config.model_type!r}); "
                "the adapter expects the module names of the transformers implementation"
            )
        return specs

    @staticmethod
    def modules_of_class(model: nn.Module, *class_names: str) -> Iterator[tuple[str, nn.Module]]:
        for name, module in model.named_modules():
            if type(module).__name__ in class_names:
                yield name, module


_REGISTRY: dict[str, Adapter] = {}


def register_adapter(*model_types: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator: register an adapter for the given transformers ``model_type`` values."""

    def deco(cls: type[Adapter]) -> type[Adapter]:
        inst = cls()
        cls.model_types = model_types
        for mt in model_types:
            _REGISTRY[mt] = inst
        return cls

    return deco


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(model_or_type: nn.Module | str) -> Adapter:
    model_type = (
        model_or_type if isinstance(model_or_type, str) else getattr(model_or_type.config, "model_type", None)
    )
    try:
        return _REGISTRY[model_type]
    except KeyError as e:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported model types: {', '.join(supported_model_types())}"
        ) from e


def find_ffns(model: nn.Module) -> list[FFNSpec]:
    return get_adapter(model).ffns(model)


__all__ = ["Adapter", "FFNSpec", "find_ffns", "get_adapter", "register_adapter", "supported_model_types"]
