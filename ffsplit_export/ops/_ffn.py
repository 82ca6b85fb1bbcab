"""``ffsplit::FusedFFN``: one node per split FFN (schema and NumPy reference).

The FFN's intermediate neurons are ordered heavy-first (``H`` heavy, ``L`` light, ``F = H + L``),
as :mod:`ffsplit_export.split` orders them. Inputs (``D`` = model width)::

    0  X            float [..., D]
    1  up_heavy     float [H, D]           dense
    2  up_bias      float [F]              heavy-first (zeros when the model has none)
    3-6 up light    SparseMatMulInt8 inputs of W[L, D] (mask, values, row_ptr, scales)
    7  down_heavy   float [D, H]           dense
    8-11 down light SparseMatMulInt8 inputs of W[D, L]
    12 down_bias    float [D]
    13 gate_heavy   float [H, D]           gated only (inputs 13-18 absent when gated=0)
    14 gate_bias    float [F]
    15-18 gate light SparseMatMulInt8 inputs of W[L, D]

Attributes: ``activation`` (``relu``, ``gelu`` (erf), ``gelu_tanh``, ``silu``), ``gated`` (0/1),
``skip`` (0: every light neuron's down column is used; 1 = ``exact``: a light neuron whose
activation is exactly zero for a row contributes nothing to that row, its down column is not
read), ``threshold`` (float32 >= 0, default 0; a value > 0 needs skip=1: calibrated activation
sparsity, CATS-style: a light neuron whose |act(gate)| (gated) or |act(up)| (ungated) is
<= threshold for a row is skipped for that row too).
"""

from __future__ import annotations

import math

import numpy as np
from onnx import defs

from ..errors import FormatError

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")

FFN_SEMANTICS = """\
u = concat(f32(X @ up_heavy.T), SparseMatMulInt8(X, up light)) + up_bias (float32), likewise g for the
gate; a = act(g) * u if gated else act(u), act evaluated in float64 by its formula (relu: v > 0 ? v :
v with NaN kept, else 0; gelu: 0.5 v (1 + erf(v / sqrt 2)); gelu_tanh: 0.5 v (1 + tanh(sqrt(2/pi)
(v + 0.044715 v^3))); silu: v / (1 + exp(-v))) and rounded to float32 (the gate product in float32);
Y = (f32(a[:, :H] @ down_heavy.T) + f32(light down)) + down_bias. The dense heavy products follow
IEEE arithmetic on every term (0 * inf = NaN). The light products follow the domain's SEMANTICS
(structural zeros skipped); with skip=1 a light term whose activation a[m, H + j] is exactly 0 is
skipped too, so a NaN / inf in a skipped neuron's down column does not reach Y. Every float32
rounding above is of the exact value (accumulation error allowed)."""


def _erf(v: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(v) if v.size else v.astype(np.float64)


def activation(kind: str, v: np.ndarray) -> np.ndarray:
    """The op's activation in float64 (NaN propagates; relu(-0.0) = 0)."""
    v = np.asarray(v, np.float64)
    with np.errstate(all="ignore"):
        if kind == "relu":
            return np.where(v > 0, v, np.where(np.isnan(v), v, 0.0))
        if kind == "gelu":
            return 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0)))
        if kind == "gelu_tanh":
            return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
        if kind == "silu":
            return v / (1.0 + np.exp(-v))
    raise FormatError(f"FusedFFN activation {kind!r} is not supported; use one of {ACTIVATIONS}")


def _dense(x2: np.ndarray, w: np.ndarray, name: str, k: int) -> np.ndarray:
    w = np.asarray(w)
    if w.dtype != np.float32 or w.ndim != 2 or w.shape[1] != k:
        raise FormatError(f"FusedFFN {name} must be float32 [rows, {k}], got {w.dtype} {w.shape}")
    with np.errstate(all="ignore"):
        return (x2.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32)


def _bias(b: np.ndarray, n: int, name: str) -> np.ndarray:
    b = np.asarray(b)
    if b.dtype != np.float32 or b.shape != (n,):
        raise FormatError(f"FusedFFN {name} must be float32 [{n}], got {b.dtype} {b.shape}")
    return b


def _light_down(a_l: np.ndarray, d: int, light, skip: bool) -> np.ndarray:
    """float32 [M, D]: the light down product under SEMANTICS, with exact-zero skipping."""
    from ._spec import _scaled, _spec

    codes, scales = _spec("SparseMatMulInt8").terms(a_l.shape[1], *light)
    if codes.shape[0] != d:
        raise FormatError(f"FusedFFN down light weight has {codes.shape[0]} rows, the model width is {d}")
    w = _scaled(codes, scales, np.float64)  # [D, L]
    nz = codes != 0
    a64 = a_l.astype(np.float64)
    out = np.empty((a_l.shape[0], d), np.float64)
    with np.errstate(all="ignore"):
        for r in range(a_l.shape[0]):
            use = nz & ((a64[r] != 0)[None, :] if skip else True)
            out[r] = np.where(use, a64[r][None, :] * w, 0.0).sum(axis=1)
        return out.astype(np.float32)


def check_threshold(threshold, skip: int) -> float:
    """The ``threshold`` attribute as float32 (finite, >= 0, > 0 only with skip=1)."""
    t = np.float32(threshold)
    if not np.isfinite(t) or t < 0:
        raise FormatError(f"FusedFFN threshold={threshold!r} must be a finite float >= 0")
    if t > 0 and skip != 1:
        raise FormatError(f"FusedFFN threshold={threshold!r} needs skip=1 (thresholds skip light neurons)")
    return float(t)


