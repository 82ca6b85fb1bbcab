"""--target tensorrt ONNX nodes: plugin attributes (incl. ``aot``), domain, the 2:4 Gemm form.

Reads the exported nodes on CPU; where TensorRT and a GPU exist, also parses them with
TensorRT's ONNX parser (marked ``tensorrt``; skipped cleanly otherwise).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from ffsplit_export.errors import ConfigError, FFSplitError
from ffsplit_export.export import ExportOptions, export
from ffsplit_export.linear import NM24Linear, export_target
from ffsplit_export.ops import OPS
from ffsplit_export.split import SplitConfig
from ffsplit_export.trt import onnx_nodes


def _export(out, light_format="sparse-int8", trt_dense_24=False):
    return export(
        "tiny-mpt",
        out,
        config=SplitConfig(light_format=light_format),
        options=ExportOptions(target="tensorrt", overwrite=True, trt_dense_24=trt_dense_24),
        num_samples=8,
        progress=False,
    )


def _trt_parse(path, int32_view=True):
    """Parse ``path`` with TensorRT's ONNX parser (plugins registered); skip where impossible.
    ``int32_view``: the weights as build_engine hands them over, else as exported (the EP path)."""
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    pytest.importorskip("triton", reason="triton is not installed")
    from ffsplit_export.trt import cuda_device_count

    if cuda_device_count() == 0:
        pytest.skip("no CUDA GPU: trt.Builder needs one")
    import ffsplit_export.trt.plugin  # noqa: F401  (registers ffsplit::* first)
    from ffsplit_export.trt.layout import prepare_model

    model = onnx.load(str(path))
    if int32_view:
        prepare_model(model)
    logger = trt.Logger(trt.Logger.WARNING)
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(model.SerializeToString())
    errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    assert ok, errs
    return network


@pytest.fixture(scope="module")
def sparse_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "sparse"
    _export(out)
    return out


def test_plugin_nodes_carry_namespace_version_and_aot(sparse_export):
    m = onnx.load(str(sparse_export / "model.onnx"))
    plug = [n for n in m.graph.node if n.op_type in OPS]
    assert plug
    for n in plug:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        # what TensorRT's parser reads: op_type = plugin name, plugin_namespace, plugin_version, aot
        assert attrs == {"plugin_namespace": b"ffsplit", "plugin_version": b"1", "aot": 1}
        aot = next(a for a in n.attribute if a.name == "aot")
        assert aot.type == onnx.AttributeProto.INT  # the parser reads attrs.get<int>("aot")
        assert n.domain == "ffsplit"
        assert onnx_nodes.check_plugin_node(n) is None
    onnx.checker.check_model(m)  # the ffsplit schemas declare the attributes


def test_check_plugin_node_names_what_is_wrong():
    good = onnx.helper.make_node(
        "SparseMatMulInt8", ["x"], ["y"], domain="ffsplit", **onnx_nodes.trt_plugin_attributes()
    )
    assert onnx_nodes.check_plugin_node(good) is None
    no_aot = onnx.helper.make_node(
        "SparseMatMulInt8", ["x"], ["y"], domain="ffsplit", plugin_namespace="ffsplit", plugin_version="1"
    )
    assert "aot" in onnx_nodes.check_plugin_node(no_aot)
    wrong_domain = onnx.helper.make_node(
        "SparseMatMulInt8", ["x"], ["y"], domain="other", **onnx_nodes.trt_plugin_attributes()
    )
    assert "domain" in onnx_nodes.check_plugin_node(wrong_domain)


def test_set_plugin_domain_round_trip(sparse_export):
    m = onnx.load(str(sparse_export / "model.onnx"))
    n_plug = sum(n.op_type in OPS for n in m.graph.node)
    assert onnx_nodes.set_plugin_domain(m, "trt.plugins") == n_plug
    assert {n.domain for n in m.graph.node if n.op_type in OPS} == {"trt.plugins"}
    domains = {o.domain for o in m.opset_import}
    assert "trt.plugins" in domains and "ffsplit" not in domains
    assert onnx_nodes.set_plugin_domain(m, "trt.plugins") == 0  # idempotent
    assert onnx_nodes.set_plugin_domain(m, "ffsplit") == n_plug
    assert {o.domain for o in m.opset_import} >= {"ffsplit"} and "trt.plugins" not in {
        o.domain for o in m.opset_import
    }
    with pytest.raises(ConfigError, match="trt.plugins"):
        onnx_nodes.set_plugin_domain(m, "com.example")


def _nm24_module(n=48, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    grp = w.abs().reshape(n, k // 4, 4)
    keep = torch.zeros_like(grp, dtype=torch.bool)
    keep.scatter_(2, grp.topk(2, dim=2).indices, True)
    m = NM24Linear(w, keep.reshape(n, k), bias=torch.randn(n, generator=g))
    m.trt_dense_weights = True
    return m


def test_sparse24_dense_export_is_a_gemm_with_2d_constant_weight(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    mod = _nm24_module()
    path = tmp_path / "nm24.onnx"
    x = torch.randn(2, 5, 64)
    with export_target("tensorrt"), torch.no_grad():
        torch.onnx.export(
            mod,
            (x,),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}},
            opset_version=17,
            dynamo=False,
        )
    m = onnx.load(str(path))
    ops = [n.op_type for n in m.graph.node]
    assert "Gemm" in ops and "MatMul" not in ops and not any(op in OPS for op in ops), ops
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs.get("transB") == 1 and attrs.get("transA", 0) == 0
    consts = {n.output[0]: n for n in m.graph.node if n.op_type == "Constant"}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    b = gemm.input[1]
    w = inits[b] if b in inits else onnx.numpy_helper.to_array(consts[b].attribute[0].t)
    assert w.shape == (48, 64)  # stored [N, K]: the 2:4 groups run along K, contiguous
    assert ((w.reshape(48, 16, 4) != 0).sum(axis=2) <= 2).all()
    np.testing.assert_array_equal(w, mod.dense_weight().numpy())

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 5), (1, 1), (3, 7)]:
        xi = torch.randn(*shape, 64)
        want = mod(xi).detach().numpy()
        got = sess.run(None, {"x": xi.numpy()})[0]
        assert got.shape == want.shape
        # same float32 product in both; measured ~5e-7 (summation order)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_tiny_mpt_24_dense_export_validates_in_onnx_runtime(tmp_path):
    out = tmp_path / "nm24"
    manifest = _export(out, light_format="2:4-int8", trt_dense_24=True)
    m = onnx.load(str(out / "model.onnx"))
    assert not any(n.op_type in OPS for n in m.graph.node)
    gemms = [n for n in m.graph.node if n.op_type == "Gemm"]
    assert gemms and all(
        {a.name: onnx.helper.get_attribute_value(a) for a in g.attribute}.get("transB") == 1 for g in gemms
    )
    assert manifest["trt_sparse_weights"] is True
    # ORT-vs-PyTorch validation ran (the graph has no plugin nodes) and passed its tolerance
    val = manifest.get("validation") or {}
    flat = str(val)
    assert "outputs" in flat, manifest.keys()


@pytest.mark.tensorrt
def test_tensorrt_parser_takes_the_plugin_nodes(sparse_export):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    for int32_view in (True, False):
        network = _trt_parse(sparse_export / "model.onnx", int32_view)
        kinds = {network.get_layer(i).type for i in range(network.num_layers)}
        assert trt.LayerType.PLUGIN_V3 in kinds


@pytest.mark.tensorrt
def test_ort_tensorrt_session_without_tensorrt_is_a_typed_error(sparse_export):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        from ffsplit_export.runtime import tensorrt_session

        with pytest.raises(FFSplitError, match="(?i)tensorrt"):
            tensorrt_session(sparse_export / "model.onnx")
        return
    pytest.skip("tensorrt is installed: scripts/gpu_check.sh runs the real session")
