"""Unstructured sparse formats: ``sparse-int8`` and ``sparse-fp32`` (bitmask + values + row_ptr).

Pruning keeps the top ``1 - light_sparsity`` of every row by Wanda or magnitude score, or runs
SparseGPT on the calibration Hessian; int8 values are round-to-nearest, or with ``--quantizer gptq``
GPTQ's codes of the survivors (with SparseGPT both errors are compensated: see
:func:`.gptq.gptq_masked`). ``ort-cpu`` and ``tensorrt`` run the ``ffsplit`` sparse
ops; ``portable`` stores the weight densely (int8 via MatMulNBits, fp32 via MatMul).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from . import packing, pruning
from ._module import CompressedLinear, as_tensor, custom_node, int8_matmulnbits_node
from .gptq import GPTQOptions, Grid, element_scales, gptq_masked, wants_gptq
from .names import LightFormat, PruneMethod
from .registry import WeightFormat, dense_matmul, register_format


class SparseLinear(CompressedLinear):
    """Unstructured sparse weight: bitmask + values (int8 with per-row scales, or float32)."""

    def __init__(self, weight: torch.Tensor, keep: torch.Tensor, int8: bool, bias=None, codes=None):
        """``codes`` = (int8 q [N, K], float32 row scales [N]) chosen elsewhere (GPTQ); default:
        round-to-nearest of ``weight`` on the kept positions."""
        super().__init__(weight.shape[1], weight.shape[0], bias)
        w = (weight.detach().float() * keep).cpu().numpy()
        keep_np = keep.cpu().numpy().astype(bool)
        if int8:
            q, s = packing.quantize_int8_per_channel(w) if codes is None else codes
            p = packing.pack_bitmask(q, keep_np)
            self.register_buffer("scales", as_tensor(s))
            self.packed_names = ("mask", "values", "row_ptr", "scales")
            self.op_type = "SparseMatMulInt8"
            self.format_name = "sparse-int8"
        else:
            p = packing.pack_bitmask(w, keep_np)
            self.packed_names = ("mask", "values", "row_ptr")
            self.op_type = "SparseMatMulFP32"
            self.format_name = "sparse-fp32"
        self.register_buffer("mask", as_tensor(p.mask))
        self.register_buffer("values", as_tensor(p.values))
        self.register_buffer("row_ptr", as_tensor(p.row_ptr))

    @property
    def sparsity(self) -> float:
        total = self.in_features * self.out_features
        return 1.0 - self.values.numel() / total if total else 0.0

    def decode(self) -> torch.Tensor:
        from ..ops import decode_weight

        arrays = [getattr(self, n).cpu().numpy() for n in self.packed_names]
        return as_tensor(decode_weight(self.op_type, self.in_features, *arrays))

    def keep_mask(self) -> torch.Tensor:
        """bool [N, K]: the stored positions."""
        keep = np.unpackbits(self.mask.cpu().numpy(), axis=1, bitorder="little", count=self.in_features)
        return torch.from_numpy(keep.astype(bool))


def quantize_pruned(weight, w2, keep, hessian, config, grid: Grid, scales: torch.Tensor, scale_matrix=None):
    """GPTQ codes of the kept entries (mask fixed) on the per-weight scales ``scale_matrix`` (default:
    ``scales`` per row / group of ``grid``): after SparseGPT the joint prune-and-quantize pass from
    the original ``weight`` (or, with activation order, GPTQ of its updated ``w2``); after Wanda or
    magnitude pruning GPTQ of the pruned ``w2``. See :func:`.gptq.gptq_masked`."""
    if scale_matrix is None:
        scale_matrix = element_scales(scales, grid, weight.shape[1])
    joint = config.prune_method is PruneMethod.SPARSEGPT
    return gptq_masked(
        w2, keep, hessian, grid, scale_matrix, GPTQOptions.of(config), original=weight if joint else None
    )


def row_scales_int8(w2: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The per-row int8 scales that round-to-nearest packing of the pruned weight uses."""
    _, s = packing.quantize_int8_per_channel((w2.detach().float() * keep).cpu().numpy())
    return torch.from_numpy(s)


