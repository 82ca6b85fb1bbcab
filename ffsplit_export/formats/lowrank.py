"""Low-rank light part (``lowrank``): ``W ~= A @ B`` by truncated SVD, two MatMuls on every target.

The rank is chosen so the two factors hold as many weights as the sparse formats keep at
the same ``--light-sparsity``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ._module import CompressedLinear
from .names import LightFormat
from .registry import WeightFormat, register_format


def lowrank_rank(n: int, k: int, sparsity: float) -> int:
    """The rank whose two factors hold as many weights as the sparse format keeps."""
    return int(min(n, k, max(0, round((1.0 - sparsity) * n * k / (n + k))))) if n and k else 0


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


@register_format(LightFormat.LOWRANK)
class LowRank(WeightFormat):
    """Truncated SVD factors; the trainable form trains the factors themselves."""

    def compress(self, weight, bias=None, *, x_norm=None, hessian=None, config=None):  # noqa: ARG002
        n, k = weight.shape
        m = LowRankLinear(weight, lowrank_rank(n, k, config.light_sparsity), bias)
        m.format = self
        return m

    def bytes_per_weight(self, config=None) -> float:
        return 4.0 * (1.0 - config.light_sparsity)

    def trainable_state(self, module) -> dict:
        st = super().trainable_state(module)
        st["params"] = {"a": module.a.detach().clone().float(), "b": module.b.detach().clone().float()}
        return st

    def trainable_weight(self, trainable) -> torch.Tensor:
        return trainable.a @ trainable.b

    def trainable_forward(self, trainable, x):
        # same product order as LowRankLinear
        return F.linear(F.linear(x, trainable.b), trainable.a)

    def pack_trained(self, trainable):
        m = LowRankLinear(torch.zeros(trainable.out_features, trainable.in_features), 0, trainable.bias)
        m.a, m.b = (
            trainable.a.detach().float().cpu().contiguous().clone(),
            trainable.b.detach().float().cpu().contiguous().clone(),
        )
        m.format = self
        return m
