"""Exports in threads of one process do not interfere, and leave optimum as they found it.

Two ffsplit exports and one plain optimum export run at the same time: a barrier holds each
thread at the entry of optimum's ``onnx_export_from_model`` until all three are there, so each
export's set-up (whatever it changes) is in place while the others run. Every ffsplit export
must validate exactly its own files, the plain export must be validated by optimum's own
``validate_models_outputs`` (and only it), and afterwards optimum's functions and
``onnxruntime.SessionOptions`` are the originals. (torch's own ONNX exporter cannot run twice at
once in a process; see ``ffsplit_export.export.optimum_export.TORCH_EXPORT_LOCK``.)
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest
import torch
from conftest import needs_plugin


@pytest.mark.slow  # three optimum exports (still run by .ci/run)
@needs_plugin
def test_concurrent_exports_do_not_interfere(tmp_path, monkeypatch):
    import onnxruntime
    import optimum.exporters.onnx as onnx_pkg
    from optimum.exporters.onnx import base as onnx_base
    from optimum.exporters.onnx import convert as onnx_convert

    from ffsplit_export.export import ExportOptions, export
    from ffsplit_export.export.optimum_export import TORCH_EXPORT_LOCK
    from ffsplit_export.manifest import Manifest
    from ffsplit_export.models.tiny import build_tiny

    originals = (
        onnx_base.OnnxConfig.fix_dynamic_axes,
        onnx_convert.validate_models_outputs,
        onnxruntime.SessionOptions,
    )
    real_export = onnx_convert.onnx_export_from_model
    barrier = threading.Barrier(3)

    def gated_export(*args, **kwargs):
        barrier.wait(timeout=600)
        return real_export(*args, **kwargs)

    optimum_validated: list[Path] = []
    real_validate = onnx_convert.validate_models_outputs

    def spy_validate(*args, **kwargs):  # optimum calls this module global when do_validation=True
        optimum_validated.append(Path(kwargs["output_dir"]))
        return real_validate(*args, **kwargs)

    # torch's TorchScript exporter is process-global: the ffsplit exports serialise their
    # torch.onnx.export calls (TORCH_EXPORT_LOCK); the plain optimum export takes the same lock
    real_torch_export = torch.onnx.export

    def torch_export(*args, **kwargs):
        lock = TORCH_EXPORT_LOCK if threading.current_thread().name == "plain" else contextlib.nullcontext()
        with lock:
            return real_torch_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", torch_export)
    monkeypatch.setattr(onnx_pkg, "onnx_export_from_model", gated_export)
    monkeypatch.setattr(onnx_convert, "validate_models_outputs", spy_validate)

    errors: dict[str, BaseException] = {}
    plain_out = tmp_path / "plain-bert"

    def run(name, fn):
        try:
            fn()
        except BaseException as e:  # reported below
            errors[name] = e
            barrier.abort()

    def ffsplit(model, out):
        export(
            model,
            out,
            options=ExportOptions(reference_check=False),
            num_samples=4,
            progress=False,
            preset="none",
        )

    def plain():
        model, _pre, task = build_tiny("tiny-bert")
        onnx_pkg.onnx_export_from_model(model, plain_out, task=task, do_validation=True)

    threads = [
        threading.Thread(target=run, args=("tiny-llama", lambda: ffsplit("tiny-llama", tmp_path / "a"))),
        threading.Thread(target=run, args=("tiny-gpt2", lambda: ffsplit("tiny-gpt2", tmp_path / "b"))),
        threading.Thread(target=run, args=("plain", plain), name="plain"),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not any(t.is_alive() for t in threads), "an export thread hung"
    assert not errors, errors

    for out in (tmp_path / "a", tmp_path / "b"):
        m = Manifest.read(out)
        files = {p.name for p in out.glob("*.onnx")}
        assert files == {"model.onnx"}
        assert set(m["validation"]) == files, m["validation"]  # its own file, validated once
        assert max(m["validation"]["model.onnx"]["outputs"].values()) < 1e-4
    # the plain export was validated by optimum itself, and no ffsplit export used optimum's validation
    assert optimum_validated == [plain_out]
    assert (plain_out / "model.onnx").is_file()

    # what the exports found (the spy included) is what they left
    assert onnx_convert.validate_models_outputs is spy_validate
    assert onnx_base.OnnxConfig.fix_dynamic_axes is originals[0]
    assert onnxruntime.SessionOptions is originals[2]
    monkeypatch.undo()
    assert (
        onnx_base.OnnxConfig.fix_dynamic_axes,
        onnx_convert.validate_models_outputs,
        onnxruntime.SessionOptions,
    ) == originals
    assert onnx_pkg.onnx_export_from_model is real_export
