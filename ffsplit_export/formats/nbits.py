"""Block-wise int8 / int4 weights in ``com.microsoft::MatMulNBits`` layout.

Light ``int8`` / ``int4``, heavy ``int8`` and ``--other-linear int8`` / ``int4``. int8 is
symmetric per output channel (stored in blocks of 128), int4 per group of ``group_size`` input
channels, symmetric or (``--int4-grid asymmetric``, ``asymmetric-mse``) with a uint4 zero point
per group (MatMulNBits' ``zero_points`` input). The codes are round-to-nearest, or GPTQ's
(``--quantizer gptq``, :mod:`.gptq`) on the same grid. ``ort-cpu`` and ``portable`` emit MatMulNBits; TensorRT has
no MatMulNBits, so those targets are rejected up front (direct callers get a dense MatMul).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from . import packing
from ._module import CompressedLinear, as_tensor, matmulnbits_node
from .gptq import GPTQOptions, Grid, gptq_dense, wants_gptq
from .names import HeavyFormat, Int4Grid, LightFormat, OtherLinearFormat, Target
from .registry import WeightFormat, dense_matmul, register_format


def int4_grid_of(config) -> Int4Grid:
    """The ``int4_grid`` a config carries (symmetric when it has none)."""
    return Int4Grid.parse(getattr(config, "int4_grid", Int4Grid.SYMMETRIC), "--int4-grid")


class NBitsLinear(CompressedLinear):
    """int8 / int4 block-wise weights in MatMulNBits layout (``com.microsoft::MatMulNBits``):
    symmetric, or with ``zero_points`` (asymmetric int4: ``(u - zero) * scale``)."""

    packed_names = ("qweight", "scales")

    def __init__(
        self,
        q: np.ndarray,
        scales: np.ndarray,
        bits: int,
        block_size: int,
        bias=None,
        zero_points: np.ndarray | None = None,
    ):
        super().__init__(q.shape[1], q.shape[0], bias)
        p = packing.pack_matmulnbits(q, scales, bits, block_size, zero_points)
        self.bits, self.block_size = bits, block_size
        self.format_name = f"int{bits}"
        self.register_buffer("qweight", as_tensor(p.b))
        self.register_buffer("scales", as_tensor(p.scales))
        # the int4 grid the codes are on (asymmetric-mse differs from asymmetric only in how the
        # packer chose each block's range; recover re-packs trained weights the same way)
        self.int4_grid = str(Int4Grid.SYMMETRIC)
        if p.zero_points is not None:
            self.register_buffer("zero_points", as_tensor(p.zero_points))
            self.packed_names = ("qweight", "scales", "zero_points")
            self.int4_grid = str(Int4Grid.ASYMMETRIC)

    @property
    def asymmetric(self) -> bool:
        """Whether the weights carry zero points (the asymmetric int4 grid)."""
        return "zero_points" in self.packed_names

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bits: int,
        block_size: int = 128,
        bias=None,
        grid: Int4Grid | str = "symmetric",
    ) -> NBitsLinear:
        """Round-to-nearest of ``weight`` on the packer's grid (``grid``: that of int4)."""
        w = weight.detach().float().cpu().numpy()
        grid = Int4Grid.parse(grid, "--int4-grid")
        if bits == 8:
            q, s = packing.quantize_int8_per_channel(w)
        elif bits == 4 and grid is not Int4Grid.SYMMETRIC:
            u, s, z = packing.quantize_int4_asymmetric(w, block_size, search=grid is Int4Grid.ASYMMETRIC_MSE)
            m = cls(u, s, bits, block_size, bias, z)
            m.int4_grid = str(grid)
            return m
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
            self.zero_points.cpu().numpy() if self.asymmetric else None,
        )

    def decode(self) -> torch.Tensor:
        return as_tensor(packing.dequantize_matmulnbits(self._packed()))