def check_product_threshold(threshold, skip: int, gated: int) -> float:
    """FusedFFNNBits' ``product_threshold`` as float32 (finite, >= 0, > 0 only gated with skip=1)."""
    t = np.float32(threshold)
    if not np.isfinite(t) or t < 0:
        raise FormatError(f"FusedFFNNBits product_threshold={threshold!r} must be a finite float >= 0")
    if t > 0 and not (skip == 1 and gated == 1):
        raise FormatError(
            f"FusedFFNNBits product_threshold={threshold!r} needs gated=1 and skip=1 (it skips light "
            "neurons by |act(gate) * up|; ungated FFNs use threshold)"
        )
    return float(t)


def fused_ffn_reference(
    x, *inputs, activation_kind: str = "relu", gated: int = 0, skip: int = 0, threshold: float = 0.0
):
    """NumPy reference of ``ffsplit::FusedFFN`` (see :data:`FFN_SEMANTICS`)."""
    from ._spec import reference_matmul

    if activation_kind not in ACTIVATIONS:
        raise FormatError(
            f"FusedFFN activation {activation_kind!r} is not supported; use one of {ACTIVATIONS}"
        )
    if gated not in (0, 1) or skip not in (0, 1):
        raise FormatError(f"FusedFFN gated={gated} skip={skip}: both must be 0 or 1")
    t = np.float32(check_threshold(threshold, skip))
    want = 19 if gated else 13
    if len(inputs) != want - 1 or any(t is None for t in inputs):
        raise FormatError(f"FusedFFN with gated={gated} takes {want} inputs, got {len(inputs) + 1}")
    x = np.asarray(x)
    if x.dtype != np.float32 or x.ndim < 1:
        raise FormatError(f"FusedFFN X must be float32 of rank >= 1, got {x.dtype} rank {x.ndim}")
    ins = [np.asarray(t) for t in inputs]
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    up_h, up_b, up_l, down_h, down_l, down_b = ins[0], ins[1], ins[2:6], ins[6], ins[7:11], ins[11]
    h = up_h.shape[0] if up_h.ndim == 2 else -1

    def project(w_h, b, light, name):
        yh = _dense(x2, w_h, f"{name}_heavy", d)
        yl = reference_matmul("SparseMatMulInt8", x2, *light)
        f = yh.shape[1] + yl.shape[1]
        return np.concatenate([yh, yl], axis=1) + _bias(b, f, f"{name}_bias")

    u = project(up_h, up_b, up_l, "up")
    f = u.shape[1]
    if gated:
        g = project(ins[12], ins[13], ins[14:18], "gate")
        if g.shape[1] != f:
            raise FormatError(f"FusedFFN gate has {g.shape[1]} neurons, up has {f}")
        s = activation(activation_kind, g).astype(np.float32)
        with np.errstate(all="ignore"):
            a = s * u
    else:
        a = s = activation(activation_kind, u).astype(np.float32)
    if t > 0:  # thresholded light neurons contribute nothing (a := 0, then skipped as exact zeros)
        a = a.copy()
        a[:, h:][np.abs(s[:, h:]) <= t] = 0.0
    if down_h.ndim != 2 or down_h.shape != (d, h):
        raise FormatError(
            f"FusedFFN down_heavy must be float32 [{d}, {h}], got {down_h.dtype} {down_h.shape}"
        )
    yh = _dense(a[:, :h], down_h, "down_heavy", h)
    yl = _light_down(a[:, h:], d, down_l, bool(skip))
    with np.errstate(all="ignore"):
        y = (yh + yl) + _bias(down_b, d, "down_bias")
    return y.reshape(*x.shape[:-1], d).astype(np.float32)


def skipped_fraction(
    x, *inputs, activation_kind: str = "relu", gated: int = 0, threshold: float = 0.0
) -> float:
    """Fraction of (row, light neuron) pairs that skip=1 skips: activation exactly zero, or (threshold
    > 0) |act(gate)| / |act(up)| <= threshold."""
    from ._spec import reference_matmul

    x2 = np.asarray(x, np.float32).reshape(-1, np.asarray(x).shape[-1])
    h = np.asarray(inputs[0]).shape[0]
    ul = reference_matmul("SparseMatMulInt8", x2, *inputs[2:6]) + np.asarray(inputs[1])[h:]
    if gated:
        gl = reference_matmul("SparseMatMulInt8", x2, *inputs[14:18]) + np.asarray(inputs[13])[h:]
        sl = activation(activation_kind, gl).astype(np.float32)
        a = sl * ul
    else:
        a = sl = activation(activation_kind, ul).astype(np.float32)
    t = np.float32(check_threshold(threshold, 1))
    skipped = (a == 0) | ((np.abs(sl) <= t) if t > 0 else False)
    return float(skipped.mean()) if a.size else 0.0


def schema() -> defs.OpSchema:
    P = defs.OpSchema.FormalParameter
    opt = defs.OpSchema.FormalParameterOption.Optional
    names = [
        ("X", "T"),
        ("up_heavy", "T"),
        ("up_bias", "T"),
        ("up_mask", "tensor(uint8)"),
        ("up_values", "tensor(int8)"),
        ("up_row_ptr", "tensor(int64)"),
        ("up_scales", "T"),
        ("down_heavy", "T"),
        ("down_mask", "tensor(uint8)"),
        ("down_values", "tensor(int8)"),
        ("down_row_ptr", "tensor(int64)"),
        ("down_scales", "T"),
        ("down_bias", "T"),
    ]
    gate = [
        ("gate_heavy", "T"),
        ("gate_bias", "T"),
        ("gate_mask", "tensor(uint8)"),
        ("gate_values", "tensor(int8)"),
        ("gate_row_ptr", "tensor(int64)"),
        ("gate_scales", "T"),
    ]
    inputs = [P(n, t, n) for n, t in names] + [
        P(n, t, n + " (gated only)", param_option=opt) for n, t in gate
    ]
    A = defs.OpSchema.Attribute
    from ._spec import DOMAIN, VERSION

    return defs.OpSchema(
        "FusedFFN",
        DOMAIN,
        VERSION,
        inputs=inputs,
        outputs=[P("Y", "T", "[..., D]")],
        type_constraints=[("T", ["tensor(float)"], "float32")],
        doc=__doc__ + "\n\n" + FFN_SEMANTICS,
        attributes=[
            A("activation", defs.OpSchema.AttrType.STRING, "relu | gelu | gelu_tanh | silu", required=True),
            A("gated", defs.OpSchema.AttrType.INT, "1: act(gate) * up", required=False),
            A(
                "skip",
                defs.OpSchema.AttrType.INT,
                "1: skip light neurons whose activation is 0",
                required=False,
            ),
            A(
                "threshold",
                defs.OpSchema.AttrType.FLOAT,
                "with skip=1: also skip light neurons with |act(gate)| (gated) or |act(up)| <= threshold",
                required=False,
            ),
        ],
    )


