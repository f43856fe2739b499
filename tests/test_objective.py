import pytest
import torch

from llmcompressor.modifiers.pruning.wanda.wanda_sparsify import sparsify_weight as wanda_host

from moonshot_plugins.core import (
    combine_diagonal,
    combine_hessians,
    mean_diagonal,
    moonshot_wanda_scores,
    row_wise_mask,
)


def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3 * n, n, generator=g)
    return a.T @ a


def test_lam_zero_returns_host_statistic_itself():
    h, f = spd(8, 0), spd(8, 1)
    assert combine_hessians(h, f, 0.0) is h
    r = torch.rand(8)
    assert combine_diagonal(r, torch.rand(4, 8), 0) is r


def test_combination_is_scale_free_and_keeps_host_scale():
    h, f = spd(8, 0), spd(8, 1)
    for lam in (0.25, 0.5, 1.0):
        combined = combine_hessians(h, f, lam)
        torch.testing.assert_close(combined, combine_hessians(h, 1e6 * f, lam))
        torch.testing.assert_close(mean_diagonal(combined), mean_diagonal(h))
    expected = 0.5 * h / mean_diagonal(h) + 0.5 * f / mean_diagonal(f)
    torch.testing.assert_close(combine_hessians(h, f, 0.5), expected * mean_diagonal(h))
    torch.testing.assert_close(
        combine_hessians(h, f, 1.0), f * mean_diagonal(h) / mean_diagonal(f)
    )


def test_zero_fisher_falls_back_to_reconstruction():
    h = spd(6, 0)
    torch.testing.assert_close(combine_hessians(h, torch.zeros(6, 6), 0.5), 0.5 * h)


def test_zero_fisher_at_taylor_only_is_an_error():
    """At lam 1 a zero Fisher leaves a zero curvature, which the hosts would
    turn into a fully pruned layer without a word."""
    from moonshot_plugins.core import token_objective_weights

    with pytest.raises(ValueError, match="Fisher is zero.*taylor_weight 1"):
        combine_hessians(spd(6, 0), torch.zeros(6, 6), 1.0)
    with pytest.raises(ValueError, match="Fisher is zero.*taylor_weight 1"):
        combine_diagonal(torch.rand(6) + 0.1, torch.zeros(4, 6), 1.0)
    with pytest.raises(ValueError, match="Fisher is zero.*taylor_weight 1"):
        token_objective_weights(torch.zeros(3, 5), energy=2.0, weighted_energy=0.0, taylor_weight=1.0)
    # below lam 1 the reconstruction term carries the objective, as before
    assert torch.equal(token_objective_weights(torch.zeros(3, 5), 2.0, 0.0, 0.5), torch.full((3, 5), 0.5))


def test_combine_diagonal_matches_definition():
    r = torch.rand(8) + 0.1
    fd = torch.rand(4, 8)
    out = combine_diagonal(r, fd, 0.3)
    expected = 0.7 * r / r.mean() + 0.3 * fd / fd.mean()
    torch.testing.assert_close(out, expected.expand(4, 8) * r.mean())


@pytest.mark.parametrize("lam", [-0.1, 1.01, float("nan")])
def test_bad_taylor_weight(lam):
    with pytest.raises(ValueError, match=r"taylor_weight must be in \[0, 1\]"):
        combine_hessians(spd(4, 0), spd(4, 1), lam)


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="fisher shape"):
        combine_hessians(spd(4, 0), spd(5, 1), 0.5)


