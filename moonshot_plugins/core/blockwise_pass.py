"""The gradient pass one block at a time, for models larger than the accelerator.

:func:`~moonshot_plugins.core.gradient_pass.run_gradient_pass` holds the whole
model on one device. :func:`run_blockwise_gradient_pass` holds one block (a
decoder layer) at a time, and the model's ends (embeddings, final norm, head)
only while they run; the activations between blocks wait on the CPU. For each
group of batches:

1. start: the model runs up to the first block, whose call (input hidden
   state, masks, position embeddings) is captured; every block is called with
   the same arguments besides the hidden state;
2. forward: block by block, each batch's hidden state goes through the block
   without grad; every block's input is kept on the CPU;
3. tail: per batch, the per-sample losses of the last block's output (a leaf
   that requires grad) and their backward: the gradient at the last boundary;
4. backward: block by block in reverse, each batch's forward is recomputed
   from its stored input (which now requires grad) and the gradient from the
   block above is backpropagated; the input's gradient goes to the block below.

The collector's hooks are attached in steps 3 and 4 only, so every layer sees
the inputs and output gradients of the whole-model pass, once per sample: its
statistics equal that pass's up to floating-point summation order. The blocks
must form a chain (each block's input is the previous block's output), as the
decoder layers of a causal LM do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moonshot_plugins.core.collector import FisherCollector
from moonshot_plugins.core.gradient_pass import (
    batch_size_of,
    check_losses,
    forwards_replaced,
    truncate_batch,
    frozen_parameters,
    release_freed_memory,
)

__all__ = [
    "BlockCall",
    "Onload",
    "block_hidden",
    "blocks_bypassed",
    "evaluation_mode",
    "first_block_call",
    "group_budget",
    "run_blockwise_gradient_pass",
]

BlockCall = tuple[tuple[Any, ...], dict[str, Any]]
"""A block's positional arguments (the hidden state first) and keyword arguments."""

Onload = Callable[[nn.Module], AbstractContextManager]
"""``onload(module)``: a context inside which ``module`` runs on the execution device."""

HOST = torch.device("cpu")  # where the block-boundary activations wait


def block_hidden(output: Any) -> torch.Tensor:
    """The hidden state in a block's output: the output itself, or its first item."""
    return output if isinstance(output, torch.Tensor) else output[0]


class _StopForward(Exception):
    """Raised by the first block's pre-hook once its call is captured."""


def first_block_call(forward: Callable[[], Any], first_block: nn.Module) -> BlockCall:
    """Run ``forward()`` (the model on one batch) up to ``first_block`` and
    return the call that block receives; nothing of the model after it runs."""
    captured: list[BlockCall] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        forward()
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError("the model's forward never called its first block")
    return captured[0]


@contextmanager
def blocks_bypassed(blocks: Sequence[nn.Module], output: Any) -> Iterator[None]:
    """While inside, every block returns ``output`` (the last block's output)
    without computing anything, so the model's forward runs only its ends.

    Checks what the blockwise pass assumes of the blocks: they form a chain
    (block i > 0 receives the hidden state of block i-1's output, each block
    once per forward) and are all called with the first block's other arguments.

    :raises ValueError: when a block is called out of that pattern
    """
    hidden = block_hidden(output)
    received: list[BlockCall] = []  # each block's call, its hidden state left out

    def bypass(index: int, *args: Any, **kwargs: Any) -> Any:
        if index == 0:  # a new forward of the model
            received.clear()
        if index != len(received) or (index > 0 and args[0] is not hidden):
            raise ValueError(
                f"block {index} is not called with the output of block {index - 1}: "
                "the blockwise gradient pass needs the blocks to form a chain"
            )
        # usually the very same objects as block 0's, so the comparison is free
        if received and not _same_call((args[1:], kwargs), received[0]):
            raise ValueError(
                f"block {index} is called with other arguments than the first block "
                "(besides the hidden state); the blockwise gradient pass reuses the first's"
            )
        received.append((args[1:], kwargs))
        return output

    with forwards_replaced(blocks, lambda index, _: partial(bypass, index)):
        yield


