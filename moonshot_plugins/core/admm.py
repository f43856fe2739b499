"""ADMM search of a mask and its weights, finished by the re-solve on the mask.

The problem is min_W sum_j (w_j - wd_j)^T A_j (w_j - wd_j) subject to W lying in
the mask family: per-row top-k (every row keeps the same number of weights, as
Wanda prunes; SparseGPT's unstructured threshold is per block of columns
across rows) or N:M (keep M - N of every M consecutive inputs of a row). ADMM
splits W (dense weights) from Z (its sparse copy) with a dual Y and the penalty
(rho/2) ||P^(1/2) (W - Z)||^2, where P = diag(p) is the rows' mean curvature
diagonal: this makes rho dimensionless and the Z-step rank entries by
|v_i| sqrt(p_i), the OBD/Wanda saliency, instead of raw magnitude (with P = I,
ADMM came within 1% of the brute-forced optimum on 30% of random correlated
4 x 6 problems instead of 81%). Each iteration:

    W-step  (A_j + rho P) w_j = A_j wd_j + rho P z_j - y_j      (all rows at once)
    Z-step  Z = projection of V = W + P^-1 Y / rho onto the mask family
    Y-step  Y += rho P (W - Z)

The W-step of a row-shared curvature is one Cholesky of (S + rho P) per distinct
rho (rho changes at every iteration until it reaches its cap; d_in^3 / 3 flops,
below the 2 d_out d_in^2 of the solve itself unless d_in > 6 d_out) and one pair of triangular solves
for all rows. Per-row low-rank terms are handled by a few CG steps warm-started
at the previous W and preconditioned by that same Cholesky, which is exact on
the shared part, so the preconditioned spectrum is 1 except for the rank-k
correction.

rho grows after every iteration, by a factor that depends on how much the
support moved in it (:data:`RHO_SCHEDULE`); the search stops once the support
holds still and W has met Z, and the kept weights are then re-solved exactly
on that support (:func:`~moonshot_plugins.core.resolve.resolve_on_mask`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from moonshot_plugins.core.curvature import LayerCurvature
from moonshot_plugins.core.resolve import SolveResult, batched_pcg, resolve_on_mask

__all__ = ["ADMM_RHO", "AdmmResult", "keep_largest", "admm_prune"]

# The initial penalty, relative to the rows' mean curvature diagonal. A larger
# one settles the support in fewer iterations (on 10 saved SmolLM2-135M layers
# at 2:4: 0.1 -> 43 iterations, 0.3 -> 20, at 0.1% more objective) but finds
# the brute-forced best mask of small problems less often, mostly with per-row
# Fisher factors (docs/experiments.md, 2026-12-03).
ADMM_RHO = 0.1

# rho's growth after each iteration: (support change in it as a fraction of the
# kept weights, factor) for the first threshold the change exceeds, and
# STABLE_GROWTH when the support held still. rho grows slowly while the support
# still moves a lot (ADMM is still choosing it) and fast once it has settled
# (only W = Z is left to enforce). On random 4 x 6 problems with correlated
# inputs and brute-forced optima (200 seeds) this reached the optimum within 1%
# on 81% of them; ALPS's opposite order (1.3, 1.2, 1.1) on 70%.
RHO_SCHEDULE: tuple[tuple[float, float], ...] = ((0.1, 1.05), (0.005, 1.1), (0.0, 1.2))
STABLE_GROWTH = 1.3
MAX_RHO = 1e6


class AdmmResult(NamedTuple):
    """weight: re-solved weights, (d_out, d_in), zero off the mask; keep_mask:
    (d_out, d_in) bool, True = kept; iterations: ADMM iterations; rho: final
    penalty (dimensionless); resolve: the final re-solve's diagnostics."""

    weight: torch.Tensor
    keep_mask: torch.Tensor
    iterations: int
    rho: float
    resolve: SolveResult


