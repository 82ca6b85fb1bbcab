"""``export --target tensorrt`` with fused FFNs (``--fused-ffn`` / ``--activation-sparsity`` /
``--input-sparsity``): every FFN one ``FusedFFNNBits`` node at export, written as the two TensorRT
plugin nodes ``FusedFFNNBitsUp`` + ``FusedFFNNBitsDown``.

Validation without a GPU: ONNX Runtime (CPU library) runs each graph before the split against
PyTorch (the export's exact-path tolerance), and onnx's reference evaluator runs the split graph
(the plugin nodes in NumPy, ``plugin_reference_ops``) against ONNX Runtime. Measured on these tiny
models: both differences <= 7.2e-7 (tiny-whisper, tiny-mpt, tiny-llama). A corrupted split fails it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ffsplit_export.errors import ConfigError, ValidationError

pytestmark = pytest.mark.slow  # one tiny export each, 5-15 s


def _needs_kernel():
    from test_fused_nbits_export import _MISSING

    if _MISSING:
        pytest.skip(_MISSING)


def _export(name, out, **opts):
    from ffsplit_export.export.api import export
    from ffsplit_export.export.core import ExportOptions

    return export(
        name,
        out,
        options=ExportOptions(target="tensorrt", **opts),
        num_samples=8,
        progress=False,
        preset="balanced",
        light_format="int4",
        heavy_format="int8",
    )


def _attrs(node) -> dict:
    out = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in out.items()}


@pytest.mark.parametrize(
    "name,opts",
    [
        ("tiny-whisper", {"fused_ffn": True}),  # merged decoder: the FFNs sit in the If branches
        ("tiny-mpt", {"input_sparsity": "0.4", "activation_sparsity": "0.3"}),  # TEAL + neuron thresholds
        ("tiny-llama", {"activation_sparsity": "0.4"}),  # gated: threshold and product_threshold
    ],
)
def test_tensorrt_fused_export_validates_and_writes_plugin_nodes(name, opts, tmp_path):
    _needs_kernel()
    from test_fused_nbits_export import _expected_ffns

    from ffsplit_export.adapters import find_ffns
    from ffsplit_export.export.validate import all_nodes
    from ffsplit_export.models.tiny import build_tiny
    from ffsplit_export.trt.fused_nodes import DOWN_OP, UP_OP
    from ffsplit_export.trt.onnx_nodes import check_plugin_node

    out = tmp_path / "out"
    man = _export(name, out, **opts)
    rec = man["fused_ffn"]
    specs = find_ffns(build_tiny(name)[0])
    assert man["target"] == "tensorrt" and rec["fused"] == len(specs) and not rec["kept_subgraph"]
    # validation: ONNX Runtime before the split vs PyTorch, the reference evaluator on the split graph
    checked = [r for r in man["validation"].values() if "tensorrt_split" in r]
    assert checked and all(r["reference_evaluator"] and r["outputs"] for r in checked)
    for r in checked:
        assert max(r["reference_evaluator"].values()) <= 1e-5 and max(r["outputs"].values()) <= 1e-5, r
    thresholds = {
        "threshold": set(rec.get("thresholds", {}).values()),
        "product_threshold": set(rec.get("product_thresholds", {}).values()),
        "input_threshold": set(rec.get("input_thresholds", {}).values()),
    }
    for f in sorted(out.glob("*.onnx")):
        nodes = list(all_nodes(onnx.load(f).graph))
        assert not [n for n in nodes if n.op_type == "FusedFFNNBits"], f.name
        ups = [n for n in nodes if n.op_type == UP_OP]
        downs = [n for n in nodes if n.op_type == DOWN_OP]
        assert len(ups) == len(downs) == _expected_ffns(f.name, specs), f.name
        assert man["graph_fusion"]["tensorrt_split"][f.name] == len(ups)
        assert all(check_plugin_node(n) is None for n in ups + downs)
        for n in ups:  # the calibrated thresholds reach the plugin node, as float32
            a = _attrs(n)
            for key, want in thresholds.items():
                got = np.float32(a[key])
                assert (got in {np.float32(v) for v in want}) if want else got == 0, (f.name, key, got)
    assert (out / "ffsplit.json").exists() and not list(out.glob(".unfused-*"))


def test_a_wrong_split_fails_validation_and_writes_nothing(tmp_path, monkeypatch):
    """The reference evaluator really checks the split graph: up light scales doubled in the plugin
    node -> ValidationError, and no OUTPUT is left behind."""
    _needs_kernel()
    from ffsplit_export.trt import fused_nodes

    real = fused_nodes.node_arrays

    def corrupt(inputs, heavy_bits):
        up, down = real(inputs, heavy_bits)
        i = fused_nodes.UP_INPUTS.index(5)  # up light scales
        up[i] = up[i] * 2
        return up, down

    monkeypatch.setattr(fused_nodes, "node_arrays", corrupt)
    out = tmp_path / "out"
    with pytest.raises(ValidationError, match="reference evaluator"):
        _export("tiny-mpt", out, fused_ffn=True)
    assert not out.exists()


def test_tensorrt_fused_bad_requests_are_refused_before_loading(tmp_path):
    """Formats the plugin does not carry, and level 4, are refused by the request check (no model is
    loaded), naming the value and the fix."""
    from ffsplit_export.config import CompressionConfig
    from ffsplit_export.export.api import check_export_request
    from ffsplit_export.export.core import ExportOptions

    opts = ExportOptions(target="tensorrt", activation_sparsity="exact")
    ok = CompressionConfig.from_preset("balanced", light_format="int4", heavy_format="int8")
    check_export_request(ok, opts, tmp_path / "ok")
    for light, heavy, want in (("sparse-int8", "fp32", "sparse-int8"), ("int4", "fp16", "fp16")):
        cfg = CompressionConfig.from_preset("balanced", light_format=light, heavy_format=heavy)
        with pytest.raises(ConfigError, match=want) as e:
            check_export_request(cfg, opts, tmp_path / "x")
        assert "--activation-sparsity=exact" in str(e.value) and "--light-format int4" in str(e.value)
    with pytest.raises(ConfigError, match="--nbits-accuracy-level=4"):
        ExportOptions(target="tensorrt", fused_ffn=True, nbits_accuracy_level=4)


def test_unfusable_ffn_is_refused_on_tensorrt(monkeypatch):
    """An FFN that stays a subgraph would carry int8 / int4 parts TensorRT has no form for."""
    from ffsplit_export import fused
    from ffsplit_export.export.api import _fuse
    from ffsplit_export.export.core import ExportOptions
    from ffsplit_export.models.tiny import build_tiny

    model = build_tiny("tiny-mpt")[0]
    monkeypatch.setattr(fused, "fused_op_for", lambda _m, _s: (None, "a reason given by the test"))
    with pytest.raises(ConfigError, match="a reason given by the test") as e:
        _fuse(model, ExportOptions(target="tensorrt", fused_ffn=True))
    assert "--fused-ffn" in str(e.value) and "FusedFFNNBits" in str(e.value)
