"""One fused FFN node per split FFN (``--fused-ffn``, ``--activation-sparsity exact | F``).

:func:`fuse_ffns_` replaces each split FFN whose parts an op carries by a fused module: heavy
``fp32`` with light ``sparse-int8`` by :class:`FusedFFN` (``ffsplit::FusedFFN``); parts in the
presets' formats (heavy dense ``fp32`` or MatMulNBits ``int8`` / ``int4``, light ``int8`` / ``int4``,
symmetric or with zero points; ``fast``'s unsplit FFNs as H = 0) by :class:`FusedFFNNBits`
(``ffsplit::FusedFFNNBits``: its inputs are each part's MatMulNBits B / scales / zero_points, or
the dense float32 weight, heavy-first). Either needs an activation the op knows. Gated FFNs
(Llama, gated T5) replace their MLP module; ungated ones put the fused module at the up projection
and pass-throughs at the activation and down projection (their container also holds attention).
In PyTorch the module computes exactly what the op computes (the split modules, the activation,
and ``exact`` skipping, which changes nothing but the bytes read: a zero activation contributes
nothing). At ONNX export with ``--target ort-cpu`` it becomes one node (``--target tensorrt``:
``FusedFFNNBits`` only, split into its two plugin nodes after validation); other FFNs keep today's
subgraph and the report says why (on tensorrt that is refused).

``--activation-sparsity F`` (0 < F < 1): per FFN one threshold ``t`` on the light neurons' silence
score ``s`` (``act(gate)`` for gated FFNs, CATS-style: a skipped neuron costs neither its up row nor
its down column; ``act(up)`` otherwise, saving the down half), calibrated by
:func:`calibrate_thresholds_` as the F-quantile of ``|s|`` over the calibration tokens, so that a
fraction F of (token, light neuron) pairs is skipped on average. A light neuron with
``|s| <= t`` contributes nothing, in prefill and decode alike; heavy neurons are always computed.
The module and the op apply the same rule (the op's ``threshold`` attribute). Gated FFNs of
``FusedFFNNBits`` also take ``product_threshold`` on |act(gate) * up| (``--skip-criterion``: ``mixed``, the
default there, puts a quarter of F on the gate and the rest on the product; ``gate``; ``product``):
the product sees the up value, so it is far more accurate, and saves only the down column.

``--input-sparsity F`` (0 < F < 1; ungated FFNs carried by ``FusedFFNNBits`` only), TEAL-style:
per FFN one threshold ``t_in`` on the FFN input ``|x|``, calibrated by
:func:`calibrate_input_thresholds_` as the F-quantile of ``|x|`` over the calibration tokens; the
LIGHT up projection sees ``x`` with every channel ``|x_k| <= t_in`` set to 0 (the op then reads
only the kept channels' light up weights at decode), the heavy up the full ``x``. For an ungated
FFN a neuron's activation is known only after its up row is read, so this is what shrinks the up
half; the neuron threshold (``--activation-sparsity``) still applies after it and is calibrated
with the input skipping on. The op's ``input_threshold`` attribute.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .adapters import FFNSpec, find_ffns
from .errors import ConfigError
from .split import SplitLinear, get_module, set_module

# the model's activation names -> the op's
ACTIVATION_KINDS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}
SKIP_MODES = {"0": 0, "off": 0, "exact": 1}
SPARSE_OP = "ffsplit::FusedFFN"  # heavy fp32 + light sparse-int8 (ops/_ffn.py)
NBITS_OP = "ffsplit::FusedFFNNBits"  # dense fp32 / MatMulNBits int8 / int4 parts (the presets)


class ActivationSparsity(NamedTuple):
    """A parsed ``--activation-sparsity``: the op's skip mode and the calibrated fraction (0 = none)."""

    skip: int  # 0 off, 1 skip (exact zeros, and |s| <= threshold when fraction > 0)
    fraction: float  # target fraction of light neurons skipped per token (calibrated thresholds)

    @property
    def label(self) -> str | float:
        """What the manifest records: 0, ``"exact"`` or the fraction."""
        return self.fraction if self.fraction > 0 else ("exact" if self.skip else 0)


def parse_activation_sparsity(value) -> ActivationSparsity:
    """``--activation-sparsity``: 0 / off, ``exact`` (skip exact zeros) or a fraction 0 < F < 1 of light
    neurons to skip per token (thresholds calibrated per layer)."""
    key = str(value).strip().lower()
    if key in SKIP_MODES:
        return ActivationSparsity(SKIP_MODES[key], 0.0)
    fix = (
        "use 0 (off), 'exact' (skip light neurons whose activation is exactly zero; ReLU models) or a "
        "fraction 0 < F < 1 of light neurons to skip per token, e.g. 0.4"
    )
    try:
        frac = float(key)
    except ValueError:
        raise ConfigError(f"--activation-sparsity={value!r} is not a number or 'exact'; {fix}") from None
    if frac == 0.0:
        return ActivationSparsity(0, 0.0)
    if not (0.0 < frac < 1.0):  # also NaN
        raise ConfigError(f"--activation-sparsity={value!r} is out of range; {fix}")
    return ActivationSparsity(1, frac)


