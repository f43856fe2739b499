"""Render the vision benchmarks' results as Markdown tables.

:func:`torch_pruning_report` renders the channel-pruning results of ``run.py``
(``python benchmarks/vision/run.py --output FILE --report-only``);
:func:`unstructured_report` and :func:`plot_unstructured` those of
``unstructured.py`` (``python -m benchmarks.vision.unstructured --report-only``).
Every score is a mean ± standard error over calibration draws; differences
between methods are paired by draw.

Channel-pruning targets, computed from the JSON, plain and after BatchNorm
recalibration:
* trained models: MOONSHOT (default lam and objective scale) >= the best
  Torch-Pruning criterion + 2 points of top-1 at 30% and 50%;
* EfficientNet-Lite0: MOONSHOT never below the best criterion in top-1
  agreement with the dense model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

BASELINES = ("magnitude", "taylor", "hessian", "hessian_tp_accumulate", "activation")
TARGET_RATIOS = (0.3, 0.5)
TRAINED_MARGIN = 2.0  # points of top-1 over the best Torch-Pruning criterion
VARIANTS = (("", ""), ("_bn_recal", " + BN recal"))  # score suffix, row label suffix
RECAL_TOLERANCE = 1.0  # points the dense model may lose to BN recalibration before recalibrated rows are void

Stat = tuple[float, float, int]  # mean, standard error, draws


def _metric(model: str) -> tuple[str, str]:
    return ("agreement", "top-1 agreement with dense (%)") if model == "efficientnet_lite0" else ("top1", "test top-1 (%)")


def moonshot_name(objective_scale: str, lam: float) -> str:
    """The criterion name of ``MoonshotImportance(lam, objective_scale)`` in ``run.py``'s records."""
    return f"{'moonshot' if objective_scale == 'mean' else 'moonshot_median'}_lam{lam:g}"


def _default_objective_scale() -> str:
    """MoonshotImportance's default ``objective_scale`` (chosen on the validation split)."""
    import inspect

    from moonshot_plugins.torch_pruning import MoonshotImportance

    return inspect.signature(MoonshotImportance).parameters["objective_scale"].default


def _stats(values: list[float]) -> Stat | None:
    """(mean, standard error, n) of ``values``; None when empty."""
    from benchmarks.protocol import mean_and_error  # the LLM protocol's statistics (repo root on sys.path)

    return (*mean_and_error(values), len(values)) if values else None


def _cell(stat: Stat | None, digits: int = 2) -> str:
    return "-" if stat is None else f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f} ({stat[2]})"


def _verdict(stat: Stat, met: bool, void: str | None = None) -> str:
    """The target's verdict; ``void`` (why the score says nothing) overrides met and missed."""
    from benchmarks.protocol import MIN_DRAWS

    return "incomplete" if stat[2] < MIN_DRAWS else void or ("**met**" if met else "**missed**")


def _matches(record: dict, fields: dict) -> bool:
    """Every field in ``fields`` equal in ``record`` (a missing one reads as None)."""
    return all(record.get(k) == v for k, v in fields.items())


def _dense(runs: list[dict], model: str, **fields: object) -> dict:
    """``model``'s dense record (the one without a draw; ``fields`` select it), or {}."""
    return next((r for r in runs if r["model"] == model and "draw" not in r and _matches(r, fields)), {})


def _by_draw(runs: list[dict], **fields: object) -> dict[int, dict]:
    """The runs of one setting (see :func:`_matches`), by calibration draw."""
    return {r["draw"]: r for r in runs if "draw" in r and _matches(r, fields)}


def _score(runs: list[dict], score: str, **fields: object) -> Stat | None:
    """``score`` of one setting (see :func:`_by_draw`) over its draws."""
    return _stats([r[score] for r in _by_draw(runs, **fields).values() if score in r])


def _dense_text(runs: list[dict], model: str, dense: dict, score: str, digits: int, **fields: object) -> str:
    """The dense model's ``score``, and after BN recalibration on the draws (the control) where recorded."""
    control = _score(runs, score + "_bn_recal", model=model, **fields)
    return ((f", dense {dense[score]:.{digits}f}" if score in dense else "")
            + (f" ({_cell(control, digits)} after BN recal)" if control else ""))


