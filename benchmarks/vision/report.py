"""Render the vision benchmarks' results as Markdown tables.

    python benchmarks/vision/report.py [path/to/results.json]

prints the channel-pruning tables of docs/results.md from
benchmarks/results/vision_torch_pruning.json (``run.py``).
:func:`unstructured_report` and :func:`plot_unstructured` render the results of
``unstructured.py`` (``python -m benchmarks.vision.unstructured --report-only``).

For the channel-pruning results, also states each target of the issue as met
or missed, computed from the JSON:
* trained models: MOONSHOT (default lam) >= best Torch-Pruning criterion + 2
  points of top-1 at 30% and 50%;
* EfficientNet-Lite0: MOONSHOT (default lam) never below the best criterion
  in top-1 agreement with the dense model.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results" / "vision_torch_pruning.json"

BASELINES = ("magnitude", "taylor", "hessian", "hessian_tp_accumulate", "activation")
TARGET_RATIOS = ("0.3", "0.5")


def _metric(model: str) -> tuple[str, str]:
    return ("agreement", "top-1 agreement with dense (%)") if model == "efficientnet_lite0" else ("top1", "test top-1 (%)")


def _moonshot_name(scale: str, lam: float) -> str:
    return f"{'moonshot' if scale == 'mean' else 'moonshot_median'}_lam{lam:g}"


def _default_objective_scale() -> str:
    """MoonshotImportance's default ``objective_scale`` (chosen on the validation split)."""
    import inspect

    from moonshot_plugins.torch_pruning import MoonshotImportance

    return inspect.signature(MoonshotImportance).parameters["objective_scale"].default


def render(data: dict) -> str:
    default = _moonshot_name(_default_objective_scale(), data["default_lam"])
    lines = []
    targets = []
    validation = []
    for model, rec in data["models"].items():
        key, label = _metric(model)
        ratios = list(rec["results"])
        criteria = list(BASELINES) + [
            _moonshot_name(scale, lam) for scale in ("mean", "median") for lam in data["lams"]
            if scale == "mean" or lam not in (0.0, 1.0)
        ]
        dense = rec["dense"][key]
        lines.append(f"### {model}: {label}, dense {dense:.2f}")
        lines.append("")
        if "training" in rec:
            t = rec["training"]
            lines.append(
                f"Trained by `benchmarks/vision/train.py --model {model}`: {t['epochs']} epochs, seed {t['seed']}, "
                f"{t['train_wall_s']} s on {t['device']}."
            )
        else:
            lines.append(
                f"Calibration: {rec['calib_images']} crops of {len(rec['calib_photos'])} photos; evaluation: "
                f"{rec['eval_images']} crops of {len(rec['eval_photos'])} other photos (scikit-image samples)."
            )
        lines.append("")
        lines.append("| criterion | " + " | ".join(f"{float(r):.0%}" for r in ratios) + " |")
        lines.append("|---|" + "---|" * len(ratios))
        for crit in criteria:
            cells = []
            for r in ratios:
                e = rec["results"][r].get(crit)
                if e is None:
                    cells.append("-")
                elif key == "agreement":
                    cells.append(f"{e[key]:.1f} (KL {e['kl']:.3f})")
                else:
                    cells.append(f"{e[key]:.2f}")
            name = f"**{crit} (default)**" if crit == default else crit
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        params = " / ".join(f"{rec['results'][r][default]['params'] / rec['params_dense']:.0%}" for r in ratios)
        lines.append("")
        lines.append(f"Parameters kept at {' / '.join(f'{float(r):.0%}' for r in ratios)}: {params}.")
        lines.append("")
        for r in ratios:
            res = rec["results"][r]
            pair = [res.get(_moonshot_name(scale, data["default_lam"]), {}).get(f"val_{key}") for scale in ("mean", "median")]
            if None not in pair:
                validation.append(f"| {model} | {float(r):.0%} | {pair[0]:.2f} | {pair[1]:.2f} |")
            best_name = max((c for c in BASELINES if c in res), key=lambda c: res[c][key])
            best, ours = res[best_name][key], res[default][key]
            if key == "agreement":
                ok = ours >= best
                targets.append(f"- {model} {float(r):.0%}: MOONSHOT {ours:.1f} vs best {best_name} {best:.1f} "
                               f"(target >= best): **{'met' if ok else 'missed'}**")
            elif r in TARGET_RATIOS:
                ok = ours >= best + 2
                targets.append(f"- {model} {float(r):.0%}: MOONSHOT {ours:.2f} vs best {best_name} {best:.2f} "
                               f"(target >= best + 2): **{'met' if ok else 'missed'}**")
    if validation:
        lines += [
            f"### Choosing `objective_scale` on the validation split (lam {data['default_lam']:g})",
            "",
            "Validation: 5000 Fashion-MNIST training images not used for calibration; for EfficientNet-Lite0, "
            "other crops of the calibration photos (agreement with dense). Neither is the test set.",
            "",
            "| model | ratio | mean | median |",
            "|---|---|---|---|",
            *validation,
            "",
        ]
    return "\n".join(lines + ["### Targets", ""] + targets) + "\n"


