"""Which layers of a vision model are pruned, and in which blocks.

SparseGPT's solver prunes one (d_out, d_in) weight against the row-shared
Hessian of its input, so a layer is supported when its forward is the plain
``x W^T + b`` or ``conv2d(x, W)`` of its own padding: nn.Linear (timm's
``Linear`` subclass only casts dtypes) and nn.Conv2d with groups = 1. Grouped
and depthwise convolutions (groups > 1) are left dense, with the reason
recorded: each group (each channel, for a depthwise 3 x 3: 9 weights) has its
own Hessian, so a per-layer unstructured mask cannot be chosen by the host's
one row-shared solve, and N:M groups of 4 do not tile 9 weights. They hold
about 1-3% of an EfficientNet's weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from compressed_tensors.utils import match_named_modules
from torch import nn

__all__ = ["DEFAULT_TARGETS", "select_layers", "pruning_blocks"]

DEFAULT_TARGETS: tuple[str, ...] = ("Linear", "Conv2d")


def select_layers(
    model: nn.Module, targets: Sequence[str], ignore: Sequence[str]
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers to prune, and those left dense with the reason why.

    :param targets: class names (subclasses match too), layer names or
        ``re:`` regexes of layers (LLM Compressor's convention)
    :param ignore: the same forms; matches are never pruned
    :return: (name -> layer to prune, in ``named_modules`` order;
        name -> reason, for grouped convolutions)
    :raises TypeError: naming the first matched module that is not a supported layer
    """
    layers, skipped = {}, {}
    for name, module in match_named_modules(model, list(targets), list(ignore)):
        _check_supported(name, module)
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            skipped[name] = (
                f"grouped convolution (groups={module.groups}): each group has its own "
                "Hessian, so the host's row-shared solver cannot prune it; left dense"
            )
            continue
        layers[name] = module
    return layers, skipped


def _check_supported(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        if type(module).forward is not nn.Conv2d.forward:
            raise TypeError(
                f"layer {name!r} ({type(module).__name__}) is a Conv2d with its own forward "
                "(e.g. timm's Conv2dSame pads, StdConv2d standardises the weight), so the "
                "Hessian of its input does not describe its output; add it to ignore"
            )
        return
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"layer {name!r} ({type(module).__name__}) cannot be pruned: supported layers are "
            "nn.Linear and nn.Conv2d; narrow targets or add it to ignore"
        )


def pruning_blocks(
    model: nn.Module, layers: dict[str, nn.Module], example_inputs: torch.Tensor
) -> list[list[str]]:
    """The layers grouped into blocks, in the order the forward pass reaches them.

    A layer's block is its deepest ancestor that is an element of an
    nn.Sequential or nn.ModuleList (a ResNet ``layer1.0``, a ViT ``blocks.3``,
    an EfficientNet ``blocks.2.1``); a layer with no such ancestor (a stem, a
    head) is a block of its own. Blocks are then calibrated and pruned one at
    a time, each on the outputs of the blocks already pruned.

    :param example_inputs: one batch the model accepts, (B, C, H, W); one
        forward pass over it (no grad) finds the order
    :raises ValueError: naming a layer the forward pass never calls
    """
    order: list[str] = []
    handles = [
        module.register_forward_hook(lambda *_, name=name: order.append(name))
        for name, module in layers.items()
    ]
    try:
        with torch.no_grad():
            model(example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in order]
    if missing:
        raise ValueError(
            f"layer {missing[0]!r} is never called by the model's forward pass, so it has no "
            "calibration input; add it to ignore"
        )
    containers = {
        f"{parent}.{child}" if parent else child
        for parent, module in model.named_modules()
        if isinstance(module, (nn.Sequential, nn.ModuleList))
        for child, _ in module.named_children()
    }
    blocks: dict[str, list[str]] = {}
    for name in dict.fromkeys(order):  # first calls, in order
        blocks.setdefault(_block_of(name, containers), []).append(name)
    return list(blocks.values())


def _block_of(name: str, container_elements: set[str]) -> str:
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        ancestor = ".".join(parts[:depth])
        if ancestor in container_elements:
            return ancestor
    return name
