"""One ``ffsplit::FusedFFN`` node per split FFN (``--fused-ffn``, ``--activation-sparsity exact``).

:func:`fuse_ffns_` replaces each split FFN whose parts the op carries (heavy ``fp32``, light
``sparse-int8``, an activation the op knows) by a :class:`FusedFFN` module: gated FFNs (Llama,
gated T5) replace their MLP module; ungated ones put the fused module at the up projection and
pass-throughs at the activation and down projection (their container also holds attention).
In PyTorch the module computes exactly what the op computes (the split modules, the activation,
and ``exact`` skipping, which changes nothing but the bytes read: a zero activation contributes
nothing). At ONNX export with ``--target ort-cpu`` it becomes one node; other FFNs keep today's
subgraph and the report says why.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


def parse_activation_sparsity(value) -> int:
    """``--activation-sparsity``: 0 / off (no skipping) or ``exact`` (skip exact zeros) -> skip mode."""
    key = str(value).strip().lower()
    if key in ("0.0", "0"):
        key = "0"
    if key in SKIP_MODES:
        return SKIP_MODES[key]
    raise ConfigError(
        f"--activation-sparsity={value!r}: only 0 (off) and 'exact' (skip light neurons whose activation "
        "is exactly zero) are implemented, calibrated thresholds (a fraction 0..1) are not yet; use 0 or exact"
    )


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

    def __init__(self, up: SplitLinear, down: SplitLinear, gate: SplitLinear | None, kind: str, skip: int):
        super().__init__()
        self.up, self.down, self.gate = up, down, gate
        self.kind, self.skip = kind, int(skip)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ARG002
        if torch.onnx.is_in_onnx_export():
            return _FusedFn.apply(x, self)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """What the split modules compute (their non-export arithmetic, so it also runs under the
        exporter's tracer without nesting their custom-op functions)."""
        u = _split_apply(self.up, x)
        a = _act(self.kind, _split_apply(self.gate, x)) * u if self.gate is not None else _act(self.kind, u)
        return _split_apply(self.down, a)

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
        )
        try:  # element type and rank of X; the sizes come from the pinning Reshape
            y.setType(x.type().with_sizes([None] * x.type().dim()))
        except RuntimeError:
            y.setType(x.type())
        return _pin_shape(g, x, y, module.up_in_features())


def why_not_fusable(model: nn.Module, spec: FFNSpec) -> str | None:
    """None when the op carries this FFN, else the reason it keeps today's subgraph."""
    kind = ACTIVATION_KINDS.get(spec.activation)
    if kind is None:
        return f"activation {spec.activation!r} (the op has {sorted(set(ACTIVATION_KINDS.values()))})"
    if spec.gate is None and spec.act_module is None:
        return "the adapter names no activation module for this ungated FFN"
    for path in spec.projections:
        m = get_module(model, path)
        if not isinstance(m, SplitLinear):
            return f"{path} is not split"
        if m.heavy is not None and m.heavy.format_name != "fp32":
            return f"heavy format {m.heavy.format_name} (the op takes fp32)"
        if m.light is not None and getattr(m.light, "op_type", None) != "SparseMatMulInt8":
            return f"light format {m.light.format_name} (the op takes sparse-int8)"
    return None


def fuse_ffns_(model: nn.Module, skip: int = 0, specs: list[FFNSpec] | None = None) -> dict:
    """Replace every fusable split FFN of ``model`` in place; returns the manifest's record."""
    specs = specs if specs is not None else find_ffns(model)
    fused, kept = [], {}
    for spec in specs:
        reason = why_not_fusable(model, spec)
        if reason is not None:
            kept[spec.name] = reason
            continue
        kind = ACTIVATION_KINDS[spec.activation]
        up, down = get_module(model, spec.up), get_module(model, spec.down)
        gate = get_module(model, spec.gate) if spec.gate is not None else None
        module = FusedFFN(up, down, gate, kind, skip)
        if gate is not None:
            set_module(model, spec.name, module)
        else:
            set_module(model, spec.up, module)
            set_module(model, spec.act_module, Passthrough())
            set_module(model, spec.down, Passthrough())
        fused.append(spec.name)
    return {
        "op": "ffsplit::FusedFFN",
        "activation_sparsity": "exact" if skip else 0,
        "fused": len(fused),
        "kept_subgraph": kept,
    }
