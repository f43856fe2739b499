"""MOONSHOT's per-layer quadratic objective and its curvature operator.

For a linear layer with dense weight W (d_out x d_in) and a candidate W_new, the
weight change dW = W_new - W has rows dw_j (d_in,). The objective is

    (1 - lam) * recon(dW) / s_rec + lam * taylor(dW) / s_F
    recon(dW)  = sum_j dw_j^T H dw_j        H = X^T X / n (row-shared, d_in x d_in)
    taylor(dW) = sum_j dw_j^T F_j dw_j      F_j = F (row-shared) or U_j U_j^T (per row)

with s_rec, s_F positive scale normalisers chosen by the caller (e.g. the mean
diagonals of H and F) so both terms are O(1) and lam means the same in every
layer. Units: H and F_j are in (input units)^2 and (loss / weight)^2 per sample;
after division by their scales both terms are dimensionless, and so is the
objective.

The objective is sum_j dw_j^T A_j dw_j with row curvature

    A_j = S + c U_j U_j^T,   S = (1-lam) H / s_rec [+ lam F / s_F],   c = lam / s_F,

which :class:`LayerCurvature` applies to all rows at once: one (d_out x d_in) @
(d_in x d_in) product for S and two batched products with the (d_out, d_in, k)
factors U for the per-row term; no d_in x d_in matrix is formed per row, and the
factors are used in place (never copied or rescaled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from moonshot_plugins.core.objective import mean_diagonal, validate_taylor_weight
from moonshot_plugins.core.row_fisher import row_fisher_matvec

__all__ = [
    "LayerCurvature",
    "layer_curvature",
    "row_fisher_curvature",
    "diagonal_fisher_curvature",
    "ObjectiveTerms",
    "layer_objective",
]


@dataclass(frozen=True)
class LayerCurvature:
    """Row curvatures A_j = shared + row_weight * U_j U_j^T + diag(D_j) of one
    layer's objective.

    :param shared: S, the row-shared part, (d_in, d_in), symmetric PSD
    :param row_factors: U, (d_out, d_in, k) per-row low-rank factors, or None
    :param row_weight: c >= 0, the factors' weight in the objective
    :param row_diagonal: D, (d_out, d_in) >= 0, a per-weight diagonal term
        (a diagonal Fisher, as Wanda's MOONSHOT score uses), or None
    """

    shared: torch.Tensor
    row_factors: torch.Tensor | None = None
    row_weight: float = 1.0
    row_diagonal: torch.Tensor | None = None

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        """A_j v_j for every row j: (d_out, d_in) -> (d_out, d_in)."""
        out = vectors @ self.shared  # S symmetric: rows of V S are S v_j
        if self.row_factors is not None:
            out = out + self.row_weight * row_fisher_matvec(self.row_factors, vectors)
        if self.row_diagonal is not None:
            out = out + self.row_diagonal * vectors
        return out

    def diagonal(self) -> torch.Tensor:
        """diag(A_j) per row: (d_out, d_in), or (1, d_in) without row terms."""
        diag = torch.diagonal(self.shared).reshape(1, -1)
        if self.row_factors is not None:
            row_norms = torch.linalg.vector_norm(self.row_factors, dim=-1)  # no (.., k) copy
            diag = diag + self.row_weight * row_norms.square()
        if self.row_diagonal is not None:
            diag = diag + self.row_diagonal
        return diag

    def row_values(self, delta: torch.Tensor) -> torch.Tensor:
        """dw_j^T A_j dw_j for every row: (d_out, d_in) -> (d_out,)."""
        return (self.matvec(delta) * delta).sum(dim=1)


def layer_curvature(
    hessian: torch.Tensor,
    taylor_weight: float,
    recon_scale: float,
    fisher_scale: float,
    fisher: torch.Tensor | None = None,
    row_factors: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> LayerCurvature:
    """The curvature of the MOONSHOT objective (see module docstring).

    :param hessian: H, (d_in, d_in), the host's reconstruction Hessian (damped)
    :param taylor_weight: lam in [0, 1]
    :param recon_scale: s_rec > 0 (same units as H)
    :param fisher_scale: s_F > 0 (same units as F)
    :param fisher: row-shared Fisher F, (d_in, d_in); give this or ``row_factors``
        when lam > 0
    :param row_factors: per-row Fisher factors U, (d_out, d_in, k), F_j = U_j U_j^T
        (see :class:`moonshot_plugins.core.row_fisher.RowFisherBuilder`)
    :param dtype: computation dtype (fp32; fp64 for tests)
    """
    lam = float(taylor_weight)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"taylor_weight must be in [0, 1], got {taylor_weight!r}")
    if recon_scale <= 0 or fisher_scale <= 0:
        raise ValueError(f"scales must be positive, got {recon_scale}, {fisher_scale}")
    if fisher is not None and row_factors is not None:
        raise ValueError("give either a row-shared fisher or per-row row_factors, not both")
    if lam > 0 and fisher is None and row_factors is None:
        raise ValueError("taylor_weight > 0 needs a fisher or row_factors")
    shared = ((1.0 - lam) / recon_scale) * hessian.to(dtype)
    if lam > 0 and fisher is not None:
        shared = shared + (lam / fisher_scale) * fisher.to(dtype)
    if lam > 0 and row_factors is not None:
        return LayerCurvature(shared, row_factors.to(dtype), lam / fisher_scale)
    return LayerCurvature(shared)


def row_fisher_curvature(
    hessian: torch.Tensor,
    fisher: torch.Tensor,
    row_factors: torch.Tensor,
    taylor_weight: float,
    damping: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> LayerCurvature:
    """The objective of :func:`~moonshot_plugins.core.objective.combine_hessians`
    with each row's own Fisher in place of the rows' average, in units of H:

        A_j = (1 - lam) H + lam (s_H / s_F) U_j U_j^T + diag(damping),

    i.e. s_H ((1 - lam) recon / s_H + lam taylor_j / s_F), with s_H, s_F the mean
    diagonals of H and of the row-averaged Fisher F. With exact factors
    (1/d_out) sum_j U_j U_j^T = F (the "sample" Fisher), so the rows' average of
    A_j is exactly ``combine_hessians(H, F, lam) + diag(damping)``.

    :param hessian: H, (d_in, d_in), the reconstruction Hessian, not combined
    :param fisher: F, (d_in, d_in), the row-averaged Fisher; only its mean
        diagonal s_F is used (a layer with s_F = 0 gets no Taylor term, as in
        ``combine_hessians``)
    :param row_factors: U, (d_out, d_in, k), F_j = U_j U_j^T
    :param taylor_weight: lam in [0, 1]
    :param damping: (d_in,) >= 0 added to the diagonal of every A_j (units of H)
    :param dtype: computation dtype (fp32; fp64 for tests)
    """
    lam = validate_taylor_weight(taylor_weight)
    shared = (1.0 - lam) * hessian.to(dtype)
    if damping is not None:
        shared = shared + torch.diag(damping.to(shared))
    fisher_scale = float(mean_diagonal(fisher))
    if lam == 0.0 or fisher_scale <= 0.0:
        return LayerCurvature(shared)
    weight = lam * float(mean_diagonal(hessian)) / fisher_scale
    return LayerCurvature(shared, row_factors.to(shared), weight)


def diagonal_fisher_curvature(
    hessian: torch.Tensor, diagonal_fisher: torch.Tensor | None, taylor_weight: float
) -> LayerCurvature:
    """A_j = (1 - lam) H + lam (s_H / s_F) diag(F_j): the full-matrix version
    of Wanda's MOONSHOT curvature (:func:`~moonshot_plugins.core.combine_diagonal`,
    whose per-weight score uses only diag(H)); s_H = mean diag(H), s_F = mean F.

    :param hessian: H, (d_in, d_in), the layer's (damped) Gram matrix of inputs
    :param diagonal_fisher: F, (d_out, d_in), per-weight diagonal Fisher; None when lam == 0
    :param taylor_weight: lam in [0, 1]
    """
    lam = float(taylor_weight)
    hessian = hessian.float()
    shared = (1.0 - lam) * hessian
    if lam == 0.0:
        return LayerCurvature(shared)
    fisher = diagonal_fisher.to(hessian)
    ratio = torch.diagonal(hessian).mean() / fisher.mean().clamp(min=torch.finfo(fisher.dtype).tiny)
    return LayerCurvature(shared, row_diagonal=(lam * ratio) * fisher)


class ObjectiveTerms(NamedTuple):
    """Both terms of the objective, unweighted, per row; and the weighted total.

    recon: dw_j^T H dw_j, (d_out,); taylor: dw_j^T F_j dw_j, (d_out,);
    rows: (1-lam) recon / s_rec + lam taylor / s_F, (d_out,); total: rows.sum(), 0-d.
    """

    recon: torch.Tensor
    taylor: torch.Tensor
    rows: torch.Tensor
    total: torch.Tensor


def layer_objective(
    weight: torch.Tensor,
    dense_weight: torch.Tensor,
    hessian: torch.Tensor,
    taylor_weight: float,
    recon_scale: float,
    fisher_scale: float,
    fisher: torch.Tensor | None = None,
    row_factors: torch.Tensor | None = None,
) -> ObjectiveTerms:
    """The MOONSHOT objective of ``weight`` against ``dense_weight``, term by term.

    Computed in the dtype of ``hessian``. Without a Fisher the Taylor term is 0.

    :param weight: W_new, (d_out, d_in)
    :param dense_weight: W, (d_out, d_in)
    :param hessian: H, (d_in, d_in); ``fisher`` F (d_in, d_in) or ``row_factors``
        U (d_out, d_in, k): as in :func:`layer_curvature`
    """
    dtype = hessian.dtype
    delta = weight.to(dtype) - dense_weight.to(dtype)
    recon = ((delta @ hessian) * delta).sum(dim=1)
    if fisher is not None:
        taylor = ((delta @ fisher.to(dtype)) * delta).sum(dim=1)
    elif row_factors is not None:
        taylor = (row_fisher_matvec(row_factors.to(dtype), delta) * delta).sum(dim=1)
    else:
        taylor = torch.zeros_like(recon)
    lam = float(taylor_weight)
    rows = (1.0 - lam) * recon / recon_scale + lam * taylor / fisher_scale
    return ObjectiveTerms(recon, taylor, rows, rows.sum())
