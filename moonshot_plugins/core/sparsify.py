"""Mask selection for diagonal (per-weight score) hosts such as Wanda.

Wanda scores each weight and prunes, per output row, the lowest scores: the
``n`` smallest in every group of ``m`` consecutive inputs (N:M), or the
``sparsity`` fraction of each row (unstructured). MOONSHOT keeps that rule and
only changes the score, so this mirrors the host's selection exactly.
"""

from __future__ import annotations

import torch

__all__ = ["row_wise_mask", "moonshot_wanda_scores"]


def moonshot_wanda_scores(weight: torch.Tensor, curvature: torch.Tensor) -> torch.Tensor:
    """Score |W_ij| * sqrt(S_ij) (same ranking as W^2 * S): (d_out, d_in).

    :param weight: (d_out, d_in) in the standardised orientation
    :param curvature: (d_in,) Wanda row scalars or (d_out, d_in) combined curvature
    """
    if curvature.dim() == 1:
        curvature = curvature.reshape(1, -1)
    return weight.abs() * curvature.sqrt()


def row_wise_mask(
    scores: torch.Tensor, sparsity: float, prune_n: int, prune_m: int
) -> torch.Tensor:
    """Boolean mask (True = prune) of the lowest scores in each row: (d_out, d_in).

    :param scores: (d_out, d_in) pruning scores, larger = more important
    :param sparsity: fraction of each row to prune when ``prune_n == 0``
    :param prune_n: prune n of every m consecutive columns (0 = unstructured)
    :param prune_m: the group size m of N:M
    """
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if prune_n != 0:
        for start in range(0, scores.shape[1], prune_m):
            group = scores[:, start : start + prune_m].float()
            lowest = torch.topk(group, prune_n, dim=1, largest=False)[1]
            mask.scatter_(1, start + lowest, True)
    else:
        order = torch.sort(scores, dim=-1, stable=True)[1]
        mask.scatter_(1, order[:, : int(scores.shape[1] * sparsity)], True)
    return mask
