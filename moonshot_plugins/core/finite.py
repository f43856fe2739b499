"""NaN/inf checks that stop a run before any weight changes.

One NaN weight spreads through the gradient pass into every layer's Fisher
and from there into every mask, without an error anywhere. These checks look
where a non-finite value can enter (the weights, each sample's loss, each
layer's statistics) and raise :class:`NonFiniteError` naming the first
weight, sample or layer that holds one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["NonFiniteError", "check_finite_parameters", "describe_non_finite"]


class NonFiniteError(ValueError):
    """A NaN or inf where MOONSHOT needs finite numbers; raised before any weight changed."""


def describe_non_finite(tensor: torch.Tensor) -> str | None:
    """``"2 NaN and 1 inf values"`` when ``tensor`` holds non-finite values, else None."""
    if not (tensor.dtype.is_floating_point or tensor.dtype.is_complex):
        return None  # integer tensors are always finite
    if tensor.element_size() == 1:
        tensor = tensor.float()  # fp8: isnan is not implemented for it on every build
    if bool(torch.isfinite(tensor).all()):
        return None
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    return f"{nan} NaN and {inf} inf values"


def check_finite_parameters(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise :class:`NonFiniteError` naming the first parameter with a NaN or inf.

    :param named_parameters: e.g. ``model.named_parameters()``; parameters on
        the meta device (offloaded elsewhere) are skipped
    """
    for name, parameter in named_parameters:
        if parameter.device.type == "meta":
            continue
        found = describe_non_finite(parameter.detach())
        if found is not None:
            raise NonFiniteError(
                f"model weight {name} holds {found}; every weight must be finite "
                "(a NaN spreads into every layer's statistics and masks). Nothing was changed"
            )

