"""``moonshot_prune``: unstructured or N:M MOONSHOT-SparseGPT of a vision model in one call."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from loguru import logger
from torch import nn

from moonshot_plugins.core import (
    AUTO,
    FisherCollector,
    check_finite_parameters,
    classification_sample_losses,
    predicted_label_sample_losses,
    run_gradient_pass,
    validate_fisher_mode,
    validate_taylor_weight,
)
from moonshot_plugins.core.mask_structure import parse_mask_structure
from moonshot_plugins.llmcompressor.host_fields import (
    check_layer_widths,
    checked_sparsity,
    validate_block_size,
    validate_dampening_frac,
    validate_ignore,
    validate_mask_structure,
    validate_sparsity,
    validate_targets,
)
from moonshot_plugins.llmcompressor.weight_update import validate_weight_update
from moonshot_plugins.vision.layers import DEFAULT_TARGETS, pruning_blocks, select_layers
from moonshot_plugins.vision.sequential import SolverSettings, block_hessians, prune_layer

__all__ = ["CALIBRATION_LOSSES", "DEFAULT_VISION_TAYLOR_WEIGHT", "VisionPruneResult", "moonshot_prune"]

SampleLosses = Callable[[nn.Module, Any], torch.Tensor]

# per-sample losses of the gradient pass, by name
CALIBRATION_LOSSES: dict[str, SampleLosses] = {
    "labels": classification_sample_losses,  # cross-entropy on (inputs, labels) batches
    "predicted": predicted_label_sample_losses,  # cross-entropy on the model's own argmax
}
# chosen on validation images by the rule in docs/experiments.md (2026-12-02): the lowest sum of
# ranks over ResNet-18 and ViT at 70% and EfficientNet-Lite0 at 50%, of 0.1, 0.25, 0.5, 0.75, 0.9
DEFAULT_VISION_TAYLOR_WEIGHT = 0.25


@dataclass
class VisionPruneResult:
    """What :func:`moonshot_prune` did.

    :param sparsity: per pruned layer, the fraction of its weights now zero
    :param skipped: per layer left dense (grouped convolutions), the reason
    :param blocks: the layer names of each block, in the order they were pruned
    """

    sparsity: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    blocks: list[list[str]] = field(default_factory=list)


def moonshot_prune(
    model: nn.Module,
    calib_loader: Iterable[Any],
    sparsity: float | None = None,
    *,
    mask_structure: str = "0:0",
    taylor_weight: float = DEFAULT_VISION_TAYLOR_WEIGHT,
    fisher_mode: str = "token",
    loss: str | SampleLosses = "labels",
    weight_update: str = "host",
    targets: str | Sequence[str] = DEFAULT_TARGETS,
    ignore: str | Sequence[str] = (),
    block_size: int = 128,
    dampening_frac: float = 0.01,
) -> VisionPruneResult:
    """Prune ``model`` in place with SparseGPT on the MOONSHOT objective.

    Every nn.Linear and nn.Conv2d (groups = 1) is pruned to ``sparsity``; per
    layer the objective is (1 - lam) recon + lam taylor, scale-normalised,
    exactly as in ``MoonshotSparseGPTModifier``: the host's Hessian
    H = (2/n) X^T X becomes (1 - lam) H + lam (s_H / s_F) F
    (:func:`moonshot_plugins.core.combine_hessians`, s = mean diagonal), with
    F the row-averaged empirical Fisher (d_in, d_in) of one gradient pass on the
    dense model, and LLM Compressor 0.14's SparseGPT solver runs on it. For a
    Conv2d, d_in = C_in * kh * kw (the unfolded columns; each output position is
    one position of the token Fisher). ``taylor_weight=0`` is SparseGPT exactly
    (no gradient pass runs).

    Layers are pruned block by block (:func:`~moonshot_plugins.vision.layers.pruning_blocks`):
    each block's Hessians come from the calibration images run through the
    model whose earlier blocks are already pruned, as LLM Compressor's
    sequential pipeline does. Cost: one forward and one activation-only
    backward per image (lam > 0), one forward per image and block, one
    Cholesky and one column sweep per layer.

    BatchNorm and LayerNorm are not pruned; the model runs in eval mode
    throughout, so BatchNorm's running statistics are unchanged. They then
    describe the dense model's activations, not the pruned one's: at high
    sparsity re-estimate them on training images before evaluating
    (:func:`~moonshot_plugins.vision.batchnorm.recalibrate_batchnorm`).
    Grouped and depthwise convolutions (groups > 1) are left dense and listed
    in the result's ``skipped`` with the reason (logged too).

    :param model: a classifier taking (B, C, H, W) images and returning
        (B, classes) logits, e.g. a timm model; any device, fp32 or bf16
    :param calib_loader: re-iterable or not (it is read once and kept): batches
        of ``(images, labels)`` (images (B, C, H, W), labels (B,) class indices)
        or, with ``loss="predicted"`` or your own loss, bare image tensors
    :param sparsity: fraction of each pruned layer's weights set to zero, in
        (0, 1); required for unstructured, N/M (or left out) under "N:M"
    :param mask_structure: "0:0" (unstructured) or "N:M" with 0 < N < M (N of
        every M consecutive input weights; every pruned layer's d_in must be a
        multiple of M, so an RGB stem (d_in = 3 kh kw) must be in ``ignore``)
    :param taylor_weight: lam in [0, 1] (0: SparseGPT exactly, 1: Taylor only);
        "auto" is not available here (its rule reads per-position input
        weights, which a convolution's overlapping columns do not have)
    :param fisher_mode: "token" (F = mean over positions of ||d||^2 x x^T /
        d_out) or "sample" (F = mean over images of G^T G / d_out)
    :param loss: the gradient pass's per-sample loss: "labels" (cross-entropy
        on the batch's labels), "predicted" (cross-entropy on the model's own
        argmax, label-free) or a callable (model, batch) -> (B,) losses
    :param weight_update: "host" (SparseGPT's sweep), "resolve" (its mask, the
        kept weights re-solved exactly) or "admm" (mask and weights searched by
        ADMM; unstructured masks become per-row)
    :param targets: class names (subclasses match), layer names or ``re:``
        regexes of the layers to prune; a match that is not a supported layer
        is an error naming it
    :param ignore: the same forms; never pruned (e.g. ``["fc"]`` for a head)
    :param block_size: SparseGPT's column block (a multiple of M under N:M)
    :param dampening_frac: SparseGPT's damping, fraction of the mean diagonal
    :return: per-layer sparsity, skipped layers and the blocks
    :raises ValueError, TypeError: on a bad argument, an unsupported layer or
        empty calibration data, naming the field or layer, before any weight
        changes. If anything fails mid-run, every weight is restored before the
        error propagates; ``.grad`` is never touched.
    """
    settings, lam = _checked_settings(
        sparsity, mask_structure, taylor_weight, weight_update, block_size, dampening_frac
    )
    fisher_mode = validate_fisher_mode(fisher_mode)
    sample_losses = _checked_loss(loss)
    targets = validate_targets(targets if isinstance(targets, str) else list(targets))
    ignore = validate_ignore([ignore] if isinstance(ignore, str) else list(ignore))
    layers, skipped = select_layers(model, targets, ignore)
    if not layers:
        raise ValueError(
            f"targets {targets!r} with ignore {ignore!r} select no layer to prune "
            "(nn.Linear or nn.Conv2d with groups=1); nothing was changed"
        )
    for name, reason in skipped.items():
        logger.info(f"MOONSHOT: {name} not pruned: {reason}")
    check_layer_widths(layers, mask_structure)
    check_finite_parameters(model.named_parameters())
    batches = _calibration_batches(calib_loader, next(model.parameters()).device, loss)
    dense = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    try:
        fishers = _fishers(model, batches, layers, fisher_mode, sample_losses) if lam > 0 else {}
        blocks = _prune_blocks(model, [_images(b) for b in batches], layers, fishers, lam, settings)
    except BaseException:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.weight.copy_(dense[name])
        raise
    sparsities = {
        name: float((layer.weight == 0).sum()) / layer.weight.numel() for name, layer in layers.items()
    }
    return VisionPruneResult(sparsity=sparsities, skipped=skipped, blocks=blocks)


def _checked_settings(
    sparsity: Any, mask_structure: Any, taylor_weight: Any, weight_update: Any,
    block_size: Any, dampening_frac: Any,
) -> tuple[SolverSettings, float]:
    """The solver settings and lam, or a ValueError naming the field."""
    if isinstance(sparsity, (list, tuple)):
        raise ValueError(f"sparsity must be one fraction in (0, 1), got {sparsity!r}")
    if taylor_weight == AUTO:
        raise ValueError(
            "taylor_weight='auto' is not available for vision models (its rule reads "
            "per-position input weights, which a convolution's overlapping columns do not "
            "have); give a number in [0, 1]"
        )
    mask_structure = validate_mask_structure(mask_structure)
    sparsity = checked_sparsity(validate_sparsity(sparsity), mask_structure)
    prune_n, prune_m = parse_mask_structure(mask_structure)
    block_size = validate_block_size(block_size)
    if prune_m and block_size % prune_m:
        raise ValueError(
            f"block_size {block_size} must be a multiple of M = {prune_m} under mask_structure "
            f"'{mask_structure}' (SparseGPT picks each group of M inside one column block)"
        )
    settings = SolverSettings(
        sparsity=sparsity,
        prune_n=prune_n,
        prune_m=prune_m,
        block_size=block_size,
        dampening_frac=validate_dampening_frac(dampening_frac),
        weight_update=validate_weight_update(weight_update),
    )
    return settings, float(validate_taylor_weight(taylor_weight))


def _checked_loss(loss: Any) -> SampleLosses:
    if callable(loss):
        return loss
    if isinstance(loss, str) and loss in CALIBRATION_LOSSES:
        return CALIBRATION_LOSSES[loss]
    raise ValueError(
        f"loss must be one of {list(CALIBRATION_LOSSES)} or a callable (model, batch) -> "
        f"per-sample losses (B,), got {loss!r}"
    )


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _calibration_batches(loader: Iterable[Any], device: torch.device, loss: Any) -> list[Any]:
    """Every batch of ``loader``, its tensors on ``device``; raises on no batch,
    or on bare image batches where ``loss="labels"`` needs labels."""
    batches = []
    for batch in loader:
        if isinstance(batch, (tuple, list)):
            batch = type(batch)(v.to(device) if isinstance(v, torch.Tensor) else v for v in batch)
        elif isinstance(batch, torch.Tensor):
            batch = batch.to(device)
        else:
            raise TypeError(
                "calib_loader must yield image tensors (B, C, H, W) or (images, labels) "
                f"tuples, got a {type(batch).__name__}"
            )
        if _images(batch).shape[0] > 0:
            batches.append(batch)
    if not batches:
        raise ValueError(
            "calib_loader is empty: it yields no image; moonshot_prune needs at least one "
            "calibration image. Nothing was changed"
        )
    if loss == "labels" and not isinstance(batches[0], (tuple, list)):
        raise ValueError(
            "loss='labels' needs (images, labels) batches, but calib_loader yields bare "
            "image tensors; pass loss='predicted' (the model's own predicted class) or a "
            "callable"
        )
    return batches


def _fishers(
    model: nn.Module, batches: list[Any], layers: dict[str, nn.Module], fisher_mode: str,
    sample_losses: SampleLosses,
) -> dict[str, torch.Tensor]:
    """One gradient pass on the dense model: each layer's (d_in, d_in) Fisher."""
    # a 2-D input of a vision model's Linear is (images, features): one sample per row
    collector = FisherCollector(layers, fisher_mode=fisher_mode, matrix=True, sample_rows=True)
    used = run_gradient_pass(model, batches, collector, sample_losses, desc="MOONSHOT gradient pass")
    collector.check_finite()
    logger.info(f"MOONSHOT: {fisher_mode} Fisher of {len(layers)} layers from {used} images")
    return {name: collector.pop(name)[0] for name in layers}


def _prune_blocks(
    model: nn.Module, images: list[torch.Tensor], layers: dict[str, nn.Module],
    fishers: dict[str, torch.Tensor], lam: float, settings: SolverSettings,
) -> list[list[str]]:
    """Calibrate and prune the blocks in forward order; returns the blocks."""
    was_training = model.training
    model.eval()  # BatchNorm's running statistics stay as they are
    try:
        blocks = pruning_blocks(model, layers, images[0])
        for block in blocks:
            hessians = block_hessians(model, images, {name: layers[name] for name in block})
            for name in block:
                prune_layer(
                    name, layers[name], hessians.pop(name), fishers.pop(name, None), lam, settings
                )
    finally:
        model.train(was_training)
    return blocks
