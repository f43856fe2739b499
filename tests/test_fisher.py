"""The hook accumulators equal the Fisher definitions computed by brute force.

Brute force: per-sample weight gradients G_i straight from autograd (one
backward per sample, weights requiring grad) and, for token mode, per-position
output gradients d_{i,t}; then the sums of the module docstring, term by term.
"""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from moonshot_plugins.core import (
    FisherCollector,
    causal_lm_sample_losses,
    layer_inputs,
    layer_output_grads,
    restore_weight,
    run_gradient_pass,
    standardized_weight,
)

N_SAMPLES = 5


class SeqModel(nn.Module):
    """(B, T, 6) -> (B, T, 3) through a Linear, a Conv1D and a Linear."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.middle = Conv1D(7, 8)  # transformers Conv1D(nf=out, nx=in)
        self.last = nn.Linear(7, 3)

    def forward(self, x):
        return self.last(torch.tanh(self.middle(torch.tanh(self.first(x)))))


class ConvModel(nn.Module):
    """(B, 2, 6, 6) -> (B, 3) through two Conv2d layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 3, 3, stride=2)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.mean(dim=(2, 3)))


def seq_case():
    torch.manual_seed(0)
    model = SeqModel()
    x = torch.randn(N_SAMPLES, 4, 6)
    y = torch.randn(N_SAMPLES, 4, 3)

    def losses(m, batch):
        xb, yb = batch
        return ((m(xb) - yb) ** 2).mean(dim=(1, 2))

    return model, (x, y), losses, {"first": model.first, "middle": model.middle, "last": model.last}


def conv_case():
    torch.manual_seed(1)
    model = ConvModel()
    x = torch.randn(N_SAMPLES, 2, 6, 6)
    y = torch.randint(0, 3, (N_SAMPLES,))

    def losses(m, batch):
        xb, yb = batch
        return nn.functional.cross_entropy(m(xb), yb, reduction="none")

    return model, (x, y), losses, {"conv1": model.conv1, "conv2": model.conv2}


def brute_force(model, data, losses, modules):
    """Per-sample G_i (standardised orientation) and per-position (x, d) pairs."""
    grads = {name: [] for name in modules}
    tokens = {name: [] for name in modules}
    x_all, y_all = data
    for i in range(N_SAMPLES):
        captured = {}

        def capture(name):
            def hook(module, args, out):
                out.retain_grad()
                captured[name] = (args[0].detach(), out)

            return hook

        handles = [m.register_forward_hook(capture(n)) for n, m in modules.items()]
        model.zero_grad()
        loss = losses(model, (x_all[i : i + 1], y_all[i : i + 1])).sum()
        loss.backward()
        for h in handles:
            h.remove()
        for name, module in modules.items():
            g = module.weight.grad.clone()
            g = g.flatten(1) if isinstance(module, nn.Conv2d) else g
            g = g.T if isinstance(module, Conv1D) else g
            grads[name].append(g)
            inp, out = captured[name]
            xs = layer_inputs(module, inp)[0]
            ds = layer_output_grads(module, out.grad)[0]
            tokens[name].append((xs, ds))
    return grads, tokens


