"""The weight update after SparseGPT's sweep: the host's own, a re-solve of
the kept weights, or an ADMM search of mask and weights.

SparseGPT's greedy column sweep updates each pruned column's effect only into
the columns to its right, so the weights it ends with do not minimise the
objective even for its own mask. With ``weight_update``:

- "host": the sweep's weights (bitwise the host at ``taylor_weight: 0``);
- "resolve": the sweep's mask, with the kept weights re-solved to the exact
  minimum of the layer objective (:func:`~moonshot_plugins.core.resolve_on_mask`);
- "admm": mask and weights searched by ADMM from the sweep's result, then
  re-solved on the final mask (:func:`~moonshot_plugins.core.admm_prune`).
  Unstructured masks become per-row (every row keeps the same count).

The objective (``fisher_rows: shared``, the default) is the one the host's
solver saw: its Hessian after MOONSHOT combined it with the Fisher (token or
sample mode), damped as SparseGPT damps it, and after ``row_weights`` scaled
the rows. With ``fisher_rows: per_row`` (sample mode) the re-solve gives each
row its own Fisher instead of the rows' average the sweep used
(:func:`~moonshot_plugins.core.row_fisher_curvature`):

    A_j = (1 - lam) H + lam (s_H / s_F) U_j U_j^T + damping,

H the host's reconstruction Hessian before the Fisher joined it, U_j row j's
factors from the gradient pass, and the damping the sweep added to its
diagonal; with exact factors the rows' average of A_j is the sweep's Hessian.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moonshot_plugins.core import (
    ADMM_RHO,
    LayerCurvature,
    admm_prune,
    layer_curvature,
    resolve_on_mask,
    row_fisher_curvature,
)
from moonshot_plugins.llmcompressor.host_fields import is_number

__all__ = [
    "WEIGHT_UPDATES",
    "FISHER_ROWS",
    "DEFAULT_FISHER_ROW_RANK",
    "LayerSnapshot",
    "RowFisher",
    "damped_hessian",
    "snapshot_curvature",
    "updated_weight",
    "validate_weight_update",
    "validate_fisher_rows",
    "validate_fisher_row_rank",
    "validate_resolve_max_iters",
    "check_resolve_max_iters",
    "validate_admm_rho",
    "check_admm_rho",
    "resolve_iterations",
]

WEIGHT_UPDATES = ("host", "resolve", "admm")
FISHER_ROWS = ("shared", "per_row")
# k copies of each pruned layer's weight, all layers at once, on the CPU
DEFAULT_FISHER_ROW_RANK = 8
# CG iterations of the final re-solve. A per-row low-rank Fisher puts k large
# eigenvalues in each row's system that the Jacobi preconditioner does not
# flatten: on a random 576 x 1536 layer at k = 8, lam = 0.5 the re-solve took
# 170 iterations to rtol 1e-4 (the shared objective: 17).
# ``resolve_max_iters`` left unset: these caps. On real SmolLM2-135M layers at
# lam 0, 50 iterations reach at least 99.9% of 400 iterations' improvement
# (docs/experiments.md, 2026-12-01). Wanda's re-solve runs at 50 since its
# protocol rows at 50 matched those at 100 (2026-12-02); SparseGPT's keeps 100
# until its own rows at 50 are run.
RESOLVE_ITERS = 100
WANDA_RESOLVE_ITERS = 50
HOST_RESOLVE_ITERS = {"sparsegpt": RESOLVE_ITERS, "wanda": WANDA_RESOLVE_ITERS}
PER_ROW_RESOLVE_ITERS = 300


def validate_weight_update(value: object) -> str:
    if value not in WEIGHT_UPDATES:
        raise ValueError(f"weight_update must be one of {list(WEIGHT_UPDATES)}, got {value!r}")
    return value  # type: ignore[return-value]


def validate_fisher_rows(value: object) -> str:
    if value not in FISHER_ROWS:
        raise ValueError(f"fisher_rows must be one of {list(FISHER_ROWS)}, got {value!r}")
    return value  # type: ignore[return-value]


def _positive_int_or_none(value: object) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def validate_fisher_row_rank(value: object) -> int | None:
    if not _positive_int_or_none(value):
        raise ValueError(
            f"fisher_row_rank must be a positive integer (the sketch's rank) or None "
            f"(exact: one copy of the weight per calibration sample), got {value!r}"
        )
    return value


def validate_resolve_max_iters(value: object) -> int | None:
    if not _positive_int_or_none(value):
        raise ValueError(
            f"resolve_max_iters must be a positive integer (PCG iterations per layer) or None "
            f"(the default: SparseGPT {RESOLVE_ITERS}, {PER_ROW_RESOLVE_ITERS} with "
            f"fisher_rows='per_row'; Wanda {WANDA_RESOLVE_ITERS}), got {value!r}"
        )
    return value


def check_resolve_max_iters(weight_update: str, fields_set: set[str],
                            updates: tuple[str, ...] = WEIGHT_UPDATES) -> None:
    """``resolve_max_iters`` caps the re-solve, which the host's update does not
    run; ``updates`` are the modifier's allowed ``weight_update`` values."""
    if weight_update == "host" and "resolve_max_iters" in fields_set:
        solved = [update for update in updates if update != "host"]
        raise ValueError(
            f"resolve_max_iters applies only with weight_update in {solved}, "
            "got weight_update='host'"
        )


