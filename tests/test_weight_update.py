"""weight_update on MoonshotSparseGPTModifier: the sweep's mask re-solved, or
an ADMM search, never worse than the sweep on the objective it minimises; and
``fisher_rows: per_row``, the re-solve with each row's own Fisher."""

import re

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from llmcompressor.modifiers.pruning import SparseGPTModifier
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

from moonshot_plugins import MoonshotSparseGPTModifier
from moonshot_plugins.core import combine_hessians
from moonshot_plugins.llmcompressor.gradient_pass import collect_layer_statistics
from moonshot_plugins.llmcompressor.weight_update import LayerSnapshot, RowFisher, damped_hessian, updated_weight
from tests.test_modifiers import linear_weights, loader, prune  # noqa: F401 (loader: the shared fixture)

COMMON = dict(sparsity=0.5, mask_structure="2:4", ignore=["re:.*lm_head"])


def _layer(seed: int, d_out: int = 12, d_in: int = 32):
    torch.manual_seed(seed)
    x = torch.randn(200, d_in) @ torch.randn(d_in, d_in)  # correlated inputs
    linear = torch.nn.Linear(d_in, d_out, bias=False)
    return linear, x.T @ x / x.shape[0]


def _objective(hessian, dense, weight):
    delta = (weight - dense).detach()
    return float(((delta @ hessian) * delta).sum())


@pytest.mark.parametrize("update", ["resolve", "admm"])
@pytest.mark.parametrize("structure", [(2, 4, 0.5), (0, 0, 0.6)], ids=["2:4", "60%"])
def test_the_update_beats_the_sweep_on_its_own_objective(update, structure):
    prune_n, prune_m, sparsity = structure
    for seed in range(5):
        linear, hessian = _layer(seed)
        dense = linear.weight.detach().clone()
        _, swept = sparsify_weight(linear, {linear: hessian.clone()}, sparsity, prune_n, prune_m,
                                   block_size=128, dampening_frac=0.01, preserve_sparsity_mask=False)
        snapshot = LayerSnapshot(dense, hessian, sparsity)
        new, before, after = updated_weight(update, snapshot, swept, 0.01, prune_n, prune_m)
        damped = damped_hessian(hessian, 0.01)
        assert before == pytest.approx(_objective(damped, dense, swept), rel=1e-4)
        assert after == pytest.approx(_objective(damped, dense, new), rel=1e-4)
        assert after < before  # the greedy sweep is never the exact minimum here
        kept = new != 0
        if update == "resolve":
            assert torch.equal(kept, swept != 0)
        elif prune_n:
            assert (kept.reshape(kept.shape[0], -1, prune_m).sum(-1) == prune_m - prune_n).all()
        else:
            assert (kept.sum(1) == round(dense.shape[1] * (1 - sparsity))).all()


def test_damped_hessian_matches_sparsegpt_conditioning():
    h = torch.diag(torch.tensor([2.0, 0.0, 4.0]))
    expected = torch.diag(torch.tensor([2.0, 1.0, 4.0]) + 0.1 * 7.0 / 3.0)
    torch.testing.assert_close(damped_hessian(h, 0.1), expected)
    assert h[1, 1] == 0  # the snapshot is not changed


def _prune(model_dir, modifier, loader):
    return linear_weights(prune(model_dir, modifier, loader))


def test_resolve_keeps_the_host_mask_and_admm_keeps_2_of_4(tiny_llama_dir, loader):
    host = _prune(tiny_llama_dir, SparseGPTModifier(**COMMON), loader)
    resolved = _prune(tiny_llama_dir, MoonshotSparseGPTModifier(**COMMON, taylor_weight=0.0, weight_update="resolve"), loader)
    searched = _prune(tiny_llama_dir, MoonshotSparseGPTModifier(**COMMON, taylor_weight=0.5, weight_update="admm"), loader)
    first = [k for k in host if ".layers.0." in k]  # inputs still dense: same Hessian as the host's
    for key in first:
        assert torch.equal(host[key] != 0, resolved[key] != 0), key
    assert any(not torch.equal(host[k], resolved[k]) for k in first)
    for key, weight in searched.items():
        groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
        assert (groups == 2).all(), key


