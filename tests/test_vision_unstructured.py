"""moonshot_prune on tiny timm models: ViT, ResNet, an EfficientNet with depthwise convs.

The reference is LLM Compressor 0.14's SparseGPT itself (``accumulate_hessian``
and ``sparsify_weight``) run block by block on the same calibration images.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import accumulate_hessian, sparsify_weight
from torch import nn

from moonshot_plugins.core import NonFiniteError, in_features, layer_inputs, layer_output_grads
from moonshot_plugins.vision import moonshot_prune, recalibrate_batchnorm
from moonshot_plugins.vision.prune import CALIBRATION_LOSSES, _fishers

VIT = ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2))
RESNET = ("test_resnet", {})  # timm's tiny ResNet: deep 3x3 stem, bottleneck, downsample convs
EFFICIENTNET = ("test_efficientnet", {})  # timm's tiny EfficientNet: depthwise convs, SE


def tiny_model(spec: tuple[str, dict], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(spec[0], num_classes=10, **spec[1])


def calibration(n: int = 12, size: int = 32, batch: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(images[s : s + batch], labels[s : s + batch]) for s in range(0, n, batch)]


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def host_sparsegpt(model, batches, blocks, sparsity, prune_n=0, prune_m=0):
    """SparseGPT as LLM Compressor 0.14 computes it, block by block (the
    Hessian sized for the unfolded columns, which the host's own
    ``make_empty_hessian`` gets wrong for kernels larger than 1 x 1)."""
    model.eval()
    modules = dict(model.named_modules())
    for block in blocks:
        hessians = {n: torch.zeros(in_features(modules[n]), in_features(modules[n])) for n in block}
        counts = dict.fromkeys(block, 0)

        def hook(name):
            def accumulate(module, args, _):
                hessians[name], counts[name] = accumulate_hessian(args[0], module, hessians[name], counts[name])

            return accumulate

        handles = [modules[n].register_forward_hook(hook(n)) for n in block]
        for images, _ in batches:
            model(images)
        for handle in handles:
            handle.remove()
        for name in block:
            module = modules[name]
            _, weight = sparsify_weight(module, {module: hessians[name]}, sparsity, prune_n, prune_m, 128, 0.01, False)
            module.weight.copy_(weight)


def host_zero_count(weight: torch.Tensor, sparsity: float, block_size: int = 128) -> int:
    """Weights SparseGPT's unstructured mask prunes: per block of columns, the
    int(numel * sparsity) + 1 smallest scores (ties aside). Inputs that are
    zero on every calibration image (a ReLU channel that never fires) have
    their weights zeroed first, and they count among the smallest; such a
    column is all zero afterwards (a kept column almost never is)."""
    weight = weight.flatten(1)
    rows, cols = weight.shape
    dead = (weight == 0).all(dim=0)
    return sum(
        max(int(rows * min(block_size, cols - s) * sparsity) + 1, rows * int(dead[s : s + block_size].sum()))
        for s in range(0, cols, block_size)
    )


# -- lam = 0 is the host, exactly ----------------------------------------------


@pytest.mark.parametrize("spec", [VIT, RESNET, EFFICIENTNET], ids=["vit", "resnet", "efficientnet"])
def test_taylor_weight_0_is_sparsegpt_exactly(spec):
    batches = calibration()
    model = tiny_model(spec)
    reference = tiny_model(spec)
    result = moonshot_prune(model, batches, 0.6, taylor_weight=0.0, loss=_never_called)
    host_sparsegpt(reference, batches, result.blocks, 0.6)
    for name, value in weights(reference).items():
        assert torch.equal(weights(model)[name], value), name


def _never_called(model, batch):
    raise AssertionError("lam = 0 must not run the gradient pass")


def test_blocks_follow_the_model_structure():
    result = moonshot_prune(tiny_model(VIT), calibration(), 0.5, taylor_weight=0.0)
    assert result.blocks == [
        ["patch_embed.proj"],
        [f"blocks.0.{layer}" for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")],
        [f"blocks.1.{layer}" for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")],
        ["head"],
    ]
    resnet = moonshot_prune(tiny_model(RESNET), calibration(), 0.5, taylor_weight=0.0)
    assert ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.1"] in resnet.blocks


def test_taylor_term_changes_the_masks():
    batches = calibration()
    recon, taylor = tiny_model(VIT), tiny_model(VIT)
    moonshot_prune(recon, batches, 0.6, taylor_weight=0.0)
    moonshot_prune(taylor, batches, 0.6, taylor_weight=1.0)
    qkv = (recon.blocks[1].attn.qkv.weight == 0), (taylor.blocks[1].attn.qkv.weight == 0)
    assert not torch.equal(*qkv)
    assert qkv[0].sum() == qkv[1].sum()


# -- sparsity and N:M ------------------------------------------------------------


@pytest.mark.parametrize("weight_update", ["host", "resolve", "admm"])
@pytest.mark.parametrize("spec", [VIT, EFFICIENTNET], ids=["vit", "efficientnet"])
def test_every_pruned_layer_has_the_host_sparsity(spec, weight_update):
    model = tiny_model(spec)
    result = moonshot_prune(model, calibration(), 0.7, taylor_weight=0.5, weight_update=weight_update)
    modules = dict(model.named_modules())
    assert result.sparsity
    for name, measured in result.sparsity.items():
        weight = modules[name].weight.flatten(1)
        zeros = int((weight == 0).sum())
        if weight_update == "admm":  # per-row masks: int(d_in * sparsity) per row
            expected = weight.shape[0] * int(weight.shape[1] * 0.7)
        else:
            expected = host_zero_count(weight, 0.7)
        assert zeros == expected, name
        assert measured == pytest.approx(zeros / weight.numel())


def test_resnet_conv_layers_are_pruned_to_the_host_sparsity():
    model = tiny_model(RESNET)
    result = moonshot_prune(model, calibration(n=8, size=64), 0.5, fisher_mode="sample")
    modules = dict(model.named_modules())
    assert sum(isinstance(modules[name], nn.Conv2d) for name in result.sparsity) == 15
    for name in result.sparsity:
        weight = modules[name].weight
        assert int((weight == 0).sum()) == host_zero_count(weight, 0.5), name


@pytest.mark.parametrize("weight_update", ["host", "resolve", "admm"])
def test_2of4_prunes_2_of_every_4_inputs(weight_update):
    model = tiny_model(EFFICIENTNET)
    result = moonshot_prune(
        model, calibration(), mask_structure="2:4", ignore=["conv_stem"], weight_update=weight_update
    )
    modules = dict(model.named_modules())
    assert "conv_stem" not in result.sparsity and len(result.sparsity) == 15
    for name in result.sparsity:
        groups = modules[name].weight.flatten(1).reshape(-1, 4)
        assert torch.equal((groups == 0).sum(dim=1), torch.full((groups.shape[0],), 2)), name


def test_2of4_names_a_layer_whose_width_it_cannot_tile():
    model = tiny_model(EFFICIENTNET)
    before = weights(model)
    with pytest.raises(ValueError, match=r"multiple of 4; not so for conv_stem \(27\).*ignore"):
        moonshot_prune(model, calibration(), mask_structure="2:4")
    assert all(torch.equal(v, weights(model)[k]) for k, v in before.items())


# -- what is not pruned ------------------------------------------------------------


def test_depthwise_convs_and_batchnorm_are_left_alone():
    model = tiny_model(EFFICIENTNET)
    before = weights(model)
    result = moonshot_prune(model, calibration(), 0.5)
    assert set(result.skipped) == {"blocks.3.0.conv_dw", "blocks.4.0.conv_dw"}
    assert all("grouped convolution (groups=" in reason for reason in result.skipped.values())
    after = weights(model)
    for name in result.skipped:
        assert torch.equal(after[f"{name}.weight"], before[f"{name}.weight"])
    norms = [k for k in before if ".bn" in k]
    assert norms and all(torch.equal(after[k], before[k]) for k in norms)  # BN weights and running stats
    assert model.training  # the mode the model came in


# -- losses ----------------------------------------------------------------------


def test_label_free_and_callable_losses():
    images = [images for images, _ in calibration()]
    predicted, custom = tiny_model(VIT), tiny_model(VIT)
    moonshot_prune(predicted, images, 0.5, loss="predicted")

    def own_argmax(model, batch):
        logits = model(batch)
        return F.cross_entropy(logits, logits.detach().argmax(dim=-1), reduction="none")

    moonshot_prune(custom, images, 0.5, loss=own_argmax)
    assert all(torch.equal(v, weights(custom)[k]) for k, v in weights(predicted).items())


class ConvNet(nn.Module):
    """(B, 2, 6, 6) -> (B, 3): conv, ReLU, mean pool, linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("fisher_mode", ["token", "sample"])
