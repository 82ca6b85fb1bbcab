"""ONNX export of split models through optimum-onnx."""

from .api import export
from .core import MANIFEST, ExportOptions, check_target_format, export_split_model

__all__ = ["MANIFEST", "ExportOptions", "check_target_format", "export", "export_split_model"]
