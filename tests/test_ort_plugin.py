"""The ONNX Runtime custom-op library (plugins/onnxruntime) against the NumPy reference.

Every op runs on every ISA path this CPU has (FFSPLIT_ISA forces one per session) on odd
shapes, sparsities 0 / 0.5 / 0.75 / 0.9 / 1, empty rows, M = 0 .. 130 and rank-3 X.
Malformed packed initializers must fail at session creation with a clear message.
Skips cleanly when the library is not built.
"""

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

OPS = ("SparseMatMulInt8", "SparseMatMulFP32", "Sparse24MatMulInt8")
ISAS = ("scalar", "avx2", "avx512", "avx512vbmi2", "avx512vnni")
WEIGHT_TYPES = {
    "SparseMatMulInt8": (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT64, TensorProto.FLOAT),
    "SparseMatMulFP32": (TensorProto.UINT8, TensorProto.FLOAT, TensorProto.INT64),
    "Sparse24MatMulInt8": (TensorProto.INT8, TensorProto.UINT8, TensorProto.FLOAT),
}
WEIGHT_NAMES = {
    "SparseMatMulInt8": ("mask", "values", "row_ptr", "scales"),
    "SparseMatMulFP32": ("mask", "values", "row_ptr"),
    "Sparse24MatMulInt8": ("values", "meta", "scales"),
}


# ----------------------------------------------------------------------------- helpers


def make_weights(op: str, n: int, k: int, sparsity: float, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Packed inputs of ``op`` for a random [n, k] weight; every 7th row is empty."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    if op == "Sparse24MatMulInt8":
        g = -(-k // 4)
        keep = np.zeros((n, g * 4), bool)
        rank = rng.random((n, g, 4)).argsort(axis=2)
        keep.reshape(n, g, 4)[...] = rank < (0 if sparsity >= 1 else 2)
        keep = keep[:, :k]
    else:
        keep = rng.random((n, k)) >= sparsity
    keep[::7] = False
    w = np.where(keep, w, 0).astype(np.float32)
    if op == "SparseMatMulFP32":
        p = packing.pack_bitmask(w, keep)
        return p.mask, p.values, p.row_ptr
    q, scales = packing.quantize_int8_per_channel(w)
    if op == "SparseMatMulInt8":
        p = packing.pack_bitmask(q, keep)  # keeps entries that rounded to 0: the kernel must cope
        return p.mask, p.values, p.row_ptr, scales
    p24 = packing.pack_nm24(q)
    return p24.values, p24.meta, scales


def make_model(
    op: str, x_shape: list, weights, as_inputs: bool = False, accuracy_level: int | None = None
) -> bytes:
    names = WEIGHT_NAMES[op]
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    inits, inputs = [], [x]
    for name, arr, ty in zip(names, weights, WEIGHT_TYPES[op]):
        if as_inputs:
            inputs.append(helper.make_tensor_value_info(name, ty, list(np.shape(arr))))
        else:
            inits.append(numpy_helper.from_array(np.asarray(arr), name))
    attrs = {} if accuracy_level is None else {"accuracy_level": accuracy_level}
    node = helper.make_node(op, ["X", *names], ["Y"], domain=DOMAIN, name="light", **attrs)
    graph = helper.make_graph([node], "g", inputs, [y], initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, VERSION)]
    )
    model.ir_version = 10
    return model.SerializeToString()


def session(model: bytes, isa: str | None, monkeypatch) -> ort.InferenceSession:
    if isa is None:
        monkeypatch.delenv("FFSPLIT_ISA", raising=False)
    else:
        monkeypatch.setenv("FFSPLIT_ISA", isa)  # read when the kernel is created
    so = session_options(intra_op_num_threads=2, log_severity_level=3)
    try:
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        if "not supported by this CPU" in str(e):
            pytest.skip(f"{isa} not available on this CPU")
        raise


def check_close(op: str, isa: str, y: np.ndarray, ref: np.ndarray, k: int) -> None:
    assert y.shape == ref.shape and y.dtype == np.float32
    if not ref.size:
        return
    if isa == "avx512vnni" and op != "SparseMatMulFP32":
        # activations quantized to int8 per row (weights are int8 already): signal-to-noise check.
        # measured: relative L2 error up to 1.02e-2 (row-dot, M < 16) and 9.3e-3 (GEMM, M >= 16)
        # over K=37..7373, M=1..130, sparsity 0..0.9 (largest at the smallest K)
        err = np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30)
        assert err < 1.5e-2, f"relative error {err:.3g}"
        return
    # exact fp32 paths: float32 accumulation in a different order than the float64 reference.
    # measured max |diff| / (1 + max |ref|) <= 1.0e-6 on every exact path (K=37..545, M=1..64)
    tol = 2e-6 * np.sqrt(k) * (1.0 + np.abs(ref).max())
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=tol)