def test_fisher_of_conv_and_pooled_head_matches_brute_force(fisher_mode):
    """The Fisher the driver combines, against per-image weight gradients."""
    torch.manual_seed(0)
    model = ConvNet()
    images, labels = torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,))
    layers = {"conv": model.conv, "head": model.head}
    fishers = _fishers(model, [(images[:2], labels[:2]), (images[2:], labels[2:])], layers,
                       fisher_mode, CALIBRATION_LOSSES["labels"])
    expected = dict.fromkeys(layers, 0.0)
    captured = {}

    def capture(name):
        def hook(module, args, output):
            output.retain_grad()
            captured[name] = (args[0].detach(), output)

        return hook

    for i in range(5):
        handles = [m.register_forward_hook(capture(n)) for n, m in layers.items()]
        model.zero_grad()
        F.cross_entropy(model(images[i : i + 1]), labels[i : i + 1]).backward()
        for handle in handles:
            handle.remove()
        for name, module in layers.items():
            inp, out = captured[name]
            if fisher_mode == "sample":
                g = module.weight.grad.flatten(1)
                expected[name] = expected[name] + g.T @ g
            else:
                x, d = layer_inputs(module, inp)[0], layer_output_grads(module, out.grad)[0]
                expected[name] = expected[name] + (x * d.square().sum(1, keepdim=True)).T @ x
    for name, module in layers.items():
        d_out = module.weight.shape[0]
        torch.testing.assert_close(fishers[name], expected[name] / (5 * d_out), rtol=1e-4, atol=1e-7)


