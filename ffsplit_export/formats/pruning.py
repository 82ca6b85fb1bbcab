"""Pure pruning maths: which weights of ``W[N, K]`` to keep.

Masks are boolean tensors of W's shape (True = keep). Scores follow each method's paper:
magnitude ``|W|``; Wanda ``|W| * ||x_k||`` (Sun et al. 2023) with ``x_norm`` the L2 norm of
input channel k over the calibration tokens, compared within each output row.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def check_fraction(value: float, option: str) -> float:
    """Raise ConfigError unless ``0 <= value <= 1``."""
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{option}={value!r} is out of range; use a number between 0 and 1")
    return float(value)


def topk_row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``round((1 - sparsity) * K)`` highest-scoring entries of every row."""
    sparsity = check_fraction(sparsity, "sparsity")
    n, k = score.shape
    n_prune = int(round(sparsity * k))
    mask = torch.ones_like(score, dtype=torch.bool)
    if n_prune == 0 or k == 0:
        return mask
    idx = torch.topk(score, n_prune, dim=1, largest=False).indices
    mask.scatter_(1, idx, False)
    return mask


def nm_mask(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the ``n`` highest-scoring of every ``m`` consecutive entries of each row (zero-padded)."""
    if not 0 < n <= m:
        raise ConfigError(f"N:M sparsity {n}:{m} is invalid; use 0 < N <= M, e.g. 2:4")
    rows, k = score.shape
    pad = (-k) % m
    s = torch.nn.functional.pad(score, (0, pad), value=float("-inf")).reshape(rows, -1, m)
    keep_idx = torch.topk(s, n, dim=2).indices
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(2, keep_idx, True)
    return mask.reshape(rows, -1)[:, :k].contiguous()


def magnitude_score(w: torch.Tensor) -> torch.Tensor:
    return w.abs()


def wanda_score(w: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """|W_nk| * ||x_k||; ``x_norm`` has K entries."""
    if x_norm.shape != (w.shape[1],):
        raise ConfigError(f"Wanda input norms have shape {tuple(x_norm.shape)}; expected ({w.shape[1]},)")
    return w.abs() * x_norm.to(w.dtype)[None, :]
