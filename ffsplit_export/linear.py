"""Compressed linear modules: the PyTorch reference of every exported weight format.

Each module computes ``y = x @ W.T (+ b)`` with ``W`` decoded from its packed buffers exactly
as the exported kernel decodes it (same dequantisation, float32 compute), so the PyTorch
model is the reference for export validation. At ONNX export each module emits the node(s)
of the current target (see :func:`export_target`): ``ffsplit`` custom ops, TensorRT plugin
nodes, or standard ONNX / ``com.microsoft`` ops.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .formats import packing
from .formats.names import Target
from .ops import DOMAIN as FFSPLIT_DOMAIN
from .ops._spec import TRT_PLUGIN_NAMESPACE, TRT_PLUGIN_VERSION

_TARGET: contextvars.ContextVar[Target] = contextvars.ContextVar("ffsplit_target", default=Target.ORT_CPU)
# a MatMulNBits with accuracy_level 4 quantizes activations to int8: faster, not exact
_NBITS_ACCURACY_LEVEL: contextvars.ContextVar[int] = contextvars.ContextVar("ffsplit_nbits_acc", default=0)

# TensorRT's ONNX parser looks plugins up by op_type + these attributes, whatever the domain;
# the ``ffsplit`` domain lets ONNX Runtime (TensorRT EP + CPU fallback) resolve the same nodes.
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


def _t(a: np.ndarray) -> torch.Tensor:
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
    """y = x @ W.T with W from ``module``; its symbolic asks the module for the ONNX nodes."""

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
    """Base class: packed buffers, a cached dense decode, an optional float32 bias."""

    format_name: str = ""
    packed_names: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._dense: torch.Tensor | None = None

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
        """Emit the nodes for the current target; default: dense MatMul of the decoded weight."""
        return _dense_matmul(g, x, self.dense_weight())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format_name}"


def _dense_matmul(g, x, w: torch.Tensor):
    wt = g.op("Constant", value_t=w.detach().t().contiguous().float())
    return g.op("MatMul", x, wt)


def _custom(g, op_type: str, x, *inputs, **attrs):
    if _TARGET.get() is Target.TENSORRT:
        return g.op(
            f"{FFSPLIT_DOMAIN}::{op_type}",
            x,
            *inputs,
            plugin_namespace_s=TRT_PLUGIN_NAMESPACE,
            plugin_version_s=TRT_PLUGIN_VERSION,
            **attrs,
        )
    level = _NBITS_ACCURACY_LEVEL.get()
    if level and op_type != "SparseMatMulFP32":
        # like MatMulNBits' accuracy_level 4: the kernel may quantize activations to int8
        attrs["accuracy_level_i"] = level
    return g.op(f"{FFSPLIT_DOMAIN}::{op_type}", x, *inputs, **attrs)


class DenseLinear(CompressedLinear):
    """Uncompressed weight in float32 or float16 (computed in float32)."""

    packed_names = ("w",)

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
    ):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.format_name = "fp16" if dtype == torch.float16 else "fp32"
        self.register_buffer("w", weight.detach().to(dtype).contiguous().clone())

    def decode(self) -> torch.Tensor:
        return self.w.float()

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            # plain ops the exporter knows: Cast (fp16) + MatMul
            return F.linear(x, self.w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return super().forward(x)


class NBitsLinear(CompressedLinear):
    """int8 / int4 block-wise symmetric weights in MatMulNBits layout (``com.microsoft::MatMulNBits``)."""

    packed_names = ("qweight", "scales")

    def __init__(self, q: np.ndarray, scales: np.ndarray, bits: int, block_size: int, bias=None):
        super().__init__(q.shape[1], q.shape[0], bias)
        p = packing.pack_matmulnbits(q, scales, bits, block_size)
        self.bits, self.block_size = bits, block_size
        self.format_name = f"int{bits}"
        self.register_buffer("qweight", _t(p.b))
        self.register_buffer("scales", _t(p.scales))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int, block_size: int = 128, bias=None) -> NBitsLinear:
        w = weight.detach().float().cpu().numpy()
        if bits == 8:
            q, s = packing.quantize_int8_per_channel(w)
        elif bits == 4:
            q, s = packing.quantize_int4_groupwise(w, block_size)
        else:
            raise ConfigError(f"bits={bits} is not supported; use 8 or 4")
        return cls(q, s, bits, block_size, bias)

    def _packed(self) -> packing.NBits:
        return packing.NBits(
            self.qweight.cpu().numpy(),
            self.scales.cpu().numpy(),
            self.in_features,
            self.bits,
            self.block_size,
        )

    def decode(self) -> torch.Tensor:
        return _t(packing.dequantize_matmulnbits(self._packed()))

    def onnx_nodes(self, g, x, qweight, scales):
        if _TARGET.get() is Target.TENSORRT:
            # TensorRT has no MatMulNBits: a constant dequantized weight it can fold and cast
            return _dense_matmul(g, x, self.dense_weight())
        return g.op(
            "com.microsoft::MatMulNBits",
            x,
            qweight,
            scales,
            K_i=self.in_features,
            N_i=self.out_features,
            bits_i=self.bits,
            block_size_i=self.block_size,
            accuracy_level_i=_NBITS_ACCURACY_LEVEL.get(),
        )


class SparseLinear(CompressedLinear):
    """Unstructured sparse weight: bitmask + values (int8 with per-row scales, or float32)."""

    def __init__(self, weight: torch.Tensor, keep: torch.Tensor, int8: bool, bias=None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        w = (weight.detach().float() * keep).cpu().numpy()
        keep_np = keep.cpu().numpy().astype(bool)
        if int8:
            q, s = packing.quantize_int8_per_channel(w)
            p = packing.pack_bitmask(q, keep_np)
            self.register_buffer("scales", _t(s))
            self.packed_names = ("mask", "values", "row_ptr", "scales")
            self.op_type = "SparseMatMulInt8"
            self.format_name = "sparse-int8"
        else:
            p = packing.pack_bitmask(w, keep_np)
            self.packed_names = ("mask", "values", "row_ptr")
            self.op_type = "SparseMatMulFP32"
            self.format_name = "sparse-fp32"
        self.register_buffer("mask", _t(p.mask))
        self.register_buffer("values", _t(p.values))
        self.register_buffer("row_ptr", _t(p.row_ptr))

    @property
    def sparsity(self) -> float:
        total = self.in_features * self.out_features
        return 1.0 - self.values.numel() / total if total else 0.0

    def decode(self) -> torch.Tensor:
        from .ops import decode_weight

        arrays = [getattr(self, n).cpu().numpy() for n in self.packed_names]
        return _t(decode_weight(self.op_type, self.in_features, *arrays))

    def onnx_nodes(self, g, x, *buffers):
        if _TARGET.get() is Target.PORTABLE:
            if self.op_type == "SparseMatMulInt8":
                # dense int8 for stock ONNX Runtime: compressed on disk, no sparse speed-up
                q = np.rint(self.dense_weight().numpy() / self.scales.numpy()[:, None]).astype(np.int8)
                return _nbits_node(g, x, q, self.scales.numpy(), self.in_features)
            return _dense_matmul(g, x, self.dense_weight())
        return _custom(g, self.op_type, x, *buffers)


class NM24Linear(CompressedLinear):
    """2:4 structured sparse int8 weight with per-row scales."""

    packed_names = ("values", "meta", "scales")
    op_type = "Sparse24MatMulInt8"
    format_name = "2:4-int8"

    def __init__(self, weight: torch.Tensor, keep: torch.Tensor, bias=None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        w = (weight.detach().float() * keep).cpu().numpy()
        q, s = packing.quantize_int8_per_channel(w)
        p = packing.pack_nm24(q)
        self.register_buffer("values", _t(p.values))
        self.register_buffer("meta", _t(p.meta))
        self.register_buffer("scales", _t(s))

    def decode(self) -> torch.Tensor:
        from .ops import decode_weight

        arrays = [getattr(self, n).cpu().numpy() for n in self.packed_names]
        return _t(decode_weight(self.op_type, self.in_features, *arrays))

    def onnx_nodes(self, g, x, *buffers):
        target = _TARGET.get()
        if target is Target.PORTABLE:
            q = np.rint(self.dense_weight().numpy() / self.scales.numpy()[:, None]).astype(np.int8)
            return _nbits_node(g, x, q, self.scales.numpy(), self.in_features)
        if target is Target.TENSORRT and getattr(self, "trt_dense_weights", False):
            # dense 2:4-pattern weights for TensorRT's sparse tensor cores (SPARSE_WEIGHTS)
            return _dense_matmul(g, x, self.dense_weight())
        return _custom(g, self.op_type, x, *buffers)


def _nbits_node(g, x, q: np.ndarray, scales: np.ndarray, k: int, block_size: int = 128):
    p = packing.pack_matmulnbits(q, scales, 8, block_size)
    return g.op(
        "com.microsoft::MatMulNBits",
        x,
        g.op("Constant", value_t=_t(p.b)),
        g.op("Constant", value_t=_t(p.scales)),
        K_i=k,
        N_i=q.shape[0],
        bits_i=8,
        block_size_i=block_size,
        accuracy_level_i=_NBITS_ACCURACY_LEVEL.get(),
    )


class LowRankLinear(CompressedLinear):
    """W ~= A @ B with A [N, r], B [r, K] (truncated SVD); exported as two MatMuls."""

    packed_names = ("a", "b")
    format_name = "lowrank"

    def __init__(self, weight: torch.Tensor, rank: int, bias=None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        n, k = weight.shape
        if not 0 <= rank <= min(n, k):
            raise ConfigError(
                f"low-rank rank={rank} is out of range for a {n}x{k} weight; use 0..{min(n, k)}"
            )
        u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        self.register_buffer("a", (u[:, :rank] * s[:rank]).float().contiguous())
        self.register_buffer("b", vh[:rank].float().contiguous())

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def decode(self) -> torch.Tensor:
        return self.a @ self.b

    def forward(self, x):
        # two products, in this order, both in PyTorch and in the exported graph
        y = F.linear(F.linear(x, self.b), self.a)
        return y if self.bias is None else y + self.bias


# ------------------------------------------------------------------------------ embedding


class _Gather(torch.autograd.Function):
    """rows of the int8 table; its symbolic emits ``com.microsoft::GatherBlockQuantized``."""

    @staticmethod
    def forward(ctx, ids, module, data, scales):  # noqa: ARG004
        return F.embedding(ids, module.dense_weight())

    @staticmethod
    def symbolic(g, ids, module, data, scales):
        y = g.op(
            "com.microsoft::GatherBlockQuantized",
            data,
            ids,
            scales,
            gather_axis_i=0,
            quantize_axis_i=1,
            block_size_i=module.block_size,
            bits_i=8,
        )
        try:
            sizes = ids.type().varyingSizes()
            y.setType(ids.type().with_dtype(torch.float32).with_sizes(list(sizes) + [module.embedding_dim]))
        except RuntimeError:
            pass
        return y


class QuantizedEmbedding(nn.Module):
    """Token embedding table in symmetric block-wise int8 (uint8 codes with the implied zero point 128,
    float32 scales per ``block_size`` columns), exported as ``com.microsoft::GatherBlockQuantized``."""

    def __init__(self, weight: torch.Tensor, block_size: int | None = None, padding_idx: int | None = None):
        super().__init__()
        w = weight.detach().float().cpu().numpy()
        v, d = w.shape
        if block_size is None:
            block_size = next((b for b in (128, 64, 32, 16) if d % b == 0), None)
            if block_size is None:
                raise ConfigError(
                    f"--embedding int8 needs an embedding width divisible by 16, got {d}; use --embedding fp32"
                )
        q, s = packing.quantize_int8_blockwise(w, block_size)
        self.num_embeddings, self.embedding_dim, self.block_size = v, d, block_size
        self.padding_idx = padding_idx
        self.format_name = "int8"
        self.register_buffer("data", _t((q.astype(np.int16) + 128).astype(np.uint8)))
        self.register_buffer("scales", _t(s))
        self._dense: torch.Tensor | None = None

    def dense_weight(self) -> torch.Tensor:
        """The float32 table the runtime gathers from (decoded once, cached)."""
        if self._dense is None or self._dense.device != self.data.device:
            q = self.data.to(torch.int16) - 128
            s = self.scales.repeat_interleave(self.block_size, dim=1)
            self._dense = (q.float() * s).to(self.data.device)
        return self._dense

    @property
    def weight(self) -> torch.Tensor:
        """The decoded table, for code that reads ``embed_tokens.weight`` (dtype, device, shape)."""
        return self.dense_weight()

    def packed_nbytes(self) -> int:
        return int(self.data.numel() + self.scales.numel() * 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return _Gather.apply(ids, self, self.data, self.scales)
        return F.embedding(ids, self.dense_weight())

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format=int8, block_size={self.block_size}"
