"""``export(...)``: load, calibrate, split, compress and export in one call."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from ..config import CompressionConfig
from ..errors import ConfigError, UnsupportedModelError
from ..formats import LightFormat, Target, get_format
from ..manifest import Manifest
from ..models.loading import load_model
from ..pipeline import compress
from ..split import SplitConfig
from .core import FUSED_TRT_FORMATS, ExportOptions, check_target_format, default_fused_ffn, export_split_model
from .lock import output_lock


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
    auto_fused = opts.fused_ffn is None  # resolved once the model is loaded (default_fused_ffn)
    check_target_format(
        Target.parse(opts.target, "--target"),
        LightFormat.parse(config.light_format, "--light-format"),
        config.heavy_format,
        config.other_linear,
        config.embedding,
        config.lm_head,
        fused_ffn=opts.fused_trt,
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
    check_export_request(config, opts, output)
    with output_lock(output):  # one export per OUTPUT; a killed export's leftovers are removed
        model, pre, task = load_model(model_name_or_path, task)
        check_task(model, task)
        if auto_fused:
            opts = dataclasses.replace(
                opts,
                fused_ffn=bool(opts.skip_mode)  # --activation-sparsity implies the fused op
                or default_fused_ffn(
                    opts.target,
                    config.light_format,
                    config.heavy_format,
                    opts.nbits_accuracy_level,
                    measured_model=fused_default_model(model, task),
                ),
            )
        if getattr(opts, "input_fraction", 0.0) > 0:
            check_input_sparsity(model, opts.input_fraction)
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
            manifest["fused_ffn"] = _fuse(res.model, opts, res.batches, progress, auto=auto_fused)
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


def fused_default_model(model, task: str) -> bool:
    """A model of a kind the default fused FFN op was measured on: a text-generation model without an
    encoder (Llama, MPT, GPT-2, OPT: SmolLM2-135M) or Whisper speech recognition (tiny.en, base),
    where the op decodes faster than the stock subgraph and its prefill panels keep up with
    MatMulNBits over Whisper's 1500-frame encoder windows. T5 and encoder-only models are not (yet)."""
    config = getattr(model, "config", None)
    if task.startswith("automatic-speech-recognition"):
        return getattr(config, "model_type", None) == "whisper"
    return task.startswith("text-generation") and not getattr(config, "is_encoder_decoder", False)


def check_input_sparsity(model, fraction: float) -> None:
    """``--input-sparsity`` needs ungated FFNs: refused before calibration for a model with a gate."""
    from ..adapters import find_ffns

    gated = [s.name for s in find_ffns(model) if s.gate is not None]
    if gated:
        raise ConfigError(
            f"--input-sparsity={fraction}: FFN {gated[0]} is gated ({len(gated)} gated FFN(s); a gate decides "
            "the skipped neurons there: use --activation-sparsity); --input-sparsity applies to ungated FFNs "
            "(MPT, Whisper, GPT-2, OPT, T5 v1.0); leave --input-sparsity out"
        )