def parse_input_sparsity(value) -> float:
    """``--input-sparsity``: 0 (off) or a fraction 0 < F < 1 of the FFN input's channels whose light
    up weights are skipped per token (ungated FFNs; thresholds on |x| calibrated per layer)."""
    fix = (
        "use 0 (off) or a fraction 0 < F < 1 of the input channels of ungated FFNs (MPT, Whisper, GPT-2, "
        "OPT, T5 v1.0) to skip per token, e.g. 0.4"
    )
    key = str(value).strip().lower()
    if key == "off":
        return 0.0
    try:
        frac = float(key)
    except ValueError:
        raise ConfigError(f"--input-sparsity={value!r} is not a number; {fix}") from None
    if frac == 0.0:
        return 0.0
    if not (0.0 < frac < 1.0):  # also NaN
        raise ConfigError(f"--input-sparsity={value!r} is out of range; {fix}")
    return frac


class Passthrough(nn.Module):
    """Identity in place of an activation / down projection that the fused module already applied."""

    @property
    def weight(self) -> torch.Tensor:  # T5 probes wo.weight.dtype
        return torch.empty(0, dtype=torch.float32)

    def forward(self, x, *args, **kwargs):  # noqa: ARG002
        return x


def _act(kind: str, v: torch.Tensor) -> torch.Tensor:
    if kind == "relu":
        return F.relu(v)
    if kind == "gelu":
        return F.gelu(v)
    if kind == "gelu_tanh":
        return F.gelu(v, approximate="tanh")
    return F.silu(v)


def _linear(m, x: torch.Tensor) -> torch.Tensor:
    y = F.linear(x, m.dense_weight().to(x.dtype))
    return y if m.bias is None else y + m.bias.to(y.dtype)


def _split_apply(p: SplitLinear, x: torch.Tensor) -> torch.Tensor:
    """:meth:`SplitLinear.forward` with each part's decoded weight (the same float32 arithmetic)."""
    if p.mode == "out":
        outs = [_linear(m, x) for m in p.parts()]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    if p.heavy is not None and p.light is not None:
        y = _linear(p.heavy, x[..., : p.n_heavy]) + _linear(p.light, x[..., p.n_heavy :])
    else:
        y = _linear(p.parts()[0], x)
    return y if p.bias is None else y + p.bias


