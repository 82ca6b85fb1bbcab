"""ffsplit::FusedFFNNBits on a GPU: the Triton kernels on CUDA tensors, and a TensorRT engine of a
one-node model (split into the two plugin nodes by build_engine) against the NumPy reference.

Skips cleanly without a CUDA GPU (and TensorRT for the engine); has never run on the development
machines (no GPU lent)."""

from __future__ import annotations

import numpy as np
import pytest
from test_triton_fused_ffn import ATOL, CASES, RTOL, SLOW_CASES, _err, _inputs

pytestmark = pytest.mark.gpu


def _cuda_torch():
    pytest.importorskip("triton", reason="triton is not installed")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (and CUDA torch) available")
    return torch


@pytest.mark.parametrize("name", [*CASES, *SLOW_CASES])
def test_kernels_on_cuda_match_reference(name):
    torch = _cuda_torch()
    from ffsplit_export.ops._ffn import fused_ffn_nbits_reference
    from ffsplit_export.trt.configs import CONFIGS
    from ffsplit_export.trt.fused_kernels import launch_fused_ffn

    x, ins, attrs, _ = _inputs(name)
    act = attrs.pop("activation")
    ref = fused_ffn_nbits_reference(x, *ins, activation_kind=act, **attrs)
    t = [None if a is None else torch.from_numpy(a).cuda() for a in ins]
    for cfg in CONFIGS:
        y = launch_fused_ffn(torch.from_numpy(x).cuda(), *t, activation=act, config=cfg, **attrs)
        # same NaN / +inf / -inf entries, finite ones within ATOL + RTOL * max finite |ref|
        assert _err(y.cpu().numpy(), ref) <= ATOL + RTOL * np.abs(ref[np.isfinite(ref)]).max(), cfg.name


@pytest.mark.tensorrt
@pytest.mark.parametrize(
    "name",
    ["silu_gated_h32_l4_m1_thr", "gelu_h8z_l8z_m2_thr", "relu_h0_l4z_m2_exact", "gelu_in_h8_l8_m3_thr"],
)
def test_engine_matches_reference(tmp_path, name):
    torch = _cuda_torch()
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    import onnx
    import tensorrt as trt
    from onnx import TensorProto, helper

    from ffsplit_export.ops._ffn import fused_ffn_nbits_model, fused_ffn_nbits_reference
    from ffsplit_export.trt import build_engine

    x0, ins, attrs, _ = _inputs(name)
    act = attrs.pop("activation")
    d = x0.shape[-1]
    model = fused_ffn_nbits_model(ins, activation=act, **attrs)
    del model.graph.input[:], model.graph.output[:]
    model.graph.input.append(helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "seq", d]))
    model.graph.output.append(helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "seq", d]))
    onnx.save(model, str(tmp_path / "model.onnx"))
    engine_path = build_engine(tmp_path / "model.onnx", tmp_path / "model.engine", max_batch=2, max_seq=64)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
    ctx = engine.create_execution_context()
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (2, 7), (1, 40)]:
        x = rng.standard_normal((*shape, d)).astype(np.float32)
        ref = fused_ffn_nbits_reference(x, *ins, activation_kind=act, **attrs)
        xt = torch.from_numpy(x).cuda()
        yt = torch.empty((*shape, d), dtype=torch.float32, device="cuda")
        ctx.set_input_shape("X", x.shape)
        ctx.set_tensor_address("X", xt.data_ptr())
        ctx.set_tensor_address("Y", yt.data_ptr())
        stream = torch.cuda.current_stream()
        assert ctx.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        np.testing.assert_allclose(yt.cpu().numpy(), ref, atol=ATOL + RTOL * np.abs(ref).max(), rtol=0)
