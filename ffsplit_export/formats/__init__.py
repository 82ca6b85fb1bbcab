"""Light- and heavy-part weight formats: names, the format registry, pruning, quantization and packed layouts."""

from .names import EmbeddingFormat, HeavyFormat, LightFormat, OtherLinearFormat, PruneMethod, Target
from .registry import WeightFormat, check_target, get_format, register_format, registered_formats

__all__ = [
    "EmbeddingFormat",
    "HeavyFormat",
    "LightFormat",
    "OtherLinearFormat",
    "PruneMethod",
    "Target",
    "WeightFormat",
    "check_target",
    "get_format",
    "register_format",
    "registered_formats",
]
