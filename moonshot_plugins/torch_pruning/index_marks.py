"""Original flat indices of scored weights, carried through Torch-Pruning's pruning.

After a group is pruned, MoonshotImportance must gather its dense statistics
for exactly the weights that remain. Torch-Pruning 1.6 builds every pruned
parameter in one place, ``BasePruningFunc._prune_parameter_and_grad``
(``index_select`` of the weight, and of its ``.grad``, along the pruned
dimension). Wrapping that function once selects a weight's index marks along
with it, so the marks live beside the weight, never in its ``.grad``: the
user's gradients stay theirs (pruned by Torch-Pruning as usual) and an
optimiser step after pruning uses them.
"""

from __future__ import annotations

import functools

import torch
from torch_pruning.pruner import function

__all__ = ["index_marks", "mark_indices"]

_ATTRIBUTE = "_moonshot_index_marks"
_MAX_INDEX = 2**31 - 1  # int32 marks


def mark_indices(weight: torch.nn.Parameter) -> None:
    """Attach each weight's flat index (int32, ``weight``'s shape) to ``weight``."""
    if weight.numel() > _MAX_INDEX:
        raise ValueError(f"a weight of {weight.numel()} elements is too large to mark (at most {_MAX_INDEX})")
    _install()
    marks = torch.arange(weight.numel(), dtype=torch.int32, device=weight.device).view(weight.shape)
    setattr(weight, _ATTRIBUTE, marks)


def index_marks(weight: torch.nn.Parameter) -> torch.Tensor | None:
    """The original flat indices of ``weight``'s remaining elements (its shape),
    or None when it was never marked (or was replaced outside Torch-Pruning)."""
    return getattr(weight, _ATTRIBUTE, None)


def _install() -> None:
    """Wrap ``_prune_parameter_and_grad`` once so that marks follow their weight."""
    base = function.BasePruningFunc
    original = base._prune_parameter_and_grad
    if getattr(original, "_moonshot_marks", False):
        return

    @functools.wraps(original)
    def prune_parameter_and_grad(self, weight, keep_idxs, pruning_dim):
        pruned = original(self, weight, keep_idxs, pruning_dim)
        marks = index_marks(weight)
        if marks is not None:
            keep = torch.as_tensor(keep_idxs, dtype=torch.long, device=marks.device)
            setattr(pruned, _ATTRIBUTE, marks.index_select(pruning_dim, keep))
        return pruned

    prune_parameter_and_grad._moonshot_marks = True
    base._prune_parameter_and_grad = prune_parameter_and_grad
