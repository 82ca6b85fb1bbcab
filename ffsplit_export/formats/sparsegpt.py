"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS weight updates.

Pure maths on a weight ``W[N, K]`` and the calibration Hessian ``H = X^T X`` of its input;
the hooks that accumulate H live in :mod:`ffsplit_export.calibrate`.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


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
    if not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"sparsity={sparsity} is out of range; use a number between 0 and 1")
    w = w.detach().to(torch.float64).clone()
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ConfigError(f"Hessian shape {tuple(hessian.shape)} does not match K={k}")
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(k, dtype=h.dtype) * damp * torch.mean(torch.diag(h))
    hinv = _upper_cholesky_of_inverse(h)

    keep = torch.ones_like(w, dtype=torch.bool)
    for c0 in range(0, k, block_size):
        c1 = min(c0 + block_size, k)
        wb = w[:, c0:c1].clone()
        hb = hinv[c0:c1, c0:c1]
        err = torch.zeros_like(wb)
        if nm is None:
            sal = wb**2 / torch.diag(hb)[None, :] ** 2
            prune_b = torch.zeros_like(wb, dtype=torch.bool)
            # a per-row quota (cumulative, so rounding does not drift across blocks) keeps
            # every output row at the target sparsity
            per_row = int(round(sparsity * c1)) - int(round(sparsity * c0))
            if per_row:
                idx = torch.topk(sal, per_row, dim=1, largest=False).indices
                prune_b.scatter_(1, idx, True)
        else:
            prune_b = torch.zeros_like(wb, dtype=torch.bool)
        for j in range(c1 - c0):
            col = wb[:, j]
            d = hb[j, j]
            if nm is not None and j % nm[1] == 0:
                grp = wb[:, j : j + nm[1]] ** 2 / torch.diag(hb)[j : j + nm[1]][None, :] ** 2
                drop = grp.shape[1] - nm[0]
                if drop > 0:
                    idx = torch.topk(grp, drop, dim=1, largest=False).indices
                    prune_b[:, j : j + nm[1]].scatter_(1, idx, True)
            q = col.clone()
            q[prune_b[:, j]] = 0.0
            e = (col - q) / d
            wb[:, j:] -= e[:, None] * hb[j, j:][None, :]
            wb[:, j] = q
            err[:, j] = e
        w[:, c0:c1] = wb
        keep[:, c0:c1] = ~prune_b
        w[:, c1:] -= err @ hinv[c0:c1, c1:]
    w[~keep] = 0.0
    return w.to(torch.float32), keep


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, retrying with more damping if H is not positive definite."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    extra = 0.0
    for _ in range(6):
        try:
            chol = torch.linalg.cholesky(h + extra * eye)
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True)
        except torch.linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * float(torch.mean(torch.diag(h))) or 1e-6)
    raise ConfigError("the calibration Hessian is not positive definite; use more calibration samples")
