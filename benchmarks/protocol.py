"""The evaluation protocol: calibration draws and sources, evaluation texts,
and paired statistics that tell a gain from noise.

A quality number is a mean over calibration draws with its standard error,
paired with the host on the same draws, in every (calibration source,
evaluation text) cell:

- calibration sources (:data:`CALIBRATION_SOURCES`): ``austen`` (Emma, Pride
  and Prejudice, Sense and Sensibility) and ``python-docs`` (the Python 3.11
  docs' howto, faq and reference sections);
- draws: ``num_samples`` windows of ``seq_len`` tokens at random,
  non-overlapping positions of the source, from ``torch.Generator`` seeded
  with the draw's seed;
- evaluation texts (:data:`EVALUATION_TEXTS`), in neither source: the novel
  Persuasion, the Python tutorial, and legal English (Debian's common
  licence texts);
- held-out texts for choosing defaults (:data:`HELDOUT_TEXTS`), on the
  calibration side and never reported as results: Mansfield Park and the
  Python docs' library section.

The rule for "helps" (:func:`verdict`) is fixed here, before any run: the mean
paired ratio to the host is below 1 in every cell, and clearly below 1 (mean
+ 2 standard errors < 1) in more than half of the cells.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

CALIBRATION_SOURCES = ("austen", "python-docs")
EVALUATION_TEXTS = ("persuasion", "python-tutorial", "licenses")
HELDOUT_TEXTS = ("mansfieldpark", "python-library")
CALIBRATION_NOVELS = ("emma", "prideprejudice", "sensesensibility")
CALIBRATION_DOC_SECTIONS = ("howto", "faq", "reference")
# Debian base-files' licence texts, a fixed order: legal prose, a third kind
LICENSE_DIR = pathlib.Path("/usr/share/common-licenses")
LICENSE_FILES = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-2.1", "CC0-1.0", "Artistic")
CLEARLY_BELOW = 2.0  # standard errors between the mean ratio and 1 for "clearly"
MIN_DRAWS = 3  # draws per cell before a verdict
# what identifies a method configuration, and a run of it in a results file (with the settings)
METHOD_KEYS = ("method", "sparsity", "host", "lam", "fisher_mode", "options")
RUN_KEYS = (*METHOD_KEYS, "calib_source", "draw")


def licenses_text() -> str:
    """The licence texts of :data:`LICENSE_FILES`, joined with blank lines."""
    missing = [name for name in LICENSE_FILES if not (LICENSE_DIR / name).exists()]
    if missing:
        raise FileNotFoundError(f"licence texts {missing} not found under {LICENSE_DIR} (Debian base-files)")
    return "\n\n".join((LICENSE_DIR / name).read_text(encoding="utf-8") for name in LICENSE_FILES)


def text_sources() -> dict[str, Callable[[], str]]:
    """Name -> function returning the text, for every source and evaluation text."""
    from moonshot_plugins.assets import austen_novels, python_docs

    return {
        "austen": lambda: "\n".join(austen_novels()[n] for n in CALIBRATION_NOVELS),
        "python-docs": lambda: "\n".join(python_docs(s) for s in CALIBRATION_DOC_SECTIONS),
        "persuasion": lambda: austen_novels()["persuasion"],
        "python-tutorial": lambda: python_docs("tutorial"),
        "licenses": licenses_text,
        "mansfieldpark": lambda: austen_novels()["mansfieldpark"],
        "python-library": lambda: python_docs("library"),
    }


def draw_starts(num_tokens: int, num_samples: int, seq_len: int, seed: int) -> list[int]:
    """Start offsets of ``num_samples`` non-overlapping ``seq_len``-token
    windows of a ``num_tokens``-token text, chosen at random (sorted)."""
    import torch

    slots = num_tokens // seq_len
    if slots < num_samples:
        raise ValueError(f"text of {num_tokens} tokens holds {slots} windows of {seq_len}, need {num_samples}")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(slots, generator=generator)[:num_samples].sort().values
    return [int(slot) * seq_len for slot in chosen]


def draw_loader(token_ids, num_samples: int, seq_len: int, seed: int):
    """A calibration DataLoader of one draw (batches as
    :func:`moonshot_plugins.lm.calibration_loader`'s, in start order)."""
    import torch
    from torch.utils.data import DataLoader

    samples = [
        {"input_ids": token_ids[s : s + seq_len].clone(), "attention_mask": torch.ones(seq_len, dtype=torch.long)}
        for s in draw_starts(token_ids.numel(), num_samples, seq_len, seed)
    ]

    def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}

    return DataLoader(samples, batch_size=1, shuffle=False, collate_fn=collate)


