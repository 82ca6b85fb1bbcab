"""The packed-module base class and the ONNX emission helpers that formats share.

Each :class:`CompressedLinear` computes ``y = x @ W.T (+ b)`` with ``W`` decoded from its
packed buffers exactly as the exported kernel decodes it (same dequantisation, float32
compute). At ONNX export its symbolic asks the module's registered format for the nodes of
the current target (see :func:`export_target`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..ops import DOMAIN as FFSPLIT_DOMAIN
from ..ops._spec import TRT_PLUGIN_NAMESPACE, TRT_PLUGIN_VERSION, trt_node_attributes  # noqa: F401 (re-exported)
from .names import Target
from .registry import get_format

_TARGET: contextvars.ContextVar[Target] = contextvars.ContextVar("ffsplit_target", default=Target.ORT_CPU)
# a MatMulNBits with accuracy_level 4 quantizes activations to int8: faster, not exact
_NBITS_ACCURACY_LEVEL: contextvars.ContextVar[int] = contextvars.ContextVar("ffsplit_nbits_acc", default=0)

# TensorRT's ONNX parser looks plugins up by op_type + these attributes, whatever the domain;
# the ``ffsplit`` domain lets ONNX Runtime (TensorRT EP + CPU fallback) resolve the same nodes.
# The convention (and the sources it follows) lives in ffsplit_export/trt/onnx_nodes.py.
TRT_PLUGIN_DOMAIN = FFSPLIT_DOMAIN


@contextlib.contextmanager
def export_target(target: Target | str, nbits_accuracy_level: int = 0) -> Iterator[None]:
    """Within this context, modules export the nodes of ``target``."""
    t = Target.parse(target, "--target")
    tok = _TARGET.set(t)
    tok2 = _NBITS_ACCURACY_LEVEL.set(int(nbits_accuracy_level))
    try:
        yield
    finally:
        _TARGET.reset(tok)
        _NBITS_ACCURACY_LEVEL.reset(tok2)


def current_target() -> Target:
    return _TARGET.get()


def nbits_accuracy_level() -> int:
    return _NBITS_ACCURACY_LEVEL.get()


def as_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _with_last_dim(g, x, n: int):
    """Output type of a node that maps [..., K] to [..., N] (same element type as x)."""
    try:
        sizes = x.type().varyingSizes()
    except RuntimeError:
        sizes = None
    if sizes is None:
        return x.type()
    sizes = list(sizes)
    sizes[-1] = n
    return x.type().with_sizes(sizes)


class _Matmul(torch.autograd.Function):
    """y = x @ W.T with W from ``module``; its symbolic asks the module's format for the ONNX nodes."""

    @staticmethod
    def forward(ctx, x, module, *buffers):  # noqa: ARG004 - buffers are there for the export graph
        return F.linear(x, module.dense_weight())

    @staticmethod
    def symbolic(g, x, module, *buffers):
        y = module.onnx_nodes(g, x, *buffers)
        y.setType(_with_last_dim(g, x, module.out_features))
        if y.node().kind().split("::")[0] == FFSPLIT_DOMAIN:
            y = _pin_shape(g, x, y, module.out_features)
        return y


def _pin_shape(g, x, y, n: int):
    """Reshape ``y`` to ``x.shape[:-1] + [n]`` (free in ONNX Runtime).

    Shape inference knows nothing of custom ops; without this the leading dims of their
    outputs become unknown, and ONNX Runtime rejects later Reshapes whose target shape is
    computed from them ("multiple -1 dimensions").
    """
    const = lambda v: g.op("Constant", value_t=torch.tensor(v, dtype=torch.int64))  # noqa: E731
    lead = g.op("Slice", g.op("Shape", x), const([0]), const([-1]), const([0]))
    target = g.op("Concat", lead, const([n]), axis_i=0)
    out = g.op("Reshape", y, target)
    out.setType(y.type())
    return out


