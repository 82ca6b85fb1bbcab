"""Light- and heavy-part weight formats: names, pruning, quantization and packed layouts."""

from .names import HeavyFormat, LightFormat, OtherLinearFormat, PruneMethod, Target

__all__ = ["HeavyFormat", "LightFormat", "OtherLinearFormat", "PruneMethod", "Target"]
