"""The MOONSHOT gradient pass as the modifiers run it, and what it leaves per layer.

One pass on the dense model, before the host's sequential calibration, fills a
:class:`LayerTaylorStatistics` for every layer the host will prune; the host's
own hooks then read that record when they calibrate and compress the layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import psutil
import torch
from compressed_tensors.offload import disable_offloading, disable_onloading
from compressed_tensors.offload.cache import OffloadCache
from compressed_tensors.utils import patch_attr
from loguru import logger

from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.utils.dev import get_main_device

from moonshot_plugins.core import (
    AUTO,
    FisherCollector,
    auto_taylor_weight,
    module_bytes,
    resolve_gradient_dtype,
)
from moonshot_plugins.core.blockwise_pass import (
    BlockCall,
    Onload,
    blocks_bypassed,
    evaluation_mode,
    first_block_call,
    group_budget,
    run_blockwise_gradient_pass,
)
from moonshot_plugins.llmcompressor.causal_lm import CausalLMLosses

__all__ = [
    "LayerTaylorStatistics",
    "collect_layer_statistics",
    "model_ends",
    "onloaded",
    "run_gradient_pass_by_blocks",
    "sampled_fraction",
]


@dataclass
class LayerTaylorStatistics:
    """What the gradient pass measured for one layer.

    :param taylor_weight: the layer's lam in [0, 1] (the fixed ``taylor_weight``,
        or the ``auto`` rule's value for this layer)
    :param fisher: "matrix" statistic: the row-averaged Fisher, (d_in, d_in),
        fp32; "diagonal": the per-weight Fisher, (d_out, d_in), in the pass's
        ``diagonal_dtype``; on the CPU when ``offload_fisher``; None for "token_weights"
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

    def reached_by_gradient(self) -> bool:
        """Whether the layer's Fisher is not zero: some calibration position
        sent it a gradient."""
        if self.token_energies is not None:
            return self.token_energies[1] > 0
        return self.fisher is None or bool(self.fisher.abs().sum() > 0)


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
    blocks: list[torch.nn.Module],
    desc: str,
    row_factors: bool = False,
    row_factor_rank: int | None = None,
    diagonal_dtype: torch.dtype = torch.float32,
) -> tuple[dict[torch.nn.Module, LayerTaylorStatistics], int]:
    """Run the gradient pass over ``dataloader``: one record per layer of ``modules``.

    :param statistic: what the host consumes: "token_weights" (per-position
        Fisher weights, folded into the host's own input accumulation),
        "matrix" (d_in x d_in) or "diagonal" (d_out x d_in)
    :param taylor_weight: lam in [0, 1], or "auto" (a lam per layer from its
        per-position Fisher weights, collected for that in any statistic)
    :param gradient_dtype: "auto", "bfloat16" or "float32", resolved on the
        pass's device (:func:`moonshot_plugins.core.resolve_gradient_dtype`)
    :param blocks: the decoder layers (the host's sequential targets), in
        order: the pass holds one of them on the execution device at a time
    :param row_factors: also each layer's per-row Fisher factors, of rank at
        most ``row_factor_rank`` (None: exact) (:class:`~moonshot_plugins.core.FisherCollector`)
    :param diagonal_dtype: the dtype each layer's diagonal Fisher is kept in
        from the end of its block's backward until the host prunes it
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
        diagonal_dtype=diagonal_dtype,
    )
    used = run_gradient_pass_by_blocks(
        model,
        dataloader,
        collector,
        blocks,
        gradient_dtype=gradient_dtype,
        max_samples=fisher_samples,
        desc=desc,
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


def run_gradient_pass_by_blocks(
    model: torch.nn.Module,
    dataloader: Iterable,
    collector: FisherCollector,
    blocks: Sequence[torch.nn.Module],
    *,
    gradient_dtype: str = "float32",
    max_samples: int | None = None,
    desc: str = "MOONSHOT gradient pass",
    onload: Onload | None = None,
    group_bytes: int | None = None,
) -> int:
    """:func:`~moonshot_plugins.core.run_blockwise_gradient_pass` on a causal
    LM with the host's hooks silent: one of ``blocks`` (the decoder layers, the
    host's sequential targets) on the host's execution device at a time, as
    the host's sequential pipeline holds them.

    Works on a model wholly on one device and on one offloaded by
    compressed-tensors (``load_offloaded_model``, or ``oneshot``'s conversion
    of an accelerate ``device_map``): the model's placement is unchanged after.

    :param onload: the context that puts one module on the execution device;
        default :func:`onloaded` (a wrapper can count what it onloads)
    :param group_bytes: CPU bytes of boundary activations a group of batches
        may hold (see ``run_blockwise_gradient_pass``); default: when blocks
        travel to the execution device, :func:`group_budget` of the model's
        bytes and the free RAM, else 0 (one batch per group)
    :return: the number of samples used
    """
    if not blocks:
        raise ValueError(
            "the model has no sequential targets (its decoder layers): pass "
            "sequential_targets to oneshot for MOONSHOT's gradient pass"
        )
    device = get_main_device()
    autocast_dtype = resolve_gradient_dtype(gradient_dtype, device)
    logger.info(f"MOONSHOT gradient pass on {device} in {autocast_dtype or torch.float32}, by block")
    head = getattr(model, "get_output_embeddings", lambda: None)()
    losses = CausalLMLosses(split_head=head is None or head not in collector.modules.values())

    def first_call(batch: dict[str, Any]) -> BlockCall:
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask") if k in batch}
        return first_block_call(lambda: model(**inputs, use_cache=False), blocks[0])

    def sample_losses(batch: dict[str, Any], output: Any) -> torch.Tensor:
        with blocks_bypassed(blocks, output):
            return losses(model, batch)

    with HooksMixin.disable_hooks(), evaluation_mode([model]):
        return run_blockwise_gradient_pass(
            blocks,
            model_ends(model, blocks),
            dataloader,
            collector,
            first_call,
            sample_losses,
            onload or partial(onloaded, device=device),
            device,
            max_samples=max_samples,
            desc=desc,
            autocast_dtype=autocast_dtype,
            group_bytes=_group_bytes(model, device) if group_bytes is None else group_bytes,
        )


def model_ends(model: torch.nn.Module, blocks: Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    """The largest submodules of ``model`` that hold no block (embeddings,
    rotary embedding, final norm, head), in module order."""
    holding = {id(m) for block in blocks for m in _ancestors(model, block)}
    in_blocks = {id(block) for block in blocks}
    ends = []
    stack = [model]
    while stack:
        module = stack.pop()
        for child in reversed(list(module.children())):
            if id(child) in holding:
                stack.append(child)
            elif id(child) not in in_blocks:
                ends.append(child)
    return sorted(ends, key=list(model.modules()).index)


def _ancestors(model: torch.nn.Module, block: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules on the path from ``model`` down to ``block``, both excluded."""
    for name, module in model.named_modules():
        if module is block:
            parts = name.split(".")[:-1]
            return [model.get_submodule(".".join(parts[: i + 1])) for i in range(len(parts))]
    raise ValueError(f"{type(block).__name__} is not a submodule of the model")