# -- statistics --------------------------------------------------------------
def mean_and_error(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for n = 1)."""
    values = list(values)
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def is_host(run: dict[str, Any]) -> bool:
    """The host at its own defaults (a host run with options, e.g. another
    ``dampening_frac``, is a configuration compared with it)."""
    return run["method"] == "host" and not run.get("options")


def paired_ratios(runs: list[dict[str, Any]], method: Callable[[dict], bool],
                  texts: Iterable[str] = EVALUATION_TEXTS,
                  baseline: Callable[[dict], bool] = is_host) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (calibration source, evaluation text) cell: the method's perplexity
    ratio to the baseline run (default: the host) of the same setting, source
    and draw.

    ``runs`` hold one setting and host (sparsity, host); ``method`` and
    ``baseline`` select the runs to compare. Returns cell -> {"ratio": (mean,
    s.e.), "ppl": (mean, s.e.), "host_ppl": (mean, s.e.) of the baseline,
    "draws": n}; cells with no pair are absent.
    """
    hosts = {(r["calib_source"], r["draw"]): r for r in runs if baseline(r)}
    cells = {}
    for source in CALIBRATION_SOURCES:
        mine = [r for r in runs if r["calib_source"] == source and method(r)
                and (source, r["draw"]) in hosts]
        for text in texts:
            key = f"ppl_{text}"
            pairs = [(r[key], hosts[(source, r["draw"])][key]) for r in mine if key in r]
            if not pairs:
                continue
            cells[(source, text)] = {
                "ratio": mean_and_error(m / h for m, h in pairs),
                "ppl": mean_and_error(m for m, _ in pairs),
                "host_ppl": mean_and_error(h for _, h in pairs),
                "draws": len(pairs),
            }
    return cells


def verdict(cells: dict[tuple[str, str], dict[str, Any]], expected_cells: int | None = None) -> str:
    """"helps", "mixed" (below 1 in every cell but clearly so in at most half)
    or "loses somewhere" (a mean ratio >= 1 in some cell); "incomplete" while
    a cell is missing or has fewer than :data:`MIN_DRAWS` draws.

    :param expected_cells: cells a complete row has (default: every
        calibration source times every evaluation text)
    """
    expected = expected_cells or len(CALIBRATION_SOURCES) * len(EVALUATION_TEXTS)
    if len(cells) < expected or min(cell["draws"] for cell in cells.values()) < MIN_DRAWS:
        return "incomplete"
    means = [cell["ratio"][0] for cell in cells.values()]
    clearly = sum(m + CLEARLY_BELOW * cell["ratio"][1] < 1.0
                  for m, cell in zip(means, cells.values()))
    if max(means) >= 1.0:
        return "loses somewhere"
    return "helps" if clearly > len(cells) / 2 else "mixed"


def ratio_table(rows: list[tuple[str, dict[tuple[str, str], dict[str, Any]]]],
                texts: Iterable[str] = EVALUATION_TEXTS) -> list[str]:
    """Markdown: one row per method, one column per cell, "mean ± s.e." of
    the paired ratio to the host, and the verdict."""
    texts = list(texts)
    cells = [(s, t) for s in CALIBRATION_SOURCES for t in texts]
    header = "| method | " + " | ".join(f"{s} -> {t}" for s, t in cells) + " | verdict |"
    lines = [header, "|---" * (len(cells) + 2) + "|"]
    for label, result in rows:
        values = [_cell_text(result[c]) if c in result else "-" for c in cells]
        lines.append(f"| {label} | " + " | ".join(values) + f" | {verdict(result, len(cells))} |")
    return lines


def _cell_text(cell: dict[str, Any]) -> str:
    """"mean ± s.e." of a cell's ratio, or "mean (1 draw)" where no error exists."""
    mean, error = cell["ratio"]
    if cell["draws"] < 2:
        return f"{mean:.3f} (1 draw)"
    return f"{mean:.3f} ± {error:.3f}" + ("" if cell["draws"] >= MIN_DRAWS else f" ({cell['draws']} draws)")