class _NBits(WeightFormat):
    bits = 8
    targets = frozenset({Target.ORT_CPU, Target.PORTABLE})
    target_need = "ONNX Runtime's MatMulNBits"
    quantizes = True
    gptq = True

    def block_size(self, config) -> int:  # noqa: ARG002
        return 128

    def grid(self, config) -> Grid:
        """The packer's grid: int8 one scale per row, int4 one per block of columns (with a zero
        point per block under ``int4_grid`` asymmetric / asymmetric-mse)."""
        if self.bits == 8:
            return Grid(8)
        g = int4_grid_of(config)
        asym = g is not Int4Grid.SYMMETRIC
        return Grid(4, self.block_size(config), zero_point=asym, search=g is Int4Grid.ASYMMETRIC_MSE)

    def compress(self, weight, bias=None, *, x_norm=None, hessian=None, config=None):  # noqa: ARG002
        grid = self.grid(config)
        if wants_gptq(config, hessian, f"this {self.role} {self.name} weight"):
            r = gptq_dense(weight, hessian, grid, GPTQOptions.of(config))
            zeros = None if r.zeros is None else r.zeros.numpy()
            m = NBitsLinear(
                r.codes.numpy(), r.scales.numpy(), self.bits, self.block_size(config), bias, zeros
            )
            if zeros is not None:
                m.int4_grid = str(int4_grid_of(config))
            m.format = self
            return m
        return self._pack(weight, bias, self.block_size(config), int4_grid_of(config))

    def _pack(self, w, bias, group_size, grid) -> NBitsLinear:
        m = NBitsLinear.from_weight(w, self.bits, group_size, bias, grid if self.bits == 4 else "symmetric")
        m.format = self
        return m

    def pack_weight(self, w, mask, bias, group_size):  # noqa: ARG002
        return self._pack(w, bias, group_size, Int4Grid.SYMMETRIC)

    def pack_trained(self, trainable):
        """The packed module of the trained weight, on the grid the source module had."""
        w = trainable.weight.detach().float().cpu()
        return self._pack(
            w, trainable.bias, trainable.group_size, getattr(trainable, "int4_grid", "symmetric")
        )

    def bytes_per_weight(self, config=None) -> float:  # noqa: ARG002
        return 1.0

    def row_overhead(self, config=None) -> float:  # noqa: ARG002
        return 4.0  # one float32 scale per row (K <= 128 per block)

    def unpack(self, module) -> dict:
        p = module._packed()
        q, scales = packing.unpack_matmulnbits(p)
        out = {"q": q, "scales": scales}
        if p.zero_points is not None:
            out["zero_points"] = packing.unpack_zero_points(p)
        return out

    def pack_arrays(self, module, arrays: dict) -> dict:
        p = packing.pack_matmulnbits(
            arrays["q"], arrays["scales"], module.bits, module.block_size, arrays.get("zero_points")
        )
        out = {"qweight": p.b, "scales": p.scales}
        if p.zero_points is not None:
            out["zero_points"] = p.zero_points
        return out

    def emit_ort_cpu(self, g, x, module, buffers):
        qweight, scales, *zero_points = buffers
        return matmulnbits_node(
            g,
            x,
            qweight,
            scales,
            k=module.in_features,
            n=module.out_features,
            bits=module.bits,
            block_size=module.block_size,
            zero_points=zero_points[0] if zero_points else None,
        )

    def emit_tensorrt(self, g, x, module, buffers):  # noqa: ARG002
        # TensorRT has no MatMulNBits: a constant dequantized weight it can fold and cast
        return dense_matmul(g, x, module.dense_weight())

    def trainable_state(self, module) -> dict:
        st = super().trainable_state(module)
        st["group_size"] = module.block_size
        st["int4_grid"] = getattr(module, "int4_grid", str(Int4Grid.SYMMETRIC))
        return st

    def fake_quantize(self, w, trainable):  # noqa: ARG002
        from .fakequant import fake_int8_rows

        return fake_int8_rows(w)


class _Int4(_NBits):
    bits = 4

    def block_size(self, config) -> int:
        return 128 if config is None else config.group_size

    def bytes_per_weight(self, config=None) -> float:
        zero = 0.5 if int4_grid_of(config) is not Int4Grid.SYMMETRIC else 0.0  # a uint4 zero point per group
        return 0.5 + (4.0 + zero) / self.block_size(config)

    def row_overhead(self, config=None) -> float:  # noqa: ARG002
        return 0.0  # the group scales are in bytes_per_weight

    def fake_quantize(self, w, trainable):
        from .fakequant import fake_int4_groups, fake_int4_groups_asymmetric

        grid = Int4Grid.parse(getattr(trainable, "int4_grid", Int4Grid.SYMMETRIC), "--int4-grid")
        if grid is not Int4Grid.SYMMETRIC:
            return fake_int4_groups_asymmetric(
                w, trainable.group_size, search=grid is Int4Grid.ASYMMETRIC_MSE
            )
        return fake_int4_groups(w, trainable.group_size)


@register_format(LightFormat.INT8)
class LightInt8(_NBits):
    """Light part in int8 per output channel."""


@register_format(LightFormat.INT4)
class LightInt4(_Int4):
    """Light part in int4 per group of ``--group-size`` input channels."""


@register_format(HeavyFormat.INT8)
class HeavyInt8(_NBits):
    """Heavy part in int8 per output channel."""


@register_format(OtherLinearFormat.INT8)
class OtherLinearInt8(_NBits):
    """The model's other linear layers in int8 per output channel."""


@register_format(OtherLinearFormat.INT4)
class OtherLinearInt4(_Int4):
    """The model's other linear layers in int4 per group of ``--group-size`` input channels."""
