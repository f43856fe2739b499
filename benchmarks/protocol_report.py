"""The protocol's section of docs/results.md: paired ratio tables per results file.

``python -m benchmarks.llm --plan defaults|solver`` prints these tables and,
at the protocol's own settings, writes them between the protocol markers of
docs/results.md, one section per results file. Each table pairs every
configuration draw by draw with a baseline of the same (calibration source,
draw): the host, the host at equal damping, or the same weight update at lam
0 or 1 (:mod:`benchmarks.protocol` holds the pairing and the verdicts).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

from benchmarks.protocol import CLEARLY_BELOW, METHOD_KEYS, is_host, paired_ratios, ratio_table
from benchmarks.report import ROOT, is_default_run, options_text, run_label

PROTOCOL_START, PROTOCOL_END = "<!-- protocol:start -->", "<!-- protocol:end -->"


def write_protocol_block(doc: dict[str, Any], output: pathlib.Path, tables: list[str]) -> None:
    """Put the protocol tables of a results file into docs/results.md, between
    the protocol markers, as that file's own section (with its command,
    machine, dates and commits). Sections of other results files are kept, so
    each host or setting can live in its own file."""
    runs = [r for r in doc["runs"] if "calib_source" in r]
    codes = ", ".join(sorted({r.get("code", "?") for r in runs}))
    # runs without a date of their own ran on the file's date (its first run's)
    days = sorted({r.get("date", doc["date"]) for r in runs} | {doc["date"]})
    dates = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"
    settings = doc["settings"]
    section = [
        f"<!-- results:{output.name} -->",
        f"Evaluation texts: the first {settings['eval_tokens']} tokens, context {settings['context']}; "
        f"{settings['calib_samples']} x {settings['seq_len']} calibration tokens. "
        f"Command: `{doc['command']}` ([raw results]({os.path.relpath(output, ROOT / 'docs')})); "
        f"machine: {doc['machine']}; {dates}; code {codes}.",
        *tables,
        f"<!-- results:{output.name}:end -->",
    ]
    header = [
        "## The evaluation protocol: ratio to the host over calibration draws",
        "",
        "Each cell: mean ± standard error over calibration draws (seeds 0, 1, 2) of the "
        "perplexity ratio to the host run on the same draw; rows: calibration source -> "
        f"evaluation text. Verdict: *helps* = mean below 1 in every cell and mean + "
        f"{CLEARLY_BELOW:g} s.e. below 1 in more than half; *mixed* = below 1 everywhere but "
        "not clearly; *loses somewhere* = a mean at or above 1. A row with fewer than 3 draws "
        "per cell is incomplete.",
    ]
    page = ROOT / "docs" / "results.md"
    before, rest = page.read_text().split(PROTOCOL_START)
    block, after = rest.split(PROTOCOL_END)
    sections = protocol_sections(block)
    sections[output.name] = "\n".join(section)
    body = "\n\n".join(["\n".join(header), *sections.values()])
    page.write_text(before + PROTOCOL_START + "\n" + body + "\n" + PROTOCOL_END + after)


def protocol_sections(block: str) -> dict[str, str]:
    """The results files' sections of a protocol block, by file name, in page order."""
    found = re.finditer(r"<!-- results:(\S+) -->\n.*?<!-- results:\1:end -->", block, flags=re.DOTALL)
    return {match.group(1): match.group(0) for match in found}


