"""ONNX export of split models through optimum-onnx."""

from .core import MANIFEST, ExportOptions, check_target_format, export_split_model
from .api import export

__all__ = ["MANIFEST", "ExportOptions", "check_target_format", "export", "export_split_model"]
