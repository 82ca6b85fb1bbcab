"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS weight updates.

Pure maths on a weight ``W[N, K]`` and the calibration Hessian ``H = X^T X`` of its input;
the loop is the OBS engine of :mod:`.gptq` (shared with GPTQ and the joint prune-and-quantize
pass); the hooks that accumulate H live in :mod:`ffsplit_export.calibrate`.
"""

from __future__ import annotations

import torch

from .gptq import obs_compress, upper_cholesky_of_inverse

_upper_cholesky_of_inverse = upper_cholesky_of_inverse  # the name callers used before the engine moved


def sparsegpt_prune(
    w: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``w`` to ``sparsity`` (or N:M) and return ``(updated weight, keep mask)``.

    Columns are processed left to right in blocks; within a block the mask is chosen by
    the OBS saliency ``w^2 / [H^-1]_kk^2`` and the error of each pruned column is spread
    over the not-yet-processed columns through the Cholesky factor of ``H^-1``.
    """
    r = obs_compress(w, hessian, sparsity=sparsity, nm=nm, block_size=block_size, damp=damp)
    return r.weight, r.keep
