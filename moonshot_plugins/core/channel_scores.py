"""Per-channel MOONSHOT scores for structured pruning.

For every channel a structured pruner may remove, MOONSHOT scores

    (1 - lam) * recon / scale(recon)  +  lam * taylor / scale(taylor)

* ``recon``: the reconstruction error that removing the channel alone causes
  in the outputs of a layer, from the layer's input second moment
  M = (1/N) sum_i X_i^T X_i:
  removed output channel k of a Linear/Conv: w_k^T M w_k;
  removed input channel j: sum_o w_oj^T M_jj w_oj (= ||W[:, j]||^2 M_jj for
  a Linear; for a Conv, M_jj is the kh*kw block of channel j);
  depthwise conv channel c: w_c^T M_c w_c. With ``recon_scale="layer"``
  each layer's errors are divided by the layer's output energy
  trace(W M W^T), i.e. they are the fraction of that layer's output removed,
  so layers of different scale weigh alike.
* ``taylor``: Optimal Brain Damage, sum of w^2 * F over the channel's weights
  with F the per-weight diagonal empirical Fisher.

``scale`` (``objective_scale``) is the mean or the median of an objective
over the candidate channels: the median is the typical channel, near where
the pruning decision is made, rather than the few large channels that no
ratio prunes.

Weights are (d_out, d_in) with d_in = C_in * kh * kw (a flattened Conv2d
weight) unless stated otherwise; all functions are pure tensor math.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "OBJECTIVE_SCALES",
    "RECON_SCALES",
    "output_channel_errors",
    "input_channel_errors",
    "depthwise_channel_errors",
    "relative_errors",
    "obd_output_channel_scores",
    "obd_input_channel_scores",
    "obd_norm_channel_scores",
    "mixed_channel_scores",
    "pooled_mean",
]

OBJECTIVE_SCALES: tuple[str, ...] = ("mean", "median")
RECON_SCALES: tuple[str, ...] = ("layer", "none")

Channels = Sequence[int] | torch.Tensor


def output_channel_errors(weight: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """w_k^T M w_k of every output channel k: (d_out,).

    Also the output energy of each row: their sum is trace(W M W^T).

    :param weight: (d_out, d_in)
    :param moment: input second moment M, (d_in, d_in)
    """
    return ((weight @ moment) * weight).sum(1)


def input_channel_errors(
    weight: torch.Tensor, moment: torch.Tensor, in_channels: int
) -> torch.Tensor:
    """sum_o w_oj^T M_jj w_oj of every input channel j: (C_in,).

    :param weight: (d_out, C_in * k), k kernel positions per input channel
    :param moment: (C_in * k, C_in * k); M_jj is its k x k block of channel j
    :param in_channels: C_in
    """
    k = weight.shape[1] // in_channels  # kernel positions per input channel
    blocks = moment.view(in_channels, k, in_channels, k)
    ar = torch.arange(in_channels, device=weight.device)
    diag_blocks = blocks[ar, :, ar, :]  # (C_in, k, k)
    wk = weight.view(weight.shape[0], in_channels, k)
    return torch.einsum("ojk,jkl,ojl->j", wk, diag_blocks, wk)


def depthwise_channel_errors(weight: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """w_c^T M_c w_c of every channel c of a depthwise conv: (C,).

    :param weight: (C, k), one flattened kh*kw filter per channel
    :param moments: per-channel input second moments M_c, (C, k, k)
    """
    return torch.einsum("ck,ckl,cl->c", weight, moments, weight)


def relative_errors(
    errors: torch.Tensor, energy: torch.Tensor, recon_scale: str
) -> torch.Tensor:
    """``errors`` as fractions of the layer's output ``energy`` ("layer"), or
    unchanged ("none")."""
    if recon_scale == "none":
        return errors
    return errors / energy.clamp(min=torch.finfo(errors.dtype).tiny)


def obd_output_channel_scores(
    weight: torch.Tensor, fisher: torch.Tensor, channels: Channels, transposed: bool = False
) -> torch.Tensor:
    """sum of w^2 * F over each output channel's weights: (len(channels),).

    :param weight: the layer weight in its own shape (C_out first, or C_in
        first when ``transposed``, as a transposed convolution's)
    :param fisher: per-weight diagonal Fisher, the shape of ``weight``
    :param channels: the output channels scored
    """
    if transposed:
        weight, fisher = weight.transpose(1, 0), fisher.transpose(1, 0)
    return (weight[channels].flatten(1) ** 2 * fisher[channels].flatten(1)).sum(1)


def obd_input_channel_scores(
    weight: torch.Tensor, fisher: torch.Tensor, transposed: bool = False
) -> torch.Tensor:
    """sum of w^2 * F over each input channel's weights, for every input
    channel of the weight: (weight.shape[1],), or (weight.shape[0],) when
    ``transposed`` (see :func:`obd_output_channel_scores`)."""
    if transposed:
        weight, fisher = weight.flatten(1), fisher.flatten(1)
    else:
        weight, fisher = weight.transpose(0, 1).flatten(1), fisher.transpose(0, 1).flatten(1)
    return (weight**2 * fisher).sum(1)


def obd_norm_channel_scores(
    weight: torch.Tensor, fisher: torch.Tensor, channels: Channels
) -> torch.Tensor:
    """gamma^2 * F of a norm layer's channels: (len(channels),).

    :param weight: the affine weight gamma, (C,); :param fisher: its diagonal Fisher, (C,)
    """
    return weight[channels] ** 2 * fisher[channels]


def mixed_channel_scores(
    recon: torch.Tensor, taylor: torch.Tensor, lam: float, objective_scale: str
) -> torch.Tensor:
    """(1 - lam) * recon / scale(recon) + lam * taylor / scale(taylor) over the
    same channels, with scale the "mean" or "median" (``objective_scale``)."""
    return (1.0 - lam) * _unit_scaled(recon, objective_scale) + lam * _unit_scaled(
        taylor, objective_scale
    )


def _unit_scaled(scores: torch.Tensor, objective_scale: str) -> torch.Tensor:
    """``scores`` divided by their mean or median."""
    scale = scores.mean() if objective_scale == "mean" else scores.median()
    return scores / scale.clamp(min=torch.finfo(scores.dtype).tiny)


def pooled_mean(
    old: torch.Tensor | None, new: torch.Tensor, n_old: int, n_new: int
) -> torch.Tensor:
    """Mean over n_old + n_new samples of a mean ``old`` of n_old and ``new`` of n_new."""
    if old is None or n_old == 0:
        return new
    return (old * n_old + new * n_new) / (n_old + n_new)
