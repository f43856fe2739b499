"""MOONSHOT modifiers against their LLM Compressor hosts on a tiny random Llama."""

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

from moonshot_plugins import MoonshotSparseGPTModifier, MoonshotWandaModifier
from moonshot_plugins.lm import calibration_loader, run_oneshot

COMMON = dict(sparsity=0.5, mask_structure="2:4", ignore=["re:.*lm_head"])


@pytest.fixture(scope="module")
def loader():
    torch.manual_seed(0)
    return calibration_loader(torch.randint(4, 60, (400,)), num_samples=6, seq_len=24)


def prune(model_dir, modifier, loader):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pruned = run_oneshot(model, [modifier], loader, shuffle_calibration_samples=False)
    return {k: v.detach().clone() for k, v in pruned.state_dict().items()}


def linear_weights(state):
    return {k: v for k, v in state.items() if k.endswith("proj.weight")}


@pytest.mark.parametrize(
    "host, moonshot",
    [(SparseGPTModifier, MoonshotSparseGPTModifier), (WandaPruningModifier, MoonshotWandaModifier)],
    ids=["sparsegpt", "wanda"],
)
def test_lam_zero_is_bitwise_host_and_lam_one_differs(tiny_llama_dir, loader, host, moonshot):
    reference = prune(tiny_llama_dir, host(**COMMON), loader)
    lam0 = prune(tiny_llama_dir, moonshot(**COMMON, taylor_weight=0.0), loader)
    lam1 = prune(tiny_llama_dir, moonshot(**COMMON, taylor_weight=1.0), loader)
    assert reference.keys() == lam0.keys()
    for key in reference:
        assert torch.equal(reference[key], lam0[key]), key
    changed = [k for k in linear_weights(reference) if not torch.equal(reference[k], lam1[k])]
    assert len(changed) == len(linear_weights(reference))
    for key, weight in linear_weights(lam1).items():
        groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
        assert (groups <= 2).all(), key


@pytest.mark.parametrize("fisher_mode", ["sample", "token"])
def test_fisher_modes_and_offload_prune(tiny_llama_dir, loader, fisher_mode):
    a = prune(
        tiny_llama_dir,
        MoonshotSparseGPTModifier(**COMMON, fisher_mode=fisher_mode, fisher_samples=3),
        loader,
    )
    b = prune(
        tiny_llama_dir,
        MoonshotSparseGPTModifier(
            **COMMON, fisher_mode=fisher_mode, fisher_samples=3, offload_fisher=True
        ),
        loader,
    )
    for key in linear_weights(a):
        assert torch.equal(a[key], b[key]), key


def test_fisher_samples_changes_result(tiny_llama_dir, loader):
    few = prune(tiny_llama_dir, MoonshotWandaModifier(**COMMON, taylor_weight=1.0, fisher_samples=1), loader)
    all_ = prune(tiny_llama_dir, MoonshotWandaModifier(**COMMON, taylor_weight=1.0), loader)
    assert any(not torch.equal(few[k], all_[k]) for k in linear_weights(few))


@pytest.mark.parametrize("weight_update", ["host", "resolve"])
def test_wanda_bf16_fisher_is_held_in_bf16_and_keeps_the_mask(tiny_llama_dir, loader, monkeypatch, weight_update):
    """``fisher_dtype: bfloat16`` hands the host bf16 diagonals (half the held
    bytes) and moves only near-ties of the mask; float32 is the default."""
    from moonshot_plugins.llmcompressor import mixin

    held = []

    def recording(*args, **kwargs):
        records, used = collect(*args, **kwargs)
        held.extend(record.fisher.dtype for record in records.values())
        return records, used

    collect = mixin.collect_layer_statistics
    monkeypatch.setattr(mixin, "collect_layer_statistics", recording)
    fields = dict(COMMON, taylor_weight=0.5, weight_update=weight_update)
    assert MoonshotWandaModifier(**fields).fisher_dtype == "float32"
    full = prune(tiny_llama_dir, MoonshotWandaModifier(**fields), loader)
    assert set(held) == {torch.float32}
    held.clear()
    half = prune(tiny_llama_dir, MoonshotWandaModifier(**fields, fisher_dtype="bfloat16"), loader)
    assert held and set(held) == {torch.bfloat16}
    kept = torch.cat([(full[k] != 0).flatten() for k in linear_weights(full)])
    kept_half = torch.cat([(half[k] != 0).flatten() for k in linear_weights(half)])
    assert (kept == kept_half).float().mean() > 0.99
    with pytest.raises(ValidationError, match=r"fisher_dtype must be one of \['float32', 'bfloat16'\], got 'float16'"):
        MoonshotWandaModifier(**fields, fisher_dtype="float16")


