"""The options of MoonshotImportance, checked when it is built.

Torch-Pruning reads ``group_reduction`` and ``normalizer`` only when it
scores a group, and an unknown value then fails with a bare
``NotImplementedError``; here every option is checked at construction and an
error names it and its allowed values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moonshot_plugins.core import validate_taylor_weight

__all__ = ["GROUP_REDUCTIONS", "NORMALIZERS", "RECON_TERMS", "one_of", "validate_lam", "validate_normalizer"]

RECON_TERMS: tuple[str, ...] = ("all", "inputs")
# what Torch-Pruning 1.6's Importance._reduce and _normalize implement
# (group_reduction None, "no reduction", would give one score per layer, not per channel)
GROUP_REDUCTIONS: tuple[str, ...] = ("mean", "sum", "max", "prod", "first", "gate")
NORMALIZERS: tuple[str, ...] = ("mean", "sum", "max", "standarization", "gaussian", "lamp")


def one_of(option: str, value: Any, allowed: Sequence[str]) -> str:
    """``value`` if it is in ``allowed``, else a ValueError naming ``option``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{option} must be one of {list(allowed)}, got {value!r}")
    return value


def validate_normalizer(value: Any) -> Any:
    """None, a callable, one of :data:`NORMALIZERS` or "sentinel_q" with q in [0, 1)."""
    if value is None or callable(value) or (isinstance(value, str) and value in NORMALIZERS):
        return value
    if isinstance(value, str) and value.startswith("sentinel_"):
        try:
            if 0.0 <= float(value.removeprefix("sentinel_")) < 1.0:
                return value
        except ValueError:
            pass
    raise ValueError(
        f"normalizer must be one of {list(NORMALIZERS)}, 'sentinel_q' with q in [0, 1), "
        f"a callable or None, got {value!r}"
    )


def validate_lam(lam: Any) -> float:
    """``lam`` as a float in [0, 1] (booleans refused), else a ValueError naming it."""
    try:
        return validate_taylor_weight(lam)
    except (TypeError, ValueError):
        raise ValueError(f"lam must be a number in [0, 1], got {lam!r}") from None