@contextmanager
def onloaded(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """``module`` on ``device`` while inside. A submodule offloaded by
    compressed-tensors onloads each tensor on first access and keeps it until
    exit (its ``disable_offloading``, as the host's sequential pipeline runs a
    layer); any other submodule's tensors are moved to ``device`` and back."""
    with ExitStack() as stack:
        for submodule in module.modules():
            if isinstance(submodule._parameters, OffloadCache):
                stack.enter_context(disable_offloading())
                stack.enter_context(patch_attr(submodule._parameters, "onload_device", device))
                stack.enter_context(patch_attr(submodule._buffers, "onload_device", device))
            else:
                stack.enter_context(_moved(submodule, device))
        yield


@contextmanager
def _moved(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """``module``'s own parameters and buffers on ``device`` while inside (the
    parameter objects stay the same, as ``Module.to`` keeps them)."""
    moved = []
    for store in (module._parameters, module._buffers):
        for name, tensor in store.items():
            if tensor is not None and tensor.device != device:
                moved.append((store, name, tensor.device))
                _move(store, name, device)
    try:
        yield
    finally:
        for store, name, home in moved:
            _move(store, name, home)


def _move(store: dict, name: str, device: torch.device) -> None:
    tensor = store[name]
    if isinstance(tensor, torch.nn.Parameter):
        tensor.data = tensor.data.to(device)
    else:
        store[name] = tensor.to(device)


def _group_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """CPU bytes of boundary activations per group of batches: the
    :func:`group_budget` of the model's bytes and the free RAM when blocks
    travel to ``device``, else 0 (one batch)."""
    with disable_onloading():  # where the tensors live, without onloading them
        home = next(model.parameters()).device
        if home == device:
            return 0
        model_bytes = module_bytes(model)
    return group_budget(model_bytes, psutil.virtual_memory().available)


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
