"""The FusedFFNNBitsUp / Down plugin functions of plugin.py, driven through a stand-in for
``tensorrt`` / ``tensorrt.plugin`` (no TensorRT here): the declared I/O types match the dtypes of
the nodes that split_fused_ffn writes, the output shapes are a[..., H + L] and Y[..., D], and the
kernel arguments follow the kernel specs' signatures. This checks our side of the calling
convention only; TensorRT's own behaviour is unverified (tests/test_trt_fused_ffn_gpu.py)."""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest
from test_triton_fused_ffn import _split_model


class _Desc:
    def __init__(self, shape, dtype):
        self.shape_expr = list(shape)
        self.ndim = len(shape)
        self.dtype = dtype

    def like(self):
        return _Desc(self.shape_expr, self.dtype)


def _fake_tensorrt():
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "stand-in"
    for name in ("float32", "uint8", "int8", "int32", "int64"):
        setattr(trt, name, name)
    trtp = types.ModuleType("tensorrt.plugin")

    def passthrough(_plugin_id):
        return lambda fn: fn

    trtp.register = trtp.autotune = trtp.aot_impl = passthrough
    trtp.TensorDesc = _Desc
    trtp.KernelLaunchParams = types.SimpleNamespace
    trtp.SymIntExprs = lambda n: [None] * n
    trtp.SymInt32 = lambda v: v
    trtp.AutoTuneCombination = lambda io_types, layouts, tactics: (io_types, layouts, tactics)
    trtp.cdiv = lambda a, b: -(-a // b)
    trt.plugin = trtp
    return trt, trtp


@pytest.fixture
def plugin(monkeypatch):
    pytest.importorskip("triton")
    trt, trtp = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.delitem(sys.modules, "ffsplit_export.trt.plugin", raising=False)
    mod = importlib.import_module("ffsplit_export.trt.plugin")
    compiled = []

    def fake_compile(spec, cfg, arch=None):
        compiled.append((spec, cfg, arch))
        return types.SimpleNamespace(name=spec.kernel, ptx="", num_warps=cfg.num_warps, shared=0)

    monkeypatch.setattr(mod, "compile_kernel", fake_compile)
    yield mod, compiled
    # never leave the stand-in's module behind (neither in sys.modules nor as the package attribute)
    sys.modules.pop("ffsplit_export.trt.plugin", None)
    vars(sys.modules["ffsplit_export.trt"]).pop("plugin", None)


_TRT_TYPE = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}


@pytest.mark.parametrize(
    "name",
    [
        "silu_gated_h32_l4_m1_thr",
        "gelu_h8z_l8z_m2_thr",
        "relu_h0_l4z_m2_exact",
        "silu_gated_h32_l8_m2_mixed",
        "gelu_in_h8_l8_m3_thr",  # input_threshold (TEAL)
    ],
)
def test_plugin_functions_follow_the_nodes_and_specs(plugin, name):
    from onnx import helper, numpy_helper

    mod, compiled = plugin
    x, _, model, _ = _split_model(name)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    up, down = model.graph.node
    tokens, d = (2, 3), x.shape[-1]

    def descs(node, first_shape):
        first = _Desc(first_shape, "float32")
        return [first] + [_Desc(inits[i].shape, str(inits[i].dtype)) for i in node.input[1:]]

    def attrs(node):
        out = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        for k in ("plugin_namespace", "plugin_version", "aot"):
            out.pop(k)
        return {k: v.decode() if isinstance(v, bytes) else v for k, v in out.items()}

    ua, da = attrs(up), attrs(down)
    h, n_light = ua["heavy_neurons"], ua["light_neurons"]
    f = h + n_light
    # declared types == the dtypes split_fused_ffn wrote, in input order, then the output
    for node, tune, n_attrs in ((up, mod._ffn_up_tune, ua), (down, mod._ffn_down_tune, da)):
        (io, layout, tactics), = tune(*descs(node, (*tokens, d)), n_attrs["heavy_bits"], outputs=None)  # fmt: skip
        want = ["FP32"] + [_TRT_TYPE[inits[i].dtype] for i in node.input[1:]] + ["FP32"]
        assert [t.strip() for t in io.split(",")] == want and layout == "LINEAR" and tactics == mod.TACTICS
    # output shapes
    (a_desc,) = mod._ffn_up_desc(*descs(up, (*tokens, d)), **ua)
    assert a_desc.shape_expr == [*tokens, f]
    (y_desc,) = mod._ffn_down_desc(*descs(down, (*tokens, f)), **da)
    assert y_desc.shape_expr == [*tokens, d]
    # kernel arguments: the spec's int32 scalars, in order, and the grid
    for tactic in (1, 3):
        name_u, _, lp_u, args_u = mod._ffn_up_aot(*descs(up, (*tokens, d)), **ua, outputs=None, tactic=tactic)
        name_d, _, lp_d, args_d = mod._ffn_down_aot(
            *descs(down, (*tokens, f)), **da, outputs=None, tactic=tactic
        )
        (spec_u, cfg, arch), (spec_d, _, _) = compiled[-2:]
        assert arch is None and (name_u, name_d) == ("ffn_nbits_up_kernel", "ffn_nbits_down_kernel")
        scalars_u = [k for k, t in spec_u.signature.items() if t == "i32"]
        scalars_d = [k for k, t in spec_d.signature.items() if t == "i32"]
        from ffsplit_export.trt.fused_kernels import threshold_bits

        thr_bits = threshold_bits(ua["threshold"])
        assert np.array([thr_bits], np.int32).view(np.float32)[0] == (ua["threshold"] or -1.0)
        assert dict(zip(scalars_u, args_u)) == {
            "M": 6, "H": h, "L": n_light, "D": d, "HEAVY_BS": ua["heavy_block_size"],
            "LIGHT_BS": ua["light_block_size"], "THRESHOLD_BITS": thr_bits,
            "PRODUCT_THRESHOLD_BITS": threshold_bits(ua["product_threshold"]),
            "INPUT_THRESHOLD_BITS": threshold_bits(ua["input_threshold"]),
        } and len(args_u) == len(scalars_u)  # fmt: skip
        assert (ua["input_threshold"] > 0) == ("_in_" in name)
        in_bits = np.array([args_u[scalars_u.index("INPUT_THRESHOLD_BITS")]], np.int32).view(np.float32)[0]
        assert in_bits == (ua["input_threshold"] or -1.0)
        assert dict(zip(scalars_d, args_d)) == {
            "M": 6, "D": d, "H": h, "L": n_light, "HEAVY_BS": da["heavy_block_size"],
            "LIGHT_BS": da["light_block_size"],
        } and len(args_d) == len(scalars_d)  # fmt: skip
        assert lp_u.grid_x == -(-f // cfg.block_n) and lp_u.grid_y == -(-6 // cfg.block_m)
        assert lp_d.grid_x == -(-d // cfg.block_n) and lp_u.block_x == cfg.num_warps * 32
        assert spec_u.fixed_constexprs["SKIP"] == bool(ua["skip"]) == spec_d.fixed_constexprs["SKIP"]
        assert spec_u.fixed_constexprs["GATED"] == bool(ua["gated"])
