"""MoonshotImportance and the core extensions it uses, on tiny random models.

References are computed independently: per-sample weight gradients from
autograd (one backward per sample, weights requiring grad), input moments
from captured inputs, reconstruction errors by actually zeroing a channel.
"""

import copy

import pytest
import torch
import torch_pruning as tp
from timm.layers import BatchNormAct2d
from torch import nn

from moonshot_plugins.core import FisherCollector, layer_inputs, run_gradient_pass
from moonshot_plugins.torch_pruning import MoonshotImportance

N = 6


class NormNet(nn.Module):
    """Conv -> BatchNormAct2d(ReLU6) -> depthwise conv -> BN -> pool -> LayerNorm -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bnact = BatchNormAct2d(8, act_layer=nn.ReLU6)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.bn(self.dw(self.bnact(self.conv(x))))
        return self.fc(self.ln(torch.relu(h).mean(dim=(2, 3))))


def norm_net():
    torch.manual_seed(0)
    model = NormNet()
    with torch.no_grad():  # non-trivial running statistics and affine params
        for bn in (model.bnact, model.bn):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(N, 3, 5, 5)
    y = torch.randint(0, 4, (N,))
    return model, x, y


def losses(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def per_sample_weight_grads(model, x, y, modules):
    grads = {name: [] for name in modules}
    for i in range(len(x)):
        model.zero_grad()
        losses(model, (x[i : i + 1], y[i : i + 1])).sum().backward()
        for name, m in modules.items():
            grads[name].append(m.weight.grad.detach().clone())
    model.zero_grad()
    return {name: torch.stack(g) for name, g in grads.items()}


# -- core extensions ----------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 4])
def test_grouped_conv_and_norm_diagonal_fisher_match_per_sample_grads(batch_size):
    model, x, y = norm_net()
    modules = {"conv": model.conv, "bnact": model.bnact, "dw": model.dw, "bn": model.bn, "ln": model.ln, "fc": model.fc}
    grads = per_sample_weight_grads(model, x, y, modules)
    collector = FisherCollector(
        modules, fisher_mode="sample", matrix=False, diagonal=True, grouped_convs=True, norm_layers=True,
        sample_rows=True,
    )
    batches = [(x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, N, batch_size)]
    assert run_gradient_pass(model, batches, collector, losses) == N
    for name, m in modules.items():
        expect = grads[name].square().mean(0)
        expect = expect.flatten(1) if expect.dim() > 2 else expect
        torch.testing.assert_close(collector.diagonal_fisher(name), expect, rtol=1e-4, atol=1e-8)


def test_token_mode_norm_and_depthwise_differ_from_sample_mode():
    model, x, y = norm_net()
    out = {}
    for mode in ("sample", "token"):
        c = FisherCollector({"dw": model.dw, "bn": model.bn}, fisher_mode=mode, matrix=False,
                            diagonal=True, grouped_convs=True, norm_layers=True)
        run_gradient_pass(model, [(x, y)], c, losses)
        out[mode] = (c.diagonal_fisher("dw"), c.diagonal_fisher("bn"))
    assert out["token"][0].shape == out["sample"][0].shape == (8, 9)
    assert out["token"][1].shape == (8,)
    assert not torch.allclose(out["token"][0], out["sample"][0])


def test_input_moments_from_forward_passes_alone():
    model, x, _ = norm_net()
    captured = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: captured.__setitem__(n, a[0].detach()))
             for n, m in {"conv": model.conv, "dw": model.dw, "fc": model.fc}.items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    collector = FisherCollector({"conv": model.conv, "dw": model.dw, "fc": model.fc}, matrix=False,
                                input_moments=True, grouped_convs=True, sample_rows=True)
    with collector, torch.no_grad():
        model(x[:2])
        model(x[2:])
    for name, m in {"conv": model.conv, "fc": model.fc}.items():
        rows = layer_inputs(m, captured[name]).reshape(-1, layer_inputs(m, captured[name]).shape[-1])
        torch.testing.assert_close(collector.input_moment(name), rows.T @ rows / N)
    cols = layer_inputs(model.dw, captured["dw"])  # (B, T, 8*9), channel-major
    per_channel = cols.reshape(-1, 8, 9)
    expect = torch.einsum("tci,tcj->cij", per_channel, per_channel) / N
    torch.testing.assert_close(collector.input_moment("dw"), expect)
    assert collector.num_samples["conv"] == 0  # no gradient was needed


def test_core_extension_errors():
    with pytest.raises(ValueError, match="pass matrix=False"):
        FisherCollector({"dw": nn.Conv2d(4, 4, 3, groups=4)}, grouped_convs=True)
    with pytest.raises(ValueError, match="pass matrix=False"):
        FisherCollector({"bn": nn.BatchNorm2d(4)}, norm_layers=True)
    with pytest.raises(ValueError, match="no affine weight"):
        FisherCollector({"bn": nn.BatchNorm2d(4, affine=False)}, matrix=False, diagonal=True, norm_layers=True)
    c = FisherCollector({"fc": nn.Linear(3, 2)}, matrix=False, input_moments=True)
    with pytest.raises(RuntimeError, match="No input reached layer 'fc'"):
        c.input_moment("fc")
    with pytest.raises(RuntimeError, match="input_moments=False"):
        FisherCollector({"fc": nn.Linear(3, 2)}).input_moment("fc")


# -- MoonshotImportance ----------------------------------------------------------------


def groups_of(model, example):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    return list(dg.get_all_groups(ignored_layers=[model.fc], root_module_types=[nn.Conv2d, nn.Linear]))


def test_lam_one_is_hessian_importance_with_the_per_sample_fisher():
    model, x, y = norm_net()
    imp = MoonshotImportance(lam=1.0)
    imp.accumulate(model, [(x[:3], y[:3]), (x[3:], y[3:])])
    scores = [imp(g) for g in groups_of(model, x[:1])]

    # Reference: Torch-Pruning's HessianImportance reading mean squared
    # per-sample gradients (what its accumulate_grad intends) from .grad.
    ref_model = copy.deepcopy(model)
    named = dict(ref_model.named_modules())
    grads = per_sample_weight_grads(ref_model, x, y, {n: named[n] for n in ("conv", "bnact", "dw", "bn", "ln", "fc")})
    for name, g in grads.items():
        named[name].weight.grad = g.square().mean(0)
    hessian = tp.importance.HessianImportance()
    ref = [hessian(g) for g in groups_of(ref_model, x[:1])]
    assert len(scores) == len(ref) > 0
    for ours, theirs in zip(scores, ref):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)
        assert torch.equal(ours.argsort(), theirs.argsort())


def test_lam_zero_is_the_reconstruction_error_of_removing_each_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(20, 5)
    imp = MoonshotImportance(lam=0.0, recon_scale="none", group_reduction="sum", normalizer=None)
    imp.accumulate(model, [(x, torch.zeros(20, dtype=torch.long))])
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    group = dg.get_pruning_group(model[0], tp.prune_linear_out_channels, idxs=list(range(6)))
    scores = imp(group)
    # Exact errors: zero hidden unit k in layer 0's output (pre-bias) and in layer 2's input.
    with torch.no_grad():
        pre = x @ model[0].weight.T
        hidden = torch.tanh(model[0](x))
        expect = torch.stack([
            pre[:, k].square().sum() / 20 + torch.outer(hidden[:, k], model[2].weight[:, k]).square().sum() / 20
            for k in range(6)
        ])
    torch.testing.assert_close(scores, expect, rtol=1e-4, atol=1e-6)


def test_mix_is_the_weighted_sum_of_the_normalised_objectives():
    model, x, y = norm_net()
    base = MoonshotImportance(lam=0.5)
    base.accumulate(model, [(x, y)])
    groups = groups_of(model, x[:1])
    assert len(groups) >= 1
    for g in groups:
        mix, recon, taylor = (base.with_lam(lam)(g) for lam in (0.5, 0.0, 1.0))
        torch.testing.assert_close(recon.mean(), torch.tensor(1.0))
        torch.testing.assert_close(mix, 0.5 * recon + 0.5 * taylor)
        assert not torch.allclose(recon, taylor)


@pytest.mark.parametrize("objective_scale", ["mean", "median"])
def test_mix_divides_each_objective_by_its_scale_then_normalises(objective_scale):
    model, x, y = norm_net()
    raw = MoonshotImportance(lam=0.5, normalizer=None, objective_scale=objective_scale)
    raw.accumulate(model, [(x, y)])
    scaled = MoonshotImportance(lam=0.5, normalizer="mean", objective_scale=objective_scale)
    scaled.accumulate(model, [(x, y)])
    for g in groups_of(model, x[:1]):
        recon, taylor = raw.with_lam(0.0)(g), raw.with_lam(1.0)(g)
        scale = (lambda t: t.mean()) if objective_scale == "mean" else (lambda t: t.median())
        expect = 0.3 * recon / scale(recon) + 0.7 * taylor / scale(taylor)
        torch.testing.assert_close(raw.with_lam(0.7)(g), expect)
        torch.testing.assert_close(scaled.with_lam(0.7)(g), expect / expect.mean())
        # lam = 1 is the Taylor term under Torch-Pruning's normaliser, whatever the scale
        torch.testing.assert_close(scaled.with_lam(1.0)(g), taylor / taylor.mean())


def test_statistics_follow_pruned_weights():
    """After one group is pruned, the next group is scored with the dense
    statistics restricted to the weights that remain."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(16, 4)
    imp = MoonshotImportance(lam=0.0, recon_scale="none", group_reduction="sum", normalizer=None)
    imp.accumulate(model, [(x, torch.zeros(16, dtype=torch.long))])
    dense = copy.deepcopy(model)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    dg.get_pruning_group(model[0], tp.prune_linear_out_channels, idxs=[1, 4]).prune()
    assert model[2].weight.shape == (5, 4)
    scores = imp(dg.get_pruning_group(model[2], tp.prune_linear_out_channels, idxs=list(range(5))))
    keep = [0, 2, 3, 5]
    with torch.no_grad():
        h1 = torch.relu(dense[0](x))  # dense input of layer 2
        out_err = (h1[:, keep] @ dense[2].weight[:, keep].T).square().sum(0) / 16
        h2 = torch.relu(dense[2](h1))  # dense input of layer 4
        in_err = h2.square().sum(0) / 16 * dense[4].weight.square().sum(0)
    torch.testing.assert_close(scores, out_err + in_err, rtol=1e-4, atol=1e-6)
    # and the unpruned dense scores differ: the removed inputs no longer count
    full = (h1 @ dense[2].weight.T).square().sum(0) / 16 + in_err
    assert not torch.allclose(scores, full)