def prune_keep(w, config, x_norm, hessian, structured: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(possibly updated weight, keep mask) of ``w`` under ``config``'s pruning method and sparsity."""
    from .sparsegpt import sparsegpt_prune

    method = config.prune_method
    if method is PruneMethod.SPARSEGPT:
        if hessian is None:
            raise ConfigError("--prune-method sparsegpt needs calibration statistics with Hessians")
        o = GPTQOptions.of(config)
        return sparsegpt_prune(
            w,
            hessian,
            config.light_sparsity,
            nm=(2, 4) if structured else None,
            block_size=o.block_size,
            damp=o.damp,
        )
    if method is PruneMethod.WANDA and x_norm is not None:
        score = pruning.wanda_score(w, x_norm)
    else:
        score = pruning.magnitude_score(w)
    keep = pruning.nm_mask(score, 2, 4) if structured else pruning.topk_row_mask(score, config.light_sparsity)
    return w, keep


class _Sparse(WeightFormat):
    pruned = True
    int8 = True
    op_type = ""

    def compress(self, weight, bias=None, *, x_norm=None, hessian=None, config=None):
        gptq = self.int8 and wants_gptq(config, hessian, f"this light {self.name} weight")
        w2, keep = prune_keep(weight, config, x_norm, hessian, structured=False)
        if not gptq:
            return self.pack_weight(w2, keep, bias, 128)
        s = row_scales_int8(w2, keep)
        r = quantize_pruned(weight, w2, keep, hessian, config, Grid(8), s)
        m = SparseLinear(r.weight, keep, int8=True, bias=bias, codes=(r.codes.numpy(), s.numpy()))
        m.format = self
        return m

    def pack_weight(self, w, mask, bias, group_size):  # noqa: ARG002
        m = SparseLinear(w, mask, int8=self.int8, bias=bias)
        m.format = self
        return m

    def measured_sparsity(self, module) -> float:
        return module.sparsity

    def unpack(self, module) -> dict:
        p = packing.BitmaskSparse(
            module.mask.cpu().numpy(),
            module.values.cpu().numpy(),
            module.row_ptr.cpu().numpy(),
            module.in_features,
        )
        out = {"weight": packing.unpack_bitmask(p), "keep": module.keep_mask().numpy()}
        if self.int8:
            out["scales"] = module.scales.cpu().numpy().copy()
        return out

    def pack_arrays(self, module, arrays: dict) -> dict:  # noqa: ARG002
        p = packing.pack_bitmask(arrays["weight"], arrays["keep"])
        out = {"mask": p.mask, "values": p.values, "row_ptr": p.row_ptr}
        if self.int8:
            out["scales"] = arrays["scales"]
        return out

    def emit_ort_cpu(self, g, x, module, buffers):
        return custom_node(g, self.op_type, x, *buffers)

    def emit_tensorrt(self, g, x, module, buffers):
        return custom_node(g, self.op_type, x, *buffers)

    def trainable_state(self, module) -> dict:
        st = super().trainable_state(module)
        keep = module.keep_mask().to(st["params"]["weight"].device)
        st.update(mask=keep, target_mask=keep.clone(), target_sparsity=float(module.sparsity))
        return st


@register_format(LightFormat.SPARSE_INT8)
class SparseInt8(_Sparse):
    """Bitmask + int8 values with per-row scales (``ffsplit::SparseMatMulInt8``)."""

    op_type = "SparseMatMulInt8"
    quantizes = True
    gptq = True

    def bytes_per_weight(self, config=None) -> float:
        return (1.0 - config.light_sparsity) + 0.125

    def row_overhead(self, config=None) -> float:  # noqa: ARG002
        return 12.0  # row_ptr int64 + scale float32

    def emit_portable(self, g, x, module, buffers):  # noqa: ARG002
        # dense int8 for stock ONNX Runtime: compressed on disk, no sparse speed-up
        q = np.rint(module.dense_weight().numpy() / module.scales.numpy()[:, None]).astype(np.int8)
        return int8_matmulnbits_node(g, x, q, module.scales.numpy(), module.in_features)

    def fake_quantize(self, w, trainable):  # noqa: ARG002
        from .fakequant import fake_int8_rows

        return fake_int8_rows(w)


@register_format(LightFormat.SPARSE_FP32)
class SparseFP32(_Sparse):
    """Bitmask + float32 values (``ffsplit::SparseMatMulFP32``)."""

    op_type = "SparseMatMulFP32"
    int8 = False

    def bytes_per_weight(self, config=None) -> float:
        return 4.0 * (1.0 - config.light_sparsity) + 0.125

    def row_overhead(self, config=None) -> float:  # noqa: ARG002
        return 8.0  # row_ptr int64

    def emit_portable(self, g, x, module, buffers):  # noqa: ARG002
        return dense_matmul(g, x, module.dense_weight())
