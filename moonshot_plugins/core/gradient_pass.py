"""The gradient pass: forward and activation-only backward over calibration batches.

Only activation gradients are needed, so the gradient pass freezes every
parameter: autograd then skips all weight-gradient matmuls and the pass costs
about one forward plus one activation-only backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from moonshot_plugins.core.collector import FisherCollector
from moonshot_plugins.core.finite import NonFiniteError

__all__ = [
    "frozen_parameters",
    "activation_checkpointing",
    "release_freed_memory",
    "run_gradient_pass",
]


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Temporarily set requires_grad=False on every parameter (restored after)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def batch_size_of(batch: Any) -> int:
    """Leading dimension of the first tensor in a tensor, tuple/list or dict batch."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    items = batch.values() if isinstance(batch, Mapping) else batch
    return next(v for v in items if isinstance(v, torch.Tensor)).shape[0]


def release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the OS (glibc ``malloc_trim``).

    A backward pass frees hundreds of MB of activations of many sizes; glibc
    keeps much of it in fragmented heap, so the process RSS ratchets up batch
    after batch. Trimming after each batch keeps the peak near one batch's
    worth, for a few ms. A no-op where glibc is not the allocator.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


@contextmanager
def forwards_replaced(
    modules: Iterable[nn.Module], new_forward: Callable[[int, nn.Module], Callable[..., Any]]
) -> Iterator[None]:
    """Each module's ``forward`` replaced by ``new_forward(index, module)``
    while inside; after, the module's own instance attribute (e.g. an
    offloading wrapper) is restored, or the class's forward is used again."""
    patched = []
    try:
        for index, module in enumerate(modules):
            own = module.__dict__.get("forward")
            module.forward = new_forward(index, module)
            patched.append((module, own))
        yield
    finally:
        for module, own in patched:
            if own is None:
                del module.forward
            else:
                module.forward = own


@contextmanager
def activation_checkpointing(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run each module under non-reentrant activation checkpointing: its
    internal activations are recomputed in backward instead of kept, so a
    gradient pass holds about one block's activations instead of all of them
    (one extra forward of the blocks). Hooks inside still see every forward;
    gradients flow through the original forward's outputs only, so tensor
    hooks registered during the recomputation never fire."""
    from torch.utils.checkpoint import checkpoint

    with forwards_replaced(modules, lambda _, module: partial(checkpoint, module.forward, use_reentrant=False)):
        yield


def run_gradient_pass(
    model: nn.Module,
    batches: Iterable[Any],
    collector: FisherCollector,
    sample_losses: Callable[[nn.Module, Any], torch.Tensor],
    max_samples: int | None = None,
    desc: str = "MOONSHOT gradient pass",
    autocast_dtype: torch.dtype | None = None,
    checkpoint_modules: Iterable[nn.Module] = (),
) -> int:
    """One forward and one activation-only backward per batch, feeding ``collector``.

    :param sample_losses: (model, batch) -> per-sample losses (B,). Summing them
        makes each sample's output gradient that of its own loss, independent of
        how samples are batched.
    :param max_samples: stop after this many samples (whole batches are
        truncated to fit); None = all batches
    :param autocast_dtype: run the forward/backward matmuls under autocast in
        this dtype (e.g. torch.bfloat16: about 4x faster on CPUs with
        AVX512-BF16); the Fisher accumulators stay fp32. None = model dtype.
    :param checkpoint_modules: blocks (e.g. decoder layers) to run under
        :func:`activation_checkpointing`; same statistics, less memory
    :return: number of samples used
    """
    used = 0
    was_training = model.training
    model.eval()
    total = None
    if hasattr(batches, "__len__"):
        total = len(batches)  # batches, not samples; only for the progress bar
    device_type = next(model.parameters()).device.type
    autocast = torch.autocast(
        device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    )
    try:
        with (
            frozen_parameters(model),
            activation_checkpointing(checkpoint_modules),
            collector,
            torch.enable_grad(),
            autocast,
        ):
            for batch in tqdm(batches, desc=desc, total=total, leave=False):
                size = batch_size_of(batch)
                if max_samples is not None:
                    if used >= max_samples:
                        break
                    if used + size > max_samples:
                        batch = truncate_batch(batch, max_samples - used)
                        size = max_samples - used
                losses = sample_losses(model, batch)
                check_losses(losses, first_sample=used)
                losses.sum().backward()
                del losses
                release_freed_memory()
                used += size
    finally:
        model.train(was_training)
    if used == 0:
        raise ValueError(
            "calibration data is empty: the gradient pass got no batch "
            "(it needs at least one calibration sample)"
        )
    return used


def check_losses(losses: torch.Tensor, first_sample: int) -> None:
    """Raise before ``backward`` when a batch's per-sample losses (B,) cannot
    give gradients: non-finite, or not depending on the model at all.

    :param first_sample: index of the batch's first sample in the pass
    """
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        k = int((~finite).nonzero()[0])
        raise NonFiniteError(
            f"calibration sample {first_sample + k}: the loss is {losses[k].item()}; "
            "the model's output is not finite on it (an overflowing activation or a "
            "non-finite input). Nothing was changed"
        )
    if not losses.requires_grad:
        raise ValueError(
            f"calibration samples {first_sample}-{first_sample + losses.shape[0] - 1}: "
            "the loss does not depend on the model, so there is no gradient to measure "
            "(every sample needs at least one prediction target)"
        )


def truncate_batch(batch: Any, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, (tuple, list)):
        return type(batch)(truncate_batch(b, n) for b in batch)
    return {k: (v[:n] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
