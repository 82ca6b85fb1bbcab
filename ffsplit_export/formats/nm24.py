"""2:4 structured sparse int8 (``2:4-int8``): two kept int8 values per group of four, per-row scales.

``ort-cpu`` and ``tensorrt`` run ``ffsplit::Sparse24MatMulInt8`` (with ``--trt-dense-24``,
TensorRT gets dense 2:4-pattern weights for its sparse tensor cores instead); ``portable``
stores the weight as dense int8 MatMulNBits.
"""

from __future__ import annotations

import numpy as np
import torch

from . import packing
from ._module import CompressedLinear, as_tensor, custom_node, int8_matmulnbits_node
from .gptq import Grid, wants_gptq
from .names import LightFormat
from .registry import WeightFormat, register_format
from .sparse import prune_keep, quantize_pruned, row_scales_int8


class NM24Linear(CompressedLinear):
    """2:4 structured sparse int8 weight with per-row scales."""

    packed_names = ("values", "meta", "scales")
    op_type = "Sparse24MatMulInt8"
    format_name = "2:4-int8"

    def __init__(self, weight: torch.Tensor, keep: torch.Tensor, bias=None, codes=None):
        """``codes`` = (int8 q [N, K] in the 2:4 pattern, float32 row scales [N]) chosen elsewhere
        (GPTQ); default: round-to-nearest of ``weight`` on the kept positions."""
        super().__init__(weight.shape[1], weight.shape[0], bias)
        w = (weight.detach().float() * keep).cpu().numpy()
        q, s = packing.quantize_int8_per_channel(w) if codes is None else codes
        p = packing.pack_nm24(q)
        self.register_buffer("values", as_tensor(p.values))
        self.register_buffer("meta", as_tensor(p.meta))
        self.register_buffer("scales", as_tensor(s))

    def decode(self) -> torch.Tensor:
        from ..ops import decode_weight

        arrays = [getattr(self, n).cpu().numpy() for n in self.packed_names]
        return as_tensor(decode_weight(self.op_type, self.in_features, *arrays))

    def keep_mask(self) -> torch.Tensor:
        """bool [N, K]: the stored positions, whatever their value."""
        from ..ops import decode_weight

        vals = np.ones_like(self.values.cpu().numpy())
        keep = decode_weight(
            self.op_type,
            self.in_features,
            vals,
            self.meta.cpu().numpy(),
            np.ones(self.out_features, np.float32),
        )
        return torch.from_numpy(keep != 0)


@register_format(LightFormat.NM24_INT8)
class NM24Int8(WeightFormat):
    """``ffsplit::Sparse24MatMulInt8``."""

    pruned = True
    structured = True
    quantizes = True
    gptq = True

    def compress(self, weight, bias=None, *, x_norm=None, hessian=None, config=None):
        gptq = wants_gptq(config, hessian, f"this light {self.name} weight")
        w2, keep = prune_keep(weight, config, x_norm, hessian, structured=True)
        if not gptq:
            return self.pack_weight(w2, keep, bias, 128)
        s = row_scales_int8(w2, keep)
        r = quantize_pruned(weight, w2, keep, hessian, config, Grid(8), s)
        m = NM24Linear(r.weight, keep, bias, codes=(r.codes.numpy(), s.numpy()))
        m.format = self
        return m

    def pack_weight(self, w, mask, bias, group_size):  # noqa: ARG002
        m = NM24Linear(w, mask, bias)
        m.format = self
        return m

    def bytes_per_weight(self, config=None) -> float:  # noqa: ARG002
        return 0.5 + 0.125

    def row_overhead(self, config=None) -> float:  # noqa: ARG002
        return 4.0  # scale float32

    def measured_sparsity(self, module) -> float:  # noqa: ARG002
        return 0.5

    def unpack(self, module) -> dict:
        p = packing.NM24(module.values.cpu().numpy(), module.meta.cpu().numpy(), module.in_features)
        return {"q": packing.unpack_nm24(p), "scales": module.scales.cpu().numpy().copy()}

    def pack_arrays(self, module, arrays: dict) -> dict:  # noqa: ARG002
        p = packing.pack_nm24(arrays["q"])
        return {"values": p.values, "meta": p.meta, "scales": arrays["scales"]}

    def emit_ort_cpu(self, g, x, module, buffers):
        return custom_node(g, module.op_type, x, *buffers)

    def emit_portable(self, g, x, module, buffers):  # noqa: ARG002
        q = np.rint(module.dense_weight().numpy() / module.scales.numpy()[:, None]).astype(np.int8)
        return int8_matmulnbits_node(g, x, q, module.scales.numpy(), module.in_features)

    def emit_tensorrt(self, g, x, module, buffers):
        if getattr(module, "trt_dense_weights", False):
            # dense 2:4-pattern weights for TensorRT's sparse tensor cores (SPARSE_WEIGHTS), in the
            # fully-connected form that gets sparse tactics (see trt/onnx_nodes.py)
            return emit_sparse24_gemm(g, x, module.dense_weight(), module.out_features)
        return custom_node(g, module.op_type, x, *buffers)

    def trainable_state(self, module) -> dict:
        st = super().trainable_state(module)
        st["mask"] = module.keep_mask().to(st["params"]["weight"].device)
        return st

    def fake_quantize(self, w, trainable):  # noqa: ARG002
        from .fakequant import fake_int8_rows

        return fake_int8_rows(w)


def emit_sparse24_gemm(g, x, w, out_features: int):
    """``y = x @ w.T`` as ``Reshape [-1, K] -> Gemm(transB=1) -> Reshape [..., N]`` for a dense
    2:4-pattern weight ``w`` [N, K] (torch ``g.op`` graph context).

    Why this form: TensorRT's sparse (``SPARSE_WEIGHTS``) tactics apply to layers with constant
    weights of the kinds its developer guide lists ("Structured Sparsity": convolution and
    fully-connected / matrix-multiply layers whose weights are a constant). A Gemm with a 2-D
    input and a 2-D constant ``B`` with ``transB=1`` is the fully-connected shape: the constant
    is stored [N, K], so every group of four along the reduction dimension K is contiguous in the
    stored weight, which is the layout the 2:4 check reads. A plain ``MatMul(x[B, S, K], W.T)``
    stores the transpose [K, N] (the pattern then runs across rows of the stored tensor) and is a
    batched product with a broadcast weight. Not checked on hardware: ``scripts/gpu_check.sh``
    builds the engine with and without SPARSE_WEIGHTS and reports both.
    """
    import torch

    def const(v):
        return g.op("Constant", value_t=torch.tensor(v, dtype=torch.int64))

    k = int(w.shape[1])
    x2 = g.op("Reshape", x, const([-1, k]))
    wc = g.op("Constant", value_t=w.detach().float().contiguous())
    y2 = g.op("Gemm", x2, wc, transB_i=1)
    lead = g.op("Slice", g.op("Shape", x), const([0]), const([-1]), const([0]))
    return g.op("Reshape", y2, g.op("Concat", lead, const([int(out_features)]), axis_i=0))
