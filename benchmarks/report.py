"""Tables and plots for docs/results.md from a benchmarks/llm.py results JSON.

    python -m benchmarks.report benchmarks/results/2026-11-22-cpu-2core.json

Only the block between the LLM markers in docs/results.md is rewritten, so
the other sections (the headline tables, vision) stay as they are. The run
notes of the JSON (which timings were not measured on a quiet machine, what
was superseded) stay in the JSON; docs/experiments.md tells that history.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "docs" / "results.md"
LLM_BLOCK = "llm-results"  # the marker name of the every-run block in docs/results.md
START, END = f"<!-- {LLM_BLOCK}:start -->", f"<!-- {LLM_BLOCK}:end -->"
TEXTS = ("persuasion", "python-tutorial")
# the code column of runs recorded before benchmarks/llm.py stored each run's commit
UNRECORDED_CODE = "before 7168533"


def options_text(options: dict[str, Any]) -> str:
    """", k=v" for each extra modifier option of a run."""
    return "".join(f", {k}={v}" for k, v in options.items())


def run_label(run: dict[str, Any]) -> str:
    """A run's row label in the results tables (its method, host, lam and options)."""
    if run["method"] in ("dense", "magnitude"):
        return run["method"]
    host = {"sparsegpt": "SparseGPT", "wanda": "Wanda"}[run["host"]]
    options = options_text(run.get("options", {}))
    if run["method"] == "host":
        return f"{host} ({options[2:]})" if options else host
    if run["lam"] == 1.0:
        return f"Taylor-only ({host}, lam=1{options})"
    return f"MOONSHOT-{host} (lam={run['lam']}, {run['fisher_mode']}{options})"


def _find(runs, **match):
    """The first run with these fields (and no extra modifier options unless asked)."""
    match.setdefault("options", None)
    for run in runs:
        if all(run.get(k) == v for k, v in match.items()):
            return run
    return None


def default_settings(host: str, sparsity: str) -> tuple[float | str, dict[str, Any]]:
    """The MOONSHOT modifier's defaults for a setting in token mode, read from
    the package: (taylor_weight, options), options holding ``row_weights`` for
    unstructured SparseGPT (the only place it can apply)."""
    from moonshot_plugins import MoonshotSparseGPTModifier, MoonshotWandaModifier

    cls = {"sparsegpt": MoonshotSparseGPTModifier, "wanda": MoonshotWandaModifier}[host]
    mask = "2:4" if sparsity == "2:4" else "0:0"
    modifier = cls(sparsity=0.5, mask_structure=mask, targets=["Linear"])
    options = {"row_weights": modifier.row_weights} if host == "sparsegpt" and mask == "0:0" else {}
    return modifier.taylor_weight, options


def is_default_run(run: dict[str, Any]) -> bool:
    """Whether a run is MOONSHOT at its modifier's defaults (:func:`default_settings`, token mode)."""
    return (run["method"] == "moonshot" and run.get("fisher_mode") == "token"
            and (run["lam"], run.get("options", {})) == default_settings(run["host"], run["sparsity"]))


def cost_pairs(cost_runs: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[dict, dict]]:
    """(sparsity, host) -> the last adjacent (host run, MOONSHOT run at the
    current defaults) pair of a ``--plan cost`` results list."""
    pairs = {}
    for base, mine in zip(cost_runs, cost_runs[1:]):
        setting = (base["sparsity"], base["host"])
        if (base["method"], mine["method"]) != ("host", "moonshot") or (
            mine["sparsity"], mine["host"]) != setting:
            continue  # not a pair (e.g. one pair's MOONSHOT run and the next pair's host)
        if is_default_run(mine):
            pairs[setting] = (base, mine)
    return pairs


def _targets(runs: list[dict[str, Any]], unpaired: list[str] = (),
             cost_runs: list[dict[str, Any]] | None = None) -> list[str]:
    """One line per target of the benchmark issue: met/missed with the ratio.

    The targets are judged at each modifier's defaults (:func:`default_settings`);
    "Taylor-only" is the best lam=1 run of the host in token mode (with and
    without row weights, where both ran).

    :param unpaired: "<sparsity> <host>" settings whose host and MOONSHOT runs
        did not run under the same machine load (their time ratio is not a
        measurement and is reported as such)
    :param cost_runs: the runs of a ``--plan cost`` file (fresh adjacent pairs);
        when given, the time and memory targets are judged on its pairs
        instead of on ``runs``
    """
    return [*_quality_target_lines(runs), *_first_default_lines(runs),
            *_cost_target_lines(runs, unpaired, cost_runs)]


