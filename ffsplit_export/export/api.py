"""``export(...)``: load, calibrate, split, compress and export in one call."""

from __future__ import annotations

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
    before_export: Callable | None = None,
    progress: bool = True,
    **compress_kwargs,
) -> dict:
    """The whole ``ffsplit-export export`` job; returns the written manifest (ffsplit.json).

    ``config`` is a :class:`CompressionConfig` (a :class:`SplitConfig` plus ``compress()``
    keyword arguments is still accepted). ``before_export(dense_model, result, preprocessor)``
    runs on the compressed model before the ONNX export (``recover`` trains there) and may
    return a dict that is added to the manifest.
    """
    t0 = time.time()
    if not isinstance(config, CompressionConfig):
        config = CompressionConfig.from_split_config(config, **compress_kwargs)
    elif compress_kwargs:
        raise ConfigError(
            f"pass {sorted(compress_kwargs)} inside config=CompressionConfig(...), not as keyword arguments"
        )
    opts = options or ExportOptions()
    check_target_format(
        Target.parse(opts.target, "--target"),
        LightFormat.parse(config.light_format, "--light-format"),
        config.heavy_format,
        config.other_linear,
        config.embedding,
    )
    if config.size_budget is not None and config.planner == "measured":
        target = Target.parse(opts.target, "--target")
        if config.planner_formats:  # formats the measured planner may pick must run on the target
            for name in config.planner_formats.split(","):
                check_target_format(target, LightFormat.parse(name, "--planner-formats"))
        else:  # by default: --light-format and the planner's formats that run on this target
            from ..plan import PLANNER_FORMATS

            names = dict.fromkeys([config.light_format, *PLANNER_FORMATS])
            config = config.replace(
                planner_formats=",".join(n for n in names if get_format(n).supports(target))
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
        manifest["fused_ffn"] = _fuse(res.model, opts, res.batches, progress)
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


def _fuse(model, opts: ExportOptions, batches=None, progress: bool = False) -> dict:
    """One FusedFFN node per split FFN on ort-cpu (thresholds calibrated on ``batches`` for
    ``--activation-sparsity F``); portable keeps standard ops (same function)."""
    from ..fused import fuse_ffns_

    if opts.target is Target.ORT_CPU:
        return fuse_ffns_(model, opts.sparsity, batches=batches, progress=progress)
    return {
        "op": None,
        "activation_sparsity": opts.sparsity.label,
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
