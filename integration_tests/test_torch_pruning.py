"""MetaPruner + MoonshotImportance end to end on (small, random) timm models."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torch_pruning as tp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from moonshot_plugins.torch_pruning import MoonshotImportance, sync_vit_heads, vit_num_heads


def small_vit():
    return VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)


MODELS = {
    "resnet18": lambda: timm.create_model("resnet18", num_classes=10),
    "efficientnet_lite0": lambda: timm.create_model("efficientnet_lite0", num_classes=10),
    "vit": small_vit,
}


def data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def meta_prune(model, importance, ratio, example, **kwargs):
    pruner = tp.pruner.MetaPruner(
        model, example, importance=importance, pruning_ratio=ratio,
        ignored_layers=[model.get_classifier()], num_heads=vit_num_heads(model), **kwargs,
    )
    pruner.step()
    sync_vit_heads(model, pruner)
    return model


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_metapruner_prunes_timm_model(name, ratio):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x, y = data()
    dense_params = tp.utils.count_params(model)
    widths = {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    imp = MoonshotImportance(lam=0.5)
    assert imp.accumulate(model, [(x[:4], y[:4]), (x[4:], y[4:])]) == 8
    meta_prune(model, imp, ratio, x[:1])
    assert model(x).shape == (8, 10)
    kept = tp.utils.count_params(model) / dense_params
    # channels shrink by `ratio` on both sides of most weights: ~(1 - ratio)^2 of the parameters
    assert (1 - ratio) ** 2 * 0.85 < kept < (1 - ratio) ** 2 * 1.25, kept
    shrunk = [n for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.shape[0] < widths[n]]
    assert len(shrunk) > len(widths) // 2


def test_lam_one_prunes_exactly_like_hessian_importance():
    """Same Fisher in .grad -> identical pruned models, group after group."""
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0", num_classes=10).eval()
    x, y = data()
    ours = copy.deepcopy(model)
    imp = MoonshotImportance(lam=1.0)
    imp.accumulate(ours, [(x, y)])
    named = dict(model.named_modules())
    for name, fisher in imp._fishers.items():
        named[name].weight.grad = fisher.clone()
    meta_prune(ours, imp, 0.4, x[:1])
    meta_prune(model, tp.importance.HessianImportance(), 0.4, x[:1])
    ours_sd, ref_sd = ours.state_dict(), model.state_dict()
    assert ours_sd.keys() == ref_sd.keys()
    for key in ref_sd:
        assert torch.equal(ours_sd[key], ref_sd[key]), key


class ReconReference:
    """Brute-force reconstruction importance: zero one channel, measure the layer output change."""

    def __init__(self, model, x):
        self.inputs = {}
        def capture(module, args, output):
            self.inputs[module] = args[0].detach()

        hooks = [m.register_forward_hook(capture) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        self.n = len(x)

    @torch.no_grad()
    def __call__(self, group):
        scores = []
        for i, (dep, idxs) in enumerate(group):
            layer, fn = dep.target.module, dep.handler
            if layer not in self.inputs:
                continue
            x = self.inputs[layer]
            out = self._out(layer, x)
            energy = out.square().sum()
            errs = torch.zeros(len(idxs))
            for pos, k in enumerate(idxs):
                if fn in (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_depthwise_conv_out_channels):
                    errs[pos] = out[:, k].square().sum() if out.dim() == 4 else out[..., k].square().sum()
                elif fn in (tp.prune_conv_in_channels, tp.prune_linear_in_channels):
                    xk = x.clone()
                    if xk.dim() == 4:
                        xk[:, k] = 0
                    else:
                        xk[..., k] = 0
                    errs[pos] = (out - self._out(layer, xk)).square().sum()
                else:
                    break
            else:
                scores.append((errs / energy, group[i].root_idxs))
        total = torch.zeros(len(group[0][1]))
        for s, root in scores:
            total[root] += s
        total /= len(scores)
        return total / total.mean()

    def _out(self, layer, x):  # layer output without bias
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(x, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.linear(x, layer.weight)


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_lam_zero_is_the_reconstruction_criterion(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x, y = data(4)
    imp = MoonshotImportance(lam=0.0)
    imp.accumulate(model, [(x, y)])
    reference = ReconReference(model, x)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    groups = list(dg.get_all_groups(ignored_layers=[model.get_classifier()], root_module_types=[nn.Conv2d, nn.Linear]))
    checked = 0
    for group in groups[:6]:
        ours, ref = imp(group), reference(group)
        torch.testing.assert_close(ours, ref, rtol=2e-3, atol=1e-5)
        assert torch.equal(ours.argsort()[:3], ref.argsort()[:3])
        checked += 1
    assert checked >= 3