def _default_pair(runs: list[dict[str, Any]], host: str, sparsity: str) -> tuple[dict | None, dict | None]:
    """The setting's first host run and first MOONSHOT run at the modifier's
    defaults (:func:`is_default_run`); None where absent."""
    return (_find(runs, method="host", host=host, sparsity=sparsity),
            next((run for run in runs if run["host"] == host and run["sparsity"] == sparsity
                  and is_default_run(run)), None))


def _quality_target_lines(runs: list[dict[str, Any]]) -> list[str]:
    """2:4 against each host's bound; unstructured against min(host, Taylor-only)."""
    lines = []
    for host, bound in (("sparsegpt", 0.80), ("wanda", 0.75)):
        base, mine = _default_pair(runs, host, "2:4")
        if base and mine:
            for text in TEXTS:
                ratio = mine[f"ppl_{text}"] / base[f"ppl_{text}"]
                verdict = "met" if ratio <= bound else "missed"
                lines.append(f"| 2:4 {host} ppl ratio, {text} | <= {bound} | {ratio:.3f} | {verdict} |")
    for sp in ("0.5", "0.6", "0.7"):
        for host in ("sparsegpt", "wanda"):
            base, mine = _default_pair(runs, host, sp)
            if not (base and mine):
                continue
            for text in TEXTS:
                taylor = min((r[f"ppl_{text}"] for r in runs if r["method"] == "moonshot" and r["host"] == host
                              and r["sparsity"] == sp and r["lam"] == 1.0 and r["fisher_mode"] == "token"),
                             default=None)
                if taylor is None:
                    continue
                ratio = mine[f"ppl_{text}"] / min(base[f"ppl_{text}"], taylor)
                verdict = "met" if ratio <= 1.0 else "missed"
                lines.append(f"| {sp} {host} vs min(host, Taylor-only), {text} | <= 1.0 | {ratio:.3f} | {verdict} |")
    return lines


def _first_default_lines(runs: list[dict[str, Any]]) -> list[str]:
    """SparseGPT at the first default (fixed lam 0.5, no row weights) against the host."""
    lines = []
    for sp in ("2:4", "0.5", "0.6", "0.7"):
        base = _find(runs, method="host", host="sparsegpt", sparsity=sp)
        options = {"row_weights": False} if sp != "2:4" else None
        fixed = _find(runs, method="moonshot", host="sparsegpt", sparsity=sp, lam=0.5,
                      fisher_mode="token", options=options)
        if base and fixed:
            for text in TEXTS:
                ratio = fixed[f"ppl_{text}"] / base[f"ppl_{text}"]
                lines.append(f"| {sp} sparsegpt fixed lam=0.5, no row weights (the first default) vs host, {text} | - | {ratio:.3f} | informative |")
    return lines


def _cost_target_lines(runs: list[dict[str, Any]], unpaired: list[str],
                       cost_runs: list[dict[str, Any]] | None) -> list[str]:
    """Time <= 1.5x and peak RSS <= 1.3x the host, on the cost file's pairs when given."""
    lines = []
    pairs = cost_pairs(cost_runs) if cost_runs is not None else {}
    for sp in ("2:4", "0.5", "0.6", "0.7"):
        for host in ("sparsegpt", "wanda"):
            if cost_runs is not None:
                base, mine = pairs.get((sp, host), (None, None))
            else:
                base, mine = _default_pair(runs, host, sp)
            if not (base and mine):
                continue
            for key, bound_cost in (("prune_seconds", 1.5), ("peak_rss_mb", 1.3)):
                ratio = mine[key] / base[key]
                verdict = "met" if ratio <= bound_cost else "missed"
                if key == "prune_seconds" and cost_runs is None and f"{sp} {host}" in unpaired:
                    verdict = "not a measurement: runs not under the same load (see notes)"
                where = " (cost plan pair)" if cost_runs is not None else ""
                lines.append(f"| {sp} {host} {key} ratio{where} | <= {bound_cost} | {ratio:.2f} | {verdict} |")
    return lines


