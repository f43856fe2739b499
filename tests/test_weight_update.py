"""weight_update on MoonshotSparseGPTModifier: the sweep's mask re-solved, or
an ADMM search, never worse than the sweep on the objective it minimises."""

import pytest
import torch
from pydantic import ValidationError

from llmcompressor.modifiers.pruning import SparseGPTModifier
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

from moonshot_plugins import MoonshotSparseGPTModifier
from moonshot_plugins.llmcompressor.weight_update import LayerSnapshot, damped_hessian, updated_weight
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
