"""ffsplit-export: heavy-hitter FFN splitting and compressed ONNX export with fast kernels."""

from .adapters import FFNSpec, find_ffns, get_adapter, register_adapter, supported_model_types
from .calibrate import calibrate
from .config import CompressionConfig
from .errors import (
    BudgetError,
    CalibrationError,
    ConfigError,
    ExportError,
    FFSplitError,
    FormatError,
    PluginNotFoundError,
    UnsupportedModelError,
    ValidationError,
)
from .formats import (
    HeavyFormat,
    LightFormat,
    OtherLinearFormat,
    PruneMethod,
    Target,
    WeightFormat,
    get_format,
    register_format,
    registered_formats,
)
from .manifest import Manifest, ManifestError
from .plan import plan_budget, plan_fraction
from .split import SplitConfig, SplitLinear, quantize_other_linears_, split_ffn_

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CalibrationError",
    "CompressionConfig",
    "ConfigError",
    "ExportError",
    "FFNSpec",
    "FFSplitError",
    "FormatError",
    "HeavyFormat",
    "LightFormat",
    "Manifest",
    "ManifestError",
    "OtherLinearFormat",
    "PluginNotFoundError",
    "PruneMethod",
    "SplitConfig",
    "SplitLinear",
    "Target",
    "UnsupportedModelError",
    "ValidationError",
    "WeightFormat",
    "calibrate",
    "find_ffns",
    "get_adapter",
    "get_format",
    "plan_budget",
    "plan_fraction",
    "quantize_other_linears_",
    "register_adapter",
    "register_format",
    "registered_formats",
    "split_ffn_",
    "supported_model_types",
]
