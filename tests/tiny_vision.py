"""Tiny stand-ins for the vision benchmarks' models and data (no downloads, seconds).

:func:`use_tiny_vision_data` replaces, in ``benchmarks/vision/vision_data.py``,
the trained Fashion-MNIST models by freshly initialised models of the same
architectures, timm's tiny ``test_efficientnet`` for EfficientNet-Lite0, and
the datasets and photo crops by a few random images. Plumbing only: quality
claims come from the real benchmark runs.
"""

from __future__ import annotations

import sys
from types import ModuleType

import pytest
import timm
import torch
from torch import nn

from benchmarks.vision import unstructured  # puts benchmarks/vision on sys.path
from benchmarks.vision.models import build

__all__ = ["use_tiny_vision_data", "vision_data_module"]


def vision_data_module() -> ModuleType:
    """``vision_data.py`` as the benchmarks import it (a top-level module)."""
    return sys.modules[unstructured.model_data.__module__]


def use_tiny_vision_data(monkeypatch: pytest.MonkeyPatch) -> None:
    # the ViT needs 28 x 28 images; the ResNet takes any size, and 12 x 12 is cheaper. The benchmarks
    # load a model before its data, so load_split serves the size of the model loaded last.
    side = {"pixels": 28}

    def load_trained(name: str):
        side["pixels"] = 28 if name == "vit" else 12
        torch.manual_seed(0)
        model = build(name)
        for module in model.modules():  # timm starts each residual branch's last BN at 0: no gradient
            if isinstance(module, nn.BatchNorm2d):
                nn.init.uniform_(module.weight, 0.5, 1.5)
        return model.eval(), {"epochs": 0}

    def load_split(split: str):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        n = 120 if split == "train" else 48
        images = torch.randn(n, 1, side["pixels"], side["pixels"], generator=g)
        return images, torch.randint(0, 10, (n,), generator=g)

    def efficientnet_lite0():
        torch.manual_seed(0)
        return timm.create_model("test_efficientnet", num_classes=10).eval()

    def photo_crops(names, per_photo: int, seed: int):
        return torch.randn(len(names) * per_photo, 3, 32, 32, generator=torch.Generator().manual_seed(seed))

    data = vision_data_module()
    monkeypatch.setattr(unstructured, "load_trained", load_trained)  # its check that the models are trained
    monkeypatch.setattr(data, "load_trained", load_trained)
    monkeypatch.setattr(data, "load_split", load_split)
    monkeypatch.setattr(data, "efficientnet_lite0", efficientnet_lite0)
    monkeypatch.setattr(data, "skimage_photo_crops", photo_crops)