# -- bad inputs ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=0.0), r"sparsity must be a fraction in \(0, 1\)"),
        (dict(sparsity=1.0), r"sparsity must be a fraction in \(0, 1\)"),
        (dict(sparsity=float("nan")), r"sparsity must be a fraction in \(0, 1\)"),
        (dict(sparsity=[0.5]), r"sparsity must be one fraction in \(0, 1\)"),
        (dict(sparsity=None), r"sparsity is required with unstructured mask_structure '0:0'"),
        (dict(sparsity=0.5, mask_structure="4:2"), r"mask_structure must be 'N:M' with 0 < N < M"),
        (dict(sparsity=0.5, mask_structure="half"), r"mask_structure must be 'N:M' with 0 < N < M"),
        (dict(sparsity=0.7, mask_structure="2:4"), r"sparsity 0.7 disagrees with mask_structure '2:4'"),
        (dict(sparsity=0.5, taylor_weight=1.5), r"taylor_weight must be in \[0, 1\]"),
        (dict(sparsity=0.5, taylor_weight="auto"), r"taylor_weight='auto' is not available"),
        (dict(sparsity=0.5, fisher_mode="batch"), r"fisher_mode must be one of \['sample', 'token'\]"),
        (dict(sparsity=0.5, weight_update="exact"), r"weight_update must be one of \['host', 'resolve', 'admm'\]"),
        (dict(sparsity=0.5, loss="kl"), r"loss must be one of \['labels', 'predicted'\] or a callable"),
        (dict(sparsity=0.5, block_size=0), r"block_size must be a positive integer"),
        (dict(mask_structure="2:4", block_size=6), r"block_size 6 must be a multiple of M = 4"),
        (dict(sparsity=0.5, dampening_frac=-1), r"dampening_frac must be a finite number >= 0"),
        (dict(sparsity=0.5, ignore=["re:("]), r"ignore entry 're:\(' is not a valid regex"),
        (dict(sparsity=0.5, ignore=["Linear", "Conv2d"]), r"select no layer to prune"),
    ],
)
def test_bad_arguments_name_the_field_and_change_nothing(kwargs, match):
    model = tiny_model(VIT)
    before = weights(model)
    with pytest.raises(ValueError, match=match):
        moonshot_prune(model, calibration(), **kwargs)
    assert all(torch.equal(v, weights(model)[k]) for k, v in before.items())


