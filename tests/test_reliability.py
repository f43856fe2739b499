"""Bad input to the MOONSHOT modifiers: an error naming the field, layer or
sample, raised before any weight changes, and nothing written."""

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from moonshot_plugins import MoonshotSparseGPTModifier, MoonshotWandaModifier
from moonshot_plugins.core import FisherCollector, run_gradient_pass
from moonshot_plugins.lm import calibration_loader, run_oneshot
from tests.tiny_models import save_tiny_llama

MODIFIERS = [MoonshotSparseGPTModifier, MoonshotWandaModifier]
IDS = ["sparsegpt", "wanda"]
TWO_FOUR = dict(sparsity=0.5, mask_structure="2:4", ignore=["re:.*lm_head"])


@pytest.fixture(scope="module")
def loader():
    torch.manual_seed(0)
    return calibration_loader(torch.randint(4, 60, (400,)), num_samples=4, seq_len=16)


def batches(samples: list[list[int]]) -> DataLoader:
    """One calibration sample per batch, in order."""
    data = [{"input_ids": torch.tensor(s), "attention_mask": torch.ones(len(s), dtype=torch.long)} for s in samples]
    return DataLoader(data, batch_size=1, collate_fn=lambda b: {k: torch.stack([x[k] for x in b]) for k in b[0]})


def fails_before_any_change(model, modifier, loader, tmp_path, match) -> str:
    """Run the modifier; it must raise ValueError matching ``match``, leave
    every weight as it was and write nothing. Returns the message."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    output = tmp_path / "pruned"
    with pytest.raises(ValueError, match=match) as info:
        run_oneshot(model, [modifier], loader, output_dir=output, shuffle_calibration_samples=False)
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory left behind
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    return str(info.value)


# -- 1. non-finite weights, losses and statistics ------------------------------------


@pytest.mark.parametrize(
    "cls, extra",
    [
        (MoonshotSparseGPTModifier, {"taylor_weight": "auto"}),
        (MoonshotSparseGPTModifier, {"taylor_weight": 0.5, "fisher_mode": "sample"}),
        (MoonshotWandaModifier, {"taylor_weight": 0.5}),
        (MoonshotWandaModifier, {"taylor_weight": "auto"}),
        (MoonshotSparseGPTModifier, {"taylor_weight": 0.0}),  # the host's path: no gradient pass
    ],
    ids=["sparsegpt-auto", "sparsegpt-sample", "wanda", "wanda-auto", "sparsegpt-lam0"],
)
def test_a_nan_weight_stops_the_run_naming_it(tiny_llama_dir, loader, tmp_path, cls, extra):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    message = fails_before_any_change(
        model, cls(**TWO_FOUR, **extra), loader, tmp_path,
        r"model weight model\.layers\.1\.mlp\.up_proj\.weight holds 1 NaN and 0 inf values",
    )
    assert "got nan" not in message


@pytest.mark.parametrize(
    "cls, extra",
    [
        (MoonshotSparseGPTModifier, {}),
        (MoonshotSparseGPTModifier, {"fisher_mode": "sample"}),
        (MoonshotWandaModifier, {}),
    ],
    ids=["sparsegpt", "sparsegpt-sample", "wanda"],
)
def test_taylor_only_stops_before_any_change_when_no_gradient_reaches_a_layer(
    tiny_llama_dir, loader, tmp_path, cls, extra
):
    """With layer 0's o_proj zero, no gradient reaches its q/k/v projections:
    at lam 1 they have no objective, and the host would prune them whole.
    The run stops after the gradient pass, before the first layer is
    compressed, naming all three."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    message = fails_before_any_change(
        model, cls(**TWO_FOUR, taylor_weight=1.0, **extra), loader, tmp_path,
        r"layers \[.*\]: the layer's Fisher is zero .*nothing was changed",
    )
    for projection in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{projection}" in message
    assert "layers.1." not in message and "o_proj" not in message


