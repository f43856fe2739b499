"""Per-layer diagnostics: both objectives' errors of each method, relative to the host.

    python -m benchmarks.layer_errors --sparsity 2:4 --calib-source austen --draw 0 \\
        --output benchmarks/results/2026-12-01-layer-errors-2of4.json
    python -m benchmarks.layer_errors --sparsity 2:4 --host wanda --calib-source austen --draw 0 \\
        --output benchmarks/results/2026-12-05-layer-errors-2of4-wanda.json

The methods are those of ``python -m benchmarks.llm --plan solver`` for one
host (``--host``, default sparsegpt: the host, today's MOONSHOT default, and
each ``--weight-update`` at lam 0 and at the default lam) on one calibration
draw. Each method prunes SmolLM2-135M in its
own child process, and its weights are cached on disk. Then one pass of the
dense model over the same draw measures, for every pruned layer l and method
m, with dW = W_m - W_dense (d_out, d_in), x_t the layer's dense input and d_t
the gradient of the sample's summed next-token loss at the layer's output:

- reconstruction error  R_l = sum_t ||dW x_t||^2                (units: output^2)
- Taylor error          T_l = sum_t (d_t . dW x_t)^2            (units: loss^2)

T_l is the quadratic form of the token-mode empirical Fisher (one rank-one
term per position). Both use the dense model's inputs (not the partly pruned
inputs each layer met in the sequential pass), so every method is measured on
the same data. The JSON holds R and T per layer and method; the plot shows
each method's R_l / R_l(host) and T_l / T_l(host).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import pathlib
import subprocess
import sys
from typing import Any

from benchmarks.llm import HOST_WEIGHT_UPDATES, PROTOCOL_SETTINGS, WEIGHT_UPDATES, make_plan, over_draws
from benchmarks.llm_run import prune, run_data
from benchmarks.provenance import code_version, machine_description
from benchmarks.report import run_label

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _weights_file(run: dict[str, Any]) -> pathlib.Path:
    from moonshot_plugins.assets import cache_dir

    key = hashlib.sha256(json.dumps({**run, **PROTOCOL_SETTINGS}, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "layer-errors" / f"{key}.pt"


def _pruned_linears(model) -> dict[str, Any]:
    import torch

    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}


def prune_and_save(run: dict[str, Any]) -> None:
    """Child process: prune with ``run`` and save its Linear weights (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model_dir, loader, _ = run_data(PROTOCOL_SETTINGS, run)
    model = prune(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), run, loader)
    weights = {n: m.weight.detach().clone() for n, m in _pruned_linears(model).items()}
    target = _weights_file(run)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")  # a killed run leaves no file the cache would trust
    torch.save(weights, partial)
    partial.replace(target)


