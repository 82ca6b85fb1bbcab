"""``export(...)``: load, calibrate, split, compress and export in one call."""

from __future__ import annotations

import time
from pathlib import Path

from ..formats import Target
from ..loading import load_model
from ..pipeline import compress
from ..split import SplitConfig
from .core import ExportOptions, check_target_format, export_split_model


def export(
    model_name_or_path: str,
    output: str | Path,
    *,
    task: str = "auto",
    config: SplitConfig | None = None,
    options: ExportOptions | None = None,
    **compress_kwargs,
) -> dict:
    """The whole ``ffsplit-export export`` job; returns the written manifest (ffsplit.json)."""
    t0 = time.time()
    cfg = config or SplitConfig()
    opts = options or ExportOptions()
    check_target_format(
        Target.parse(opts.target, "--target"),
        cfg.light_format,
        cfg.heavy_format,
        compress_kwargs.get("other_linear", "fp32"),
        compress_kwargs.get("embedding", "fp32"),
    )
    out = Path(output)
    if out.exists() and not opts.overwrite:
        from ..errors import ConfigError

        raise ConfigError(
            f"output {str(out)!r} exists; pass --overwrite to replace it, or choose another directory"
        )
    model, pre, task = load_model(model_name_or_path, task)
    res = compress(model, pre, config=cfg, **compress_kwargs)
    manifest = {
        "format_version": 1,
        "source_model": model_name_or_path,
        "model_type": model.config.model_type,
        "options": {
            **cfg.to_dict(),
            **{k: v for k, v in compress_kwargs.items() if k != "progress"},
            "target": str(opts.target),
            "nbits_accuracy_level": opts.nbits_accuracy_level,
        },
        "light_format": str(cfg.light_format),
        "trt_sparse_weights": bool(opts.trt_dense_24),
        "ffn": res.report.to_dict(),
        "other_linear": res.other_linear,
        "embedding": res.embedding,
        "weight_bytes": weight_bytes(model, res.model),
    }
    if opts.fused_ffn or opts.skip_mode:
        manifest["fused_ffn"] = _fuse(res.model, opts)
    if str(opts.target) == "portable" and cfg.light_format.is_sparse:
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
