"""The vision benchmarks' data: dense models, calibration draws, validation and test scores.

Both benchmarks (``run.py``, Torch-Pruning channel pruning; ``unstructured.py``,
unstructured MOONSHOT) read their data from :func:`model_data`, so that a
calibration draw is the same images in both.

* Fashion-MNIST (the ResNet-18 and ViT trained by ``train.py``): test = the 10k
  test set; validation = the first ``val_images`` of a seed-0 permutation of the
  training split; calibration draw d = ``calib_images`` other training images
  chosen with seed d.
* EfficientNet-Lite0 with its ImageNet weights: no labelled ImageNet images
  ship in any package, so it is scored against the dense model (top-1 agreement
  and KL(dense || pruned)) on 224 x 224 crops of scikit-image's sample photos
  (Debian ``python3-skimage``): test = crops of :data:`EVAL_PHOTOS` (seed 1);
  validation = other crops of :data:`CALIB_PHOTOS` (seed 2); calibration draw d
  = crops of :data:`CALIB_PHOTOS` with seed 1000 + d, labelled by the dense model.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from assets import efficientnet_lite0  # benchmarks/vision is on sys.path (see models.py)
from models import accuracy, load_split, load_trained

EFFICIENTNET = "efficientnet_lite0"
# scikit-image sample photos (python3-skimage), split by photo.
CALIB_PHOTOS = ("astronaut.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png",
                "camera.png", "brick.png", "coins.png", "hubble_deep_field.jpg")
EVAL_PHOTOS = ("chelsea.png", "rocket.jpg", "retina.jpg", "ihc.png", "moon.png",
               "grass.png", "gravel.png", "page.png", "clock_motion.png", "cell.png")
FASHION_MNIST_BATCH, EFFICIENTNET_BATCH = 64, 16  # calibration batch sizes (images)
CROP_DRAW_SEED = 1000  # seeds 1 and 2 are the test and validation crops

Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ModelData:
    """A dense model and what every run of it shares.

    :param calibration: draw -> calibration batches ``(images (B, C, H, W), labels (B,))``
    :param evaluate: model -> scores (test and ``val_`` validation; percent, KL in nats)
    :param record: what the dense run records besides its scores
    """

    dense: nn.Module
    calibration: Callable[[int], Batches]
    evaluate: Callable[[nn.Module], dict[str, float]]
    record: dict[str, Any] = field(default_factory=dict)


def skimage_photo_crops(names: tuple[str, ...], per_photo: int, seed: int) -> torch.Tensor:
    """(len(names) x per_photo, 3, 224, 224) random-resized crops (scale 0.2-1, flips)
    of scikit-image photos, ImageNet-normalised."""
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


def batches_of(x: torch.Tensor, y: torch.Tensor, size: int) -> Batches:
    return [(x[s : s + size], y[s : s + size]) for s in range(0, len(x), size)]


@torch.no_grad()
def logits_of(model: nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[s : s + batch]) for s in range(0, len(images), batch)])


def agreement_and_kl(model: nn.Module, images: torch.Tensor, dense_logits: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement with the dense model in percent, mean KL(dense || model) in nats)."""
    logits = logits_of(model, images)
    agree = (logits.argmax(1) == dense_logits.argmax(1)).float().mean().item() * 100
    kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(dense_logits, 1), log_target=True,
                  reduction="batchmean").item()
    return agree, kl


def recalibrated_scores(model: nn.Module, data: ModelData, calibration: Batches) -> dict[str, float]:
    """``data.evaluate`` of ``model`` after ``recalibrate_batchnorm`` on ``calibration``, keys
    suffixed ``_bn_recal``; empty (and ``model`` untouched) when it has no BatchNorm."""
    from moonshot_plugins.vision import recalibrate_batchnorm

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return {}
    recalibrate_batchnorm(model, calibration)
    return {f"{key}_bn_recal": value for key, value in data.evaluate(model).items()}


def dense_recalibrated_scores(data: ModelData, draw: int) -> dict[str, float]:
    """:func:`recalibrated_scores` of an unpruned copy of the dense model on draw ``draw``'s
    calibration batches: the control for every pruned model's BatchNorm-recalibrated scores.
    Recalibration only helps when those batches represent the data; when the dense model
    itself loses score, the recalibrated rows measure the batches, not the pruning."""
    return recalibrated_scores(copy.deepcopy(data.dense), data, data.calibration(draw))


def fashion_mnist_data(name: str, settings: dict[str, Any], device: torch.device) -> ModelData:
    """The trained ``name``; validation, calibration draws and test from Fashion-MNIST."""
    dense, training = load_trained(name)
    train_x, train_y = load_split("train")
    test_x, test_y = (t.to(device) for t in load_split("test"))
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
    val, pool = order[: settings["val_images"]], order[settings["val_images"]:]
    val_x, val_y = train_x[val].to(device), train_y[val].to(device)

    @functools.cache
    def calibration(draw: int) -> Batches:
        pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(draw))
        chosen = pool[pick[: settings["calib_images"]]]
        return batches_of(train_x[chosen].to(device), train_y[chosen].to(device), FASHION_MNIST_BATCH)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"top1": accuracy(model, test_x, test_y), "val_top1": accuracy(model, val_x, val_y)}

    return ModelData(dense.to(device), calibration, evaluate, {"training": training, "test_images": len(test_x)})


def _per_photo(photos: tuple[str, ...], crops: int) -> int:
    """Crops of each photo for about ``crops`` in all (at least one each)."""
    return max(1, crops // len(photos))


def efficientnet_data(settings: dict[str, Any], device: torch.device) -> ModelData:
    """EfficientNet-Lite0 (ImageNet weights), scored against itself on photo crops."""
    dense = efficientnet_lite0().to(device)
    crops = settings["effnet_eval_crops"]
    test_x = skimage_photo_crops(EVAL_PHOTOS, _per_photo(EVAL_PHOTOS, crops), seed=1).to(device)
    val_x = skimage_photo_crops(CALIB_PHOTOS, _per_photo(CALIB_PHOTOS, crops), seed=2).to(device)
    dense_test, dense_val = logits_of(dense, test_x), logits_of(dense, val_x)

    @functools.cache
    def calibration(draw: int) -> Batches:
        n = _per_photo(CALIB_PHOTOS, settings["effnet_calib_crops"])
        x = skimage_photo_crops(CALIB_PHOTOS, n, seed=CROP_DRAW_SEED + draw).to(device)
        return batches_of(x, logits_of(dense, x).argmax(1), EFFICIENTNET_BATCH)

    def evaluate(model: nn.Module) -> dict[str, float]:
        agreement, kl = agreement_and_kl(model, test_x, dense_test)
        val_agreement, val_kl = agreement_and_kl(model, val_x, dense_val)
        return {"agreement": agreement, "kl": kl, "val_agreement": val_agreement, "val_kl": val_kl}

    record = {"test_images": len(test_x), "val_images": len(val_x),
              "calib_photos": list(CALIB_PHOTOS), "test_photos": list(EVAL_PHOTOS)}
    return ModelData(dense, calibration, evaluate, record)


def model_data(name: str, settings: dict[str, Any], device: torch.device) -> ModelData:
    """``name``'s dense model, data and scorer on ``device``.

    :param settings: ``val_images``, ``calib_images`` (Fashion-MNIST images),
        ``effnet_eval_crops``, ``effnet_calib_crops`` (about that many crops in all)
    """
    return efficientnet_data(settings, device) if name == EFFICIENTNET else fashion_mnist_data(name, settings, device)
