"""AOT compilation of every kernel x tile config for sm_80 and sm_90 (no GPU needed),
plus the pure-Python parts of the TensorRT path (layout view, PTX rewriting, errors)."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest

from ffsplit_export.errors import ConfigError, FormatError, PluginNotFoundError


@pytest.fixture(scope="module")
def aot_summary(tmp_path_factory):
    pytest.importorskip("triton")
    from ffsplit_export.trt.aot import compile_all

    out = tmp_path_factory.mktemp("aot")
    return out, compile_all(out, [80, 90])


def test_every_kernel_compiles_for_both_archs(aot_summary):
    from ffsplit_export.trt.configs import CONFIGS, all_specs

    out, summary = aot_summary
    assert len(summary["kernels"]) == 2 * len(all_specs()) * len(CONFIGS)
    runtime_args: dict[str, set[int]] = {}
    for spec in all_specs():
        n_args = sum(1 for t in spec.full_signature().values() if t != "constexpr")
        runtime_args.setdefault(spec.op_type, set()).add(n_args)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    for e in summary["kernels"]:
        for field in ("kernel", "config", "arch", "registers", "spill_stores_bytes", "spill_loads_bytes",
                      "shared_mem_bytes", "ptx_target", "ptx_version", "cubin", "ptx"):  # fmt: skip
            assert field in e, field
        arch = e["arch"]
        assert e["ptx_target"].startswith(f".target {arch}"), e["ptx_target"]  # sm_90 is sm_90a
        ptx = (out / e["ptx"]).read_text()
        assert f".target {arch}" in ptx
        cubin = (out / e["cubin"]).read_bytes()
        assert cubin[:4] == b"\x7fELF"
        assert 0 < e["registers"] <= 255
        assert e["spill_stores_bytes"] == 0 and e["spill_loads_bytes"] == 0, (e["kernel"], e["config"], arch)
        assert e["shared_mem_bytes"] < 48 * 1024  # no opt-in dynamic shared memory needed
        # Triton appends scratch pointers (how many depends on its version); once the unused ones are
        # stripped, the entry takes exactly the kernel's runtime arguments, which the plugin passes
        entry = re.search(r"\.entry\s+\S+\s*\((.*?)\)", ptx, re.S).group(1)
        n_params = sum(1 for p in entry.split(",") if p.strip())
        assert e["hidden_params_removed"] >= 0 and n_params in runtime_args[e["kernel"]], (
            e["kernel"],
            n_params,
        )


def test_ptx_params_follow_trt_convention(aot_summary):
    """Entry params: inputs, int32 extra args, output; nothing else (TensorRT passes only those)."""
    import re

    out, summary = aot_summary
    for e in summary["kernels"]:
        ptx = (out / e["ptx"]).read_text()
        params = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, re.S).group(1)
        kinds = [".u32" if ".u32" in p else ".u64" for p in params.split(",") if p.strip()]
        sig = e["signature"]
        assert len(kinds) == len(sig)
        scalars = [i for i, s in enumerate(sig) if s in ("M", "N", "K") or s.endswith("STRIDE")]
        assert all(kinds[i] == ".u32" for i in scalars)
        assert scalars == list(range(scalars[0], scalars[-1] + 1)) and sig[-1] == "y_ptr"


def test_strip_keeps_used_params():
    from ffsplit_export.trt.aot import strip_unused_trailing_params

    ptx = ".visible .entry k(\n.param .u64 k_param_0,\n.param .u32 k_param_1,\n.param .u64 k_param_2\n)\n{ ld.param.u32 %r1, [k_param_1]; }"
    new, removed = strip_unused_trailing_params(ptx, "k")
    assert removed == 1 and "k_param_2" not in new and "k_param_0" in new


def test_parse_archs():
    from ffsplit_export.trt.aot import parse_archs

    assert parse_archs("sm_80,sm_90") == [80, 90]
    with pytest.raises(ConfigError, match="sm_70"):
        parse_archs("sm_70")


def test_trt_plugin_command(tmp_path):
    pytest.importorskip("triton")
    from ffsplit_export.cli.trt import add_trt_plugin_arguments, run_trt_plugin
    from ffsplit_export.trt.configs import CONFIGS, all_specs

    p = argparse.ArgumentParser()
    add_trt_plugin_arguments(p)
    args = p.parse_args(["--aot-only", "--arch", "sm_90", "--output", str(tmp_path)])
    assert run_trt_plugin(args) == 0
    assert len(json.loads((tmp_path / "summary.json").read_text())["kernels"]) == len(all_specs()) * len(
        CONFIGS
    )


def test_int32_view_is_byte_identical():
    from ffsplit_export.formats import packing
    from ffsplit_export.trt.layout import device_weights

    rng = np.random.default_rng(1)
    w = rng.standard_normal((7, 45)).astype(np.float32) * (rng.random((7, 45)) < 0.4)
    q, s = packing.quantize_int8_per_channel(w)
    p = packing.pack_bitmask(q)
    mask, vals, rp, s2 = device_weights("SparseMatMulInt8", p.mask, p.values, p.row_ptr, s)
    assert mask.dtype == np.int32 and mask.shape == (7, 2)
    assert np.array_equal(mask.view(np.uint8).reshape(7, 8)[:, :6], p.mask)
    assert np.array_equal(vals.view(np.int8)[: p.values.size], p.values)
    assert rp.dtype == np.int32 and np.array_equal(rp, p.row_ptr)
    assert s2 is s
    with pytest.raises(FormatError, match="int32"):
        device_weights("SparseMatMulFP32", p.mask, p.values.astype(np.float32), np.array([0, 2**33]))


def _plugin_graph(op_type="SparseMatMulInt8"):
    from onnx import TensorProto, helper, numpy_helper

    from ffsplit_export.formats import packing

    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 13)).astype(np.float32) * (rng.random((6, 13)) < 0.5)
    q, s = packing.quantize_int8_per_channel(w)
    p = packing.pack_bitmask(q)
    inits = [
        numpy_helper.from_array(a, n) for a, n in ((p.mask, "m"), (p.values, "v"), (p.row_ptr, "r"), (s, "s"))
    ]
    from ffsplit_export.trt import trt_plugin_attributes

    node = helper.make_node(op_type, ["X", "m", "v", "r", "s"], ["Y"], domain="ffsplit",
                            **trt_plugin_attributes())  # fmt: skip
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 13])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 6])],
        initializer=inits,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ffsplit", 1)]
    )
    return model, (p.mask, p.values, p.row_ptr, s)


def test_prepare_model_rewrites_plugin_inputs_and_keeps_semantics():
    from onnx.reference import ReferenceEvaluator

    from ffsplit_export.ops import reference_ops
    from ffsplit_export.trt.layout import prepare_model

    model, _ = _plugin_graph()
    x = np.random.default_rng(3).standard_normal((3, 13)).astype(np.float32)
    before = ReferenceEvaluator(model, new_ops=reference_ops()).run(None, {"X": x})[0]
    assert prepare_model(model) == 1
    assert prepare_model(model) == 0  # idempotent
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    assert set(dtypes) == {"m__trt_i32", "v__trt_i32", "r__trt_i32", "s"}
    # the int32 view decodes to the same W: undo it and compare with the reference
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    from ffsplit_export.ops import reference_matmul

    mask = inits["m__trt_i32"].view(np.uint8).reshape(6, -1)[:, :2]
    vals = inits["v__trt_i32"].view(np.int8)[: int(inits["r__trt_i32"][-1])]
    after = reference_matmul(
        "SparseMatMulInt8", x, mask, vals, inits["r__trt_i32"].astype(np.int64), inits["s"]
    )
    np.testing.assert_array_equal(before, after)


def test_prepare_model_follows_identity_of_a_shared_weight():
    """A second plugin node reading the first one's row_ptr through an Identity (what the exporter
    writes for equal weights, seen on a tiny-mpt --target tensorrt export) is rewritten too."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    from ffsplit_export.ops import reference_ops
    from ffsplit_export.trt.layout import prepare_model

    model, _ = _plugin_graph()
    first = model.graph.node[0]
    alias = helper.make_node("Identity", ["r"], ["r_shared"])
    second = helper.make_node(first.op_type, ["X", "m", "v", "r_shared", "s"], ["Y2"], domain="ffsplit")
    second.attribute.extend(first.attribute)
    add = helper.make_node("Add", ["Y", "Y2"], ["Z"])
    first.output[0] = "Y"
    model.graph.node.extend([alias, second, add])
    model.graph.output[0].name = "Z"
    from onnx import numpy_helper

    row_ptr = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "r"))
    assert ReferenceEvaluator(model, new_ops=reference_ops()).run(None, {"X": np.ones((2, 13), np.float32)})
    assert prepare_model(model) == 2
    assert model.graph.node[2].input[3] == "r_shared__trt_i32"
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name in ("r__trt_i32", "r_shared__trt_i32"):  # the int32 view of the same row pointers
        assert inits[name].dtype == np.int32
        np.testing.assert_array_equal(inits[name], row_ptr)
    assert prepare_model(model) == 0  # idempotent