def measure(runs: list[dict[str, Any]], labels: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`layer_errors` of the cached weights of ``runs``, over the draw of ``runs[0]``."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, loader, _ = run_data(PROTOCOL_SETTINGS, runs[0])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    layers = _pruned_linears(model)
    deltas = {}
    for label, run in zip(labels, runs):
        pruned = torch.load(_weights_file(run))
        deltas[label] = {n: pruned[n] - layers[n].weight.detach() for n in layers}
    return layer_errors(model, loader, deltas)


def layer_errors(model, loader, deltas: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Both objectives' errors of weight changes, on ``model``'s own inputs and gradients.

    :param model: the dense causal LM (not changed; its ``.grad`` stays None)
    :param loader: batches with ``input_ids`` and ``attention_mask``, (B, T)
    :param deltas: method label -> layer name -> dW, (d_out, d_in)
    :return: layer name -> method label -> {"reconstruction": R_l, "taylor": T_l}
    """
    import torch
    from tqdm import tqdm

    names = list(next(iter(deltas.values())))
    layers = dict(model.named_modules())
    errors = {n: {label: {"reconstruction": 0.0, "taylor": 0.0} for label in deltas} for n in names}
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name):
        return lambda module, args: inputs.__setitem__(name, args[0].detach().flatten(0, -2))

    def accumulate(name):
        def hook(module, grad_input, grad_output):
            x, d = inputs.pop(name), grad_output[0].detach().flatten(0, -2)
            for label, delta in deltas.items():
                y = x @ delta[name].to(x.dtype).T  # (tokens, d_out): the output change
                errors[name][label]["reconstruction"] += float((y * y).sum())
                errors[name][label]["taylor"] += float(((d * y).sum(-1) ** 2).sum())
        return hook

    handles = [h for n in names for h in (layers[n].register_forward_pre_hook(keep_input(n)),
                                          layers[n].register_full_backward_hook(accumulate(n)))]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for batch in tqdm(loader, desc="per-layer errors", unit="batch"):
                ids = batch["input_ids"]
                # a leaf input that needs a gradient, so every layer's output gets one
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
                grads = torch.autograd.grad(loss, embeds)  # activations only: no parameter .grad
                del grads
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return errors


def plot(errors: dict[str, dict[str, dict[str, float]]], labels: list[str], path: pathlib.Path, title: str) -> None:
    """Two panels (reconstruction, Taylor): each method's per-layer error / the host's, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(errors)
    fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for axis, objective in zip(axes, ("reconstruction", "taylor")):
        for label in labels[1:]:
            ratios = [errors[n][label][objective] / errors[n][labels[0]][objective] for n in names]
            axis.plot(range(len(names)), ratios, marker=".", linewidth=0.8, label=label)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_ylabel(f"{objective} error / host's")
    blocks = [i for i, n in enumerate(names) if n.endswith("self_attn.q_proj")]
    axes[1].set_xticks(blocks, [str(k) for k in range(len(blocks))], fontsize=7)
    axes[1].set_xlabel("decoder block (7 layers each: q, k, v, o, gate, up, down)")
    axes[0].set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layer_errors", description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--host", choices=sorted(HOST_WEIGHT_UPDATES), default="sparsegpt",
                        help="the host the methods are measured against")
    parser.add_argument("--weight-update", action="append", choices=WEIGHT_UPDATES,
                        help="the solver plan's weight updates to measure (repeatable; default: resolve)")
    parser.add_argument("--calib-source", default="austen")
    parser.add_argument("--draw", type=int, default=0)
    parser.add_argument("--output", type=pathlib.Path, required=True, help="results JSON")
    parser.add_argument("--plot", type=pathlib.Path,
                        help="default: docs/layer-errors-<sparsity>[-<host> unless sparsegpt].png")
    parser.add_argument("--prune-one", help=argparse.SUPPRESS)  # internal: JSON of one run
    args = parser.parse_args(argv)
    if args.prune_one:
        prune_and_save(json.loads(args.prune_one))
        return 0
    updates = tuple(args.weight_update or ("resolve",))
    refused = [u for u in updates if u not in HOST_WEIGHT_UPDATES[args.host]]
    if refused:
        parser.error(f"--weight-update {refused[0]} is not one of {args.host}'s weight updates: "
                     f"{list(HOST_WEIGHT_UPDATES[args.host])}")
    plan = make_plan("solver", (args.sparsity,), (args.host,), updates)
    runs = [r for r in over_draws(plan, (args.calib_source,), args.draw + 1) if r["draw"] == args.draw]
    labels = [run_label(r) for r in runs]
    plot_path = args.plot or ROOT / "docs" / (
        f"layer-errors-{args.sparsity.replace(':', 'of')}" + ("" if args.host == "sparsegpt" else f"-{args.host}") + ".png")
    for label, run in zip(labels, runs):
        if not _weights_file(run).exists():
            print(f"pruning: {label}", flush=True)
            subprocess.run([sys.executable, "-m", "benchmarks.layer_errors", "--output", str(args.output),
                            "--prune-one", json.dumps(run)], cwd=ROOT, check=True)
    errors = measure(runs, labels)
    title = f"SmolLM2-135M {args.sparsity}, {args.calib_source} draw {args.draw}: per-layer error relative to {labels[0]}"
    plot(errors, labels, plot_path, title)
    args.output.write_text(json.dumps({
        "command": "python -m benchmarks.layer_errors " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_description(),
        "date": str(datetime.date.today()), "code": code_version(), "settings": PROTOCOL_SETTINGS, "sparsity": args.sparsity, "host": args.host, "calib_source": args.calib_source, "draw": args.draw,
        "methods": labels, "errors": errors,
    }, indent=1) + "\n")
    for label in labels[1:]:
        for objective in ("reconstruction", "taylor"):
            total = sum(e[label][objective] for e in errors.values()) / sum(e[labels[0]][objective] for e in errors.values())
            print(f"{label}: {objective} total / host's = {total:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
