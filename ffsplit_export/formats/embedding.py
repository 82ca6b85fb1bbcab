"""Token embedding formats (``--embedding``): ``fp32`` (unchanged) and block-wise ``int8``
(``com.microsoft::GatherBlockQuantized``, so TensorRT cannot carry it)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import packing
from ._module import as_tensor
from .names import EmbeddingFormat, Target
from .registry import WeightFormat, register_format


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
        self.register_buffer("data", as_tensor((q.astype(np.int16) + 128).astype(np.uint8)))
        self.register_buffer("scales", as_tensor(s))
        self._dense: torch.Tensor | None = None

    @property
    def format(self) -> WeightFormat:
        from .registry import get_format

        return get_format(EmbeddingFormat.INT8)

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


@register_format(EmbeddingFormat.FP32)
class EmbeddingFP32(WeightFormat):
    """The embedding table stays as it is."""

    keeps_original = True

    def compress(self, weight, bias=None, *, x_norm=None, hessian=None, config=None):
        return None

    def bytes_per_weight(self, config=None) -> float:  # noqa: ARG002
        return 4.0


@register_format(EmbeddingFormat.INT8)
class EmbeddingInt8(WeightFormat):
    """Block-wise int8 rows (block 128, 64, 32 or 16: the largest that divides the width)."""

    targets = frozenset({Target.ORT_CPU, Target.PORTABLE})
    target_need = "ONNX Runtime's GatherBlockQuantized"

    def compress(self, weight, bias=None, *, x_norm=None, hessian=None, config=None, padding_idx=None):  # noqa: ARG002
        """A :class:`QuantizedEmbedding` of the table ``weight[V, D]`` (``bias`` unused)."""
        return QuantizedEmbedding(weight, padding_idx=padding_idx)

    def bytes_per_weight(self, config=None) -> float:  # noqa: ARG002
        return 1.0  # plus one float32 scale per block

    def reference_forward(self, module, ids):
        return module(ids)

    def unpack(self, module) -> dict:
        q = (module.data.cpu().numpy().astype(np.int16) - 128).astype(np.int8)
        return {"q": q, "scales": module.scales.cpu().numpy().copy()}

    def pack_arrays(self, module, arrays: dict) -> dict:  # noqa: ARG002
        return {"data": (arrays["q"].astype(np.int16) + 128).astype(np.uint8), "scales": arrays["scales"]}
