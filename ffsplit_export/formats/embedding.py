"""Token embedding formats (``--embedding``): ``fp32`` (unchanged) and block-wise ``int8`` / ``int4``
(``com.microsoft::GatherBlockQuantized``, so TensorRT cannot carry them).

``int4`` stores two codes per byte (low nibble first, the default zero point 8, codes -7..7 as
MatMulNBits' int4), one float32 scale per block of columns. When the model ties its lm_head to the
embedding and ``--other-linear int4`` quantizes that lm_head with a block size that divides the
width, the table is stored once: :class:`SharedInt4Embedding` gathers from the lm_head's
MatMulNBits codes and scales (a ``Flatten`` of ``B`` [V, D/B, B/2] to [V, D/2] in the graph, no
copy on disk), and its PyTorch forward decodes those same codes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, FormatError
from . import packing
from ._module import CompressedLinear, as_tensor
from .names import EmbeddingFormat, Target
from .nbits import NBitsLinear
from .registry import WeightFormat, register_format

_BLOCKS = (128, 64, 32, 16)  # GatherBlockQuantized: a power of two >= 16


def embedding_block_size(
    width: int, bits: int, block_size: int | None = None, prefer: int | None = None
) -> int:
    """The block size of a ``width``-wide table in ``bits`` (8 or 4).

    ``block_size`` given: it must be a power of two >= 16 that divides ``width`` (else ConfigError).
    Otherwise the largest power of two <= ``prefer`` (int8: 128, int4: 32) that divides ``width``.
    int4 also needs an even width (two codes per byte).
    """
    fmt = f"--embedding int{bits}"
    if bits == 4 and width % 2:
        raise ConfigError(
            f"{fmt} packs two codes per byte and needs an even embedding width, got {width}; "
            "use --embedding int8 or fp32"
        )
    if block_size is not None:
        if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
            raise ConfigError(
                f"{fmt}: block size {block_size} is not a power of two >= 16; use one of {_BLOCKS}"
            )
        if width % block_size:
            ok = [b for b in _BLOCKS if width % b == 0]
            raise ConfigError(
                f"{fmt}: block size {block_size} does not divide the embedding width {width}; "
                + (f"use one of {ok}" if ok else "use --embedding fp32")
            )
        return int(block_size)
    prefer = prefer or (128 if bits == 8 else 32)
    found = next((b for b in _BLOCKS if b <= prefer and width % b == 0), None)
    if found is None:
        raise ConfigError(
            f"{fmt} needs an embedding width divisible by 16, got {width}; use --embedding fp32"
        )
    return found


def pack_int4_rows(q: np.ndarray) -> np.ndarray:
    """Signed int4 codes ``q`` [V, D] (D even, -8..7) as uint8 [V, D/2]: code + 8, column 2j in the
    low nibble of byte j, column 2j+1 in the high nibble (GatherBlockQuantized's uint8 layout)."""
    q = np.asarray(q)
    if q.ndim != 2 or q.shape[1] % 2:
        raise FormatError(f"int4 rows must be [V, D] with D even, got shape {q.shape}")
    if q.size and (q.min() < -8 or q.max() > 7):
        raise FormatError("int4 codes out of range [-8, 7]")
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def unpack_int4_rows(data: np.ndarray) -> np.ndarray:
    """int8 [V, 2 * data.shape[1]]: the signed codes of :func:`pack_int4_rows`."""
    data = np.asarray(data, np.uint8)
    u = np.stack([data & 0x0F, data >> 4], axis=2).reshape(data.shape[0], -1)
    return (u.astype(np.int16) - 8).astype(np.int8)


def _out_type(y, ids, width: int) -> None:
    try:
        sizes = ids.type().varyingSizes()
        y.setType(ids.type().with_dtype(torch.float32).with_sizes(list(sizes) + [width]))
    except RuntimeError:
        pass


class _Gather(torch.autograd.Function):
    """rows of the quantized table; its symbolic emits ``com.microsoft::GatherBlockQuantized``."""

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
            bits_i=module.bits,
        )
        _out_type(y, ids, module.embedding_dim)
        return y


