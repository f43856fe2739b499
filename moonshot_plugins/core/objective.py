"""Combining the reconstruction and Taylor objectives.

MOONSHOT minimises ``(1 - lam) * recon / s_rec + lam * taylor / s_F`` where each
term is divided by its own scale (mean diagonal), so ``lam`` (``taylor_weight``)
means the same thing in every layer and model. The result is multiplied back by
``s_rec`` so the host's relative damping (a fraction of the mean diagonal) and
its loss values keep their usual magnitude.

``lam == 0`` returns the host's statistic object itself, untouched, so a
MOONSHOT run at ``lam=0`` is bitwise the host.
"""

from __future__ import annotations

import torch

__all__ = [
    "validate_taylor_weight",
    "mean_diagonal",
    "combine_hessians",
    "combine_diagonal",
]


def validate_taylor_weight(taylor_weight: float) -> float:
    """Return ``taylor_weight`` as float, or raise naming the allowed range."""
    value = float(taylor_weight)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"taylor_weight must be in [0, 1], got {taylor_weight!r}")
    return value


def mean_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """Scale of a square curvature matrix: mean of its diagonal (a 0-d tensor)."""
    return torch.diagonal(matrix).mean()


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # A layer that saw no gradient (den == 0) contributes no Taylor term rather
    # than NaNs; the reconstruction term then carries the whole objective.
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), 0.0)


def combine_hessians(
    hessian: torch.Tensor, fisher: torch.Tensor, taylor_weight: float
) -> torch.Tensor:
    """Row-shared MOONSHOT Hessian for SparseGPT-like hosts: (d_in, d_in).

    H = (1 - lam) * H_rec + lam * (s_rec / s_F) * F, with s the mean diagonal.

    :param hessian: the host's reconstruction Hessian (2/n) X^T X, (d_in, d_in)
    :param fisher: row-averaged empirical Fisher, (d_in, d_in), any positive scale
    :param taylor_weight: lam in [0, 1]
    """
    lam = validate_taylor_weight(taylor_weight)
    if lam == 0.0:
        return hessian
    if fisher.shape != hessian.shape:
        raise ValueError(
            f"fisher shape {tuple(fisher.shape)} != hessian shape {tuple(hessian.shape)}"
        )
    fisher = fisher.to(device=hessian.device, dtype=hessian.dtype)
    scale = _ratio(mean_diagonal(hessian), mean_diagonal(fisher))
    return (1.0 - lam) * hessian + (lam * scale) * fisher


def combine_diagonal(
    row_scalars: torch.Tensor, diagonal_fisher: torch.Tensor, taylor_weight: float
) -> torch.Tensor:
    """Per-weight MOONSHOT curvature for diagonal hosts (Wanda, OBD).

    S_ij = (1 - lam) * r_j + lam * (s_r / s_F) * F_ij, with s the mean, so
    pruning score W_ij^2 * S_ij interpolates Wanda's W_ij^2 * ||X_j||^2 and
    OBD's W_ij^2 * F_ij.

    :param row_scalars: the host's per-input-column statistic ||X_j||^2 / n, (d_in,)
    :param diagonal_fisher: per-weight diagonal Fisher, (d_out, d_in)
    :param taylor_weight: lam in [0, 1]
    :return: ``row_scalars`` itself when lam == 0, else a (d_out, d_in) tensor
    """
    lam = validate_taylor_weight(taylor_weight)
    if lam == 0.0:
        return row_scalars
    if diagonal_fisher.dim() != 2 or diagonal_fisher.shape[1] != row_scalars.shape[-1]:
        raise ValueError(
            f"diagonal_fisher must be (d_out, {row_scalars.shape[-1]}), "
            f"got {tuple(diagonal_fisher.shape)}"
        )
    diagonal_fisher = diagonal_fisher.to(device=row_scalars.device, dtype=row_scalars.dtype)
    scale = _ratio(row_scalars.mean(), diagonal_fisher.mean())
    return (1.0 - lam) * row_scalars.reshape(1, -1) + (lam * scale) * diagonal_fisher
