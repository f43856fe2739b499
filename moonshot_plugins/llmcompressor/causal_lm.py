"""Per-sample causal-LM losses of a Hugging Face model, for the gradient pass."""

from __future__ import annotations

from typing import Any

import torch

from moonshot_plugins.core import causal_lm_sample_losses, chunked_causal_lm_sample_losses

__all__ = ["CausalLMLosses"]


class CausalLMLosses:
    """Per-sample causal-LM losses for the gradient pass (labels = input_ids,
    padding masked): called as ``(model, batch) -> (B,)``.

    When the model is a body plus an output embedding with nothing in between
    (checked once, against the model's own last-position logits), the head and
    the loss run in chunks of positions (:func:`chunked_causal_lm_sample_losses`)
    so the B x T x vocab logits never exist at once: they were the largest
    single item of the pass's memory. Other models take the plain path.

    :param split_head: False when the output embedding is itself pruned: the
        chunked path runs it on chunks of the first T-1 positions, so its
        per-position statistics would not line up with the host's pass over
        all T positions
    """

    def __init__(self, split_head: bool = True) -> None:
        self.chunked: bool | None = None if split_head else False  # None: decided on the first batch

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        device = next(model.parameters()).device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if input_ids.shape[-1] < 2:
            raise ValueError(
                f"calibration samples of {input_ids.shape[-1]} token: MOONSHOT's gradient pass "
                "differentiates the loss of predicting each next token, so every calibration "
                "sample needs at least 2 tokens"
            )
        if self.chunked is None:
            self.chunked = _head_is_separable(model, input_ids[:1], _first(attention_mask))
        if self.chunked:
            hidden = model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            return chunked_causal_lm_sample_losses(
                hidden, model.get_output_embeddings(), input_ids, attention_mask
            )
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return causal_lm_sample_losses(logits, input_ids, attention_mask)


def _first(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask[:1]


@torch.no_grad()
def _head_is_separable(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> bool:
    """Whether logits == output_embedding(base_model(...).last_hidden_state)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    body = getattr(model, "base_model", model)
    if head is None or body is model:
        return False
    try:
        reference = model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1
        ).logits[:, -1]
        hidden = body(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
    except (TypeError, AttributeError):
        return False
    split = head(hidden[:, -1:])[:, -1]
    return torch.allclose(reference.float(), split.float(), rtol=1e-3, atol=1e-3)
