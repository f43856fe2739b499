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

The objective is the one the host's solver saw: its Hessian after MOONSHOT
combined it with the Fisher (token or sample mode), damped as SparseGPT damps
it, and after ``row_weights`` scaled the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moonshot_plugins.core import admm_prune, layer_curvature, resolve_on_mask

__all__ = ["WEIGHT_UPDATES", "LayerSnapshot", "damped_hessian", "updated_weight", "validate_weight_update"]

WEIGHT_UPDATES = ("host", "resolve", "admm")


def validate_weight_update(value: object) -> str:
    if value not in WEIGHT_UPDATES:
        raise ValueError(f"weight_update must be one of {list(WEIGHT_UPDATES)}, got {value!r}")
    return value  # type: ignore[return-value]


@dataclass
class LayerSnapshot:
    """One layer just before the host's sweep.

    :param dense_weight: (d_out, d_in) fp32, the weight the sweep starts from
    :param hessian: (d_in, d_in) fp32, the Hessian the sweep uses, undamped
    :param sparsity: the layer's target sparsity (unstructured masks)
    """

    dense_weight: torch.Tensor
    hessian: torch.Tensor
    sparsity: float


def damped_hessian(hessian: torch.Tensor, dampening_frac: float) -> torch.Tensor:
    """SparseGPT's conditioning of H (d_in, d_in): dead inputs (zero diagonal)
    get a unit diagonal, then ``dampening_frac`` x mean(diag) on the diagonal."""
    h = hessian.clone()
    diagonal = torch.diagonal(h)
    diagonal[diagonal == 0] = 1.0
    diagonal += dampening_frac * diagonal.mean()
    return h


@torch.no_grad()
def updated_weight(
    weight_update: str,
    snapshot: LayerSnapshot,
    host_weight: torch.Tensor,
    dampening_frac: float,
    prune_n: int,
    prune_m: int,
) -> tuple[torch.Tensor, float, float]:
    """The new (d_out, d_in) fp32 weight, and the objective (dimensionless, in
    units of H) of the host's weight and of the new one.

    :param host_weight: the sweep's result, (d_out, d_in); its zeros are its mask
    """
    curvature = layer_curvature(damped_hessian(snapshot.hessian, dampening_frac), 0.0, 1.0, 1.0)
    dense = snapshot.dense_weight
    if weight_update == "resolve":
        new = resolve_on_mask(curvature, dense, host_weight != 0, host_weight).weight
    else:
        new = admm_prune(
            curvature, dense, snapshot.sparsity, prune_n, prune_m, initial_weight=host_weight
        ).weight
    before = float(curvature.row_values(host_weight - dense).sum())
    after = float(curvature.row_values(new - dense).sum())
    return new, before, after
