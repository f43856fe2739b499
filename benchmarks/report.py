"""Tables and plots for docs/results.md from a benchmarks/llm.py results JSON.

Only the block between the LLM markers in docs/results.md is rewritten, so
other sections (vision) stay as they are.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "docs" / "results.md"
START, END = "<!-- llm-results:start -->", "<!-- llm-results:end -->"
TEXTS = ("persuasion", "python-tutorial")


def _label(run: dict[str, Any]) -> str:
    if run["method"] in ("dense", "magnitude"):
        return run["method"]
    host = {"sparsegpt": "SparseGPT", "wanda": "Wanda"}[run["host"]]
    if run["method"] == "host":
        return host
    if run["lam"] == 1.0:
        return f"Taylor-only ({host}, lam=1)"
    return f"MOONSHOT-{host} (lam={run['lam']}, {run['fisher_mode']})"


def _find(runs, **match):
    for run in runs:
        if all(run.get(k) == v for k, v in match.items()):
            return run
    return None


def _targets(runs: list[dict[str, Any]], default_lam: float, unpaired: list[str] = ()) -> list[str]:
    """One line per target of the benchmark issue: met/missed with the ratio.

    :param unpaired: "<sparsity> <host>" settings whose host and MOONSHOT runs
        did not run under the same machine load (their time ratio is not a
        measurement and is reported as such)
    """
    lines = []
    for host, bound in (("sparsegpt", 0.80), ("wanda", 0.75)):
        base = _find(runs, method="host", host=host, sparsity="2:4")
        ours = _find(runs, method="moonshot", host=host, sparsity="2:4", lam=default_lam, fisher_mode="token")
        if base and ours:
            for text in TEXTS:
                ratio = ours[f"ppl_{text}"] / base[f"ppl_{text}"]
                verdict = "met" if ratio <= bound else "missed"
                lines.append(f"| 2:4 {host} ppl ratio, {text} | <= {bound} | {ratio:.3f} | {verdict} |")
    for sp in ("0.5", "0.6", "0.7"):
        for host in ("sparsegpt", "wanda"):
            base = _find(runs, method="host", host=host, sparsity=sp)
            taylor = _find(runs, method="moonshot", host=host, sparsity=sp, lam=1.0)
            ours = _find(runs, method="moonshot", host=host, sparsity=sp, lam=default_lam, fisher_mode="token")
            if base and taylor and ours:
                for text in TEXTS:
                    best = min(base[f"ppl_{text}"], taylor[f"ppl_{text}"])
                    ratio = ours[f"ppl_{text}"] / best
                    verdict = "met" if ratio <= 1.0 else "missed"
                    lines.append(f"| {sp} {host} vs min(host, Taylor-only), {text} | <= 1.0 | {ratio:.3f} | {verdict} |")
    for sp in ("2:4", "0.5", "0.6", "0.7"):
        base = _find(runs, method="host", host="sparsegpt", sparsity=sp)
        fixed = _find(runs, method="moonshot", host="sparsegpt", sparsity=sp, lam=default_lam, fisher_mode="token")
        auto = _find(runs, method="moonshot", host="sparsegpt", sparsity=sp, lam="auto")
        if base and auto:
            for text in TEXTS:
                ratio = auto[f"ppl_{text}"] / base[f"ppl_{text}"]
                versus = f", fixed lam={default_lam}: {fixed[f'ppl_{text}'] / base[f'ppl_{text}']:.3f}" if fixed else ""
                lines.append(f"| {sp} sparsegpt taylor_weight=auto vs host, {text} | (rule) | {ratio:.3f}{versus} | informative |")
    for sp in ("2:4", "0.5", "0.6", "0.7"):
        for host in ("sparsegpt", "wanda"):
            base = _find(runs, method="host", host=host, sparsity=sp)
            ours = _find(runs, method="moonshot", host=host, sparsity=sp, lam=default_lam, fisher_mode="token")
            if not (base and ours):
                continue
            for key, bound_cost in (("prune_seconds", 1.5), ("peak_rss_mb", 1.3)):
                ratio = ours[key] / base[key]
                verdict = "met" if ratio <= bound_cost else "missed"
                if key == "prune_seconds" and f"{sp} {host}" in unpaired:
                    verdict = "not a measurement: runs not under the same load (see notes)"
                lines.append(f"| {sp} {host} {key} ratio | <= {bound_cost} | {ratio:.2f} | {verdict} |")
    return lines


def _plots(runs: list[dict[str, Any]], stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, sp in zip(axes, ("2:4", "0.6")):
        for host, color in (("sparsegpt", "tab:blue"), ("wanda", "tab:orange")):
            pts = sorted(
                (r["lam"], r["ppl_persuasion"])
                for r in runs
                if r["method"] == "moonshot" and r["host"] == host and r["sparsity"] == sp
                and r["fisher_mode"] == "token" and r["lam"] != "auto"
            )
            base = _find(runs, method="host", host=host, sparsity=sp)
            if base:
                pts = sorted(pts + [(0.0, base["ppl_persuasion"])])
            if pts:
                ax.plot(*zip(*pts), "o-", color=color, label=host)
        ax.set_title(f"SmolLM2-135M, {'2:4' if sp == '2:4' else f'{float(sp):.0%} unstructured'}")
        ax.set_xlabel("taylor_weight (lam)")
        ax.set_ylabel("perplexity, Persuasion")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    path = ROOT / "docs" / f"{stem}-lam.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    images.append(path.name)

    if len({r["sparsity"] for r in runs} & {"0.5", "0.6", "0.7"}) < 2:
        return images  # a curve needs two unstructured sparsities
    fig, ax = plt.subplots(figsize=(6, 4))
    order = {"2:4": 0.5, "0.5": 0.5, "0.6": 0.6, "0.7": 0.7}
    labels = sorted({_label(r) for r in runs if r["method"] != "dense" and r["sparsity"] != "2:4"
                     and (r["lam"] in (None, 0.5, 1.0))})
    for label in labels:
        pts = sorted(
            (order[r["sparsity"]], r["ppl_persuasion"])
            for r in runs if _label(r) == label and r["sparsity"] != "2:4"
        )
        if len(pts) > 1:
            ax.plot(*zip(*pts), "o-", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("unstructured sparsity")
    ax.set_ylabel("perplexity, Persuasion (log)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = ROOT / "docs" / f"{stem}-sparsity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    images.append(path.name)
    return images


def write_llm_report(results_json: pathlib.Path, default_lam: float = 0.5) -> None:
    doc = json.loads(pathlib.Path(results_json).read_text())
    runs = doc["runs"]
    rel = pathlib.Path(results_json).resolve().relative_to(ROOT)
    lines = [
        START,
        "## LLM: SmolLM2-135M (LLM Compressor hosts)",
        "",
        f"- command: `{doc['command']}`",
        f"- machine: {doc['machine']}",
        f"- date: {doc['date']}; raw results: [`{rel}`](../{rel})",
        f"- settings: {doc['settings']} (calibration: Emma + Pride and Prejudice + Sense and Sensibility; "
        "evaluation: Persuasion and the Python 3.11 tutorial, disjoint from calibration)",
        "- prune seconds and peak RSS are of the pruning step alone, each run in its own process.",
        *[f"- note: {note}" for note in doc.get("notes", [])],
        "",
        "| sparsity | method | ppl Persuasion | ppl Python tutorial | prune s | peak RSS MB | code |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        sp = "dense" if run["sparsity"] == "0" else ("2:4" if run["sparsity"] == "2:4" else f"{float(run['sparsity']):.0%}")
        lines.append(
            f"| {sp} | {_label(run)} | {run['ppl_persuasion']:.2f} | {run['ppl_python-tutorial']:.2f} "
            f"| {run['prune_seconds']:.1f} | {run['peak_rss_mb']:.0f} | {run.get('code', 'session 1')} |"
        )
    targets = _targets(runs, default_lam, doc.get("unpaired_timing", []))
    if targets:
        lines += ["", f"### Targets (default lam = {default_lam})", "", "| target | bound | measured | verdict |",
                  "| --- | --- | --- | --- |", *targets]
    if len(runs) > 3:
        lines.append("")
        for image in _plots(runs, pathlib.Path(results_json).stem):
            lines.append(f"![{image}]({image})")
    lines.append(END)
    block = "\n".join(lines)

    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Results\n\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_MD.write_text(text)
