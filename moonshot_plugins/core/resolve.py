"""Re-solve of the kept weights on a fixed mask, all rows at once.

With the mask fixed, each row j minimises (w_j - wd_j)^T A_j (w_j - wd_j) over
the weights on its support S_j (the others held at 0), i.e. it solves

    (A_j)_SS w_S = (A_j wd_j)_S,

a positive definite system of size |S_j| that differs per row. Instead of
d_out factorisations, :func:`batched_pcg` runs preconditioned conjugate
gradient on every row at once with the support as a projection: per iteration
one V @ S product (d_out x d_in times d_in x d_in) plus the per-row low-rank
term, and per-row step sizes. Rows that reach the tolerance stop moving.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from moonshot_plugins.core.curvature import LayerCurvature

__all__ = ["SolveResult", "batched_pcg", "resolve_on_mask"]


class SolveResult(NamedTuple):
    """weight: the solution, (d_out, d_in); iterations: operator applications
    after the initial residual; residual: the largest relative residual
    ||r_j|| / ||b_j|| over rows at the end, as CG's recurrence tracks it
    (dimensionless)."""

    weight: torch.Tensor
    iterations: int
    residual: float


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=1)


@torch.no_grad()
def batched_pcg(
    operator: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    initial: torch.Tensor,
    preconditioner: Callable[[torch.Tensor], torch.Tensor],
    max_iters: int,
    rtol: float,
) -> SolveResult:
    """Solve the independent SPD systems A_j x_j = b_j of every row by PCG.

    :param operator: x -> (A_j x_j)_j, (d_out, d_in) -> (d_out, d_in); SPD per row
        on the subspace the iterates live in
    :param rhs: b, (d_out, d_in), in that subspace
    :param initial: x_0, (d_out, d_in), in that subspace (the warm start)
    :param preconditioner: r -> (M_j^-1 r_j)_j, SPD, mapping into the subspace
    :param max_iters: cap on operator applications
    :param rtol: stop a row once ||r_j|| <= rtol * ||b_j||
    """
    x = initial.clone()
    r = rhs - operator(x)
    b_norm = rhs.norm(dim=1)
    tiny = torch.finfo(rhs.dtype).tiny
    # a row with a zero right-hand side (a zero dense row) is measured against
    # the layer's largest row instead of dividing by 0
    scale = torch.maximum(b_norm, torch.finfo(rhs.dtype).eps * b_norm.max()).clamp(min=tiny)
    z = preconditioner(r)
    p = z
    rz = _rowdot(r, z)
    iterations = 0
    relative = r.norm(dim=1) / scale
    while iterations < max_iters and relative.max() > rtol:
        active = relative > rtol  # converged rows keep their iterate
        ap = operator(p)
        pap = _rowdot(p, ap)
        alpha = torch.where(active & (pap > 0), rz / pap.clamp(min=tiny), 0.0)
        x.add_(alpha[:, None] * p)
        r.sub_(alpha[:, None] * ap)
        z = preconditioner(r)
        rz_next = _rowdot(r, z)
        beta = torch.where(active & (rz > 0), rz_next / rz.clamp(min=tiny), 0.0)
        p = z + beta[:, None] * p
        rz = rz_next
        iterations += 1
        relative = r.norm(dim=1) / scale
    return SolveResult(x, iterations, float(relative.max()))


@torch.no_grad()
def resolve_on_mask(
    curvature: LayerCurvature,
    dense_weight: torch.Tensor,
    keep_mask: torch.Tensor,
    initial_weight: torch.Tensor | None = None,
    max_iters: int = 100,
    rtol: float = 1e-4,
) -> SolveResult:
    """Optimal kept weights for a fixed mask: PCG with a Jacobi preconditioner.

    Minimises sum_j (w_j - wd_j)^T A_j (w_j - wd_j) with w zero off the mask.
    From a warm start on the mask the objective never increases (CG decreases
    the A-norm error monotonically), so a host's result can only improve.

    :param curvature: the layer's A_j (:func:`~moonshot_plugins.core.curvature.layer_curvature`)
    :param dense_weight: wd, (d_out, d_in), the weight before pruning
    :param keep_mask: (d_out, d_in) bool, True = kept
    :param initial_weight: warm start (e.g. the host's pruned weight), (d_out,
        d_in); zeroed off the mask; default wd on the mask
    :param max_iters: cap on CG iterations (one curvature matvec each)
    :param rtol: relative residual at which a row stops
    :return: weights in the curvature's dtype, zero off the mask
    """
    dtype = curvature.shared.dtype
    keep = keep_mask.to(dtype)
    dense = dense_weight.to(dtype)
    start = dense if initial_weight is None else initial_weight.to(dtype)
    diagonal = curvature.diagonal()
    inverse_diagonal = keep / torch.where(diagonal > 0, diagonal, 1.0)

    def operator(v: torch.Tensor) -> torch.Tensor:
        return keep * curvature.matvec(v)

    return batched_pcg(
        operator,
        keep * curvature.matvec(dense),
        keep * start,
        lambda r: inverse_diagonal * r,
        max_iters,
        rtol,
    )