# -- unstructured MOONSHOT (unstructured.py) ------------------------------------------

HEADLINE_SPARSITY: dict[str, float] = {"resnet18": 0.9, "vit": 0.7, "efficientnet_lite0": 0.5}
HEADLINE_MARGIN = 3.0  # points of top-1 (agreement) the default must gain over the best single objective
COST_BOUND = 1.5  # the default's prune time / lam 0's, paired by draw
VARIANTS = (("", ""), ("_bn_recal", " + BN recal"))  # score suffix, row label suffix
LAM0, LAM1 = ("moonshot_prune", 0.0), ("moonshot_prune", 1.0)

Config = tuple[str, "float | None"]  # (method, taylor_weight)
Stat = tuple[float, float, int]  # mean, standard error, draws


def _stats(values: list[float]) -> Stat | None:
    """(mean, standard error, n) of ``values``; None when empty."""
    from benchmarks.protocol import mean_and_error  # the LLM protocol's statistics (repo root on sys.path)

    return (*mean_and_error(values), len(values)) if values else None


def _cell(stat: Stat | None, digits: int = 2) -> str:
    return "-" if stat is None else f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f} ({stat[2]})"


def _draws(runs: list[dict], model: str, sparsity: float, config: Config) -> dict[int, dict]:
    """The runs of one setting, by calibration draw."""
    return {r["draw"]: r for r in runs if r["model"] == model and r.get("sparsity") == sparsity
            and (r["method"], r.get("taylor_weight")) == config}


def _setting(runs: list[dict], model: str, sparsity: float, config: Config, score: str) -> Stat | None:
    """``score`` of one setting over its draws."""
    return _stats([r[score] for r in _draws(runs, model, sparsity, config).values() if score in r])


def _sparsities(runs: list[dict], model: str) -> list[float]:
    return sorted({r["sparsity"] for r in runs if r["model"] == model and "sparsity" in r})


def _configs(runs: list[dict], model: str, default: float) -> list[Config]:
    """Magnitude, lam 0, lam 1, the default, then the other lams: those ``runs`` hold."""
    found = {(r["method"], r.get("taylor_weight")) for r in runs if r["model"] == model and r["method"] != "dense"}
    first = [("magnitude", None), LAM0, LAM1, ("moonshot_prune", default)]
    return [c for c in first if c in found] + sorted(c for c in found if c not in first)


def _label(config: Config, default: float) -> str:
    method, lam = config
    if method == "magnitude":
        return "magnitude"
    names = {0.0: "lam 0 (reconstruction, SparseGPT)", 1.0: "lam 1 (Taylor only)",
             default: f"**MOONSHOT lam {default:g} (default)**"}
    return names.get(lam, f"lam {lam:g}")


def _model_tables(runs: list[dict], model: str, default: float) -> list[str]:
    """Test score (and KL for EfficientNet-Lite0) per method and sparsity, mean ± s.e. (draws)."""
    key, label = _metric(model)
    sparsities = _sparsities(runs, model)
    dense = next((r for r in runs if r["model"] == model and r["method"] == "dense"), {})
    lines = []
    for score, title, digits in ((key, label, 2), ("kl", "mean KL(dense || pruned), nats", 3)):
        if not any(score in r for r in runs if r["model"] == model):
            continue
        dense_text = f", dense {dense[score]:.{digits}f}" if score in dense else ""
        lines += [f"### {model}: {title}{dense_text}; mean ± s.e. (draws)", "",
                  "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
                  "|---" * (len(sparsities) + 1) + "|"]
        for config in _configs(runs, model, default):
            for suffix, row in VARIANTS:
                cells = [_setting(runs, model, s, config, score + suffix) for s in sparsities]
                if any(cells):
                    lines.append(f"| {_label(config, default)}{row} | "
                                 + " | ".join(_cell(c, digits) for c in cells) + " |")
        lines.append("")
    return lines