def _same_call(a: Any, b: Any) -> bool:
    """Equal structures whose tensors are equal in value."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.shape == b.shape and torch.equal(a.to(b.device), b)
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_call(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_call(a[k], b[k]) for k in a)
    return a == b


def _send(value: Any, device: torch.device, memo: dict[int, Any]) -> Any:
    """``value`` with every tensor inside on ``device``; a tensor that occurs
    twice is moved once (``memo``: id -> moved)."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = value.detach().to(device)
        return memo[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(_send(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: _send(v, device, memo) for k, v in value.items()}
    return value


@contextmanager
def evaluation_mode(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Every module (and submodule) in eval mode while inside; restored after."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for m, _ in saved:
        m.training = False
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


@contextmanager
def _onloaded(modules: Iterable[nn.Module], onload: Onload) -> Iterator[None]:
    """``modules`` onloaded, their parameters frozen (only activation gradients
    are needed; frozen once onloaded, so offloaded copies are frozen too)."""
    with ExitStack() as stack:
        with torch.no_grad():  # an onloaded copy made under grad would be no leaf
            for module in modules:
                stack.enter_context(onload(module))
                stack.enter_context(frozen_parameters(module))
        yield


@dataclass
class _Batch:
    """One batch on its way through the pass; tensors wait on the CPU."""

    batch: Any
    size: int
    first_sample: int
    call: BlockCall  # the first block's call, its hidden state left out
    boundaries: list[torch.Tensor] = field(default_factory=list)  # input of block i
    output_rest: tuple | None = None  # a tuple output's items after the hidden state
    gradient: torch.Tensor | None = None  # d loss / d the current boundary


def group_budget(model_bytes: int, available_bytes: int) -> int:
    """CPU bytes of block-boundary activations one group of batches may hold
    when blocks travel to an accelerator (``group_bytes`` below).

    A quarter of the model's own bytes, and at most a quarter of the free RAM,
    so the boundary activations held add at most about a quarter of the
    model's size to the host's peak RSS (the heap freed within a group is
    trimmed per block, see ``_trim_within``). A larger group saves block trips
    (each block travels twice per group), which cost little next to the
    blocks' compute; a group sized by free RAM alone doubled the peak RSS on
    a 128 GB machine (2026-12-04, H200).

    :param model_bytes: bytes of the model's parameters and buffers
    :param available_bytes: the machine's free RAM in bytes
    """
    return min(model_bytes, available_bytes) // 4


def run_blockwise_gradient_pass(
    blocks: Sequence[nn.Module],
    ends: Sequence[nn.Module],
    batches: Iterable[Any],
    collector: FisherCollector,
    first_call: Callable[[Any], BlockCall],
    sample_losses: Callable[[Any, Any], torch.Tensor],
    onload: Onload,
    device: torch.device,
    max_samples: int | None = None,
    desc: str = "MOONSHOT gradient pass",
    autocast_dtype: torch.dtype | None = None,
    group_bytes: int = 0,
) -> int:
    """The gradient pass of :func:`~moonshot_plugins.core.run_gradient_pass`,
    one block on the execution device at a time (see the module docstring).

    :param blocks: the chain of blocks (e.g. decoder layers), in order
    :param ends: the modules outside the blocks the model runs (embeddings,
        final norm, head), onloaded together while the start or tail runs
    :param first_call: batch -> the first block's call (:func:`first_block_call`),
        its tensors on ``device``
    :param sample_losses: (batch, the last block's output) -> per-sample losses
        (B,) of the model whose blocks returned that output (:func:`blocks_bypassed`)
    :param onload: the context that puts one module on ``device``
    :param device: where blocks and ends run
    :param max_samples, autocast_dtype: as in ``run_gradient_pass``
    :param group_bytes: CPU bytes of block-boundary activations a group of
        batches may hold: each block is onloaded twice per group, not per
        batch; 0 = one batch per group (least memory)
    :return: number of samples used
    """
    autocast = torch.autocast(
        device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    )
    total = len(batches) if hasattr(batches, "__len__") else None  # batches, for the progress bar
    progress = tqdm(total=total, desc=desc, leave=False)
    used = 0
    with evaluation_mode([*blocks, *ends]), autocast:
        for group in _groups(batches, blocks, ends, first_call, onload, device, max_samples, group_bytes):
            _forward(group, blocks, onload, device)
            with collector, torch.enable_grad():
                _tail(group, ends, sample_losses, onload, device)
                _backward(group, blocks, onload, device, _lowest_hooked(blocks, collector))
            used = group[-1].first_sample + group[-1].size
            progress.update(len(group))
            del group
            release_freed_memory()
    progress.close()
    if used == 0:
        raise ValueError(
            "calibration data is empty: the gradient pass got no batch "
            "(it needs at least one calibration sample)"
        )
    missed = [name for name, count in collector.num_samples.items() if count == 0]
    if missed:
        raise ValueError(
            f"no gradient reached layers {missed}: the blockwise gradient pass "
            "differentiates the blocks and what runs after them, not what runs before "
            "the first block; leave such layers out of the targets"
        )
    return used


def _groups(
    batches: Iterable[Any],
    blocks: Sequence[nn.Module],
    ends: Sequence[nn.Module],
    first_call: Callable[[Any], BlockCall],
    onload: Onload,
    device: torch.device,
    max_samples: int | None,
    group_bytes: int,
) -> Iterator[list[_Batch]]:
    """The batches (truncated to ``max_samples``) started, in groups whose
    boundaries fit ``group_bytes``."""
    group: list[_Batch] = []
    held = used = 0
    for batch in batches:
        if max_samples is not None and used >= max_samples:
            break
        size = batch_size_of(batch)
        if max_samples is not None and used + size > max_samples:
            batch, size = truncate_batch(batch, max_samples - used), max_samples - used
        with _onloaded(ends, onload), torch.no_grad():
            (hidden, *args), kwargs = first_call(batch)
        memo: dict[int, Any] = {}
        started = _Batch(batch, size, used, _send((tuple(args), kwargs), HOST, memo))
        started.boundaries.append(_send(hidden, HOST, memo))
        cost = hidden.nbytes * (len(blocks) + 2)  # the boundaries and one gradient
        if group and held + cost > group_bytes:
            yield group
            group, held = [], 0
        group.append(started)
        held += cost
        used += size
    if group:
        yield group


def _call(block: nn.Module, hidden: torch.Tensor, call: BlockCall, device: torch.device) -> Any:
    args, kwargs = _send(call, device, {})
    return block(hidden, *args, **kwargs)


def _forward(group: list[_Batch], blocks: Sequence[nn.Module], onload: Onload, device: torch.device) -> None:
    """Every batch through every block without grad; each block's output kept on the CPU."""
    for block in blocks:
        with _onloaded([block], onload), torch.no_grad():
            for item in group:
                output = _call(block, item.boundaries[-1].to(device), item.call, device)
                item.boundaries.append(block_hidden(output).to(HOST))
                if not isinstance(output, torch.Tensor):
                    item.output_rest = _send(tuple(output[1:]), HOST, {})
        _trim_within(group)


def _tail(
    group: list[_Batch],
    ends: Sequence[nn.Module],
    sample_losses: Callable[[Any, Any], torch.Tensor],
    onload: Onload,
    device: torch.device,
) -> None:
    """Per batch, the losses of the last block's output and their gradient there."""
    with _onloaded(ends, onload):
        for item in group:
            hidden = item.boundaries.pop().to(device).detach().requires_grad_(True)
            output = hidden
            if item.output_rest is not None:
                output = (hidden, *_send(item.output_rest, device, {}))
            losses = sample_losses(item.batch, output)
            check_losses(losses, first_sample=item.first_sample)
            losses.sum().backward()
            del losses
            item.gradient = hidden.grad.to(HOST)


def _lowest_hooked(blocks: Sequence[nn.Module], collector: FisherCollector) -> int:
    """Index of the first block holding a layer of ``collector``: no gradient
    is needed below it (len(blocks) when there is none)."""
    hooked = {id(m) for m in collector.modules.values()}
    for index, block in enumerate(blocks):
        if any(id(m) in hooked for m in block.modules()):
            return index
    return len(blocks)


def _backward(
    group: list[_Batch],
    blocks: Sequence[nn.Module],
    onload: Onload,
    device: torch.device,
    lowest: int,
) -> None:
    """Block by block in reverse down to ``lowest``: recompute each batch's
    forward from its stored input and backpropagate the gradient from above."""
    for index in range(len(blocks) - 1, lowest - 1, -1):
        with _onloaded([blocks[index]], onload):
            for item in group:
                hidden = item.boundaries.pop().to(device).detach()
                hidden.requires_grad_(index > lowest)  # the gradient below is needed
                output = block_hidden(_call(blocks[index], hidden, item.call, device))
                if output.requires_grad:  # else no hooked layer and no input grad
                    torch.autograd.backward(output, item.gradient.to(device))
                item.gradient = hidden.grad.to(HOST) if index > lowest else None
        _trim_within(group)


def _trim_within(group: list[_Batch]) -> None:
    """Hand the block's freed temporaries back to the OS when the group holds
    several batches: the pass trims after each group anyway, but within a
    large group the heap otherwise ratchets block after block (each grouped
    sample cost about 4x its boundary bytes in RSS without this). With one
    batch per group the per-block trim saved RSS too but cost 1.08x the
    pass's time, over its 1.05x allowance (2026-12-04, docs/experiments.md)."""
    if len(group) > 1:
        release_freed_memory()
