"""Causal-LM helpers shared by the CLI, the demo and the benchmarks.

Calibration windows, perplexity, and one pruning run through LLM Compressor's
``oneshot`` that writes its output directory atomically.
"""

from __future__ import annotations

import contextlib
import math
import pathlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from moonshot_plugins.atomic import atomic_directory

__all__ = [
    "tokenize",
    "calibration_loader",
    "perplexity",
    "run_oneshot",
]


def tokenize(tokenizer: Any, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` (1-D long tensor), truncated to ``max_tokens``."""
    # Whole documents are tokenized at once and windowed later; lift the
    # tokenizer's length limit so it does not warn about "too long" input.
    limit, tokenizer.model_max_length = tokenizer.model_max_length, int(1e30)
    try:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    finally:
        tokenizer.model_max_length = limit
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def calibration_loader(token_ids: torch.Tensor, num_samples: int, seq_len: int) -> DataLoader:
    """``num_samples`` windows of ``seq_len`` tokens, evenly spread over ``token_ids``.

    Deterministic (no shuffling), so two pruning runs see identical batches in
    identical order — what a bitwise host comparison needs. Batches are dicts
    with ``input_ids`` and ``attention_mask`` of shape (1, seq_len).
    """
    if num_samples <= 0 or seq_len <= 1:
        raise ValueError(
            f"num_samples must be >= 1 and seq_len >= 2, got {num_samples}, {seq_len}"
        )
    available = token_ids.numel() - seq_len
    if available < 0 or (num_samples - 1) * seq_len > token_ids.numel():
        raise ValueError(
            f"calibration text has {token_ids.numel()} tokens, fewer than "
            f"num_samples * seq_len = {num_samples * seq_len}"
        )
    starts = torch.linspace(0, available, num_samples).long().tolist()
    samples = [
        {
            "input_ids": token_ids[s : s + seq_len].clone(),
            "attention_mask": torch.ones(seq_len, dtype=torch.long),
        }
        for s in starts
    ]

    def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}

    return DataLoader(samples, batch_size=1, shuffle=False, collate_fn=collate)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    context: int = 1024,
    batch_size: int = 4,
    desc: str = "perplexity",
) -> float:
    """exp(mean next-token NLL) over non-overlapping ``context``-token windows.

    The tail shorter than ``context`` is dropped so every prediction sees the
    same kind of window; ``token_ids`` should hold a multiple of ``context``.
    """
    num_windows = token_ids.numel() // context
    if num_windows == 0:
        raise ValueError(f"need at least {context} tokens, got {token_ids.numel()}")
    windows = token_ids[: num_windows * context].view(num_windows, context)
    device = next(model.parameters()).device
    model.eval()
    total_nll, total_count = 0.0, 0
    for start in tqdm(range(0, num_windows, batch_size), desc=desc, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_count += batch[:, 1:].numel()
    return math.exp(total_nll / total_count)


def run_oneshot(
    model: str | pathlib.Path | torch.nn.Module,
    recipe: Any,
    loader: DataLoader,
    output_dir: str | pathlib.Path | None = None,
    replace: bool = False,
    **oneshot_kwargs: Any,
) -> torch.nn.Module:
    """Prune with LLM Compressor's ``oneshot`` and, optionally, save atomically.

    The checkpoint (compressed-tensors format, tokenizer, ``recipe.yaml``) is
    written to a staging directory beside ``output_dir`` and renamed into place
    only when everything succeeded (:func:`moonshot_plugins.atomic.atomic_directory`),
    so a failed run leaves no half-written directory.

    :param replace: replace an existing ``output_dir`` once the new one is complete
    :raises FileExistsError: if ``output_dir`` already exists and not ``replace``
    """
    from llmcompressor import oneshot

    import moonshot_plugins.llmcompressor  # noqa: F401  (registers the MOONSHOT modifiers)

    if isinstance(model, pathlib.Path):
        model = str(model)  # oneshot only treats str as a path
    if output_dir is None:
        return oneshot(model=model, recipe=recipe, dataset=loader, **oneshot_kwargs)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # every rank would stage and rename its own copy of the directory
        raise ValueError(
            "run_oneshot(output_dir=...) writes from one process only; under torchrun call "
            "llmcompressor.oneshot(..., output_dir=...) directly (its rank 0 saves), see docs/big-models.md"
        )
    with atomic_directory(output_dir, replace=replace) as staging, _logged_as(staging, output_dir):
        return oneshot(
            model=model, recipe=recipe, dataset=loader, output_dir=str(staging), **oneshot_kwargs
        )


@contextlib.contextmanager
def _logged_as(staging: pathlib.Path, target: str | pathlib.Path) -> Iterator[None]:
    """While inside, log messages name ``target`` wherever they would name the
    hidden ``staging`` directory (LLM Compressor logs the paths it writes):
    the user sees where the result will be, not a ``.NAME.partial-*`` name."""
    from loguru import logger

    core = logger._core  # loguru has no public getter for the configured patcher
    previous = core.patcher

    def patcher(record: dict) -> None:
        if previous is not None:
            previous(record)
        record["message"] = record["message"].replace(str(staging), str(target))

    logger.configure(patcher=patcher)
    try:
        yield
    finally:
        core.patcher = previous  # configure(patcher=None) would keep ours