def test_bad_input():
    for lam in (-0.1, 1.5, "x"):
        with pytest.raises(ValueError, match=r"lam must be .*\[0, 1\]"):
            MoonshotImportance(lam=lam)
    with pytest.raises(ValueError, match=r"objective_scale must be one of \['mean', 'median'\]"):
        MoonshotImportance(objective_scale="max")
    with pytest.raises(ValueError, match=r"recon_scale must be one of \['layer', 'none'\]"):
        MoonshotImportance(recon_scale="global")
    model, x, y = norm_net()
    group = groups_of(model, x[:1])[0]
    with pytest.raises(RuntimeError, match="before any calibration data was seen"):
        MoonshotImportance()(group)
    imp = MoonshotImportance(lam=0.0)
    imp.accumulate(model, [(x, y)])
    with pytest.raises(RuntimeError, match="needs the Fisher"):
        imp.with_lam(0.5)(group)
    scores = imp(group)
    model.zero_grad(set_to_none=True)  # the marks do not live in .grad
    torch.testing.assert_close(imp(group), scores)
    model.conv.weight = nn.Parameter(model.conv.weight.detach().clone())  # replaced outside Torch-Pruning
    with pytest.raises(RuntimeError, match="lost its MOONSHOT index marks"):
        imp(group)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lam": True}, r"lam must be a number in \[0, 1\], got True"),
        ({"group_reduction": "median"}, r"group_reduction must be one of \['mean', 'sum', 'max', 'prod', 'first', 'gate'\], got 'median'"),
        ({"group_reduction": None}, r"group_reduction must be one of .*, got None"),
        ({"normalizer": "l2"}, r"normalizer must be one of \['mean', 'sum', 'max', 'standarization', 'gaussian', 'lamp'\], 'sentinel_q' with q in \[0, 1\), a callable or None, got 'l2'"),
        ({"normalizer": "sentinel_2"}, r"normalizer must be one of .*, got 'sentinel_2'"),
    ],
)
def test_options_are_checked_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        MoonshotImportance(**options)