@pytest.mark.parametrize("cls", [MoonshotSparseGPTModifier, MoonshotWandaModifier])
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("taylor_weight", 1.5, r"taylor_weight must be a number in \[0, 1\] or 'auto'"),
        ("taylor_weight", -0.1, r"taylor_weight must be a number in \[0, 1\] or 'auto'"),
        ("taylor_weight", "half", r"taylor_weight must be a number in \[0, 1\] or 'auto'"),
        ("fisher_mode", "batch", r"fisher_mode must be one of \['sample', 'token'\]"),
        ("fisher_samples", 0, r"fisher_samples must be a positive integer"),
        ("fisher_samples", -3, r"fisher_samples must be a positive integer"),
        ("gradient_dtype", "float16", r"gradient_dtype must be one of \['auto', 'bfloat16', 'float32'\]"),
    ],
)
def test_bad_fields_are_rejected_naming_field_and_allowed_values(cls, field, value, message):
    with pytest.raises(ValidationError, match=message) as info:
        cls(**COMMON, **{field: value})
    assert info.value.errors()[0]["loc"] == (field,)


def test_modifiers_registered_for_recipes():
    from llmcompressor.recipe import Recipe

    recipe = Recipe.create_instance(
        """
        sparsity_stage:
          sparsity_modifiers:
            MoonshotWandaModifier:
              sparsity: 0.5
              taylor_weight: 0.25
              fisher_mode: sample
        """
    )
    (modifier,) = recipe.modifiers
    assert isinstance(modifier, MoonshotWandaModifier)
    assert modifier.taylor_weight == 0.25 and modifier.fisher_mode == "sample"


def test_bf16_gradient_pass_estimates_the_fp32_fisher(tiny_llama_dir, loader):
    """The default bf16 autocast changes the Fisher by rounding only."""
    from moonshot_plugins.core import FisherCollector, run_gradient_pass
    from moonshot_plugins.llmcompressor.causal_lm import CausalLMLosses

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    layers = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    fishers = {}
    for dtype in (None, torch.bfloat16):
        collector = FisherCollector(layers, fisher_mode="token")
        run_gradient_pass(model, loader, collector, CausalLMLosses(), autocast_dtype=dtype)
        fishers[dtype] = {n: collector.fisher(n) for n in layers}
    for name in layers:
        exact, approx = fishers[None][name], fishers[torch.bfloat16][name]
        assert approx.dtype == torch.float32  # accumulated outside autocast
        assert not torch.equal(exact, approx)  # autocast really ran
        assert (approx - exact).norm() / exact.norm() < 0.02, name


def test_unstructured_behaves_as_in_host(tiny_llama_dir, loader):
    """Unstructured 60%: lam=0 is the host, lam>0 keeps each layer's sparsity."""
    common = dict(sparsity=0.6, mask_structure="0:0", ignore=["re:.*lm_head"])
    reference = prune(tiny_llama_dir, SparseGPTModifier(**common), loader)
    lam0 = prune(tiny_llama_dir, MoonshotSparseGPTModifier(**common, taylor_weight=0.0), loader)
    lam_half = prune(tiny_llama_dir, MoonshotSparseGPTModifier(**common, taylor_weight=0.5), loader)
    for key in linear_weights(reference):
        assert torch.equal(reference[key], lam0[key]), key
        ref_sparsity = (reference[key] == 0).float().mean()
        ours_sparsity = (lam_half[key] == 0).float().mean()
        assert abs(ref_sparsity - ours_sparsity) < 0.02, key
    assert any(not torch.equal(reference[k], lam_half[k]) for k in linear_weights(reference))


