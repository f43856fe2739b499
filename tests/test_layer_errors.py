"""benchmarks.layer_errors: the per-layer errors against a brute-force computation."""

import pytest
import torch

from benchmarks.layer_errors import layer_errors
from tests.tiny_models import save_tiny_llama


def _brute_force(model, batch, name, delta):
    """R = sum_t ||dW x_t||^2 and T = sum_t (d_t . dW x_t)^2 from one autograd
    pass with the layer's input and output kept."""
    layer = dict(model.named_modules())[name]
    kept = {}
    handle = layer.register_forward_hook(lambda m, a, out: kept.update(x=a[0], y=out))
    ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    handle.remove()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    (d,) = torch.autograd.grad(loss, kept["y"])
    change = kept["x"].detach() @ delta.T
    return float((change ** 2).sum()), float(((d * change).sum(-1) ** 2).sum())


def test_layer_errors_match_brute_force_and_leave_the_model_alone(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path), dtype=torch.float64)
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, model.config.vocab_size, (1, 12)), "attention_mask": torch.ones(1, 12, dtype=torch.long)}
               for _ in range(2)]
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    layers = dict(model.named_modules())
    deltas = {"a": {n: torch.randn_like(layers[n].weight) for n in names},
              "b": {n: 0.1 * torch.randn_like(layers[n].weight) for n in names}}
    before = {n: p.clone() for n, p in model.named_parameters()}
    errors = layer_errors(model, batches, deltas)
    for name in names:
        for label, delta in deltas.items():
            expected = [sum(v) for v in zip(*(_brute_force(model, b, name, delta[name]) for b in batches))]
            got = errors[name][label]
            assert abs(got["reconstruction"] - expected[0]) <= 1e-9 * expected[0]
            assert abs(got["taylor"] - expected[1]) <= 1e-9 * expected[1]
            assert got["taylor"] > 0
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())


def test_a_weight_update_the_host_lacks_is_refused_naming_the_hosts_own(tmp_path, capsys):
    from benchmarks.layer_errors import main

    output = tmp_path / "errors.json"
    with pytest.raises(SystemExit):
        main(["--host", "wanda", "--weight-update", "admm", "--output", str(output)])
    error = capsys.readouterr().err
    assert "--weight-update admm is not one of wanda's weight updates: ['resolve']" in error
    assert not output.exists()