def _recal_void(runs: list[dict], model: str, key: str, **fields: object) -> str | None:
    """Why ``model``'s BN-recalibrated targets say nothing, or None: the dense model
    itself loses more than ``RECAL_TOLERANCE`` points of ``key`` to the same recalibration
    (``fields`` select its dense records), so those rows measure the calibration images."""
    dense = _dense(runs, model, **fields)
    control = _score(runs, key + "_bn_recal", model=model, **fields)
    if control is None or key not in dense or control[0] >= dense[key] - RECAL_TOLERANCE:
        return None
    return f"void: dense after BN recal {_cell(control)}"


# -- channel pruning with Torch-Pruning (run.py) --------------------------------------

def _ratios(runs: list[dict], model: str) -> list[float]:
    return sorted({r["ratio"] for r in runs if r["model"] == model and "ratio" in r})


def _criterion_table(runs: list[dict], model: str, default: str) -> list[str]:
    """Test score per criterion and ratio (plain, then after BN recalibration), mean ± s.e. (draws)."""
    key, label = _metric(model)
    ratios = _ratios(runs, model)
    names = list(dict.fromkeys(r["criterion"] for r in runs if r["model"] == model and "ratio" in r))
    dense = _dense(runs, model, criterion="dense")
    lines = [f"### {model}: {label}" + _dense_text(runs, model, dense, key, 2, criterion="dense")
             + "; mean ± s.e. (draws)", "",
             "| criterion | " + " | ".join(f"{r:.0%}" for r in ratios) + " |", "|---" * (len(ratios) + 1) + "|"]
    for suffix, row in VARIANTS:
        for name in names:
            cells = [_score(runs, key + suffix, model=model, ratio=r, criterion=name) for r in ratios]
            if any(cells):
                shown = f"**{name} (default)**" if name == default else name
                lines.append(f"| {shown}{row} | " + " | ".join(map(_cell, cells)) + " |")
    if "params" in dense:
        kept = [_score(runs, "params", model=model, ratio=r, criterion=default) for r in ratios]
        lines += ["", "Parameters kept by the default at " + " / ".join(f"{r:.0%}" for r in ratios) + ": "
                  + " / ".join("-" if k is None else f"{k[0] / dense['params']:.0%}" for k in kept) + "."]
    return lines + [""]


def _scale_rows(runs: list[dict], model: str, lam: float) -> list[str]:
    """Validation score of objective_scale mean vs median at ``lam``, per ratio."""
    key, _ = _metric(model)
    rows = []
    for ratio in _ratios(runs, model):
        pair = [_score(runs, f"val_{key}", model=model, ratio=ratio, criterion=moonshot_name(scale, lam))
                for scale in ("mean", "median")]
        if all(pair):
            rows.append(f"| {model} | {ratio:.0%} | {_cell(pair[0])} | {_cell(pair[1])} |")
    return rows


def _tp_target_rows(runs: list[dict], model: str, default: str) -> list[str]:
    key, _ = _metric(model)
    void = _recal_void(runs, model, key, criterion="dense")
    rows = []
    for ratio in _ratios(runs, model):
        if key == "top1" and ratio not in TARGET_RATIOS:
            continue
        margin = 0.0 if key == "agreement" else TRAINED_MARGIN
        for suffix, row in VARIANTS:
            score = key + suffix
            means = {c: _score(runs, score, model=model, ratio=ratio, criterion=c) for c in BASELINES}
            means = {c: m for c, m in means.items() if m}
            ours = _by_draw(runs, model=model, ratio=ratio, criterion=default)
            if not means or not ours or score not in next(iter(ours.values())):
                continue
            best = max(means, key=lambda c: means[c][0])
            theirs = _by_draw(runs, model=model, ratio=ratio, criterion=best)
            gain = _stats([ours[d][score] - theirs[d][score] for d in sorted(ours.keys() & theirs.keys())])
            rows.append(f"| {model} | {ratio:.0%}{row} | {best} | {_cell(gain)} | >= {margin:g} | "
                        f"{_verdict(gain, gain[0] >= margin, void if suffix else None)} |")
    return rows


