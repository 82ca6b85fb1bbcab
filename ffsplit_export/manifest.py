"""``ffsplit.json``, the manifest of an export: built, written and read only here.

It lives in the core (plain JSON, no torch / onnx imports) so that the runtime, the TensorRT
engine builder and the CLI read it with the same function and get the same errors.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ExportError

MANIFEST = "ffsplit.json"
MANIFEST_VERSION = 1
#: keys that every export writes (export_split_model adds them) and that readers need
REQUIRED_KEYS = ("task", "onnx_files")


class ManifestError(ExportError):
    """An export's ffsplit.json is missing, unparsable or incomplete (a RuntimeError)."""


class Manifest(dict):
    """The ffsplit.json dict, with its one builder, writer and reader."""

    @classmethod
    def build(
        cls,
        *,
        source_model: str,
        model_type: str,
        config,
        result,
        options,
        weight_bytes: dict,
        **extra,
    ) -> Manifest:
        """The manifest of a compressed model before export adds files, validation and versions.

        ``config`` is a :class:`~ffsplit_export.config.CompressionConfig`, ``result`` the
        :class:`~ffsplit_export.pipeline.CompressResult`, ``options`` the ``ExportOptions``.
        """
        split = config.split_config()
        kw = config.compress_kwargs()
        kw.pop("config")
        m = cls(
            format_version=MANIFEST_VERSION,
            source_model=source_model,
            model_type=model_type,
            options={
                **split.to_dict(),
                **kw,
                "target": str(options.target),
                "nbits_accuracy_level": options.nbits_accuracy_level or 0,
                "fused_ffn": bool(getattr(options, "fused_ffn", False)),
                "activation_sparsity": getattr(getattr(options, "sparsity", None), "label", 0),
                "input_sparsity": getattr(options, "input_fraction", 0.0),
                "preset": config.preset,
                "fuse_attention": bool(getattr(options, "fuse_attention", False)),
                "calibration_source": getattr(result, "calibration_source", None),
            },
            light_format=str(split.light_format),
            trt_sparse_weights=bool(options.trt_dense_24),
            ffn=result.report.to_dict(),
            other_linear=result.other_linear,
            embedding=result.embedding,
            weight_bytes=weight_bytes,
        )
        if getattr(result, "planner", None):
            m["planner"] = result.planner  # the measured planner's per-FFN choices, bytes, errors
        m.update(extra)
        m["compression_config"] = config.to_dict()
        return m

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(self, indent=1))
        return path

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        """The manifest of an export directory; :class:`ManifestError` naming the path and fix."""
        directory = Path(directory)
        path = directory / MANIFEST
        fix = "pass a directory written by `ffsplit-export export`, or re-run the export"
        if directory.is_file():
            raise ManifestError(f"{str(directory)!r} is a file, not an export directory; {fix}")
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ManifestError(f"{str(directory)!r} has no {MANIFEST}; {fix}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{str(path)!r} is not valid JSON ({e}); {fix}") from e
        if not isinstance(data, dict):
            raise ManifestError(f"{str(path)!r} holds a {type(data).__name__}, not a JSON object; {fix}")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ManifestError(f"{str(path)!r} lacks the key(s) {missing}; {fix}")
        absent = [f for f in data["onnx_files"] if not (directory / f).is_file()]
        if absent or not data["onnx_files"]:
            raise ManifestError(
                f"{str(directory)!r} lacks the ONNX file(s) {absent or ['*.onnx']} that {MANIFEST} lists; "
                f"{fix}"
            )
        for name, size in data["onnx_files"].items():
            got = (directory / name).stat().st_size
            if isinstance(size, int) and got != size:
                raise ManifestError(
                    f"{str(directory / name)!r} has {got} bytes, the export wrote {size}: it is truncated or "
                    f"changed; {fix}"
                )
        return cls(data)

    @property
    def compression_config(self):
        """The :class:`~ffsplit_export.config.CompressionConfig` recorded by ``export``, or None."""
        from .config import CompressionConfig

        data = self.get("compression_config")
        return None if data is None else CompressionConfig.from_dict(data)