def test_a_non_finite_loss_names_the_sample(tiny_llama_dir, tmp_path):
    """Finite weights, but the activations of sample 2 overflow (simulated by a
    hook turning the embedding of token 7 into inf)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.model.embed_tokens.register_forward_hook(
        lambda module, args, out: out.masked_fill((args[0] == 7).unsqueeze(-1), float("inf"))
    )
    data = batches([[5, 6, 8, 9, 10, 11]] * 2 + [[5, 6, 7, 9, 10, 11]] + [[5, 6, 8, 9, 10, 11]])
    fails_before_any_change(
        model, MoonshotWandaModifier(**TWO_FOUR, taylor_weight=0.5), data, tmp_path,
        r"calibration sample 2: the loss is (nan|inf)",
    )


def test_a_non_finite_statistic_names_the_layer():
    """Inputs of 1e20 (finite) overflow the token statistics' energies (x^2)
    although the loss and the gradients are finite."""
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(4, 3))
    collector = FisherCollector({"fc": model.fc}, matrix=False, token_weights=True)
    from moonshot_plugins.core import NonFiniteError

    losses = lambda m, x: (m(x) * 1e-21).sum(dim=(1, 2))  # noqa: E731
    run_gradient_pass(model, [torch.full((2, 5, 4), 1e20)], collector, losses)
    with pytest.raises(NonFiniteError, match=r"the token statistics of layer 'fc' holds 0 NaN and \d+ inf"):
        collector.check_finite()


def _save_two_four_checkpoint(model_dir, path, poison: bool):
    """The tiny model, magnitude-pruned to 2:4, saved; ``poison`` puts a NaN and an inf in one layer."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and "lm_head" not in name:
                groups = module.weight.view(module.weight.shape[0], -1, 4)
                smallest = groups.abs().topk(2, dim=-1, largest=False).indices
                groups.scatter_(-1, smallest, 0.0)
        if poison:
            weight = model.model.layers[0].mlp.up_proj.weight
            nonzero = weight.nonzero()
            weight[tuple(nonzero[0])] = float("nan")
            weight[tuple(nonzero[1])] = float("inf")
    model.save_pretrained(path)
    return path


def test_check_reports_nan_and_inf_weights(tiny_llama_dir, tmp_path, capsys):
    from moonshot_plugins.checkpoint import check_checkpoint
    from moonshot_plugins.cli import main

    clean = check_checkpoint(_save_two_four_checkpoint(tiny_llama_dir, tmp_path / "clean", poison=False))
    assert clean.ok and not clean.non_finite_tensors
    path = _save_two_four_checkpoint(tiny_llama_dir, tmp_path / "poisoned", poison=True)
    report = check_checkpoint(path)
    assert not report.ok
    assert report.non_finite_tensors == {"model.layers.0.mlp.up_proj.weight": "1 NaN and 1 inf values"}
    assert [layer.name for layer in report.failing] == ["model.layers.0.mlp.up_proj"]
    assert all(layer.is_nm for layer in report.layers)  # still 2:4; it fails for the NaN
    assert "FAIL: 1 tensor(s) hold NaN/inf" in report.summary()
    assert main(["check", str(path)]) == 1
    assert "error: tensor model.layers.0.mlp.up_proj.weight holds 1 NaN and 1 inf values" in capsys.readouterr().err


# -- 3./4. sparsity ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", MODIFIERS, ids=IDS)
@pytest.mark.parametrize("sparsity", [-0.3, 0, 0.0, 1.0, 1.5, True, float("nan"), [0.5, 1.2]])
def test_sparsity_outside_zero_one_is_rejected(cls, sparsity):
    with pytest.raises(ValidationError, match=r"sparsity must be a fraction in \(0, 1\)") as info:
        cls(sparsity=sparsity)
    assert info.value.errors()[0]["loc"] == ("sparsity",)


