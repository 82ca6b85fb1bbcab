"""TensorRT engine with the ffsplit plugin vs the NumPy reference (needs TensorRT and a GPU).

Skips cleanly where either is missing; has never run on the development machines.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]


def _need_trt_and_gpu():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    pytest.importorskip("triton", reason="triton is not installed")
    torch = pytest.importorskip("torch")
    from ffsplit_export.trt import cuda_device_count

    if cuda_device_count() == 0 or not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (and CUDA torch) available")
    return torch


@pytest.mark.parametrize("op_type", ["SparseMatMulInt8", "SparseMatMulFP32", "Sparse24MatMulInt8"])
def test_engine_matches_reference(tmp_path, op_type):
    torch = _need_trt_and_gpu()
    import onnx
    import tensorrt as trt
    from onnx import TensorProto, helper, numpy_helper

    from ffsplit_export.formats import packing
    from ffsplit_export.ops import OPS, reference_matmul
    from ffsplit_export.trt import build_engine

    rng = np.random.default_rng(0)
    n, k = 96, 200
    w = rng.standard_normal((n, k)).astype(np.float32)
    if op_type == "Sparse24MatMulInt8":
        g = w.reshape(n, -1, 4)
        np.put_along_axis(g, np.argsort(np.abs(g), axis=2)[:, :, :2], 0, axis=2)
        q, s = packing.quantize_int8_per_channel(g.reshape(n, k))
        p = packing.pack_nm24(q)
        weights = (p.values, p.meta, s)
    else:
        w[rng.random((n, k)) < 0.6] = 0
        if op_type == "SparseMatMulInt8":
            q, s = packing.quantize_int8_per_channel(w)
            p = packing.pack_bitmask(q)
            weights = (p.mask, p.values, p.row_ptr, s)
        else:
            p = packing.pack_bitmask(w)
            weights = (p.mask, p.values, p.row_ptr)
    names = [nm for nm, _ in OPS[op_type].weight_inputs]
    from ffsplit_export.trt import trt_plugin_attributes

    node = helper.make_node(op_type, ["X", *names], ["Y"], domain="ffsplit", **trt_plugin_attributes())
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "seq", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "seq", n])],
        initializer=[numpy_helper.from_array(a, nm) for a, nm in zip(weights, names)],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ffsplit", 1)]
    )
    onnx.save(model, str(tmp_path / "model.onnx"))
    engine_path = build_engine(tmp_path / "model.onnx", tmp_path / "model.engine", max_batch=2, max_seq=128)

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    ctx = engine.create_execution_context()
    for shape in [(1, 1), (2, 7), (1, 100)]:
        x = rng.standard_normal((*shape, k)).astype(np.float32)
        xt = torch.from_numpy(x).cuda()
        yt = torch.empty((*shape, n), dtype=torch.float32, device="cuda")
        ctx.set_input_shape("X", x.shape)
        ctx.set_tensor_address("X", xt.data_ptr())
        ctx.set_tensor_address("Y", yt.data_ptr())
        stream = torch.cuda.current_stream()
        assert ctx.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        np.testing.assert_allclose(
            yt.cpu().numpy(), reference_matmul(op_type, x, *weights), atol=1e-4, rtol=1e-5
        )