def test_bad_weight_update_is_rejected():
    with pytest.raises(ValidationError, match=r"weight_update must be one of \['host', 'resolve', 'admm'\], got 'cg'"):
        MoonshotSparseGPTModifier(**COMMON, weight_update="cg")


def test_wanda_resolve_keeps_wanda_mask_and_moves_the_kept_weights(tiny_llama_dir, loader):
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    from moonshot_plugins import MoonshotWandaModifier

    host = _prune(tiny_llama_dir, WandaPruningModifier(**COMMON), loader)
    resolved = _prune(tiny_llama_dir, MoonshotWandaModifier(**COMMON, taylor_weight=0.0, weight_update="resolve"), loader)
    mixed = _prune(tiny_llama_dir, MoonshotWandaModifier(**COMMON, taylor_weight=0.5, weight_update="resolve"), loader)
    first = [k for k in host if ".layers.0." in k]
    for key in first:
        assert torch.equal(host[key] != 0, resolved[key] != 0), key
        kept = host[key] != 0
        assert not torch.equal(host[key][kept], resolved[key][kept]), key  # Wanda never moves them
    for key, weight in {**resolved, **mixed}.items():
        groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
        assert (groups == 2).all(), key


def test_wanda_rejects_admm():
    from moonshot_plugins import MoonshotWandaModifier

    with pytest.raises(ValidationError, match=r"weight_update must be one of \['host', 'resolve'\] for Wanda, got 'admm'"):
        MoonshotWandaModifier(**COMMON, weight_update="admm")


# -- fisher_rows: per_row ----------------------------------------------------------------

SAMPLE = dict(COMMON, fisher_mode="sample", taylor_weight=0.5)