def protocol_tables(runs: list[dict[str, Any]], texts: tuple[str, ...]) -> list[str]:
    """One markdown table per (sparsity, host): every configuration's paired
    ratio to the host per (calibration source, text) cell, mean ± s.e."""
    lines = []
    runs = [r for r in runs if "calib_source" in r]
    for sparsity, host in dict.fromkeys((r["sparsity"], r["host"]) for r in runs if r["method"] == "host"):
        setting = [r for r in runs if r["sparsity"] == sparsity and r["host"] in (host, None)]
        configs = dict.fromkeys(_config(r) for r in setting if r["method"] != "dense" and not is_host(r))
        rows = [(run_label(json.loads(c)), paired_ratios(setting, lambda r, c=c: _config(r) == c, texts)) for c in configs]
        lines += [f"\n{sparsity} {host}: ratio to the host, mean ± s.e. over draws", *ratio_table(rows, texts)]
        lines += _baseline_table(setting, configs, texts, f"{sparsity} {host}: MOONSHOT at equal damping "
                                 "(ratio to the host at the same dampening_frac)", _equal_damping_pair)
        lines += _baseline_table(setting, configs, texts, f"{sparsity} {host}: the Taylor term at equal solver "
                                 "(ratio to the same weight update at lam 0)", _single_objective_pair(0.0))
        lines += _baseline_table(setting, configs, texts, f"{sparsity} {host}: the reconstruction term at equal "
                                 "solver (ratio to the same weight update at lam 1, Taylor-only)",
                                 _single_objective_pair(1.0))
        lines += _baseline_table(setting, configs, texts, f"{sparsity} {host}: the default against each single "
                                 "objective run (ratio of the modifier's defaults to a run at lam 0 or 1)",
                                 _default_against_single_objectives(configs))
    return lines


Pairing = Callable[[dict[str, Any]], list[tuple[str, dict[str, Any]]]]


def _equal_damping_pair(mine: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A MOONSHOT configuration with a ``dampening_frac``, against the host run
    at that ``dampening_frac``: [(row label, baseline configuration)]."""
    damping = mine.get("options", {}).get("dampening_frac")
    if mine["method"] != "moonshot" or damping is None:
        return []
    return [(run_label(mine), {**mine, "method": "host", "lam": None, "options": {"dampening_frac": damping}})]


def _single_objective_pair(lam: float) -> Pairing:
    """Pairs a MOONSHOT run at a mixed lam with the same weight update (the
    host's own when none is set) at ``lam`` (0: reconstruction only, 1:
    Taylor only), i.e. on the same solver. The host's update at lam 0 is the
    host itself, the main table's baseline."""

    def pair(mine: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if mine["method"] != "moonshot" or mine["lam"] in (0.0, 1.0):
            return []
        return [(f"{_solver_text(mine)}: lam={mine['lam']} / lam={lam:g}", {**mine, "lam": lam})]

    return pair


def _default_against_single_objectives(configs) -> Pairing:
    """Pairs the run at the modifier's defaults with every MOONSHOT run of the
    setting at lam 0 or 1: the never-worse target's comparisons besides the host."""
    single = [json.loads(c) for c in configs]
    single = [c for c in single if c["method"] == "moonshot" and c["lam"] in (0.0, 1.0)]

    def pairs(mine: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if not is_default_run(mine):
            return []
        return [(f"default / {_solver_text(c)}, lam={c['lam']:g}", c) for c in single]

    return pairs


def _solver_text(run: dict[str, Any]) -> str:
    """A MOONSHOT run's weight update ("host" when none is set) and other options, as row text."""
    options = dict(run.get("options", {}))
    update = options.pop("weight_update", "host")
    return f"weight_update={update}{options_text(options)}"


def _baseline_table(setting: list[dict[str, Any]], configs, texts: tuple[str, ...], title: str,
                    pairing: Pairing) -> list[str]:
    """Each configuration against the baselines ``pairing`` maps it to
    ([(label, baseline configuration)]), draw by draw, where the setting
    holds the baseline; no table when none is."""
    rows = []
    for config in configs:
        for label, baseline_run in pairing(json.loads(config)):
            baseline = _config(baseline_run)
            if baseline not in configs:
                continue
            cells = paired_ratios(setting, lambda r, c=config: _config(r) == c, texts,
                                  baseline=lambda r, c=baseline: _config(r) == c)
            rows.append((label, cells))
    return [f"\n{title}", *ratio_table(rows, texts)] if rows else []


def _config(run: dict[str, Any]) -> str:
    """A run's method configuration (everything but calibration source and draw), as JSON."""
    return json.dumps({k: run[k] for k in METHOD_KEYS if k in run}, sort_keys=True)
