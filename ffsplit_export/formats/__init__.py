"""Light- and heavy-part weight formats: names, pruning, quantization and packed layouts."""

from .names import EmbeddingFormat, HeavyFormat, LightFormat, OtherLinearFormat, PruneMethod, Target

__all__ = ["EmbeddingFormat", "HeavyFormat", "LightFormat", "OtherLinearFormat", "PruneMethod", "Target"]