def test_owl_fails_exactly_as_in_host(tiny_llama_dir, loader):
    """llmcompressor 0.14.0.1's own SparseGPTModifier cannot run OWL under
    oneshot (its activation pass fires lifecycle events before the session is
    initialized). MOONSHOT inherits the host's behaviour, error included; when
    the host is fixed this test fails and should become a lam=0 equality test."""
    common = dict(sparsity=0.5, sparsity_profile="owl", owl_m=5, owl_lmbda=0.08, ignore=["re:.*lm_head"])
    errors = []
    for modifier in (SparseGPTModifier(**common), MoonshotSparseGPTModifier(**common, taylor_weight=0.0)):
        with pytest.raises(ValueError, match="Cannot invoke event before initializing") as info:
            prune(tiny_llama_dir, modifier, loader)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def _hessians_at_compression(monkeypatch, model_dir, modifier, loader):
    """The Hessians SparseGPT's solver receives for the first decoder layer."""
    seen = {}
    solver = SparseGPTModifier.compress_modules

    def spy(self):
        for module in self._num_samples:
            name = self._module_names[module].rstrip(".")  # the host appends a "."
            if ".layers.0." in name:
                seen[name] = self._hessians[module].clone()
        return solver(self)

    monkeypatch.setattr(SparseGPTModifier, "compress_modules", spy)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    run_oneshot(model, [modifier], loader)
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_token_reweighting_gives_the_moonshot_hessian(monkeypatch, tiny_llama_dir, loader, shuffle):
    """First decoder layer (its inputs are still dense): the host's Hessian of
    reweighted inputs equals combine_hessians(H_host, F_token, lam), also when
    the calibration dataloader reshuffles on every pass (a RandomSampler, as
    oneshot builds by default): the Taylor weights must follow their samples."""
    from torch.utils.data import DataLoader
    from moonshot_plugins.core import FisherCollector, combine_hessians, run_gradient_pass
    from moonshot_plugins.llmcompressor.causal_lm import CausalLMLosses

    lam = 0.6
    host = _hessians_at_compression(monkeypatch, tiny_llama_dir, SparseGPTModifier(**COMMON), loader)
    calibration = loader
    if shuffle:
        torch.manual_seed(1)
        calibration = DataLoader(loader.dataset, batch_size=1, shuffle=True, collate_fn=loader.collate_fn)
    ours = _hessians_at_compression(
        monkeypatch,
        tiny_llama_dir,
        MoonshotSparseGPTModifier(**COMMON, taylor_weight=lam, gradient_dtype="float32"),
        calibration,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    layers = {n: m for n, m in model.named_modules() if n in host}
    collector = FisherCollector(layers, fisher_mode="token")
    run_gradient_pass(model, loader, collector, CausalLMLosses())
    assert set(host) == set(ours) and len(host) == 7
    for name in host:
        expected = combine_hessians(host[name], collector.fisher(name), lam)
        torch.testing.assert_close(ours[name], expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(ours[name], host[name], rtol=1e-2)


def test_activation_checkpointing_keeps_the_statistics(tiny_llama_dir, loader):
    """Decoder layers under checkpointing: same token weights and Fisher
    (hooks fire again in the recomputation, but only the original outputs
    receive gradients), and the layers' forward is restored afterwards."""
    from moonshot_plugins.core import FisherCollector, run_gradient_pass
    from moonshot_plugins.llmcompressor.causal_lm import CausalLMLosses

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    layers = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "o_proj", "down_proj"))}
    results = []
    for blocks in ((), list(model.model.layers)):
        weights = FisherCollector(layers, matrix=False, token_weights=True)
        matrix = FisherCollector(layers)
        for collector in (weights, matrix):
            used = run_gradient_pass(model, loader, collector, CausalLMLosses(), checkpoint_modules=blocks)
            assert used == 6
        results.append((weights, matrix))
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    (plain_w, plain_m), (ckpt_w, ckpt_m) = results
    for name in layers:
        assert len(ckpt_w.token_weights(name)) == 6  # no double counting
        torch.testing.assert_close(torch.stack(ckpt_w.token_weights(name)), torch.stack(plain_w.token_weights(name)))
        assert ckpt_w.token_energies(name) == pytest.approx(plain_w.token_energies(name), rel=1e-6)
        torch.testing.assert_close(ckpt_m.fisher(name), plain_m.fisher(name))


