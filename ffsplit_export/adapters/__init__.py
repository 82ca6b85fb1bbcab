"""FFN adapters: where every feed-forward network of a model is, one small adapter per family.

An adapter maps a transformers model to a list of :class:`FFNSpec` (module paths of the up,
gate and down projections and the activation). Adapters are registered by ``model_type``
with :func:`register_adapter`; :func:`get_adapter` lists the registered types on a miss.
"""

from . import families  # noqa: F401  (registers the built-in adapters)
from .registry import Adapter, FFNSpec, find_ffns, get_adapter, register_adapter, supported_model_types

__all__ = ["Adapter", "FFNSpec", "find_ffns", "get_adapter", "register_adapter", "supported_model_types"]
