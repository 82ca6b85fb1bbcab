"""ffsplit::SparseMatMulInt4 in the ONNX Runtime library against the NumPy reference (the
tests/test_ort_plugin.py style): every ISA path this CPU has (FFSPLIT_ISA), odd K and N, rows
with no kept weight, M = 0 .. 130, group sizes 8 / 32 / 128, NaN / inf semantics, malformed
initializers failing at session creation. Skips cleanly when the library is not built."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ffsplit_export.errors import PluginNotFoundError
from ffsplit_export.formats import packing
from ffsplit_export.ops import DOMAIN, VERSION, check_op_weights, reference_matmul
from ffsplit_export.runtime._plugin import plugin_path, session_options

ort = pytest.importorskip("onnxruntime")

try:
    plugin_path()
    _MISSING = ""
except PluginNotFoundError as _e:
    _MISSING = str(_e)
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"ffsplit ORT library not built: {_MISSING}")

OP = "SparseMatMulInt4"
ISAS = ("scalar", "avx2", "avx512", "avx512vbmi2", "avx512vnni")
NAMES = ("mask", "values", "row_ptr", "scales")
TYPES = (TensorProto.UINT8, TensorProto.UINT8, TensorProto.INT64, TensorProto.FLOAT)


def make_weights(n: int, k: int, sparsity: float, group_size: int, seed: int = 0):
    """Packed inputs for a random [n, k] weight; every 7th row is empty, row 1 is full."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    keep = rng.random((n, k)) >= sparsity
    keep[::7] = False
    if n > 1:
        keep[1] = True
    q, s = packing.quantize_sparse_int4(w, keep, group_size)
    q[keep & (rng.random((n, k)) < 0.05)] = 0  # stored zero codes: structural zeros, groups unchanged
    p = packing.pack_sparse_int4(q, keep, s, group_size)
    return p.mask, p.values, p.row_ptr, p.scales


def make_model(x_shape, weights, group_size, as_inputs=False, attrs=None) -> bytes:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    inits, inputs = [], [x]
    for name, arr, ty in zip(NAMES, weights, TYPES):
        if as_inputs:
            inputs.append(helper.make_tensor_value_info(name, ty, [None] * np.ndim(arr)))
        else:
            inits.append(numpy_helper.from_array(np.asarray(arr), name))
    a = {} if group_size is None else {"group_size": group_size}
    a.update(attrs or {})
    node = helper.make_node(OP, ["X", *NAMES], ["Y"], domain=DOMAIN, name="light", **a)
    graph = helper.make_graph([node], "g", inputs, [y], initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, VERSION)]
    )
    model.ir_version = 10
    return model.SerializeToString()


def session(model: bytes, isa: str | None, monkeypatch):
    if isa is None:
        monkeypatch.delenv("FFSPLIT_ISA", raising=False)
    else:
        monkeypatch.setenv("FFSPLIT_ISA", isa)
    so = session_options(intra_op_num_threads=2, log_severity_level=3)
    try:
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        if "not supported by this CPU" in str(e):
            pytest.skip(f"{isa} not available on this CPU")
        raise


def check_close(y, ref, k):
    assert y.shape == ref.shape and y.dtype == np.float32
    if not ref.size:
        return
    # float32 accumulation (code * scale rounded to float32 per term) against the float64 reference;
    # measured max |diff| / (1 + max |ref|) <= 1e-6 over these cases
    tol = 2e-6 * np.sqrt(k) * (1.0 + np.abs(ref).max())
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=tol)


