"""Unstructured MOONSHOT on vision models: magnitude, lam 0, lam 1, the default and a lam sweep.

    python -m benchmarks.vision.unstructured                        # the whole plan, resumable
    python -m benchmarks.vision.unstructured --model vit --sparsity 0.7
    python -m benchmarks.vision.unstructured --report-only          # tables and plot of --output

Models: the Fashion-MNIST ResNet-18 and ViT trained by ``benchmarks/vision/train.py``
(run it first: ``python benchmarks/vision/train.py --model resnet18`` and
``--model vit``) at 50/70/90% sparsity, and EfficientNet-Lite0 with its ImageNet
weights at 30/50/70%. Every run prunes a fresh copy of the dense model with
:func:`moonshot_plugins.vision.moonshot_prune` (unstructured, ``fisher_mode="token"``,
``loss="labels"``, ``weight_update="host"``: the same SparseGPT solver for every lam)
or with per-layer magnitude; no fine-tuning follows. Methods:

* ``magnitude``: each layer's ``int(numel x sparsity)`` smallest |w| set to zero, on
  the layers ``moonshot_prune`` prunes (same targets, ``ignore`` and skipped
  grouped convolutions);
* ``reconstruction``: lam 0, SparseGPT exactly; ``taylor``: lam 1, Taylor only;
* ``moonshot``: lam = ``DEFAULT_VISION_TAYLOR_WEIGHT`` (recorded as a number);
* ``sweep``: the other lams of 0.1, 0.25, 0.5, 0.75, 0.9 at 70% (Fashion-MNIST) or 50%
  (EfficientNet-Lite0).

Every model keeps its input stem and classifier dense (``IGNORE``), for every
method alike. Each pruned model is scored, then its BatchNorm statistics are
re-estimated with :func:`~moonshot_plugins.vision.recalibrate_batchnorm` on the
run's own calibration images (training side, never test) and it is scored again
(``*_bn_recal``; models without BatchNorm, the ViT, have none): one prune, two scores.
The dense model recalibrated on each draw is the control: where it loses score
itself, the recalibrated rows measure the calibration images, not the pruning.

Data (``vision_data.py``, shared with ``run.py``). Fashion-MNIST: validation =
``--val-images`` training images (a fixed permutation, seed 0); calibration draw
d = ``--calib-images`` other training images chosen with seed d; test = the 10k
test set (``top1``). EfficientNet-Lite0 (no labelled ImageNet images ship in any
package): crops of scikit-image photos; calibration draw d = crops of the
calibration photos with seed 1000 + d, labelled by the dense model; validation =
other crops of those photos (seed 2); test = crops of other photos (seed 1).
Scores: top-1 agreement with the dense model and mean KL(dense || pruned).
Choices (the lam sweep) are read on validation, never on test.

Each run records its scores, ``prune_seconds`` (the pruning call only), the
measured sparsity and the code commit. The JSON is rewritten atomically after
every run; a rerun skips the runs already recorded with the same settings. Order:
per model, the headline sparsity's lam 0 / lam 1 / default over every draw first,
then the rest draw by draw. Tables, targets and the plot: ``report.py``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import pathlib
import sys
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

VISION_DIR = pathlib.Path(__file__).resolve().parent
if str(VISION_DIR) not in sys.path:
    sys.path.insert(0, str(VISION_DIR))  # models.py imports assets.py as a top-level module
from models import MODEL_NAMES, load_trained  # noqa: E402
from report import (  # noqa: E402
    HEADLINE_SPARSITY, SWEEP_SPARSITY, plot_unstructured, unstructured_report,
)
from vision_data import (  # noqa: E402
    EFFICIENTNET, EFFICIENTNET_BATCH, FASHION_MNIST_BATCH, ModelData, dense_recalibrated_scores, model_data,
    recalibrated_scores,
)

from benchmarks.llm import run_key  # noqa: E402
from benchmarks.provenance import code_version, machine_description, write_atomically  # noqa: E402
from benchmarks.report import write_block  # noqa: E402
from moonshot_plugins.vision import DEFAULT_VISION_TAYLOR_WEIGHT, moonshot_prune  # noqa: E402
from moonshot_plugins.vision.layers import DEFAULT_TARGETS, select_layers  # noqa: E402

ROOT = VISION_DIR.parents[1]
MODELS: tuple[str, ...] = (*MODEL_NAMES, EFFICIENTNET)
SPARSITIES: dict[str, tuple[float, ...]] = {
    "resnet18": (0.5, 0.7, 0.9), "vit": (0.5, 0.7, 0.9), EFFICIENTNET: (0.3, 0.5, 0.7)}
# the candidates of the default lam (docs/experiments.md, 2026-12-02); the sweep runs those that are not the default
LAM_CANDIDATES: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
SWEEP_LAMS: tuple[float, ...] = tuple(lam for lam in LAM_CANDIDATES if lam != DEFAULT_VISION_TAYLOR_WEIGHT)
# the single-lam methods, in the order a setting runs them
LAM_METHODS: dict[str, float] = {"reconstruction": 0.0, "taylor": 1.0, "moonshot": DEFAULT_VISION_TAYLOR_WEIGHT}
METHODS: tuple[str, ...] = ("magnitude", *LAM_METHODS, "sweep")
IGNORE: dict[str, tuple[str, ...]] = {  # input stem and classifier, kept dense by every method
    "resnet18": ("conv1", "fc"), "vit": ("patch_embed.proj", "head"), EFFICIENTNET: ("conv_stem", "classifier")}
RUN_KEYS = ("model", "sparsity", "method", "taylor_weight", "draw")
# moonshot_prune's options for every lam: one solver, one Fisher, the true (or dense-predicted) labels
PRUNE_OPTIONS: dict[str, str] = {"fisher_mode": "token", "loss": "labels", "weight_update": "host"}


def checked_model_data(name: str, settings: dict[str, Any], device: torch.device) -> ModelData:
    """:func:`vision_data.model_data`, after checking that ``name``'s ``IGNORE`` layers exist."""
    data = model_data(name, settings, device)
    modules = dict(data.dense.named_modules())
    missing = [layer for layer in IGNORE[name] if layer not in modules]
    if missing:
        raise ValueError(f"{name} has no layer {missing}: IGNORE names layers that do not exist")
    return data