class FusedFFN(nn.Module):
    """``down(act(gate(x)) * up(x))`` or ``down(act(up(x)))`` over split projections, as one op."""

    def __init__(
        self,
        up: SplitLinear,
        down: SplitLinear,
        gate: SplitLinear | None,
        kind: str,
        skip: int,
        threshold: float = 0.0,
        name: str = "",
    ):
        super().__init__()
        self.up, self.down, self.gate = up, down, gate
        self.kind, self.skip, self.name = kind, int(skip), name
        self.threshold = 0.0
        self.product_threshold = 0.0  # FusedFFNNBits, gated: skip light neurons with |act(gate) * up| <= it
        self.set_threshold(threshold)
        self.input_threshold = 0.0  # FusedFFNNBits only (set_input_threshold)
        self._recorder = None  # calibrate_thresholds_: called with the light silence scores
        self._input_recorder = None  # calibrate_input_thresholds_: called with the FFN input

    def set_threshold(self, threshold: float) -> None:
        """The op's ``threshold`` attribute, rounded to float32 as the node stores it."""
        from .errors import FormatError
        from .ops._ffn import check_threshold

        try:
            self.threshold = check_threshold(threshold, self.skip)
        except FormatError as e:
            raise ConfigError(f"FFN {self.name or '?'}: {e}") from e

    def set_product_threshold(self, threshold: float) -> None:
        """The op's ``product_threshold`` attribute (``FusedFFNNBits``, gated), rounded to float32."""
        from .errors import FormatError
        from .ops._ffn import check_product_threshold

        if threshold > 0 and type(self) is FusedFFN:
            raise ConfigError(
                f"FFN {self.name or '?'}: ffsplit::FusedFFN (light sparse-int8) decides on |act(gate)| only; "
                "use --skip-criterion gate, or the presets' formats (ffsplit::FusedFFNNBits)"
            )
        try:
            self.product_threshold = check_product_threshold(threshold, self.skip, int(self.gate is not None))
        except FormatError as e:
            raise ConfigError(f"FFN {self.name or '?'}: {e}") from e

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ARG002
        if torch.onnx.is_in_onnx_export():
            return _FusedFn.apply(x, self)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """What the split modules compute (their non-export arithmetic, so it also runs under the
        exporter's tracer without nesting their custom-op functions)."""
        if self._input_recorder is not None:
            self._input_recorder(self, x)
        u = self._up(x)
        pre = _split_apply(self.gate, x) if self.gate is not None else u
        s = _act(self.kind, pre)
        a = s * u if self.gate is not None else s
        if self._recorder is None and self.threshold <= 0 and self.product_threshold <= 0:
            return _split_apply(self.down, a)
        h = self.up.n_heavy
        # the silence score as the op computes it: the activation in float64, rounded to float32
        s_signed = _act(self.kind, pre[..., h:].double()).float()
        s_light = s_signed.abs()
        if self._recorder is not None:
            self._recorder(self, s_light, a[..., h:])
        if self.threshold > 0 or self.product_threshold > 0:
            quiet = (
                s_light <= self.threshold
                if self.threshold > 0
                else torch.zeros_like(s_light, dtype=torch.bool)
            )
            if self.product_threshold > 0:  # |act(gate) * up| in float32 from that activation, as the op
                quiet = quiet | ((s_signed * u[..., h:]).abs() <= self.product_threshold)
            a_light = torch.where(quiet, torch.zeros_like(a[..., h:]), a[..., h:])
            a = torch.cat([a[..., :h], a_light], dim=-1)
        return _split_apply(self.down, a)

    def _up(self, x: torch.Tensor) -> torch.Tensor:
        """The up projection; with ``input_threshold`` > 0 the light part sees x' (every channel with
        |x| <= input_threshold zeroed), the heavy part the full x (the op's semantics)."""
        t = self.input_threshold
        if t <= 0:
            return _split_apply(self.up, x)
        xl = torch.where(x.abs() <= t, torch.zeros_like(x), x)
        outs = [_linear(self.up.heavy, x)] if self.up.heavy is not None else []
        outs.append(_linear(self.up.light, xl))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def onnx_inputs(self) -> list[torch.Tensor]:
        """Inputs 1.. of the node (heavy-first neuron order of :mod:`ffsplit_export.split`)."""
        d, h = self.up_in_features(), self.up.n_heavy
        out = self._proj(self.up, d, h)
        out += [self._heavy_w(self.down.heavy, d, h), *self._light(self.down.light, d, self._n_light())]
        out.append(self.down.bias if self.down.bias is not None else torch.zeros(d))
        if self.gate is not None:
            out += self._proj(self.gate, d, h)
        return [t.detach().contiguous() for t in out]

    def up_in_features(self) -> int:
        for p in self.up.parts():
            return p.in_features
        raise ConfigError("a split FFN without heavy or light part cannot be fused")

    def _n_light(self) -> int:
        return 0 if self.up.light is None else self.up.light.out_features

    def _proj(self, p: SplitLinear, d: int, h: int) -> list[torch.Tensor]:
        nl = self._n_light()
        hb = p.heavy.bias if p.heavy is not None and p.heavy.bias is not None else torch.zeros(h)
        lb = p.light.bias if p.light is not None and p.light.bias is not None else torch.zeros(nl)
        return [self._heavy_w(p.heavy, h, d), torch.cat([hb, lb]).float(), *self._light(p.light, nl, d)]

    @staticmethod
    def _heavy_w(m, rows: int, cols: int) -> torch.Tensor:
        return m.dense_weight() if m is not None else torch.zeros(rows, cols)

    @staticmethod
    def _light(m, rows: int, cols: int) -> list[torch.Tensor]:
        if m is not None:
            return [m.mask, m.values, m.row_ptr, m.scales]
        return [
            torch.zeros(rows, (cols + 7) // 8, dtype=torch.uint8),
            torch.zeros(0, dtype=torch.int8),
            torch.zeros(rows + 1, dtype=torch.int64),
            torch.ones(rows),
        ]


class _FusedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):  # noqa: ARG004
        # the node's value: computed untraced (the tracer records this function as one op; the
        # module's parameters are not inputs of it, so tracing its inside would fail)
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            return module.reference(x)
        finally:
            torch._C._set_tracing_state(state)

    @staticmethod
    def symbolic(g, x, module):
        from .formats._module import _pin_shape

        consts = [g.op("Constant", value_t=t) for t in module.onnx_inputs()]
        y = g.op(
            "ffsplit::FusedFFN",
            x,
            *consts,
            activation_s=module.kind,
            gated_i=int(module.gate is not None),
            skip_i=module.skip,
            **({"threshold_f": module.threshold} if module.threshold > 0 else {}),
        )
        try:  # element type and rank of X; the sizes come from the pinning Reshape
            y.setType(x.type().with_sizes([None] * x.type().dim()))
        except RuntimeError:
            y.setType(x.type())
        return _pin_shape(g, x, y, module.up_in_features())


