"""`moonshot check` / `moonshot export` on tiny Llamas pruned by oneshot.

The legacy round trip decompresses with compressed-tensors 0.14.0's own
code in a separate cached venv (built on first use, ~1-2 min).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moonshot_plugins import MoonshotSparseGPTModifier, MoonshotWandaModifier
from moonshot_plugins.checkpoint import (
    CheckpointError,
    check_checkpoint,
    export_sparse24_bitmask,
    pack_bitmask,
    register_cli,
    sparse24_compress,
    sparse24_decompress,
    unpack_bitmask,
)
from tests.tiny_models import TINY_TEXTS, save_tiny_llama

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _oneshot(src: Path, out: Path, recipe):
    from llmcompressor import oneshot

    return oneshot(
        model=str(src),
        dataset=Dataset.from_dict({"text": TINY_TEXTS}),
        recipe=recipe,
        num_calibration_samples=8,
        max_seq_length=32,
        shuffle_calibration_samples=False,
        output_dir=str(out),
    )


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("dense") / "model")


@pytest.fixture(scope="module")
def pruned24(dense, tmp_path_factory):
    """2:4 MOONSHOT-SparseGPT output whose recipe also ignores down_proj (so it stays dense)."""
    out = tmp_path_factory.mktemp("pruned24") / "model"
    recipe = [
        MoonshotSparseGPTModifier(
            sparsity=0.5, mask_structure="2:4", taylor_weight=0.5, ignore=["re:.*lm_head", "re:.*down_proj"]
        )
    ]
    model = _oneshot(dense, out, recipe)
    return out, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def unstructured(dense, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unstructured") / "model"
    _oneshot(dense, out, [MoonshotWandaModifier(sparsity=0.5, mask_structure="0:0", ignore=["re:.*lm_head"])])
    return out


def _linear_names(state: dict[str, torch.Tensor]) -> set[str]:
    return {k[: -len(".weight")] for k, v in state.items() if k.endswith("_proj.weight") and v.dim() == 2}


def _nm_ok(weight: torch.Tensor) -> bool:
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def _reshard(src: Path, dst: Path, parts: int = 3) -> Path:
    """Copy checkpoint ``src`` to ``dst`` with its weights split over ``parts`` shards plus an index."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    state = load_file(src / "model.safetensors")
    keys = sorted(state)
    weight_map = {}
    for i in range(parts):
        name = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {k: state[k] for k in keys[i::parts]}
        save_file(chunk, dst / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    return dst


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moonshot")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# --- check -------------------------------------------------------------------


def test_check_passes_on_24_output_with_recipe_targets(pruned24):
    out, state = pruned24
    report = check_checkpoint(out)
    assert report.ok, report.summary()
    assert report.targets_source == "recipe"
    assert report.recipe_mask_structures == ["2:4"]
    assert sorted(report.ignore) == ["re:.*down_proj", "re:.*lm_head"]
    expected = {n for n in _linear_names(state) if not n.endswith("down_proj")}
    assert {layer.name for layer in report.layers} == expected
    stored = load_file(out / "model.safetensors")
    for layer in report.layers:
        weight = stored[layer.tensor]
        assert _nm_ok(weight)
        assert layer.sparsity == pytest.approx((weight == 0).float().mean().item())
        assert layer.sparsity >= 0.5
    zeros = sum(int((stored[layer.tensor] == 0).sum()) for layer in report.layers)
    numel = sum(stored[layer.tensor].numel() for layer in report.layers)
    assert report.global_sparsity == pytest.approx(zeros / numel)


def test_check_override_ignore_finds_dense_down_proj(pruned24, capsys):
    out, state = pruned24
    report = check_checkpoint(out, ignore=["re:.*lm_head"])
    assert report.targets_source == "recipe+arguments"
    down = {n for n in _linear_names(state) if n.endswith("down_proj")}
    assert {layer.name for layer in report.failing} == down
    code = _cli(["check", str(out), "--ignore", "re:.*lm_head"])
    err = capsys.readouterr().err
    assert code == 1
    for name in down:
        assert name in err


def test_check_unstructured_fails_naming_layers_json(unstructured, capsys):
    code = _cli(["check", str(unstructured), "--json"])
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert code == 1
    assert data["ok"] is False
    assert data["failing"], "an unstructured 50% layer is never exactly 2:4 by chance"
    assert data["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    for name in data["failing"]:
        assert f"layer {name} " in captured.err


def test_check_dense_without_recipe_uses_defaults(dense):
    report = check_checkpoint(dense)
    assert report.targets_source == "default"
    assert not report.ok
    names = {layer.name for layer in report.layers}
    assert len(names) == 14 and not any("lm_head" in n or "embed" in n for n in names)
    assert {layer.name for layer in report.failing} == names


def test_check_sharded_matches_single_file(pruned24, tmp_path):
    out, _ = pruned24
    sharded = _reshard(out, tmp_path / "sharded")
    a, b = check_checkpoint(out), check_checkpoint(sharded)
    assert len(b.files) == 3
    assert [(x.name, x.zeros, x.is_nm) for x in a.layers] == [(x.name, x.zeros, x.is_nm) for x in b.layers]
    assert a.model_sparsity == b.model_sparsity


def test_check_missing_shard_names_file(pruned24, tmp_path, capsys):
    sharded = _reshard(pruned24[0], tmp_path / "sharded")
    victim = sharded / "model-00002-of-00003.safetensors"
    victim.unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        check_checkpoint(sharded)
    assert _cli(["check", str(sharded)]) == 2
    assert "model-00002-of-00003.safetensors: missing" in capsys.readouterr().err


def test_check_no_weights_names_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        check_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_names_file(pruned24, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(pruned24[0], copy)
    file = copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(b"\x07not a safetensors file" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        check_checkpoint(copy)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        export_sparse24_bitmask(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_check_w8a8_output_and_export_refuses_quantized(dense, tmp_path):
    out = tmp_path / "w8a8"
    _oneshot(dense, out, str(RECIPES / "moonshot_sparsegpt_2of4_w8a8.yaml"))
    report = check_checkpoint(out)
    assert report.weight_format == "int-quantized"
    assert report.ok, report.summary()
    assert {layer.dtype for layer in report.layers} == {"int8"}
    with pytest.raises(CheckpointError, match="int-quantized"):
        export_sparse24_bitmask(out, tmp_path / "legacy")
    assert not (tmp_path / "legacy").exists()


def test_transformers_reloads_identical_weights(pruned24):
    from transformers import AutoModelForCausalLM

    out, state = pruned24
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert set(reloaded) == set(state)
    for key, value in state.items():
        assert torch.equal(reloaded[key], value), key


# --- sparse-24-bitmask packing ------------------------------------------------


def test_bitmask_pack_roundtrip_and_bit_order():
    torch.manual_seed(0)
    mask = torch.rand(7, 21) > 0.5
    packed = pack_bitmask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 3)
    assert torch.equal(unpack_bitmask(packed, mask.shape), mask)
    one = torch.zeros(1, 8, dtype=torch.bool)
    one[0, 1] = True  # column 1 -> bit 1 (little-endian bit order, as numpy.packbits(bitorder="little"))
    assert pack_bitmask(one).tolist() == [[2]]


def test_sparse24_compress_roundtrip_bitwise():
    torch.manual_seed(0)
    weight = torch.randn(6, 16, dtype=torch.bfloat16)
    groups = weight.reshape(6, 4, 4)
    groups[..., 1] = 0
    groups[..., 3] = 0
    groups[0, 0] = torch.tensor([0.0, 0.0, -0.0, 0.0])  # fewer than two non-zeros, a negative zero
    parts = sparse24_compress(weight)
    assert parts["compressed"].shape == (6, 8) and parts["shape"].flatten().tolist() == [6, 16]
    back = sparse24_decompress(parts["compressed"], parts["bitmask"], parts["shape"])
    assert torch.equal(back.view(torch.int16), weight.view(torch.int16))
    weight[0, 1] = 1.0
    weight[0, 3] = 1.0  # three non-zeros in the first group
    with pytest.raises(ValueError, match="not 2:4"):
        sparse24_compress(weight)


# --- export ------------------------------------------------------------------


def test_export_writes_legacy_layout(pruned24, tmp_path, capsys):
    src, _ = pruned24
    dst = tmp_path / "legacy"
    assert _cli(["export", "--format", "sparse-24-bitmask", str(src), str(dst)]) == 0
    assert "sparse-24-bitmask" in capsys.readouterr().out
    report = check_checkpoint(src)
    config = json.loads((dst / "config.json").read_text())
    sparsity = config["quantization_config"]["sparsity_config"]
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert sparsity["format"] == "sparse-24-bitmask"
    assert sparsity["sparsity_structure"] == "2:4"
    assert sorted(sparsity["ignore"]) == sorted(report.ignore) and sparsity["targets"] == report.targets
    assert sparsity["global_sparsity"] == pytest.approx(report.model_sparsity)
    dense_state = load_file(src / "model.safetensors")
    legacy = load_file(dst / "model.safetensors")
    targeted = {layer.name for layer in report.layers}
    for name in targeted:
        assert f"{name}.weight" not in legacy
        back = sparse24_decompress(legacy[f"{name}.compressed"], legacy[f"{name}.bitmask"], legacy[f"{name}.shape"])
        assert torch.equal(back.view(torch.int32), dense_state[f"{name}.weight"].view(torch.int32)), name
    for key, value in dense_state.items():
        if key[: -len(".weight")] not in targeted:
            assert torch.equal(legacy[key], value), key
    assert (dst / "recipe.yaml").read_text() == (src / "recipe.yaml").read_text()
    assert (dst / "model.safetensors").stat().st_size < (src / "model.safetensors").stat().st_size
    again = check_checkpoint(dst)  # check reads the legacy format too
    assert again.weight_format == "sparse-24-bitmask" and again.ok
    assert [x.zeros for x in again.layers] == [x.zeros for x in report.layers]


def test_export_refuses_existing_output(pruned24, tmp_path, capsys):
    dst = tmp_path / "exists"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists: output directory already exists"):
        export_sparse24_bitmask(pruned24[0], dst)
    assert _cli(["export", "--format", "sparse-24-bitmask", str(pruned24[0]), str(dst)]) == 2
    assert str(dst) in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"


def test_export_not_24_names_layer_and_writes_nothing(unstructured, tmp_path):
    dst = tmp_path / "legacy"
    with pytest.raises(CheckpointError, match=r"targeted layer model\.layers\.\d+\.\S+ is not 2:4"):
        export_sparse24_bitmask(unstructured, dst)
    assert list(tmp_path.iterdir()) == []


def test_export_interrupted_leaves_nothing(pruned24, tmp_path, monkeypatch):
    import safetensors.torch

    sharded = _reshard(pruned24[0], tmp_path / "sharded")
    real_save = safetensors.torch.save_file
    calls = []

    def save_then_interrupt(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-export
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_interrupt)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        export_sparse24_bitmask(sharded, out_parent / "legacy")
    assert len(calls) == 2  # the first shard had been written
    assert list(out_parent.iterdir()) == []


# --- legacy round trip with compressed-tensors 0.14.0 -------------------------


@pytest.mark.slow
@pytest.mark.venv
def test_legacy_roundtrip_with_compressed_tensors_014(pruned24, tmp_path):
    from integration_tests.serving import legacy_decompress

    src = _reshard(pruned24[0], tmp_path / "sharded")  # sharded: the index is rewritten too
    dst = tmp_path / "legacy"
    export_sparse24_bitmask(src, dst)
    info = legacy_decompress(dst, tmp_path / "decompressed")
    assert info["compressed_tensors_version"] == "0.14.0"
    assert info["compressor"] == "Sparse24BitMaskCompressor"
    assert info["sparsity_config"]["format"] == "sparse-24-bitmask"
    dense = {}
    for shard in src.glob("*.safetensors"):
        dense.update(load_file(shard))
    with safe_open(dst / "model-00001-of-00003.safetensors", "pt") as f:
        assert any(k.endswith(".bitmask") for k in f.keys())
    for path in ("model_compressor.safetensors", "transformers.safetensors"):
        decompressed = load_file(tmp_path / "decompressed" / path)
        assert set(decompressed) == set(dense), path
        for key, value in dense.items():
            got = decompressed[key]
            assert got.dtype == value.dtype and got.shape == value.shape, (path, key)
            assert torch.equal(got.view(torch.uint8), value.view(torch.uint8)), (path, key)
