"""The MOONSHOT gradient pass as the modifiers run it, and what it leaves per layer.

One pass on the dense model, before the host's sequential calibration, fills a
:class:`LayerTaylorStatistics` for every layer the host will prune; the host's
own hooks then read that record when they calibrate and compress the layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from loguru import logger

from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.utils.dev import get_main_device

from moonshot_plugins.core import (
    AUTO,
    FisherCollector,
    auto_taylor_weight,
    resolve_gradient_dtype,
    run_gradient_pass,
)
from moonshot_plugins.llmcompressor.causal_lm import CausalLMLosses

__all__ = ["LayerTaylorStatistics", "collect_layer_statistics", "sampled_fraction"]


@dataclass
class LayerTaylorStatistics:
    """What the gradient pass measured for one layer.

    :param taylor_weight: the layer's lam in [0, 1] (the fixed ``taylor_weight``,
        or the ``auto`` rule's value for this layer)
    :param fisher: "matrix" statistic: the row-averaged Fisher, (d_in, d_in);
        "diagonal": the per-weight Fisher, (d_out, d_in); fp32, on the CPU when
        ``offload_fisher``; None for "token_weights"
    :param token_weights: "token_weights" only: per gradient-pass sample, in
        pass order, the per-position Fisher weights w_t = ||d_t||^2 / d_out, (T_i,)
    :param token_energies: "token_weights" only: (A, B), A = sum ||x_t||^2 and
        B = sum w_t ||x_t||^2 over every position the pass saw
    :param fingerprints: "token_weights" only: per gradient-pass sample, the
        per-position sums of the layer input, (T_i,), to find the sample again
        in the host's pass (:class:`~moonshot_plugins.llmcompressor.token_reweighting.SampleMatcher`)
    :param row_sensitivities: "token_weights" only: each output row's share of
        the token Fisher, (d_out,), mean 1
    :param row_factors: with ``row_factors`` only: the per-row Fisher factors U,
        (d_out, d_in, k), F_j = U_j U_j^T, fp32 on the CPU
        (:meth:`~moonshot_plugins.core.FisherCollector.pop_row_factors`)
    """

    taylor_weight: float
    fisher: torch.Tensor | None = None
    token_weights: list[torch.Tensor] | None = None
    token_energies: tuple[float, float] | None = None
    fingerprints: list[torch.Tensor] | None = None
    row_sensitivities: torch.Tensor | None = None
    row_factors: torch.Tensor | None = None


def collect_layer_statistics(
    model: torch.nn.Module,
    dataloader: Iterable,
    modules: dict[str, torch.nn.Module],
    *,
    statistic: str,
    taylor_weight: float | str,
    fisher_mode: str,
    fisher_samples: int | None,
    offload_fisher: bool,
    gradient_dtype: str,
    checkpoint_modules: list[torch.nn.Module],
    desc: str,
    row_factors: bool = False,
    row_factor_rank: int | None = None,
) -> tuple[dict[torch.nn.Module, LayerTaylorStatistics], int]:
    """Run the gradient pass over ``dataloader``: one record per layer of ``modules``.

    :param statistic: what the host consumes: "token_weights" (per-position
        Fisher weights, folded into the host's own input accumulation),
        "matrix" (d_in x d_in) or "diagonal" (d_out x d_in)
    :param taylor_weight: lam in [0, 1], or "auto" (a lam per layer from its
        per-position Fisher weights, collected for that in any statistic)
    :param gradient_dtype: "auto", "bfloat16" or "float32", resolved on the
        pass's device (:func:`moonshot_plugins.core.resolve_gradient_dtype`)
    :param checkpoint_modules: blocks run under activation checkpointing
    :param row_factors: also each layer's per-row Fisher factors, of rank at
        most ``row_factor_rank`` (None: exact) (:class:`~moonshot_plugins.core.FisherCollector`)
    :return: the records, keyed by layer; the number of samples the pass used
    """
    collector = FisherCollector(
        modules,
        fisher_mode=fisher_mode,
        matrix=statistic == "matrix",
        diagonal=statistic == "diagonal",
        # the auto rule reads per-position weights in either statistic
        token_weights=statistic == "token_weights" or taylor_weight == AUTO,
        offload=offload_fisher,
        row_factors=row_factors,
        row_factor_rank=row_factor_rank,
    )
    used = _run_on_main_device(
        model,
        dataloader,
        collector,
        max_samples=fisher_samples,
        desc=desc,
        gradient_dtype=gradient_dtype,
        # recomputing the decoder blocks' activations keeps the pass's peak
        # memory near the host's own
        checkpoint_modules=checkpoint_modules,
    )
    collector.check_finite()
    logger.info(
        f"MOONSHOT: {fisher_mode} Fisher of {len(modules)} layers from {used} calibration samples"
    )
    statistics = {
        module: _layer_statistics(collector, name, statistic, taylor_weight)
        for name, module in modules.items()
    }
    if row_factors:
        for name, module in modules.items():
            statistics[module].row_factors = collector.pop_row_factors(name)
    if taylor_weight == AUTO:
        lams = torch.tensor([record.taylor_weight for record in statistics.values()])
        logger.info(
            f"MOONSHOT taylor_weight=auto: per-layer lam min {lams.min():.3f}, "
            f"median {lams.median():.3f}, max {lams.max():.3f}"
        )
    return statistics, used


def _run_on_main_device(
    model: torch.nn.Module, dataloader: Iterable, collector: FisherCollector, gradient_dtype: str,
    **options,
) -> int:
    """:func:`run_gradient_pass` with the causal-LM losses and the host's hooks
    silent. The pass needs the whole model on one device: the accelerator the
    host will calibrate on when there is one; the model goes back after."""
    original_device = next(model.parameters()).device
    device = get_main_device()
    if device != original_device:
        model.to(device)
    autocast_dtype = resolve_gradient_dtype(gradient_dtype, device)
    logger.info(f"MOONSHOT gradient pass on {device} in {autocast_dtype or torch.float32}")
    head = getattr(model, "get_output_embeddings", lambda: None)()
    losses = CausalLMLosses(split_head=head is None or head not in collector.modules.values())
    try:
        with HooksMixin.disable_hooks():
            return run_gradient_pass(
                model, dataloader, collector, losses, autocast_dtype=autocast_dtype, **options
            )
    finally:
        if device != original_device:
            model.to(original_device)


def _layer_statistics(
    collector: FisherCollector, name: str, statistic: str, taylor_weight: float | str
) -> LayerTaylorStatistics:
    """Take layer ``name``'s statistics out of ``collector`` (its accumulators are freed)."""
    lam = (
        auto_taylor_weight(torch.cat(collector.token_weights(name)), *collector.token_energies(name))
        if taylor_weight == AUTO
        else taylor_weight
    )
    if statistic == "token_weights":
        return LayerTaylorStatistics(
            taylor_weight=lam,
            token_energies=collector.token_energies(name),
            token_weights=collector.token_weights(name),
            fingerprints=collector.input_sums(name),
            row_sensitivities=collector.row_sensitivities(name),
        )
    matrix, diagonal = collector.pop(name)
    # already on the CPU when offload_fisher: the collector offloads
    return LayerTaylorStatistics(
        taylor_weight=lam, fisher=matrix if statistic == "matrix" else diagonal
    )


def sampled_fraction(dataloader: Iterable, used: int) -> float:
    """Share of the calibration samples the gradient pass used, in (0, 1]
    (1 where the dataloader cannot tell how many samples it holds)."""
    try:
        total = len(dataloader.batch_sampler.sampler)
    except (AttributeError, TypeError):
        total = None
    return min(1.0, used / (total or used))