def reference_op_class(domain: str):
    from onnx.reference.op_run import OpRun

    def _run(self, x, *inputs, activation=None, gated=None, skip=None, threshold=None):
        act = activation.decode() if isinstance(activation, bytes) else activation
        return (
            fused_ffn_reference(
                x,
                *inputs,
                activation_kind=act,
                gated=int(gated or 0),
                skip=int(skip or 0),
                threshold=float(threshold or 0.0),
            ),
        )

    return type("FusedFFN", (OpRun,), {"op_domain": domain, "_run": _run})


def pack_light_int8(w: np.ndarray, keep: np.ndarray) -> list[np.ndarray]:
    """SparseMatMulInt8 inputs (mask, values, row_ptr, scales) of ``w`` [N, K] kept where ``keep``."""
    from ..formats import packing

    q, s = packing.quantize_int8_per_channel(np.where(keep, w, 0).astype(np.float32))
    p = packing.pack_bitmask(q, keep)
    return [p.mask, p.values, p.row_ptr, s.astype(np.float32)]


def random_ffn_inputs(
    rng: np.random.Generator, d: int, f: int, h: int, sparsity: float, gated: bool, bias: bool = True
) -> list[np.ndarray]:
    """Random FusedFFN weight inputs (1..12, or 1..18 when gated): heavy fp32, light sparse int8."""
    lt = f - h

    def light(n, k):
        w = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
        return pack_light_int8(w, rng.random((n, k)) >= sparsity)

    def heavy(n, k):
        return (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)

    def b(n):
        return (0.1 * rng.standard_normal(n)).astype(np.float32) if bias else np.zeros(n, np.float32)

    out = [heavy(h, d), b(f), *light(lt, d), heavy(d, h), *light(d, lt), b(d)]
    if gated:
        out += [heavy(h, d), b(f), *light(lt, d)]
    return out


def fused_ffn_model(
    inputs: list[np.ndarray], activation_kind: str, gated: bool, skip: int, threshold: float = 0.0
):
    """A one-node ONNX model ``Y = FusedFFN(X, *inputs)`` with the weights as initializers."""
    from onnx import TensorProto, helper, numpy_helper

    from ._spec import DOMAIN, VERSION

    names = [f"w{i}" for i in range(len(inputs))]
    node = helper.make_node(
        "FusedFFN",
        ["X", *names],
        ["Y"],
        domain=DOMAIN,
        activation=activation_kind,
        gated=int(gated),
        skip=int(skip),
        **({"threshold": float(threshold)} if threshold else {}),
    )
    graph = helper.make_graph(
        [node],
        "fused_ffn",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(a, n) for a, n in zip(inputs, names)],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, VERSION)], ir_version=8
    )


def _register() -> None:
    from . import _spec

    if schema not in _spec.EXTRA_SCHEMAS:
        _spec.EXTRA_SCHEMAS.append(schema)
        _spec.EXTRA_REFERENCE_OPS.append(reference_op_class)


_register()


# ----------------------------------------------------------------------------------------------
# ffsplit::FusedFFNNBits: the FFN whose parts are dense float32 or MatMulNBits-layout int8 / int4

NBITS_DOC = """\
``ffsplit::FusedFFNNBits``: one node per split FFN whose parts are dense float32 or MatMulNBits
layout (the presets' int8 / int4 parts; layout in :mod:`ffsplit_export.formats.packing`).

Neurons heavy-first (H heavy, L light, F = H + L; H may be 0: every heavy input absent). A part is
3 inputs (B, scales, zero_points) of W[N, K] as com.microsoft MatMulNBits takes them (B uint8
[N, n_blocks, block_size * bits / 8], scales float32 [N * n_blocks], zero_points optional uint8
packed like B); for bits 32, B is float32 [N, K] and scales / zero_points are absent. Inputs::

    0      X          float32 [..., D]
    1-3    up heavy   W[H, D] (heavy_bits, heavy_block_size)
    4-6    up light   W[L, D] (light_bits, light_block_size)
    7      up_bias    float32 [F] optional
    8-10   down heavy W[D, H]
    11-13  down light W[D, L]
    14     down_bias  float32 [D] optional
    15-17  gate heavy W[H, D] (gated=1 only)
    18-20  gate light W[L, D] (gated=1 only)
    21     gate_bias  float32 [F] optional

Attributes: heavy_bits (4 | 8 | 32), light_bits (4 | 8), heavy_block_size, light_block_size
(powers of two 16..256; heavy_block_size unused for heavy_bits 32), activation (relu | gelu |
gelu_tanh | silu), gated (0 | 1), skip (0 | 1), threshold (float >= 0; > 0 needs skip=1),
product_threshold (float >= 0; > 0 needs gated=1 and skip=1), input_threshold (float >= 0, default 0 =
off; > 0 needs gated=0 and skip=1), accuracy_level (0 | 4)."""

