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