class FusedFFNNBits(FusedFFN):
    """The split FFN of the presets (parts dense float32 or MatMulNBits int8 / int4) as one
    ``ffsplit::FusedFFNNBits`` node (contract: the node's 22 inputs, heavy-first neurons).

    The PyTorch forward is :meth:`FusedFFN.reference`: each part's decoded weight (the
    MatMulNBits dequantization), float32 products, the activation, and light neurons with
    ``|s| <= threshold`` contributing nothing -- the op's accuracy_level 0 semantics.
    """

    op_type = NBITS_OP

    def __init__(self, up, down, gate, kind, skip, threshold=0.0, name=""):
        super().__init__(up, down, gate, kind, skip, threshold, name)
        projs = [p for p in (up, down, gate) if p is not None]
        heavy = {nbits_kind(p.heavy) for p in projs if p.heavy is not None}
        light = {nbits_kind(p.light) for p in projs if p.light is not None}
        if len(heavy) > 1 or len(light) != 1 or None in heavy | light:
            raise ConfigError(
                f"FFN {name or '?'}: parts of kinds heavy {heavy} / light {light}; the op takes one each"
            )
        self.light_kind = next(iter(light))
        self.heavy_kind = next(iter(heavy)) if heavy else None  # None: H = 0 (no heavy part)
        if self.light_kind[0] == 32:
            raise ConfigError(f"FFN {name or '?'}: a dense light part; the op takes int8 / int4")

    def set_input_threshold(self, input_threshold: float) -> None:
        """The op's ``input_threshold`` attribute (float32; > 0 only ungated with skip=1)."""
        from .errors import FormatError
        from .ops._ffn import check_input_threshold

        try:
            self.input_threshold = check_input_threshold(
                input_threshold, int(self.gate is not None), self.skip
            )
        except FormatError as e:
            raise ConfigError(f"FFN {self.name or '?'}: {e}") from e

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ARG002
        if torch.onnx.is_in_onnx_export():
            return _FusedNBitsFn.apply(x, self)
        return self.reference(x)

    def attributes(self, accuracy_level: int = 0) -> dict:
        """The node's attributes (``accuracy_level`` 4 stays 4, any other level is 0: the op has
        exact float32 products and MatMulNBits' int8-activation level)."""
        lb, lblock = self.light_kind
        hb, hblock = self.heavy_kind if self.heavy_kind is not None else (32, lblock)
        return {
            "heavy_bits": hb,
            # ignored for bits 32; a valid block size all the same
            "heavy_block_size": hblock if hb != 32 else lblock,
            "light_bits": lb,
            "light_block_size": lblock,
            "activation": self.kind,
            "gated": int(self.gate is not None),
            "skip": self.skip,
            "threshold": float(self.threshold),
            "product_threshold": float(self.product_threshold),
            "input_threshold": float(self.input_threshold),
            "accuracy_level": 4 if int(accuracy_level) == 4 else 0,
        }

    @staticmethod
    def _part(m) -> list[torch.Tensor | None]:
        """(B, scales, zero_points) of one part; None for an absent input."""
        if m is None:
            return [None, None, None]
        if nbits_kind(m)[0] == 32:
            return [m.dense_weight().float(), None, None]
        zp = m.zero_points if m.asymmetric else None
        return [m.qweight, m.scales.reshape(-1).float(), zp]

    @staticmethod
    def _bias(*biases_and_sizes) -> torch.Tensor | None:
        """Concatenation of optional biases (zeros where one is absent); None when all are."""
        if all(b is None for b, _ in biases_and_sizes):
            return None
        return torch.cat(
            [b.detach().float() if b is not None else torch.zeros(n) for b, n in biases_and_sizes]
        )

    def onnx_inputs(self) -> list[torch.Tensor | None]:
        """Inputs 1..21 of the node, in the contract's order (None = absent)."""
        h, nl, d = self.up.n_heavy, self._n_light(), self.up_in_features()
        up, down, gate = self.up, self.down, self.gate

        def out_bias(p):
            return self._bias(
                (p.heavy.bias if p.heavy is not None else None, h),
                (p.light.bias if p.light is not None else None, nl),
            )

        # the "in" projection adds its own bias and each part's (SplitLinear.forward)
        down_biases = [b for b in (down.bias, *(q.bias for q in down.parts())) if b is not None]
        down_bias = torch.stack([b.detach().float() for b in down_biases]).sum(0) if down_biases else None
        out = [*self._part(up.heavy), *self._part(up.light), out_bias(up)]
        out += [*self._part(down.heavy), *self._part(down.light), down_bias]
        if gate is not None:
            out += [*self._part(gate.heavy), *self._part(gate.light), out_bias(gate)]
        else:
            out += [None] * 7
        assert len(out) == 21 and d > 0
        return [None if t is None else t.detach().contiguous() for t in out]


def _absent(g):
    """An absent optional input: a None constant, which the exporter writes as the empty name."""
    v = g.op("prim::Constant")
    v.setType(torch._C.NoneType.get())
    return v


class _FusedNBitsFn(_FusedFn):
    """:class:`_FusedFn`'s untraced value, emitted as one ``ffsplit::FusedFFNNBits`` node."""

    @staticmethod
    def symbolic(g, x, module):
        from .formats._module import _pin_shape, nbits_accuracy_level

        ins = [_absent(g) if t is None else g.op("Constant", value_t=t) for t in module.onnx_inputs()]
        attrs = module.attributes(nbits_accuracy_level())
        y = g.op(
            NBITS_OP,
            x,
            *ins,
            heavy_bits_i=attrs["heavy_bits"],
            heavy_block_size_i=attrs["heavy_block_size"],
            light_bits_i=attrs["light_bits"],
            light_block_size_i=attrs["light_block_size"],
            activation_s=attrs["activation"],
            gated_i=attrs["gated"],
            skip_i=attrs["skip"],
            accuracy_level_i=attrs["accuracy_level"],
            **({"threshold_f": attrs["threshold"]} if attrs["threshold"] > 0 else {}),
            **({"product_threshold_f": attrs["product_threshold"]} if attrs["product_threshold"] > 0 else {}),
            **({"input_threshold_f": attrs["input_threshold"]} if attrs["input_threshold"] > 0 else {}),
        )
        try:
            y.setType(x.type().with_sizes([None] * x.type().dim()))
        except RuntimeError:
            y.setType(x.type())
        return _pin_shape(g, x, y, module.up_in_features())


