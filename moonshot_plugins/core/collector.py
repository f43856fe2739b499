"""Empirical Fisher statistics of layer weights, collected with hooks.

For a layer ``y = x W^T`` (W: d_out x d_in) and one calibration sample i with
T positions, let X_i (T x d_in) be the layer input and D_i (T x d_out) the
gradient of that sample's loss with respect to the layer output. The weight
gradient of the sample is G_i = D_i^T X_i (d_out x d_in). Over N samples:

* ``fisher_mode="sample"``: F = (1/N) sum_i G_i^T G_i / d_out
  (the per-sample empirical Fisher of each output row, averaged over rows);
* ``fisher_mode="token"``:  F = (1/N) sum_{i,t} ||d_{i,t}||^2 x_{i,t} x_{i,t}^T / d_out
  (every position a rank-one sample; exactly the cost of the host's X^T X).

Both are d_in x d_in, the shape of SparseGPT's row-shared Hessian. The
per-weight diagonal (d_out x d_in), for hosts whose objective is diagonal, is
(1/N) sum_i G_i**2 ("sample") or (1/N) sum_{i,t} d_{i,t}**2 x_{i,t}**2 ("token").

With ``row_factors``, each layer also gets the per-row Fisher factors of
every sample's G_i (:class:`~moonshot_plugins.core.row_fisher.RowFisherBuilder`).

Weights, inputs and gradients are in the standardised orientation of
:mod:`moonshot_plugins.core.layers`. Only activation gradients are needed
(:mod:`moonshot_plugins.core.gradient_pass`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from moonshot_plugins.core.finite import NonFiniteError, describe_non_finite
from moonshot_plugins.core.layers import (
    check_collectable_layer,
    conv_groups,
    in_features,
    is_norm_layer,
    layer_inputs,
    layer_output_grads,
    out_features,
)
from moonshot_plugins.core.norm_fisher import norm_weight_fisher_update, normalized_input
from moonshot_plugins.core.row_fisher import RowFisherBuilder
from moonshot_plugins.core.token_statistics import TokenStatistics, position_summary

__all__ = ["FISHER_MODES", "validate_fisher_mode", "FisherCollector"]

FISHER_MODES: tuple[str, ...] = ("sample", "token")
# The gradient pass may run in bf16; every statistic is accumulated in fp32.
FISHER_PRECISION = torch.float32


def validate_fisher_mode(fisher_mode: str) -> str:
    """Return ``fisher_mode``, or raise naming :data:`FISHER_MODES`."""
    if fisher_mode not in FISHER_MODES:
        raise ValueError(
            f"fisher_mode must be one of {list(FISHER_MODES)}, got {fisher_mode!r}"
        )
    return fisher_mode


class FisherCollector:
    """Accumulate empirical Fisher statistics for a set of layers.

    Use as a context manager around forward/backward passes (or call
    :func:`moonshot_plugins.core.run_gradient_pass`). Each backward through a
    registered layer adds one accumulation of cost O(T * d_in^2) ("token") or
    O(T * d_in * d_out + d_out * d_in^2) ("sample"), done as one matmul per
    layer per batch. All statistics are fp32 (the diagonal's sums may be held in
    bf16, ``diagonal_dtype``); each flag turns one on:

    :param modules: name -> layer (nn.Linear, transformers Conv1D, nn.Conv2d;
        see ``grouped_convs`` and ``norm_layers`` for more)
    :param fisher_mode: "sample" or "token" (see the module docstring)
    :param matrix: the row-averaged Fisher F, (d_in, d_in) (:meth:`fisher`)
    :param diagonal: the per-weight diagonal Fisher, (d_out, d_in)
        (:meth:`diagonal_fisher`)
    :param offload: keep accumulators on the CPU between updates
    :param input_moments: the input second moment M = (1/N) sum_i X_i^T X_i,
        (d_in, d_in), of every linear/conv layer (:meth:`input_moment`);
        accumulated in the forward hook, so forward passes alone suffice,
        with or without grad
    :param grouped_convs: accept Conv2d with groups > 1 (depthwise included)
        for the diagonal Fisher, (C_out, C_in/groups*kh*kw) (the flattened
        weight's shape), and the input moments, which are then per group:
        (groups, d_g, d_g) with d_g = C_in/groups*kh*kw; ``matrix`` must then
        be False
    :param norm_layers: accept BatchNorm (timm's BatchNormAct2d included: the
        fused activation is differentiated through) and LayerNorm with an
        affine weight gamma, whose diagonal Fisher is per channel, (C,), from
        the per-sample gradient g_i = sum_t d_{i,t} * xhat_{i,t} with xhat the
        normalised input (:mod:`moonshot_plugins.core.norm_fisher`);
        ``matrix`` must then be False
    :param sample_rows: read a 2-D layer input (batch, features) as one sample
        per row (a classifier head after pooling) instead of one sample of
        many positions (the default, for flattened token batches)
    :param token_weights: the token Fisher as per-position weights
        w_{i,t} = ||d_{i,t}||^2 / d_out of every sample (:meth:`token_weights`,
        T floats per sample and layer), with the energies A and B that fix its
        scale (:meth:`token_energies`), each output row's share of its trace
        (:meth:`row_sensitivities`) and per-position input sums
        (:meth:`input_sums`); see :mod:`moonshot_plugins.core.token_statistics`.
        Needs ``fisher_mode="token"``; Linear/Conv1D only
    :param row_factors: each layer's per-row Fisher factors U (d_out, d_in, k),
        F_j = U_j U_j^T over the per-sample gradients G_i whatever
        ``fisher_mode`` (:meth:`pop_row_factors`). Always kept on the CPU, in
        fp32: k copies of every layer's weight at once (N copies when exact).
        Not for norm layers or grouped convs
    :param row_factor_rank: k, the cap on the factors' columns (a Gaussian
        sketch once more than k samples arrive), or None for the exact factors
    :param diagonal_dtype: the dtype the diagonal Fisher's running sums are
        held in: bf16 halves the d_out x d_in per layer that a pass over the
        whole model holds; each update is still computed in fp32 and rounded
        once per batch into the sum (default fp32)
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        fisher_mode: str = "token",
        matrix: bool = True,
        diagonal: bool = False,
        offload: bool = False,
        input_moments: bool = False,
        grouped_convs: bool = False,
        norm_layers: bool = False,
        sample_rows: bool = False,
        token_weights: bool = False,
        row_factors: bool = False,
        row_factor_rank: int | None = None,
        diagonal_dtype: torch.dtype = FISHER_PRECISION,
    ):
        self.fisher_mode = validate_fisher_mode(fisher_mode)
        if token_weights and self.fisher_mode != "token":
            raise ValueError("token_weights=True needs fisher_mode='token'")
        if not (matrix or diagonal or input_moments or token_weights or row_factors):
            raise ValueError("FisherCollector needs matrix=True or diagonal=True")
        for name, module in modules.items():
            check_collectable_layer(
                name, module, matrix or row_factors, grouped_convs, norm_layers, token_weights
            )
        self.modules = dict(modules)
        self.matrix = matrix
        self.diagonal = diagonal
        self.offload = offload
        self.input_moments = input_moments
        self.sample_rows = sample_rows
        self.keep_token_weights = token_weights
        self.row_factors = row_factors
        self.diagonal_dtype = diagonal_dtype
        # the layer inputs themselves are needed in backward (not only their summary)
        self._needs_inputs = matrix or diagonal or row_factors
        self.num_samples: dict[str, int] = {name: 0 for name in self.modules}
        self.num_moment_samples: dict[str, int] = {name: 0 for name in self.modules}
        self._matrix_acc: dict[str, torch.Tensor] = {}
        self._diag_acc: dict[str, torch.Tensor] = {}
        self._moment_acc: dict[str, torch.Tensor] = {}
        self._token_statistics = TokenStatistics(self.modules)
        self._row_builders = {
            name: RowFisherBuilder(out_features(module), in_features(module), row_factor_rank)
            for name, module in self.modules.items()
        } if row_factors else {}
        self._handles: list[Any] = []

    # -- hooks ---------------------------------------------------------------
    def __enter__(self) -> "FisherCollector":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward_hook(self, name: str) -> Callable:
        norm = is_norm_layer(self.modules[name])

        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            if self.input_moments and not norm:
                with torch.autocast(args[0].device.type, enabled=False):
                    self._accumulate_moments(name, module, args[0].detach())
            if not torch.is_grad_enabled() or not (self._needs_inputs or self.keep_token_weights):
                return None
            if norm:
                x = normalized_input(module, args[0].detach())
            else:
                x = self._inputs(module, args[0].detach())
                if self.keep_token_weights and not self._needs_inputs:
                    # two numbers per position are all token weights need:
                    # holding them instead of x until backward saves memory
                    x = position_summary(x, FISHER_PRECISION)
            if not output.requires_grad:
                # With frozen weights, the first layers' inputs carry no grad;
                # making the output a leaf lets the gradient reach it.
                output = output.detach().requires_grad_(True)
            output.register_hook(partial(self._accumulate_full_precision, name, module, x))
            return output

        return hook

    def _inputs(self, module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        if self.sample_rows and inp.dim() == 2 and not isinstance(module, nn.Conv2d):
            return inp.unsqueeze(1)
        return layer_inputs(module, inp)

    def _accumulate_moments(self, name: str, module: nn.Module, inp: torch.Tensor) -> None:
        x = self._inputs(module, inp).to(FISHER_PRECISION)
        self.num_moment_samples[name] += x.shape[0]
        groups = conv_groups(module)
        if groups == 1:
            x2d = x.reshape(-1, x.shape[-1])
            self._add(self._moment_acc, name, x2d.T @ x2d)
        else:
            xg = x.reshape(-1, groups, x.shape[-1] // groups)
            self._add(self._moment_acc, name, torch.einsum("tgi,tgj->gij", xg, xg))

    def _accumulate_full_precision(
        self, name: str, module: nn.Module, x: torch.Tensor, g: torch.Tensor
    ) -> None:
        # The gradient pass may run under autocast; the accumulators must not:
        # bf16 matmuls and sums of many small positive terms lose the small ones.
        with torch.autocast(g.device.type, enabled=False):
            self._accumulate(name, module, x, g.detach())

    def _accumulate(
        self, name: str, module: nn.Module, x: torch.Tensor, g: torch.Tensor
    ) -> None:
        if is_norm_layer(module):
            update = norm_weight_fisher_update(module, x, g, self.fisher_mode, FISHER_PRECISION)
            self.num_samples[name] += x.shape[0]
            return self._add(self._diag_acc, name, update)
        x = x.to(FISHER_PRECISION)
        if self.sample_rows and g.dim() == 2 and not isinstance(module, nn.Conv2d):
            g = g.unsqueeze(1)
        d = layer_output_grads(module, g).to(FISHER_PRECISION)
        self.num_samples[name] += x.shape[0]
        if self.keep_token_weights:
            if not self._needs_inputs:
                return self._token_statistics.add(name, x, d)  # x is the summary
            self._token_statistics.add(name, position_summary(x, FISHER_PRECISION), d)
        if conv_groups(module) != 1:  # diagonal only (checked in __init__)
            return self._accumulate_grouped_diagonal(name, conv_groups(module), x, d)
        if self.fisher_mode == "token":
            x2d, d2d = x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1])
            if self.matrix:
                weights = d2d.square().sum(dim=1, keepdim=True)
                self._add(self._matrix_acc, name, (x2d * weights).T @ x2d)
            if self.diagonal:
                self._add(self._diag_acc, name, d2d.square().T @ x2d.square())
            if self.row_factors:
                self._row_builders[name].add(x, d)
        else:
            grads = d.transpose(1, 2) @ x  # (B, d_out, d_in): one G_i per sample
            if self.row_factors:
                self._row_builders[name].add_gradients(grads)
            if self.matrix:
                rows = grads.reshape(-1, grads.shape[-1])
                self._add(self._matrix_acc, name, rows.T @ rows)
            if self.diagonal:
                self._add(self._diag_acc, name, grads.square().sum(dim=0))

    def _accumulate_grouped_diagonal(
        self, name: str, groups: int, x: torch.Tensor, d: torch.Tensor
    ) -> None:
        """Diagonal Fisher of a grouped conv: the products stay within each group."""
        b, t = x.shape[:2]
        xg = x.reshape(b, t, groups, -1)
        dg = d.reshape(b, t, groups, -1)
        if self.fisher_mode == "token":
            diag = torch.einsum("btgo,btgi->goi", dg.square(), xg.square())
        else:
            diag = torch.einsum("btgo,btgi->bgoi", dg, xg).square().sum(dim=0)
        self._add(self._diag_acc, name, diag.reshape(d.shape[-1], -1))

    def _add(self, store: dict[str, torch.Tensor], name: str, update: torch.Tensor):
        if self.offload:
            update = update.cpu()
        if name not in store:
            store[name] = update.to(self.diagonal_dtype) if store is self._diag_acc else update
        else:
            store[name] += update  # in fp32, rounded once into a bf16 diagonal

    # -- results -------------------------------------------------------------
    def check_finite(self) -> None:
        """Raise :class:`~moonshot_plugins.core.finite.NonFiniteError` naming the
        first layer (in ``modules`` order) whose statistics hold a NaN or inf:
        its inputs or output gradients were not finite."""
        for name in self.modules:
            stores = {
                "Fisher": self._matrix_acc.get(name),
                "diagonal Fisher": self._diag_acc.get(name),
                "input moment": self._moment_acc.get(name),
                "token statistics": self._token_statistics.summary(name),
            }
            for statistic, value in stores.items():
                found = None if value is None else describe_non_finite(value)
                if found is not None:
                    raise NonFiniteError(
                        f"the {statistic} of layer {name!r} holds {found}: its inputs or "
                        "output gradients were not finite in the gradient pass (float16 "
                        "activations can overflow: load the model in float32 or bfloat16). "
                        "Nothing was changed"
                    )

    def _num(self, name: str) -> int:
        n = self.num_samples[name]
        if n == 0:
            raise RuntimeError(
                f"No gradient reached layer {name!r}: run a forward and backward "
                "pass inside the collector before reading the Fisher"
            )
        return n

    def fisher(self, name: str) -> torch.Tensor:
        """Row-averaged empirical Fisher of layer ``name``: (d_in, d_in), fp32."""
        if not self.matrix:
            raise RuntimeError("collector was built with matrix=False")
        count = self._num(name) * out_features(self.modules[name])
        return self._matrix_acc[name] / count

    def diagonal_fisher(self, name: str) -> torch.Tensor:
        """Per-weight diagonal empirical Fisher of layer ``name``: (d_out, d_in),
        in ``diagonal_dtype`` (divided in fp32)."""
        if not self.diagonal:
            raise RuntimeError("collector was built with diagonal=False")
        count = self._num(name)
        return (self._diag_acc[name].float() / count).to(self.diagonal_dtype)

    def input_moment(self, name: str) -> torch.Tensor:
        """Input second moment (1/N) sum_i X_i^T X_i of layer ``name``, fp32.

        (d_in, d_in) for groups == 1, (groups, d_g, d_g) for grouped convs;
        N counts samples (sequence positions / pixels are summed).
        """
        if not self.input_moments:
            raise RuntimeError("collector was built with input_moments=False")
        if is_norm_layer(self.modules[name]):
            raise ValueError(f"layer {name!r} is a norm layer: it has no input moment")
        n = self.num_moment_samples[name]
        if n == 0:
            raise RuntimeError(
                f"No input reached layer {name!r}: run a forward pass inside the "
                "collector before reading its input moment"
            )
        return self._moment_acc[name] / n

    def _token_statistics_of(self, name: str) -> TokenStatistics:
        if not self.keep_token_weights:
            raise RuntimeError("collector was built with token_weights=False")
        self._num(name)
        return self._token_statistics

    def token_weights(self, name: str) -> list[torch.Tensor]:
        """Token-Fisher weights ||d_t||^2 / d_out of layer ``name``: one (T_i,)
        fp32 CPU tensor per sample, in the order the samples were seen."""
        return self._token_statistics_of(name).weights[name]

    def token_energies(self, name: str) -> tuple[float, float]:
        """(A, B): A = sum ||x_t||^2 and B = sum w_t ||x_t||^2 over every position
        seen by layer ``name`` (the mean-diagonal scales of X^T X and of the
        token Fisher, up to the same factor)."""
        return self._token_statistics_of(name).energies(name)

    def row_sensitivities(self, name: str) -> torch.Tensor:
        """(d_out,) fp32: each output row's token-Fisher trace
        sum_t d_ti^2 ||x_t||^2 over its mean across rows. The row-shared token
        Fisher averages the rows; row i's own is about s_i times that average."""
        return self._token_statistics_of(name).row_sensitivities(name)

    def input_sums(self, name: str) -> list[torch.Tensor]:
        """Per-position sums of the input of layer ``name``, one (T_i,) fp32
        tensor per sample in order: a fingerprint that finds a sample again in
        a later pass over the same data in another order."""
        if not self.keep_token_weights:
            raise RuntimeError("collector was built with token_weights=False")
        return self._token_statistics.input_sums[name]

    def pop_row_factors(self, name: str) -> torch.Tensor:
        """Per-row Fisher factors U of layer ``name``: (d_out, d_in, k) fp32 on
        the CPU, F_j = U_j U_j^T (:class:`~moonshot_plugins.core.row_fisher.RowFisherBuilder`);
        the collector lets go of them. Raises
        :class:`~moonshot_plugins.core.finite.NonFiniteError` on a NaN or inf."""
        if not self.row_factors:
            raise RuntimeError("collector was built with row_factors=False")
        self._num(name)
        factors = self._row_builders.pop(name).factors()
        found = describe_non_finite(factors)
        if found is not None:
            raise NonFiniteError(
                f"the per-row Fisher factors of layer {name!r} hold {found}: its inputs or "
                "output gradients were not finite in the gradient pass. Nothing was changed"
            )
        return factors

    def pop(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return (matrix, diagonal) for ``name`` and free the accumulators."""
        matrix = self.fisher(name) if self.matrix else None
        diagonal = self.diagonal_fisher(name) if self.diagonal else None
        self._matrix_acc.pop(name, None)
        self._diag_acc.pop(name, None)
        return matrix, diagonal

