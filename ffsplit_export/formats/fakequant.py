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


def fake_int4_groups_asymmetric(w: torch.Tensor, group_size: int, search: bool = False) -> torch.Tensor:
    """Asymmetric int4 per group (uint4 zero point), as :func:`packing.quantize_int4_asymmetric`:
    the scales and zero points come from the packer's own function on the detached weight."""
    from .packing import asymmetric_params

    n, k = w.shape
    g = -(-k // group_size)
    padded = F.pad(w, (0, g * group_size - k)).reshape(n, g, group_size)
    s, z = asymmetric_params(padded.detach().float().cpu().numpy(), 4, search=search)
    s = torch.from_numpy(s).to(device=w.device, dtype=w.dtype)[:, :, None]
    z = torch.from_numpy(z.astype("float32")).to(device=w.device, dtype=w.dtype)[:, :, None]
    q = (torch.clamp(torch.round(padded / s) + z, 0, 15) - z) * s
    return q.reshape(n, -1)[:, :k]
