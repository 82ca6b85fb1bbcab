"""``sparse-int4``: bitmask + int4 codes of the kept weights, float32 scales per group of kept values.

About 3 bits per weight at 50 % sparsity (1 mask bit + 4 bits per kept weight + a 32-bit scale
per ``group_size`` kept weights). Compression prunes with the configured method (magnitude /
Wanda / SparseGPT, :func:`.sparse.prune_keep`), then quantizes the survivors round-to-nearest,
symmetric, per group of ``--group-size`` kept values of a row (in column order); with
``--quantizer gptq`` the same scales, and GPTQ's codes (with SparseGPT: the joint pass).

Targets: ``ort-cpu`` runs ``ffsplit::SparseMatMulInt4``. ``portable`` stores the decoded weight
as a dense float32 MatMul: the group scales follow kept values, not column blocks, so neither
MatMulNBits int4 nor int8 (one scale per block of columns) can hold the weight exactly; the
dense product reproduces the op's output (float32 summation order only) at 4 bytes per weight.
``tensorrt`` runs the same node (plus the plugin attributes) on the Triton kernel of
:mod:`ffsplit_export.trt.kernels` (``group_size`` becomes a plugin field).
"""

from __future__ import annotations

import numpy as np
import torch

from . import packing
from ._module import CompressedLinear, as_tensor, custom_node
from .gptq import Grid, wants_gptq
from .names import LightFormat, Target
from .registry import WeightFormat, dense_matmul, register_format
from .sparse import prune_keep, quantize_pruned

OP_TYPE = "SparseMatMulInt4"