@pytest.mark.parametrize(
    "loader, kwargs, match",
    [
        ([], {}, "calib_loader is empty"),
        ([torch.zeros(0, 3, 32, 32)], dict(loss="predicted"), "calib_loader is empty"),
        ([torch.randn(2, 3, 32, 32)], {}, "loss='labels' needs \\(images, labels\\) batches"),
        ([{"pixel_values": torch.randn(2, 3, 32, 32)}], {}, "calib_loader must yield image tensors"),
    ],
)
def test_bad_calibration_data(loader, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        moonshot_prune(tiny_model(VIT), loader, 0.5, **kwargs)


class StandardizedConv(nn.Conv2d):
    """A conv whose forward changes the weight (as timm's StdConv2d does)."""

    def forward(self, x):
        w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_unsupported_layers_are_named():
    model = nn.Sequential(StandardizedConv(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(TypeError, match=r"layer '0' \(StandardizedConv\) is a Conv2d with its own forward"):
        moonshot_prune(model, calibration(), 0.5)
    with pytest.raises(TypeError, match=r"layer 'norm' \(LayerNorm\) cannot be pruned: supported layers are nn.Linear and nn.Conv2d"):
        moonshot_prune(tiny_model(VIT), calibration(), 0.5, targets=["Linear", "norm"])


# -- failures leave the model as it was ------------------------------------------


def test_a_failed_run_restores_weights_and_grads(monkeypatch):
    import moonshot_plugins.vision.sequential as sequential

    model = tiny_model(RESNET)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before, grads = weights(model), {n: p.grad.clone() for n, p in model.named_parameters()}
    calls = []

    def failing_solver(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("solver failed")
        return sparsify_weight(*args, **kwargs)

    monkeypatch.setattr(sequential, "sparsify_weight", failing_solver)
    with pytest.raises(RuntimeError, match="solver failed"):
        moonshot_prune(model, calibration(), 0.5)
    assert len(calls) == 4  # three layers had been pruned
    for name, value in weights(model).items():
        assert torch.equal(value, before[name]), name
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]) and p.requires_grad, name


def test_a_non_finite_loss_stops_before_any_change():
    model = tiny_model(VIT)
    before = weights(model)

    def nan_loss(model, batch):
        return model(batch[0]).sum(dim=1) * math.nan

    with pytest.raises(NonFiniteError, match="calibration sample 0: the loss is nan"):
        moonshot_prune(model, calibration(), 0.5, loss=nan_loss)
    assert all(torch.equal(v, weights(model)[k]) for k, v in before.items())


def test_vision_adapter_does_not_import_torch_pruning():
    from tests.test_imports import _modules_after_import

    loaded = _modules_after_import("moonshot_plugins.vision")
    assert "llmcompressor" in loaded
    assert "torch_pruning" not in loaded


# -- BatchNorm recalibration -------------------------------------------------------


def test_recalibrate_batchnorm_sets_the_running_statistics_of_the_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))  # materialise the lazy layer
    model.eval()
    batches = [torch.randn(6, 3, 8, 8) for _ in range(3)]
    assert recalibrate_batchnorm(model, batches) == 18
    with torch.no_grad():
        features = [model[0](b) for b in batches]
    means = torch.stack([f.mean(dim=(0, 2, 3)) for f in features])
    variances = torch.stack([f.var(dim=(0, 2, 3)) for f in features])  # unbiased, as BatchNorm keeps
    torch.testing.assert_close(model[1].running_mean, means.mean(0))
    torch.testing.assert_close(model[1].running_var, variances.mean(0))
    assert not model.training and model[1].momentum == 0.1
    saved = model[1].running_mean.clone()
    with pytest.raises(ValueError, match="loader yields no image"):
        recalibrate_batchnorm(model, [])
    assert torch.equal(model[1].running_mean, saved)


def test_taylor_only_on_a_layer_without_gradient_names_it_and_changes_nothing():
    """timm's ResNet starts each residual block's last BatchNorm at scale 0, so
    no gradient reaches the convolutions before it: at lam 1 those layers have
    no objective, and pruning them would zero them whole."""
    model = tiny_model(RESNET)
    before = weights(model)
    with pytest.raises(ValueError, match=r"layer \S+: the layer's Fisher is zero"):
        moonshot_prune(model, calibration(), sparsity=0.5, taylor_weight=1.0)
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