# -- one run --------------------------------------------------------------------------

@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float, ignore: tuple[str, ...]) -> list[str]:
    """Zero each layer's ``int(numel x sparsity)`` smallest-magnitude weights, on
    the layers ``moonshot_prune`` prunes with the same ``ignore``; returns their names."""
    layers, _ = select_layers(model, list(DEFAULT_TARGETS), list(ignore))
    for layer in layers.values():
        count = int(layer.weight.numel() * sparsity)
        smallest = torch.topk(layer.weight.abs().flatten(), count, largest=False).indices
        layer.weight.view(-1)[smallest] = 0.0
    return list(layers)


def _zero_fraction(weights: list[torch.Tensor]) -> float:
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def measured_sparsity(model: nn.Module, pruned: list[str]) -> dict[str, float]:
    """Fraction of zero weights over the pruned layers and over every Linear / Conv2d."""
    modules = dict(model.named_modules())
    every = [m.weight for m in modules.values() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return {"sparsity_measured": _zero_fraction([modules[n].weight for n in pruned]),
            "sparsity_all_layers": _zero_fraction(every), "pruned_layers": len(pruned)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(run: dict[str, Any], data: ModelData, device: torch.device) -> dict[str, Any]:
    """Prune a copy of the dense model as ``run`` says; score it before and after BatchNorm recalibration."""
    if run["method"] == "dense" and "draw" in run:  # the BatchNorm recalibration's control
        return {**run, **dense_recalibrated_scores(data, run["draw"])}
    if run["method"] == "dense":
        return {**run, **data.evaluate(data.dense), **data.record}
    model = copy.deepcopy(data.dense)
    calibration = data.calibration(run["draw"])
    ignore = IGNORE[run["model"]]
    torch.manual_seed(0)
    _synchronize(device)
    start = time.perf_counter()
    if run["method"] == "magnitude":
        pruned = magnitude_prune(model, run["sparsity"], ignore)
    else:
        result = moonshot_prune(model, calibration, run["sparsity"], taylor_weight=run["taylor_weight"],
                                ignore=ignore, **PRUNE_OPTIONS)
        pruned = list(result.sparsity)
    _synchronize(device)
    record = {**run, "prune_seconds": time.perf_counter() - start, **measured_sparsity(model, pruned),
              "calib_images": sum(len(x) for x, _ in calibration), **data.evaluate(model)}
    return {**record, **recalibrated_scores(model, data, calibration)}


# -- the plan -------------------------------------------------------------------------

def _run(model: str, sparsity: float, method: str, taylor_weight: float | None, draw: int) -> dict[str, Any]:
    return {"model": model, "sparsity": sparsity, "method": method, "taylor_weight": taylor_weight, "draw": draw}


def make_plan(models: list[str], sparsities: list[float] | None, methods: list[str],
              draws: int) -> list[dict[str, Any]]:
    """Every run, in order: per model the dense scores and, per draw, the dense
    model after BatchNorm recalibration (the control; no scores without BatchNorm), then the headline
    sparsity's lam 0 / lam 1 / default over every draw, then draw by draw the
    other sparsities' lam runs, magnitude at every sparsity and the lam sweep.

    :param sparsities: restrict to these (None: every sparsity of each model)
    """
    plan = []
    for model in models:
        chosen = [s for s in SPARSITIES[model] if sparsities is None or s in sparsities]
        chosen.sort(key=lambda s: s != HEADLINE_SPARSITY[model])  # the headline first
        lams = [(sp, "moonshot_prune", lam) for sp in chosen
                for method, lam in LAM_METHODS.items() if method in methods]
        first = [step for step in lams if step[0] == HEADLINE_SPARSITY[model]]
        rest = [step for step in lams if step not in first]
        if "magnitude" in methods:
            rest += [(sp, "magnitude", None) for sp in chosen]
        if "sweep" in methods and SWEEP_SPARSITY[model] in chosen:
            rest += [(SWEEP_SPARSITY[model], "moonshot_prune", lam) for lam in SWEEP_LAMS]
        if first or rest:
            plan.append({"model": model, "method": "dense"})
            plan += [{"model": model, "method": "dense", "draw": draw} for draw in range(draws)]
            plan += [_run(model, *step, draw) for steps in (first, rest) for draw in range(draws) for step in steps]
    return plan


def _key(record: dict[str, Any], settings: dict[str, Any]) -> str:
    return run_key({k: record[k] for k in RUN_KEYS if k in record}, settings)


def check_trained(models: list[str]) -> None:
    """Exit with the training command when a Fashion-MNIST model is not cached."""
    for name in (m for m in models if m != EFFICIENTNET):
        try:
            load_trained(name)
        except FileNotFoundError as exc:
            raise SystemExit(f"error: {exc}; nothing was run") from exc


def run_plan(doc: dict[str, Any], plan: list[dict[str, Any]], output: pathlib.Path, device: torch.device) -> None:
    """Run ``plan``, appending each record to ``doc`` and rewriting ``output`` after each."""
    check_trained(list(dict.fromkeys(run["model"] for run in plan)))
    loaded: tuple[str, ModelData] | None = None
    code = code_version(("moonshot_plugins", "benchmarks/vision"))
    for run in tqdm(plan, desc="vision unstructured runs"):
        if loaded is None or loaded[0] != run["model"]:
            loaded = (run["model"], checked_model_data(run["model"], doc["settings"], device))
        record = {**run_one(run, loaded[1], device), "code": code}
        doc["runs"].append(record)
        write_atomically(output, doc)
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                            if k in RUN_KEYS or isinstance(v, float)))


