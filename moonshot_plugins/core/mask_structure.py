"""The one parser of N:M mask structures (``mask_structure: "2:4"``).

``"N:M"`` names groups of M consecutive weights along the input dimension;
``"0:0"`` is LLM Compressor's spelling of "unstructured". This module only
reads the text; each caller gives N and M their meaning (the hosts prune N of
every M, ``moonshot check`` allows at most N non-zeros in every M -- the same
for 2:4).
"""

from __future__ import annotations

import re

__all__ = ["UNSTRUCTURED", "parse_mask_structure", "sparsity_settings"]

UNSTRUCTURED = "0:0"

_FORM = "'N:M' with 0 < N < M (e.g. '2:4')"
_PATTERN = re.compile(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*")


def parse_mask_structure(text: str, *, allow_unstructured: bool = True) -> tuple[int, int]:
    """``(N, M)`` of ``text`` = ``"N:M"``, or ``(0, 0)`` for unstructured ``"0:0"``.

    Spaces around the numbers are ignored. Raises ValueError naming
    ``mask_structure`` and the allowed form for anything else, and for
    ``"0:0"`` when ``allow_unstructured`` is False.
    """
    allowed = f"{_FORM}, or {UNSTRUCTURED!r} for unstructured" if allow_unstructured else _FORM
    match = _PATTERN.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"mask_structure must be {allowed}, got {text!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if allow_unstructured and n == m == 0:
        return 0, 0
    if not 0 < n < m:
        raise ValueError(f"mask_structure must be {allowed}, got {text!r}")
    return n, m


def sparsity_settings(text: str) -> dict[str, float | str]:
    """Modifier settings for a sparsity given as ``"N:M"`` or as a fraction.

    ``"2:4"`` -> ``{"sparsity": 0.5, "mask_structure": "2:4"}``;
    ``"0.6"`` -> ``{"sparsity": 0.6, "mask_structure": "0:0"}`` (60%
    unstructured). Raises ValueError for an N:M that is not ``0 < N < M`` or a
    fraction outside (0, 1).
    """
    if ":" in text:
        n, m = parse_mask_structure(text, allow_unstructured=False)
        return {"sparsity": n / m, "mask_structure": f"{n}:{m}"}
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise ValueError(f"sparsity must be {_FORM} or a fraction in (0, 1), got {text!r}")
    return {"sparsity": value, "mask_structure": UNSTRUCTURED}
