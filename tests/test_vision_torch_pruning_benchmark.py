"""benchmarks/vision/run.py (Torch-Pruning channel pruning) end to end on tiny stand-ins (tests/tiny_vision.py).

The criteria, MetaPruner, the BatchNorm recalibration, the records, the resume
and the report are the real ones; the models and images are tiny and random.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.vision import unstructured  # noqa: F401  (puts benchmarks/vision on sys.path)
from tests.tiny_vision import use_tiny_vision_data

SMALL = ["--calib-images", "8", "--val-images", "40", "--effnet-calib-crops", "16", "--effnet-eval-crops", "20",
         "--threads", "1", "--lams", "0", "0.5", "1", "--objective-scales", "mean"]


@pytest.fixture
def draws() -> list[tuple[str, int]]:
    """(model, draw) of every calibration draw the benchmark runs."""
    return []


@pytest.fixture
def run(monkeypatch, draws):
    """benchmarks/vision/run.py with tiny models and data, logging its draws into ``draws``."""
    use_tiny_vision_data(monkeypatch)
    import run as run_module  # benchmarks/vision/run.py, as its own folder imports it

    real_run_draw = run_module.run_draw

    def run_draw(name, data, draw, jobs, lams):
        draws.append((name, draw))
        return real_run_draw(name, data, draw, jobs, lams)

    monkeypatch.setattr(run_module, "run_draw", run_draw)
    return run_module


def test_every_criterion_per_draw_with_bn_recal_resumed_and_reported(run, draws, tmp_path, capsys):
    output = tmp_path / "results.json"
    argv = ["--models", "resnet18", "vit", "--ratios", "0.3", "--draws", "2", *SMALL, "--output", str(output)]
    run.main(argv)
    runs = json.loads(output.read_text())["runs"]
    pruned = [r for r in runs if r["criterion"] != "dense"]
    names = ["magnitude", "taylor", "hessian", "hessian_tp_accumulate", "activation",
             "moonshot_lam0", "moonshot_lam0.5", "moonshot_lam1"]
    # one record per (model, ratio, criterion, draw), each draw calibrated once
    assert sorted((r["model"], r["criterion"], r["draw"]) for r in pruned) == sorted(
        (m, c, d) for m in ("resnet18", "vit") for c in names for d in (0, 1))
    assert draws == [("resnet18", 0), ("resnet18", 1), ("vit", 0), ("vit", 1)]
    dense = {r["model"]: r for r in runs if r["criterion"] == "dense" and "draw" not in r}
    # per draw, the dense model after the same BN recalibration: the control (the ViT has no BatchNorm)
    controls = sorted((r["model"], r["draw"]) for r in runs if r["criterion"] == "dense" and "draw" in r)
    assert controls == [("resnet18", 0), ("resnet18", 1)]
    assert all("top1_bn_recal" in r for r in runs if r["criterion"] == "dense" and "draw" in r)
    for record in pruned:
        assert record["params"] < dense[record["model"]]["params"] and record["code"]
        assert {"top1", "val_top1"} <= record.keys()
        assert ("top1_bn_recal" in record) == (record["model"] == "resnet18")  # the ViT has no BatchNorm
    by = {(r["model"], r["criterion"], r["draw"]): r for r in pruned}
    for model in ("resnet18", "vit"):
        for draw in (0, 1):
            # MoonshotImportance at lam 1 is HessianImportance on the same per-sample gradients
            assert by[(model, "moonshot_lam1", draw)]["val_top1"] == by[(model, "hessian", draw)]["val_top1"]
    # magnitude reads no data: the same pruned model on both draws
    assert by[("vit", "magnitude", 0)]["val_top1"] == by[("vit", "magnitude", 1)]["val_top1"]

    draws.clear()
    capsys.readouterr()
    run.main(argv)  # everything is recorded: nothing runs again
    assert draws == [] and len(json.loads(output.read_text())["runs"]) == len(runs)
    page = tmp_path / "results.md"
    run.main(["--output", str(output), "--report-only", "--docs", str(page), *SMALL])
    report = capsys.readouterr().out
    assert page.read_text().count("<!-- vision-torch-pruning:end -->") == 1 and "### Targets" in page.read_text()
    for text in ("### resnet18: test top-1 (%)", "| **moonshot_lam0.5 (default)** |", "| magnitude + BN recal |",
                 "### Targets", "| resnet18 | 30% + BN recal |", "incomplete"):
        assert text in report


def test_efficientnet_scored_against_dense(run, tmp_path):
    output = tmp_path / "results.json"
    run.main(["--models", "efficientnet_lite0", "--effnet-ratios", "0.1", "--draws", "1", *SMALL,
              "--output", str(output)])
    runs = json.loads(output.read_text())["runs"]
    assert runs[0]["criterion"] == "dense" and runs[0]["agreement"] == 100.0
    assert runs[1]["criterion"] == "dense" and runs[1]["draw"] == 0 and "agreement_bn_recal" in runs[1]  # the control
    for record in runs[2:]:
        assert {"agreement", "kl", "val_agreement", "agreement_bn_recal", "kl_bn_recal"} <= record.keys()


@pytest.mark.parametrize("argv, message", [
    (["--lams", "0", "1"], "--lams must include the default lam 0.5"),
    (["--ratios", "1.5"], "must be in (0, 1), got [1.5]"),
    (["--draws", "0"], "--draws must be at least 1"),
    (["--models", "resnet50"], "'resnet18', 'vit', 'efficientnet_lite0'"),
])
def test_bad_arguments_are_named(run, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main([*argv, "--output", str(tmp_path / "results.json")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def _doc(control: float) -> dict:
    """A results file of EfficientNet-Lite0 at one ratio over 3 draws, its dense control scoring ``control``."""
    runs = [{"model": "efficientnet_lite0", "criterion": "dense", "agreement": 100.0, "params": 10}]
    for draw in range(3):
        runs.append({"model": "efficientnet_lite0", "criterion": "dense", "draw": draw, "agreement_bn_recal": control})
        for criterion, score in (("taylor", 40.0), ("moonshot_lam0.5", 42.0 + draw)):
            runs.append({"model": "efficientnet_lite0", "ratio": 0.1, "criterion": criterion, "draw": draw,
                         "agreement": score, "agreement_bn_recal": score - 30, "params": 8, "code": "abc"})
    return {"command": "c", "machine": "m", "date": "d", "settings": {"default_lam": 0.5}, "runs": runs}


def test_recalibrated_targets_are_void_where_the_dense_model_loses_to_recalibration(run):
    from report import torch_pruning_report

    void = torch_pruning_report(_doc(control=8.0))
    assert "dense 100.00 (8.00 ± 0.00 (3) after BN recal)" in void
    assert "| efficientnet_lite0 | 10% | taylor | 3.00 ± 0.58 (3) | >= 0 | **met** |" in void
    assert "| efficientnet_lite0 | 10% + BN recal | taylor | 3.00 ± 0.58 (3) | >= 0 | void: dense after BN recal 8.00" in void
    kept = torch_pruning_report(_doc(control=99.5))  # within RECAL_TOLERANCE: the recalibrated rows count
    assert "| efficientnet_lite0 | 10% + BN recal | taylor | 3.00 ± 0.58 (3) | >= 0 | **met** |" in kept
