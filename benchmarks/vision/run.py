"""Vision benchmark: MOONSHOT vs Torch-Pruning's criteria, channel pruning without fine-tuning.

    python benchmarks/vision/run.py                      # all models, writes the JSON below
    python benchmarks/vision/run.py --models resnet18 --ratios 0.3

Models: the Fashion-MNIST ResNet-18 and ViT trained by ``train.py`` (run it
first) and EfficientNet-Lite0 with its ImageNet weights. Every criterion
prunes a fresh copy of the dense model with ``tp.pruner.MetaPruner`` (local,
uniform ``pruning_ratio``, classifier kept) and no fine-tuning follows.

Criteria, all from the same calibration samples:
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

Every criterion is also scored on a validation split that is neither
calibration nor test (``val_*`` metrics): 5000 other Fashion-MNIST training
images; for EfficientNet-Lite0, other crops of the calibration photos. Choices
between MOONSHOT variants are made on it, never on the test metrics.

Fashion-MNIST: top-1 on the 10k test set; calibration = 512 training images.
EfficientNet-Lite0: no labelled ImageNet images ship in any package, so it is
measured against the dense model on crops of real photos (scikit-image's
sample photos from the Debian package ``python3-skimage``): calibration and
evaluation use disjoint photos; labels for calibration losses are the dense
model's own predictions. Metrics: top-1 agreement with the dense model and
mean KL(dense || pruned).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_pruning as tp
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import accuracy, load_split, load_trained  # noqa: E402

from moonshot_plugins.torch_pruning import MoonshotImportance, sync_vit_heads, vit_num_heads  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results" / "vision_torch_pruning.json"
BASELINES = ("magnitude", "taylor", "hessian", "hessian_tp_accumulate", "activation")
DEFAULT_LAM = 0.5

# scikit-image sample photos (python3-skimage), split by photo.
CALIB_PHOTOS = ("astronaut.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png",
                "camera.png", "brick.png", "coins.png", "hubble_deep_field.jpg")
EVAL_PHOTOS = ("chelsea.png", "rocket.jpg", "retina.jpg", "ihc.png", "moon.png",
               "grass.png", "gravel.png", "page.png", "clock_motion.png", "cell.png")


# -- data -----------------------------------------------------------------------------

def skimage_photo_crops(names, per_photo: int, seed: int) -> torch.Tensor:
    """Random-resized 224x224 crops (scale 0.2-1, flips) of skimage photos, ImageNet-normalised."""
    import numpy as np
    from PIL import Image

    from moonshot_plugins.assets import _download_deb

    root = _download_deb("python3-skimage")
    data_dirs = [p for p in root.rglob("skimage/data") if p.is_dir()]
    if not data_dirs:
        raise RuntimeError(f"no skimage/data directory under {root}")
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    crops = []
    for name in names:
        img = torch.from_numpy(np.asarray(Image.open(data_dirs[0] / name).convert("RGB"), dtype=np.float32) / 255.0)
        img = img.permute(2, 0, 1)
        _, h, w = img.shape
        for _ in range(per_photo):
            scale = 0.2 + 0.8 * torch.rand(1, generator=g).item()
            side = max(16, int(min(h, w) * scale ** 0.5))
            top = torch.randint(0, h - side + 1, (1,), generator=g).item()
            left = torch.randint(0, w - side + 1, (1,), generator=g).item()
            crop = img[:, top : top + side, left : left + side].unsqueeze(0)
            crop = F.interpolate(crop, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)[0]
            if torch.rand(1, generator=g).item() < 0.5:
                crop = crop.flip(-1)
            crops.append((crop - mean) / std)
    return torch.stack(crops)


def batches_of(x, y, size):
    return [(x[s : s + size], y[s : s + size]) for s in range(0, len(x), size)]


# -- pruning --------------------------------------------------------------------------

def prune(model, importance, ratio, example):
    pruner = tp.pruner.MetaPruner(
        model, example, importance=importance, pruning_ratio=ratio,
        ignored_layers=[model.get_classifier()], num_heads=vit_num_heads(model),
    )
    pruner.step()
    sync_vit_heads(model, pruner)
    return model


def criterion_grads(model, calib) -> dict[str, dict[str, torch.Tensor]]:
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


def baseline_importance(name, model, calib, grads):
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
    raise ValueError(name)


# -- evaluation -----------------------------------------------------------------------

@torch.no_grad()
def agreement_and_kl(model, images, dense_logits, batch=32):
    model.eval()
    logits = torch.cat([model(images[s : s + batch]) for s in range(0, len(images), batch)])
    agree = (logits.argmax(1) == dense_logits.argmax(1)).float().mean().item() * 100
    kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(dense_logits, 1), log_target=True,
                  reduction="batchmean").item()
    return agree, kl


def moonshot_variant(crit: str) -> tuple[str, float]:
    """``moonshot[_median]_lam<lam>`` -> (objective_scale, lam)."""
    head, lam = crit.split("_lam")
    return ("median" if head.endswith("_median") else "mean"), float(lam)


def run_model(name, ratios, lams, calib_n, eval_n, log, objective_scales=("mean", "median")):
    torch.manual_seed(0)
    if name == "efficientnet_lite0":
        from assets import efficientnet_lite0

        dense = efficientnet_lite0()
        calib_x = skimage_photo_crops(CALIB_PHOTOS, per_photo=max(1, calib_n // len(CALIB_PHOTOS)), seed=0)
        eval_x = skimage_photo_crops(EVAL_PHOTOS, per_photo=max(1, eval_n // len(EVAL_PHOTOS)), seed=1)
        val_x = skimage_photo_crops(CALIB_PHOTOS, per_photo=max(1, eval_n // len(CALIB_PHOTOS)), seed=2)
        with torch.no_grad():
            calib_y = torch.cat([dense(calib_x[s : s + 32]) for s in range(0, len(calib_x), 32)]).argmax(1)
            dense_eval = torch.cat([dense(eval_x[s : s + 32]) for s in range(0, len(eval_x), 32)])
            dense_val = torch.cat([dense(val_x[s : s + 32]) for s in range(0, len(val_x), 32)])
        example = calib_x[:1]

        def evaluate(m):
            agree, kl = agreement_and_kl(m, eval_x, dense_eval)
            val_agree, val_kl = agreement_and_kl(m, val_x, dense_val)
            return {"agreement": agree, "kl": kl, "val_agreement": val_agree, "val_kl": val_kl}

        record = {"dense": {"agreement": 100.0, "kl": 0.0}, "calib_images": len(calib_x), "eval_images": len(eval_x),
                  "calib_photos": list(CALIB_PHOTOS), "eval_photos": list(EVAL_PHOTOS)}
        calib_batch = 16
    else:
        dense, train_record = load_trained(name)
        train_x, train_y = load_split("train")
        test_x, test_y = load_split("test")
        perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
        calib_x, calib_y = train_x[perm[:calib_n]], train_y[perm[:calib_n]]
        val = perm[calib_n : calib_n + 5000]
        example = calib_x[:1]
        evaluate = lambda m: {"top1": accuracy(m, test_x, test_y),  # noqa: E731
                              "val_top1": accuracy(m, train_x[val], train_y[val])}
        record = {"dense": evaluate(dense), "training": train_record, "calib_images": calib_n,
                  "eval_images": len(test_x)}
        calib_batch = 64
    calib = batches_of(calib_x, calib_y, calib_batch)
    record["params_dense"] = tp.utils.count_params(dense)
    log(f"{name}: dense {record['dense']}")

    t0 = time.perf_counter()
    moonshot = MoonshotImportance(lam=max(lams))
    moonshot.accumulate(dense, calib)
    record["moonshot_calibration_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    grads = criterion_grads(dense, calib)
    record["baseline_gradients_s"] = round(time.perf_counter() - t0, 1)

    results = {}
    prefixes = {"mean": "moonshot", "median": "moonshot_median"}
    jobs = [(crit, r) for r in ratios for crit in BASELINES] + [
        (f"{prefixes[scale]}_lam{lam:g}", r) for r in ratios for scale in objective_scales for lam in lams
        if not (scale != "mean" and lam in (0.0, 1.0))  # the scale only matters when mixing
    ]
    for crit, ratio in tqdm(jobs, desc=f"{name} pruning runs"):
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        if crit.startswith("moonshot"):
            scale, lam = moonshot_variant(crit)
            imp = moonshot.with_lam(lam)
            imp.objective_scale = scale
            imp.attach(model)
        else:
            imp = baseline_importance(crit, model, calib, grads)
        prune(model, imp, ratio, example)
        model.zero_grad(set_to_none=True)
        entry = {**evaluate(model), "params": tp.utils.count_params(model), "wall_s": round(time.perf_counter() - t, 1)}
        results.setdefault(f"{ratio:g}", {})[crit] = entry
        log(f"{name} ratio {ratio:g} {crit}: {entry}")
    record["results"] = results
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "vit", "efficientnet_lite0"],
                        choices=["resnet18", "vit", "efficientnet_lite0"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3, 0.5],
                        help="pruning ratios of the Fashion-MNIST models")
    parser.add_argument("--effnet-ratios", nargs="+", type=float, default=[0.05, 0.1, 0.2],
                        help="pruning ratios of EfficientNet-Lite0 (every criterion collapses it at 20%%+)")
    parser.add_argument("--lams", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--objective-scales", nargs="+", default=["mean", "median"], choices=["mean", "median"],
                        help="MoonshotImportance objective_scale variants to run")
    parser.add_argument("--calib", type=int, default=512, help="Fashion-MNIST calibration images")
    parser.add_argument("--effnet-calib", type=int, default=128)
    parser.add_argument("--effnet-eval", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if DEFAULT_LAM not in args.lams:
        parser.error(f"--lams must include the default lam {DEFAULT_LAM}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {args.threads} torch threads, {platform.platform()}",
        "torch": torch.__version__, "torch_pruning": tp.__version__,
        "default_lam": DEFAULT_LAM, "lams": args.lams, "models": {},
    }
    if args.out.exists():  # keep other models' results when re-running a subset
        previous = json.loads(args.out.read_text())
        out["models"] = previous.get("models", {})
    for name in args.models:
        n_calib = args.effnet_calib if name == "efficientnet_lite0" else args.calib
        ratios = args.effnet_ratios if name == "efficientnet_lite0" else args.ratios
        t_model = time.perf_counter()
        out["models"][name] = run_model(name, ratios, args.lams, n_calib, args.effnet_eval, tqdm.write,
                                        tuple(args.objective_scales))
        out["models"][name].update(command=out["command"], date=out["date"], machine=out["machine"],
                                   model_wall_s=round(time.perf_counter() - t_model, 1))
        out["wall_s"] = round(time.perf_counter() - start, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
