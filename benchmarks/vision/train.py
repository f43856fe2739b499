"""Train the Fashion-MNIST models of the vision benchmark (fixed seeds, cached).

    python benchmarks/vision/train.py --model resnet18
    python benchmarks/vision/train.py --model vit

Writes ``<cache_dir>/fashion-mnist-models/<model>.pt`` and ``<model>.json``
(the training record: epochs, test accuracy, wall time, device). A model
already cached is not retrained unless ``--force`` is given.

Training is cheap on a GPU (38 s / 98 s on an H100 with ``--device cuda``);
on 2 CPU cores expect roughly 5 min per ResNet epoch and 2-3 min per ViT epoch.

Recipe: SGD with Nesterov momentum 0.9 (ResNet) or AdamW (ViT), one-cycle
learning rate, label smoothing 0.1, batch 128, augmentation = random 28x28
crop of the 2-pixel zero-padded image + horizontal flip.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import MODEL_NAMES, accuracy, build, load_split, model_dir  # noqa: E402

RECIPES = {
    "resnet18": dict(epochs=5, optimizer="sgd", lr=0.2, weight_decay=5e-4),
    "vit": dict(epochs=15, optimizer="adamw", lr=2e-3, weight_decay=0.05),
}


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), generator=generator)
    dy = torch.randint(0, 5, (n,), generator=generator)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + 28, dx[i] : dx[i] + 28] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def train(name: str, epochs: int | None = None, seed: int = 0, device: str = "cpu", threads: int = 2) -> dict:
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    recipe = dict(RECIPES[name])
    if epochs is not None:
        recipe["epochs"] = epochs
    train_x, train_y = load_split("train")
    test_x, test_y = load_split("test")
    model = build(name).to(device)
    batch_size = 128
    steps_per_epoch = len(train_x) // batch_size
    total = recipe["epochs"] * steps_per_epoch
    if recipe["optimizer"] == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=0.9, nesterov=True,
                              weight_decay=recipe["weight_decay"])
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=total, pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    bar = tqdm(total=total, desc=f"train {name}")
    for epoch in range(recipe["epochs"]):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            x = augment(train_x[idx], generator).to(device)
            y = train_y[idx].to(device)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    bar.close()
    wall = time.perf_counter() - start
    model = model.cpu().eval()
    record = {
        "model": name,
        "seed": seed,
        **recipe,
        "batch_size": batch_size,
        "test_top1": accuracy(model, test_x, test_y),
        "train_wall_s": round(wall, 1),
        "device": (f"{device} ({torch.cuda.get_device_name(device)})" if device.startswith("cuda")
                   else f"cpu ({threads} threads, {platform.processor() or platform.machine()})"),
        "torch": torch.__version__,
    }
    torch.save(model.state_dict(), model_dir() / f"{name}.pt")
    (model_dir() / f"{name}.json").write_text(json.dumps(record, indent=2))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODEL_NAMES, required=True)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epoch count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    args = parser.parse_args()
    if (model_dir() / f"{args.model}.pt").exists() and not args.force:
        print(f"{args.model} already cached in {model_dir()} (use --force to retrain)")
        print((model_dir() / f"{args.model}.json").read_text())
        return
    record = train(args.model, args.epochs, args.seed, args.device, args.threads)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
