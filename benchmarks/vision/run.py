"""Vision benchmark: MOONSHOT vs Torch-Pruning's criteria, channel pruning without fine-tuning.

    python benchmarks/vision/run.py --output benchmarks/results/<date>-vision-torch-pruning.json
    python benchmarks/vision/run.py --models efficientnet_lite0 --draws 3 --output ...
    python benchmarks/vision/run.py --output ... --report-only

Models: the Fashion-MNIST ResNet-18 and ViT trained by ``train.py`` (run it
first) and EfficientNet-Lite0 with its ImageNet weights. Every criterion
prunes a fresh copy of the dense model with ``tp.pruner.MetaPruner`` (local,
uniform ``pruning_ratio``, classifier kept) and no fine-tuning follows. Data
and calibration draws are those of ``vision_data.py`` (the unstructured
benchmark's): draw d is the same images in both, here 512 Fashion-MNIST images
or about 128 photo crops.

Criteria, all from the same calibration draw:
* ``magnitude``: ``MagnitudeImportance(p=2)``;
* ``taylor``: ``TaylorImportance`` after one backward of the mean loss per batch;
* ``hessian``: ``HessianImportance`` with ``.grad`` = mean squared per-sample
  gradient (one backward per sample). Torch-Pruning 1.6.1's own
  ``accumulate_grad`` keys its dict by parameter but tests membership by
  name, so it keeps only the last sample; that shipped behaviour is reported
  too as ``hessian_tp_accumulate``;
* ``activation``: ``ActivationImportance`` over one forward of all samples
  (it keeps the last forward only);
* ``moonshot_lam<lam>``: ``MoonshotImportance`` (one calibration, every lam);
  ``moonshot_median_lam<lam>``: the same with ``objective_scale="median"``.

Each pruned model is scored, then its BatchNorm statistics are re-estimated on
the draw's calibration images (``recalibrate_batchnorm``, what Torch-Pruning
users do before comparing criteria) and it is scored again (``*_bn_recal``; the
ViT has no BatchNorm). The unpruned model recalibrated the same way is the
control (a ``dense`` record per draw): where it loses score itself, the
recalibrated rows measure the calibration images, not the criteria. Validation
scores (``val_*``) are for choices, never the test ones. One record per (model,
ratio, criterion, draw); the JSON is rewritten atomically after each draw, and a
rerun skips the records it holds.
Tables and targets: ``report.py``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

VISION_DIR = Path(__file__).resolve().parent
ROOT = VISION_DIR.parents[1]
for path in (VISION_DIR, ROOT):  # sibling modules, and the repository root for `benchmarks` and the package
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
from report import BASELINES, moonshot_name, torch_pruning_report  # noqa: E402
from vision_data import (  # noqa: E402
    EFFICIENTNET, Batches, ModelData, dense_recalibrated_scores, model_data, recalibrated_scores,
)

from benchmarks.provenance import code_version, machine_description, write_atomically  # noqa: E402
from benchmarks.report import write_block  # noqa: E402
from moonshot_plugins.torch_pruning import MoonshotImportance, sync_vit_heads, vit_num_heads  # noqa: E402

MODELS = ("resnet18", "vit", EFFICIENTNET)
DEFAULT_LAM = 0.5
RECORD_KEYS = ("model", "ratio", "criterion", "draw")


# -- pruning --------------------------------------------------------------------------

def prune(model: nn.Module, importance: tp.importance.Importance, ratio: float, example: torch.Tensor) -> nn.Module:
    pruner = tp.pruner.MetaPruner(
        model, example, importance=importance, pruning_ratio=ratio,
        ignored_layers=[model.get_classifier()], num_heads=vit_num_heads(model),
    )
    pruner.step()
    sync_vit_heads(model, pruner)
    return model


def criterion_grads(model: nn.Module, calib: Batches) -> dict[str, dict[str, torch.Tensor]]:
    """Gradients the gradient-based criteria read from ``.grad``, computed once on the dense model.

    ``taylor``: sum over batches of the mean-loss gradient (Torch-Pruning's
    usage); ``hessian``: mean squared per-sample gradient (one backward per
    sample); ``hessian_tp_accumulate``: what ``HessianImportance.accumulate_grad``
    of Torch-Pruning 1.6.1 leaves after the same per-sample loop.
    """
    model = copy.deepcopy(model).eval()
    names = {p: n for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for xb, yb in calib:
        F.cross_entropy(model(xb), yb).backward()
    taylor = {names[p]: p.grad.clone() for p in model.parameters() if p.grad is not None}
    shipped = tp.importance.HessianImportance()
    acc, n = {}, 0
    for xb, yb in tqdm(calib, desc="per-sample gradients", leave=False):
        for i in range(len(xb)):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb[i : i + 1]), yb[i : i + 1]).backward()
            for p in model.parameters():
                if p.grad is not None:
                    acc[names[p]] = acc.get(names[p], 0) + p.grad.detach() ** 2
            shipped.accumulate_grad(model)
            n += 1
    hessian = {k: v / n for k, v in acc.items()}
    last = {names[p]: g / shipped._counter[p] for p, g in shipped._accu_grad.items()}
    return {"taylor": taylor, "hessian": hessian, "hessian_tp_accumulate": last}


def baseline_importance(name: str, model: nn.Module, calib: Batches,
                        grads: dict[str, dict[str, torch.Tensor]]) -> tp.importance.Importance:
    """A Torch-Pruning criterion, with ``model`` prepared for it."""
    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if name in grads:
        for pname, p in model.named_parameters():
            p.grad = grads[name][pname].clone() if pname in grads[name] else None
        return tp.importance.TaylorImportance() if name == "taylor" else tp.importance.HessianImportance()
    if name == "activation":
        imp = tp.importance.ActivationImportance()
        model.eval()
        with torch.no_grad(), imp.compute_importance(model):
            model(torch.cat([xb for xb, _ in calib]))
        return imp
    raise ValueError(f"criterion must be one of {list(BASELINES)} or moonshot[_median]_lam<lam>, got {name!r}")


def moonshot_variant(criterion: str) -> tuple[str, float]:
    """``moonshot[_median]_lam<lam>`` -> (objective_scale, lam)."""
    head, lam = criterion.split("_lam")
    return ("median" if head.endswith("_median") else "mean"), float(lam)


def criteria(lams: list[float], objective_scales: list[str]) -> list[str]:
    """The baselines, then MOONSHOT per scale and lam (the scale only matters when mixing)."""
    return list(BASELINES) + [moonshot_name(scale, lam) for scale in ("mean", "median") if scale in objective_scales
                              for lam in lams if scale == "mean" or lam not in (0.0, 1.0)]


# -- one calibration draw -------------------------------------------------------------

def run_draw(name: str, data: ModelData, draw: int, jobs: list[tuple[float, str]],
             lams: list[float]) -> list[dict[str, Any]]:
    """Calibrate every criterion on ``draw``, then prune and score one copy of the dense model per job."""
    calib = data.calibration(draw)
    example = calib[0][0][:1]
    start = time.perf_counter()
    moonshot = MoonshotImportance(lam=max(lams))
    moonshot.accumulate(data.dense, calib)
    calibration_s = {"moonshot_calibration_s": time.perf_counter() - start}
    start = time.perf_counter()
    grads = criterion_grads(data.dense, calib)
    calibration_s["baseline_gradients_s"] = time.perf_counter() - start
    records = []
    for ratio, criterion in tqdm(jobs, desc=f"{name} draw {draw}", leave=False):
        model = copy.deepcopy(data.dense)
        start = time.perf_counter()
        if criterion.startswith("moonshot"):
            scale, lam = moonshot_variant(criterion)
            importance = moonshot.with_lam(lam)
            importance.objective_scale = scale
            importance.attach(model)
        else:
            importance = baseline_importance(criterion, model, calib, grads)
        prune(model, importance, ratio, example)
        model.zero_grad(set_to_none=True)
        record = {"model": name, "ratio": ratio, "criterion": criterion, "draw": draw,
                  "prune_seconds": time.perf_counter() - start, **data.evaluate(model),
                  "params": tp.utils.count_params(model), **calibration_s}
        record.update(recalibrated_scores(model, data, calib))
        records.append(record)
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    return records


def _key(record: dict[str, Any]) -> tuple:
    return tuple(record[k] for k in RECORD_KEYS)


def run_model(doc: dict[str, Any], name: str, ratios: list[float], draws: int, output: Path) -> None:
    """Every pending (ratio, criterion) of ``name`` over ``draws``, appended to ``doc`` and written per draw."""
    settings = doc["settings"]
    done = {_key(r) for r in doc["runs"] if r["criterion"] != "dense"}
    controls = {r["draw"] for r in doc["runs"] if r["model"] == name and r["criterion"] == "dense" and "draw" in r}
    names = criteria(settings["lams"], settings["objective_scales"])
    data = None
    for draw in range(draws):
        jobs = [(ratio, c) for ratio in ratios for c in names if (name, ratio, c, draw) not in done]
        if not jobs and draw in controls:
            continue
        if data is None:
            data = model_data(name, settings, torch.device("cpu"))
            if not any(r["model"] == name and r["criterion"] == "dense" for r in doc["runs"]):
                doc["runs"].append({"model": name, "criterion": "dense", "params": tp.utils.count_params(data.dense),
                                    **data.evaluate(data.dense), **data.record})
        code = code_version(("moonshot_plugins", "benchmarks/vision"))
        records = run_draw(name, data, draw, jobs, settings["lams"]) if jobs else []
        control = dense_recalibrated_scores(data, draw) if draw not in controls else {}
        if control:  # the dense model recalibrated on the same draw (none without BatchNorm)
            records.insert(0, {"model": name, "criterion": "dense", "draw": draw, **control})
        doc["runs"] += [{**r, "code": code} for r in records]
        write_atomically(output, doc)


# -- command line ---------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/vision/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3, 0.5],
                        help="pruning ratios of the Fashion-MNIST models")
    parser.add_argument("--effnet-ratios", nargs="+", type=float, default=[0.05, 0.1, 0.2],
                        help="pruning ratios of EfficientNet-Lite0 (every criterion collapses it at 20%%+)")
    parser.add_argument("--lams", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--objective-scales", nargs="+", default=["mean", "median"], choices=["mean", "median"],
                        help="MoonshotImportance objective_scale variants to run")
    parser.add_argument("--draws", type=int, default=3, help="calibration draws (seeds 0..N-1)")
    parser.add_argument("--calib-images", type=int, default=512, help="Fashion-MNIST calibration images per draw")
    parser.add_argument("--effnet-calib-crops", type=int, default=128, help="EfficientNet-Lite0 calibration crops")
    parser.add_argument("--val-images", type=int, default=5000, help="Fashion-MNIST validation images")
    parser.add_argument("--effnet-eval-crops", type=int, default=320,
                        help="EfficientNet-Lite0 test (and validation) crops")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--output", type=Path, required=True, help="results JSON (resumed when it exists)")
    parser.add_argument("--report-only", action="store_true", help="print the tables of --output and exit")
    parser.add_argument("--docs", type=Path, default=None,
                        help="also write the tables into this Markdown page (e.g. docs/results.md), between "
                             "<!-- vision-torch-pruning:start --> and its end marker")
    args = parser.parse_args(argv)
    if DEFAULT_LAM not in args.lams:
        parser.error(f"--lams must include the default lam {DEFAULT_LAM}, got {args.lams}")
    bad = [r for r in args.ratios + args.effnet_ratios if not 0.0 < r < 1.0]
    if bad:
        parser.error(f"--ratios and --effnet-ratios must be in (0, 1), got {bad}")
    if args.draws < 1:
        parser.error(f"--draws must be at least 1, got {args.draws}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {"calib_images": args.calib_images, "effnet_calib_crops": args.effnet_calib_crops,
                "val_images": args.val_images, "effnet_eval_crops": args.effnet_eval_crops,
                "lams": args.lams, "objective_scales": args.objective_scales, "default_lam": DEFAULT_LAM,
                "torch_pruning": tp.__version__}
    if args.report_only and not args.output.exists():
        raise SystemExit(f"error: no results at {args.output}; run without --report-only first")
    doc = json.loads(args.output.read_text()) if args.output.exists() else {
        "command": "python benchmarks/vision/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_description(), "date": str(datetime.date.today()), "settings": settings, "runs": []}
    if not args.report_only:
        if doc["runs"] and doc["settings"] != settings:
            raise SystemExit(f"error: {args.output} holds runs with settings {doc['settings']}; use another --output")
        for name in args.models:
            run_model(doc, name, args.effnet_ratios if name == EFFICIENTNET else args.ratios, args.draws,
                      args.output)
    report = torch_pruning_report(doc)
    print(report)
    if args.docs is not None:
        write_block(args.docs, "vision-torch-pruning", report)
        print(f"wrote the tables into {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
