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


# -- errors: one line, non-zero exit, nothing written ------------------------------------

WANDA_RECIPE = RECIPE.parent / "moonshot_wanda_2of4.yaml"


def _prune_argv(model_dir, calib, out, recipe=WANDA_RECIPE, *extra):
    return ["prune", str(model_dir), "--recipe", str(recipe), "--calib", str(calib), "--output", str(out),
            "--num-samples", "2", "--seq-len", "8", *extra]


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(TINY_TEXTS * 2))
    return path


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "case, message",
    [
        ("existing output", r"^error: output directory .*out already exists; choose a new path or remove it$"),
        ("out of range sparsity", r"^error: --recipe .*bad\.yaml: MoonshotWandaModifier\.sparsity: sparsity must be a fraction in \(0, 1\)"),
        ("two bad fields", r"^error: --recipe .*bad\.yaml: MoonshotWandaModifier\.mask_structure: mask_structure must be 'N:M' .*; MoonshotWandaModifier\.taylor_weight: taylor_weight must be a number in \[0, 1\] or 'auto', got True$"),
        ("unknown modifier", r"^error: --recipe .*bad\.yaml: No modifier of type 'NoSuchModifier' found\.$"),
        ("broken yaml", r"^error: --recipe .*bad\.yaml is not valid YAML: "),
        ("too little text", r"^error: --calib .*short\.txt: calibration text has 2 tokens, fewer than num_samples \* seq_len = 16; give more text or lower --num-samples / --seq-len$"),
    ],
)
def test_a_user_mistake_is_one_error_line(tiny_llama_dir, tmp_path, calib, capsys, case, message):
    recipes = {
        "out of range sparsity": "MoonshotWandaModifier:\n      sparsity: 1.5\n",
        "two bad fields": "MoonshotWandaModifier:\n      mask_structure: abc\n      taylor_weight: true\n",
        "unknown modifier": "NoSuchModifier:\n      sparsity: 0.5\n",
    }
    recipe, out = WANDA_RECIPE, tmp_path / "out"
    if case in recipes:
        recipe = tmp_path / "bad.yaml"
        recipe.write_text("sparsity_stage:\n  sparsity_modifiers:\n    " + recipes[case])
    elif case == "broken yaml":
        recipe = tmp_path / "bad.yaml"
        recipe.write_text("sparsity_stage: [unclosed\n")
    elif case == "existing output":
        out.mkdir()
    elif case == "too little text":
        calib = tmp_path / "short.txt"
        calib.write_text("the fox")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(_prune_argv(tiny_llama_dir, calib, out, recipe)) == 1
    assert re.search(message, _one_error_line(capsys)), case
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def _interrupting_oneshot(monkeypatch):
    """oneshot that writes part of its output, then gets Ctrl-C."""
    import llmcompressor

    def oneshot(output_dir=None, **_):
        (pathlib.Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(llmcompressor, "oneshot", oneshot)


def test_ctrl_c_says_interrupted_and_writes_nothing(tiny_llama_dir, tmp_path, calib, capsys, monkeypatch):
    _interrupting_oneshot(monkeypatch)
    assert main(_prune_argv(tiny_llama_dir, calib, tmp_path / "out")) == 130
    assert _one_error_line(capsys) == "error: interrupted, nothing written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]


def test_debug_shows_the_traceback(tiny_llama_dir, tmp_path, calib, monkeypatch):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        main(_prune_argv(tiny_llama_dir, calib, tmp_path / "out", WANDA_RECIPE, "--debug"))
    with pytest.raises(FileExistsError, match="already exists"):
        main(["--debug", *_prune_argv(tiny_llama_dir, calib, tmp_path / "out")])
    monkeypatch.setenv("MOONSHOT_DEBUG", "1")
    _interrupting_oneshot(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        main(_prune_argv(tiny_llama_dir, calib, tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_the_log_names_the_output_not_the_staging_directory(tiny_llama_dir, tmp_path, calib):
    from loguru import logger

    out, messages = tmp_path / "out", []
    sink = logger.add(messages.append, format="{message}")
    try:
        assert main(_prune_argv(tiny_llama_dir, calib, out)) == 0
    finally:
        logger.remove(sink)
    log = "".join(messages)
    assert ".partial-" not in log
    assert f"to {out}/config.json" in log  # LLM Compressor's "Resaved original config ... to <path>"


def _run(*args: str) -> str:
    import os
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    return result.stdout + result.stderr


def test_no_accelerator_warning_where_nothing_is_computed(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.save_pretrained(tmp_path / "dense")
    outputs = {
        "--help": _run("-m", "moonshot_plugins.cli", "--help"),
        "check": _run("-m", "moonshot_plugins.cli", "check", str(tmp_path / "dense")),
        "import": _run("-c", "import moonshot_plugins.torch_pruning"),
    }
    assert "usage: moonshot" in outputs["--help"] and "NOT 2:4" in outputs["check"]
    for command, output in outputs.items():
        assert "No accelerator" not in output, command
