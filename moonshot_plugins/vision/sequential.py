"""Sequential SparseGPT over blocks, with LLM Compressor 0.14's own solver.

For each block: run the calibration inputs through the model (whose earlier
blocks are already pruned), accumulate every layer's Hessian H = (2/n) X^T X
with the host's ``accumulate_hessian``, combine it with the layer's Fisher
(:func:`moonshot_plugins.core.combine_hessians`), prune with the host's
``sparsify_weight``, then apply ``weight_update``. The host allocates a
Conv2d's Hessian as C_in x C_in (``make_empty_hessian`` reads
``weight.shape[1]``), which only fits 1 x 1 kernels; here it is
(C_in kh kw) x (C_in kh kw), the columns its own unfolding produces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import (
    SGPT_PRECISION,
    accumulate_hessian,
    sparsify_weight,
)
from loguru import logger
from torch import nn

from moonshot_plugins.core import (
    NonFiniteError,
    combine_hessians,
    describe_non_finite,
    in_features,
    restore_weight,
    standardized_weight,
)
from moonshot_plugins.llmcompressor.weight_update import LayerSnapshot, updated_weight

__all__ = ["SolverSettings", "block_hessians", "prune_layer"]


@dataclass(frozen=True)
class SolverSettings:
    """The host solver's settings, checked by the caller.

    :param sparsity: fraction of weights pruned, in (0, 1) (N/M under N:M)
    :param prune_n: N of "N:M" (0: unstructured)
    :param prune_m: M of "N:M" (0: unstructured)
    :param block_size: SparseGPT's column block
    :param dampening_frac: damping, a fraction of the Hessian's mean diagonal
    :param weight_update: "host", "resolve" or "admm"
    """

    sparsity: float
    prune_n: int
    prune_m: int
    block_size: int
    dampening_frac: float
    weight_update: str


@torch.no_grad()
def block_hessians(
    model: nn.Module, inputs: list[torch.Tensor], layers: dict[str, nn.Module]
) -> dict[str, torch.Tensor]:
    """Each layer's reconstruction Hessian (2/n) X^T X over ``inputs``: (d_in, d_in) fp32.

    :param inputs: the calibration batches, (B, C, H, W) each, on the model's device
    :param layers: name -> layer of one block (n counts images)
    """
    hessians = {
        name: torch.zeros(in_features(m), in_features(m), dtype=SGPT_PRECISION, device=m.weight.device)
        for name, m in layers.items()
    }
    counts = dict.fromkeys(layers, 0)

    def hook(name: str):
        def accumulate(module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
            hessians[name], counts[name] = accumulate_hessian(
                args[0], module, hessians[name], counts[name]
            )

        return accumulate

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    try:
        for batch in inputs:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    for name, hessian in hessians.items():
        found = describe_non_finite(hessian)
        if found is not None:
            raise NonFiniteError(
                f"the Hessian of layer {name!r} holds {found}: its calibration inputs were "
                "not finite"
            )
    return hessians


@torch.no_grad()
def prune_layer(
    name: str,
    module: nn.Module,
    hessian: torch.Tensor,
    fisher: torch.Tensor | None,
    taylor_weight: float,
    settings: SolverSettings,
) -> None:
    """Prune ``module``'s weight in place with the host's solver on the MOONSHOT Hessian.

    :param hessian: the layer's (2/n) X^T X, (d_in, d_in) fp32 (consumed)
    :param fisher: the layer's row-averaged Fisher, (d_in, d_in); None when lam = 0
    :param taylor_weight: lam in [0, 1]; at 0 the host's Hessian is used as is
    """
    if fisher is not None:
        try:
            hessian = combine_hessians(hessian, fisher, taylor_weight)
        except ValueError as error:
            raise ValueError(f"layer {name}: {error}") from error
    snapshot = None
    if settings.weight_update != "host":
        # the host's solver modifies the Hessian in place
        snapshot = LayerSnapshot(
            standardized_weight(module).float(), hessian.clone(), settings.sparsity
        )
    _, weight = sparsify_weight(
        module=module,
        hessians_dict={module: hessian},
        sparsity=settings.sparsity,
        prune_n=settings.prune_n,
        prune_m=settings.prune_m,
        block_size=settings.block_size,
        dampening_frac=settings.dampening_frac,
        preserve_sparsity_mask=False,
    )
    module.weight.copy_(weight)
    if snapshot is None:
        return
    host = standardized_weight(module)
    new, before, after = updated_weight(
        settings.weight_update, snapshot, host.float(), settings.dampening_frac,
        settings.prune_n, settings.prune_m,
    )
    module.weight.copy_(restore_weight(module, new.to(host.dtype)))
    logger.info(
        f"MOONSHOT weight_update={settings.weight_update} {name}: objective "
        f"{before:.4g} -> {after:.4g}"
    )