def torch_pruning_report(doc: dict) -> str:
    """Markdown of a ``run.py`` results file: per model the criterion table,
    the objective-scale choice on validation, then the targets."""
    runs, settings = doc["runs"], doc["settings"]
    default = moonshot_name(_default_objective_scale(), settings["default_lam"])
    codes = ", ".join(sorted({r["code"] for r in runs if "code" in r})) or "-"
    models = list(dict.fromkeys(r["model"] for r in runs))
    lines = [f"Command: `{doc['command']}`; machine: {doc['machine']}; {doc['date']}; code {codes}.", ""]
    for model in models:
        lines += _criterion_table(runs, model, default)
    scale_rows = [row for model in models for row in _scale_rows(runs, model, settings["default_lam"])]
    if scale_rows:
        lines += [f"### `objective_scale` on the validation split (lam {settings['default_lam']:g})", "",
                  "| model | ratio | mean | median |", "|---|---|---|---|", *scale_rows, ""]
    lines += ["### Targets", "", f"MOONSHOT default ({default}) minus the best Torch-Pruning criterion by mean, "
              "paired by calibration draw. A verdict needs 3 draws.", "",
              "| model | ratio | best criterion | default - it | target | verdict |", "|---|---|---|---|---|---|"]
    lines += [row for model in models for row in _tp_target_rows(runs, model, default)]
    return "\n".join(lines) + "\n"


# -- unstructured MOONSHOT (unstructured.py) ------------------------------------------

HEADLINE_SPARSITY: dict[str, float] = {"resnet18": 0.9, "vit": 0.7, "efficientnet_lite0": 0.5}
SWEEP_SPARSITY: dict[str, float] = {"resnet18": 0.7, "vit": 0.7, "efficientnet_lite0": 0.5}  # the lam sweep's
HEADLINE_MARGIN = 3.0  # points of top-1 (agreement) the default must gain over the best single objective
COST_BOUND = 1.5  # the default's prune time / lam 0's, paired by draw
LAM0, LAM1 = ("moonshot_prune", 0.0), ("moonshot_prune", 1.0)

Config = tuple[str, "float | None"]  # (method, taylor_weight)


def _draws(runs: list[dict], model: str, sparsity: float, config: Config) -> dict[int, dict]:
    """The runs of one setting, by calibration draw."""
    return _by_draw(runs, model=model, sparsity=sparsity, method=config[0], taylor_weight=config[1])


def _setting(runs: list[dict], model: str, sparsity: float, config: Config, score: str) -> Stat | None:
    """``score`` of one setting over its draws."""
    return _score(runs, score, model=model, sparsity=sparsity, method=config[0], taylor_weight=config[1])


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
    dense = _dense(runs, model, method="dense")
    lines = []
    for score, title, digits in ((key, label, 2), ("kl", "mean KL(dense || pruned), nats", 3)):
        if not any(score in r for r in runs if r["model"] == model):
            continue
        dense_text = _dense_text(runs, model, dense, score, digits, method="dense")
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
    for sparsity in [s for s in _sparsities(runs, model) if s == SWEEP_SPARSITY.get(model)]:
        configs = sorted((c for c in _configs(runs, model, default)
                          if c[0] == "moonshot_prune" and _draws(runs, model, sparsity, c)), key=lambda c: c[1])
        if len(configs) <= 3:
            continue  # lam 0, lam 1 and the default only: the sweep has not run
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


def _lam_rule(runs: list[dict], models: list[str], default: float) -> list[str]:
    """The rule for the default lam (docs/experiments.md, 2026-12-02): at each model's
    sweep setting, rank the lams by mean validation score over 3 draws (1 = best, no
    BN recalibration); the lowest sum of ranks over the complete sweeps wins, ties
    to the lam nearer 0.5; with fewer than two complete sweeps the default stays."""
    from benchmarks.protocol import MIN_DRAWS

    ranks: dict[str, dict[float, int]] = {}
    rows = []
    for model in models:
        key, _ = _metric(model)
        sparsity = SWEEP_SPARSITY[model]
        lams = sorted(c[1] for c in _configs(runs, model, default)
                      if c[0] == "moonshot_prune" and c[1] not in (0.0, 1.0))
        scores = {lam: _setting(runs, model, sparsity, ("moonshot_prune", lam), f"val_{key}") for lam in lams}
        if len(lams) < 5 or any(s is None or s[2] < MIN_DRAWS for s in scores.values()):
            continue  # the sweep is not complete at 3 draws
        order = sorted(lams, key=lambda lam: -scores[lam][0])
        ranks[model] = {lam: order.index(lam) + 1 for lam in lams}
        rows.append(f"| {model} {sparsity:.0%} | " + " | ".join(
            f"{_cell(scores[lam])} [{ranks[model][lam]}]" for lam in lams) + " |")
    if len(ranks) < 2:
        return [f"Default lam: {len(ranks)} complete sweep(s), fewer than two: lam {default:g} stays.", ""]
    lams = sorted(set.intersection(*(set(r) for r in ranks.values())))
    total = {lam: sum(r[lam] for r in ranks.values()) for lam in lams}
    chosen = min(lams, key=lambda lam: (total[lam], abs(lam - 0.5)))
    return ["### The default lam, by the rule written before the runs", "",
            "Validation score, mean ± s.e. (draws) [rank within the model], at each model's sweep setting.", "",
            "| model | " + " | ".join(f"lam {lam:g}" for lam in lams) + " |", "|---" * (len(lams) + 1) + "|",
            *rows, "| sum of ranks | " + " | ".join(str(total[lam]) for lam in lams) + " |", "",
            f"Chosen: lam {chosen:g} (the package default is {default:g}).", ""]


