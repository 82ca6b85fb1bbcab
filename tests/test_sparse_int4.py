"""sparse-int4: pure pack / unpack (exact round trip on odd shapes), quantization, the op's NumPy
reference against a plain float64 product, and the PyTorch fake quantization against the packer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ffsplit_export.errors import FormatError
from ffsplit_export.formats import packing
from ffsplit_export.ops import check_op_weights, decode_weight, reference_matmul


def _weight(n, k, sparsity, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    keep = rng.random((n, k)) >= sparsity
    keep[::5] = False  # rows with no kept value
    keep[1:2, :] = True  # and a full row
    return w, keep


@pytest.mark.parametrize("shape", [(830, 545), (7, 3), (1, 1), (0, 9), (5, 0), (33, 64)])
@pytest.mark.parametrize("group_size", [8, 32, 128])
def test_round_trip_exact(shape, group_size):
    n, k = shape
    w, keep = _weight(n, k, 0.5, seed=n + k)
    w0, keep0 = w.copy(), keep.copy()
    q, scales = packing.quantize_sparse_int4(w, keep, group_size)
    assert np.array_equal(w, w0) and np.array_equal(keep, keep0)  # inputs untouched
    assert q.dtype == np.int8 and (q[~keep] == 0).all() and np.abs(q).max(initial=0) <= 7
    p = packing.pack_sparse_int4(q, keep, scales, group_size)
    nnz = int(keep.sum())
    assert p.values.shape == (-(-nnz // 2),) and p.row_ptr[-1] == nnz
    counts = keep.sum(axis=1)
    assert p.scales.shape == (int((-(-counts // group_size)).sum()),)
    q2, keep2, s2 = packing.unpack_sparse_int4(p)
    assert np.array_equal(q2, q) and np.array_equal(keep2, keep) and np.array_equal(s2, scales)
    p2 = packing.pack_sparse_int4(q2, keep2, s2, group_size)
    for name in ("mask", "values", "row_ptr", "scales"):
        assert np.array_equal(getattr(p2, name), getattr(p, name)), name
    # dequantization error: at most half a step of the kept value's group scale
    deq = packing.dequantize_sparse_int4(p)
    step = packing.sparse_int4_scale_matrix(p)
    assert (deq[~keep] == 0).all()
    assert (np.abs(deq - w)[keep] <= 0.5 * step[keep] * (1 + 1e-6)).all()


def test_nibbles_round_trip_all_codes():
    codes = np.arange(-8, 8, dtype=np.int8).repeat(3)[:-1]  # odd count
    v = packing.pack_nibbles(codes)
    assert v.shape == (-(-codes.size // 2),) and v[-1] >> 4 == 0
    assert np.array_equal(packing.unpack_nibbles(v, codes.size), codes)
    with pytest.raises(FormatError, match="out of range"):
        packing.pack_nibbles(np.array([9], np.int8))


def test_groups_are_per_row_over_kept_values():
    # row 0: 5 kept values, G=8 -> 1 group; row 1: 0 kept; row 2: 17 kept -> 3 groups
    keep = np.zeros((3, 40), bool)
    keep[0, [1, 5, 9, 30, 39]] = True
    keep[2, 3:20] = True
    w = np.where(keep, np.arange(1, 121, dtype=np.float32).reshape(3, 40), 0)
    q, s = packing.quantize_sparse_int4(w, keep, 8)
    assert s.shape == (4,)
    np.testing.assert_array_equal(s, np.float32([40 / 7, 91 / 7, 99 / 7, 100 / 7]))
    assert q[2, 3 + 16] == 7 and q[2, 3 + 15] == 7


def _packed(n=37, k=70, g=32, sparsity=0.5, seed=0):
    w, keep = _weight(n, k, sparsity, seed)
    q, s = packing.quantize_sparse_int4(w, keep, g)
    p = packing.pack_sparse_int4(q, keep, s, g)
    return p, (p.mask, p.values, p.row_ptr, p.scales)


def test_reference_matches_float64_product():
    p, ws = _packed()
    check_op_weights("SparseMatMulInt4", 70, *ws, group_size=32)
    w = decode_weight("SparseMatMulInt4", 70, *ws, group_size=32)
    np.testing.assert_array_equal(w, packing.dequantize_sparse_int4(p))
    x = np.random.default_rng(1).standard_normal((2, 3, 70)).astype(np.float32)
    y = reference_matmul("SparseMatMulInt4", x, *ws, group_size=32)
    want = (x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


def test_reference_nonfinite_semantics():
    p, ws = _packed(n=4, k=16, g=8, sparsity=0.0)
    keep = np.unpackbits(p.mask, axis=1, bitorder="little", count=16).astype(bool)
    x = np.ones((2, 16), np.float32)
    x[0, 0] = np.nan
    y = reference_matmul("SparseMatMulInt4", x, *ws, group_size=8)
    assert np.isnan(y[0, keep[:, 0]]).all() and np.isfinite(y[0, ~keep[:, 0]]).all()
    assert np.isfinite(y[1]).all()
    # a NaN scale poisons only the rows whose group uses it with a non-zero code
    s = p.scales.copy()
    s[0] = np.nan
    y2 = reference_matmul(
        "SparseMatMulInt4", np.ones((1, 16), np.float32), p.mask, p.values, p.row_ptr, s, group_size=8
    )
    first = int(np.argmax(np.diff(p.row_ptr) > 0))
    assert np.isnan(y2[0, first]) and np.isfinite(np.delete(y2[0], first)).all()


def test_malformed_weights_are_format_errors():
    p, ws = _packed(n=9, k=21, g=8)
    with pytest.raises(FormatError, match="group_size"):
        check_op_weights("SparseMatMulInt4", 21, *ws)
    with pytest.raises(FormatError, match="out of range"):
        check_op_weights("SparseMatMulInt4", 21, *ws, group_size=4)
    with pytest.raises(FormatError, match="scales must be float32"):
        check_op_weights("SparseMatMulInt4", 21, *ws[:3], ws[3][:-1], group_size=8)
    with pytest.raises(FormatError, match="values hold"):
        check_op_weights("SparseMatMulInt4", 21, ws[0], ws[1][:-1], *ws[2:], group_size=8)
    rp = ws[2].copy()
    rp[3] += 1
    with pytest.raises(FormatError, match="row_ptr"):
        check_op_weights("SparseMatMulInt4", 21, ws[0], ws[1], rp, ws[3], group_size=8)
    if int(p.row_ptr[-1]) % 2:
        v = ws[1].copy()
        v[-1] |= 0x30
        with pytest.raises(FormatError, match="high nibble"):
            check_op_weights("SparseMatMulInt4", 21, ws[0], v, ws[2], ws[3], group_size=8)


@pytest.mark.parametrize("group_size", [8, 32])
def test_fake_quantize_matches_packer(group_size):
    from ffsplit_export.formats.sparse_int4 import fake_sparse_int4

    w, keep = _weight(29, 77, 0.6, seed=4)
    q, s = packing.quantize_sparse_int4(w, keep, group_size)
    deq = packing.dequantize_sparse_int4(packing.pack_sparse_int4(q, keep, s, group_size))
    fq = fake_sparse_int4(torch.from_numpy(w), torch.from_numpy(keep), group_size).numpy()
    np.testing.assert_allclose(fq, deq, rtol=0, atol=1e-6)


def test_bytes_per_weight_about_three_bits_at_half_sparsity():
    from ffsplit_export.formats import get_format
    from ffsplit_export.split import SplitConfig

    fmt = get_format("sparse-int4")
    cfg = SplitConfig(light_format="sparse-int4", light_sparsity=0.5, group_size=32)
    assert fmt.bytes_per_weight(cfg) * 8 == pytest.approx(3.0 + 0.5)  # 1 mask + 2 code + 0.5 scale bits
    w = torch.randn(64, 512)
    m = fmt.compress(w, config=cfg)
    assert fmt.nbytes(m) / w.numel() == pytest.approx(
        fmt.bytes_per_weight(cfg) + fmt.row_overhead(cfg) / 512, rel=0.02
    )