class SparseInt4Linear(CompressedLinear):
    """Bitmask + int4 codes (nibble stream) + row_ptr + group scales (``ffsplit::SparseMatMulInt4``)."""

    packed_names = ("mask", "values", "row_ptr", "scales")
    format_name = "sparse-int4"
    op_type = OP_TYPE

    def __init__(self, p: packing.SparseInt4, bias=None):
        super().__init__(p.k, p.mask.shape[0], bias)
        self.group_size = int(p.group_size)
        for name in self.packed_names:
            self.register_buffer(name, as_tensor(getattr(p, name)))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, keep: torch.Tensor, group_size: int, bias=None):
        w = weight.detach().float().cpu().numpy()
        keep_np = keep.detach().cpu().numpy().astype(bool)
        q, scales = packing.quantize_sparse_int4(w, keep_np, group_size)
        return cls(packing.pack_sparse_int4(q, keep_np, scales, group_size), bias)

    def packed(self) -> packing.SparseInt4:
        a = {n: getattr(self, n).cpu().numpy() for n in self.packed_names}
        return packing.SparseInt4(k=self.in_features, group_size=self.group_size, **a)

    @property
    def sparsity(self) -> float:
        total = self.in_features * self.out_features
        return 1.0 - int(self.row_ptr[-1]) / total if total else 0.0

    def decode(self) -> torch.Tensor:
        return as_tensor(packing.dequantize_sparse_int4(self.packed()))

    def keep_mask(self) -> torch.Tensor:
        keep = np.unpackbits(self.mask.cpu().numpy(), axis=1, bitorder="little", count=self.in_features)
        return torch.from_numpy(keep.astype(bool))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def fake_sparse_int4(w: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """The rounding of :func:`packing.quantize_sparse_int4` in PyTorch (kept entries of ``w``, groups
    of ``group_size`` kept values per row; zero elsewhere)."""
    n, k = w.shape
    mask = mask.to(torch.bool)
    rank = torch.cumsum(mask.to(torch.int64), dim=1) - 1
    n_grp = max(1, -(-k // group_size))
    grp = (
        torch.where(mask, rank // group_size, torch.zeros_like(rank))
        + torch.arange(n, device=w.device)[:, None] * n_grp
    )
    a = torch.where(mask, w.abs(), torch.zeros_like(w))
    amax = torch.zeros(n * n_grp, dtype=w.dtype, device=w.device).scatter_reduce(
        0, grp.reshape(-1), a.reshape(-1), reduce="amax"
    )
    scale = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))[grp]
    q = torch.clamp(torch.round(w / scale), -7, 7) * scale
    return torch.where(mask, q, torch.zeros_like(q))


@register_format(LightFormat.SPARSE_INT4)
class SparseInt4(WeightFormat):
    """Bitmask + int4 codes with group-wise scales over the kept values (``ffsplit::SparseMatMulInt4``)."""

    pruned = True
    quantizes = True
    gptq = True
    targets = frozenset({Target.ORT_CPU, Target.PORTABLE, Target.TENSORRT})
    target_need = "the SparseMatMulInt4 kernel (ONNX Runtime plugin or TensorRT Triton plugin)"

    @staticmethod
    def group_size(config) -> int:
        return 32 if config is None else int(config.group_size)

    def compress(self, weight, bias=None, *, x_norm=None, hessian=None, config=None):
        gptq = wants_gptq(config, hessian, "this light sparse-int4 weight")
        w2, keep = prune_keep(weight, config, x_norm, hessian, structured=False)
        gs = self.group_size(config)
        if not gptq:
            return self.pack_weight(w2, keep, bias, gs)
        # the scales of round-to-nearest packing of the pruned weight, fixed; GPTQ picks the codes
        keep_np = keep.cpu().numpy().astype(bool)
        q0, scales = packing.quantize_sparse_int4((w2.float() * keep).cpu().numpy(), keep_np, gs)
        smat = torch.from_numpy(
            packing.sparse_int4_scale_matrix(packing.pack_sparse_int4(q0, keep_np, scales, gs))
        )
        r = quantize_pruned(weight, w2, keep, hessian, config, Grid(4), None, scale_matrix=smat)
        m = SparseInt4Linear(packing.pack_sparse_int4(r.codes.numpy(), keep_np, scales, gs), bias)
        m.format = self
        return m

    def pack_weight(self, w, mask, bias, group_size):
        if mask is None:
            mask = w != 0
        m = SparseInt4Linear.from_weight(w, mask, group_size, bias)
        m.format = self
        return m

    def bytes_per_weight(self, config=None) -> float:
        kept = 1.0 - config.light_sparsity
        return 0.5 * kept + 0.125 + 4.0 * kept / self.group_size(config)

    def row_overhead(self, config=None) -> float:
        return 8.0 + 2.0  # row_ptr int64 + half a scale for the row's last, short group

    def measured_sparsity(self, module) -> float:
        return module.sparsity

    def unpack(self, module) -> dict:
        q, keep, scales = packing.unpack_sparse_int4(module.packed())
        return {"q": q, "keep": keep, "scales": scales}

    def pack_arrays(self, module, arrays: dict) -> dict:
        p = packing.pack_sparse_int4(arrays["q"], arrays["keep"], arrays["scales"], module.group_size)
        return {n: getattr(p, n) for n in module.packed_names}

    def emit_ort_cpu(self, g, x, module, buffers):
        return custom_node(g, OP_TYPE, x, *buffers, group_size_i=module.group_size)

    def emit_tensorrt(self, g, x, module, buffers):
        return custom_node(g, OP_TYPE, x, *buffers, group_size_i=module.group_size)

    def emit_portable(self, g, x, module, buffers):  # noqa: ARG002
        return dense_matmul(g, x, module.dense_weight())

    def trainable_state(self, module) -> dict:
        st = super().trainable_state(module)
        keep = module.keep_mask().to(st["params"]["weight"].device)
        st.update(
            mask=keep,
            target_mask=keep.clone(),
            target_sparsity=float(module.sparsity),
            group_size=module.group_size,
        )
        return st

    def fake_quantize(self, w, trainable):
        mask = trainable.mask if trainable.mask is not None else w != 0
        return fake_sparse_int4(w, mask, trainable.group_size)
