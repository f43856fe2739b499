"""benchmarks.resolve_iterations: the Gram matrices and the cap curve on small problems."""

import torch

from benchmarks.resolve_iterations import CAPS, cap_curve, layer_grams
from tests.tiny_models import save_tiny_llama


def test_layer_grams_sum_x_xT_over_every_token(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path), dtype=torch.float32)
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, model.config.vocab_size, (1, 7))} for _ in range(2)]
    name = "model.layers.1.mlp.down_proj"
    kept = []
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, a, o: kept.append(a[0][0]))
    grams = layer_grams(model, batches, [name])
    handle.remove()
    inputs = torch.cat(kept)  # this hook ran during the study's own pass
    torch.testing.assert_close(grams[name], inputs.T @ inputs, rtol=1e-5, atol=1e-5)


def test_cap_curve_starts_at_wanda_and_ends_at_the_exact_support_solution():
    torch.manual_seed(0)
    inputs = torch.randn(64, 16, dtype=torch.float64)
    gram = (inputs.T @ inputs).float()
    dense = torch.randn(6, 16)
    curve = cap_curve(dense, gram, 0.01)
    objective = {int(k): v for k, v in curve["objective_vs_wanda"].items()}
    assert objective[0] == 1.0
    values = [objective[cap] for cap in CAPS]
    assert all(later <= earlier + 1e-6 for earlier, later in zip(values, values[1:]))
    # brute force: each row's least squares on its support, the damped Gram as metric
    hessian = gram.double() + 0.01 * torch.diagonal(gram).double().mean() * torch.eye(16, dtype=torch.float64)
    keep = dense.abs() * torch.diagonal(gram).sqrt()
    keep = keep.reshape(6, 4, 4).argsort(-1, descending=True).argsort(-1).reshape(6, 16) < 2
    exact = 0.0
    host = 0.0
    for row in range(6):
        support = keep[row].nonzero().flatten()
        w = dense[row].double()
        solved = torch.zeros(16, dtype=torch.float64)
        solved[support] = torch.linalg.solve(hessian[support][:, support], (hessian @ w)[support])
        exact += float((solved - w) @ hessian @ (solved - w))
        host_row = torch.where(keep[row], w, torch.zeros_like(w))
        host += float((host_row - w) @ hessian @ (host_row - w))
    assert abs(objective[CAPS[-1]] - exact / host) < 1e-4
    assert curve["share_of_best_improvement"][CAPS[-1]] == 1.0