def test_gradient_pass_losses_split_the_head_only_when_exact(tiny_llama_dir, loader):
    """The LM loss of the gradient pass runs the head in chunks for a plain
    body+head model and gives the model's own per-sample losses."""
    from moonshot_plugins.core import causal_lm_sample_losses
    from moonshot_plugins.llmcompressor.causal_lm import CausalLMLosses

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    batch = next(iter(loader))
    losses = CausalLMLosses()
    ours = losses(model, batch)
    assert losses.chunked is True
    reference = causal_lm_sample_losses(model(**batch).logits, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(ours, reference)

    class ScaledHead(torch.nn.Module):  # logits = 2 * head(hidden): not separable
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits = 2 * out.logits
            return out

    wrapped = ScaledHead(model)
    wrapped.base_model = model.model
    wrapped.get_output_embeddings = model.get_output_embeddings
    losses = CausalLMLosses()
    losses(wrapped, batch)
    assert losses.chunked is False


def test_auto_taylor_weight_picks_a_lam_per_layer(tiny_llama_dir, loader):
    from llmcompressor.recipe import Recipe

    (modifier,) = Recipe.create_instance(
        """
        sparsity_stage:
          sparsity_modifiers:
            MoonshotSparseGPTModifier:
              sparsity: 0.5
              mask_structure: "2:4"
              taylor_weight: auto
              ignore: ["re:.*lm_head"]
        """
    ).modifiers
    assert modifier.taylor_weight == "auto"
    lams = {}
    compress = MoonshotSparseGPTModifier.compress_modules

    def spy(self):
        lams.update({self._module_names[m]: self._layer_statistics[m].taylor_weight for m in self._num_samples})
        return compress(self)

    MoonshotSparseGPTModifier.compress_modules = spy
    try:
        auto = prune(tiny_llama_dir, modifier, loader)
    finally:
        MoonshotSparseGPTModifier.compress_modules = compress
    assert len(lams) == 14 and all(0.0 <= lam <= 1.0 for lam in lams.values())
    assert len(set(lams.values())) > 1  # really per layer
    host = prune(tiny_llama_dir, SparseGPTModifier(**COMMON), loader)
    assert any(not torch.equal(auto[k], host[k]) for k in linear_weights(host))


@pytest.mark.parametrize("cls", [MoonshotWandaModifier, MoonshotSparseGPTModifier], ids=["wanda", "sparsegpt"])
def test_auto_taylor_weight_needs_token_mode(cls):
    with pytest.raises(ValidationError, match="taylor_weight='auto' needs fisher_mode='token'"):
        cls(**COMMON, taylor_weight="auto", fisher_mode="sample")


def test_wanda_auto_taylor_weight_picks_a_lam_per_layer(tiny_llama_dir, loader, monkeypatch):
    """Wanda's auto: the same rule on the same per-position weights, one lam per
    layer reaching the combined diagonal."""
    import moonshot_plugins.llmcompressor.wanda as wanda

    lams = []
    combine = wanda.combine_diagonal

    def spy(row_scalars, fisher, lam):
        lams.append(lam)
        return combine(row_scalars, fisher, lam)

    monkeypatch.setattr(wanda, "combine_diagonal", spy)
    auto = prune(tiny_llama_dir, MoonshotWandaModifier(**COMMON, taylor_weight="auto"), loader)
    assert len(lams) == 14 and all(0.0 <= lam <= 1.0 for lam in lams)
    assert len(set(lams)) > 1  # really per layer
    fixed = prune(tiny_llama_dir, MoonshotWandaModifier(**COMMON, taylor_weight=0.5), loader)
    assert any(not torch.equal(auto[k], fixed[k]) for k in linear_weights(fixed))


@pytest.mark.parametrize(
    "cls, extra, expected",
    [
        (MoonshotSparseGPTModifier, {}, "auto"),
        (MoonshotSparseGPTModifier, {"fisher_mode": "sample"}, 0.5),  # no rule there: the fixed default
        (MoonshotWandaModifier, {}, 0.5),
        (MoonshotWandaModifier, {"fisher_mode": "sample"}, 0.5),
    ],
    ids=["sparsegpt-token", "sparsegpt-sample", "wanda-token", "wanda-sample"],
)
def test_default_taylor_weight(cls, extra, expected):
    assert cls(**COMMON, **extra).taylor_weight == expected


def test_row_weights_shift_an_unstructured_mask_towards_sensitive_rows(tiny_llama_dir, loader):
    """With row_weights, rows whose token Fisher is larger (m_i > 1) keep more
    weights; without, SparseGPT's mask ignores that. Sparsity stays exact."""
    unstructured = dict(sparsity=0.5, mask_structure="0:0", ignore=["re:.*lm_head"])
    roots = {}
    scale_rows = MoonshotSparseGPTModifier._scale_rows

    def spy(self):
        found = scale_rows(self)
        roots.update({self._module_names[m].rstrip("."): r.clone() for m, r in found.items()})
        return found

    MoonshotSparseGPTModifier._scale_rows = spy
    try:
        weighted = prune(tiny_llama_dir, MoonshotSparseGPTModifier(**unstructured, taylor_weight=0.5, row_weights=True), loader)
    finally:
        MoonshotSparseGPTModifier._scale_rows = scale_rows
    plain = prune(tiny_llama_dir, MoonshotSparseGPTModifier(**unstructured, taylor_weight=0.5, row_weights=False), loader)
    assert len(roots) == 14
    correlations = []
    for name, root in roots.items():
        w_on, w_off = weighted[name + ".weight"], plain[name + ".weight"]
        assert (w_on == 0).float().mean().item() == pytest.approx(0.5, abs=0.02), name
        kept_on, kept_off = (w_on != 0).sum(1).float(), (w_off != 0).sum(1).float()
        m = root.double() ** 2
        gain = kept_on - kept_off  # how many more weights row i keeps with row weights
        correlations.append(torch.corrcoef(torch.stack([m, gain.double()]))[0, 1].item())
    assert not all(torch.equal(weighted[k], plain[k]) for k in linear_weights(plain))
    assert sum(correlations) / len(correlations) > 0.2, correlations


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"sparsity": 0.5, "mask_structure": "0:0"}, True),
        ({"sparsity": 0.5, "mask_structure": "2:4"}, False),  # N:M: cannot apply, off
        ({"sparsity": 0.5, "mask_structure": "0:0", "fisher_mode": "sample", "taylor_weight": 0.5}, False),
        ({"sparsity": 0.5, "mask_structure": "0:0", "row_weights": False}, False),
    ],
    ids=["unstructured-token", "2of4", "sample-mode", "explicitly-off"],
)
def test_default_row_weights(extra, expected):
    assert MoonshotSparseGPTModifier(**extra).row_weights is expected


def test_row_weights_need_token_mode_and_an_unstructured_mask():
    with pytest.raises(ValidationError, match="row_weights=True needs fisher_mode='token' and unstructured"):
        MoonshotSparseGPTModifier(**COMMON, row_weights=True)
    with pytest.raises(ValidationError, match="row_weights=True needs fisher_mode='token' and unstructured"):
        MoonshotSparseGPTModifier(sparsity=0.5, fisher_mode="sample", taylor_weight=0.5, row_weights=True)


def test_run_oneshot_refuses_to_write_from_every_rank(tmp_path, monkeypatch):
    """Under a process group every rank would stage and rename the output directory."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with pytest.raises(ValueError, match="torchrun"):
        run_oneshot("unused-model", [], None, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
