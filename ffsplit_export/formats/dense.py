"""Uncompressed formats: light ``dense``, heavy ``fp32`` / ``fp16``, ``--other-linear fp32``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._module import CompressedLinear
from .names import HeavyFormat, LightFormat, OtherLinearFormat
from .registry import WeightFormat, register_format


class DenseLinear(CompressedLinear):
    """Uncompressed weight in float32 or float16 (computed in float32)."""

    packed_names = ("w",)
    default_format = ("heavy", "")

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


class _Dense(WeightFormat):
    """A dense weight in ``dtype``: every target runs it with standard ops."""

    dtype = torch.float32

    def compress(self, weight, bias=None, *, x_norm=None, hessian=None, config=None):  # noqa: ARG002
        m = DenseLinear(weight, bias, dtype=self.dtype)
        m.format = self
        return m

    def bytes_per_weight(self, config=None) -> float:  # noqa: ARG002
        return float(torch.finfo(self.dtype).bits // 8)

    def pack_weight(self, w, mask, bias, group_size):  # noqa: ARG002
        m = DenseLinear(w, bias, dtype=self.dtype)
        m.format = self
        return m


@register_format(LightFormat.DENSE)
class LightDense(_Dense):
    """Light part kept in float32 (the exactness reference: a split that compresses nothing)."""


@register_format(HeavyFormat.FP32)
class HeavyFP32(_Dense):
    """Heavy part in float32."""


@register_format(HeavyFormat.FP16)
class HeavyFP16(_Dense):
    """Heavy part stored in float16, computed in float32 (fake-quantized through fp16 in recover)."""

    dtype = torch.float16
    quantizes = True

    def fake_quantize(self, w, trainable):  # noqa: ARG002
        return w.half().float()


@register_format(OtherLinearFormat.FP32)
class OtherLinearFP32(WeightFormat):
    """``--other-linear fp32``: the model's other linear layers stay as they are."""

    keeps_original = True

    def compress(self, weight, bias=None, *, x_norm=None, hessian=None, config=None):
        return None

    def bytes_per_weight(self, config=None) -> float:  # noqa: ARG002
        return 4.0