def _paired(runs: list[dict], model: str, sparsity: float, ours: Config, theirs: Config,
            value: Callable[[dict, dict], float]) -> Stat | None:
    """``value(ours, theirs)`` over the draws both settings ran."""
    mine, other = _draws(runs, model, sparsity, ours), _draws(runs, model, sparsity, theirs)
    return _stats([value(mine[d], other[d]) for d in sorted(mine.keys() & other.keys())])


def _target_rows(runs: list[dict], model: str, default: float) -> list[str]:
    """The issue's targets at every sparsity of ``model``, plain and after BN recalibration."""
    key, _ = _metric(model)
    ours = ("moonshot_prune", default)
    void = _recal_void(runs, model, key, method="dense")
    rows = []
    for sparsity in _sparsities(runs, model):
        for suffix, _ in VARIANTS:
            score = key + suffix
            why = void if suffix else None
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
                rows.append(f"| default >= best single + {HEADLINE_MARGIN:g} {where} {_verdict(gain, met, why)} |")
            rows.append(f"| default >= best single - 1 s.e. {where} {_verdict(gain, gain[0] >= -gain[1], why)} |")
        cost = _paired(runs, model, sparsity, ours, LAM0, lambda a, b: a["prune_seconds"] / b["prune_seconds"])
        if cost is not None:
            rows.append(f"| prune time <= {COST_BOUND:g} x lam 0 | {model} | {sparsity:.0%} | prune_seconds | "
                        f"{_label(LAM0, default)} | ratio {_cell(cost)} | {_verdict(cost, cost[0] <= COST_BOUND)} |")
    return rows


def unstructured_report(doc: dict, default: float) -> str:
    """Markdown of an ``unstructured.py`` results file: per model the score tables
    (mean ± s.e. over calibration draws), the lam choice on validation, then the
    targets, with ``default`` (``moonshot_prune``'s default lam) as MOONSHOT."""
    runs = doc["runs"]
    codes = ", ".join(sorted({r["code"] for r in runs if "code" in r})) or "-"
    lines = [f"Command: `{doc['command']}`; machine: {doc['machine']}; {doc['date']}; code {codes}.", ""]
    models = list(dict.fromkeys(r["model"] for r in runs))
    for model in models:
        lines += _model_tables(runs, model, default) + _validation_table(runs, model, default)
    lines += _lam_rule(runs, models, default)
    lines += ["### Targets", "",
              "Differences and ratios are paired by calibration draw (mean ± s.e. (draws)); best single = "
              "the better of lam 0 and lam 1 by mean. A verdict needs 3 draws.", "",
              "| target | model | sparsity | score | best single / baseline | MOONSHOT default - it | verdict |",
              "|---|---|---|---|---|---|---|"]
    lines += [row for model in models for row in _target_rows(runs, model, default)]
    return "\n".join(lines) + "\n"


def plot_unstructured(doc: dict, path: Path, default: float) -> None:
    """One panel per model: test score (%) against sparsity (%), one line per
    method (dashed: after BN recalibration), error bars = s.e. over draws. PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
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
    # one legend for all panels, below them: inside a panel it hides the curves
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes[0]), key=lambda hl: len(hl[1]))
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    legend_rows = -(-len(labels) // 4)
    fig.tight_layout(rect=(0, 0.04 + 0.05 * legend_rows, 1, 1))  # each legend row takes ~5% of the height
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
