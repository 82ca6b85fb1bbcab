"""sparse-int4 with ``--target tensorrt``: the exported plugin node (attributes, ``group_size``),
its int32 re-layout (:func:`ffsplit_export.trt.layout.prepare_model`) and the Triton kernel run on
exactly the node's initializers in the interpreter, against the PyTorch module it was exported from.

The interpreter part runs in a child process (TRITON_INTERPRET=1 must be set before triton is
imported); TensorRT itself is not needed (engine tests live in test_trt_engine.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

N, K, GROUP = 300, 200, 32  # N past one 256-row chunk of row_ptr; ~80 kept values a row: 3 groups
ATOL = 1e-4  # float32 accumulation order vs PyTorch; measured max ~2e-6 with |y| ~ 5


def _module():
    import torch

    from ffsplit_export.formats.registry import get_format
    from ffsplit_export.split import SplitConfig

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=gen)
    cfg = SplitConfig(light_format="sparse-int4", light_sparsity=0.6, group_size=GROUP)
    fmt = get_format("sparse-int4", "light")
    m = fmt.compress(w, torch.linspace(-1, 1, N), x_norm=torch.linspace(0.5, 2.0, K), config=cfg)
    return fmt, m


def _export(tmp_path):
    import onnx
    import torch

    from ffsplit_export.linear import export_target

    fmt, m = _module()

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = m

        def forward(self, x):
            return self.layer(x)

    x = torch.randn(2, 3, K, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "trt.onnx"
    with export_target("tensorrt"), torch.no_grad():
        torch.onnx.export(One(), (x,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}}, opset_version=17, dynamo=False)  # fmt: skip
        ref = fmt.reference_forward(m, x).numpy()
    return onnx.load(str(path)), x.numpy(), ref, m


def test_tensorrt_node_carries_group_size_and_plugin_attributes(tmp_path):
    pytest.importorskip("torch")
    from onnx import helper

    from ffsplit_export.trt import trt_plugin_attributes
    from ffsplit_export.trt.onnx_nodes import check_plugin_node

    model, _, _, m = _export(tmp_path)
    nodes = [n for n in model.graph.node if n.op_type == "SparseMatMulInt4"]
    assert len(nodes) == 1 and check_plugin_node(nodes[0]) is None
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["group_size"] == GROUP == m.group_size
    assert attrs["aot"] == trt_plugin_attributes()["aot"]


def _worker(path: str) -> None:
    import onnx
    import torch
    from onnx import helper, numpy_helper

    from ffsplit_export.trt.kernels import launch
    from ffsplit_export.trt.layout import parser_widened, prepare_model

    model = onnx.load(path)
    x = np.load(path + ".x.npy")
    ref = np.load(path + ".ref.npy")
    bias = np.load(path + ".bias.npy")
    node = next(n for n in model.graph.node if n.op_type == "SparseMatMulInt4")
    gs = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "group_size")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    disk = [inits[nm] for nm in node.input[1:]]
    prepare_model(model)
    node = next(n for n in model.graph.node if n.op_type == "SparseMatMulInt4")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    view = [inits[nm] for nm in node.input[1:]]
    layouts = {
        "disk": (disk, "u8"),
        "int32_view": (view, "u8"),
        "parser_widened": (list(parser_widened("SparseMatMulInt4", *disk)), "i32"),
    }
    for name, (ws, elems) in layouts.items():
        y = launch(
            "SparseMatMulInt4",
            torch.from_numpy(x),
            *(torch.from_numpy(np.ascontiguousarray(a)) for a in ws),
            byte_elems=elems,
            group_size=gs,
        ).numpy()
        err = float(np.abs(y + bias - ref).max())
        dtypes = [str(a.dtype) for a in ws]
        print(json.dumps({"layout": name, "err": err, "ref_max": float(np.abs(ref).max()), "dtypes": dtypes}))


def test_exported_node_runs_on_the_triton_kernel(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    model, x, ref, m = _export(tmp_path)
    path = str(tmp_path / "trt.onnx")
    np.save(path + ".x.npy", x)
    np.save(path + ".ref.npy", ref)
    np.save(path + ".bias.npy", m.bias.detach().numpy())
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), path],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["layout"] for r in rows] == ["disk", "int32_view", "parser_widened"]
    assert rows[1]["dtypes"] == ["int32", "int32", "int32", "float32"]  # what build_engine hands over
    assert rows[2]["dtypes"] == ["int32", "int32", "int64", "float32"]  # what ORT's TensorRT EP hands over
    bad = [r for r in rows if not r["err"] <= ATOL]
    assert not bad, bad


if __name__ == "__main__":
    _worker(sys.argv[1])
