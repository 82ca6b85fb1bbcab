"""Triton kernels of ``ffsplit::FusedFFNNBits`` (imports triton; torch only in :func:`launch_fused_ffn`).

Two phases, one launch each (semantics: :data:`ffsplit_export.ops._ffn.NBITS_SEMANTICS`):

1. :func:`ffn_nbits_up_kernel`: every program owns BLOCK_N neurons (heavy-first) x BLOCK_M tokens,
   computes up [and gate] from X over D, adds the biases, applies the activation (and the gate
   product) and writes ``a[M, F]`` in float32. With ``SKIP`` a light neuron whose
   ``|act(gate)|`` (or ``|act(up)|``) is <= threshold, or (gated) whose ``|a|`` is <=
   product_threshold, gets ``a = 0`` (each threshold only when > 0); ungated with ``SKIP`` and
   input_threshold > 0 (TEAL), the light up reads X' = X with every ``|x| <= input_threshold``
   zeroed (NaN / inf kept), the heavy up the full X (zeroed channels' weights are still read:
   the op's result, no bytes saved).
2. :func:`ffn_nbits_down_kernel`: every program owns BLOCK_N outputs of D x BLOCK_M tokens and
   sums the heavy neurons then the light neurons of ``a``; with ``SKIP`` a light neuron whose
   ``a`` is exactly 0 for a token is left out of that token's sum (its down column is masked,
   so a NaN / inf there does not reach Y; the ``tl.dot`` tiles count non-finite terms apart).

Both read the MatMulNBits layout directly: code of W[n, k] at byte ``n * row_bytes + k * bits / 8``
(low nibble first for 4 bits; ``row_bytes = ceil(K / bs) * bs * bits / 8``), scale
``scales[n * n_blocks + k // bs]``, zero point from ``zero_points`` packed like B (absent: the
symmetric grid's ``2^(bits-1)``); a dense part (bits 32) is float32 ``[N, K]``. Block sizes are
runtime arguments, so one compiled kernel serves every block size. Products are float32 (IEEE
``tl.dot`` past 8 rows): accuracy_level 0 semantics, and level 4 runs the same kernels (the schema
allows, but does not require, int8 activations at level 4).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import _mma

#: activation attribute -> the kernels' ACT constexpr
ACT_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}


@triton.jit
def _act(v, ACT: tl.constexpr):
    if ACT == 0:  # relu, NaN kept
        out = tl.where(v > 0, v, tl.where(v != v, v, 0.0))
    elif ACT == 1:  # gelu (erf)
        out = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 2:  # gelu_tanh; tanh(z) = 1 - 2 / (exp(2z) + 1) saturates to +-1 without NaN
        z = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        out = 0.5 * v * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))
    else:  # silu
        out = v / (1.0 + tl.exp(-v))
    return out


@triton.jit
def _nbits_tile(b_ptr, s_ptr, z_ptr, rows, r_ok, kk, k_ok, K, BS, BITS: tl.constexpr, HAS_ZP: tl.constexpr):
    """float32 [BLOCK_N, BLOCK_K] tile W[rows, kk] of a MatMulNBits (or dense bits-32) part; 0 where
    masked. Byte arrays may be bytes or one byte value per int32 element (same offsets)."""
    rows64 = rows.to(tl.int64)
    ok = r_ok[:, None] & k_ok[None, :]
    if BITS == 32:
        w = tl.load(b_ptr + rows64[:, None] * K + kk[None, :], mask=ok, other=0.0)
    else:
        nb = (K + BS - 1) // BS
        row_bytes = nb * (BS * BITS // 8)
        blk = kk // BS
        if BITS == 8:
            code = (
                tl.load(b_ptr + rows64[:, None] * row_bytes + kk[None, :], mask=ok, other=0).to(tl.int32)
                & 255
            )
        else:
            byte = tl.load(b_ptr + rows64[:, None] * row_bytes + (kk // 2)[None, :], mask=ok, other=0)
            code = ((byte.to(tl.int32) & 255) >> ((kk & 1) * 4)[None, :]) & 15
        s = tl.load(s_ptr + rows64[:, None] * nb + blk[None, :], mask=ok, other=0.0)
        if HAS_ZP:
            if BITS == 8:
                z = tl.load(z_ptr + rows64[:, None] * nb + blk[None, :], mask=ok, other=0).to(tl.int32) & 255
            else:
                per_row = (nb + 1) // 2
                zb = tl.load(z_ptr + rows64[:, None] * per_row + (blk // 2)[None, :], mask=ok, other=0)
                z = ((zb.to(tl.int32) & 255) >> ((blk & 1) * 4)[None, :]) & 15
            w = (code - z).to(tl.float32) * s
        else:
            w = (code - (1 << (BITS - 1))).to(tl.float32) * s
    return w


@triton.jit
def _up_gate(
    acc_u, acc_g, x_ptr, rm64, m_ok, rk, D, u_b_ptr, u_s_ptr, u_z_ptr, g_b_ptr, g_s_ptr, g_z_ptr,
    rows, r_ok, BS, t_in, BLOCK_K: tl.constexpr, BITS: tl.constexpr, HAS_ZP: tl.constexpr,
    GATED: tl.constexpr, USE_DOT: tl.constexpr, ZERO_X: tl.constexpr,
):  # fmt: skip
    """acc_u (and, gated, acc_g) += X @ W.T over all of K for one part (heavy or light) of up / gate:
    ``rows`` are the part's rows of this tile (``r_ok`` the valid ones). ``ZERO_X`` (ungated light
    part): X' = X with every |x| <= ``t_in`` set to 0 (NaN kept; -1.0 = unset zeroes nothing)."""
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < D
        x = tl.load(x_ptr + rm64[:, None] * D + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if ZERO_X and not GATED:
            x = tl.where(tl.abs(x) <= t_in, 0.0, x)
        w = _nbits_tile(u_b_ptr, u_s_ptr, u_z_ptr, rows, r_ok, kk, k_ok, D, BS, BITS, HAS_ZP)
        acc_u = _mma(acc_u, x, w, USE_DOT)
        if GATED:
            wg = _nbits_tile(g_b_ptr, g_s_ptr, g_z_ptr, rows, r_ok, kk, k_ok, D, BS, BITS, HAS_ZP)
            acc_g = _mma(acc_g, x, wg, USE_DOT)
    return acc_u, acc_g


@triton.jit
def ffn_nbits_up_kernel(
    x_ptr,
    uh_b_ptr,
    uh_s_ptr,
    uh_z_ptr,
    ul_b_ptr,
    ul_s_ptr,
    ul_z_ptr,
    up_bias_ptr,
    gh_b_ptr,
    gh_s_ptr,
    gh_z_ptr,
    gl_b_ptr,
    gl_s_ptr,
    gl_z_ptr,
    gate_bias_ptr,
    M,
    H,
    L,
    D,
    HEAVY_BS,
    LIGHT_BS,
    THRESHOLD_BITS,
    PRODUCT_THRESHOLD_BITS,
    INPUT_THRESHOLD_BITS,
    a_ptr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    HEAVY_BITS: tl.constexpr,
    LIGHT_BITS: tl.constexpr,
    HEAVY_ZP: tl.constexpr,
    LIGHT_ZP: tl.constexpr,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    SKIP: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
):
    """Phase 1: a[M, H + L] = act(g) * u (gated) or act(u); a light neuron with |act(g)| (|act(u)|)
    <= threshold or, gated, |a| <= product_threshold gets a = 0; ungated with SKIP, the light up
    reads X' (every |x| <= input_threshold zeroed), the heavy up X. THRESHOLD_BITS /
    PRODUCT_THRESHOLD_BITS / INPUT_THRESHOLD_BITS: the float32 bit patterns of the thresholds, -1.0
    for an unset (0) one (only exact zeros are skipped then, by phase 2; no input channel is
    zeroed); int32 because TensorRT passes int32 scalars."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    F = H + L
    n0 = pid_n * BLOCK_N
    rn = n0 + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rm64 = rm.to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if n0 < H:  # heavy neurons in this tile
        h_ok = rn < H
        acc_u, acc_g = _up_gate(
            acc_u, acc_g, x_ptr, rm64, m_ok, rk, D, uh_b_ptr, uh_s_ptr, uh_z_ptr, gh_b_ptr, gh_s_ptr,
            gh_z_ptr, tl.where(h_ok, rn, 0), h_ok, HEAVY_BS, -1.0, BLOCK_K, HEAVY_BITS, HEAVY_ZP, GATED,
            USE_DOT, False,
        )  # fmt: skip
    if n0 + BLOCK_N > H:  # light neurons in this tile
        l_ok = (rn >= H) & (rn < F)
        acc_u, acc_g = _up_gate(
            acc_u, acc_g, x_ptr, rm64, m_ok, rk, D, ul_b_ptr, ul_s_ptr, ul_z_ptr, gl_b_ptr, gl_s_ptr,
            gl_z_ptr, tl.where(l_ok, rn - H, 0), l_ok, LIGHT_BS, INPUT_THRESHOLD_BITS.to(tl.float32, bitcast=True),
            BLOCK_K, LIGHT_BITS, LIGHT_ZP, GATED, USE_DOT, SKIP,
        )  # fmt: skip
    n_ok = rn < F
    rn64 = rn.to(tl.int64)
    if HAS_UP_BIAS:
        acc_u += tl.load(up_bias_ptr + rn64, mask=n_ok, other=0.0)[None, :]
    if GATED:
        if HAS_GATE_BIAS:
            acc_g += tl.load(gate_bias_ptr + rn64, mask=n_ok, other=0.0)[None, :]
        s = _act(acc_g, ACT)
        a = s * acc_u
    else:
        s = _act(acc_u, ACT)
        a = s
    if SKIP:
        light = (rn >= H)[None, :]
        thr = THRESHOLD_BITS.to(tl.float32, bitcast=True)
        pthr = PRODUCT_THRESHOLD_BITS.to(tl.float32, bitcast=True)
        quiet = light & (tl.abs(s) <= thr)  # an unset threshold arrives as -1: never (NaN: never)
        if GATED:
            quiet = quiet | (light & (tl.abs(a) <= pthr))  # |act(g) * u|
        a = tl.where(quiet, 0.0, a)
    tl.store(a_ptr + rm64[:, None] * F + rn64[None, :], a, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def ffn_nbits_down_kernel(
    a_ptr,
    dh_b_ptr,
    dh_s_ptr,
    dh_z_ptr,
    dl_b_ptr,
    dl_s_ptr,
    dl_z_ptr,
    down_bias_ptr,
    M,
    D,
    H,
    L,
    HEAVY_BS,
    LIGHT_BS,
    y_ptr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    HEAVY_BITS: tl.constexpr,
    LIGHT_BITS: tl.constexpr,
    HEAVY_ZP: tl.constexpr,
    LIGHT_ZP: tl.constexpr,
    SKIP: tl.constexpr,
    HAS_DOWN_BIAS: tl.constexpr,
):
    """Phase 2: Y[M, D] = (a_h @ Wdown_h.T + sum of the light terms not skipped) + down_bias."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    F = H + L
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < D
    m_ok = rm < M
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < H
        av = tl.load(a_ptr + rm64[:, None] * F + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = _nbits_tile(dh_b_ptr, dh_s_ptr, dh_z_ptr, rn, n_ok, kk, k_ok, H, HEAVY_BS, HEAVY_BITS, HEAVY_ZP)
        acc = _mma(acc, av, w, USE_DOT)
    acc_l = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # SKIP in the tl.dot tiles: the product takes the finite weights; the non-finite ones are
    # counted per (token, output) over the live neurons only (a != 0; NaN a is live), as
    # +inf / -inf / NaN terms, from products of 0/1 matrices (exact), so a skipped neuron's
    # inf / NaN down weight never reaches Y while a live one's does, as the op says
    n_pinf = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_ninf = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_nan = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, L, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < L
        av = tl.load(
            a_ptr + rm64[:, None] * F + (H + kk)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        w = _nbits_tile(dl_b_ptr, dl_s_ptr, dl_z_ptr, rn, n_ok, kk, k_ok, L, LIGHT_BS, LIGHT_BITS, LIGHT_ZP)
        if SKIP and not USE_DOT:
            terms = av[:, None, :] * w[None, :, :]
            acc_l += tl.sum(tl.where(av[:, None, :] != 0, terms, 0.0), axis=2)
        elif SKIP:
            w_nan = w != w
            w_pinf = w == float("inf")
            w_ninf = w == float("-inf")
            bad = w_nan | w_pinf | w_ninf
            acc_l = _mma(acc_l, av, tl.where(bad, 0.0, w), USE_DOT)
            if tl.sum(tl.sum(bad.to(tl.int32), axis=1), axis=0) > 0:
                pos = (av > 0).to(tl.float32)
                neg = (av < 0).to(tl.float32)
                live = (av != 0).to(tl.float32)
                fp = w_pinf.to(tl.float32)
                fn = w_ninf.to(tl.float32)
                n_pinf = _mma(_mma(n_pinf, pos, fp, USE_DOT), neg, fn, USE_DOT)
                n_ninf = _mma(_mma(n_ninf, pos, fn, USE_DOT), neg, fp, USE_DOT)
                n_nan = _mma(n_nan, live, w_nan.to(tl.float32), USE_DOT)
        else:
            acc_l = _mma(acc_l, av, w, USE_DOT)
    if SKIP and USE_DOT:
        both = (n_pinf > 0) & (n_ninf > 0)
        acc_l = tl.where(n_pinf > 0, float("inf"), tl.where(n_ninf > 0, float("-inf"), acc_l))
        acc_l = tl.where((n_nan > 0) | both, float("nan"), acc_l)
    acc = acc + acc_l
    if HAS_DOWN_BIAS:
        acc += tl.load(down_bias_ptr + rn64, mask=n_ok, other=0.0)[None, :]
    tl.store(y_ptr + rm64[:, None] * D + rn64[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def launch_fused_ffn(
    x,
    *inputs,
    activation: str,
    gated: int = 0,
    skip: int = 0,
    threshold: float = 0.0,
    product_threshold: float = 0.0,
    heavy_bits: int = 32,
    light_bits: int = 4,
    heavy_block_size: int | None = None,
    light_block_size: int = 32,
    accuracy_level: int = 0,
    input_threshold: float = 0.0,
    config=None,
    byte_elems: str = "u8",
):
    """Run ``ffsplit::FusedFFNNBits`` on torch tensors (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    ``inputs``: the op's inputs 1..21 as torch tensors in the on-disk layout (or its int32 view;
    ``byte_elems="i32"``: one byte value per int32 element, as TensorRT's parser widens uint8),
    None where absent. Returns Y float32 [..., D]. ``input_threshold`` (TEAL-style input skipping;
    > 0 only with gated=0, skip=1): the light up projection sees X with every |x| <= it zeroed.
    """
    import torch

    from ..errors import FormatError
    from ..ops._ffn import (
        ACTIVATIONS,
        NBITS_INPUTS,
        _nbits_attrs,
        check_input_threshold,
        check_product_threshold,
        check_threshold,
    )
    from .configs import fused_ffn_kernel_specs, heuristic_config

    if activation not in ACTIVATIONS:
        raise FormatError(
            f"FusedFFNNBits activation {activation!r} is not supported; use one of {ACTIVATIONS}"
        )
    if gated not in (0, 1) or skip not in (0, 1):
        raise FormatError(f"FusedFFNNBits gated={gated} skip={skip}: both must be 0 or 1")
    t = check_threshold(threshold, skip)
    pt = check_product_threshold(product_threshold, skip, gated)
    t_in = check_input_threshold(input_threshold, gated, skip)
    if len(inputs) > NBITS_INPUTS - 1:
        raise FormatError(f"FusedFFNNBits takes at most {NBITS_INPUTS} inputs, got {len(inputs) + 1}")
    ins = list(inputs) + [None] * (NBITS_INPUTS - 1 - len(inputs))
    heavy = ins[0] is not None
    _nbits_attrs(heavy_bits, light_bits, heavy_block_size, light_block_size, accuracy_level, heavy)
    if x.dtype != torch.float32 or x.dim() < 1:
        raise FormatError(f"FusedFFNNBits X must be float32 of rank >= 1, got {x.dtype} rank {x.dim()}")
    if not gated and any(a is not None for a in ins[14:21]):
        raise FormatError("FusedFFNNBits with gated=0 takes no gate inputs (15-21); set gated=1 or drop them")
    if ins[3] is None or ins[10] is None or ins[4] is None or ins[11] is None:
        raise FormatError(
            "FusedFFNNBits needs the up light and down light parts (B and scales, inputs 4-5, 11-12)"
        )
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    m = x2.shape[0]
    h = ins[0].shape[0] if heavy else 0
    n_light = ins[3].shape[0]
    if ins[10].shape[0] != d:
        raise FormatError(f"FusedFFNNBits down light has {ins[10].shape[0]} rows, X has D = {d}")
    if gated and (ins[17] is None or ins[17].shape[0] != n_light):
        raise FormatError("FusedFFNNBits gated=1 needs the gate light part with as many rows as up light")
    hbits = heavy_bits if heavy else 32
    hbs = int(heavy_block_size or 16) if hbits != 32 else 16
    lbs = int(light_block_size)
    up_spec, down_spec = fused_ffn_kernel_specs(
        heavy_bits=hbits,
        light_bits=light_bits,
        heavy_zp=heavy and ins[2] is not None,
        light_zp=ins[5] is not None,
        gated=bool(gated),
        activation=activation,
        skip=bool(skip),
        up_bias=ins[6] is not None,
        gate_bias=ins[20] is not None,
        down_bias=ins[13] is not None,
        byte_elems=byte_elems,
    )
    cfg = config or heuristic_config(m)
    dev = x.device
    dummy_f = torch.zeros(1, dtype=torch.float32, device=dev)
    dummy_b = torch.zeros(1, dtype=torch.uint8 if byte_elems == "u8" else torch.int32, device=dev)

    def arr(a, kind):
        """A contiguous flat view of ``a`` (bytes reinterpreted, never copied) or a dummy."""
        if a is None:
            return dummy_f if kind == "f" else dummy_b
        a = a.contiguous()
        if kind == "f":
            return a.view(torch.float32).reshape(-1)
        if byte_elems == "i32" and a.dtype == torch.int32:
            return a.reshape(-1)
        return a.view(torch.uint8).reshape(-1)

    def part(i, bits):
        b, s, z = ins[i - 1 : i + 2]
        return arr(b, "f" if bits == 32 else "b"), arr(s, "f"), arr(z, "b")

    up_in = [*part(1, hbits), *part(4, light_bits), arr(ins[6], "f"), *part(15, hbits), *part(18, light_bits)]
    up_in.append(arr(ins[20], "f"))
    down_in = [*part(8, hbits), *part(11, light_bits), arr(ins[13], "f")]
    y = _run_phases(x2, up_in, down_in, up_spec, down_spec, h, n_light, hbs, lbs, (t, pt, t_in), cfg)
    return y.reshape(*x.shape[:-1], d)


def threshold_bits(threshold: float) -> int:
    """The int32 argument of a threshold: its float32 bits, or those of -1.0 when it is 0 (unset)."""
    import numpy as np

    return int(np.array([threshold if threshold > 0 else -1.0], np.float32).view(np.int32)[0])


def _run_phases(x2, up_in, down_in, up_spec, down_spec, h, n_light, hbs, lbs, thresholds, cfg):
    """Launch both kernels on flat torch tensors (14 up inputs, 7 down inputs, in node order);
    ``thresholds``: (threshold, product_threshold, input_threshold)."""
    import torch

    m, d = x2.shape
    f = h + n_light
    thr_bits = [threshold_bits(t) for t in thresholds]
    a_buf = torch.empty((m, f), dtype=torch.float32, device=x2.device)
    y = torch.empty((m, d), dtype=torch.float32, device=x2.device)
    if m == 0 or d == 0:
        return y  # nothing to launch (an empty grid)
    grid1 = (triton.cdiv(f, cfg.block_n), triton.cdiv(m, cfg.block_m))
    ffn_nbits_up_kernel[grid1](
        x2, *up_in, m, h, n_light, d, hbs, lbs, *thr_bits, a_buf,
        num_warps=cfg.num_warps, **up_spec.constexprs(cfg),
    )  # fmt: skip
    grid2 = (triton.cdiv(d, cfg.block_n), triton.cdiv(m, cfg.block_m))
    ffn_nbits_down_kernel[grid2](
        a_buf, *down_in, m, d, h, n_light, hbs, lbs, y,
        num_warps=cfg.num_warps, **down_spec.constexprs(cfg),
    )  # fmt: skip
    return y


def launch_plugin_nodes(x, up_inputs, down_inputs, up_attrs: dict, down_attrs: dict, config=None):
    """Run the two TensorRT plugin nodes of :func:`ffsplit_export.trt.fused_nodes.split_fused_ffn`
    exactly as the plugin does: their input tensors (int32 view of the byte arrays, dummies for the
    absent inputs; torch, CUDA or CPU under ``TRITON_INTERPRET=1``) and attributes select and feed
    the kernels (H and L from the ``heavy_neurons`` / ``light_neurons`` attributes)."""
    import torch

    from .configs import heuristic_config
    from .fused_nodes import kernel_specs_of

    up_spec, down_spec = kernel_specs_of(up_attrs, down_attrs)
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    cfg = config or heuristic_config(x2.shape[0])

    def flat(t):
        t = t.contiguous()
        return t.view(torch.uint8).reshape(-1) if t.dtype == torch.int32 else t.reshape(-1)

    h, n_light = int(up_attrs["heavy_neurons"]), int(up_attrs["light_neurons"])
    y = _run_phases(
        x2, [flat(t) for t in up_inputs], [flat(t) for t in down_inputs], up_spec, down_spec, h, n_light,
        int(up_attrs["heavy_block_size"]), int(up_attrs["light_block_size"]),
        tuple(float(up_attrs[k]) for k in ("threshold", "product_threshold", "input_threshold")), cfg,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], d)