@pytest.mark.parametrize("rank", [None, 2])
def test_the_gradient_pass_keeps_each_samples_weight_gradient_as_row_factors(tiny_llama_dir, loader, rank):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)
    layer = model.model.layers[1].self_attn.q_proj
    records, used = collect_layer_statistics(
        model, loader, {"q_proj": layer}, statistic="matrix", taylor_weight=0.5, fisher_mode="sample",
        fisher_samples=None, offload_fisher=False, gradient_dtype="float32", blocks=list(model.model.layers),
        desc="test", row_factors=True, row_factor_rank=rank,
    )
    record = records[layer]
    factors = record.row_factors
    assert factors.device.type == "cpu" and factors.dtype == torch.float32
    grads = []  # brute force: autograd, one sample's own mean-token loss at a time, fp64
    for batch in loader:
        model.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append(layer.weight.grad.clone())
    assert used == len(grads) == 6
    fisher = sum(g[:, :, None] * g[:, None, :] for g in grads) / used  # F_j, (d_out, d_in, d_in)
    rows = factors.double() @ factors.double().transpose(1, 2)
    if rank is None:
        assert factors.shape == (*layer.weight.shape, used)
        for i, g in enumerate(grads):  # column i is sample i's gradient / sqrt(N)
            torch.testing.assert_close(factors[..., i].double() * used**0.5, g, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(rows, fisher, rtol=1e-5, atol=1e-9)
    else:
        assert factors.shape == (*layer.weight.shape, rank)
        assert not torch.allclose(rows, fisher, rtol=0.1)  # a sketch, unbiased only on average
    # the sweep's sample Fisher is the rows' average of the exact F_j
    torch.testing.assert_close(record.fisher.double(), fisher.mean(0), rtol=1e-5, atol=1e-9)


def test_per_row_update_minimises_its_stated_objective_on_the_mask():
    lam, frac = 0.4, 0.01
    linear, hessian = _layer(0)
    dense = linear.weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    factors = torch.randn(12, 32, 3, generator=g) * torch.rand(32, 1, generator=g)
    fisher = torch.einsum("jdk,jek->de", factors, factors) / 12
    combined = combine_hessians(hessian, fisher, lam)  # what the sweep solves
    _, swept = sparsify_weight(linear, {linear: combined.clone()}, 0.5, 2, 4, block_size=128,
                               dampening_frac=frac, preserve_sparsity_mask=False)
    swept = swept.detach()
    snapshot = LayerSnapshot(dense, combined, 0.5, RowFisher(hessian, fisher, factors, lam))
    new, before, after = updated_weight("resolve", snapshot, swept, frac, 2, 4)
    assert torch.equal(new != 0, swept != 0)
    # row j: s_H ((1-lam) recon_j / s_H + lam taylor_j / s_F), damped as the sweep was
    s_h, s_f = hessian.diagonal().mean(), fisher.diagonal().mean()
    damping = frac * combined.diagonal().mean()
    exact = torch.zeros_like(dense, dtype=torch.float64)
    total = {"swept": 0.0, "new": 0.0}
    for j in range(12):
        a = (s_h * ((1 - lam) * hessian / s_h + lam * factors[j] @ factors[j].T / s_f)).double()
        a += damping * torch.eye(32, dtype=torch.float64)
        support = (swept[j] != 0).nonzero().flatten()
        exact[j, support] = torch.linalg.solve(a[support][:, support], (a @ dense[j].double())[support])
        for name, weight in (("swept", swept), ("new", new)):
            delta = (weight[j] - dense[j]).double()
            total[name] += float(delta @ a @ delta)
    torch.testing.assert_close(new.double(), exact, rtol=1e-3, atol=1e-4)
    assert before == pytest.approx(total["swept"], rel=1e-4)
    assert after == pytest.approx(total["new"], rel=1e-4)
    assert after < before


def test_per_row_resolve_keeps_the_sweep_mask_and_is_shared_at_lam_zero(tiny_llama_dir, loader):
    shared = _prune(tiny_llama_dir, MoonshotSparseGPTModifier(**SAMPLE, weight_update="resolve"), loader)
    per_row = _prune(tiny_llama_dir, MoonshotSparseGPTModifier(**SAMPLE, weight_update="resolve", fisher_rows="per_row"), loader)
    first = [k for k in shared if ".layers.0." in k]  # the same sweep: same inputs, same Hessian
    for key in first:
        assert torch.equal(shared[key] != 0, per_row[key] != 0), key
    assert all(not torch.equal(shared[k], per_row[k]) for k in first)
    at_zero = dict(SAMPLE, taylor_weight=0.0, weight_update="resolve")
    lam0 = _prune(tiny_llama_dir, MoonshotSparseGPTModifier(**at_zero), loader)
    lam0_per_row = _prune(tiny_llama_dir, MoonshotSparseGPTModifier(**at_zero, fisher_rows="per_row"), loader)
    for key in lam0:
        assert torch.equal(lam0[key], lam0_per_row[key]), key


def test_per_row_admm_with_a_sketch_keeps_2_of_4(tiny_llama_dir, loader):
    modifier = MoonshotSparseGPTModifier(**SAMPLE, weight_update="admm", fisher_rows="per_row", fisher_row_rank=2)
    for key, weight in _prune(tiny_llama_dir, modifier, loader).items():
        groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
        assert (groups == 2).all(), key


@pytest.mark.parametrize("fields, message", [
    (dict(fisher_rows="rows"), r"fisher_rows must be one of \['shared', 'per_row'\], got 'rows'"),
    (dict(fisher_rows="per_row", fisher_mode="sample"),
     r"fisher_rows='per_row' needs weight_update 'resolve' or 'admm' .* got weight_update='host'"),
    (dict(fisher_rows="per_row", weight_update="resolve"),
     r"fisher_rows='per_row' needs fisher_mode='sample' .* got fisher_mode='token'"),
    (dict(fisher_rows="per_row", fisher_mode="sample", weight_update="admm", fisher_row_rank=0),
     r"fisher_row_rank must be a positive integer .* or None .* got 0"),
    (dict(fisher_row_rank=4), r"fisher_row_rank applies only with fisher_rows='per_row'"),
])
def test_bad_fisher_rows_are_rejected(fields, message):
    with pytest.raises(ValidationError, match=message):
        MoonshotSparseGPTModifier(**COMMON, **fields)


# -- resolve_max_iters -------------------------------------------------------------------

def test_resolve_max_iters_caps_the_re_solve():
    linear, hessian = _layer(0)
    dense = linear.weight.detach().clone()
    _, swept = sparsify_weight(linear, {linear: hessian.clone()}, 0.5, 2, 4,
                               block_size=128, dampening_frac=0.01, preserve_sparsity_mask=False)
    snapshot = LayerSnapshot(dense, hessian, 0.5)
    results = {cap: updated_weight("resolve", snapshot, swept, 0.01, 2, 4, cap) for cap in (1, 3, None, 100)}
    objectives = [results[cap][2] for cap in (1, 3, None)]
    assert results[1][1] > objectives[0] > objectives[1] > objectives[2]  # each iteration lowers it
    torch.testing.assert_close(results[None][0], results[100][0], rtol=0, atol=0)  # None: the cap 100


@pytest.mark.parametrize("host, default_cap", [("sparsegpt", 100), ("wanda", 50)])
def test_resolve_max_iters_reaches_the_solver_of_both_modifiers(tiny_llama_dir, loader, host, default_cap):
    from moonshot_plugins import MoonshotWandaModifier

    cls = MoonshotSparseGPTModifier if host == "sparsegpt" else MoonshotWandaModifier
    fields = dict(COMMON, taylor_weight=0.0, weight_update="resolve")
    default = _prune(tiny_llama_dir, cls(**fields), loader)
    explicit = _prune(tiny_llama_dir, cls(**fields, resolve_max_iters=default_cap), loader)
    one_step = _prune(tiny_llama_dir, cls(**fields, resolve_max_iters=1), loader)
    assert all(torch.equal(default[k], explicit[k]) for k in default)
    assert any(not torch.equal(default[k], one_step[k]) for k in default)
    for key in (k for k in default if ".layers.0." in k):  # same inputs: the cap moves weights, not the mask
        assert torch.equal(default[key] != 0, one_step[key] != 0), key


@pytest.mark.parametrize("host", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("fields, message", [
    (dict(weight_update="resolve", resolve_max_iters=0), r"resolve_max_iters must be a positive integer .* got 0"),
    (dict(weight_update="resolve", resolve_max_iters=True), r"resolve_max_iters must be a positive integer .* got True"),
    (dict(weight_update="resolve", resolve_max_iters="50"), r"resolve_max_iters must be a positive integer .* got '50'"),
])
def test_bad_resolve_max_iters_is_rejected(host, fields, message):
    from moonshot_plugins import MoonshotWandaModifier

    cls = MoonshotSparseGPTModifier if host == "sparsegpt" else MoonshotWandaModifier
    with pytest.raises(ValidationError, match=message):
        cls(**COMMON, **fields)


@pytest.mark.parametrize("host, solved", [("sparsegpt", r"\['resolve', 'admm'\]"), ("wanda", r"\['resolve'\]")])
def test_resolve_max_iters_with_the_host_update_names_the_hosts_own_updates(host, solved):
    from moonshot_plugins import MoonshotWandaModifier

    cls = MoonshotSparseGPTModifier if host == "sparsegpt" else MoonshotWandaModifier
    message = rf"resolve_max_iters applies only with weight_update in {solved}, got weight_update='host'"
    with pytest.raises(ValidationError, match=message):
        cls(**COMMON, resolve_max_iters=50)


def test_admm_rho_reaches_the_search(tiny_llama_dir, loader):
    fields = dict(COMMON, taylor_weight=0.0, weight_update="admm")
    default = _prune(tiny_llama_dir, MoonshotSparseGPTModifier(**fields), loader)
    explicit = _prune(tiny_llama_dir, MoonshotSparseGPTModifier(**fields, admm_rho=0.1), loader)
    large = _prune(tiny_llama_dir, MoonshotSparseGPTModifier(**fields, admm_rho=50.0), loader)
    assert all(torch.equal(default[k], explicit[k]) for k in default)
    # a large initial penalty pins Z to the sweep's mask at once: some layer's mask differs
    assert any(not torch.equal(default[k] != 0, large[k] != 0) for k in default)


@pytest.mark.parametrize("value", [0, -0.5, float("nan"), float("inf"), True, "0.3", None])
def test_bad_admm_rho_is_rejected(value):
    with pytest.raises(ValidationError, match=rf"admm_rho must be a finite number > 0 .* got {re.escape(repr(value))}"):
        MoonshotSparseGPTModifier(**COMMON, weight_update="admm", admm_rho=value)


@pytest.mark.parametrize("update", ["host", "resolve"])
def test_admm_rho_without_admm_is_rejected(update):
    message = rf"admm_rho applies only with weight_update='admm', got weight_update='{update}'"
    with pytest.raises(ValidationError, match=message):
        MoonshotSparseGPTModifier(**COMMON, weight_update=update, admm_rho=0.3)
