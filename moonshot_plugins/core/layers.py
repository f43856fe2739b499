"""Layers whose Fisher is collected, seen in one orientation.

Weights are always in the standardised orientation (d_out x d_in): Conv2d is
flattened over (C_in, kh, kw) and transformers' Conv1D is transposed, as the
LLM Compressor hosts do. Inputs and output gradients are reshaped to
per-sample rows of the same columns, (B, T, d_in) and (B, T, d_out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # transformers is optional for the core; Conv1D only exists there
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

__all__ = [
    "Conv1D",
    "is_norm_layer",
    "has_affine_weight",
    "is_depthwise_conv",
    "conv_groups",
    "out_features",
    "in_features",
    "check_supported_layer",
    "check_collectable_layer",
    "layer_inputs",
    "layer_output_grads",
    "standardized_weight",
    "restore_weight",
    "module_bytes",
]


def is_norm_layer(module: nn.Module) -> bool:
    """BatchNorm (any dimension, timm's BatchNormAct2d included) or LayerNorm."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm))


def has_affine_weight(module: nn.Module) -> bool:
    """Whether a norm layer has a learnt per-channel scale gamma."""
    affine = getattr(module, "affine", getattr(module, "elementwise_affine", False))
    return bool(affine) and module.weight is not None


def is_depthwise_conv(module: nn.Module) -> bool:
    """Conv2d with one group per channel and as many outputs as inputs."""
    return (
        isinstance(module, nn.Conv2d)
        and module.groups > 1
        and module.groups == module.in_channels
        and module.groups == module.out_channels
    )


def conv_groups(module: nn.Module) -> int:
    """Number of convolution groups (1 for every non-Conv2d layer)."""
    return module.groups if isinstance(module, nn.Conv2d) else 1


def out_features(module: nn.Module) -> int:
    """d_out of the standardised weight."""
    if isinstance(module, Conv1D):
        return module.weight.shape[1]
    return module.weight.shape[0]


def in_features(module: nn.Module) -> int:
    """d_in of the standardised weight (C_in * kh * kw for Conv2d)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0]
    return module.weight[0].numel()


def check_supported_layer(
    module: nn.Module, grouped_convs: bool = False, norm_layers: bool = False
) -> None:
    """Raise unless the Fisher of ``module``'s weight can be collected.

    :param grouped_convs: accept Conv2d with groups > 1
    :param norm_layers: accept BatchNorm/LayerNorm with an affine weight
    """
    if norm_layers and is_norm_layer(module):
        if not has_affine_weight(module):
            raise ValueError(
                f"{type(module).__name__} has no affine weight, so it has no Fisher"
            )
        return
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 and not grouped_convs:
            raise ValueError(
                f"Fisher collection supports Conv2d with groups=1 only, got groups="
                f"{module.groups}; depthwise layers have no shared d_in x d_in Hessian"
            )
    elif not isinstance(module, (nn.Linear, Conv1D)):
        raise TypeError(
            f"Fisher collection supports nn.Linear, transformers Conv1D and "
            f"nn.Conv2d, got {type(module).__name__}"
        )


def check_collectable_layer(
    name: str,
    module: nn.Module,
    matrix: bool,
    grouped_convs: bool,
    norm_layers: bool,
    token_weights: bool,
) -> None:
    """Raise unless ``module`` supports the statistics a
    :class:`~moonshot_plugins.core.collector.FisherCollector` keeps:
    ``matrix`` (a shared d_in x d_in Fisher or per-row factors) needs an
    ungrouped layer that is not a norm, ``token_weights`` a Linear or Conv1D."""
    check_supported_layer(module, grouped_convs=grouped_convs, norm_layers=norm_layers)
    if matrix and (is_norm_layer(module) or conv_groups(module) != 1):
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) has no shared d_in x d_in "
            "Fisher or per-row factors; pass matrix=False and row_factors=False "
            "(diagonal=True and/or input_moments=True)"
        )
    if token_weights and not isinstance(module, (nn.Linear, Conv1D)):
        raise ValueError(
            f"token_weights supports nn.Linear and transformers Conv1D, got "
            f"{type(module).__name__} for layer {name!r}: a convolution's "
            "unfolded columns mix positions, so its inputs cannot be reweighted"
        )


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input as per-sample rows: (B, T, d_in).

    Linear/Conv1D: any (..., d_in) input; 2-D inputs count as one sample.
    Conv2d: (B, C_in, H, W) unfolded to (B, H'*W', C_in*kh*kw), the columns of
    the flattened weight.
    """
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(
            x,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )
        return cols.transpose(1, 2)
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def layer_output_grads(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the layer output as per-sample rows: (B, T, d_out)."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    if g.dim() == 2:
        return g.unsqueeze(0)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def standardized_weight(module: nn.Module) -> torch.Tensor:
    """A copy of the layer weight as (d_out, d_in), the orientation of the Fisher."""
    weight = module.weight.detach().clone()
    if isinstance(module, nn.Conv2d):
        return weight.flatten(1)
    if isinstance(module, Conv1D):
        return weight.T.contiguous()
    return weight


def restore_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`standardized_weight`: the layer's own shape and dtype."""
    if isinstance(module, Conv1D):
        weight = weight.T
    return weight.reshape(module.weight.shape).to(module.weight.dtype)


def module_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, its submodules' included."""
    return sum(t.nbytes for t in [*module.parameters(), *module.buffers()])