NBITS_SEMANTICS = """\
Every part is dequantized (w = (u - zero) * scale in float32, or the dense float32 B); u =
concat(f32(X @ Wup_h.T), f32(X' @ Wup_l.T)) + up_bias, likewise g (with X); X' = X, except with
input_threshold t_in > 0 (ungated only, TEAL-style input sparsity): X' = X with every channel
|X[m, k]| <= t_in set to 0 for that row (the LIGHT up projection reads only the kept channels'
weights; the heavy up uses the full X); a = act(g) * u (float32) if
gated else act(u), act as FusedFFN's (float64, rounded to float32); the silence score s = act(g)
(gated) or act(u). With skip=1 a LIGHT neuron j is skipped for a row where a[j] == 0 exactly or
(threshold > 0) |s[j]| <= threshold or (gated, product_threshold > 0) |a[j]| <= product_threshold:
it contributes nothing to that row (its down column is not read, so a NaN / inf there does not
reach Y). The threshold on s decides before the up row is read (CATS: a skipped gated neuron costs
neither its up row nor its down column); the one on |a| = |act(g) * u| after (only the down column
is saved, but it sees the up value). Heavy neurons are always computed. Y =
(f32(a_h @ Wdown_h.T) + f32(sum over the light neurons not skipped of a_l[j] * Wdown_l[:, j])) +
down_bias. Every product is dense IEEE arithmetic over k < K (0 * inf = NaN), the float32 rounding
of the exact value (float32 accumulation error allowed; the kernels recompute non-finite outputs
in float64). accuracy_level 4: the activations entering an integer product (X for up / gate, a for
down) may be quantized to int8 per block of K (scale max|.|/127 per block and row) as MatMulNBits
level 4 does (with input_threshold > 0 the light up's int8 activations are those of X', so
prefill and decode agree); rows holding NaN / inf are computed at level 0; the skip decision is
made on the float32 activations, so both levels skip the same neurons. The Triton kernels (GPU,
TensorRT plugin; ffsplit_export/trt/fused_kernels.py) run level 4 as level 0: float32 products,
no int8 activations."""

#: the block sizes the op accepts (MatMulNBits' int4 / int8 blocks)
NBITS_BLOCK_SIZES = (16, 32, 64, 128, 256)
#: input index of each part's B (scales, zero_points follow) and of the biases
NBITS_PARTS = {
    "up_heavy": 1,
    "up_light": 4,
    "down_heavy": 8,
    "down_light": 11,
    "gate_heavy": 15,
    "gate_light": 18,
}
NBITS_BIASES = {"up_bias": 7, "down_bias": 14, "gate_bias": 21}
NBITS_INPUTS = 22


def _nbits_attrs(
    heavy_bits, light_bits, heavy_block_size, light_block_size, accuracy_level, heavy=True
) -> None:
    if heavy_bits not in (4, 8, 32):
        raise FormatError(f"FusedFFNNBits heavy_bits={heavy_bits!r} is not supported; use 4, 8 or 32 (dense)")
    if light_bits not in (4, 8):
        raise FormatError(f"FusedFFNNBits light_bits={light_bits!r} is not supported; use 4 or 8")
    for name, bits, bs in (
        ("heavy_block_size", heavy_bits, heavy_block_size),
        ("light_block_size", light_bits, light_block_size),
    ):
        if bits != 32 and bs not in NBITS_BLOCK_SIZES and (heavy or name == "light_block_size"):
            raise FormatError(f"FusedFFNNBits {name}={bs!r} is not supported; use one of {NBITS_BLOCK_SIZES}")
    if accuracy_level not in (0, 4):
        raise FormatError(
            f"FusedFFNNBits accuracy_level={accuracy_level!r} is not supported; use 0 (exact) or 4 (int8 activations)"
        )