def _plots(runs: list[dict[str, Any]], stem: str) -> list[str]:
    """The report's plots, written to docs/<stem>-*.png; their file names."""
    try:
        import matplotlib
    except ImportError as exc:
        from moonshot_plugins.assets import DEMO_EXTRA_INSTALL

        raise ImportError(f"the report's plots need matplotlib, part of the demo extra: {DEMO_EXTRA_INSTALL}") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = [_lam_plot(plt, runs, stem)]
    if len({r["sparsity"] for r in runs} & {"0.5", "0.6", "0.7"}) >= 2:  # a curve needs two
        images.append(_sparsity_plot(plt, runs, stem))
    return images


def _lam_plot(plt: Any, runs: list[dict[str, Any]], stem: str) -> str:
    """Persuasion perplexity against lam at 2:4 and 60%, per host; the file's name."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, sp in zip(axes, ("2:4", "0.6")):
        for host, color in (("sparsegpt", "tab:blue"), ("wanda", "tab:orange")):
            pts = sorted(
                (r["lam"], r["ppl_persuasion"])
                for r in runs
                if r["method"] == "moonshot" and r["host"] == host and r["sparsity"] == sp
                and r["fisher_mode"] == "token" and r["lam"] != "auto"
                # the sweep's own runs: row-shared objective (row weights are not a lam)
                and not r.get("options", {}).get("row_weights")
            )
            base = _find(runs, method="host", host=host, sparsity=sp)
            if base:
                pts = sorted(pts + [(0.0, base["ppl_persuasion"])])
            if pts:
                rows = " (row_weights off)" if host == "sparsegpt" and sp != "2:4" else ""
                ax.plot(*zip(*pts), "o-", color=color, label=host + rows)
        ax.set_title(f"SmolLM2-135M, {'2:4' if sp == '2:4' else f'{float(sp):.0%} unstructured'}")
        ax.set_xlabel("taylor_weight (lam)")
        ax.set_ylabel("perplexity, Persuasion")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    path = ROOT / "docs" / f"{stem}-lam.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _sparsity_plot(plt: Any, runs: list[dict[str, Any]], stem: str) -> str:
    """Persuasion perplexity against unstructured sparsity, per method; the file's name."""
    fig, ax = plt.subplots(figsize=(6, 4))
    order = {"2:4": 0.5, "0.5": 0.5, "0.6": 0.6, "0.7": 0.7}
    labels = sorted({run_label(r) for r in runs if r["method"] != "dense" and r["sparsity"] != "2:4"
                     and (r["lam"] in (None, 0.5, 1.0, "auto"))})
    colors = plt.get_cmap("tab20").colors
    for index, label in enumerate(labels):
        pts = sorted(
            (order[r["sparsity"]], r["ppl_persuasion"])
            for r in runs if run_label(r) == label and r["sparsity"] != "2:4"
        )
        # one line style per host, so eleven lines stay tellable apart
        style = ":" if label == "magnitude" else "--" if "Wanda" in label else "-"
        if len(pts) > 1:
            ax.plot(*zip(*pts), marker="o", linestyle=style, color=colors[index % 20], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("unstructured sparsity")
    ax.set_ylabel("perplexity, Persuasion (log)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = ROOT / "docs" / f"{stem}-sparsity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in settings.items())


def write_llm_report(results_json: pathlib.Path) -> None:
    """Rewrite the LLM block of docs/results.md from ``results_json`` (a
    ``benchmarks/llm.py`` results file), plots included."""
    doc = json.loads(pathlib.Path(results_json).read_text())
    runs = doc["runs"]
    rel = pathlib.Path(results_json).resolve().relative_to(ROOT)
    cost_runs, cost_note = None, []
    if doc.get("cost_results"):  # a --plan cost file next to this one: the paired cost targets
        cost_json = pathlib.Path(results_json).resolve().parent / doc["cost_results"]
        cost_doc = json.loads(cost_json.read_text())
        cost_runs = cost_doc["runs"]
        cost_rel = cost_json.relative_to(ROOT)
        cost_note = [f"- time and memory targets: fresh adjacent host / MOONSHOT pairs of "
                     f"`python -m benchmarks.llm --plan cost` ([`{cost_rel}`](../{cost_rel}); its "
                     "command and notes give each invocation); the seconds and RSS in the table "
                     "below are each run's own, not all paired"]
    lines = [
        "## SmolLM2-135M: every run (LLM Compressor hosts)",
        "",
        "Every run of the benchmark (lam sweep, Taylor-only, sample mode, magnitude pruning included), "
        "the targets of the benchmark issue judged at the package defaults, and two plots; one "
        "calibration draw per row. This block is generated from the results file by "
        f"`python -m benchmarks.report {rel}`.",
        "",
        f"- command: `{doc['command']}`",
        f"- machine: {doc['machine']}",
        f"- date: {doc['date']} (the first run; the code column is the commit each row measured); "
        f"raw results: [`{rel}`](../{rel})",
        f"- settings: {_settings_text(doc['settings'])} (calibration: Emma + Pride and Prejudice + "
        "Sense and Sensibility; evaluation: Persuasion and the Python 3.11 tutorial, disjoint from calibration)",
        "- prune seconds and peak RSS are of the pruning step alone, each run in its own process; "
        "rows did not all run on a quiet machine, so compare costs on the paired target lines below "
        "(the JSON's `notes` say which rows' seconds are not measurements)",
        *cost_note,
        "",
        "| sparsity | method | ppl Persuasion | ppl Python tutorial | prune s | peak RSS MB | code |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        sp = "dense" if run["sparsity"] == "0" else ("2:4" if run["sparsity"] == "2:4" else f"{float(run['sparsity']):.0%}")
        lines.append(
            f"| {sp} | {run_label(run)} | {run['ppl_persuasion']:.2f} | {run['ppl_python-tutorial']:.2f} "
            f"| {run['prune_seconds']:.1f} | {run['peak_rss_mb']:.0f} | {run.get('code', UNRECORDED_CODE)} |"
        )
    targets = _targets(runs, doc.get("unpaired_timing", []), cost_runs)
    if targets:
        at = "; ".join(
            f"{host} {sp}: lam={lam}{options_text(options)}"
            for host in ("sparsegpt", "wanda") for sp, (lam, options) in
            (("2:4", default_settings(host, "2:4")), ("unstructured", default_settings(host, "0.5")))
        )
        lines += ["", f"### Targets (at the modifiers' defaults: {at})", "", "| target | bound | measured | verdict |",
                  "| --- | --- | --- | --- |", *targets]
    if len(runs) > 3:
        lines.append("")
        for image in _plots(runs, pathlib.Path(results_json).stem):
            lines.append(f"![{image}]({image})")
    write_block(RESULTS_MD, LLM_BLOCK, "\n".join(lines))


def write_block(page: pathlib.Path, name: str, text: str) -> None:
    """Put ``text`` into the Markdown ``page`` between ``<!-- name:start -->`` and
    ``<!-- name:end -->``, replacing what was there; appended as a new block when
    the markers are absent (a missing page starts as "# Results")."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    page_text = page.read_text() if page.exists() else "# Results\n\n"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in page_text and end in page_text:
        head, rest = page_text.split(start, 1)
        page_text = head + block + rest.split(end, 1)[1]
    else:
        page_text = page_text.rstrip("\n") + "\n\n" + block + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(page_text)


def print_cost_pairs(runs: list[dict[str, Any]]) -> None:
    """MOONSHOT / host ratios of time, peak RSS and peak anonymous memory, per
    setting's last adjacent pair (the pairs the report judges)."""
    for base, ours in cost_pairs(runs).values():
        ratios = {key: round(ours[key] / base[key], 2)
                  for key in ("prune_seconds", "peak_rss_mb", "peak_anonymous_mb") if key in base}
        print(f"{base['sparsity']:>4} {base['host']:9} host {base['prune_seconds']:.1f} s -> "
              f"MOONSHOT {ours['prune_seconds']:.1f} s; ratios {ratios}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("results_json", type=pathlib.Path, help="a benchmarks/llm.py results JSON")
    write_llm_report(parser.parse_args(argv).results_json)
    print(f"rewrote the LLM block of {RESULTS_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
