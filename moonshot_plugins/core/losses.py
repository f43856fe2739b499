"""Per-sample losses whose sum drives the gradient pass.

Each function returns one loss per sample, (B,). Summing them (not averaging)
makes each sample's output gradient that of its own loss, independent of how
samples are batched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "causal_lm_sample_losses",
    "chunked_causal_lm_sample_losses",
    "classification_sample_losses",
    "predicted_label_sample_losses",
]


def causal_lm_sample_losses(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each sample: (B,).

    Padding (attention_mask == 0) is excluded from both the sum and the count,
    so a padded sample's gradient equals that of the same sample unpadded.
    """
    targets, mask = _next_token_targets(input_ids, attention_mask)
    shift_logits = logits[:, :-1].float()
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        targets.reshape(-1),
        reduction="none",
    ).view(targets.shape)
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def _next_token_targets(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (B, T-1) and their fp32 weights (1 = counted, 0 = padding)."""
    targets = input_ids[:, 1:]
    if attention_mask is None:
        return targets, torch.ones_like(targets, dtype=torch.float32)
    return targets, attention_mask[:, 1:].float()


def chunked_causal_lm_sample_losses(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 128,
) -> torch.Tensor:
    """:func:`causal_lm_sample_losses` of ``head(hidden)`` without holding the
    logits: each chunk of positions runs the head and the cross-entropy under
    activation checkpointing, so at most ``chunk_size`` positions of logits
    (B x chunk x vocab) exist at once, in forward and in backward.

    :param hidden: final hidden states (B, T, d_model)
    :param head: hidden -> logits (the output embedding)
    :return: mean next-token NLL of each sample, (B,)
    """
    from torch.utils.checkpoint import checkpoint

    targets, mask = _next_token_targets(input_ids, attention_mask)

    def chunk_nll(h: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        nll = F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="none")
        return (nll.view(t.shape) * m).sum(dim=1)

    total = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
    positions = targets.shape[1]
    for start in range(0, positions, chunk_size):
        stop = min(start + chunk_size, positions)
        total = total + checkpoint(
            chunk_nll,
            hidden[:, start:stop],
            targets[:, start:stop],
            mask[:, start:stop],
            use_reentrant=False,
        )
    return total / mask.sum(dim=1).clamp(min=1)


def classification_sample_losses(model: nn.Module, batch: Any) -> torch.Tensor:
    """Per-sample cross-entropy of a ``(inputs, labels)`` batch: (B,)."""
    inputs, labels = batch[0], batch[1]
    return F.cross_entropy(model(inputs), labels, reduction="none")


def predicted_label_sample_losses(model: nn.Module, batch: Any) -> torch.Tensor:
    """Per-sample cross-entropy against the model's own predicted class: (B,).

    Label-free: the target of each sample is the argmax of the model's logits
    (detached), so an unlabelled batch of inputs (or ``(inputs, ...)``) is
    enough. The result is the empirical Fisher of the model's own predictions.
    (The KL divergence to the dense model's predictions has no such use: the
    gradient pass runs on the dense model, where that KL and its gradient are 0.)
    """
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    logits = model(inputs)
    return F.cross_entropy(logits, logits.detach().argmax(dim=-1), reduction="none")