# -- command line ---------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vision.unstructured",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=MODELS, help="models to run (repeatable; default: all)")
    parser.add_argument("--sparsity", action="append", type=float,
                        help="restrict to these sparsities (repeatable): " + "; ".join(
                            f"{m}: {', '.join(map(str, s))}" for m, s in SPARSITIES.items()))
    parser.add_argument("--method", action="append", choices=METHODS,
                        help="methods to run (repeatable; default: all)")
    parser.add_argument("--draws", type=int, default=3, help="calibration draws (seeds 0..N-1)")
    parser.add_argument("--calib-images", type=int, default=256, help="Fashion-MNIST calibration images per draw")
    parser.add_argument("--effnet-calib-crops", type=int, default=64,
                        help="EfficientNet-Lite0 calibration crops per draw")
    parser.add_argument("--val-images", type=int, default=5000,
                        help="Fashion-MNIST validation images (training split)")
    parser.add_argument("--effnet-eval-crops", type=int, default=320,
                        help="EfficientNet-Lite0 test crops, and as many validation crops")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--output", type=pathlib.Path, default=None,
                        help="results JSON (default: benchmarks/results/<date>-vision-unstructured.json)")
    parser.add_argument("--plot", type=pathlib.Path, default=ROOT / "docs" / "vision-unstructured.png")
    parser.add_argument("--docs", type=pathlib.Path, default=None,
                        help="also write the tables into this Markdown page (e.g. docs/results.md), between "
                             "<!-- vision-unstructured:start --> and its end marker")
    parser.add_argument("--report-only", action="store_true",
                        help="only print the tables of --output and draw the plot, running nothing")
    args = parser.parse_args(argv)
    models = args.model or list(MODELS)
    for sparsity in args.sparsity or ():
        if not any(sparsity in SPARSITIES[m] for m in models):
            parser.error(f"--sparsity {sparsity:g} is not a sparsity of {', '.join(models)}; allowed: "
                         + "; ".join(f"{m}: {', '.join(map(str, SPARSITIES[m]))}" for m in models))
    if args.draws < 1:
        parser.error(f"--draws must be at least 1, got {args.draws}")
    return args


