"""``export/subgraphs.py``: large constants of a merged decoder's ``If`` branches stored once.

A hand-built ``If`` model (both branches read the same large constant under different names, one
branch also a large constant of its own, a small constant stays) is run by the ONNX reference
evaluator before and after the pass, for both branch conditions: outputs equal bit for bit, the
shared value stored once.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from ffsplit_export.export.subgraphs import hoist_branch_constants, hoist_file

W = np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 100.0  # 8 KB: hoisted, shared
V = -W[:, :16].copy()  # 4 KB, else branch only


def _const(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value))


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _model() -> onnx.ModelProto:
    sl = ["s0", "s1", "ax"]
    then_g = helper.make_graph(
        [
            _const("w", W),
            _const("one", np.ones(1, np.float32)),
            helper.make_node("MatMul", ["x", "w"], ["t0"]),
            helper.make_node("Slice", ["t0", *sl], ["t1"]),
            helper.make_node("Add", ["t1", "one"], ["t"]),
        ],
        "then",
        [],
        [_vi("t", [2, 16])],
    )
    else_g = helper.make_graph(
        [
            _const("w_else", W),
            _const("v", V),
            helper.make_node("MatMul", ["x", "w_else"], ["e0"]),
            helper.make_node("Slice", ["e0", *sl], ["e1"]),
            helper.make_node("MatMul", ["x", "v"], ["e2"]),
            helper.make_node("Add", ["e1", "e2"], ["e"]),
        ],
        "else",
        [],
        [_vi("e", [2, 16])],
    )
    inits = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in zip(sl, (0, 16, 1))]
    g = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
        "g",
        [_vi("x", [2, 64]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [_vi("y", [2, 16])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _run(m, x, cond):
    return ReferenceEvaluator(m).run(None, {"x": x, "cond": np.array(cond)})[0]


def test_shared_constant_stored_once_same_outputs():
    m = _model()
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    before = {c: _run(m, x, c) for c in (True, False)}
    size = m.ByteSize()
    stats = hoist_branch_constants(m)
    onnx.checker.check_model(m, full_check=True)
    assert stats == {"constants": 3, "initializers": 2, "bytes_saved": numpy_helper.from_array(W).ByteSize()}
    for c in (True, False):
        np.testing.assert_array_equal(_run(m, x, c), before[c])
    assert size - m.ByteSize() >= W.nbytes  # W no longer stored twice
    branches = [a.g for n in m.graph.node if n.op_type == "If" for a in n.attribute]
    left = [n.output[0] for g in branches for n in g.node if n.op_type == "Constant"]
    assert left == ["one"]  # the small constant stays in its branch
    shared = {
        t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name.startswith("ffsplit_shared/")
    }
    assert sorted(v.shape for v in shared.values()) == [(64, 16), (64, 32)]


def test_file_pass_rewrites_only_if_graphs(tmp_path):
    m = _model()
    path = tmp_path / "merged.onnx"
    onnx.save_model(m, str(path))
    assert hoist_file(path)["constants"] == 3
    assert path.stat().st_size < m.ByteSize() - W.nbytes // 2
    plain = tmp_path / "plain.onnx"
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [_vi("x", [1])], [_vi("y", [1])])
    onnx.save_model(helper.make_model(g), str(plain))
    assert hoist_file(plain) is None
