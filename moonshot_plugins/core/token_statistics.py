"""The token Fisher kept as per-position weights instead of a d_in x d_in matrix.

The token Fisher of a layer is F = (1/N) sum_{i,t} w_{i,t} x_{i,t} x_{i,t}^T
with w_{i,t} = ||d_{i,t}||^2 / d_out (d: gradient w.r.t. the layer output).
Keeping the T weights of every sample, plus the energies

    A = sum_{i,t} ||x_{i,t}||^2,    B = sum_{i,t} w_{i,t} ||x_{i,t}||^2

(the mean-diagonal scales of X^T X and of F, up to the same factor d_in), lets
a host rebuild the token Fisher of *any* inputs of the same positions as
sum_t w_t x_t x_t^T by reweighting its own inputs (see
:func:`moonshot_plugins.core.objective.token_objective_weights`).

A position's input enters only through ||x_t||^2 and sum(x_t), so the
forward pass can hold those two numbers (:func:`position_summary`) instead of
x until the backward pass arrives.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["position_summary", "TokenStatistics"]


def position_summary(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, d_in) -> (B, T, 2) in ``dtype``: ||x_t||^2 and sum(x_t) of every position."""
    x = x.to(dtype)
    return torch.stack([x.square().sum(dim=-1), x.sum(dim=-1)], dim=-1)


class TokenStatistics:
    """Per-layer token-Fisher weights, energies and row traces, in sample order.

    :param names: the layers' names
    """

    def __init__(self, names: Iterable[str]):
        names = list(names)
        self.weights: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self.input_sums: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self._energies: dict[str, torch.Tensor] = {}
        self._row_energies: dict[str, torch.Tensor] = {}

    def add(self, name: str, summary: torch.Tensor, d: torch.Tensor) -> None:
        """Add one batch of layer ``name``.

        :param summary: (B, T, 2) from :func:`position_summary`
        :param d: gradient w.r.t. the layer output as rows (B, T, d_out), in
            the dtype of ``summary``
        """
        weights = d.square().sum(dim=-1) / d.shape[-1]  # (B, T)
        energy, sums = summary.unbind(-1)  # (B, T) each
        update = torch.stack([energy.sum(), (weights * energy).sum()]).double()
        _add(self._energies, name, update.cpu())
        # per output row i: sum_t d_ti^2 ||x_t||^2, the trace of row i's own token Fisher
        rows = torch.einsum("bt,bto->o", energy, d.square())
        _add(self._row_energies, name, rows.double().cpu())
        self.weights[name].extend(weights.cpu().unbind(0))
        # per-position input sums identify a sample when a later pass sees the
        # samples in another order (a shuffling dataloader)
        # (contiguous() copies the strided view, so the (B, T, 2) summary is freed)
        self.input_sums[name].extend(sums.contiguous().cpu().unbind(0))

    def summary(self, name: str) -> torch.Tensor | None:
        """Every number kept for layer ``name`` in one fp64 tensor (None before
        any batch): what a finiteness check reads."""
        if name not in self._energies:
            return None
        parts = [self._energies[name], self._row_energies[name]]
        parts += [w.double() for w in self.weights[name]] + [s.double() for s in self.input_sums[name]]
        return torch.cat([p.flatten() for p in parts])

    def energies(self, name: str) -> tuple[float, float]:
        """(A, B) of layer ``name`` (see the module docstring)."""
        energy, weighted = self._energies[name].tolist()
        return energy, weighted

    def row_sensitivities(self, name: str) -> torch.Tensor:
        """(d_out,) fp32: each output row's token-Fisher trace over its mean across rows."""
        rows = self._row_energies[name]
        return (rows / rows.mean().clamp(min=torch.finfo(torch.float64).tiny)).float()


def _add(store: dict[str, torch.Tensor], name: str, update: torch.Tensor) -> None:
    if name in store:
        store[name] += update
    else:
        store[name] = update