def new_document(argv: list[str] | None, device: torch.device, settings: dict[str, Any]) -> dict[str, Any]:
    """An empty results file: command, machine, date, settings, runs, notes."""
    return {
        "command": "python -m benchmarks.vision.unstructured " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_description() + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda"
                                            else ""),
        "date": str(datetime.date.today()),
        "settings": settings,
        "runs": [],
        "notes": [
            "Fashion-MNIST: test = the 10k test set; validation = the first val_images of a seed-0 permutation "
            "of the training split; calibration draw d = calib_images other training images (seed d).",
            "EfficientNet-Lite0: top-1 agreement with and KL(dense || pruned) of the dense model on scikit-image "
            "photo crops (test: other photos; validation: other crops of the calibration photos); calibration "
            "labels are the dense model's predictions.",
            "*_bn_recal: the same pruned model after recalibrate_batchnorm on its calibration images.",
            "Input stem and classifier (settings.ignore) stay dense for every method.",
        ],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = {
        "calib_images": args.calib_images, "effnet_calib_crops": args.effnet_calib_crops,
        "val_images": args.val_images, "effnet_eval_crops": args.effnet_eval_crops,
        "calib_batch": {"fashion_mnist": FASHION_MNIST_BATCH, EFFICIENTNET: EFFICIENTNET_BATCH},
        **PRUNE_OPTIONS,
        "ignore": {m: list(v) for m, v in IGNORE.items()}, "device": device.type,
    }
    output = args.output or ROOT / "benchmarks" / "results" / f"{datetime.date.today()}-vision-unstructured.json"
    if args.report_only and not output.exists():
        raise SystemExit(f"error: no results at {output}; run without --report-only first")
    doc = json.loads(output.read_text()) if output.exists() else new_document(argv, device, settings)
    if not args.report_only:
        if doc["runs"] and doc["settings"] != settings:
            raise SystemExit(f"error: {output} holds runs with settings {doc['settings']}; use another --output")
        doc["settings"] = settings
        done = {_key(record, settings) for record in doc["runs"]}
        plan = make_plan(args.model or list(MODELS), args.sparsity, args.method or list(METHODS), args.draws)
        pending = [run for run in plan if _key(run, settings) not in done]
        print(f"{len(plan) - len(pending)} of {len(plan)} runs already in {output}; running {len(pending)}",
              flush=True)
        if pending:
            run_plan(doc, pending, output, device)
    report = unstructured_report(doc, DEFAULT_VISION_TAYLOR_WEIGHT)
    print(report)
    plot_unstructured(doc, args.plot, DEFAULT_VISION_TAYLOR_WEIGHT)
    print(f"wrote {args.plot}")
    if args.docs is not None:
        image = pathlib.Path(os.path.relpath(args.plot, args.docs.parent))
        write_block(args.docs, "vision-unstructured", f"{report}\n![accuracy against sparsity]({image})\n")
        print(f"wrote the tables into {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