class QuantizedEmbedding(nn.Module):
    """Token embedding table in symmetric block-wise int8 or int4, float32 scales per ``block_size``
    columns, exported as ``com.microsoft::GatherBlockQuantized``.

    int8: uint8 codes [V, D] with the implied zero point 128. int4: uint8 [V, D/2], two codes per
    byte (low nibble first) with the implied zero point 8, codes -7..7.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        block_size: int | None = None,
        padding_idx: int | None = None,
        bits: int = 8,
    ):
        super().__init__()
        if bits not in (8, 4):
            raise ConfigError(f"bits={bits} is not supported for a quantized embedding; use 8 or 4")
        w = weight.detach().float().cpu().numpy()
        v, d = w.shape
        block_size = embedding_block_size(d, bits, block_size)
        if bits == 8:
            q, s = packing.quantize_int8_blockwise(w, block_size)
            data = (q.astype(np.int16) + 128).astype(np.uint8)
        else:
            q, s = packing.quantize_int4_groupwise(w, block_size)
            data = pack_int4_rows(q)
        self.num_embeddings, self.embedding_dim, self.block_size, self.bits = v, d, block_size, bits
        self.padding_idx = padding_idx
        self.format_name = f"int{bits}"
        self.register_buffer("data", as_tensor(data))
        self.register_buffer("scales", as_tensor(s))
        self._dense: torch.Tensor | None = None

    @property
    def format(self) -> WeightFormat:
        from .registry import get_format

        return get_format(EmbeddingFormat(self.format_name))

    def codes(self) -> torch.Tensor:
        """int16 [V, D]: the signed codes."""
        if self.bits == 8:
            return self.data.to(torch.int16) - 128
        d = self.data.to(torch.int16)
        return torch.stack([d & 0x0F, d >> 4], dim=-1).reshape(d.shape[0], -1) - 8

    def dense_weight(self) -> torch.Tensor:
        """The float32 table the runtime gathers from (decoded once, cached)."""
        if self._dense is None or self._dense.device != self.data.device:
            s = self.scales.repeat_interleave(self.block_size, dim=1)
            self._dense = (self.codes().float() * s).to(self.data.device)
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
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, format={self.format_name}, "
            f"block_size={self.block_size}"
        )


# ------------------------------------------------------------------------------ shared with lm_head


def shareable_lm_head(module, num_embeddings: int, embedding_dim: int) -> bool:
    """Whether ``module`` (a quantized lm_head) holds an int4 table an embedding can gather from:
    4-bit MatMulNBits codes [V, D/B, B/2] whose block size B divides the width D (no padding)."""
    return (
        getattr(module, "bits", None) == 4
        and hasattr(module, "qweight")
        and hasattr(module, "scales")
        and (module.out_features, module.in_features) == (num_embeddings, embedding_dim)
        and embedding_dim % 2 == 0
        and embedding_dim % module.block_size == 0
    )


class TiedInt4Head(NBitsLinear):
    """An int4 MatMulNBits lm_head whose codes and scales the tied token embedding also gathers from.

    The same buffers as the :class:`NBitsLinear` it replaces, except that ``scales`` is stored
    [V, D/B, 1]: ``GatherBlockQuantized`` reads ``B`` [V, D/B, B/2] as it is (``quantize_axis`` 2)
    and needs scales of the same rank, MatMulNBits takes [V, D/B], so the lm_head's node reads them
    through a ``Flatten`` (which torch.onnx leaves alone and ONNX Runtime folds when the session
    loads: V * D/B floats). No node reshapes ``B``: ONNX Runtime would fold such a reshape of the
    table into a copy and keep the table resident next to the MatMulNBits' pre-packed form
    (measured on SmolLM2: session + first run RSS 158.6 MiB with a Flatten of ``B``, 129.4 MiB
    this way, 115.9 MiB with two tables in a 13.6 MiB larger file).
    """

    def __init__(self, src: NBitsLinear):
        CompressedLinear.__init__(self, src.in_features, src.out_features, src.bias)
        self.bits, self.block_size, self.format_name = src.bits, src.block_size, src.format_name
        self.register_buffer("qweight", src.qweight)
        self.register_buffer("scales", src.scales.reshape(src.out_features, -1, 1))
        self.format = src.format
        self.int4_grid = getattr(src, "int4_grid", "symmetric")
        self.packed_names = src.packed_names
        if src.asymmetric:
            # MatMulNBits reads the zero points packed two blocks per byte along the row; the gather
            # needs one per block, [V, D/B, 1] (a nibble per byte): V * D/B bytes more, not a table
            self.register_buffer("zero_points", src.zero_points)
            nb = src.qweight.shape[1]
            zp = packing.unpack_zero_points(
                packing.NBits(src.qweight.numpy(), src.scales.numpy(), src.in_features, 4, src.block_size,
                              src.zero_points.numpy())
            )  # fmt: skip
            self.register_buffer("gather_zero_points", as_tensor(zp.reshape(src.out_features, nb, 1)))
        self.tied_input_embedding = True

    def onnx_nodes(self, g, x, qweight, scales, *zero_points):
        return super().onnx_nodes(g, x, qweight, g.op("Flatten", scales, axis_i=1), *zero_points)


class _SharedGather(torch.autograd.Function):
    """rows of a tied lm_head's int4 MatMulNBits table, exported as GatherBlockQuantized on its initializers."""

    @staticmethod
    def forward(ctx, ids, module, qweight, scales, zero_points=None, gather_zero_points=None):  # noqa: ARG004
        # a fresh decode of detached copies of the same codes: touching the lm_head's tensors
        # themselves inside this traced Function (its cached table, or ``.cpu()``, which returns
        # the same tensor) re-binds them in torch.onnx's tracer, and the lm_head's own MatMulNBits
        # then fails to find them (``unordered_map::at``)
        src = module.source
        q, s = qweight.detach().numpy(), scales.detach().numpy().reshape(-1)
        z = None if zero_points is None else zero_points.detach().numpy()
        table = packing.dequantize_matmulnbits(packing.NBits(q, s, src.in_features, 4, src.block_size, z))
        return F.embedding(ids, as_tensor(table))

    @staticmethod
    def symbolic(g, ids, module, qweight, scales, zero_points=None, gather_zero_points=None):  # noqa: ARG004
        src = module.source
        v, d, block = module.num_embeddings, module.embedding_dim, src.block_size
        const = lambda t: g.op("Constant", value_t=torch.tensor(t, dtype=torch.int64))  # noqa: E731
        if src.scales.dim() != 3:  # a plain NBitsLinear (e.g. repacked after recover): a reshaped copy
            scales = g.op("Reshape", scales, const([v, d // block, 1]))
        # B [V, D/B, B/2] as stored (codes packed along the last axis, blocks of B along it)
        zp = [] if gather_zero_points is None else [gather_zero_points]  # [V, D/B, 1], a nibble a byte
        y = g.op(
            "com.microsoft::GatherBlockQuantized",
            qweight,
            ids,
            scales,
            *zp,
            gather_axis_i=0,
            quantize_axis_i=2,
            block_size_i=block,
            bits_i=4,
        )
        # [..., D/B, B] -> [..., D]
        out = g.op("Reshape", y, g.op("Concat", g.op("Shape", ids), const([d]), axis_i=0))
        _out_type(out, ids, d)
        return out


class SharedInt4Embedding(nn.Module):
    """The token embedding of a model whose lm_head is tied to it, read from the lm_head's int4
    MatMulNBits codes and scales (one table in the file).

    The lm_head is looked up as ``getattr(owner, attr)`` at every use, so a later replacement of
    the module (``recover``'s trainable form and its packed result) is followed. The forward
    decodes exactly the codes the lm_head multiplies by (whether RTN or GPTQ chose them).
    """

    format_name = "int4"
    bits = 4

    def __init__(self, owner: nn.Module, attr: str, padding_idx: int | None = None):
        super().__init__()
        src = getattr(owner, attr)
        v, d = src.out_features, src.in_features
        if not shareable_lm_head(src, v, d):
            raise FormatError(
                f"{type(src).__name__} {attr!r} is not an int4 MatMulNBits table whose block size divides "
                f"its width {d}; quantize it with --other-linear int4 at a --group-size dividing {d}"
            )
        self._owner = (owner, attr)  # a tuple: not registered as a submodule (no second copy)
        self.shared_with = attr
        self.num_embeddings, self.embedding_dim = v, d
        self.padding_idx = padding_idx

    @property
    def source(self) -> nn.Module:
        owner, attr = self._owner
        return getattr(owner, attr)

    @property
    def block_size(self) -> int:
        return int(self.source.block_size)

    @property
    def format(self) -> WeightFormat:
        from .registry import get_format

        return get_format(EmbeddingFormat.INT4)

    def dense_weight(self) -> torch.Tensor:
        """The float32 [V, D] table: the lm_head's decoded weight (its fake-quantized one while trained)."""
        src = self.source
        if hasattr(src, "effective_weight"):  # recover's TrainableLinear
            return src.effective_weight()
        return src.dense_weight()

    @property
    def weight(self) -> torch.Tensor:
        return self.dense_weight()

    def packed_nbytes(self) -> int:
        return 0  # the table is the lm_head's

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            src = self.source
            if not shareable_lm_head(src, self.num_embeddings, self.embedding_dim):
                raise FormatError(
                    f"the embedding shares {self.shared_with!r}, which is now a {type(src).__name__} "
                    "without an int4 MatMulNBits table; re-run quantize_embeddings_ after replacing it"
                )
            if getattr(src, "asymmetric", False):
                if not hasattr(src, "gather_zero_points"):
                    raise FormatError(
                        f"the embedding shares {self.shared_with!r}, an int4 table with zero points that "
                        "is not a TiedInt4Head; re-run quantize_embeddings_ after replacing it"
                    )
                return _SharedGather.apply(
                    ids, self, src.qweight, src.scales, src.zero_points, src.gather_zero_points
                )
            return _SharedGather.apply(ids, self, src.qweight, src.scales)
        return F.embedding(ids, self.dense_weight().to(ids.device))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format=int4, shared_with={self.shared_with}"


# ------------------------------------------------------------------------------ formats


@register_format(EmbeddingFormat.FP32)
class EmbeddingFP32(WeightFormat):
    """The embedding table stays as it is."""

    keeps_original = True

    def compress(self, weight, bias=None, *, x_norm=None, hessian=None, config=None):
        return None

    def bytes_per_weight(self, config=None) -> float:  # noqa: ARG002
        return 4.0


class _QuantizedEmbeddingFormat(WeightFormat):
    bits = 8
    targets = frozenset({Target.ORT_CPU, Target.PORTABLE})
    target_need = "ONNX Runtime's GatherBlockQuantized"

    def compress(
        self, weight, bias=None, *, x_norm=None, hessian=None, config=None, padding_idx=None, block_size=None
    ):  # noqa: ARG002
        """A :class:`QuantizedEmbedding` of the table ``weight[V, D]`` (``bias`` unused); int4 blocks
        follow ``config.group_size`` where it divides the width."""
        prefer = getattr(config, "group_size", None) if self.bits == 4 else None
        block = embedding_block_size(int(weight.shape[1]), self.bits, block_size, prefer=prefer)
        return QuantizedEmbedding(weight, block, padding_idx, self.bits)

    def reference_forward(self, module, ids):
        return module(ids)

    def unpack(self, module) -> dict:
        if isinstance(module, SharedInt4Embedding):
            q, s = packing.unpack_matmulnbits(module.source._packed())
            return {"q": q, "scales": s}
        return {"q": module.codes().numpy().astype(np.int8), "scales": module.scales.cpu().numpy().copy()}

    def pack_arrays(self, module, arrays: dict) -> dict:  # noqa: ARG002
        q = arrays["q"]
        data = (q.astype(np.int16) + 128).astype(np.uint8) if self.bits == 8 else pack_int4_rows(q)
        return {"data": data, "scales": arrays["scales"]}


@register_format(EmbeddingFormat.INT8)
class EmbeddingInt8(_QuantizedEmbeddingFormat):
    """Block-wise int8 rows (block 128, 64, 32 or 16: the largest that divides the width)."""

    def bytes_per_weight(self, config=None) -> float:  # noqa: ARG002
        return 1.0  # plus one float32 scale per block


@register_format(EmbeddingFormat.INT4)
class EmbeddingInt4(_QuantizedEmbeddingFormat):
    """Block-wise int4 rows, two codes per byte: block ``--group-size`` (default 32) or the largest
    smaller power of two that divides the width. A tied lm_head quantized by ``--other-linear int4``
    shares its table (:class:`SharedInt4Embedding`, see ``split.quantize_embeddings_``)."""

    bits = 4

    def bytes_per_weight(self, config=None) -> float:
        block = 32 if config is None else getattr(config, "group_size", 32)
        return 0.5 + 4.0 / block
