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
    "token_objective_weights",
    "auto_taylor_weight",
    "auto_taylor_weight_from_moments",
    "token_weight_moments",
    "AUTO",
]


AUTO = "auto"


def validate_taylor_weight(taylor_weight: float | str, allow_auto: bool = False) -> float | str:
    """Return ``taylor_weight`` as float (or "auto" where allowed), or raise
    naming the allowed values."""
    if allow_auto and taylor_weight == AUTO:
        return AUTO
    allowed = "a number in [0, 1] or 'auto'" if allow_auto else "in [0, 1]"
    if isinstance(taylor_weight, bool):  # YAML's true/false are not numbers here
        raise ValueError(f"taylor_weight must be {allowed}, got {taylor_weight!r}")
    try:
        value = float(taylor_weight)
    except (TypeError, ValueError):
        raise ValueError(f"taylor_weight must be {allowed}, got {taylor_weight!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"taylor_weight must be {allowed}, got {taylor_weight!r}")
    return value


def mean_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """Scale of a square curvature matrix: mean of its diagonal (a 0-d tensor)."""
    return torch.diagonal(matrix).mean()


ZERO_FISHER_TAYLOR_ONLY = (
    "the layer's Fisher is zero (no gradient reached it), so taylor_weight 1 "
    "(Taylor only) leaves it no objective and every weight would be pruned; "
    "use taylor_weight < 1 or leave the layer out of the targets"
)


def _ratio(num: torch.Tensor, den: torch.Tensor, lam: float) -> torch.Tensor:
    # A layer that saw no gradient (den == 0) contributes no Taylor term rather
    # than NaNs; the reconstruction term then carries the whole objective. At
    # lam 1 there is no reconstruction term to carry it: the combined curvature
    # would be zero and the host would prune the whole layer, silently.
    if lam == 1.0 and not bool(den > 0):
        raise ValueError(ZERO_FISHER_TAYLOR_ONLY)
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
    scale = _ratio(mean_diagonal(hessian), mean_diagonal(fisher), lam)
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
    scale = _ratio(row_scalars.mean(), diagonal_fisher.mean(), lam)
    return (1.0 - lam) * row_scalars.reshape(1, -1) + (lam * scale) * diagonal_fisher


def token_objective_weights(
    token_weights: torch.Tensor,
    energy: float,
    weighted_energy: float,
    taylor_weight: float,
    fisher_fraction: float = 1.0,
) -> torch.Tensor:
    """Per-position weights c_t that turn a host's X^T X into the MOONSHOT Hessian.

    With the token Fisher F = sum_t w_t x_t x_t^T, both terms are sums over the
    same positions, so the combined Hessian is the host's own accumulation over
    reweighted inputs: sum_t c_t x_t x_t^T with

        c_t = (1 - lam) + lam * (A / B) * w_t / fisher_fraction,

    A = sum_t ||x_t||^2 and B = sum_t w_t ||x_t||^2 (the mean-diagonal scales of
    X^T X and of F, up to the same factor d_in). On the inputs A and B were
    measured on this equals ``combine_hessians(H_rec, F, lam)`` exactly, and the
    mean diagonal of H_rec is preserved. A host feeds ``sqrt(c_t) * x_t`` to its
    accumulation, which keeps its d_in x d_in structure and its cost.

    :param token_weights: w_t = ||d_t||^2 / d_out, any shape (e.g. (B, T))
    :param energy: A (from :meth:`FisherCollector.token_energies`)
    :param weighted_energy: B
    :param taylor_weight: lam in [0, 1]
    :param fisher_fraction: share of the host's calibration samples that
        carry Fisher weights (the others get c = 1 - lam); dividing by it keeps
        the Taylor term's total weight lam when the gradient pass saw fewer samples
    :return: c, same shape as ``token_weights``, fp32
    """
    lam = validate_taylor_weight(taylor_weight)
    if not 0.0 < fisher_fraction <= 1.0:
        raise ValueError(f"fisher_fraction must be in (0, 1], got {fisher_fraction}")
    if lam == 1.0 and not weighted_energy > 0:
        raise ValueError(ZERO_FISHER_TAYLOR_ONLY)
    scale = energy / weighted_energy if weighted_energy > 0 else 0.0
    return (1.0 - lam) + (lam * scale / fisher_fraction) * token_weights.float()


def token_weight_moments(token_weights: torch.Tensor) -> torch.Tensor:
    """(count, sum, sum of squares) of per-position weights, (3,) fp64: what
    :func:`auto_taylor_weight_from_moments` reads. Moments of disjoint sets of
    positions (e.g. calibration shards on several processes) add up.

    :param token_weights: w_t, any shape
    """
    w = token_weights.double().flatten()
    return torch.stack([torch.tensor(float(w.numel()), dtype=torch.float64), w.sum(), w.square().sum()])


def auto_taylor_weight(
    token_weights: torch.Tensor,
    energy: float,
    weighted_energy: float,
    min_effective_fraction: float = 0.5,
) -> float:
    """The largest lam whose token weights c_t keep an effective sample size of
    at least ``min_effective_fraction`` of the positions (``taylor_weight: auto``).

    c_t = (1 - lam) + lam r_t with r_t = (A/B) w_t (:func:`token_objective_weights`).
    The Fisher weights of a layer are heavy-tailed: a few positions can carry most
    of ||d||^2, and a Hessian dominated by a few positions is a noisy estimate
    from the calibration set. The effective sample size (sum c)^2 / (n sum c^2)
    falls from 1 (lam = 0) as lam grows; with m = mean(r) - 1, v = var(r),
    ESS >= tau  <=>  lam (sqrt(v) - k m) <= k,  k = sqrt((1 - tau) / tau),
    so lam* = min(1, k / (sqrt(v) - k m)) (1 where the left side never binds).
    Layers whose Fisher weights are nearly uniform get lam near 1; layers where a
    few positions dominate get a small lam. tau = 0.5 (variance inflation at most
    2x) is the default, fixed a priori, not fitted to any evaluation.

    :param token_weights: w_t of every calibration position of the layer, any shape
    :param energy: A; :param weighted_energy: B (see :func:`token_objective_weights`)
    :param min_effective_fraction: tau in (0, 1]
    :return: lam in [0, 1]
    """
    return auto_taylor_weight_from_moments(
        token_weight_moments(token_weights), energy, weighted_energy, min_effective_fraction
    )


def auto_taylor_weight_from_moments(
    moments: torch.Tensor,
    energy: float,
    weighted_energy: float,
    min_effective_fraction: float = 0.5,
) -> float:
    """:func:`auto_taylor_weight` from the weights' :func:`token_weight_moments`
    (count, sum, sum of squares) instead of the weights themselves.

    :param moments: (3,) fp64, summed over every calibration position of the layer
    """
    if not 0.0 < min_effective_fraction <= 1.0:
        raise ValueError(f"min_effective_fraction must be in (0, 1], got {min_effective_fraction}")
    if weighted_energy <= 0:
        return 0.0  # no gradient reached the layer: reconstruction only
    count, total, total_sq = moments.double().tolist()
    scale = energy / weighted_energy  # r_t = scale * w_t
    mean = total / count
    m = scale * mean - 1.0
    v = max(0.0, scale * scale * (total_sq / count - mean * mean))
    k = ((1.0 - min_effective_fraction) / min_effective_fraction) ** 0.5
    slope = v**0.5 - k * m
    return 1.0 if slope <= k else k / slope


def row_objective_weights(
    row_sensitivities: torch.Tensor, lam: float, min_effective_fraction: float = 0.5
) -> torch.Tensor:
    """Per-output-row weights m_i = (1 - lam_r) + lam_r * s_i of the combined objective.

    With s_i the row's share of the token Fisher (mean 1), row i's combined
    Hessian (1-lam) H_rec + lam s_i F has about m_i times the trace of the
    row-shared (1-lam) H_rec + lam F. Scaling row i of W by sqrt(m_i) before the
    row-shared solver and back after makes an unstructured mask trade weights
    across rows by m_i (each row's own solve is unchanged; N:M masks too).

    The row shares are heavy-tailed (a few q_proj / MLP rows carry 30-100x the
    mean, others 0.001x), and at lam = 1 a row with s_i near 0 would be pruned
    whole on the strength of a noisy estimate. So the rows get the rule
    ``taylor_weight: auto`` applies to positions: lam_r = min(lam, the largest
    lam whose m keeps an effective sample size of ``min_effective_fraction``
    of the rows) (:func:`auto_taylor_weight` on s).

    :param row_sensitivities: s, (d_out,), mean 1
    :param lam: the layer's taylor_weight in [0, 1]
    :return: m, (d_out,), mean 1, every m_i >= 1 - lam_r
    """
    lam = validate_taylor_weight(lam)
    cap = auto_taylor_weight(row_sensitivities, 1.0, 1.0, min_effective_fraction)
    lam_rows = min(lam, cap)
    return (1.0 - lam_rows) + lam_rows * row_sensitivities