def _nbits_weight(part, name: str, n: int | None, k: int, bits: int, block_size: int) -> np.ndarray:
    """The float32 W [N, K] of one part (3 arrays, absent = None), shapes checked."""
    from ..formats import packing

    b, scales, zp = part
    if b is None:
        raise FormatError(f"FusedFFNNBits {name} B is absent; it is required (it may have N = 0 rows)")
    b = np.asarray(b)
    if bits == 32:
        if scales is not None or zp is not None:
            raise FormatError(
                f"FusedFFNNBits {name}: a dense float32 part (bits 32) has no scales / zero_points"
            )
        if b.dtype != np.float32 or b.ndim != 2 or b.shape[1] != k or (n is not None and b.shape[0] != n):
            want = f"[{'N' if n is None else n}, {k}]"
            raise FormatError(
                f"FusedFFNNBits {name} (bits 32) must be float32 {want}, got {b.dtype} {b.shape}"
            )
        return b
    nb = -(-k // block_size)
    blob = block_size * bits // 8
    rows = b.shape[0] if b.ndim == 3 else -1
    if b.dtype != np.uint8 or b.ndim != 3 or b.shape[1:] != (nb, blob) or (n is not None and rows != n):
        want = f"[{'N' if n is None else n}, {nb}, {blob}]"
        raise FormatError(
            f"FusedFFNNBits {name} B must be uint8 {want} (K={k}, bits={bits}, block_size={block_size}), "
            f"got {b.dtype} {b.shape}"
        )
    if scales is None:
        raise FormatError(
            f"FusedFFNNBits {name} scales are absent; a {bits}-bit part needs float32 [N * n_blocks]"
        )
    scales = np.asarray(scales)
    if scales.dtype != np.float32 or scales.shape != (rows * nb,):
        raise FormatError(
            f"FusedFFNNBits {name} scales must be float32 [{rows * nb}] (N * n_blocks), got {scales.dtype} {scales.shape}"
        )
    if zp is not None:
        zp = np.asarray(zp)
        per_row = -(-nb * bits // 8)
        if zp.dtype != np.uint8 or zp.shape != (rows * per_row,):
            raise FormatError(
                f"FusedFFNNBits {name} zero_points must be uint8 [{rows * per_row}] (N * ceil(n_blocks * bits / 8), "
                f"packed like B), got {zp.dtype} {zp.shape}; omit them for the symmetric grid"
            )
    with np.errstate(all="ignore"):
        return packing.dequantize_matmulnbits(packing.NBits(b, scales, k, bits, block_size, zp))


def _dense64(x2: np.ndarray, w: np.ndarray) -> np.ndarray:
    """f32(x2 @ w.T) in float64, dense IEEE semantics (0 * inf = NaN)."""
    with np.errstate(all="ignore"):
        y = x2.astype(np.float64) @ w.astype(np.float64).T
        # BLAS may skip zero terms: recompute non-finite rows / columns term by term
        bad_r = ~np.isfinite(x2).all(axis=1) if x2.size else np.zeros(x2.shape[0], bool)
        bad_c = ~np.isfinite(w).all(axis=1) if w.size else np.zeros(w.shape[0], bool)
        if bad_r.any() or bad_c.any():
            x64, w64 = x2.astype(np.float64), w.astype(np.float64)
            for r in np.flatnonzero(bad_r):
                y[r] = (x64[r][None, :] * w64).sum(axis=1)
            for c in np.flatnonzero(bad_c):
                y[:, c] = (x64 * w64[c][None, :]).sum(axis=1)
        return y.astype(np.float32)


def check_input_threshold(input_threshold, gated: int, skip: int) -> float:
    """The ``input_threshold`` attribute as float32 (finite, >= 0; > 0 only with gated=0, skip=1)."""
    t = np.float32(input_threshold)
    if not np.isfinite(t) or t < 0:
        raise FormatError(f"FusedFFNNBits input_threshold={input_threshold!r} must be a finite float >= 0")
    if t > 0 and (gated or skip != 1):
        raise FormatError(
            f"FusedFFNNBits input_threshold={input_threshold!r} needs gated=0 and skip=1 (it skips the "
            "input channels of an ungated FFN's light up projection); set input_threshold=0 otherwise"
        )
    return float(t)


def zero_silent_channels(x2: np.ndarray, input_threshold: float) -> np.ndarray:
    """X' of :data:`NBITS_SEMANTICS`: ``x2`` with every |x| <= input_threshold set to 0 (NaN kept)."""
    t = np.float32(input_threshold)
    if t <= 0:
        return x2
    return np.where(np.abs(x2) <= t, np.float32(0), x2).astype(np.float32)


def fused_ffn_nbits_reference(
    x,
    *inputs,
    activation_kind: str = "relu",
    gated: int = 0,
    skip: int = 0,
    threshold: float = 0.0,
    product_threshold: float = 0.0,
    input_threshold: float = 0.0,
    heavy_bits: int = 32,
    light_bits: int = 4,
    heavy_block_size: int | None = None,
    light_block_size: int = 32,
    accuracy_level: int = 0,
    return_skipped: bool = False,
):
    """NumPy reference of ``ffsplit::FusedFFNNBits`` (:data:`NBITS_SEMANTICS`, accuracy_level 0
    semantics at both levels). ``inputs``: the 21 inputs after X, None where absent (trailing
    absent ones may be left off). ``return_skipped``: also return the bool [M, L] of skipped light
    neurons (all False with skip=0)."""
    if activation_kind not in ACTIVATIONS:
        raise FormatError(
            f"FusedFFNNBits activation {activation_kind!r} is not supported; use one of {ACTIVATIONS}"
        )
    if gated not in (0, 1) or skip not in (0, 1):
        raise FormatError(f"FusedFFNNBits gated={gated} skip={skip}: both must be 0 or 1")
    t = np.float32(check_threshold(threshold, skip))
    pt = np.float32(check_product_threshold(product_threshold, skip, gated))
    t_in = check_input_threshold(input_threshold, gated, skip)
    if len(inputs) > NBITS_INPUTS - 1:
        raise FormatError(f"FusedFFNNBits takes at most {NBITS_INPUTS} inputs, got {len(inputs) + 1}")
    ins = list(inputs) + [None] * (NBITS_INPUTS - 1 - len(inputs))
    # heavy_block_size matters only when there is a heavy part (H > 0) of 4 or 8 bits
    _nbits_attrs(
        heavy_bits, light_bits, heavy_block_size, light_block_size, accuracy_level, ins[0] is not None
    )
    x = np.asarray(x)
    if x.dtype != np.float32 or x.ndim < 1:
        raise FormatError(f"FusedFFNNBits X must be float32 of rank >= 1, got {x.dtype} rank {x.ndim}")

    if not gated and any(ins[i - 1] is not None for i in range(15, 22)):
        raise FormatError("FusedFFNNBits with gated=0 takes no gate inputs (15-21); set gated=1 or drop them")
    # D from down light (rows), L from up light (rows), H from up heavy (absent: 0)
    if ins[NBITS_PARTS["down_light"] - 1] is None or ins[NBITS_PARTS["up_light"] - 1] is None:
        raise FormatError("FusedFFNNBits needs the up light and down light parts (inputs 4 and 11)")
    d = x.shape[-1]
    heavy_present = ins[NBITS_PARTS["up_heavy"] - 1] is not None
    h = np.asarray(ins[NBITS_PARTS["up_heavy"] - 1]).shape[0] if heavy_present else 0
    kinds = dict(heavy_bits=heavy_bits, light_bits=light_bits, light_block_size=light_block_size, h=h,
                 heavy_block_size=heavy_block_size if heavy_bits != 32 else 0)  # fmt: skip
    a, skipped = nbits_up_phase(
        x.reshape(-1, d), ins, activation_kind=activation_kind, gated=gated, skip=skip, thresholds=(t, pt, t_in),
        **kinds,
    )  # fmt: skip
    y = nbits_down_phase(a, skipped, ins, d=d, **kinds)
    y = y.reshape(*x.shape[:-1], d).astype(np.float32)
    return (y, skipped) if return_skipped else y


def _nbits_part(ins: list, name: str) -> list:
    i = NBITS_PARTS[name] - 1
    return ins[i : i + 3]


def nbits_up_phase(
    x2, ins, *, activation_kind, gated, skip, thresholds, h, heavy_bits, heavy_block_size, light_bits,
    light_block_size,
):  # fmt: skip
    """Phase 1 of :func:`fused_ffn_nbits_reference` on X [M, D] (attributes already checked):
    (a float32 [M, H + L] with the skipped light neurons' a set to 0, skipped bool [M, L]).
    ``thresholds``: (threshold, product_threshold, input_threshold); ``ins``: inputs 1..21."""
    t, pt, t_in = (np.float32(v) for v in thresholds)
    d = x2.shape[1]
    heavy_present = ins[NBITS_PARTS["up_heavy"] - 1] is not None

    def project(prefix):
        wl = _nbits_weight(_nbits_part(ins, f"{prefix}_light"), f"{prefix} light", None, d, light_bits,
                           light_block_size)  # fmt: skip
        if heavy_present:
            wh = _nbits_weight(_nbits_part(ins, f"{prefix}_heavy"), f"{prefix} heavy", h, d, heavy_bits,
                               heavy_block_size)  # fmt: skip
        else:
            if any(p is not None for p in _nbits_part(ins, f"{prefix}_heavy")):
                raise FormatError(f"FusedFFNNBits {prefix} heavy is given but up heavy is absent (H = 0)")
            wh = np.zeros((0, d), np.float32)
        xl = zero_silent_channels(x2, t_in) if prefix == "up" else x2
        y = np.concatenate([_dense64(x2, wh), _dense64(xl, wl)], axis=1)
        bias = ins[NBITS_BIASES[f"{prefix}_bias"] - 1]
        if bias is not None:
            with np.errstate(all="ignore"):
                y = y + _bias(bias, y.shape[1], f"{prefix}_bias")
        return y

    u = project("up")
    f = u.shape[1]
    if gated:
        g = project("gate")
        if g.shape[1] != f:
            raise FormatError(f"FusedFFNNBits gate has {g.shape[1]} neurons, up has {f}")
        s = activation(activation_kind, g).astype(np.float32)
        with np.errstate(all="ignore"):
            a = s * u
    else:
        a = s = activation(activation_kind, u).astype(np.float32)
    skipped = np.zeros((a.shape[0], f - h), bool)
    if skip:
        skipped = a[:, h:] == 0
        if t > 0:
            skipped |= np.abs(s[:, h:]) <= t
        if pt > 0:
            skipped |= np.abs(a[:, h:]) <= pt
    a = a.copy()
    a[:, h:][skipped] = 0
    return a, skipped


def nbits_down_phase(
    a, skipped, ins, *, d, h, heavy_bits, heavy_block_size, light_bits, light_block_size
) -> np.ndarray:
    """Phase 2 of :func:`fused_ffn_nbits_reference`: Y float32 [M, D] from ``a`` [M, H + L] and the
    skipped light neurons (bool [M, L]; their down columns are not read); ``ins``: inputs 1..21."""
    l_ = a.shape[1] - h
    heavy_present = ins[NBITS_PARTS["up_heavy"] - 1] is not None or h > 0
    wdl = _nbits_weight(_nbits_part(ins, "down_light"), "down light", d, l_, light_bits, light_block_size)
    if heavy_present:
        wdh = _nbits_weight(_nbits_part(ins, "down_heavy"), "down heavy", d, h, heavy_bits, heavy_block_size)
    else:
        if any(p is not None for p in _nbits_part(ins, "down_heavy")):
            raise FormatError("FusedFFNNBits down heavy is given but up heavy is absent (H = 0)")
        wdh = np.zeros((d, 0), np.float32)
    yh = _dense64(a[:, :h], wdh)
    a_l = a[:, h:].astype(np.float64)
    w64 = wdl.astype(np.float64)
    yl = np.empty((a.shape[0], d), np.float32)
    with np.errstate(all="ignore"):
        for r in range(a.shape[0]):
            use = ~skipped[r]
            yl[r] = (w64[:, use] * a_l[r, use][None, :]).sum(axis=1).astype(np.float32)
        y = yh + yl
        bias = ins[NBITS_BIASES["down_bias"] - 1]
        if bias is not None:
            y = y + _bias(bias, d, "down_bias")
    return y.astype(np.float32)


def nbits_schema() -> defs.OpSchema:
    P = defs.OpSchema.FormalParameter
    opt = defs.OpSchema.FormalParameterOption.Optional
    names = ["X"]
    for prefix in ("up", "down"):
        for kind in ("heavy", "light"):
            names += [f"{prefix}_{kind}_B", f"{prefix}_{kind}_scales", f"{prefix}_{kind}_zero_points"]
        names.append(f"{prefix}_bias")
    for kind in ("heavy", "light"):
        names += [f"gate_{kind}_B", f"gate_{kind}_scales", f"gate_{kind}_zero_points"]
    names.append("gate_bias")
    required = {"X", "up_light_B", "up_light_scales", "down_light_B", "down_light_scales"}

    def kind(n: str) -> str:
        if n == "X" or n.endswith("bias"):
            return "T"
        if n.endswith("_B"):
            return "W"
        return "tensor(float)" if n.endswith("scales") else "tensor(uint8)"

    inputs = [
        P(n, kind(n), n) if n in required else P(n, kind(n), n + " (optional)", param_option=opt)
        for n in names
    ]
    A = defs.OpSchema.Attribute
    INT, FLOAT, STR = defs.OpSchema.AttrType.INT, defs.OpSchema.AttrType.FLOAT, defs.OpSchema.AttrType.STRING
    from ._spec import DOMAIN, VERSION

    return defs.OpSchema(
        "FusedFFNNBits",
        DOMAIN,
        VERSION,
        inputs=inputs,
        outputs=[P("Y", "T", "[..., D]")],
        type_constraints=[
            ("T", ["tensor(float)"], "float32"),
            (
                "W",
                ["tensor(uint8)", "tensor(float)"],
                "uint8 packed codes, or float32 for a dense (bits 32) part",
            ),
        ],
        doc=NBITS_DOC + "\n\n" + NBITS_SEMANTICS,
        attributes=[
            A("heavy_bits", INT, "4 | 8 | 32 (dense float32)", required=True),
            A("light_bits", INT, "4 | 8", required=True),
            A("heavy_block_size", INT, "16..256, a power of two (unused for heavy_bits 32)", required=False),
            A("light_block_size", INT, "16..256, a power of two", required=True),
            A("activation", STR, "relu | gelu | gelu_tanh | silu", required=True),
            A("gated", INT, "1: act(gate) * up", required=False),
            A(
                "skip",
                INT,
                "1: skip light neurons whose activation is 0 (or below threshold)",
                required=False,
            ),
            A(
                "threshold",
                FLOAT,
                "with skip=1: also skip light neurons with |act(gate)| / |act(up)| <= threshold",
                required=False,
            ),
            A(
                "product_threshold",
                FLOAT,
                "gated, with skip=1: also skip light neurons with |act(gate) * up| <= product_threshold",
                required=False,
            ),
            A(
                "input_threshold",
                FLOAT,
                "gated=0, skip=1: the light up projection sees X with every |x| <= input_threshold set to 0",
                required=False,
            ),
            A(
                "accuracy_level",
                INT,
                "0 (exact float32) | 4 (int8 activations, as MatMulNBits)",
                required=False,
            ),
        ],
    )


def nbits_reference_op_class(domain: str):
    from onnx.reference.op_run import OpRun

    def _run(
        self,
        x,
        *inputs,
        activation=None,
        gated=None,
        skip=None,
        threshold=None,
        product_threshold=None,
        input_threshold=None,
        heavy_bits=None,
        light_bits=None,
        heavy_block_size=None,
        light_block_size=None,
        accuracy_level=None,
    ):
        act = activation.decode() if isinstance(activation, bytes) else activation
        return (
            fused_ffn_nbits_reference(
                x,
                *inputs,
                activation_kind=act,
                gated=int(gated or 0),
                skip=int(skip or 0),
                threshold=float(threshold or 0.0),
                product_threshold=float(product_threshold or 0.0),
                input_threshold=float(input_threshold or 0.0),
                heavy_bits=heavy_bits,
                light_bits=light_bits,
                heavy_block_size=heavy_block_size,
                light_block_size=light_block_size,
                accuracy_level=int(accuracy_level or 0),
            ),
        )

    return type("FusedFFNNBits", (OpRun,), {"op_domain": domain, "_run": _run})


def pack_nbits_part(w: np.ndarray, bits: int, block_size: int, zero_points: bool) -> list[np.ndarray | None]:
    """MatMulNBits inputs (B, scales, zero_points or None) of ``w`` [N, K] (bits 32: [w, None, None]).

    int8 symmetric: per channel scale (as formats/nbits.py stores it), int4 symmetric per block;
    with ``zero_points``: the asymmetric grid per block (:func:`packing.asymmetric_params`)."""
    from ..formats import packing

    w = np.asarray(w, np.float32)
    if bits == 32:
        return [w.copy(), None, None]
    if not zero_points:
        if bits == 8:
            q, s = packing.quantize_int8_per_channel(w)
        else:
            q, s = packing.quantize_int4_groupwise(w, block_size)
        p = packing.pack_matmulnbits(q, s, bits, block_size)
        return [p.b, p.scales, None]
    n, k = w.shape
    nb = -(-k // block_size)
    padded = np.zeros((n, nb * block_size), np.float32)
    padded[:, :k] = w
    g = padded.reshape(n, nb, block_size)
    s, z = packing.asymmetric_params(g, bits)
    top = (1 << bits) - 1
    u = np.clip(np.rint(g / s[:, :, None]) + z[:, :, None], 0, top).astype(np.uint8).reshape(n, -1)[:, :k]
    p = packing.pack_matmulnbits(u, s, bits, block_size, z)
    return [p.b, p.scales, p.zero_points]


def random_nbits_ffn_inputs(
    rng: np.random.Generator,
    d: int,
    f: int,
    h: int,
    *,
    heavy_bits: int,
    light_bits: int,
    heavy_block_size: int,
    light_block_size: int,
    zero_points: bool,
    gated: bool,
    bias: bool = True,
) -> list[np.ndarray | None]:
    """Random FusedFFNNBits inputs 1..21 (None where absent) with the given part kinds."""
    lt = f - h

    def w(n, k):
        return (rng.standard_normal((n, k)) / np.sqrt(max(k, 1))).astype(np.float32)

    def heavy(n, k):
        if h == 0:
            return [None, None, None]
        return pack_nbits_part(w(n, k), heavy_bits, heavy_block_size, zero_points and heavy_bits != 32)

    def light(n, k):
        return pack_nbits_part(w(n, k), light_bits, light_block_size, zero_points)

    def b(n):
        return (0.1 * rng.standard_normal(n)).astype(np.float32) if bias else None

    out = [*heavy(h, d), *light(lt, d), b(f), *heavy(d, h), *light(d, lt), b(d)]
    if gated:
        out += [*heavy(h, d), *light(lt, d), b(f)]
    return out


def fused_ffn_nbits_model(inputs: list, **attrs):
    """A one-node ONNX model ``Y = FusedFFNNBits(X, *inputs)`` (None = absent input, empty name)
    with the weights as initializers; ``attrs``: the node's attributes."""
    from onnx import TensorProto, helper, numpy_helper

    from ._spec import DOMAIN, VERSION

    names = ["" if a is None else f"w{i + 1}" for i, a in enumerate(inputs)]
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node("FusedFFNNBits", ["X", *names], ["Y"], domain=DOMAIN, **attrs)
    graph = helper.make_graph(
        [node],
        "fused_ffn_nbits",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(a, n) for a, n in zip(inputs, names) if a is not None],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, VERSION)], ir_version=8
    )


