"""Pure pack / unpack functions of the on-disk weight layouts.

Every function takes NumPy arrays and returns new ones; inputs are never modified.
A weight matrix is always ``W[N, K]``: N output channels (rows), K input channels,
the layout of ``torch.nn.Linear.weight``; an op computes ``Y = X @ W.T``.

Layouts (the ONNX op schemas in :mod:`ffsplit_export.ops` refer to these):

bitmask sparse (``sparse-fp32``, ``sparse-int8``)
    ``mask``    uint8 [N, ceil(K/8)]: bit ``k % 8`` (LSB first) of byte ``k // 8`` is set
                where column k of the row is stored; bits past K are zero.
    ``values``  [nnz] (float32 or int8): the stored entries, row after row, by column.
    ``row_ptr`` int64 [N+1]: ``values[row_ptr[n]:row_ptr[n+1]]`` belong to row n.

bitmask sparse int4 (``sparse-int4``)
    ``mask``, ``row_ptr`` as above (``row_ptr`` counts kept values, not bytes).
    ``values``  uint8 [ceil(nnz/2)]: the kept values' signed 4-bit codes (two's complement,
                -8..7) as a nibble stream, row after row, by column; code i is the low nibble
                of byte i // 2 when i is even, the high nibble when odd; a final unused high
                nibble is zero.
    ``scales``  float32 [sum over rows of ceil(count_n / G)]: row n's kept values form groups of
                G (the op's ``group_size``) in column order, the last one possibly short; the
                scales are row after row, group after group. A value is ``code * its group's scale``.

2:4 (``2:4-int8``)
    K is padded with zeros to a multiple of 4; G = ceil(K/4) groups of 4 columns per row.
    ``values``  int8 [N, 2*G]: the two kept entries of group g at 2g and 2g+1.
    ``meta``    uint8 [N, ceil(G/2)]: group g's nibble is bits ``4*(g%2)``.. of byte g//2;
                nibble = i0 | i1 << 2 with i0 < i1 the in-group column of the two values.
                Padded columns (>= K) hold value 0.

MatMulNBits (``int8``, ``int4``, heavy ``int8``; com.microsoft::MatMulNBits)
    ``B``       uint8 [N, n_blocks, block_size * bits / 8], unsigned codes u, low nibble first
                for 4 bits; K padded with the zero code to n_blocks * block_size.
    ``scales``  float32 [N * n_blocks].
    symmetric grid (no ``zero_points`` input): u = q + 2^(bits-1) (the op's default zero
                point) for signed codes q in [-(2^(bits-1) - 1), 2^(bits-1) - 1]; w = q * scale.
    asymmetric grid (``--int4-grid asymmetric``): u in [0, 2^bits - 1] and
    ``zero_points`` uint8 [N * ceil(n_blocks * bits / 8)]: row n's block zero points z packed
                like B (low nibble first for 4 bits), each row padded to whole bytes (the layout
                of ONNX Runtime's MatMulNBits schema); w = (u - z) * scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FormatError

INT4_GROUP_SIZES = (16, 32, 64, 128, 256)
#: the int4 group sizes export offers (--group-size); a subset of what the packer supports
EXPORT_INT4_GROUP_SIZES = (32, 64, 128)


def _as_matrix(w: np.ndarray, name: str) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise FormatError(f"{name} must be a 2-D weight [N, K], got shape {w.shape}")
    return w


# --------------------------------------------------------------------------- quantization


def quantize_int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel: ``w ~= q * scale[:, None]``, q in [-127, 127]."""
    w = _as_matrix(w, "weight").astype(np.float32, copy=False)
    amax = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def _int4_groups(w: np.ndarray, group_size: int) -> tuple[np.ndarray, int, int]:
    """``w`` [N, K] as float32 groups [N, ceil(K/group_size), group_size] (the last one zero-padded),
    with N and K; the group size checked against MatMulNBits' int4 sizes."""
    if group_size not in INT4_GROUP_SIZES:
        raise FormatError(f"int4 group size {group_size} is not supported; use one of {INT4_GROUP_SIZES}")
    w = _as_matrix(w, "weight").astype(np.float32, copy=False)
    n, k = w.shape
    n_groups = -(-k // group_size)
    padded = np.zeros((n, n_groups * group_size), np.float32)
    padded[:, :k] = w
    return padded.reshape(n, n_groups, group_size), n, k


def quantize_int4_groupwise(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 per group of ``group_size`` input channels.

    Returns ``q`` int8 [N, K] in [-7, 7] and ``scales`` float32 [N, ceil(K/group_size)];
    the last group is zero-padded when group_size does not divide K.
    """
    g, n, k = _int4_groups(w, group_size)
    amax = np.abs(g).max(axis=2)
    scales = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(g / scales[:, :, None]), -7, 7).astype(np.int8)
    return q.reshape(n, -1)[:, :k].copy(), scales


def quantize_int8_blockwise(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per block of ``block_size`` columns (``block_size`` divides K).

    Returns ``q`` int8 [N, K] in [-127, 127] and ``scales`` float32 [N, K / block_size].
    """
    w = _as_matrix(w, "weight").astype(np.float32, copy=False)
    n, k = w.shape
    if block_size < 16 or block_size & (block_size - 1) or k % block_size:
        raise FormatError(f"block_size={block_size} must be a power of two >= 16 that divides K={k}")
    g = w.reshape(n, k // block_size, block_size)
    amax = np.abs(g).max(axis=2)
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(g / scales[:, :, None]), -127, 127).astype(np.int8)
    return q.reshape(n, k), scales


def asymmetric_params(g: np.ndarray, bits: int = 4, *, search: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point of every block of an asymmetric grid: ``g`` [..., G] float32.

    The range is [min(w, 0), max(w, 0)] (zero stays exactly representable, so the zero point
    lies in [0, 2^bits - 1]); ``scale = (hi - lo) / (2^bits - 1)`` (1 where a block is all zero),
    ``zero = round(-lo / scale)``. With ``search`` both ends are shrunk by the factor of
    :data:`CLIP_RATIOS` that gives the least squared round-trip error of the block (a clipping
    search, as HQQ-like and AWQ-style quantizers do). Returns float32 scales and uint8 zero points
    of shape ``g.shape[:-1]``.
    """
    g = np.asarray(g, np.float32)
    qmax = (1 << bits) - 1
    lo0 = np.minimum(g.min(axis=-1), 0).astype(np.float32)
    hi0 = np.maximum(g.max(axis=-1), 0).astype(np.float32)
    best_s = best_z = best_e = None
    for r in CLIP_RATIOS if search else (1.0,):
        lo, hi = lo0 * np.float32(r), hi0 * np.float32(r)
        span = hi - lo
        s = np.where(span > 0, span / np.float32(qmax), np.float32(1.0)).astype(np.float32)
        z = np.clip(np.rint(-lo / s), 0, qmax).astype(np.float32)
        if not search:
            return s, z.astype(np.uint8)
        u = np.clip(np.rint(g / s[..., None]) + z[..., None], 0, qmax)
        e = np.square((u - z[..., None]) * s[..., None] - g).sum(axis=-1)
        if best_e is None:
            best_s, best_z, best_e = s, z, e
        else:
            better = e < best_e
            best_s = np.where(better, s, best_s)
            best_z = np.where(better, z, best_z)
            best_e = np.where(better, e, best_e)
    return best_s.astype(np.float32), best_z.astype(np.uint8)


#: the shrink factors of the asymmetric clipping search (1.0 first: ties keep the full range)
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(13))


def quantize_int4_asymmetric(
    w: np.ndarray, group_size: int, *, search: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric int4 per group of ``group_size`` input channels (MatMulNBits with zero points).

    Returns ``u`` uint8 [N, K] codes in [0, 15], ``scales`` float32 [N, n_groups] and ``zero_points``
    uint8 [N, n_groups] (:func:`asymmetric_params`); ``w ~= (u - zero) * scale``. The last group
    is zero-padded when group_size does not divide K.
    """
    g, n, k = _int4_groups(w, group_size)
    scales, zeros = asymmetric_params(g, 4, search=search)
    u = np.clip(np.rint(g / scales[:, :, None]) + zeros[:, :, None], 0, 15).astype(np.uint8)
    return u.reshape(n, -1)[:, :k].copy(), scales, zeros


def dequantize(q: np.ndarray, scales: np.ndarray, group_size: int | None = None) -> np.ndarray:
    """Inverse of the quantizers: ``scales`` [N] (per channel) or [N, n_groups] with ``group_size``."""
    q = _as_matrix(q, "q")
    scales = np.asarray(scales, np.float32)
    if scales.ndim == 1:
        return q.astype(np.float32) * scales[:, None]
    if group_size is None:
        raise FormatError("group-wise scales need group_size")
    s = np.repeat(scales, group_size, axis=1)[:, : q.shape[1]]
    return q.astype(np.float32) * s


# --------------------------------------------------------------------------- bitmask sparse


@dataclass(frozen=True)
class BitmaskSparse:
    mask: np.ndarray  # uint8 [N, ceil(K/8)]
    values: np.ndarray  # [nnz]
    row_ptr: np.ndarray  # int64 [N+1]
    k: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.mask.shape[0], self.k)

    @property
    def nbytes(self) -> int:
        return self.mask.nbytes + self.values.nbytes + self.row_ptr.nbytes


def pack_bitmask(w: np.ndarray, keep: np.ndarray | None = None) -> BitmaskSparse:
    """Pack ``w`` keeping the entries where ``keep`` is true (default: where w != 0)."""
    w = _as_matrix(w, "weight")
    keep = (w != 0) if keep is None else np.asarray(keep, bool)
    if keep.shape != w.shape:
        raise FormatError(f"mask shape {keep.shape} does not match weight shape {w.shape}")
    n, k = w.shape
    mask = np.packbits(keep, axis=1, bitorder="little") if k else np.zeros((n, 0), np.uint8)
    counts = keep.sum(axis=1, dtype=np.int64)
    row_ptr = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=row_ptr[1:])
    values = w[keep].copy()  # row-major boolean indexing: row after row, by column
    return BitmaskSparse(mask=mask, values=values, row_ptr=row_ptr, k=k)


def check_bitmask(mask: np.ndarray, values: np.ndarray, row_ptr: np.ndarray, k: int) -> None:
    """Raise FormatError unless the three arrays form a valid bitmask layout for K=k."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise FormatError(f"mask must be uint8 [N, ceil(K/8)], got {mask.dtype} {mask.shape}")
    n = mask.shape[0]
    if mask.shape[1] != -(-k // 8):
        raise FormatError(f"mask has {mask.shape[1]} bytes per row; K={k} needs {-(-k // 8)}")
    if row_ptr.dtype != np.int64 or row_ptr.shape != (n + 1,):
        raise FormatError(f"row_ptr must be int64 [N+1]={n + 1}, got {row_ptr.dtype} {row_ptr.shape}")
    if values.ndim != 1:
        raise FormatError(f"values must be 1-D, got shape {values.shape}")
    bits = np.unpackbits(mask, axis=1, bitorder="little")
    if bits[:, k:].any():
        raise FormatError("mask has bits set past column K; they must be zero")
    counts = bits[:, :k].sum(axis=1, dtype=np.int64)
    if row_ptr[0] != 0 or np.any(np.diff(row_ptr) != counts) or row_ptr[-1] != values.shape[0]:
        raise FormatError(
            "row_ptr does not match the mask: row_ptr[0] must be 0, row_ptr[n+1]-row_ptr[n] the "
            f"popcount of row n, row_ptr[N] = len(values) = {values.shape[0]}"
        )


def unpack_bitmask(p: BitmaskSparse) -> np.ndarray:
    """Dense [N, K] matrix of the packed values (zeros where not stored)."""
    check_bitmask(p.mask, p.values, p.row_ptr, p.k)
    n = p.mask.shape[0]
    keep = np.unpackbits(p.mask, axis=1, bitorder="little", count=p.k).astype(bool)
    out = np.zeros((n, p.k), p.values.dtype)
    out[keep] = p.values
    return out


# --------------------------------------------------------------------------- bitmask sparse int4


@dataclass(frozen=True)
class SparseInt4:
    mask: np.ndarray  # uint8 [N, ceil(K/8)]
    values: np.ndarray  # uint8 [ceil(nnz/2)]: 4-bit codes
    row_ptr: np.ndarray  # int64 [N+1]
    scales: np.ndarray  # float32 [n_groups]
    k: int
    group_size: int

    @property
    def nbytes(self) -> int:
        return self.mask.nbytes + self.values.nbytes + self.row_ptr.nbytes + self.scales.nbytes


def sparse_int4_groups(row_ptr: np.ndarray, group_size: int) -> np.ndarray:
    """int64 [N+1]: ``scales[gp[n]:gp[n+1]]`` are row n's group scales (ceil(count_n / G) of them)."""
    if not 8 <= group_size < 2**31:
        raise FormatError(
            f"sparse-int4 group_size={group_size} is out of range; use 8 <= group_size < 2^31 (e.g. 32)"
        )
    counts = np.diff(np.asarray(row_ptr, np.int64))
    gp = np.zeros(counts.shape[0] + 1, np.int64)
    np.cumsum(-(-counts // group_size), out=gp[1:])
    return gp


def _group_of_values(row_ptr: np.ndarray, group_size: int) -> np.ndarray:
    """int64 [nnz]: the index into ``scales`` of every kept value."""
    row_ptr = np.asarray(row_ptr, np.int64)
    counts = np.diff(row_ptr)
    gp = sparse_int4_groups(row_ptr, group_size)
    nnz = int(row_ptr[-1]) if row_ptr.size else 0
    row = np.repeat(np.arange(counts.shape[0]), counts)
    rank = np.arange(nnz, dtype=np.int64) - row_ptr[:-1][row]
    return gp[:-1][row] + rank // group_size


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Signed codes in [-8, 7] (1-D) as a uint8 nibble stream, low nibble first."""
    codes = np.asarray(codes)
    if codes.ndim != 1:
        raise FormatError(f"codes must be 1-D, got shape {codes.shape}")
    if codes.size and (codes.min() < -8 or codes.max() > 7):
        raise FormatError("int4 codes out of range [-8, 7]")
    u = (codes.astype(np.int16) & 0x0F).astype(np.uint8)
    if u.size % 2:
        u = np.concatenate([u, np.zeros(1, np.uint8)])
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)


def unpack_nibbles(values: np.ndarray, count: int) -> np.ndarray:
    """int8 [count]: the signed codes of a nibble stream (inverse of :func:`pack_nibbles`)."""
    values = np.asarray(values, np.uint8)
    u = np.stack([values & 0x0F, values >> 4], axis=1).reshape(-1)[:count]
    return ((u.astype(np.int16) ^ 8) - 8).astype(np.int8)


def quantize_sparse_int4(w: np.ndarray, keep: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 of the kept entries of ``w``, groups of ``group_size`` kept values per row.

    Returns ``q`` int8 [N, K] (codes in [-7, 7], 0 where not kept) and ``scales`` float32
    [n_groups] (:func:`sparse_int4_groups` order); a group's scale is its max |w| / 7 (1 if zero).
    """
    w = _as_matrix(w, "weight").astype(np.float32, copy=False)
    keep = np.asarray(keep, bool)
    if keep.shape != w.shape:
        raise FormatError(f"mask shape {keep.shape} does not match weight shape {w.shape}")
    row_ptr = np.zeros(w.shape[0] + 1, np.int64)
    np.cumsum(keep.sum(axis=1, dtype=np.int64), out=row_ptr[1:])
    grp = _group_of_values(row_ptr, group_size)
    kept = w[keep]
    n_groups = int(sparse_int4_groups(row_ptr, group_size)[-1])
    amax = np.zeros(n_groups, np.float32)
    np.maximum.at(amax, grp, np.abs(kept))
    scales = np.where(amax > 0, amax / np.float32(7.0), np.float32(1.0)).astype(np.float32)
    codes = np.clip(np.rint(kept / scales[grp]), -7, 7).astype(np.int8)
    q = np.zeros(w.shape, np.int8)
    q[keep] = codes
    return q, scales


def pack_sparse_int4(q: np.ndarray, keep: np.ndarray, scales: np.ndarray, group_size: int) -> SparseInt4:
    """Pack int4 codes ``q`` [N, K] at the positions ``keep`` (codes elsewhere must be 0) with their
    group ``scales`` (see :func:`quantize_sparse_int4`)."""
    q = _as_matrix(q, "q")
    keep = np.asarray(keep, bool)
    if keep.shape != q.shape:
        raise FormatError(f"mask shape {keep.shape} does not match weight shape {q.shape}")
    if (q[~keep] != 0).any():
        raise FormatError("sparse-int4: non-zero codes outside the mask")
    p = pack_bitmask(q.astype(np.int8), keep)
    scales = np.asarray(scales, np.float32)
    want = int(sparse_int4_groups(p.row_ptr, group_size)[-1])
    if scales.shape != (want,):
        raise FormatError(
            f"sparse-int4 scales must be float32 [{want}] for group_size={group_size}, got {scales.shape}"
        )
    return SparseInt4(p.mask, pack_nibbles(p.values), p.row_ptr, scales.copy(), p.k, int(group_size))


def check_sparse_int4(
    mask: np.ndarray, values: np.ndarray, row_ptr: np.ndarray, scales: np.ndarray, k: int, group_size: int
) -> None:
    """Raise FormatError unless the arrays form a valid sparse-int4 layout for K=k."""
    if values.dtype != np.uint8 or values.ndim != 1:
        raise FormatError(
            f"sparse-int4 values must be uint8 [ceil(nnz/2)], got {values.dtype} {values.shape}"
        )
    if row_ptr.dtype != np.int64 or row_ptr.ndim != 1 or row_ptr.shape[0] < 1:
        raise FormatError(f"row_ptr must be int64 [N+1], got {row_ptr.dtype} {row_ptr.shape}")
    nnz = int(row_ptr[-1])
    if nnz < 0 or -(-nnz // 2) != values.shape[0]:
        raise FormatError(
            f"sparse-int4 values hold {values.shape[0]} bytes; row_ptr[N]={nnz} codes need {-(-max(nnz, 0) // 2)}"
        )
    # the bitmask rules (row_ptr = running popcount) with one placeholder entry per code
    check_bitmask(mask, np.zeros(nnz, np.int8), row_ptr, k)
    if nnz % 2 and values[-1] >> 4:
        raise FormatError("sparse-int4 values: the unused high nibble of the last byte must be zero")
    want = int(sparse_int4_groups(row_ptr, group_size)[-1])
    if scales.dtype != np.float32 or scales.shape != (want,):
        raise FormatError(
            f"sparse-int4 scales must be float32 [{want}] (ceil(count/{group_size}) per row), "
            f"got {scales.dtype} {scales.shape}"
        )


def unpack_sparse_int4(p: SparseInt4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes int8 [N, K], keep bool [N, K], scales float32 [n_groups]): inverse of :func:`pack_sparse_int4`."""
    check_sparse_int4(p.mask, p.values, p.row_ptr, p.scales, p.k, p.group_size)
    n = p.mask.shape[0]
    keep = np.unpackbits(p.mask, axis=1, bitorder="little", count=p.k).astype(bool)
    q = np.zeros((n, p.k), np.int8)
    q[keep] = unpack_nibbles(p.values, int(p.row_ptr[-1]))
    return q, keep, p.scales.copy()


def sparse_int4_scale_matrix(p: SparseInt4) -> np.ndarray:
    """float32 [N, K]: every stored entry's group scale (1 where nothing is stored)."""
    check_sparse_int4(p.mask, p.values, p.row_ptr, p.scales, p.k, p.group_size)
    keep = np.unpackbits(p.mask, axis=1, bitorder="little", count=p.k).astype(bool)
    s = np.ones(keep.shape, np.float32)
    s[keep] = p.scales[_group_of_values(p.row_ptr, p.group_size)]
    return s


def dequantize_sparse_int4(p: SparseInt4) -> np.ndarray:
    """The float32 [N, K] weight (code * group scale; exactly 0 where nothing or a zero code is stored)."""
    q, _, _ = unpack_sparse_int4(p)
    s = sparse_int4_scale_matrix(p)
    with np.errstate(all="ignore"):
        return np.where(q != 0, q.astype(np.float32) * s, np.float32(0)).astype(np.float32)


# --------------------------------------------------------------------------- 2:4


@dataclass(frozen=True)
class NM24:
    values: np.ndarray  # int8 [N, 2*G]
    meta: np.ndarray  # uint8 [N, ceil(G/2)]
    k: int

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.meta.nbytes


def pack_nm24(w: np.ndarray) -> NM24:
    """Pack a matrix with at most 2 non-zeros in every group of 4 consecutive columns."""
    w = _as_matrix(w, "weight")
    n, k = w.shape
    g = -(-k // 4)
    padded = np.zeros((n, g * 4), w.dtype)
    padded[:, :k] = w
    grp = padded.reshape(n, g, 4)
    nz = grp != 0
    if (nz.sum(axis=2) > 2).any():
        raise FormatError("weight is not 2:4 sparse: some group of 4 columns has more than 2 non-zeros")
    # rank columns: non-zeros first (stable by column), then zeros by column
    order = np.argsort(~nz, axis=2, kind="stable")[:, :, :2]
    idx = np.sort(order, axis=2)
    vals = np.take_along_axis(grp, idx, axis=2).reshape(n, 2 * g)
    nib = (idx[:, :, 0] | (idx[:, :, 1] << 2)).astype(np.uint8)
    meta = np.zeros((n, -(-g // 2)), np.uint8)
    meta[:, : (g + 1) // 2] |= nib[:, 0::2]
    meta[:, : g // 2] |= (nib[:, 1::2] << 4).astype(np.uint8)
    return NM24(values=vals.copy(), meta=meta, k=k)


def check_nm24(values: np.ndarray, meta: np.ndarray, k: int) -> None:
    g = -(-k // 4)
    if values.ndim != 2 or values.shape[1] != 2 * g:
        raise FormatError(f"2:4 values must be [N, {2 * g}] for K={k}, got {values.shape}")
    if meta.dtype != np.uint8 or meta.shape != (values.shape[0], -(-g // 2)):
        raise FormatError(f"2:4 meta must be uint8 [N, {-(-g // 2)}], got {meta.dtype} {meta.shape}")
    idx = _nm24_indices(meta, g)
    if (idx[:, :, 0] >= idx[:, :, 1]).any():
        raise FormatError("2:4 meta: the two indices of a group must be increasing (i0 < i1)")
    col = np.arange(g)[None, :, None] * 4 + idx
    if (values.reshape(values.shape[0], g, 2)[col >= k] != 0).any():
        raise FormatError(f"2:4 values: entries at padded columns >= K={k} must be zero")
    if g % 2 and meta.shape[1] and (meta[:, -1] >> 4).any():
        raise FormatError("2:4 meta: the unused high nibble of the last byte must be zero")


def _nm24_indices(meta: np.ndarray, g: int) -> np.ndarray:
    nib = np.stack([meta & 0x0F, meta >> 4], axis=2).reshape(meta.shape[0], -1)[:, :g]
    return np.stack([nib & 3, (nib >> 2) & 3], axis=2).astype(np.int64)


def unpack_nm24(p: NM24) -> np.ndarray:
    check_nm24(p.values, p.meta, p.k)
    n = p.values.shape[0]
    g = -(-p.k // 4)
    idx = _nm24_indices(p.meta, g)
    out = np.zeros((n, g, 4), p.values.dtype)
    np.put_along_axis(out, idx, p.values.reshape(n, g, 2), axis=2)
    return out.reshape(n, g * 4)[:, : p.k].copy()


# --------------------------------------------------------------------------- MatMulNBits


@dataclass(frozen=True)
class NBits:
    b: np.ndarray  # uint8 [N, n_blocks, blob]
    scales: np.ndarray  # float32 [N * n_blocks]
    k: int
    bits: int
    block_size: int
    zero_points: np.ndarray | None = None  # uint8 [N * ceil(n_blocks * bits / 8)]; None: symmetric

    @property
    def nbytes(self) -> int:
        return (
            self.b.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes)
        )


def _pack_codes(u: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [N, M] unsigned codes -> uint8 [N, ceil(M * bits / 8)], low nibble first for 4 bits."""
    if bits == 8:
        return u.astype(np.uint8)
    if u.shape[1] % 2:
        u = np.concatenate([u, np.zeros((u.shape[0], 1), np.uint8)], axis=1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def _unpack_codes(b: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`_pack_codes`: uint8 [N, count]."""
    if bits == 8:
        return b[:, :count].astype(np.uint8)
    return np.stack([b & 0x0F, b >> 4], axis=2).reshape(b.shape[0], -1)[:, :count]


def pack_matmulnbits(
    q: np.ndarray, scales: np.ndarray, bits: int, block_size: int, zero_points: np.ndarray | None = None
) -> NBits:
    """Lay out the codes ``q`` [N, K] and their scales (and zero points) as MatMulNBits inputs.

    ``scales`` is [N] (per channel, repeated over the blocks) or [N, n_blocks]. Without
    ``zero_points`` (symmetric grid) ``q`` are signed codes in [-2^(bits-1), 2^(bits-1) - 1];
    with ``zero_points`` (integers [N, n_blocks] in [0, 2^bits - 1]) ``q`` are the unsigned codes
    in [0, 2^bits - 1] and the weight is ``(q - zero) * scale``.
    """
    if bits not in (4, 8):
        raise FormatError(f"bits={bits} is not supported; use 4 or 8")
    if block_size < 16 or block_size & (block_size - 1):
        raise FormatError(f"block_size={block_size} must be a power of two >= 16")
    q = _as_matrix(q, "q")
    n, k = q.shape
    nb = -(-k // block_size)
    scales = np.asarray(scales, np.float32)
    if scales.ndim == 1:
        scales = np.repeat(scales[:, None], nb, axis=1)
    if scales.shape != (n, nb):
        raise FormatError(f"scales shape {scales.shape} does not match [N, n_blocks]={(n, nb)}")
    top = (1 << bits) - 1
    zp = None
    if zero_points is None:
        zero = 1 << (bits - 1)
        lo, hi = -zero, zero - 1
        pad = np.full((n, nb), zero, np.uint8)
    else:
        zero_points = np.asarray(zero_points)
        if zero_points.shape != (n, nb):
            raise FormatError(f"zero_points shape {zero_points.shape} does not match [N, n_blocks]={(n, nb)}")
        if zero_points.size and (zero_points.min() < 0 or zero_points.max() > top):
            raise FormatError(f"zero points out of range [0, {top}] for {bits} bits")
        zero, lo, hi = 0, 0, top
        pad = zero_points.astype(np.uint8)
        zp = _pack_codes(pad, bits).reshape(-1).copy()
    if q.size and (q.min() < lo or q.max() > hi):
        raise FormatError(f"codes out of range [{lo}, {hi}] for {bits} bits")
    # K padded with each block's zero code (the padded weights are 0)
    u = np.repeat(pad, block_size, axis=1)
    u[:, :k] = (q.astype(np.int16) + zero).astype(np.uint8)
    b = _pack_codes(u, bits).reshape(n, nb, block_size * bits // 8)
    return NBits(b=b, scales=scales.reshape(-1).copy(), k=k, bits=bits, block_size=block_size, zero_points=zp)


def unpack_zero_points(p: NBits) -> np.ndarray | None:
    """uint8 [N, n_blocks]: the block zero points of an asymmetric layout (None: symmetric)."""
    if p.zero_points is None:
        return None
    n, nb = p.b.shape[0], p.b.shape[1]
    per_row = -(-nb * p.bits // 8)
    zp = np.asarray(p.zero_points)
    if zp.dtype != np.uint8 or zp.shape != (n * per_row,):
        raise FormatError(
            f"MatMulNBits zero_points must be uint8 [N * ceil(n_blocks * bits / 8)] = [{n * per_row}], "
            f"got {zp.dtype} {zp.shape}"
        )
    return _unpack_codes(zp.reshape(n, per_row), p.bits, nb)


def unpack_matmulnbits(p: NBits) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_matmulnbits`: the codes [N, K] and scales [N, n_blocks].

    Symmetric layouts give signed int8 codes; asymmetric ones (``p.zero_points``) the unsigned
    uint8 codes (their zero points: :func:`unpack_zero_points`).
    """
    n, nb, blob = p.b.shape
    if blob != p.block_size * p.bits // 8 or nb != -(-p.k // p.block_size):
        raise FormatError(f"MatMulNBits B shape {p.b.shape} does not match K={p.k}, bits={p.bits}")
    u = _unpack_codes(p.b.reshape(n, nb * blob), p.bits, p.k)
    if p.zero_points is not None:
        return u.copy(), p.scales.reshape(n, nb).copy()
    q = (u.astype(np.int16) - (1 << (p.bits - 1))).astype(np.int8)
    return q, p.scales.reshape(n, nb).copy()


def dequantize_matmulnbits(p: NBits) -> np.ndarray:
    """The float32 [N, K] weight MatMulNBits computes with: ``(u - zero) * scale``."""
    q, scales = unpack_matmulnbits(p)
    s = np.repeat(scales, p.block_size, axis=1)[:, : p.k]
    zp = unpack_zero_points(p)
    if zp is None:
        return q.astype(np.float32) * s
    z = np.repeat(zp, p.block_size, axis=1)[:, : p.k]
    return (q.astype(np.float32) - z.astype(np.float32)) * s