def validate_admm_rho(value: object) -> float:
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"admm_rho must be a finite number > 0 (ADMM's initial penalty, relative to the "
            f"mean curvature diagonal; default {ADMM_RHO}), got {value!r}"
        )
    return float(value)


def check_admm_rho(weight_update: str, fields_set: set[str]) -> None:
    """``admm_rho`` sets the ADMM search, which only ``weight_update: admm`` runs."""
    if weight_update != "admm" and "admm_rho" in fields_set:
        raise ValueError(f"admm_rho applies only with weight_update='admm', got weight_update={weight_update!r}")


def resolve_iterations(resolve_max_iters: int | None, host: str, per_row: bool = False) -> int:
    """The re-solve's PCG cap: the field's value, else the host's default
    (``HOST_RESOLVE_ITERS``; ``PER_ROW_RESOLVE_ITERS`` with a per-row Fisher)."""
    if resolve_max_iters is not None:
        return resolve_max_iters
    return PER_ROW_RESOLVE_ITERS if per_row else HOST_RESOLVE_ITERS[host]


@dataclass
class RowFisher:
    """``fisher_rows: per_row``: one layer's per-row Fisher and what the sweep
    combined into its Hessian.

    :param hessian: H, (d_in, d_in) fp32, the host's reconstruction Hessian
        before the Fisher joined it, undamped
    :param fisher: F, (d_in, d_in), the row-averaged ("sample") Fisher the
        sweep's Hessian holds
    :param factors: U, (d_out, d_in, k) fp32 on the CPU, F_j = U_j U_j^T
    :param taylor_weight: the layer's lam in [0, 1]
    """

    hessian: torch.Tensor
    fisher: torch.Tensor
    factors: torch.Tensor
    taylor_weight: float


@dataclass
class LayerSnapshot:
    """One layer just before the host's sweep.

    :param dense_weight: (d_out, d_in) fp32, the weight the sweep starts from
    :param hessian: (d_in, d_in) fp32, the Hessian the sweep uses, undamped
    :param sparsity: the layer's target sparsity (unstructured masks)
    :param row_fisher: ``fisher_rows: per_row`` only (else None)
    """

    dense_weight: torch.Tensor
    hessian: torch.Tensor
    sparsity: float
    row_fisher: RowFisher | None = None


def damped_hessian(hessian: torch.Tensor, dampening_frac: float) -> torch.Tensor:
    """SparseGPT's conditioning of H (d_in, d_in): dead inputs (zero diagonal)
    get a unit diagonal, then ``dampening_frac`` x mean(diag) on the diagonal."""
    h = hessian.clone()
    diagonal = torch.diagonal(h)
    diagonal[diagonal == 0] = 1.0
    diagonal += dampening_frac * diagonal.mean()
    return h


def snapshot_curvature(snapshot: LayerSnapshot, dampening_frac: float) -> LayerCurvature:
    """The layer objective's curvature: the sweep's damped Hessian, or with a
    per-row Fisher, each row's own A_j (module docstring), damped alike."""
    damped = damped_hessian(snapshot.hessian, dampening_frac)
    rows = snapshot.row_fisher
    if rows is None:
        return layer_curvature(damped, 0.0, 1.0, 1.0)
    damping = torch.diagonal(damped) - torch.diagonal(snapshot.hessian)
    return row_fisher_curvature(rows.hessian, rows.fisher, rows.factors, rows.taylor_weight, damping)


@torch.no_grad()
def updated_weight(
    weight_update: str,
    snapshot: LayerSnapshot,
    host_weight: torch.Tensor,
    dampening_frac: float,
    prune_n: int,
    prune_m: int,
    resolve_max_iters: int | None = None,
    admm_rho: float = ADMM_RHO,
) -> tuple[torch.Tensor, float, float]:
    """The new (d_out, d_in) fp32 weight, and the objective (dimensionless, in
    units of H) of the host's weight and of the new one.

    :param host_weight: the sweep's result, (d_out, d_in); its zeros are its mask
    :param resolve_max_iters: PCG cap of the re-solve (None: SparseGPT's default,
        see :func:`resolve_iterations`)
    :param admm_rho: ADMM's initial penalty (``weight_update: admm``; dimensionless)
    """
    curvature = snapshot_curvature(snapshot, dampening_frac)
    dense = snapshot.dense_weight
    iterations = resolve_iterations(resolve_max_iters, "sparsegpt", snapshot.row_fisher is not None)
    if weight_update == "resolve":
        new = resolve_on_mask(curvature, dense, host_weight != 0, host_weight, iterations).weight
    else:
        new = admm_prune(
            curvature, dense, snapshot.sparsity, prune_n, prune_m, initial_weight=host_weight,
            rho=admm_rho, resolve_iters=iterations,
        ).weight
    before = float(curvature.row_values(host_weight - dense).sum())
    after = float(curvature.row_values(new - dense).sum())
    return new, before, after
