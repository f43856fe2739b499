"""Checks of the LLM Compressor host fields the MOONSHOT modifiers pass through.

The hosts (llmcompressor 0.14 ``SparseGPTModifier`` / ``WandaPruningModifier``)
accept values they then mishandle without a word: ``sparsity`` 1.5 zeroes
every weight, ``sparsity`` 0.7 with ``mask_structure`` "2:4" prunes 50%,
a layer of width 126 under 2:4 loses its last two columns entirely. The
MOONSHOT modifiers check these fields themselves, at construction where the
value alone decides and when the run starts (before any weight changes) where
the model does. Each error names the field.

The host's N:M rule, read from its code: ``"N:M"`` prunes the N smallest of
every M consecutive input weights of each row (sparsity exactly N/M), for
0 < N < M; ``"0:0"`` is unstructured. The groups start at multiples of M, so
every pruned layer's input width must be a multiple of M, and SparseGPT's
column blocks (``block_size``) too, or groups straddle two blocks.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from moonshot_plugins.core import in_features
from moonshot_plugins.core.mask_structure import UNSTRUCTURED, parse_mask_structure

__all__ = [
    "check_layer_widths",
    "check_sparsity_list",
    "checked_sparsity",
    "is_number",
    "validate_block_size",
    "validate_dampening_frac",
    "validate_ignore",
    "validate_mask_structure",
    "validate_sparsity",
    "validate_targets",
]


def is_number(value: Any) -> bool:
    """A real number of a recipe field: int or float, not bool (a bool is an int to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_sparsity(value: Any) -> float | list[float] | None:
    """A fraction in (0, 1), a list of them (one per target layer), or None
    (only with an N:M ``mask_structure``: then N/M)."""
    if value is None:
        return None
    values = value if isinstance(value, (list, tuple)) else [value]
    for item in values or [None]:  # an empty list is no sparsity either
        if not is_number(item) or not 0.0 < item < 1.0:
            raise ValueError(
                "sparsity must be a fraction in (0, 1) (or a list of them, one per target "
                f"layer; 0 would prune nothing), got {value!r}"
            )
    return [float(v) for v in values] if isinstance(value, (list, tuple)) else float(value)


def validate_mask_structure(value: Any) -> str:
    """``"N:M"`` with 0 < N < M, or ``"0:0"`` (unstructured); normalised to ``f"{N}:{M}"``."""
    n, m = parse_mask_structure(value)
    return f"{n}:{m}"


def checked_sparsity(
    sparsity: float | list[float] | None, mask_structure: str
) -> float | list[float]:
    """``sparsity`` once it agrees with ``mask_structure``; N/M when it was not given.

    Under "N:M" the hosts prune exactly N of every M weights whatever
    ``sparsity`` says, so any other value would be silently ignored.
    """
    n, m = parse_mask_structure(mask_structure)
    if mask_structure == UNSTRUCTURED:
        if sparsity is None:
            raise ValueError(
                "sparsity is required with unstructured mask_structure '0:0' (a fraction in (0, 1))"
            )
        return sparsity
    if sparsity is None:
        return n / m
    values = sparsity if isinstance(sparsity, list) else [sparsity]
    if any(not math.isclose(v, n / m, abs_tol=1e-6) for v in values):
        raise ValueError(
            f"sparsity {sparsity!r} disagrees with mask_structure '{mask_structure}', which prunes "
            f"{n} of every {m} weights (sparsity {n / m:g}); give sparsity {n / m:g} or leave it out"
        )
    return sparsity


def _check_patterns(field: str, patterns: list[str]) -> None:
    for pattern in patterns:
        if not pattern:
            raise ValueError(f"{field} entries must be non-empty layer names, classes or 're:' regexes")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise ValueError(f"{field} entry {pattern!r} is not a valid regex: {err}") from None


def validate_targets(value: str | list[str]) -> list[str]:
    """A non-empty class name, layer name or ``re:`` regex, or a non-empty list
    of them; always returned as a list (the host iterates a bare string
    character by character and would then select no layer)."""
    patterns = [value] if isinstance(value, str) else list(value)
    if not patterns:
        raise ValueError("targets must name at least one layer class, name or 're:' regex")
    _check_patterns("targets", patterns)
    return patterns


def validate_ignore(value: list[str]) -> list[str]:
    """A list of class names, layer names or ``re:`` regexes (may be empty)."""
    _check_patterns("ignore", value)
    return value


def validate_block_size(value: Any) -> int:
    """SparseGPT's column block: a positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"block_size must be a positive integer, got {value!r}")
    return value


def validate_dampening_frac(value: Any) -> float:
    """SparseGPT's damping, a fraction of the Hessian's mean diagonal: a finite number >= 0."""
    if not is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"dampening_frac must be a finite number >= 0, got {value!r}")
    return float(value)


def check_sparsity_list(sparsity: float | list[float], target_layers: int, targets: list[str]) -> None:
    """A list ``sparsity`` needs one value per layer ``targets`` match."""
    if isinstance(sparsity, list) and len(sparsity) != target_layers:
        raise ValueError(
            f"sparsity lists {len(sparsity)} values, but targets {targets!r} match {target_layers} "
            "layers: give one value per target layer, or a single fraction"
        )


def check_layer_widths(layers: dict[str, torch.nn.Module], mask_structure: str) -> None:
    """Raise naming the layers whose input width is not a multiple of M under "N:M".

    :param layers: the layers the host will prune, by name
    """
    n, m = parse_mask_structure(mask_structure)
    if m == 0:
        return
    widths = {name.rstrip("."): in_features(module) for name, module in layers.items()}
    bad = [f"{name} ({width})" for name, width in widths.items() if width % m]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(
            f"mask_structure '{mask_structure}' prunes {n} of every {m} consecutive input weights, "
            f"so every pruned layer's input width must be a multiple of {m}; not so for {shown}. "
            "Add those layers to ignore or use unstructured sparsity. Nothing was changed"
        )
