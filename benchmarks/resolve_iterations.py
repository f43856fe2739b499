"""How many conjugate-gradient iterations the re-solve needs on real layers.

    python -m benchmarks.resolve_iterations --output benchmarks/results/2026-12-01-resolve-iterations.json

``weight_update: resolve`` runs :func:`~moonshot_plugins.core.resolve_on_mask`
with a cap of 100 PCG iterations per layer, and those iterations are most of
its cost over the host: one (d_out x d_in) @ (d_in x d_in) product each. This
measures what a lower cap would give up. On SmolLM2-135M and one calibration
draw (Austen, draw 0, 32 x 512 tokens), it takes the dense inputs of the
linear layers of a few decoder blocks, builds each layer's damped Gram matrix
H (as Wanda's re-solve does, ``dampening_frac`` 0.01), Wanda's 2:4 mask, and
re-solves the kept weights at lam 0 with caps of 0 (Wanda: the dense weights
on the mask) up to 400 iterations (rtol 0, so every cap runs in full).

Per layer and cap it records the reconstruction objective
E = sum_j dw_j^T H dw_j (dw = W - W_dense; units of H) relative to Wanda's,
and the share of the 400-iteration improvement the cap reaches; plus the time
of one iteration, in seconds, on one thread. Dense inputs, not the sequential
pass's partly pruned ones: this is a study of the solver, not a pruned model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import time
from typing import Any

CAPS = (0, 10, 25, 50, 100, 200, 400)
BLOCKS = (0, 10, 20, 29)
LAYERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
SETTINGS = {"calib_samples": 32, "seq_len": 512, "calib_source": "austen", "draw": 0,
            "dampening_frac": 0.01, "sparsity": "2:4"}


def layer_grams(model, loader, names: list[str]) -> dict[str, Any]:
    """name -> (d_in, d_in) fp32 sum of x x^T over every calibration token."""
    import torch

    modules = dict(model.named_modules())
    grams: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def accumulate(_module, inputs, _output) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            grams[name] = grams.get(name, 0) + x.T @ x
        return accumulate

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    with torch.no_grad():
        for batch in loader:
            model(input_ids=batch["input_ids"])
    for handle in handles:
        handle.remove()
    return grams


def cap_curve(dense, gram, dampening_frac: float) -> dict[str, Any]:
    """One layer: relative objective per cap and the time of one iteration (s)."""
    import torch

    from moonshot_plugins.core import moonshot_wanda_scores, row_wise_mask
    from moonshot_plugins.core.curvature import diagonal_fisher_curvature
    from moonshot_plugins.core.resolve import resolve_on_mask
    from moonshot_plugins.llmcompressor.weight_update import damped_hessian

    hessian = damped_hessian(gram, dampening_frac)
    curvature = diagonal_fisher_curvature(hessian, None, 0.0)
    prune = row_wise_mask(moonshot_wanda_scores(dense, torch.diagonal(gram)), 0.5, 2, 4)  # Wanda at lam 0
    host = dense * ~prune
    wanda = float(curvature.row_values(host - dense).sum())
    objective = {}
    for cap in CAPS:  # each cap from the host's weights: a restarted CG would lose its conjugacy
        start = time.perf_counter()
        weight = resolve_on_mask(curvature, dense, ~prune, host, cap, 0.0).weight
        seconds = time.perf_counter() - start
        objective[cap] = float(curvature.row_values(weight - dense).sum()) / wanda
    best = objective[CAPS[-1]]
    reached = {cap: (1 - value) / (1 - best) for cap, value in objective.items()}
    per_iteration = seconds / CAPS[-1]  # the last, largest cap
    return {"shape": list(dense.shape), "objective_vs_wanda": objective,
            "share_of_best_improvement": reached, "seconds_per_iteration": per_iteration}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.provenance import code_version, machine_description
    from benchmarks.llm_run import run_data

    torch.set_num_threads(1)
    model_dir, loader, _ = run_data({**SETTINGS, "eval_tokens": 0}, SETTINGS)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = [f"model.layers.{block}.{layer}" for block in BLOCKS for layer in LAYERS]
    grams = layer_grams(model, loader, names)
    modules = dict(model.named_modules())
    layers = {}
    for name in names:
        layers[name] = cap_curve(modules[name].weight.detach().float(), grams[name], SETTINGS["dampening_frac"])
        reached = layers[name]["share_of_best_improvement"]
        print(f"{name:34s} " + " ".join(f"{cap}:{reached[cap]:.4f}" for cap in CAPS[1:]))
    doc = {
        "command": "python -m benchmarks.resolve_iterations --output " + str(args.output),
        "date": datetime.date.today().isoformat(), "code": code_version(("moonshot_plugins", "benchmarks")),
        "machine": machine_description(), "settings": SETTINGS, "caps": list(CAPS),
        "layers": layers,
    }
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