def check_export_request(config: CompressionConfig, opts: ExportOptions, output: str | Path) -> None:
    """Every check of the options and OUTPUT that needs no model: run before anything is loaded."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r} is an existing file; choose a directory path")
    if out.exists() and not opts.overwrite:
        raise ConfigError(
            f"output {str(out)!r} exists; pass --overwrite to replace it, or choose another directory"
        )
    light = LightFormat.parse(config.light_format, "--light-format")
    if opts.trt_dense_24 and str(light) != "2:4-int8":
        raise ConfigError(
            f"--trt-dense-24 applies to the 2:4-int8 light format, not {light}; use --light-format 2:4-int8, "
            "or leave --trt-dense-24 out"
        )
    if opts.fused_trt:
        heavy = str(config.heavy_format)
        if str(light) not in FUSED_TRT_FORMATS["light"] or heavy not in FUSED_TRT_FORMATS["heavy"]:
            raise ConfigError(
                f"{opts.fused_flags()} with --target tensorrt: the TensorRT "
                f"plugin carries ffsplit::FusedFFNNBits only (light int8 / int4, heavy fp32 / int8), not light "
                f"{light} / heavy {heavy}"
                + (f" (set by --preset {config.preset} for tensorrt)" if config.preset else "")
                + "; pass --light-format int4 --heavy-format int8, or leave the fused options out"
            )
    if (opts.fused_ffn or opts.skip_mode) and opts.target is Target.ORT_CPU:
        heavy = str(config.heavy_format)
        # ffsplit::FusedFFN takes fp32 + sparse-int8; ffsplit::FusedFFNNBits the presets' parts
        # (heavy fp32 / int8, light int8 / int4 in MatMulNBits layout); the planner may still
        # leave single FFNs unfusable (the manifest says which and why)
        nbits = str(light) in ("int8", "int4") and heavy in ("fp32", "int8")
        if not nbits and (str(light) != "sparse-int8" or heavy != "fp32"):
            raise ConfigError(
                f"--fused-ffn / --activation-sparsity: the fused ops take light sparse-int8 with heavy fp32, "
                f"or light int8 / int4 with heavy fp32 / int8, not light {light} / heavy {heavy}"
                + (f" (set by --preset {config.preset})" if config.preset else "")
                + "; use e.g. --light-format int4 --heavy-format int8 (--preset balanced)"
                + ", or leave --fused-ffn / --activation-sparsity out"
            )


def check_task(model, task: str) -> None:
    """A task that optimum cannot export for this model is rejected before calibration, naming the tasks."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (fills optimum's task registry)
    from optimum.exporters.tasks import TasksManager

    try:
        TasksManager.get_exporter_config_constructor(
            exporter="onnx", model=model, task=task, library_name="transformers"
        )
    except ValueError as e:
        if "support task" not in str(e):
            return  # another problem: optimum's export reports it in full
        raise UnsupportedModelError(
            f"--task {task!r}: {str(e).splitlines()[0].rstrip('.')}; pass one of those as --task, or leave "
            "--task out (auto)"
        ) from None
    except KeyError:
        return  # a model type optimum does not know: its export reports it


def _fuse(model, opts: ExportOptions, batches=None, progress: bool = False, auto: bool = False) -> dict:
    """One fused FFN node (FusedFFN / FusedFFNNBits) per split FFN on ort-cpu, FusedFFNNBits for every
    FFN on tensorrt (thresholds calibrated on ``batches`` for ``--activation-sparsity F``); portable
    keeps standard ops. ``auto``: the default fusion (:func:`default_fused_ffn`), FusedFFNNBits only
    (an FFN the planner gave other parts keeps its subgraph)."""
    from ..fused import NBITS_OP, fuse_ffns_

    auto = auto and not opts.skip_mode

    if opts.target in (Target.ORT_CPU, Target.TENSORRT):
        record = fuse_ffns_(
            model,
            opts.sparsity,
            batches=batches,
            progress=progress,
            criterion=opts.skip_criterion,
            input_sparsity=getattr(opts, "input_fraction", 0.0),
            allowed=(NBITS_OP,) if auto else None,
        )
        if auto:
            record["default"] = (
                "ort-cpu, decoder-only LM or Whisper, light int4 + heavy int8 at accuracy level 4 (--no-fused-ffn: the "
                "subgraph)"
            )
        other = {op: n for op, n in record["ops"].items() if op != NBITS_OP}
        if opts.target is Target.TENSORRT and (record["kept_subgraph"] or other):
            # an FFN left as a subgraph would carry int8 / int4 parts TensorRT has no form for
            why = next(iter(record["kept_subgraph"].items()), None) or (
                f"{other} node(s)",
                "no Triton kernel",
            )
            raise ConfigError(
                f"{opts.fused_flags()} with --target tensorrt: every FFN must be one FusedFFNNBits node (the TensorRT "
                f"plugin's op); FFN {why[0]}: {why[1]}; use light int8 / int4 with heavy fp32 / int8, or leave "
                "the fused options out"
            )
        if opts.target is Target.TENSORRT:
            record["tensorrt"] = (
                "each FusedFFNNBits node is written as FusedFFNNBitsUp + FusedFFNNBitsDown plugin nodes"
            )
        return record
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