@pytest.mark.parametrize("case", [seq_case, conv_case], ids=["linear+conv1d", "conv2d"])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_fisher_modes_match_brute_force(case, batch_size):
    model, data, losses, modules = case()
    grads, tokens = brute_force(model, data, losses, modules)
    batches = [
        (data[0][s : s + batch_size], data[1][s : s + batch_size])
        for s in range(0, N_SAMPLES, batch_size)
    ]
    for mode in ("sample", "token"):
        collector = FisherCollector(modules, fisher_mode=mode, matrix=True, diagonal=True)
        used = run_gradient_pass(model, batches, collector, losses)
        assert used == N_SAMPLES
        for name, module in modules.items():
            d_out = grads[name][0].shape[0]
            if mode == "sample":
                expect = sum(g.T @ g for g in grads[name]) / (N_SAMPLES * d_out)
                expect_diag = sum(g**2 for g in grads[name]) / N_SAMPLES
            else:
                expect = torch.zeros_like(collector.fisher(name))
                expect_diag = torch.zeros_like(grads[name][0])
                for xs, ds in tokens[name]:
                    for x_t, d_t in zip(xs, ds):
                        expect += (d_t @ d_t) * torch.outer(x_t, x_t)
                        expect_diag += torch.outer(d_t**2, x_t**2)
                expect /= N_SAMPLES * d_out
                expect_diag /= N_SAMPLES
            torch.testing.assert_close(collector.fisher(name), expect, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(
                collector.diagonal_fisher(name), expect_diag, rtol=1e-4, atol=1e-7
            )


@pytest.mark.parametrize("mode", ["sample", "token"])
def test_row_factors_are_the_per_sample_gradients(mode):
    model, data, losses, modules = seq_case()
    grads, _ = brute_force(model, data, losses, modules)
    collector = FisherCollector(
        modules, fisher_mode=mode, matrix=False, row_factors=True, token_weights=mode == "token"
    )
    batches = [(data[0][:2], data[1][:2]), (data[0][2:], data[1][2:])]
    assert run_gradient_pass(model, batches, collector, losses) == N_SAMPLES
    for name in modules:
        factors = collector.pop_row_factors(name)  # (d_out, d_in, N), column i = G_i / sqrt(N)
        assert factors.shape == (*grads[name][0].shape, N_SAMPLES)
        for i, g in enumerate(grads[name]):
            torch.testing.assert_close(factors[..., i] * N_SAMPLES**0.5, g, rtol=1e-4, atol=1e-7)


def test_sample_and_token_modes_differ():
    model, data, losses, modules = seq_case()
    results = {}
    for mode in ("sample", "token"):
        collector = FisherCollector(modules, fisher_mode=mode)
        run_gradient_pass(model, [data], collector, losses)
        results[mode] = collector.fisher("first")
    assert not torch.allclose(results["sample"], results["token"])


def test_gradient_pass_leaves_model_untouched():
    model, data, losses, modules = seq_case()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    collector = FisherCollector(modules)
    run_gradient_pass(model, [data], collector, losses)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in modules.values())


def test_max_samples_truncates():
    model, data, losses, modules = seq_case()
    collector = FisherCollector(modules)
    used = run_gradient_pass(model, [data, data], collector, losses, max_samples=7)
    assert used == 7
    assert collector.num_samples["first"] == 7


def test_padding_does_not_change_sample_loss():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 11)
    ids = torch.randint(0, 11, (1, 6))
    padded_logits = torch.cat([logits, torch.randn(1, 3, 11)], dim=1)
    padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    torch.testing.assert_close(
        causal_lm_sample_losses(padded_logits, padded_ids, mask),
        causal_lm_sample_losses(logits, ids),
    )


def test_reading_before_any_gradient_is_a_clear_error():
    _, _, _, modules = seq_case()
    collector = FisherCollector(modules)
    with pytest.raises(RuntimeError, match="No gradient reached layer 'first'"):
        collector.fisher("first")


def test_bad_inputs():
    _, _, _, modules = seq_case()
    with pytest.raises(ValueError, match=r"fisher_mode must be one of \['sample', 'token'\]"):
        FisherCollector(modules, fisher_mode="batch")
    with pytest.raises(TypeError, match="supports nn.Linear"):
        FisherCollector({"norm": nn.LayerNorm(4)})
    with pytest.raises(ValueError, match="groups=1"):
        FisherCollector({"dw": nn.Conv2d(4, 4, 3, groups=4)})


