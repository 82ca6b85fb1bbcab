"""Triton kernels of the ``ffsplit`` ops (imports triton; torch only in :func:`launch`).

Every kernel computes ``Y[M, N] = X[M, K] @ W.T`` for a W packed as in
:mod:`ffsplit_export.formats.packing`. Each program owns BLOCK_N output rows and BLOCK_M
tokens, walks K in BLOCK_K chunks, decodes that chunk of W into a dense register tile and
multiplies it: for M <= BLOCK_M every packed byte is read once per call (decoding is
memory-bound). The kernels read the on-disk layout directly; the only host-side
preparation TensorRT gets (:mod:`.layout`) is a byte-identical int32 view with rows
padded to 4 bytes, which is why row strides are kernel arguments.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mma(acc, x, w, USE_DOT: tl.constexpr):
    # acc[BM, BN] += x[BM, BK] @ w[BN, BK].T in float32 (IEEE: matches the reference)
    if USE_DOT:
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    else:
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    return acc


@triton.jit
def sparse_bitmask_matmul_kernel(
    x_ptr,
    mask_ptr,
    values_ptr,
    row_ptr_ptr,
    scales_ptr,
    M,
    N,
    K,
    MASK_STRIDE,
    y_ptr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    HAS_SCALES: tl.constexpr,
):
    """Bitmask sparse W: mask bit set -> next value of the row (values[row_ptr[n] + rank])."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    rn64 = rn.to(tl.int64)
    rm64 = rm.to(tl.int64)
    base = tl.load(row_ptr_ptr + rn64, mask=n_ok, other=0).to(tl.int64)
    seen = tl.zeros([BLOCK_N], dtype=tl.int64)  # values consumed so far in each row
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    rb = tl.arange(0, BLOCK_K // 8)
    rk = tl.arange(0, BLOCK_K)
    shifts = tl.arange(0, 8)
    for k0 in range(0, K, BLOCK_K):
        byte_col = k0 // 8 + rb
        byte_ok = n_ok[:, None] & (byte_col[None, :] * 8 < K)
        mbytes = tl.load(
            mask_ptr + rn64[:, None] * MASK_STRIDE + byte_col[None, :], mask=byte_ok, other=0
        ).to(tl.int32)
        bits3 = (mbytes[:, :, None] >> shifts[None, None, :]) & 1  # LSB first
        bits = tl.reshape(bits3, (BLOCK_N, BLOCK_K))
        rank = tl.cumsum(bits, axis=1) - bits  # exclusive prefix popcount within the chunk
        idx = base[:, None] + seen[:, None] + rank.to(tl.int64)
        w = tl.load(values_ptr + idx, mask=bits != 0, other=0).to(tl.float32)
        seen += tl.sum(bits, axis=1).to(tl.int64)
        kk = k0 + rk
        x = tl.load(
            x_ptr + rm64[:, None] * K + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K), other=0.0
        )
        acc = _mma(acc, x, w, USE_DOT)
    if HAS_SCALES:
        s = tl.load(scales_ptr + rn64, mask=n_ok, other=0.0)
        acc = acc * s[None, :]
    tl.store(y_ptr + rm64[:, None] * N + rn64[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def sparse_int4_matmul_kernel(
    x_ptr,
    mask_ptr,
    values_ptr,
    row_ptr_ptr,
    scales_ptr,
    M,
    N,
    K,
    MASK_STRIDE,
    GROUP_SIZE,
    y_ptr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    ROW_CHUNK: tl.constexpr,
):
    """Bitmask sparse int4 W: the i-th kept value overall is nibble i of ``values`` (low nibble
    first, two's complement); the r-th kept value of row n is scaled by
    ``scales[gp[n] + r // GROUP_SIZE]`` with gp[n] = sum over rows < n of ceil(count / GROUP_SIZE).
    gp is not an input, so each program sums it over the rows before its block (ROW_CHUNK rows
    of row_ptr per step, from L2) and scans it within the block."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    rn = n0 + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    rn64 = rn.to(tl.int64)
    rm64 = rm.to(tl.int64)
    # groups of the rows before this block
    rc = tl.arange(0, ROW_CHUNK)
    before = tl.zeros([ROW_CHUNK], dtype=tl.int64)
    for r0 in range(0, n0, ROW_CHUNK):
        r = r0 + rc
        r_ok = r < n0
        lo = tl.load(row_ptr_ptr + r, mask=r_ok, other=0)
        hi = tl.load(row_ptr_ptr + r + 1, mask=r_ok, other=0)
        # a row holds at most K values: count and quotient in int32 (64-bit division is a call)
        before += (((hi - lo).to(tl.int32) + GROUP_SIZE - 1) // GROUP_SIZE).to(tl.int64)
    base = tl.load(row_ptr_ptr + rn64, mask=n_ok, other=0).to(tl.int64)
    end = tl.load(row_ptr_ptr + rn64 + 1, mask=n_ok, other=0).to(tl.int64)
    ngrp = (((end - base).to(tl.int32) + GROUP_SIZE - 1) // GROUP_SIZE).to(tl.int64)
    gbase = tl.sum(before, axis=0) + tl.cumsum(ngrp, axis=0) - ngrp  # gp[n] of every row of the block
    # per-row pointers, so the [BLOCK_N, BLOCK_K] tiles below hold int32 offsets (registers)
    vrow = values_ptr + (base >> 1)  # byte of the row's first code
    odd = (base & 1).to(tl.int32)  # whether that code is the byte's high nibble
    srow = scales_ptr + gbase
    seen = tl.zeros([BLOCK_N], dtype=tl.int32)  # values consumed so far in each row
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    rb = tl.arange(0, BLOCK_K // 8)
    rk = tl.arange(0, BLOCK_K)
    shifts = tl.arange(0, 8)
    for k0 in range(0, K, BLOCK_K):
        byte_col = k0 // 8 + rb
        byte_ok = n_ok[:, None] & (byte_col[None, :] * 8 < K)
        mbytes = tl.load(
            mask_ptr + rn64[:, None] * MASK_STRIDE + byte_col[None, :], mask=byte_ok, other=0
        ).to(tl.int32)
        bits3 = (mbytes[:, :, None] >> shifts[None, None, :]) & 1  # LSB first
        bits = tl.reshape(bits3, (BLOCK_N, BLOCK_K))
        kept = bits != 0
        rank = seen[:, None] + tl.cumsum(bits, axis=1) - bits  # rank within the row
        local = odd[:, None] + rank  # nibble index from the row's first byte
        byte = tl.load(vrow[:, None] + (local >> 1), mask=kept, other=0).to(tl.int32) & 255
        code = (((byte >> ((local & 1) * 4)) & 15) ^ 8) - 8
        grp = (rank.to(tl.uint32) // GROUP_SIZE.to(tl.uint32)).to(tl.int32)  # unsigned: cheaper
        s = tl.load(srow[:, None] + grp, mask=kept, other=0.0)
        w = code.to(tl.float32) * s
        seen += tl.sum(bits, axis=1)
        kk = k0 + rk
        x = tl.load(
            x_ptr + rm64[:, None] * K + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K), other=0.0
        )
        acc = _mma(acc, x, w, USE_DOT)
    tl.store(y_ptr + rm64[:, None] * N + rn64[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def sparse24_matmul_kernel(
    x_ptr,
    values_ptr,
    meta_ptr,
    scales_ptr,
    M,
    N,
    K,
    VALUES_STRIDE,
    META_STRIDE,
    y_ptr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    """2:4 W: group g of 4 columns keeps values[n, 2g], values[n, 2g+1] at in-group i0 < i1."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    rn64 = rn.to(tl.int64)
    rm64 = rm.to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        ok = n_ok[:, None] & k_ok[None, :]
        g = kk // 4
        pos = kk % 4
        nib = tl.load(meta_ptr + rn64[:, None] * META_STRIDE + (g // 2)[None, :], mask=ok, other=0).to(
            tl.int32
        )
        nib = (nib >> (4 * (g % 2))[None, :]) & 15
        i0 = nib & 3
        i1 = nib >> 2
        vrow = values_ptr + rn64[:, None] * VALUES_STRIDE + (2 * g)[None, :]
        v0 = tl.load(vrow, mask=ok & (i0 == pos[None, :]), other=0).to(tl.float32)
        v1 = tl.load(vrow + 1, mask=ok & (i1 == pos[None, :]), other=0).to(tl.float32)
        w = v0 + v1  # at most one of the two masks holds for a column
        x = tl.load(x_ptr + rm64[:, None] * K + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma(acc, x, w, USE_DOT)
    s = tl.load(scales_ptr + rn64, mask=n_ok, other=0.0)
    acc = acc * s[None, :]
    tl.store(y_ptr + rm64[:, None] * N + rn64[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def launch(op_type, x, *weights, config=None, out=None, byte_elems="u8", group_size=None):
    """Run ``op_type`` on torch tensors (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    ``x`` is float32 [..., K]; ``weights`` are the op's packed inputs as torch tensors in
    the on-disk layout or its int32 view (:func:`ffsplit_export.trt.layout.device_weights`);
    byte tensors are reinterpreted, never copied. ``byte_elems="i32"``: mask / meta (and
    SparseMatMulInt4's nibble bytes) hold one byte value per int32 element
    (:func:`ffsplit_export.trt.layout.parser_widened`). ``group_size``: SparseMatMulInt4's
    attribute.
    """
    import torch

    from ..errors import FormatError
    from .configs import heuristic_config, kernel_spec

    spec = kernel_spec(op_type, byte_elems=byte_elems)  # validates op_type and byte_elems
    if x.dtype != torch.float32:
        raise FormatError(f"{op_type}: X must be float32, got {x.dtype}")
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    cfg = config or heuristic_config(m)

    def as_bytes(t):
        return t.contiguous().view(torch.uint8)

    if spec.kernel == "sparse_bitmask_matmul_kernel":
        mask, values, row_ptr = weights[0], weights[1], weights[2]
        n = mask.shape[0]
        mask_b = mask.contiguous().reshape(n, -1) if byte_elems == "i32" else as_bytes(mask).reshape(n, -1)
        if op_type == "SparseMatMulInt8":
            values_t = as_bytes(values).view(torch.int8).reshape(-1)
            scales = weights[3]
        else:
            values_t = values.contiguous().view(torch.float32).reshape(-1)
            scales = None
        y = out if out is not None else torch.empty((m, n), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))
        sparse_bitmask_matmul_kernel[grid](
            x2, mask_b, values_t, row_ptr.contiguous(), scales, m, n, k, mask_b.shape[1], y,
            HAS_SCALES=scales is not None, num_warps=cfg.num_warps, **cfg.constexprs(),
        )  # fmt: skip
    elif spec.kernel == "sparse_int4_matmul_kernel":
        mask, values, row_ptr, scales = weights[:4]
        if group_size is None or int(group_size) < 8:
            raise FormatError(f"{op_type}: needs group_size >= 8 (the node attribute), got {group_size!r}")
        n = mask.shape[0]
        if byte_elems == "i32":
            mask_b = mask.contiguous().reshape(n, -1)
            values_b = values.contiguous().reshape(-1)
        else:
            mask_b = as_bytes(mask).reshape(n, -1)
            values_b = as_bytes(values).reshape(-1)
        y = out if out is not None else torch.empty((m, n), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))
        sparse_int4_matmul_kernel[grid](
            x2, mask_b, values_b, row_ptr.contiguous(), scales.contiguous(), m, n, k, mask_b.shape[1],
            int(group_size), y, num_warps=cfg.num_warps, **spec.constexprs(cfg),
        )  # fmt: skip
    else:
        values, meta, scales = weights
        n = values.shape[0]
        values_b = as_bytes(values).reshape(n, -1).view(torch.int8)
        meta_b = meta.contiguous().reshape(n, -1) if byte_elems == "i32" else as_bytes(meta).reshape(n, -1)
        y = out if out is not None else torch.empty((m, n), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))
        sparse24_matmul_kernel[grid](
            x2, values_b, meta_b, scales, m, n, k, values_b.shape[1], meta_b.shape[1], y,
            num_warps=cfg.num_warps, **cfg.constexprs(),
        )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)
