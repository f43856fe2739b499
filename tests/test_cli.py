"""The `moonshot` command line on a tiny local model."""

import math
import re
import pathlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from moonshot_plugins.cli import build_parser, main
from moonshot_plugins.lm import calibration_loader, perplexity
from tests.tiny_models import TINY_TEXTS

RECIPE = pathlib.Path(__file__).parents[1] / "recipes" / "moonshot_sparsegpt_2of4.yaml"


def test_prune_from_text_file(tiny_llama_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(TINY_TEXTS * 4))
    out = tmp_path / "out"
    assert main([
        "prune", str(tiny_llama_dir), "--recipe", str(RECIPE), "--calib", str(calib),
        "--output", str(out), "--num-samples", "4", "--seq-len", "16",
    ]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    weight = model.model.layers[0].mlp.up_proj.weight
    assert ((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) == 2).all()
    assert (out / "recipe.yaml").exists()


def test_prune_from_datasets_dir(tiny_llama_dir, tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"text": TINY_TEXTS}).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"
    assert main([
        "prune", str(tiny_llama_dir), "--recipe", str(RECIPE), "--calib", str(tmp_path / "ds"),
        "--output", str(out), "--num-samples", "8", "--seq-len", "16",
    ]) == 0
    assert (out / "config.json").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--sparsity", "4:2"], "--sparsity must be N:M"),
        (["demo", "--sparsity", "1.5"], "--sparsity must be N:M"),
        (["demo", "--taylor-weight", "2"], r"taylor_weight must be a number in \[0, 1\] or 'auto'"),
        (["demo", "--fisher-mode", "batch"], "invalid choice: 'batch'"),
        (["demo", "--host", "obc"], "invalid choice: 'obc'"),
    ],
)
def test_bad_arguments_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


def test_prune_rejects_missing_inputs(tiny_llama_dir, tmp_path):
    with pytest.raises(SystemExit, match="has no config.json"):
        main(["prune", str(tmp_path), "--recipe", str(RECIPE), "--calib", "x", "--output", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--calib .* is neither"):
        main(["prune", str(tiny_llama_dir), "--recipe", str(RECIPE), "--calib", str(tmp_path / "nope"),
              "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_calibration_loader_windows_and_errors():
    ids = torch.arange(100)
    batches = list(calibration_loader(ids, num_samples=3, seq_len=10))
    assert [b["input_ids"][0, 0].item() for b in batches] == [0, 45, 90]
    assert all(b["input_ids"].shape == (1, 10) for b in batches)
    with pytest.raises(ValueError, match="fewer than"):
        calibration_loader(ids, num_samples=20, seq_len=10)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        calibration_loader(ids, num_samples=0, seq_len=10)


def test_perplexity_matches_manual_computation(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (70,))
    with torch.no_grad():
        nll = []
        for start in (0, 32):
            window = ids[start : start + 32].unsqueeze(0)
            logits = model(window).logits[0, :-1]
            nll.append(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
    expected = math.exp(sum(nll).item() / 62)
    assert perplexity(model, ids, context=32, batch_size=1) == pytest.approx(expected, rel=1e-5)
