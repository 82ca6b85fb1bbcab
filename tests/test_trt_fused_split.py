"""``split_fused_ffn`` on graphs as the exporter writes them, and the plugin nodes' NumPy semantics.

* The two plugin nodes (``FusedFFNNBitsUp`` / ``Down``, evaluated by ``plugin_reference_ops`` in
  ``onnx.reference``) give exactly what the ``FusedFFNNBits`` reference gives, for every case of
  test_triton_fused_ffn.py (thresholds, input_threshold, NaN / inf in X and in a down scale).
* Weights as Constant nodes, behind Identity nodes, from an enclosing graph, inside If branches
  (merged decoders): split everywhere, the original weights gone, the function unchanged.
No triton, no TensorRT: pure NumPy + onnx.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from test_triton_fused_ffn import CASES, SLOW_CASES, _inputs


def _evaluator(model):
    from ffsplit_export.ops import reference_ops
    from ffsplit_export.trt.fused_nodes import plugin_reference_ops

    return ReferenceEvaluator(model, new_ops=reference_ops() + plugin_reference_ops())


@pytest.mark.parametrize("name", [*CASES, *SLOW_CASES])
def test_plugin_nodes_equal_the_fused_reference(name):
    from ffsplit_export.ops._ffn import fused_ffn_nbits_model, fused_ffn_nbits_reference
    from ffsplit_export.trt.fused_nodes import DOWN_OP, UP_OP, split_fused_ffn

    x, ins, attrs, _ = _inputs(name)
    act = attrs.pop("activation")
    model = fused_ffn_nbits_model(ins, activation=act, **attrs)
    assert split_fused_ffn(model) == 1
    assert [n.op_type for n in model.graph.node] == [UP_OP, DOWN_OP]
    ref = fused_ffn_nbits_reference(x, *ins, activation_kind=act, **attrs)
    for xx, want in ((x, ref), (np.stack([x, x]), np.stack([ref, ref]))):  # rank 2 and 3
        (y,) = _evaluator(model).run(None, {"X": xx})
        np.testing.assert_array_equal(y, want)  # the same NumPy arithmetic: bit-exact, NaN where NaN


def _exported_like(name: str):
    """A FusedFFNNBits node's weights as the ONNX exporter writes them: the main graph holds one
    weight as an initializer (read through an Identity in the branch), the If branches their own
    Constant nodes and a FusedFFNNBits node each (then: as is; else: Y * 2)."""
    from ffsplit_export.ops._spec import DOMAIN, VERSION

    x, ins, attrs, _ = _inputs(name)
    act = attrs.pop("activation")
    shared = 4  # input 5 (up light scales): an outer initializer behind an Identity

    def branch(tag, double):
        nodes, names = [], []
        for i, a in enumerate(ins):
            if a is None:
                names.append("")
            elif i == shared:
                nodes.append(helper.make_node("Identity", ["outer_w5"], [f"{tag}_shared"]))
                names.append(f"{tag}_shared")
            else:
                t = numpy_helper.from_array(np.ascontiguousarray(a), f"{tag}_c{i}")
                nodes.append(helper.make_node("Constant", [], [f"{tag}_w{i}"], value=t))
                names.append(f"{tag}_w{i}")
        while names and not names[-1]:
            names.pop()
        y = f"{tag}_y"
        nodes.append(helper.make_node("FusedFFNNBits", ["X", *names], [y], name="ffn", domain=DOMAIN,
                                      activation=act, **attrs))  # fmt: skip
        if double:
            nodes.append(helper.make_node("Add", [y, y], [f"{tag}_y2"]))
            y = f"{tag}_y2"
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)])

    node = helper.make_node(
        "If", ["cond"], ["Y"], then_branch=branch("then", False), else_branch=branch("else", True)
    )
    graph = helper.make_graph(
        [node],
        "merged",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("X", TensorProto.FLOAT, None),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(ins[shared], "outer_w5")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, VERSION)], ir_version=8
    )
    return x, model


@pytest.mark.parametrize("name", ["gelu_h8z_l8z_m2_thr", "gelu_in_h8_l8_m3_thr", "silu_gated_h8_l4z_m3_prod"])
def test_split_reads_constants_identities_and_if_branches(name):
    from ffsplit_export.export.validate import all_nodes
    from ffsplit_export.trt.fused_nodes import DOWN_OP, UP_OP, split_fused_ffn
    from ffsplit_export.trt.onnx_nodes import check_plugin_node

    x, model = _exported_like(name)
    before = _evaluator(model)
    want = {c: before.run(None, {"cond": np.array(c), "X": x})[0] for c in (True, False)}
    assert split_fused_ffn(model) == 2
    nodes = list(all_nodes(model.graph))
    assert sorted(n.op_type for n in nodes if n.domain == "ffsplit") == [DOWN_OP, DOWN_OP, UP_OP, UP_OP]
    assert all(check_plugin_node(n) is None for n in nodes if n.domain == "ffsplit")
    # the exporter's weights are gone (Constant, Identity, the outer initializer); names are unique
    assert not [n for n in nodes if n.op_type in ("Constant", "Identity")]
    assert not list(model.graph.initializer)
    outs = [o for n in nodes for o in n.output]
    assert len(outs) == len(set(outs))
    after = _evaluator(model)
    for c in (True, False):
        np.testing.assert_array_equal(after.run(None, {"cond": np.array(c), "X": x})[0], want[c])
    assert split_fused_ffn(model) == 0  # idempotent


def test_split_keeps_weights_read_elsewhere_and_names_what_is_missing():
    from ffsplit_export.errors import FormatError
    from ffsplit_export.trt.fused_nodes import split_fused_ffn

    x, model = _exported_like("gelu_h8z_l8z_m2_thr")
    # another node reads the shared outer initializer: it stays
    model.graph.node.append(helper.make_node("Identity", ["outer_w5"], ["also"]))
    model.graph.output.append(helper.make_tensor_value_info("also", TensorProto.FLOAT, None))
    assert split_fused_ffn(model) == 2
    assert [t.name for t in model.graph.initializer] == ["outer_w5"]
    # a weight that is a graph input, not a constant: refused, naming it
    _, model = _exported_like("gelu_h8z_l8z_m2_thr")
    model.graph.input.append(helper.make_tensor_value_info("outer_w5", TensorProto.FLOAT, None))
    del model.graph.initializer[:]
    with pytest.raises(FormatError, match="_shared"):
        split_fused_ffn(model)


def test_export_split_keeps_external_data_and_the_presplit_copy(tmp_path):
    """The export's split step on a file with external data: the file and its data are rewritten
    (no stale bytes appended), the graph before the split is kept for ONNX Runtime."""
    from ffsplit_export.export.core import _split_for_tensorrt
    from ffsplit_export.ops._ffn import fused_ffn_nbits_model, fused_ffn_nbits_reference

    x, ins, attrs, _ = _inputs("gelu_in_h8_l8_m3_thr")
    act = attrs.pop("activation")
    out, keep = tmp_path / "out", tmp_path / "keep"
    out.mkdir()
    keep.mkdir()
    onnx.save_model(
        fused_ffn_nbits_model(ins, activation=act, **attrs), str(out / "model.onnx"),
        save_as_external_data=True, location="model.onnx_data", size_threshold=0,
    )  # fmt: skip
    presplit: dict = {}
    assert _split_for_tensorrt(out, keep, presplit) == {"model.onnx": 1}
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx_data"]
    assert presplit == {"model.onnx": keep / "model.onnx"} and (keep / "model.onnx_data").exists()
    ref = fused_ffn_nbits_reference(x, *ins, activation_kind=act, **attrs)
    split = onnx.load(str(out / "model.onnx"))
    assert [n.op_type for n in split.graph.node] == ["FusedFFNNBitsUp", "FusedFFNNBitsDown"]
    np.testing.assert_array_equal(_evaluator(split).run(None, {"X": x})[0], ref)
    before = onnx.load(str(keep / "model.onnx"))
    np.testing.assert_array_equal(_evaluator(before).run(None, {"X": x})[0], ref)
    # the data file holds exactly the split graph's tensors (rewritten, not appended to)
    size = sum(int(e.value) for t in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer
               for e in t.external_data if e.key == "length")  # fmt: skip
    assert (out / "model.onnx_data").stat().st_size <= size + 4096 * len(split.graph.initializer)
