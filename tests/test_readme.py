"""The README's Python examples run as written: only their placeholders are filled in.

Each fenced ``python`` block of README.md is claimed by exactly one test below,
which replaces the block's placeholder strings and supplies the names the
README leaves to the reader, with a tiny model and a few samples. Every
``yaml`` block, and every ready recipe in ``recipes/``, builds its modifiers.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import pytest
import torch
import torch_pruning as tp

from moonshot_plugins.checkpoint import check_checkpoint
from tests.tiny_models import TINY_TEXTS

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
RECIPES = README.parent / "recipes"
LLM_COMPRESSOR_BLOCK = "from llmcompressor import oneshot"
TORCH_PRUNING_BLOCK = "MoonshotImportance("
VISION_BLOCK = "moonshot_prune("
MARKERS = (LLM_COMPRESSOR_BLOCK, TORCH_PRUNING_BLOCK, VISION_BLOCK)


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def readme_block(marker: str) -> str:
    (block,) = [b for b in python_blocks() if marker in b]
    return block


def run_block(block: str, placeholders: dict[str, str], names: dict[str, Any]) -> dict[str, Any]:
    """Execute ``block`` with each placeholder string replaced and ``names``
    defined; return its namespace."""
    for placeholder, value in placeholders.items():
        assert placeholder in block, f"README example lost its placeholder {placeholder}"
        block = block.replace(placeholder, value)
    namespace = {"__name__": "readme_example", **names}
    exec(compile(block, str(README), "exec"), namespace)
    return namespace


def test_every_python_block_is_run_here():
    blocks = python_blocks()
    assert len(blocks) == len(MARKERS)
    assert [sum(marker in b for marker in MARKERS) for b in blocks] == [1] * len(MARKERS)


@pytest.mark.parametrize("source", ["README.md", *sorted(p.name for p in RECIPES.glob("*.yaml"))])
def test_every_yaml_recipe_builds_its_modifiers(source):
    """A recipe a user copies builds: its field names and values pass each
    modifier's own checks (the modifiers forbid unknown fields, so a misspelt
    one fails here)."""
    from llmcompressor.recipe import Recipe

    import moonshot_plugins.llmcompressor  # noqa: F401  (registers the MOONSHOT modifiers)

    if source == "README.md":
        texts = re.findall(r"^```yaml\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)
    else:
        texts = [(RECIPES / source).read_text(encoding="utf-8")]
    assert texts
    for text in texts:
        modifiers = Recipe.create_instance(text).modifiers
        assert any(type(m).__name__.startswith("Moonshot") for m in modifiers), text


def test_llm_compressor_example_saves_a_2of4_checkpoint(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes output_dir="pruned-model"
    block = readme_block(LLM_COMPRESSOR_BLOCK)
    assert "import moonshot_plugins.llmcompressor" in block  # the registration users need
    run_block(block, {'"path/to/local/model"': repr(str(tiny_llama_dir))}, {"my_texts": TINY_TEXTS})
    output = tmp_path / "pruned-model"
    assert "MoonshotSparseGPTModifier" in (output / "recipe.yaml").read_text()
    report = check_checkpoint(output, "2:4")
    assert report.layers and report.ok, [layer.name for layer in report.failing]


def test_torch_pruning_example_prunes_and_takes_a_training_step():
    g = torch.Generator().manual_seed(0)
    train_loader = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))]
    torch.manual_seed(0)
    namespace = run_block(readme_block(TORCH_PRUNING_BLOCK), {}, {"train_loader": train_loader})
    model, optimizer = namespace["model"], namespace["optimizer"]
    dense = namespace["timm"].create_model("resnet18", num_classes=10)
    kept = tp.utils.count_params(model) / tp.utils.count_params(dense)
    assert 0.4 < kept < 0.6, kept  # 30% of channels on both sides of most weights: about 0.7^2
    assert model.conv1.out_channels < dense.conv1.out_channels
    assert model.get_classifier().out_features == 10
    assert len(optimizer.state) > 0  # the fine-tuning step ran (momentum buffers exist)
    assert model(train_loader[0][0]).shape == (4, 10)


def test_vision_example_prunes_every_layer_and_recalibrates_batchnorm():
    g = torch.Generator().manual_seed(0)
    calib_loader = [(torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 10, (4,), generator=g))]
    torch.manual_seed(0)
    # the README's resnet18 becomes timm's 0.4M-parameter test_resnet (same
    # layer names) so that the example runs in seconds
    namespace = run_block(readme_block(VISION_BLOCK), {'"resnet18"': '"test_resnet"'}, {"calib_loader": calib_loader})
    model, result = namespace["model"], namespace["result"]
    assert len(result.sparsity) == 16 and not result.skipped  # 15 Conv2d and the fc head
    assert all(0.7 <= s < 0.72 for s in result.sparsity.values()), result.sparsity
    assert model.layer1[0].bn1.num_batches_tracked.item() == 1  # recalibrated on the one batch
    assert model(calib_loader[0][0]).shape == (4, 10)