def why_not_fusable(model: nn.Module, spec: FFNSpec) -> str | None:
    """None when an op carries this FFN (``FusedFFN`` or ``FusedFFNNBits``), else the reason it
    keeps today's subgraph."""
    op, reason = fused_op_for(model, spec)
    return None if op is not None else reason


def _common(spec: FFNSpec, model: nn.Module) -> str | None:
    kind = ACTIVATION_KINDS.get(spec.activation)
    if kind is None:
        return f"activation {spec.activation!r} (the op has {sorted(set(ACTIVATION_KINDS.values()))})"
    if spec.gate is None and spec.act_module is None:
        return "the adapter names no activation module for this ungated FFN"
    for path in spec.projections:
        if not isinstance(get_module(model, path), SplitLinear):
            return f"{path} is not split"
    return None


def _why_not_sparse(model: nn.Module, spec: FFNSpec) -> str | None:
    """``ffsplit::FusedFFN``: heavy fp32, light sparse-int8."""
    for path in spec.projections:
        m = get_module(model, path)
        if m.heavy is not None and m.heavy.format_name != "fp32":
            return f"heavy format {m.heavy.format_name} (the op takes fp32)"
        if m.light is not None and getattr(m.light, "op_type", None) != "SparseMatMulInt8":
            return f"light format {m.light.format_name} (the op takes sparse-int8)"
    return None


def nbits_kind(m: nn.Module | None) -> tuple[int, int] | None:
    """``(bits, block_size)`` of a part ``FusedFFNNBits`` carries: the dense float32 format
    ``(32, 0)`` or MatMulNBits int8 / int4; None for any other module."""
    from .formats.dense import DenseLinear
    from .formats.nbits import NBitsLinear

    if type(m) is NBitsLinear and m.bits in (4, 8):  # not its subclasses (other layouts)
        return (int(m.bits), int(m.block_size))
    if isinstance(m, DenseLinear) and m.format_name == "fp32":
        return (32, 0)
    return None


def _nbits_kinds(model: nn.Module, spec: FFNSpec) -> tuple[tuple | None, tuple | None, str | None]:
    """``(heavy kind, light kind, why not)`` of ``ffsplit::FusedFFNNBits`` for this FFN: every
    heavy part one kind (none when H = 0), every light part one int8 / int4 kind."""
    heavy, light = set(), set()
    for path in spec.projections:
        m = get_module(model, path)
        for role, part, kinds in (("heavy", m.heavy, heavy), ("light", m.light, light)):
            if part is None:
                kinds.add(None)
                continue
            k = nbits_kind(part)
            if k is None or (role == "light" and k[0] == 32):
                took = "int8 / int4 (MatMulNBits)" + (" or fp32" if role == "heavy" else "")
                return None, None, f"{role} format {part.format_name} of {path} (the op takes {took})"
            kinds.add(k)
    if len(heavy) > 1:
        return None, None, f"heavy parts of different kinds {sorted(map(str, heavy))} (the op takes one)"
    if len(light) > 1:
        return None, None, f"light parts of different kinds {sorted(map(str, light))} (the op takes one)"
    hk, lk = next(iter(heavy)), next(iter(light))
    if lk is None:
        return None, None, "no light part (heavy fraction 1): nothing for the op to skip"
    for k in (hk, lk):
        if k is not None and k[0] != 32 and not (16 <= k[1] <= 256 and k[1] & (k[1] - 1) == 0):
            return None, None, f"block size {k[1]} (the op takes powers of two 16..256)"
    return hk, lk, None


def fused_op_for(model: nn.Module, spec: FFNSpec) -> tuple[str | None, str]:
    """The op that carries this FFN (``FusedFFN`` for fp32 + sparse-int8, ``FusedFFNNBits`` for
    dense fp32 / MatMulNBits parts) or ``(None, why not)``."""
    why = _common(spec, model)
    if why is not None:
        return None, why
    why_sparse = _why_not_sparse(model, spec)
    if why_sparse is None:
        return SPARSE_OP, ""
    _, _, why_nbits = _nbits_kinds(model, spec)
    if why_nbits is None:
        return NBITS_OP, ""
    return None, f"{why_sparse}; FusedFFNNBits: {why_nbits}"


