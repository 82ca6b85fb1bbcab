"""Fake quantization in PyTorch: the rounding of the packers, differentiable through an STE by the caller."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fake_int8_rows(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row int8 round trip, as :func:`packing.quantize_int8_per_channel`."""
    amax = w.abs().amax(dim=1) if w.shape[1] else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.clamp(torch.round(w / scale[:, None]), -127, 127) * scale[:, None]


def fake_int4_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Symmetric int4 per group of input channels, as :func:`packing.quantize_int4_groupwise`."""
    n, k = w.shape
    g = -(-k // group_size)
    padded = F.pad(w, (0, g * group_size - k)).reshape(n, g, group_size)
    amax = padded.abs().amax(dim=2)
    scale = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(padded / scale[:, :, None]), -7, 7) * scale[:, :, None]
    return q.reshape(n, -1)[:, :k]