@pytest.mark.parametrize("cls", MODIFIERS, ids=IDS)
@pytest.mark.parametrize("sparsity, structure", [(0.7, "2:4"), (0.5, "3:4"), ([0.5, 0.6], "2:4")])
def test_sparsity_that_disagrees_with_n_m_is_rejected(cls, sparsity, structure):
    with pytest.raises(ValidationError, match=f"sparsity .* disagrees with mask_structure '{structure}'"):
        cls(sparsity=sparsity, mask_structure=structure)


@pytest.mark.parametrize("cls", MODIFIERS, ids=IDS)
def test_sparsity_defaults_to_n_over_m_and_is_required_unstructured(cls):
    assert cls(mask_structure="3:4").sparsity == 0.75
    assert cls(sparsity=0.5, mask_structure="2:4").sparsity == 0.5
    with pytest.raises(ValidationError, match=r"sparsity is required with unstructured mask_structure '0:0'"):
        cls()


# -- 5./7. mask_structure and layer widths ------------------------------------------------


@pytest.mark.parametrize("cls", MODIFIERS, ids=IDS)
@pytest.mark.parametrize("structure", ["abc", "4:2", "2:2", "0:4", "2:4:8", "", 24])
def test_bad_mask_structure_is_rejected_with_the_rule(cls, structure):
    with pytest.raises(ValidationError, match=r"mask_structure must be 'N:M' with 0 < N < M") as info:
        cls(sparsity=0.5, mask_structure=structure)
    assert info.value.errors()[0]["loc"] == ("mask_structure",)


def test_mask_structure_is_normalised():
    assert MoonshotWandaModifier(mask_structure=" 2 : 4 ").mask_structure == "2:4"


def test_sparsegpt_blocks_must_hold_whole_groups():
    with pytest.raises(ValidationError, match=r"block_size 128 must be a multiple of M = 3"):
        MoonshotSparseGPTModifier(mask_structure="2:3")
    assert MoonshotSparseGPTModifier(mask_structure="2:3", block_size=96).block_size == 96


@pytest.fixture(scope="module")
def odd_width_dir(tmp_path_factory):
    """down_proj has 126 inputs: not a multiple of 4."""
    return save_tiny_llama(tmp_path_factory.mktemp("odd_width"), intermediate_size=126)


@pytest.mark.parametrize(
    "cls, extra",
    [(MoonshotSparseGPTModifier, {}), (MoonshotWandaModifier, {}), (MoonshotSparseGPTModifier, {"taylor_weight": 0.0})],
    ids=["sparsegpt", "wanda", "sparsegpt-lam0"],
)
def test_a_width_not_divisible_by_m_names_the_layer(odd_width_dir, loader, tmp_path, cls, extra):
    model = AutoModelForCausalLM.from_pretrained(odd_width_dir, dtype=torch.float32)
    fails_before_any_change(
        model, cls(**TWO_FOUR, **extra), loader, tmp_path,
        r"multiple of 4; not so for model\.layers\.0\.mlp\.down_proj \(126\), model\.layers\.1\.mlp\.down_proj \(126\)",
    )