def _register_nbits() -> None:
    from . import _spec

    if nbits_schema not in _spec.EXTRA_SCHEMAS:
        _spec.EXTRA_SCHEMAS.append(nbits_schema)
        _spec.EXTRA_REFERENCE_OPS.append(nbits_reference_op_class)


_register_nbits()


def stock_nbits_ffn_model(inputs: list, *, accuracy_level: int = 0, **attrs):
    """The same FFN as today's export writes it with stock ops (a MatMulNBits per part, or MatMul
    for a dense part; Concat, bias Add, activation, gate Mul, Slice, down MatMulNBits, Add): the
    baseline of the fused op in tests and benchmarks. ``attrs``: the FusedFFNNBits attributes
    (skip / threshold are not expressible and must be off)."""
    from onnx import TensorProto, helper, numpy_helper

    if attrs.get("skip", 0) or attrs.get("threshold", 0.0) or attrs.get("product_threshold", 0.0):
        raise FormatError("the stock FFN subgraph cannot skip neurons; use skip=0, threshold=0")
    ins = list(inputs) + [None] * (NBITS_INPUTS - 1 - len(inputs))
    act, gated = attrs["activation"], int(attrs.get("gated", 0))
    hb, lb = attrs["heavy_bits"], attrs["light_bits"]
    hbs, lbs = attrs.get("heavy_block_size"), attrs["light_block_size"]
    h = 0 if ins[0] is None else ins[0].shape[0]
    l_ = ins[3].shape[0]
    d = ins[10].shape[0]
    nodes, inits = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def matmul(x, idx, n, k, bits, bs, out):
        b, s, z = ins[idx - 1 : idx + 2]
        if bits == 32:
            nodes.append(helper.make_node("MatMul", [x, const(f"B{idx}", b.T.copy())], [out]))
            return
        names = [x, const(f"B{idx}", b), const(f"S{idx}", s)] + (
            [const(f"Z{idx}", z)] if z is not None else []
        )
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                names,
                [out],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=bits,
                block_size=bs,
                accuracy_level=accuracy_level,
            )
        )

    def project(prefix, at_h, at_l, at_b):
        if h:
            matmul("X", at_h, h, d, hb, hbs, f"{prefix}_h")
            matmul("X", at_l, l_, d, lb, lbs, f"{prefix}_l")
            nodes.append(helper.make_node("Concat", [f"{prefix}_h", f"{prefix}_l"], [f"{prefix}_0"], axis=-1))
        else:
            matmul("X", at_l, l_, d, lb, lbs, f"{prefix}_0")
        if ins[at_b - 1] is None:
            return f"{prefix}_0"
        nodes.append(
            helper.make_node("Add", [f"{prefix}_0", const(f"{prefix}_bias", ins[at_b - 1])], [prefix])
        )
        return prefix

    def act_of(v, out):
        if act == "relu":
            nodes.append(helper.make_node("Relu", [v], [out]))
        elif act == "silu":
            nodes.append(helper.make_node("Sigmoid", [v], [out + "_sig"]))
            nodes.append(helper.make_node("Mul", [v, out + "_sig"], [out]))
        else:
            approx = "tanh" if act == "gelu_tanh" else "none"
            nodes.append(
                helper.make_node("Gelu", [v], [out], domain="com.microsoft")
                if approx == "none"
                else helper.make_node("FastGelu", [v], [out], domain="com.microsoft")
            )

    u = project("up", 1, 4, 7)
    if gated:
        g = project("gate", 15, 18, 21)
        act_of(g, "act_g")
        nodes.append(helper.make_node("Mul", ["act_g", u], ["a"]))
    else:
        act_of(u, "a")
    if h:
        ax = const("axis", np.array([-1], np.int64))
        nodes.append(
            helper.make_node(
                "Slice",
                ["a", const("s0", np.array([0], np.int64)), const("sh", np.array([h], np.int64)), ax],
                ["a_h"],
            )
        )
        nodes.append(
            helper.make_node("Slice", ["a", "sh", const("sf", np.array([h + l_], np.int64)), ax], ["a_l"])
        )
        matmul("a_h", 8, d, h, hb, hbs, "y_h")
        matmul("a_l", 11, d, l_, lb, lbs, "y_l")
        nodes.append(helper.make_node("Add", ["y_h", "y_l"], ["y_0"]))
    else:
        matmul("a", 11, d, l_, lb, lbs, "y_0")
    if ins[13] is None:
        nodes.append(helper.make_node("Identity", ["y_0"], ["Y"]))
    else:
        nodes.append(helper.make_node("Add", ["y_0", const("down_bias", ins[13])], ["Y"]))
    graph = helper.make_graph(
        nodes,
        "stock_ffn",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        ir_version=8,
    )