def _validation_table(runs: list[dict], model: str, default: float) -> list[str]:
    """Where the lam sweep ran: every lam's validation and test score; lam is chosen on validation."""
    key, _ = _metric(model)
    variants = [v for v in VARIANTS if any(f"val_{key}{v[0]}" in r for r in runs if r["model"] == model)]
    lines = []
    for sparsity in _sparsities(runs, model):
        configs = sorted((c for c in _configs(runs, model, default)
                          if c[0] == "moonshot_prune" and _draws(runs, model, sparsity, c)), key=lambda c: c[1])
        if len(configs) <= 3:
            continue  # lam 0, lam 1 and the default only: no sweep here
        columns = [f"{split}{row}" for _, row in variants for split in ("validation", "test")]
        lines += [f"### {model} at {sparsity:.0%}: choosing lam on validation (mean ± s.e. (draws))", "",
                  "| lam | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for config in configs:
            cells = [_setting(runs, model, sparsity, config, name)
                     for suffix, _ in variants for name in (f"val_{key}{suffix}", f"{key}{suffix}")]
            lines.append(f"| {_label(config, default)} | " + " | ".join(map(_cell, cells)) + " |")
        for suffix, row in variants:
            val = {c: _setting(runs, model, sparsity, c, f"val_{key}{suffix}") for c in configs}
            best = max((c for c in configs if val[c]), key=lambda c: val[c][0])
            lines.append(f"\nBest lam on validation{row}: {best[1]:g}.")
        lines.append("")
    return lines


def _paired(runs: list[dict], model: str, sparsity: float, ours: Config, theirs: Config,
            value: Callable[[dict, dict], float]) -> Stat | None:
    """``value(ours, theirs)`` over the draws both settings ran."""
    mine, other = _draws(runs, model, sparsity, ours), _draws(runs, model, sparsity, theirs)
    return _stats([value(mine[d], other[d]) for d in sorted(mine.keys() & other.keys())])


def _verdict(stat: Stat, met: bool) -> str:
    from benchmarks.protocol import MIN_DRAWS

    return "incomplete" if stat[2] < MIN_DRAWS else "**met**" if met else "**missed**"


def _target_rows(runs: list[dict], model: str, default: float) -> list[str]:
    """The issue's targets at every sparsity of ``model``, plain and after BN recalibration."""
    key, _ = _metric(model)
    ours = ("moonshot_prune", default)
    rows = []
    for sparsity in _sparsities(runs, model):
        for suffix, _ in VARIANTS:
            score = key + suffix
            singles = {c: _setting(runs, model, sparsity, c, score) for c in (LAM0, LAM1)}
            if not all(singles.values()):
                continue
            best = max(singles, key=lambda c: singles[c][0])
            gain = _paired(runs, model, sparsity, ours, best, lambda a, b: a[score] - b[score])
            if gain is None:
                continue
            where = f"| {model} | {sparsity:.0%} | {score} | {_label(best, default)} | {_cell(gain)} |"
            if sparsity == HEADLINE_SPARSITY.get(model):
                met = gain[0] >= HEADLINE_MARGIN
                rows.append(f"| default >= best single + {HEADLINE_MARGIN:g} {where} {_verdict(gain, met)} |")
            rows.append(f"| default >= best single - 1 s.e. {where} {_verdict(gain, gain[0] >= -gain[1])} |")
        cost = _paired(runs, model, sparsity, ours, LAM0, lambda a, b: a["prune_seconds"] / b["prune_seconds"])
        if cost is not None:
            rows.append(f"| prune time <= {COST_BOUND:g} x lam 0 | {model} | {sparsity:.0%} | prune_seconds | "
                        f"{_label(LAM0, default)} | ratio {_cell(cost)} | {_verdict(cost, cost[0] <= COST_BOUND)} |")
    return rows


def unstructured_report(doc: dict) -> str:
    """Markdown of an ``unstructured.py`` results file: per model the score tables
    (mean ± s.e. over calibration draws), the lam choice on validation, then the targets."""
    runs, default = doc["runs"], doc["settings"]["default_taylor_weight"]
    codes = ", ".join(sorted({r["code"] for r in runs if "code" in r})) or "-"
    lines = [f"Command: `{doc['command']}`; machine: {doc['machine']}; {doc['date']}; code {codes}.", ""]
    models = list(dict.fromkeys(r["model"] for r in runs))
    for model in models:
        lines += _model_tables(runs, model, default) + _validation_table(runs, model, default)
    lines += ["### Targets", "",
              "Differences and ratios are paired by calibration draw (mean ± s.e. (draws)); best single = "
              "the better of lam 0 and lam 1 by mean. A verdict needs 3 draws.", "",
              "| target | model | sparsity | score | best single / baseline | MOONSHOT default - it | verdict |",
              "|---|---|---|---|---|---|---|"]
    lines += [row for model in models for row in _target_rows(runs, model, default)]
    return "\n".join(lines) + "\n"


def plot_unstructured(doc: dict, path: Path) -> None:
    """One panel per model: test score (%) against sparsity (%), one line per
    method (dashed: after BN recalibration), error bars = s.e. over draws. PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, default = doc["runs"], doc["settings"]["default_taylor_weight"]
    models = list(dict.fromkeys(r["model"] for r in runs if r["method"] != "dense"))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5.5 * max(1, len(models)), 4.2), squeeze=False)
    standard = [("magnitude", None), LAM0, LAM1, ("moonshot_prune", default)]
    for ax, model in zip(axes[0], models):
        key, label = _metric(model)
        sparsities = _sparsities(runs, model)
        for color, config in enumerate(c for c in _configs(runs, model, default) if c in standard):
            for (suffix, row), style in zip(VARIANTS, ("-", "--")):
                points = [(100 * s, _setting(runs, model, s, config, key + suffix)) for s in sparsities]
                points = [(x, stat) for x, stat in points if stat]
                if points:
                    ax.errorbar([x for x, _ in points], [st[0] for _, st in points], yerr=[st[1] for _, st in points],
                                marker="o", capsize=3, linestyle=style, color=f"C{color}",
                                label=_label(config, default).strip("*") + row)
        ax.set_title(model)
        ax.set_xticks([100 * s for s in sparsities])
        ax.set_xlabel("unstructured sparsity (%)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    print(render(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