@pytest.mark.parametrize("structure", [(2, 4), (0, 0)])
def test_row_wise_mask_equals_wanda_host(structure):
    """With Wanda's own score, our mask selection prunes exactly what Wanda prunes."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 6)
    row_scalars = torch.rand(16)
    n, m = structure
    host = wanda_host(layer, {layer: row_scalars.clone()}, 0.5, n, m)
    weight = layer.weight.detach().clone()
    weight[row_wise_mask(moonshot_wanda_scores(weight, row_scalars), 0.5, n, m)] = 0
    assert torch.equal(weight, host)


def test_row_wise_mask_structure():
    scores = torch.rand(5, 12)
    mask = row_wise_mask(scores, 0.5, 2, 4)
    assert torch.equal(mask.reshape(5, 3, 4).sum(-1), torch.full((5, 3), 2))
    # the pruned entries are the two lowest of each group
    groups = scores.reshape(5, 3, 4)
    kept_min = groups.masked_fill(mask.reshape(5, 3, 4), float("inf")).amin(-1)
    pruned_max = groups.masked_fill(~mask.reshape(5, 3, 4), -float("inf")).amax(-1)
    assert (pruned_max <= kept_min).all()
    mask = row_wise_mask(scores, 0.25, 0, 0)
    assert torch.equal(mask.sum(1), torch.full((5,), 3))


def test_auto_taylor_weight_keeps_half_the_effective_samples():
    from moonshot_plugins.core import auto_taylor_weight, token_objective_weights

    torch.manual_seed(0)
    weights = torch.distributions.LogNormal(0.0, 1.5).sample((4000,))
    energy, weighted = 3.0, 2.0

    def ess(lam):
        c = token_objective_weights(weights, energy, weighted, lam).double()
        return (c.sum() ** 2 / (c.numel() * (c**2).sum())).item()

    for tau in (0.5, 0.8):
        lam = auto_taylor_weight(weights, energy, weighted, tau)
        assert 0.0 < lam < 1.0
        assert ess(lam) == pytest.approx(tau, rel=1e-6)
        # brute force: the largest lam on a fine grid with ESS >= tau
        grid = [i / 2000 for i in range(2001)]
        assert max(l for l in grid if ess(l) >= tau) == pytest.approx(lam, abs=1e-3)
    assert auto_taylor_weight(torch.ones(50), 1.0, 1.0) == 1.0  # uniform weights: Taylor only
    assert auto_taylor_weight(torch.zeros(50), 1.0, 0.0) == 0.0  # no gradient: reconstruction only
    with pytest.raises(ValueError, match="min_effective_fraction"):
        auto_taylor_weight(weights, energy, weighted, 0.0)


def test_row_objective_weights_cap_heavy_tailed_rows():
    """m_i = (1-lam) + lam s_i where the row shares are mild; where a few rows
    dominate, lam is capped so the rows keep half their effective sample size
    and no row's weight falls to ~0 (at lam = 1 it would be pruned whole)."""
    from moonshot_plugins.core import row_objective_weights

    def ess(m):
        return (m.sum() ** 2 / (m.numel() * (m**2).sum())).item()

    mild = torch.linspace(0.5, 1.5, 101, dtype=torch.float64)  # mean 1
    for lam in (0.0, 0.3, 1.0):
        torch.testing.assert_close(row_objective_weights(mild, lam), (1 - lam) + lam * mild)
    torch.manual_seed(0)
    heavy = torch.distributions.LogNormal(0.0, 2.0).sample((1000,)).double()
    heavy = heavy / heavy.mean()
    assert ess(heavy) < 0.2  # lam = 1 uncapped: a few rows would decide the mask
    m = row_objective_weights(heavy, 1.0)
    assert ess(m) == pytest.approx(0.5, rel=1e-6)
    assert m.min() > 0.3 and m.mean().item() == pytest.approx(1.0)
    low = row_objective_weights(heavy, 0.05)  # below the cap: unchanged
    torch.testing.assert_close(low, 0.95 + 0.05 * heavy)
    with pytest.raises(ValueError, match="taylor_weight"):
        row_objective_weights(heavy, 1.5)


def test_auto_taylor_weight_from_summed_moments_of_shards_is_the_whole_sets():
    """Moments of disjoint shards add up (one per process under torchrun): the
    lam they give is the one of every position at once."""
    from moonshot_plugins.core import (
        auto_taylor_weight,
        auto_taylor_weight_from_moments,
        token_weight_moments,
    )

    torch.manual_seed(0)
    weights = torch.distributions.LogNormal(0.0, 1.5).sample((4000,))
    summed = token_weight_moments(weights[:1500]) + token_weight_moments(weights[1500:])
    whole = auto_taylor_weight(weights, 3.0, 2.0)
    assert 0.0 < whole < 1.0
    assert auto_taylor_weight_from_moments(summed, 3.0, 2.0) == pytest.approx(whole, rel=1e-12)
    assert token_weight_moments(weights)[0].item() == 4000.0