def fuse_ffns_(
    model: nn.Module,
    skip: int | ActivationSparsity = 0,
    specs: list[FFNSpec] | None = None,
    batches: list | None = None,
    progress: bool = False,
    criterion: str | None = None,
    input_sparsity: float = 0.0,
    allowed: tuple[str, ...] | None = None,
) -> dict:
    """Replace every fusable split FFN of ``model`` in place; returns the manifest's record.

    ``allowed``: the fused ops allowed (None: both); an FFN whose parts need another keeps its subgraph.

    ``skip`` is the op's skip mode or a parsed ``--activation-sparsity``; with a fraction > 0 the
    thresholds are calibrated on ``batches`` (:func:`calibrate_thresholds_`, by ``criterion``) and every FFN must be
    fusable (an FFN left as a subgraph would silently skip nothing). ``input_sparsity`` (a parsed
    ``--input-sparsity``, 0 < F < 1): every FFN must be ungated and carried by ``FusedFFNNBits``;
    its input thresholds are calibrated first (:func:`calibrate_input_thresholds_`, skip mode 1
    implied), then the neuron thresholds with the input skipping on.
    """
    sp = skip if isinstance(skip, ActivationSparsity) else ActivationSparsity(int(skip), 0.0)
    input_sparsity = parse_input_sparsity(input_sparsity)
    if input_sparsity > 0 and not sp.skip:
        sp = ActivationSparsity(1, sp.fraction)  # input_threshold needs skip=1 (exact zeros: no change)
    specs = specs if specs is not None else find_ffns(model)
    fused, kept, ops = [], {}, {}
    for spec in specs:
        op, reason = fused_op_for(model, spec)
        if op is not None and allowed is not None and op not in allowed:
            op, reason = (
                None,
                f"its parts are {op}'s, not {' / '.join(allowed)}'s (pass --fused-ffn to fuse them)",
            )
        if op is None:
            kept[spec.name] = reason
            continue
        kind = ACTIVATION_KINDS[spec.activation]
        up, down = get_module(model, spec.up), get_module(model, spec.down)
        gate = get_module(model, spec.gate) if spec.gate is not None else None
        cls = FusedFFN if op == SPARSE_OP else FusedFFNNBits
        if input_sparsity > 0 and (cls is not FusedFFNNBits or gate is not None):
            why = (
                "it is gated (a gate decides the skipped neurons: use --activation-sparsity)"
                if gate is not None
                else ("its parts are fp32 + sparse-int8 (ffsplit::FusedFFN has no input skipping)")
            )
            raise ConfigError(
                f"--input-sparsity={input_sparsity}: FFN {spec.name} cannot skip input channels: {why}; "
                "--input-sparsity applies to ungated FFNs (MPT, Whisper, GPT-2, OPT, T5 v1.0) with light "
                "int8 / int4 parts (the presets); leave --input-sparsity out"
            )
        module = cls(up, down, gate, kind, sp.skip, name=spec.name)
        ops[op] = ops.get(op, 0) + 1
        if gate is not None:
            set_module(model, spec.name, module)
        else:
            set_module(model, spec.up, module)
            set_module(model, spec.act_module, Passthrough())
            set_module(model, spec.down, Passthrough())
        fused.append(spec.name)
    record = {
        # the op of the fused FFNs (FusedFFN when none is fused: the historical record)
        "op": next(iter(ops)) if len(ops) == 1 else (sorted(ops) if ops else SPARSE_OP),
        "ops": ops,
        "activation_sparsity": sp.label,
        "fused": len(fused),
        "kept_subgraph": kept,
    }
    if input_sparsity > 0:
        if kept:
            first = next(iter(kept.items()))
            raise ConfigError(
                f"--input-sparsity={input_sparsity}: {len(kept)} FFN(s) cannot be fused ({first[0]}: "
                f"{first[1]}), so their input channels would never be skipped; use light int8 / int4 with "
                "heavy fp32 / int8 (the presets), or leave --input-sparsity out"
            )
        if not batches:
            raise ConfigError("--input-sparsity F needs calibration batches to set the input thresholds")
        record["input_sparsity"] = input_sparsity
        record.update(calibrate_input_thresholds_(model, batches, input_sparsity, progress=progress))
    if sp.fraction > 0:
        if kept:
            first = next(iter(kept.items()))
            raise ConfigError(
                f"--activation-sparsity={sp.fraction}: {len(kept)} FFN(s) cannot be fused ({first[0]}: "
                f"{first[1]}), so their light neurons would never be skipped; use light int8 / int4 with "
                "heavy fp32 / int8 (the presets), or light sparse-int8 with heavy fp32, or "
                "--activation-sparsity 0 / exact"
            )
        if not batches:
            raise ConfigError("--activation-sparsity F needs calibration batches to set the thresholds")
        record.update(
            calibrate_thresholds_(model, batches, sp.fraction, progress=progress, criterion=criterion)
        )
    return record


def fused_modules(model: nn.Module) -> list[FusedFFN]:
    return [m for m in model.modules() if isinstance(m, FusedFFN)]


def _token_mask(module: FusedFFN, masks: dict, like: torch.Tensor):
    from .calibrate import _stack

    if not masks:
        return None
    mask = masks.get(_stack(module.name, masks))
    if mask is not None and like.dim() == 3 and tuple(like.shape[:2]) == tuple(mask.shape):
        return mask
    return None