def test_two_of_three_names_the_first_layer_it_cannot_tile(tiny_llama_dir, loader, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    fails_before_any_change(
        model, MoonshotWandaModifier(sparsity=2 / 3, mask_structure="2:3", ignore=["re:.*lm_head"]), loader, tmp_path,
        r"mask_structure '2:3' prunes 2 of every 3 .* model\.layers\.0\.self_attn\.q_proj \(64\)",
    )


# -- 6. calibration data -------------------------------------------------------------------


@pytest.mark.parametrize("cls", MODIFIERS, ids=IDS)
def test_empty_calibration_data(tiny_llama_dir, tmp_path, cls):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    fails_before_any_change(
        model, cls(**TWO_FOUR), batches([]), tmp_path,
        r"calibration data is empty: the dataloader yields no samples; .* needs at least one calibration "
        r"sample of 2 or more tokens",
    )


@pytest.mark.parametrize("cls", MODIFIERS, ids=IDS)
def test_one_token_samples(tiny_llama_dir, tmp_path, cls):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    fails_before_any_change(
        model, cls(**TWO_FOUR), batches([[5], [6]]), tmp_path,
        r"calibration samples of 1 token: .* every calibration sample needs at least 2 tokens",
    )


# -- targets / ignore and the other passed-through fields ------------------------------------


@pytest.mark.parametrize("targets, ignore", [(["NoSuchLayer"], []), (["Linear"], ["re:.*"])])
def test_targets_that_select_nothing(tiny_llama_dir, loader, tmp_path, targets, ignore):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    fails_before_any_change(
        model, MoonshotWandaModifier(sparsity=0.5, mask_structure="2:4", targets=targets, ignore=ignore), loader, tmp_path,
        r"targets .* with ignore .* select no layer to prune",
    )


@pytest.mark.parametrize(
    "cls, field, value, message",
    [
        (MoonshotSparseGPTModifier, "taylor_weight", True, r"taylor_weight must be a number in \[0, 1\] or 'auto', got True"),
        (MoonshotWandaModifier, "taylor_weight", False, r"taylor_weight must be a number in \[0, 1\] or 'auto', got False"),
        (MoonshotWandaModifier, "fisher_samples", True, r"fisher_samples must be a positive integer"),
        (MoonshotWandaModifier, "targets", [], r"targets must name at least one layer"),
        (MoonshotWandaModifier, "ignore", ["re:(unclosed"], r"ignore entry 're:\(unclosed' is not a valid regex"),
        (MoonshotSparseGPTModifier, "block_size", 0, r"block_size must be a positive integer, got 0"),
        (MoonshotSparseGPTModifier, "dampening_frac", -0.1, r"dampening_frac must be a finite number >= 0"),
        (MoonshotSparseGPTModifier, "dampening_frac", None, r"dampening_frac must be a finite number >= 0"),
    ],
)
def test_passed_through_fields_are_checked(cls, field, value, message):
    with pytest.raises(ValidationError, match=message) as info:
        cls(**{**TWO_FOUR, field: value})
    assert info.value.errors()[0]["loc"] == (field,)


def test_sparsity_list_needs_one_value_per_target_layer(tiny_llama_dir, loader, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    fails_before_any_change(
        model, MoonshotWandaModifier(sparsity=[0.5, 0.6], targets=["re:.*proj"]), loader, tmp_path,
        r"sparsity lists 2 values, but targets \['re:\.\*proj'\] match 14 layers",
    )


def test_a_bare_target_string_selects_its_layers(tiny_llama_dir, loader):
    """The host iterates a bare string character by character (selecting no
    layer); the MOONSHOT modifiers read it as a one-item list."""
    modifier = MoonshotWandaModifier(sparsity=0.5, mask_structure="2:4", targets="Linear", ignore=["re:.*lm_head"])
    assert modifier.targets == ["Linear"]
    model = run_oneshot(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), [modifier], loader
    )
    weight = model.model.layers[0].mlp.up_proj.weight
    assert ((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) == 2).all()


def test_the_output_embedding_can_be_pruned_in_token_mode(tiny_llama_dir, loader):
    """With lm_head among the pruned layers (no ignore), SparseGPT's token mode
    gets per-position weights for all of its positions (the chunked head of the
    gradient pass saw only the first T-1, and the run crashed)."""
    modifier = MoonshotSparseGPTModifier(sparsity=0.5, mask_structure="2:4", taylor_weight=0.5, ignore=[])
    model = run_oneshot(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), [modifier], loader,
        shuffle_calibration_samples=False,
    )
    for weight in (model.lm_head.weight, model.model.layers[1].self_attn.o_proj.weight):
        assert ((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) == 2).all()


def test_the_reliability_table_is_current():
    """docs/reliability.md is what running every bad input gives today."""
    from tests import reliability_table

    assert reliability_table.main(["--check"]) == 0, "run: python -m tests.reliability_table"