def test_missing_tensorrt_is_a_typed_error(tmp_path):
    from ffsplit_export.trt import TensorRTUnavailableError, build_engines

    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed")
    except ImportError:
        pass
    model, _ = _plugin_graph()
    import onnx

    onnx.save(model, str(tmp_path / "model.onnx"))
    size = (tmp_path / "model.onnx").stat().st_size
    manifest = {
        "light_format": "sparse-int8",
        "task": "feature-extraction",
        "onnx_files": {"model.onnx": size},
    }
    (tmp_path / "ffsplit.json").write_text(json.dumps(manifest))
    with pytest.raises(TensorRTUnavailableError, match="pip install") as ei:
        build_engines(tmp_path)
    assert isinstance(ei.value, PluginNotFoundError) and isinstance(ei.value, RuntimeError)
    with pytest.raises(ConfigError):
        build_engines(tmp_path / "nope")
    with pytest.raises(ConfigError):
        build_engines(tmp_path, fp16=True, bf16=True)


def test_manifest_sparse_flag(tmp_path):
    from ffsplit_export.trt.engine import read_manifest, wants_sparse_weights

    assert read_manifest(tmp_path) == {}
    from ffsplit_export.manifest import REQUIRED_KEYS

    complete = {k: "x" for k in REQUIRED_KEYS} | {"onnx_files": {"model.onnx": 1}}
    (tmp_path / "model.onnx").write_bytes(b"x")
    (tmp_path / "ffsplit.json").write_text(
        json.dumps(complete | {"light_format": "2:4-int8", "trt_sparse_weights": True})
    )
    assert wants_sparse_weights(read_manifest(tmp_path))
    assert not wants_sparse_weights({"light_format": "2:4-int8"})