@torch.no_grad()
def _run_batches(model: nn.Module, batches: list, recorder, desc: str, progress: bool) -> None:
    mods = fused_modules(model)
    current: dict = {}

    def rec(module, s_light, a_light):
        recorder(module, s_light, a_light, _token_mask(module, current, s_light))

    for m in mods:
        m._recorder = rec
    was_training = model.training
    model.eval()
    try:
        for b in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            current.clear()
            current.update(b.masks)
            model(**b.inputs)
    finally:
        for m in mods:
            m._recorder = None
        model.train(was_training)


SKIP_CRITERIA = ("mixed", "gate", "product")
# mixed: the share of F skipped by the gate threshold (CATS: up row and down column saved); the rest by
# |act(gate) * up| (down column saved). SmolLM2-135M balanced at F = 0.4, PyTorch, README protocol:
# gate share 0.25 x1.027 of no skipping, 0.5 x1.041, 0.75 x1.120; product only x1.034; gate only x1.247
GATE_SHARE = 0.25


def check_skip_criterion(criterion: str | None) -> str | None:
    """``--skip-criterion``: None (the op's best: mixed for FusedFFNNBits, gate for FusedFFN) or one of
    :data:`SKIP_CRITERIA`."""
    if criterion is None:
        return None
    key = str(criterion).strip().lower()
    if key not in SKIP_CRITERIA:
        raise ConfigError(
            f"--skip-criterion={criterion!r} is unknown; use mixed (gate threshold for a quarter of F, "
            "then |act(gate) * up|), gate (CATS: |act(gate)| only) or product (|act(gate) * up| only)"
        )
    return key


def _criterion_of(module: FusedFFN, criterion: str | None) -> str:
    """The criterion one FFN uses: ungated FFNs decide on act(up) (``"up"``)."""
    if module.gate is None:
        return "up"
    if criterion is None:
        return "gate" if type(module) is FusedFFN else "mixed"
    if criterion != "gate" and type(module) is FusedFFN:
        raise ConfigError(
            f"--skip-criterion {criterion}: FFN {module.name} is an ffsplit::FusedFFN (light sparse-int8), "
            "which decides on |act(gate)| only; use --skip-criterion gate, or the presets' formats"
        )
    return criterion