# (K, N, sparsity, group size, rank of X)
CASES = [
    (37, 83, 0.5, 8, 2),
    (101, 45, 0.5, 12, 2),  # group_size not a multiple of 8: the per-lane scale path at every M
    (545, 830, 0.5, 32, 3),
    (545, 61, 0.75, 32, 2),
    (64, 16, 0.0, 128, 2),
    (200, 33, 1.0, 32, 2),
    (130, 70, 0.9, 16, 3),
]
M_ROWS = (0, 1, 3, 16, 17, 64, 130)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"K{c[0]}-N{c[1]}-s{c[2]}-g{c[3]}-r{c[4]}")
def test_matches_reference(isa, case, monkeypatch):
    k, n, sparsity, gs, rank = case
    weights = make_weights(n, k, sparsity, gs, seed=k * n)
    check_op_weights(OP, k, *weights, group_size=gs)
    x_shape = ["m", k] if rank == 2 else ["b", "s", k]
    sess = session(make_model(x_shape, weights, gs), isa, monkeypatch)
    rng = np.random.default_rng(1)
    for m in M_ROWS:
        shape = (m, k) if rank == 2 else ((1, m, k) if m % 2 else (2, m // 2, k))
        x = rng.standard_normal(shape).astype(np.float32)
        (y,) = sess.run(None, {"X": x})
        check_close(y, reference_matmul(OP, x, *weights, group_size=gs), k)


@pytest.mark.parametrize("level", [0, 4])
def test_accuracy_level_is_exact(level, monkeypatch):
    """accuracy_level 4 is accepted and computed on the exact float32 path (no int8 activations yet)."""
    k, n, gs = 461, 300, 32
    weights = make_weights(n, k, 0.75, gs, seed=11)
    sess = session(make_model(["m", k], weights, gs, attrs={"accuracy_level": level}), None, monkeypatch)
    rng = np.random.default_rng(4)
    for m in (1, 16, 33):
        x = (rng.standard_normal((m, k)) * 100).astype(np.float32)
        (y,) = sess.run(None, {"X": x})
        check_close(y, reference_matmul(OP, x, *weights, group_size=gs), k)


def test_weights_as_graph_inputs(monkeypatch):
    k, n, gs = 45, 19, 8
    weights = make_weights(n, k, 0.5, gs, seed=5)
    sess = session(make_model(["m", k], weights, gs, as_inputs=True), None, monkeypatch)
    x = np.random.default_rng(0).standard_normal((5, k)).astype(np.float32)
    (y,) = sess.run(None, {"X": x, **dict(zip(NAMES, weights))})
    check_close(y, reference_matmul(OP, x, *weights, group_size=gs), k)
    bad = list(weights)
    bad[3] = bad[3][:-1]
    with pytest.raises(Exception, match="scales must be float32"):
        sess.run(None, {"X": x, **dict(zip(NAMES, bad))})


@pytest.mark.parametrize("isa", ISAS)
def test_nonfinite_semantics(isa, monkeypatch):
    """NaN / inf in X and in scales: the reference's positions (structural zeros skipped)."""
    k, n, gs = 16, 3, 8
    q = np.ones((n, k), np.int8)
    keep = np.ones((n, k), bool)
    keep[2, 8:] = keep[2, 3] = False
    q[2, 8:] = q[2, 3] = 0
    q[1, 3] = 0  # a stored zero code
    scales = np.ones(5, np.float32)
    scales[4] = np.inf  # row 2's only group
    p = packing.pack_sparse_int4(q, keep, scales, gs)
    ws = (p.mask, p.values, p.row_ptr, p.scales)
    sess = session(make_model(["m", k], ws, gs), isa, monkeypatch)
    for m in (1, 16):
        x = np.ones((m, k), np.float32)
        x[0, 3] = np.nan  # row 1's code there is 0: skipped
        x[0, 12] = -np.inf  # row 2 does not store column 12
        (y,) = sess.run(None, {"X": x})
        ref = reference_matmul(OP, x, *ws, group_size=gs)
        for f in (np.isnan, np.isposinf, np.isneginf):
            np.testing.assert_array_equal(f(y), f(ref))
        fin = np.isfinite(ref)
        np.testing.assert_allclose(y[fin], ref[fin], rtol=1e-6)
        # row 0 uses the NaN; row 1 skips it (zero code) but meets the -inf; row 2 skips both (inf scale)
        assert np.isnan(y[0, 0]) and np.isneginf(y[0, 1]) and np.isposinf(y[0, 2])
        if m > 1:
            assert np.isfinite(y[1, :2]).all() and y[1, 1] == k - 1


def _malformed():
    k, gs = 37, 8
    ws = [np.array(a) for a in make_weights(11, k, 0.5, gs, seed=7)]

    def with_(i, v):
        out = list(ws)
        out[i] = v
        return out

    rp = ws[2].copy()
    rp[4] += 1
    past = ws[0].copy()
    past[2, -1] |= 0x80
    return [
        (with_(2, rp), gs, "row_ptr does not match the mask"),
        (with_(0, past), gs, "bits set past column K=37"),
        (with_(3, ws[3][:-1]), gs, r"scales must be float32 \["),
        (with_(1, ws[1][:-1]), gs, "values hold"),
        (with_(1, ws[1].astype(np.int8)), gs, "values|Type|type"),
        (ws, None, "group_size is required"),
        (ws, 4, "group_size must be >= 8"),
        (ws, 16, r"scales must be float32 \["),
    ]


@pytest.mark.parametrize("case", range(8))
def test_malformed_initializer_fails_at_session_creation(case, monkeypatch):
    weights, gs, match = _malformed()[case]
    with pytest.raises(Exception, match=match):
        session(make_model(["m", 37], weights, gs), None, monkeypatch)


def test_odd_high_nibble_rejected(monkeypatch):
    k, gs = 9, 8
    q = np.zeros((1, k), np.int8)
    keep = np.zeros((1, k), bool)
    keep[0, [0, 4, 8]] = True
    q[0, [0, 4, 8]] = [1, -2, 3]
    p = packing.pack_sparse_int4(q, keep, np.ones(1, np.float32), gs)
    v = p.values.copy()
    v[-1] |= 0x50
    with pytest.raises(Exception, match="unused high nibble"):
        session(make_model(["m", k], (p.mask, v, p.row_ptr, p.scales), gs), None, monkeypatch)


def test_omitted_input_fails(monkeypatch):
    weights = make_weights(6, 16, 0.5, 8)
    model = onnx.load_from_string(make_model([1, 16], weights, 8))
    model.graph.node[0].input[2] = ""
    with pytest.raises(Exception, match=r"is omitted \(empty name\)"):
        session(model.SerializeToString(), "scalar", monkeypatch)
