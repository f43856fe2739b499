"""Every committed recipe runs through oneshot on a tiny Llama saved to disk."""

import pathlib

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moonshot_plugins.lm import calibration_loader, run_oneshot

RECIPES = sorted((pathlib.Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def loader():
    torch.manual_seed(0)
    return calibration_loader(torch.randint(4, 60, (400,)), num_samples=4, seq_len=24)


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    for host in ("sparsegpt", "wanda"):
        assert {f"moonshot_{host}_{s}" for s in ("2of4", "50", "60")} <= names
    assert "moonshot_sparsegpt_2of4_w8a8" in names


def nm_ok(weight: torch.Tensor, n: int, m: int) -> bool:
    return bool(((weight.reshape(weight.shape[0], -1, m) != 0).sum(-1) <= m - n).all())


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_saves_and_reloads(tiny_llama_dir, loader, recipe, tmp_path):
    out = tmp_path / "pruned"
    pruned = run_oneshot(str(tiny_llama_dir), str(recipe), loader, output_dir=out)
    spec = yaml.safe_load(recipe.read_text())["sparsity_stage"]["sparsity_modifiers"]
    (settings,) = spec.values()
    n, m = map(int, settings["mask_structure"].split(":"))
    quantized = "quantization_stage" in yaml.safe_load(recipe.read_text())

    assert (out / "recipe.yaml").exists()
    assert not list(tmp_path.glob(".pruned.partial-*"))
    assert "taylor_weight" in (out / "recipe.yaml").read_text()

    targeted = {
        name: module.weight.detach()
        for name, module in pruned.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }
    assert len(targeted) == 14
    for name, weight in targeted.items():
        if quantized:
            continue  # checked on the saved int8 tensors below
        if n:
            assert nm_ok(weight, n, m), name
        else:
            sparsity = (weight == 0).float().mean().item()
            assert abs(sparsity - settings["sparsity"]) < 0.02, (name, sparsity)

    if quantized:
        saved = load_file(out / "model.safetensors")
        for name in targeted:
            assert saved[f"{name}.weight"].dtype == torch.int8
            assert nm_ok(saved[f"{name}.weight"], n, m), name
        return

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reloaded_state = reloaded.state_dict()
    for key, value in pruned.state_dict().items():
        assert torch.equal(reloaded_state[key], value), key


def test_existing_output_dir_is_refused(tiny_llama_dir, loader, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        run_oneshot(str(tiny_llama_dir), str(RECIPES[0]), loader, output_dir=out)


def test_failed_run_leaves_no_directory(tiny_llama_dir, tmp_path):
    bad_loader = calibration_loader(torch.full((200,), 10_000), num_samples=2, seq_len=16)
    out = tmp_path / "failed"
    with pytest.raises(Exception):
        run_oneshot(str(tiny_llama_dir), str(RECIPES[0]), bad_loader, output_dir=out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