def calibrate_thresholds_(
    model: nn.Module,
    batches: list,
    fraction: float,
    max_values: int = 1_000_000,
    seed: int = 0,
    progress: bool = False,
    criterion: str | None = None,
) -> dict:
    """Set every FusedFFN's thresholds so that a ``fraction`` of its (token, light neuron) pairs is
    skipped on the non-padding calibration tokens (a seeded subsample of at most ``max_values`` values
    per FFN), with thresholds off; then run the batches again with the thresholds on and count the
    fraction really skipped (exact zeros included; later layers see the earlier layers' skipping).

    ``criterion`` (gated FFNs; :func:`check_skip_criterion`): ``gate``: ``threshold`` = the
    F-quantile of |act(gate)|; ``product``: ``product_threshold`` = the F-quantile of |act(gate) * up|;
    ``mixed`` (FusedFFNNBits' default): ``threshold`` at the ``GATE_SHARE * F``-quantile of
    |act(gate)|, then ``product_threshold`` so that both together skip F. Ungated FFNs: the F-quantile
    of |act(up)|. Returns the manifest's record of both, per FFN."""
    criterion = check_skip_criterion(criterion)
    mods = fused_modules(model)
    if not mods:
        raise ConfigError("no fused FFN to calibrate; --activation-sparsity F needs --fused-ffn's op")
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"activation sparsity fraction {fraction!r}; use 0 < F < 1")
    crit = {id(m): _criterion_of(m, criterion) for m in mods}
    per_batch = max(4096, max_values // max(1, len(batches)))
    gen = torch.Generator().manual_seed(seed)
    values: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {id(m): [] for m in mods}

    def collect(module, s_light, a_light, mask):
        s = (s_light[mask] if mask is not None else s_light).reshape(-1)
        a = (a_light[mask] if mask is not None else a_light).reshape(-1)
        if s.numel() > per_batch:
            idx = torch.randint(s.numel(), (per_batch,), generator=gen)
            s, a = s[idx], a[idx]
        values[id(module)].append((s.float(), a.float().abs()))

    for m in mods:
        m.set_threshold(0.0)
        m.product_threshold = 0.0
    _run_batches(model, batches, collect, "activation thresholds", progress)

    def quantile(v: torch.Tensor, q: float) -> float:
        t = float(torch.kthvalue(v, max(1, int(np.ceil(q * v.numel())))).values)
        return t if np.isfinite(t) else 0.0

    thresholds, products, at_calibration = {}, {}, {}
    for m in mods:
        pairs = values.pop(id(m))
        s = torch.cat([p[0] for p in pairs]) if pairs else torch.zeros(0)
        if s.numel() == 0:
            raise ConfigError(f"FFN {m.name}: no light neuron activation seen during calibration")
        a = torch.cat([p[1] for p in pairs])
        c = crit[id(m)]
        quiet = torch.zeros_like(s, dtype=torch.bool)
        if c in ("up", "gate", "mixed"):
            m.set_threshold(quantile(s, fraction * (GATE_SHARE if c == "mixed" else 1.0)))
            quiet = s <= m.threshold
        if c in ("product", "mixed"):
            # the product's threshold over what the gate leaves: the gate-silent pairs count as skipped
            m.set_product_threshold(quantile(torch.where(quiet, torch.zeros_like(a), a), fraction))
            quiet = quiet | (a <= m.product_threshold)
            products[m.name] = m.product_threshold
        thresholds[m.name] = m.threshold
        at_calibration[m.name] = float(quiet.double().mean())
    counts = {id(m): [0, 0] for m in mods}

    def count(module, s_light, a_light, mask):
        skipped = (a_light == 0) | (s_light <= module.threshold)
        if module.product_threshold > 0:
            skipped |= a_light.abs() <= module.product_threshold
        if mask is not None:
            skipped = skipped[mask]
        c = counts[id(module)]
        c[0] += int(skipped.sum())
        c[1] += skipped.numel()

    _run_batches(model, batches, count, "skipped fraction", progress)
    applied = {m.name: counts[id(m)][0] / max(1, counts[id(m)][1]) for m in mods}
    used = sorted({crit[id(m)] for m in mods})
    return {
        "thresholds": thresholds,
        **({"product_thresholds": products} if products else {}),
        "skip_criterion": used[0] if len(used) == 1 else used,
        "threshold_on": "|act(gate)| (gated FFNs) or |act(up)| of the light neurons, per FFN"
        + ("; product_thresholds on |act(gate) * up|" if products else ""),
        "skipped_fraction": applied,
        "skipped_fraction_mean": float(np.mean(list(applied.values()))),
        "skipped_fraction_quantile": at_calibration,
    }


@torch.no_grad()
def calibrate_input_thresholds_(
    model: nn.Module,
    batches: list,
    fraction: float,
    max_values: int = 1_000_000,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Set every ungated FusedFFNNBits' ``input_threshold`` to the ``fraction``-quantile of ``|x|`` at
    its input over the non-padding calibration tokens (a seeded subsample of at most ``max_values``
    values per FFN), input skipping off; then run the batches again with it on and count the fraction
    of (token, channel) pairs whose light up weights are skipped (|x| <= threshold; later layers see
    the earlier layers' skipping). Returns the manifest's record of both, per FFN."""
    mods = [m for m in fused_modules(model) if isinstance(m, FusedFFNNBits) and m.gate is None]
    if not mods:
        raise ConfigError("no ungated FusedFFNNBits FFN to calibrate; --input-sparsity needs one")
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"input sparsity fraction {fraction!r}; use 0 < F < 1")
    per_batch = max(4096, max_values // max(1, len(batches)))
    gen = torch.Generator().manual_seed(seed)
    values: dict[int, list[torch.Tensor]] = {id(m): [] for m in mods}
    counts = {id(m): [0, 0] for m in mods}
    state: dict = {"count": False, "masks": {}}

    def rec(module, x):
        if id(module) not in counts:
            return
        mask = _token_mask(module, state["masks"], x)
        v = x.detach().float().abs()
        v = v[mask] if mask is not None else v.reshape(-1, v.shape[-1])
        if state["count"]:
            c = counts[id(module)]
            c[0] += int((v <= module.input_threshold).sum())
            c[1] += v.numel()
            return
        v = v.reshape(-1)
        if v.numel() > per_batch:
            v = v[torch.randint(v.numel(), (per_batch,), generator=gen)]
        values[id(module)].append(v)

    def run(desc):
        was_training = model.training
        model.eval()
        for m in mods:
            m._input_recorder = rec
        try:
            for b in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
                state["masks"] = dict(b.masks)
                model(**b.inputs)
        finally:
            for m in mods:
                m._input_recorder = None
            model.train(was_training)

    for m in mods:
        m.set_input_threshold(0.0)
    run("input thresholds")
    thresholds, at_calibration = {}, {}
    for m in mods:
        v = torch.cat(values.pop(id(m)))
        if v.numel() == 0:
            raise ConfigError(f"FFN {m.name}: no input value seen during calibration")
        k = max(1, int(np.ceil(fraction * v.numel())))
        t = float(torch.kthvalue(v, k).values)
        m.set_input_threshold(t if np.isfinite(t) else 0.0)
        thresholds[m.name] = m.input_threshold
        at_calibration[m.name] = float((v <= m.input_threshold).double().mean())
    state["count"] = True
    run("input skipped fraction")
    applied = {m.name: counts[id(m)][0] / max(1, counts[id(m)][1]) for m in mods}
    return {
        "input_thresholds": thresholds,
        "input_threshold_on": "|x| at the FFN input (the light up projection's skipped channels), per FFN",
        "input_skipped_fraction": applied,
        "input_skipped_fraction_mean": float(np.mean(list(applied.values()))),
        "input_skipped_fraction_quantile": at_calibration,
    }
