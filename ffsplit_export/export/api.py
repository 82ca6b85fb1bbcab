"""``export(...)``: load, calibrate, split, compress and export in one call."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from ..config import CompressionConfig
from ..errors import ConfigError
from ..formats import LightFormat, Target, get_format
from ..manifest import Manifest
from ..models.loading import load_model
from ..pipeline import compress
from ..split import SplitConfig
from .core import ExportOptions, check_target_format, export_split_model


def export(
    model_name_or_path: str,
    output: str | Path,
    *,
    task: str = "auto",
    config: CompressionConfig | SplitConfig | None = None,
    options: ExportOptions | None = None,
    preset: str | None = None,
    before_export: Callable | None = None,
    progress: bool = True,
    **compress_kwargs,
) -> dict:
    """The whole ``ffsplit-export export`` job; returns the written manifest (ffsplit.json).

    Without ``config`` the compression is preset ``preset`` (default ``balanced``; ``accurate``,
    ``fast``, or ``"none"`` for each field's own default; :mod:`ffsplit_export.presets`) with
    the ``compress()`` keyword arguments laid over it, e.g. ``export(m, out, preset="fast",
    other_linear="int8")``. ``config`` is a :class:`CompressionConfig` (e.g.
    ``CompressionConfig.from_preset("accurate", heavy_fraction=0.2)``; a :class:`SplitConfig`
    plus ``compress()`` keyword arguments is still accepted and uses no preset). An
    ``options.nbits_accuracy_level`` of None takes the preset's. ``before_export(dense_model,
    result, preprocessor)`` runs on the compressed model before the ONNX export (``recover``
    trains there) and may return a dict that is added to the manifest.
    """
    from ..presets import DEFAULT_PRESET, preset_accuracy_level

    t0 = time.time()
    opts = options or ExportOptions()
    if config is None:
        config = CompressionConfig.from_preset(
            DEFAULT_PRESET if preset is None else preset, str(opts.target), **compress_kwargs
        )
    elif preset is not None:
        raise ConfigError(
            f"pass preset={preset!r} or config=..., not both; for a preset with changes use "
            f"CompressionConfig.from_preset({preset!r}, field=value, ...)"
        )
    elif not isinstance(config, CompressionConfig):
        config = CompressionConfig.from_split_config(config, **compress_kwargs)
    elif compress_kwargs:
        raise ConfigError(
            f"pass {sorted(compress_kwargs)} inside config=CompressionConfig(...), not as keyword arguments"
        )
    if opts.nbits_accuracy_level is None:
        opts = dataclasses.replace(
            opts, nbits_accuracy_level=preset_accuracy_level(config.preset, str(opts.target))
        )
    check_target_format(
        Target.parse(opts.target, "--target"),
        LightFormat.parse(config.light_format, "--light-format"),
        config.heavy_format,
        config.other_linear,
        config.embedding,
    )
    out = Path(output)
    if out.exists() and not opts.overwrite:
        raise ConfigError(
            f"output {str(out)!r} exists; pass --overwrite to replace it, or choose another directory"
        )
    model, pre, task = load_model(model_name_or_path, task)
    res = compress(model, pre, **config.compress_kwargs(), progress=progress)
    extra = before_export(model, res, pre) if before_export is not None else None
    manifest = Manifest.build(
        source_model=model_name_or_path,
        model_type=model.config.model_type,
        config=config,
        result=res,
        options=opts,
        weight_bytes=weight_bytes(model, res.model),
        **(extra or {}),
    )
    if opts.fused_ffn or opts.skip_mode:
        manifest["fused_ffn"] = _fuse(res.model, opts)
    if (
        str(opts.target) == "portable"
        and get_format(LightFormat.parse(config.light_format, "--light-format")).pruned
    ):
        manifest["note"] = (
            "--target portable stores sparse light weights densely (int8 via MatMulNBits): "
            "compressed on disk, but no sparse speed-up; use --target ort-cpu for that"
        )
    manifest = export_split_model(res.model, pre, output, task, opts, manifest)
    manifest["seconds"] = round(time.time() - t0, 1)
    return manifest


def _fuse(model, opts: ExportOptions) -> dict:
    """One FusedFFN node per split FFN on ort-cpu; portable keeps standard ops (same function)."""
    from ..fused import fuse_ffns_

    if opts.target is Target.ORT_CPU:
        return fuse_ffns_(model, opts.skip_mode)
    return {
        "op": None,
        "activation_sparsity": "exact" if opts.skip_mode else 0,
        "note": "--target portable keeps standard ops; skipping exact zeros does not change the function",
    }


def weight_bytes(dense_model, split_model) -> dict:
    """Parameter + buffer bytes of the dense fp32 model and of the compressed one."""

    def nbytes(m):
        seen, n = set(), 0
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
        return n

    dense, comp = nbytes(dense_model), nbytes(split_model)
    return {"dense_fp32": dense, "compressed": comp, "ratio": comp / dense if dense else 1.0}
