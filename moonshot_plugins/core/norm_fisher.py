"""Diagonal Fisher of a norm layer's affine weight gamma.

For BatchNorm (any dimension) and LayerNorm, ``y = gamma * xhat + beta`` with
xhat the normalised input, so the per-sample gradient of gamma is
g_i = sum_t d_{i,t} * xhat_{i,t} (C,), with d the gradient w.r.t. y. timm's
BatchNormAct2d applies an activation after the affine map inside the same
module; the gradient is moved back through it first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["normalized_input", "norm_weight_fisher_update"]


def normalized_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """xhat of a norm layer (its output before gamma/beta) as rows (B, T, C)."""
    if isinstance(module, nn.LayerNorm):
        xhat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        channels = module.weight.numel()
        return xhat.reshape(x.shape[0], -1, channels)
    use_batch = module.training or module.running_mean is None
    xhat = F.batch_norm(
        x, module.running_mean, module.running_var, None, None,
        training=use_batch, momentum=0.0, eps=module.eps,
    )
    return _norm_rows(module, xhat)


def norm_weight_fisher_update(
    module: nn.Module,
    xhat: torch.Tensor,
    g: torch.Tensor,
    fisher_mode: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """One batch's sum of the diagonal Fisher of gamma: (C,) in ``dtype``.

    "token": sum_{i,t} d_{i,t}**2 * xhat_{i,t}**2; "sample": sum_i g_i**2.

    :param xhat: normalised input rows (B, T, C), from :func:`normalized_input`
    :param g: gradient w.r.t. the module's output, in the module's layout
    :param dtype: precision of the products and sums
    """
    g = _gradient_before_activation(module, xhat, g)
    d = _norm_rows(module, g).to(dtype)
    xhat = xhat.to(dtype)
    if fisher_mode == "token":
        return (d.square() * xhat.square()).sum(dim=(0, 1))
    return (d * xhat).sum(dim=1).square().sum(dim=0)


def _gradient_before_activation(
    module: nn.Module, xhat: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    """Gradient w.r.t. the affine output z = gamma * xhat + beta.

    Without a fused activation z is the module's output and ``g`` is returned
    as is. timm's BatchNormAct2d: the hook saw act(z); the gradient is moved
    back through the activation to z.
    """
    act = _fused_activation(module)
    if act is None:
        return g
    with torch.enable_grad():
        z = _rows_to_layout(module, xhat, g) * _channel_shaped(module.weight.detach(), g) + (
            _channel_shaped(module.bias.detach(), g) if module.bias is not None else 0.0
        )
        z = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(act(z * 1.0), z, g)
    return g


def _fused_activation(module: nn.Module) -> Callable | None:
    """The activation timm fuses into BatchNormAct2d (with its drop), else None."""
    act = getattr(module, "act", None)
    if act is None or isinstance(act, nn.Identity):
        return None
    drop = getattr(module, "drop", None)
    return (lambda z: act(drop(z))) if drop is not None else act


def _norm_rows(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) for BatchNorm or (B, ..., C) for LayerNorm -> (B, T, C)."""
    if isinstance(module, nn.LayerNorm):
        return t.reshape(t.shape[0], -1, module.weight.numel())
    if t.dim() == 2:
        return t.unsqueeze(1)
    return t.flatten(2).transpose(1, 2)


def _rows_to_layout(module: nn.Module, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_norm_rows` into the shape of ``like``."""
    if isinstance(module, nn.LayerNorm) or like.dim() == 2:
        return rows.reshape(like.shape)
    return rows.transpose(1, 2).reshape(like.shape)


def _channel_shaped(param: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-channel ``param`` broadcastable against a BatchNorm tensor ``like``."""
    return param.reshape(1, -1, *([1] * (like.dim() - 2)))
