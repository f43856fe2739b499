"""Render benchmarks/results/vision_torch_pruning.json as the Markdown tables of docs/results.md.

    python benchmarks/vision/report.py [path/to/results.json]

Also states each target of the issue as met or missed, computed from the JSON:
* trained models: MOONSHOT (default lam) >= best Torch-Pruning criterion + 2
  points of top-1 at 30% and 50%;
* EfficientNet-Lite0: MOONSHOT (default lam) never below the best criterion
  in top-1 agreement with the dense model.
"""

from __future__ import annotations

import json
import sys
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


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    print(render(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