@pytest.mark.parametrize(
    "module", [nn.Linear(6, 4), Conv1D(4, 6), nn.Conv2d(2, 4, 3)], ids=["linear", "conv1d", "conv2d"]
)
def test_weight_orientation_round_trip(module):
    weight = standardized_weight(module)
    assert weight.shape[0] == 4
    assert torch.equal(restore_weight(module, weight), module.weight.detach())


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_token_weights_rebuild_the_token_fisher_and_the_moonshot_hessian(batch_size):
    """sum_t w_t x_t x_t^T from the kept weights is the token Fisher, and
    reweighting the inputs by sqrt(c_t) turns X^T X into combine_hessians(...)."""
    from moonshot_plugins.core import combine_hessians, token_objective_weights

    model, data, losses, modules = seq_case()
    batches = [
        (data[0][s : s + batch_size], data[1][s : s + batch_size])
        for s in range(0, N_SAMPLES, batch_size)
    ]
    matrix = FisherCollector(modules, fisher_mode="token")
    weights = FisherCollector(modules, fisher_mode="token", matrix=False, token_weights=True)
    run_gradient_pass(model, batches, matrix, losses)
    run_gradient_pass(model, batches, weights, losses)
    _, tokens = brute_force(model, data, losses, modules)
    for name, module in modules.items():
        xs = torch.stack([x for x, _ in tokens[name]])  # (N, T, d_in)
        w = torch.stack(weights.token_weights(name))  # (N, T)
        assert w.shape == xs.shape[:2]
        fisher = torch.einsum("nt,nti,ntj->ij", w, xs, xs) / N_SAMPLES
        torch.testing.assert_close(fisher, matrix.fisher(name), rtol=1e-5, atol=1e-8)
        energy, weighted = weights.token_energies(name)
        assert energy == pytest.approx(xs.double().square().sum().item(), rel=1e-6)
        assert weighted == pytest.approx((w.double()[..., None] * xs.double() ** 2).sum().item(), rel=1e-6)
        sums = torch.stack(weights.input_sums(name))
        torch.testing.assert_close(sums, xs.sum(dim=-1))
        ds = torch.stack([d for _, d in tokens[name]])  # (N, T, d_out)
        rows = torch.einsum("nto,nt->o", ds.double() ** 2, xs.double().square().sum(-1))
        torch.testing.assert_close(weights.row_sensitivities(name), (rows / rows.mean()).float(), rtol=1e-5, atol=1e-7)
        x2d = xs.reshape(-1, xs.shape[-1])
        hessian = 2 * x2d.T @ x2d / N_SAMPLES  # SparseGPT's (2/n) X^T X
        for lam in (0.3, 1.0):
            c = token_objective_weights(w, energy, weighted, lam)
            scaled = (xs * c.sqrt()[..., None]).reshape(-1, xs.shape[-1])
            torch.testing.assert_close(
                2 * scaled.T @ scaled / N_SAMPLES,
                combine_hessians(hessian, matrix.fisher(name), lam),
                rtol=1e-4,
                atol=1e-7,
            )


def test_token_weights_reject_what_they_cannot_serve():
    model, data, losses, modules = conv_case()
    with pytest.raises(ValueError, match="token_weights supports nn.Linear"):
        FisherCollector(modules, matrix=False, token_weights=True)
    _, _, _, seq_modules = seq_case()
    with pytest.raises(ValueError, match="needs fisher_mode='token'"):
        FisherCollector(seq_modules, fisher_mode="sample", matrix=False, token_weights=True)


@pytest.mark.parametrize("padded", [False, True])
def test_chunked_losses_equal_full_logits_losses_and_gradients(padded):
    from moonshot_plugins.core import chunked_causal_lm_sample_losses

    torch.manual_seed(0)
    head = nn.Linear(8, 11, bias=False)
    hidden = torch.randn(3, 10, 8, requires_grad=True)
    ids = torch.randint(0, 11, (3, 10))
    mask = None
    if padded:
        mask = torch.ones(3, 10, dtype=torch.long)
        mask[1, 7:] = 0
    full = causal_lm_sample_losses(head(hidden), ids, mask)
    (grad_full,) = torch.autograd.grad(full.sum(), hidden)
    chunked = chunked_causal_lm_sample_losses(hidden, head, ids, mask, chunk_size=4)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), hidden)
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(grad_chunked, grad_full)


@pytest.mark.parametrize("mode", ["token", "sample"])
def test_a_bf16_diagonal_is_the_fp32_one_rounded_once_per_batch(mode):
    """Two batches: each update is computed in fp32 and rounded into the bf16
    sum, so the result is within three bf16 roundings of the fp32 diagonal."""
    model, data, losses, modules = seq_case()
    reference = FisherCollector(modules, fisher_mode=mode, matrix=False, diagonal=True)
    held = FisherCollector(
        modules, fisher_mode=mode, matrix=False, diagonal=True, diagonal_dtype=torch.bfloat16
    )
    for collector in (reference, held):
        run_gradient_pass(model, [data, data], collector, losses)
    assert all(total.dtype == torch.bfloat16 for total in held._diag_acc.values())
    for name in modules:
        expect, ours = reference.diagonal_fisher(name), held.diagonal_fisher(name)
        assert expect.dtype == torch.float32 and ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours.float(), expect, rtol=3 * 2.0**-8, atol=0)
        assert not torch.equal(ours.float(), expect)  # it was rounded: the test can fail
