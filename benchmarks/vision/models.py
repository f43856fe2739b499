"""Fashion-MNIST models for the Torch-Pruning benchmark, and their cache.

Both are stock timm architectures adapted to 28x28x1 inputs:

* ``resnet18``: timm ``ResNet(BasicBlock, (2, 2, 2, 2))`` at a quarter of the
  ImageNet width (stages 16/32/64/128 channels), a 3x3 stride-1 stem and no
  stem max-pool (ImageNet's stride-4 stem would leave 7x7 maps after the stem).
* ``vit``: timm ``VisionTransformer`` with 4x4 patches (49 tokens), width 96,
  depth 4, 4 heads of 24 channels, MLP ratio 2.

Trained weights are cached as ``<cache_dir>/fashion-mnist-models/<name>.pt``
by ``benchmarks/vision/train.py`` (fixed seeds); :func:`load_trained` reads
them and fails with the training command when they are missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from assets import fashion_mnist  # benchmarks/vision/assets.py (this folder is on sys.path)

from moonshot_plugins.assets import cache_dir

MODEL_NAMES: tuple[str, ...] = ("resnet18", "vit")
# Fashion-MNIST training-set statistics (pixels scaled to [0, 1]).
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def build(name: str) -> nn.Module:
    """A freshly initialised (untrained) model; ``name`` in :data:`MODEL_NAMES`."""
    if name == "resnet18":
        from timm.models.resnet import BasicBlock, ResNet

        width = 16
        # stem_type="deep" only so that timm sizes bn1/layer1 for `width`
        # input channels; the deep stem itself is replaced just below.
        model = ResNet(
            BasicBlock, (2, 2, 2, 2), num_classes=10, in_chans=1,
            channels=tuple(width * 2**i for i in range(4)),
            stem_type="deep", stem_width=width // 2,
        )
        model.conv1 = nn.Conv2d(1, width, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    if name == "vit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=28, patch_size=4, in_chans=1, num_classes=10,
            embed_dim=96, depth=4, num_heads=4, mlp_ratio=2.0,
        )
    raise ValueError(f"model name must be one of {list(MODEL_NAMES)}, got {name!r}")


def model_dir() -> Path:
    path = cache_dir() / "fashion-mnist-models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_trained(name: str) -> tuple[nn.Module, dict]:
    """(model in eval mode, its training record) from the cache."""
    model = build(name)
    weights = model_dir() / f"{name}.pt"
    if not weights.exists():
        raise FileNotFoundError(
            f"no trained {name} at {weights}; run "
            f"`python benchmarks/vision/train.py --model {name}` first"
        )
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    record = json.loads((model_dir() / f"{name}.json").read_text())
    return model.eval(), record


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), standardised."""
    return ((images.float() / 255.0 - FMNIST_MEAN) / FMNIST_STD).unsqueeze(1)


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = fashion_mnist(split)
    return normalise(images), labels


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size])
        correct += (logits.argmax(1) == labels[start : start + batch_size]).sum().item()
    return 100.0 * correct / len(images)