class CompressedLinear(nn.Module):
    """Base class: packed buffers, a cached dense decode, an optional float32 bias.

    ``self.format`` is the registered :class:`~ffsplit_export.formats.registry.WeightFormat`
    the module belongs to; it decides the ONNX nodes per target and the trainable form.
    """

    format_name: str = ""
    packed_names: tuple[str, ...] = ()
    default_format: tuple[str, str] = ("light", "")

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._dense: torch.Tensor | None = None
        self._format = None

    @property
    def format(self):
        """The registered format (by default the light format of ``format_name``)."""
        if self._format is None:
            role, _ = self.default_format
            return get_format(self.format_name, role)
        return self._format

    @format.setter
    def format(self, fmt) -> None:
        self._format = fmt

    # -- decoding ---------------------------------------------------------------------
    def decode(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The float32 [N, K] weight the kernels multiply by (decoded once, cached)."""
        if self._dense is None or self._dense.device != self._device():
            self._dense = self.decode().to(self._device())
        return self._dense

    def _device(self) -> torch.device:
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def weight(self) -> torch.Tensor:
        """An empty float32 tensor: models that probe ``.weight.dtype`` see float32."""
        return torch.empty(0, dtype=torch.float32, device=self._device())

    def packed_nbytes(self) -> int:
        n = sum(
            getattr(self, name).numel() * getattr(self, name).element_size() for name in self.packed_names
        )
        return int(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            y = _Matmul.apply(x, self, *[getattr(self, n) for n in self.packed_names])
        else:
            y = F.linear(x, self.dense_weight().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    # -- export -----------------------------------------------------------------------
    def onnx_nodes(self, g, x, *buffers):
        """The nodes of the current target, as the module's format emits them."""
        return self.format.emit(g, x, self, buffers, current_target())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format_name}"


# ------------------------------------------------------------------------------ emission helpers


def custom_node(g, op_type: str, x, *inputs, **attrs):
    """An ``ffsplit`` node; with target tensorrt it carries the plugin namespace and version."""
    if _TARGET.get() is Target.TENSORRT:
        return g.op(
            f"{FFSPLIT_DOMAIN}::{op_type}",
            x,
            *inputs,
            **trt_node_attributes(),
            **attrs,
        )
    level = _NBITS_ACCURACY_LEVEL.get()
    if level and op_type != "SparseMatMulFP32":
        # like MatMulNBits' accuracy_level 4: the kernel may quantize activations to int8
        attrs["accuracy_level_i"] = level
    return g.op(f"{FFSPLIT_DOMAIN}::{op_type}", x, *inputs, **attrs)


def matmulnbits_node(g, x, qweight, scales, *, k: int, n: int, bits: int, block_size: int, zero_points=None):
    """``com.microsoft::MatMulNBits`` of packed inputs: symmetric (the op's default zero point), or
    with ``zero_points`` (uint8, packed like B: the asymmetric int4 grid) as its fourth input."""
    inputs = (x, qweight, scales) if zero_points is None else (x, qweight, scales, zero_points)
    return g.op(
        "com.microsoft::MatMulNBits",
        *inputs,
        K_i=k,
        N_i=n,
        bits_i=bits,
        block_size_i=block_size,
        accuracy_level_i=_NBITS_ACCURACY_LEVEL.get(),
    )


def int8_matmulnbits_node(g, x, q: np.ndarray, scales: np.ndarray, k: int, block_size: int = 128):
    """Signed int8 codes ``q`` [N, K] with per-row ``scales`` as a constant MatMulNBits."""
    from .packing import pack_matmulnbits

    p = pack_matmulnbits(q, scales, 8, block_size)
    return matmulnbits_node(
        g,
        x,
        g.op("Constant", value_t=as_tensor(p.b)),
        g.op("Constant", value_t=as_tensor(p.scales)),
        k=k,
        n=q.shape[0],
        bits=8,
        block_size=block_size,
    )