def keep_largest(
    scores: torch.Tensor, sparsity: float = 0.0, prune_n: int = 0, prune_m: int = 0
) -> torch.Tensor:
    """Keep mask (True = kept) of the largest scores: (d_out, d_in) bool.

    Unstructured (``prune_n == 0``): each row prunes ``int(d_in * sparsity)``
    entries, the host's per-row count. N:M: each group of ``prune_m``
    consecutive inputs of a row prunes ``prune_n``.
    """
    d_out, d_in = scores.shape
    if prune_n:
        if d_in % prune_m or not 0 < prune_n < prune_m:
            raise ValueError(f"{prune_n}:{prune_m} does not tile d_in={d_in}")
        groups = scores.reshape(d_out, d_in // prune_m, prune_m)
        kept = groups.topk(prune_m - prune_n, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, kept, True)
        return keep.reshape(d_out, d_in)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    kept = scores.topk(d_in - int(d_in * sparsity), dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, kept, True)


def _weight_step(
    curvature: LayerCurvature, penalty: torch.Tensor, rho: float, inner_iters: int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(rhs, warm start) -> W solving (A_j + rho P) w_j = rhs_j for every row."""
    cholesky = torch.linalg.cholesky(curvature.shared + torch.diag(rho * penalty))

    def shared_solve(rhs: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(rhs.T, cholesky).T

    if curvature.row_factors is None:
        return lambda rhs, warm: shared_solve(rhs)

    def operator(v: torch.Tensor) -> torch.Tensor:
        return curvature.matvec(v) + rho * penalty * v

    # inexact W-steps are enough for ADMM; the warm start carries progress over
    return lambda rhs, warm: batched_pcg(
        operator, rhs, warm, shared_solve, inner_iters, 1e-6
    ).weight


def _next_rho(rho: float, change: float) -> float:
    factor = next((f for threshold, f in RHO_SCHEDULE if change > threshold), STABLE_GROWTH)
    return min(rho * factor, MAX_RHO)


@torch.no_grad()
def admm_prune(
    curvature: LayerCurvature,
    dense_weight: torch.Tensor,
    sparsity: float = 0.0,
    prune_n: int = 0,
    prune_m: int = 0,
    initial_weight: torch.Tensor | None = None,
    rho: float = ADMM_RHO,
    max_iters: int = 300,
    primal_tol: float = 1e-3,
    inner_iters: int = 5,
    resolve_iters: int = 100,
    resolve_rtol: float = 1e-4,
) -> AdmmResult:
    """Mask and weights minimising the layer objective by ADMM (module docstring).

    Stops once an iteration leaves the support unchanged and W is within
    ``primal_tol`` of Z (relative Frobenius norm), or after ``max_iters``.

    :param curvature: the layer's A_j (:func:`~moonshot_plugins.core.curvature.layer_curvature`)
    :param dense_weight: wd, (d_out, d_in)
    :param sparsity: per-row pruned fraction when ``prune_n == 0``
    :param prune_n: prune n of every ``prune_m`` consecutive inputs (0 = unstructured)
    :param initial_weight: warm start (e.g. a host's pruned weight), (d_out, d_in);
        its projection onto the mask family (by saliency) is the first Z, so a
        host mask of the family is kept as is. Default: wd
    :param rho: initial penalty, relative to the mean curvature diagonal
    :param max_iters: cap on ADMM iterations (one W-step each)
    :param primal_tol: convergence tolerance on ||W - Z|| / ||Z||
    :param inner_iters: CG steps per W-step with per-row factors
    :param resolve_iters: CG cap of the final re-solve; :param resolve_rtol: its tolerance
    :return: weights in the curvature's dtype
    """
    dtype = curvature.shared.dtype
    dense = dense_weight.to(dtype)
    diagonal = curvature.diagonal().mean(dim=0)
    penalty = diagonal.clamp(min=torch.finfo(dtype).eps * diagonal.max())
    saliency = penalty.sqrt()
    target = curvature.matvec(dense)
    weight = dense if initial_weight is None else initial_weight.to(dtype)
    keep = keep_largest(weight.abs() * saliency, sparsity, prune_n, prune_m)
    sparse, dual = weight * keep, torch.zeros_like(dense)
    kept_count = max(int(keep.sum()), 1)
    iterations, solved_rho = 0, None
    while iterations < max_iters:
        if rho != solved_rho:  # one Cholesky per distinct rho
            solve, solved_rho = _weight_step(curvature, penalty, rho, inner_iters), rho
        weight = solve(target + rho * penalty * sparse - dual, weight)
        candidate = weight + dual / (rho * penalty)
        previous, keep = keep, keep_largest(candidate.abs() * saliency, sparsity, prune_n, prune_m)
        sparse = candidate * keep
        dual += rho * penalty * (weight - sparse)
        iterations += 1
        change = int((keep != previous).sum()) / kept_count
        primal = float((weight - sparse).norm() / sparse.norm().clamp(min=torch.finfo(dtype).tiny))
        if change == 0.0 and primal < primal_tol:
            break
        rho = _next_rho(rho, change)
    result = resolve_on_mask(curvature, dense, keep, weight, resolve_iters, resolve_rtol)
    return AdmmResult(result.weight, keep, iterations, rho, result)