# ----------------------------------------------------------------------------- numerics

# (K, N, sparsity, rank of X)
CASES = [(37, 83, 0.5, 2), (545, 830, 0.9, 3), (64, 16, 0.0, 2), (200, 33, 1.0, 2), (130, 70, 0.75, 3)]
M_ROWS = (0, 1, 7, 17, 64, 65, 130)  # 16+: outer-product path, 65 and 130: uneven M blocks


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"K{c[0]}-N{c[1]}-s{c[2]}-r{c[3]}")
def test_matches_reference(op, isa, case, monkeypatch):
    k, n, sparsity, rank = case
    weights = make_weights(op, n, k, sparsity, seed=k * n)
    check_op_weights(op, k, *weights)
    x_shape = ["m", k] if rank == 2 else ["b", "s", k]
    sess = session(make_model(op, x_shape, weights), isa, monkeypatch)
    rng = np.random.default_rng(1)
    for m in M_ROWS:
        if rank == 3 and m % 2:
            shape = (1, m, k)
        else:
            shape = (m, k) if rank == 2 else (2, m // 2, k)
        x = rng.standard_normal(shape).astype(np.float32)
        (y,) = sess.run(None, {"X": x})
        check_close(op, isa, y, reference_matmul(op, x, *weights), k)


@pytest.mark.parametrize("op", OPS)
def test_default_isa_and_large_values(op, monkeypatch):
    weights = make_weights(op, 300, 1000, 0.6, seed=3)
    sess = session(make_model(op, ["m", 1000], weights), None, monkeypatch)
    x = (np.random.default_rng(2).standard_normal((65, 1000)) * 100).astype(np.float32)
    (y,) = sess.run(None, {"X": x})
    check_close(op, "default", y, reference_matmul(op, x, *weights), 1000)


@pytest.mark.parametrize("op", OPS)
def test_weights_as_graph_inputs(op, monkeypatch):
    """Non-constant weights are validated and packed at run time (slow but correct)."""
    k, n = 45, 19
    weights = make_weights(op, n, k, 0.5, seed=5)
    sess = session(make_model(op, ["m", k], weights, as_inputs=True), None, monkeypatch)
    x = np.random.default_rng(0).standard_normal((5, k)).astype(np.float32)
    feeds = {"X": x, **dict(zip(WEIGHT_NAMES[op], weights))}
    (y,) = sess.run(None, feeds)
    check_close(op, "default", y, reference_matmul(op, x, *weights), k)
    bad = list(weights)
    if op == "Sparse24MatMulInt8":
        bad[1] = bad[1].copy()
        bad[1][0, 0] = 0x11  # i0 == i1
        match = "increasing"
    else:
        bad[2] = bad[2].copy()
        bad[2][3] += 1
        match = "row_ptr does not match"
    with pytest.raises(Exception, match=match):
        sess.run(None, {"X": x, **dict(zip(WEIGHT_NAMES[op], bad))})


def test_dynamic_k_checked_at_run_time(monkeypatch):
    op, k = "SparseMatMulFP32", 21
    weights = make_weights(op, 9, k, 0.3, seed=1)
    sess = session(make_model(op, ["m", "k"], weights), None, monkeypatch)
    x = np.ones((2, k), np.float32)
    (y,) = sess.run(None, {"X": x})
    check_close(op, "default", y, reference_matmul(op, x, *weights), k)
    with pytest.raises(Exception, match="X has K=30 columns"):
        sess.run(None, {"X": np.ones((2, 30), np.float32)})
    # K=17 has the same ceil(K/8) but the weight uses columns up to 20
    # (seed 1 stores entries in columns 17..20, so this check always runs)
    assert np.unpackbits(weights[0], axis=1, bitorder="little")[:, 17:].any()
    with pytest.raises(Exception, match="columns up to"):
        sess.run(None, {"X": np.ones((2, 17), np.float32)})


# ----------------------------------------------------------------------------- malformed weights


def _bitmask_int8(k=37, n=11):
    return [np.array(a) for a in make_weights("SparseMatMulInt8", n, k, 0.5, seed=7)]


def _nm24(k=37, n=11):
    return [np.array(a) for a in make_weights("Sparse24MatMulInt8", n, k, 0.5, seed=7)]


def _set(ws, i, value):
    ws = list(ws)
    ws[i] = value
    return ws


def _malformed():
    bm = _bitmask_int8()
    nm = _nm24()
    rp = bm[2].copy()
    rp[4] += 1
    rp_len = bm[2][:-1].copy()
    past = bm[0].copy()
    past[2, -1] |= 0x80  # column 39 >= K=37
    meta_eq = nm[1].copy()
    meta_eq[3, 2] = (meta_eq[3, 2] & 0xF0) | 0x5  # i0 = i1 = 1
    pad = nm[0].copy()
    return [
        ("SparseMatMulInt8", 37, _set(bm, 2, rp), "row_ptr does not match the mask"),
        ("SparseMatMulInt8", 37, _set(bm, 2, rp_len), r"row_ptr must be int64 \[N\+1\]"),
        ("SparseMatMulInt8", 37, _set(bm, 0, past), "bits set past column K=37"),
        ("SparseMatMulInt8", 37, _set(bm, 3, bm[3][:-1]), r"scales must be float32 \[N\]"),
        ("SparseMatMulInt8", 45, bm, "mask has 5 bytes per row; K=45 needs 6"),
        ("SparseMatMulInt8", 37, _set(bm, 1, bm[1].astype(np.float32)), "values|Type|type"),
        ("SparseMatMulFP32", 37, _set(bm[:3], 1, bm[1].astype(np.int32)), "values|Type|type"),
        ("Sparse24MatMulInt8", 37, _set(nm, 1, meta_eq), "increasing"),
        ("Sparse24MatMulInt8", 37, _set(nm, 0, nm[0][:, :-2]), "2:4 values must be"),
        ("Sparse24MatMulInt8", 37, _set(nm, 1, nm[1][:, :-1]), "2:4 meta must be"),
        ("Sparse24MatMulInt8", 33, _set(_nm24(k=33), 1, _odd_meta_high()), "unused high nibble"),
        ("Sparse24MatMulInt8", 37, _set(nm, 0, _pad_nonzero(pad, nm[1])), "padded columns"),
    ]


def _odd_meta_high():
    meta = np.array(_nm24(k=33)[1])
    meta[0, -1] |= 0x90
    return meta


def _pad_nonzero(values, meta):
    """Put a non-zero at a column >= K=37 in the last group (columns 36..39)."""
    values = values.copy()
    nib = meta[:, -1] & 0x0F  # group 9 (G=10) is the low nibble of byte 4
    i1 = (nib >> 2) & 3
    row = int(np.argmax(i1 >= 1))
    values[row, -1] = 5  # second kept entry of group 9 sits at column 36 + i1 >= 37
    return values


@pytest.mark.parametrize("case", range(len(_malformed())))  # one test per malformed case
def test_malformed_initializer_fails_at_session_creation(case, monkeypatch):
    op, k, weights, match = _malformed()[case]
    ws = weights if op != "SparseMatMulFP32" else weights[:3]
    model = make_model(op, ["m", k], ws)
    with pytest.raises(Exception, match=match):
        session(model, None, monkeypatch)


def _has_vnni() -> bool:
    import subprocess

    try:
        flags = subprocess.run(
            ["grep", "-m1", "^flags", "/proc/cpuinfo"], capture_output=True, text=True
        ).stdout
    except OSError:
        return False
    return all(f in flags.split() for f in ("avx512bw", "avx512vl", "avx512_vbmi2", "avx512_vnni"))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("level", [None, 0, 4])
def test_accuracy_level(op, level, monkeypatch):
    """accuracy_level 4 on an int8-weight op: int8 activations (VNNI where the CPU has it) within the
    int8-activation tolerance, for every M (row-dot and tiled paths, K tail); absent / 0 (and the
    fp32-weight op at any level) stay exact."""
    k, n = 7373 // 16, 300  # K not a multiple of 64
    weights = make_weights(op, n, k, 0.75, seed=11)
    sess = session(make_model(op, ["m", k], weights, accuracy_level=level), None, monkeypatch)
    rng = np.random.default_rng(4)
    int8_act = level == 4 and op != "SparseMatMulFP32" and _has_vnni()
    for m in (1, 3, 16, 33, 64, 130):
        x = rng.standard_normal((m, k)).astype(np.float32)
        (y,) = sess.run(None, {"X": x})
        ref = reference_matmul(op, x, *weights)
        check_close(op, "avx512vnni" if level == 4 else "default", y, ref, k)
        if int8_act:  # the int8 path really runs: an error well above fp32 rounding (~1e-7)
            assert np.linalg.norm(y - ref) / np.linalg.norm(ref) > 1e-5, m
        else:
            check_close(op, "default", y, ref, k)


@pytest.mark.parametrize("op", ["SparseMatMulInt8", "Sparse24MatMulInt8"])
def test_accuracy_level_long_k(op, monkeypatch):
    """int8-activation GEMM with K split into several L2 chunks (M=130: 910 dword columns per chunk)
    and a K tail (K % 64 != 0)."""
    k, n = 4001, 37
    weights = make_weights(op, n, k, 0.75, seed=12)
    sess = session(make_model(op, ["m", k], weights, accuracy_level=4), None, monkeypatch)
    rng = np.random.default_rng(5)
    for m in (1, 5, 16, 130):
        x = rng.standard_normal((m, k)).astype(np.float32)
        (y,) = sess.run(None, {"X": x})
        check_close(op, "avx512vnni", y, reference_matmul(op, x, *weights), k)


def test_accuracy_level_out_of_range(monkeypatch):
    weights = make_weights("SparseMatMulInt8", 4, 8, 0.5)
    with pytest.raises(Exception, match="accuracy_level must be 0..4"):
        session(make_model("SparseMatMulInt8", [1, 8], weights, accuracy_level=7), None, monkeypatch)


def test_unknown_isa_is_rejected(monkeypatch):
    weights = make_weights("SparseMatMulFP32", 4, 8, 0.5)
    with pytest.raises(Exception, match="unknown FFSPLIT_ISA=sse9"):
        session(make_model("SparseMatMulFP32", [1, 8], weights), "sse9", monkeypatch)


def test_env_override_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("FFSPLIT_ORT_LIBRARY", str(tmp_path / "nope.so"))
    with pytest.raises(PluginNotFoundError, match="does not name an existing file"):
        plugin_path()


# ----------------------------------------------------------------------------- hostile input (issue 16)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("which", [0, 1, -1])
def test_omitted_input_fails_at_session_creation(op, which, monkeypatch):
    """An input given as "" (ONNX's omitted optional input) used to create a session and then
    segfault in run; it must fail at session creation, naming the input."""
    weights = list(make_weights(op, 6, 16, 0.5))
    names = list(WEIGHT_NAMES[op])
    model = onnx.load_from_string(make_model(op, [1, 16], weights))
    node = model.graph.node[0]
    pos = len(node.input) - 1 if which == -1 else which
    omitted = node.input[pos]
    node.input[pos] = ""
    with pytest.raises(Exception, match=r"is omitted \(empty name\)") as e:
        session(model.SerializeToString(), "scalar", monkeypatch)
    assert ("X" if pos == 0 else names[pos - 1]) == omitted and f"({omitted})" in str(e.value)


def _ones_int8(op: str, n: int, k: int):
    """All-ones weights (codes 1, scale 1) of an int8 op."""
    w = np.ones((n, k), np.int8)
    if op == "SparseMatMulInt8":
        p = packing.pack_bitmask(w)
        return p.mask, p.values, p.row_ptr, np.ones(n, np.float32)
    w[:, 1::2] = 0  # 2:4: columns 0, 2, 4, ... stored
    p24 = packing.pack_nm24(w)
    return p24.values, p24.meta, np.ones(n, np.float32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("op", ["SparseMatMulInt8", "Sparse24MatMulInt8"])
def test_nonfinite_semantics_every_path(op, level, isa, monkeypatch):
    """NaN / inf in X: one semantics on every ISA path, M and accuracy level (ops.SEMANTICS).
    Used to be: NaN quantized to 0 on the VNNI path ([15, 15] instead of NaN), NaN at M=1 but
    63.0 at M=16 on AVX-512, 63.0 on scalar / AVX2."""
    k, n = 16, 2
    weights = _ones_int8(op, n, k)
    sess = session(make_model(op, ["m", k], weights, accuracy_level=level), isa, monkeypatch)
    for m in (1, 16):
        x = np.ones((m, k), np.float32)
        x[0, 0] = np.nan  # a used column: row 0 is NaN everywhere
        if m > 1:
            x[1, 1] = np.inf  # unused by the 2:4 weight, used by the bitmask one
            x[2, 3] = -np.inf
        (y,) = sess.run(None, {"X": x})
        ref = reference_matmul(op, x, *weights)
        assert np.isnan(y[0]).all() and np.isnan(ref[0]).all()
        np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
        np.testing.assert_array_equal(np.isposinf(y), np.isposinf(ref))
        np.testing.assert_array_equal(np.isneginf(y), np.isneginf(ref))
        fin = np.isfinite(ref)
        # finite rows: all ones -> exactly the count of used columns, also through int8 activations
        np.testing.assert_allclose(y[fin], ref[fin], rtol=1e-6)
        if op == "Sparse24MatMulInt8" and m > 1:
            assert np.isfinite(y[1]).all() and y[1, 0] == k // 2  # inf at an unused column is skipped


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scale", [np.inf, -np.inf, np.nan, 0.0])
def test_nonfinite_scales(scale, isa, monkeypatch):
    """A NaN / inf scale makes its output column non-finite exactly as the reference says
    (0 * inf = NaN for a zero activation at a used column), on every path and M."""
    k, n = 16, 3
    mask, values, row_ptr, scales = _ones_int8("SparseMatMulInt8", n, k)
    scales[1] = scale
    weights = (mask, values, row_ptr, scales)
    sess = session(make_model("SparseMatMulInt8", ["m", k], weights), isa, monkeypatch)
    for m in (1, 16):
        x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
        x[-1, 5] = 0.0
        (y,) = sess.run(None, {"X": x})
        ref = reference_matmul("SparseMatMulInt8", x, *weights)
        np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
        np.testing.assert_array_equal(np.isinf(y) & (y > 0), np.isinf(ref) & (ref > 0))
        fin = np.isfinite(ref)
        if isa == "avx512vnni":  # int8 activations: the signal-to-noise check of check_close
            check_close("SparseMatMulInt8", isa, y[fin], ref[fin], k)
        else:
            np.testing.assert_allclose(y[fin], ref[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("op", ["SparseMatMulInt8", "Sparse24MatMulInt8"])
def test_huge_x_does_not_overflow(op, isa, monkeypatch):
    """|x| above FLT_MAX / 127 used to overflow x * code before the scale (inf, or an inf's sign
    flipped); a finite exact result must come out finite."""
    k, n = 16, 2
    weights = list(_ones_int8(op, n, k))
    weights[1 if op == "SparseMatMulInt8" else 0][:] *= 127
    weights[-1][:] = [1e-3, -1e-3]
    sess = session(make_model(op, ["m", k], weights, accuracy_level=4), isa, monkeypatch)
    for m in (1, 16):
        x = np.zeros((m, k), np.float32)
        x[:, 0] = 3e37
        x[:, 2] = -1e37
        (y,) = sess.run(None, {"X": x})
        ref = reference_matmul(op, x, *weights)
        assert np.isfinite(ref).all() and np.isfinite(y).all()
        np.testing.assert_allclose(y, ref, rtol=1e-5)  # 2e37 * 0.127 = 2.54e36, sign per row


def test_nm24_with_no_rows(monkeypatch):
    """A 2:4 weight with N = 0: the library runs it and the NumPy reference used to raise."""
    k = 10
    weights = (np.zeros((0, 6), np.int8), np.zeros((0, 2), np.uint8), np.zeros(0, np.float32))
    x = np.ones((3, k), np.float32)
    ref = reference_matmul("Sparse24MatMulInt8", x, *weights)
    assert ref.shape == (3, 0)
    (y,) = session(make_model("Sparse24MatMulInt8", ["m", k], weights), None, monkeypatch).run(None, {"X": x})
    assert y.shape == (3, 0)


def test_huge_dims_message(monkeypatch):
    """A mask of shape [2^63 - 1, 0] (zero elements) used to give a message with an overflowed
    N + 1; the dims are now checked first."""
    weights = (np.zeros((2**63 - 1, 0), np.uint8), np.zeros(0, np.float32), np.zeros(1, np.int64))
    sess = session(make_model("SparseMatMulFP32", [1, 0], weights, as_inputs=True), "scalar", monkeypatch)
    feeds = dict(zip(WEIGHT_NAMES["SparseMatMulFP32"], weights), X=np.zeros((1, 0), np.float32))
    with pytest.raises(Exception, match=r"mask has a dimension of 9223372036854775807 .*below 2\^31") as e:
        sess.run(None, feeds)
    assert "-9223372036854775808" not in str(e.value)
