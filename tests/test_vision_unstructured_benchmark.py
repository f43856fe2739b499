"""benchmarks/vision/unstructured.py end to end on untrained models and random images (seconds).

The trained models, the dataset and the photo crops are replaced by tiny
stand-ins (tests/tiny_vision.py); the plan, the pruning calls, the scores, the
JSON and the report are the real ones.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.vision import unstructured
from tests.tiny_vision import use_tiny_vision_data

SMALL = ["--calib-images", "32", "--val-images", "40", "--effnet-calib-crops", "16", "--effnet-eval-crops", "20",
         "--threads", "1"]


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """Tiny models and data in place of the real ones; every pruning call, with its masks."""
    use_tiny_vision_data(monkeypatch)
    recorded: list[dict] = []

    def masks(model, names):
        modules = dict(model.named_modules())
        return {name: modules[name].weight == 0 for name in names}

    def moonshot_prune(model, calibration, sparsity, **options):
        result = real_moonshot(model, calibration, sparsity, **options)
        recorded.append({"lam": options["taylor_weight"], "sparsity": sparsity, "masks": masks(model, result.sparsity)})
        return result

    def magnitude_prune(model, sparsity, ignore):
        names = real_magnitude(model, sparsity, ignore)
        recorded.append({"lam": None, "sparsity": sparsity, "masks": masks(model, names)})
        return names

    real_moonshot, real_magnitude = unstructured.moonshot_prune, unstructured.magnitude_prune
    monkeypatch.setattr(unstructured, "moonshot_prune", moonshot_prune)
    monkeypatch.setattr(unstructured, "magnitude_prune", magnitude_prune)
    return recorded


def test_fashion_mnist_models_every_method_resumed_and_reported(calls, tmp_path, capsys):
    output, plot = tmp_path / "results.json", tmp_path / "plot.png"
    files = [*SMALL, "--output", str(output), "--plot", str(plot)]
    vit = ["--model", "vit", "--sparsity", "0.7", "--sparsity", "0.9", "--draws", "2", *files]
    unstructured.main(vit)
    # ResNet-18: the headline only, one draw, into the same file
    resnet = ["--model", "resnet18", "--sparsity", "0.9", "--draws", "1", "--method", "magnitude",
              "--method", "reconstruction", "--method", "taylor", "--method", "moonshot", *files]
    unstructured.main(resnet)
    runs = json.loads(output.read_text())["runs"]
    pruned = [r for r in runs if r["method"] != "dense"]
    # ViT, per draw: 2 sparsities x (magnitude, lam 0, lam 1, default) + the 4-lam sweep at 70%; ResNet-18: 4
    assert len(pruned) == len(calls) == 2 * (2 * 4 + 4) + 4
    # the dense scores, then per draw the dense model after BN recalibration (the control; no BatchNorm in the ViT)
    controls = [(r["model"], r.get("draw"), "top1_bn_recal" in r) for r in runs if r["method"] == "dense"]
    assert controls == [("vit", None, False), ("vit", 0, False), ("vit", 1, False),
                        ("resnet18", None, False), ("resnet18", 0, True)]
    keys = [(r["model"], r["sparsity"], r["method"], r["taylor_weight"], r["draw"]) for r in pruned]
    assert len(set(keys)) == len(keys)
    assert {r["taylor_weight"] for r in pruned} == {None, 0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0}
    for record in pruned:
        assert record["sparsity_measured"] == pytest.approx(record["sparsity"], abs=0.01)
        assert record["sparsity_all_layers"] < record["sparsity_measured"]  # stem and classifier dense
        assert record["prune_seconds"] > 0 and record["code"]
        assert {"top1", "val_top1"} <= record.keys()
        # ResNet-18 has BatchNorm: scored again after recalibration; the ViT has none
        assert ("top1_bn_recal" in record) == (record["model"] == "resnet18")
    # same layers, different masks: magnitude vs lam 0 on the same model and sparsity
    by_lam = {(c["lam"], c["sparsity"], frozenset(c["masks"])): c["masks"] for c in calls}
    for (lam, sparsity, layers), masks in by_lam.items():
        if lam is None:
            lam0 = by_lam[(0.0, sparsity, layers)]
            assert any(not torch.equal(masks[name], lam0[name]) for name in layers)

    calls.clear()
    capsys.readouterr()
    unstructured.main(vit)  # everything is recorded: nothing runs again
    unstructured.main(resnet)
    assert calls == [] and len(json.loads(output.read_text())["runs"]) == len(runs)
    plot.unlink()
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nkept\n")
    for _ in range(2):  # the block is replaced, not appended twice
        unstructured.main(["--report-only", "--output", str(output), "--plot", str(plot), "--docs", str(page)])
    report = capsys.readouterr().out
    text = page.read_text()
    assert text.startswith("# Results\n\nkept\n") and text.count("<!-- vision-unstructured:start -->") == 1
    assert "### Targets" in text and f"![accuracy against sparsity]({plot.name})" in text
    assert calls == [] and plot.read_bytes()[:4] == b"\x89PNG"
    for text in ("### vit: test top-1 (%)", "### resnet18: test top-1 (%)", "(1) after BN recal); mean",
                 "| magnitude + BN recal |",
                 f"**MOONSHOT lam {unstructured.DEFAULT_VISION_TAYLOR_WEIGHT:g} (default)**", "choosing lam on validation", "### Targets",
                 "| default >= best single + 3 | vit | 70% | top1 |", "| default >= best single + 3 | resnet18 | 90% |",
                 "| prune time <= 1.5 x lam 0 | vit | 70% |"):
        assert text in report


def test_efficientnet_scored_against_dense_with_bn_recal(calls, tmp_path, capsys):
    output = tmp_path / "results.json"
    unstructured.main(["--model", "efficientnet_lite0", "--sparsity", "0.5", "--method", "reconstruction",
                       "--method", "moonshot", "--draws", "1", *SMALL, "--output", str(output),
                       "--plot", str(tmp_path / "plot.png")])
    runs = json.loads(output.read_text())["runs"]
    assert runs[0]["method"] == "dense" and runs[0]["agreement"] == 100.0 and runs[0]["kl"] == pytest.approx(0, abs=1e-6)
    assert runs[1]["method"] == "dense" and runs[1]["draw"] == 0 and "agreement_bn_recal" in runs[1]  # the control
    default = unstructured.DEFAULT_VISION_TAYLOR_WEIGHT
    assert [(r["taylor_weight"], r["calib_images"]) for r in runs[2:]] == [(0.0, 16), (default, 16)]
    for record in runs[2:]:
        names = ("agreement", "kl", "val_agreement", "val_kl")
        assert set(names) | {f"{n}_bn_recal" for n in names} <= record.keys()
        assert record["sparsity_measured"] == pytest.approx(0.5, abs=0.01)
    assert "### efficientnet_lite0: mean KL(dense || pruned)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, allowed", [
    (["--model", "vit", "--sparsity", "0.3"], "vit: 0.5, 0.7, 0.9"),
    (["--model", "efficientnet_lite0", "--sparsity", "0.9"], "efficientnet_lite0: 0.3, 0.5, 0.7"),
    (["--model", "resnet50"], "'resnet18', 'vit', 'efficientnet_lite0'"),
    (["--method", "wanda"], "'magnitude', 'reconstruction', 'taylor', 'moonshot', 'sweep'"),
])
def test_bad_arguments_name_the_allowed_values(argv, allowed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        unstructured.main(argv)
    assert exit_info.value.code == 2 and allowed in capsys.readouterr().err


def test_missing_trained_model_stops_before_any_run(calls, monkeypatch, tmp_path):
    def untrained(name: str):
        raise FileNotFoundError(f"no trained {name} at /cache/{name}.pt; run "
                                f"`python benchmarks/vision/train.py --model {name}` first")

    monkeypatch.setattr(unstructured, "load_trained", untrained)
    output = tmp_path / "results.json"
    with pytest.raises(SystemExit, match=r"benchmarks/vision/train.py --model vit"):
        unstructured.main(["--model", "efficientnet_lite0", "--model", "vit", *SMALL, "--output", str(output)])
    assert calls == [] and not output.exists()