@pytest.mark.parametrize("normalizer", ["sum", "standarization", "max", "gaussian", "lamp", "sentinel_0.5", None, torch.sigmoid])
@pytest.mark.parametrize("group_reduction", ["mean", "sum", "max", "prod", "first", "gate"])
def test_every_allowed_option_scores(group_reduction, normalizer):
    model, x, y = norm_net()
    imp = MoonshotImportance(lam=0.5, group_reduction=group_reduction, normalizer=normalizer)
    imp.accumulate(model, [(x, y)])
    for group in groups_of(model, x[:1]):
        assert torch.isfinite(imp(group)).all()


@pytest.mark.parametrize("with_grads", [True, False], ids=["grads", "no-grads"])
def test_an_optimiser_step_after_pruning_uses_the_users_gradients(with_grads):
    """The user's .grad survives calibration and Torch-Pruning's step(), pruned
    along with its weight, so one SGD step moves each weight by lr * its own
    gradient (index marks left in .grad moved conv.weight by 1.9 here, against 0.008)."""
    from moonshot_plugins.torch_pruning.index_marks import index_marks

    model, x, y = norm_net()
    model.train()
    if with_grads:
        losses(model, (x, y)).mean().backward()
    dense_grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    imp = MoonshotImportance(lam=0.5)
    imp.accumulate(model, [(x, y)])
    pruner = tp.pruner.MetaPruner(model, x[:1], importance=imp, pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    assert model.conv.weight.shape[0] < 8  # really pruned
    lr = 0.01
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=lr).step()
    largest = max((g.abs().max().item() for g in dense_grads.values() if g is not None), default=0.0)
    for name, p in model.named_parameters():
        if not with_grads:
            assert p.grad is None, name
            assert torch.equal(p, before[name]), name
            continue
        marks = index_marks(p)
        if marks is not None:  # a scored weight: its gradient is the user's, restricted to what remains
            torch.testing.assert_close(p.grad, dense_grads[name].flatten()[marks.long()], rtol=0, atol=0)
        torch.testing.assert_close(p.detach(), before[name] - lr * p.grad)
        assert (p.detach() - before[name]).abs().max() <= lr * largest + 1e-7, name


def test_group_without_prunable_weights_is_none():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    x, y = torch.randn(4, 3, 5, 5), torch.randint(0, 2, (4,))
    imp = MoonshotImportance(lam=0.5, target_types=[nn.Linear])  # no Linear in the first group
    imp.accumulate(model, [(x, y)])
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    first = dg.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(4)))
    assert imp(first) is None
    second = dg.get_pruning_group(model[2], tp.prune_conv_out_channels, idxs=list(range(4)))
    assert imp(second).shape == (4,)  # the Linear's input channels are scored
