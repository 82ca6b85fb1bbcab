"""export/optimum_export.py's own dynamic-axes fix against optimum's, on one small graph.

The tiny models' exports never have an axis to fix, so the branch that rewrites the file is
checked here: a graph whose output axis carries a name the config does not declare must get the
same fixed size from our fix (run in our session) as from ``OnnxConfig.fix_dynamic_axes``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

onnxruntime = pytest.importorskip("onnxruntime")


class _Config:
    """The parts of an optimum OnnxConfig that both fixes use."""

    inputs = {"X": {0: "batch_size"}}
    outputs = {"Y": {0: "batch_size"}}

    def generate_dummy_inputs(self, framework="pt", **shapes):
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        return {"X": torch.from_numpy(x) if framework == "pt" else x}

    def generate_dummy_inputs_for_validation(self, inputs, onnx_input_names=None):
        return inputs

    def rename_ambiguous_inputs(self, inputs):
        return inputs

    def flatten_output_collection_property(self, name, value):
        raise AssertionError("no collections here")


def _graph(path: Path) -> None:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch_size", "width"])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch_size", "width"])
    g = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "g", [x], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _session(path: Path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_fix_matches_optimums(tmp_path):
    from optimum.exporters.onnx.base import OnnxConfig

    from ffsplit_export.export.optimum_export import _fix_dynamic_axes

    ours, theirs = tmp_path / "ours.onnx", tmp_path / "theirs.onnx"
    _graph(ours)
    _graph(theirs)
    before = [d.dim_param for d in onnx.load(str(ours)).graph.output[0].type.tensor_type.shape.dim]
    assert before == ["batch_size", "width"]  # "width" is not declared by the config: to be fixed

    _fix_dynamic_axes(_session)(_Config(), ours, input_shapes={})
    OnnxConfig.fix_dynamic_axes(_Config(), theirs)

    def dims(p):
        return [
            (d.dim_param, d.dim_value) for d in onnx.load(str(p)).graph.output[0].type.tensor_type.shape.dim
        ]

    assert dims(ours) == [("batch_size", 0), ("", 4)]
    assert dims(ours) == dims(theirs)
    assert onnx.load(str(ours)) == onnx.load(str(theirs))


def test_nothing_to_fix_leaves_the_file(tmp_path):
    from ffsplit_export.export.optimum_export import _fix_dynamic_axes

    class Declared(_Config):
        inputs = {"X": {0: "batch_size", 1: "width"}}

    p = tmp_path / "m.onnx"
    _graph(p)
    before = p.read_bytes()
    _fix_dynamic_axes(_session)(Declared(), p, input_shapes={})
    assert p.read_bytes() == before
