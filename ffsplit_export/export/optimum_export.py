"""optimum-onnx's export with our ONNX Runtime sessions, without touching optimum's globals.

Two of optimum's steps run the exported graphs in ONNX Runtime: the dynamic-axes fix (inside the
export of each sub-model) and the validation (at the end). Both need a session that has the
ffsplit custom-op library registered. Instead of patching optimum (or ``onnxruntime``) for the
whole process, which another thread's optimum export would see:

- the ONNX configs optimum uses are built here and handed to it through its public
  ``custom_onnx_configs`` parameter; each config object gets its own ``fix_dynamic_axes`` (an
  instance attribute, so only our export's configs are affected) that runs with our sessions;
- optimum's validation is turned off with its public ``do_validation=False`` and ours runs on
  the same configs, file names and input shapes afterwards.

One thing cannot be scoped: torch's TorchScript ONNX exporter keeps process-global state
(``GLOBALS.in_onnx_export``; a second ``torch.onnx.export`` started while one runs fails with
"GLOBALS.in_onnx_export must be False"). Each config's model patcher, which optimum enters
around ``torch.onnx.export``, therefore also holds :data:`TORCH_EXPORT_LOCK`, so ffsplit exports
in threads of one process take turns for that step only. Other code that runs
``torch.onnx.export`` in a thread next to an ffsplit export can hold the same lock.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable
from pathlib import Path

__all__ = ["TORCH_EXPORT_LOCK", "export_with_optimum"]

#: held around every torch.onnx.export of an ffsplit export (see the module docstring)
TORCH_EXPORT_LOCK = threading.RLock()


def _submodels_and_configs(model, task: str) -> dict:
    """``{name: (sub_model, onnx_config)}`` exactly as ``onnx_export_from_model`` builds them."""
    import torch
    from optimum.exporters.onnx.utils import _get_submodels_and_onnx_configs  # optimum-onnx <0.2
    from optimum.exporters.tasks import TasksManager

    TasksManager.standardize_model_attributes(model)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    float_dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    _, models_and_configs = _get_submodels_and_onnx_configs(
        model=model,
        task=TasksManager.map_from_synonym(task),
        monolith=False,
        custom_onnx_configs={},
        custom_architecture=False,
        float_dtype=float_dtype,
        _variant="default",
        library_name=TasksManager.infer_library_from_model(model),
    )
    return models_and_configs


def _fix_dynamic_axes(session_factory) -> Callable:
    """A ``fix_dynamic_axes`` method for one config: the output axes that the exporter named but
    the config does not declare dynamic get the size they have when the graph runs on the dummy
    inputs (optimum's fix, run in a session with our library)."""

    def fix(self, model_path: Path, device: str = "cpu", dtype: str | None = None, input_shapes=None):
        import onnx
        import torch

        from .validate import _ort_inputs

        declared = {a for axes in (*self.inputs.values(), *self.outputs.values()) for a in axes.values()}
        sess = session_factory(Path(model_path))
        bad = [
            (i, j)
            for i, out in enumerate(sess.get_outputs())
            for j, dim in enumerate(out.shape)
            if isinstance(dim, str) and dim not in declared
        ]
        if not bad:
            return
        with torch.random.fork_rng(devices=[]):
            inputs = self.generate_dummy_inputs(framework="pt", **(input_shapes or {}))
        names = [i.name for i in sess.get_inputs()]
        feeds = _ort_inputs(self, inputs, names)
        if dtype == "fp16":
            feeds = {k: v.astype("float16") if v.dtype == "float32" else v for k, v in feeds.items()}
        outs = sess.run(None, feeds)
        del sess
        graph = onnx.load(str(model_path), load_external_data=False)
        for i, j in bad:
            graph.graph.output[i].type.tensor_type.shape.dim[j].dim_value = outs[i].shape[j]
        onnx.save(graph, str(model_path), convert_attribute=True)

    return fix


def _locked_patcher(original: Callable) -> Callable:
    """A ``patch_model_for_export`` method whose context also holds :data:`TORCH_EXPORT_LOCK`."""

    def patch(self, model, model_kwargs=None):
        @contextlib.contextmanager
        def held():
            with TORCH_EXPORT_LOCK, original(model, model_kwargs=model_kwargs) as patched:
                yield patched

        return held()

    return patch


def _unfixed(self, *args, **kwargs) -> None:
    """TensorRT graphs with plugin nodes cannot run in ONNX Runtime's CPU provider: no fix."""
    return None


def _file_names(models_and_configs: dict) -> list[str]:
    """The ONNX file of each sub-model after optimum's post-processing (which marks the two
    decoders it merged into one file ``is_merged``)."""
    from optimum.exporters.onnx.constants import ONNX_DECODER_MERGED_NAME

    return [
        f"{ONNX_DECODER_MERGED_NAME}.onnx" if getattr(cfg, "is_merged", False) else f"{name}.onnx"
        for name, (_m, cfg) in models_and_configs.items()
    ]


def export_with_optimum(
    model,
    out: Path,
    *,
    task: str,
    opset: int | None,
    atol: float,
    session_factory,
    run_graphs: bool,
    validator: Callable | None,
) -> None:
    """``onnx_export_from_model(model, out, ...)`` with our sessions for the dynamic-axes fix
    (skipped when ``run_graphs`` is false: graphs ONNX Runtime cannot run) and ``validator``
    (called like optimum's ``validate_models_outputs``; None: no validation)."""
    from optimum.exporters.onnx import onnx_export_from_model
    from optimum.utils import DEFAULT_DUMMY_SHAPES

    models_and_configs = _submodels_and_configs(model, task)
    fix = _fix_dynamic_axes(session_factory) if run_graphs else _unfixed
    for _m, cfg in models_and_configs.values():
        cfg.fix_dynamic_axes = types.MethodType(fix, cfg)
        cfg.patch_model_for_export = types.MethodType(_locked_patcher(cfg.patch_model_for_export), cfg)
    # the names optimum's export returns (read before post-processing may change the configs)
    named_outputs = [list(cfg.outputs.keys()) for _m, cfg in models_and_configs.values()]
    input_shapes = dict(DEFAULT_DUMMY_SHAPES)  # what onnx_export_from_model uses with no shape kwargs
    onnx_export_from_model(
        model,
        out,
        task=task,
        opset=opset,
        do_validation=False,
        atol=atol,
        custom_onnx_configs={name: cfg for name, (_m, cfg) in models_and_configs.items()},
    )
    if validator is not None:
        validator(
            models_and_configs,
            named_outputs,
            out,
            atol=atol,
            onnx_files_subpaths=_file_names(models_and_configs),
            input_shapes=input_shapes,
        )
