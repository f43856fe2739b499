"""Peak memory of the gradient pass against model depth (random-init Llama).

    python -m benchmarks.gradient_pass_memory
    python -m benchmarks.gradient_pass_memory --groups

For 8, 16 and 32 decoder layers (small widths, so it runs in minutes on a
CPU) and three ways of running the pass, each in its own child process:

* ``whole-model``: the whole-model pass (``core.run_gradient_pass``, decoder
  layers under activation checkpointing), the model in memory;
* ``blockwise``: the blockwise pass, the model in memory;
* ``blockwise-offloaded``: the blockwise pass on a model loaded offloaded to
  disk (``compressed_tensors.offload.load_offloaded_model``, as LLM
  Compressor loads a model bigger than its machine).

Measured: ``onloaded_peak_bytes``, the most parameter and buffer bytes held
on the execution device at once (the blockwise passes count what their
onload context holds; the whole-model pass holds the whole model); the
process's RSS just before the pass and its peak during the pass
(``rss_peak_bytes``, Linux: the high-water mark is reset first). Results
go to ``benchmarks/results/<date>-gradient-pass-memory.json``.

``--groups`` measures the other axis, how many batches share a block's trips
to the accelerator, on a wider model whose boundary activations (16 samples)
are about 0.85x its weights, as on the Llama-3.2-1B shape of
``benchmarks.gpu_timing``. The blockwise pass runs with three group budgets:
one batch per group, the default (``group_budget``: a quarter of the model,
within a quarter of the free RAM) and a quarter of the free RAM (the
default before 2026-12-04). The execution device is the CPU, so the blocks' trips
are counted (``block_trips``) rather than timed. Results go to
``benchmarks/results/<date>-gradient-pass-groups.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.provenance import code_version, machine_description, write_atomically

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPTHS = (8, 16, 32)
MODES = ("whole-model", "blockwise", "blockwise-offloaded")
CONFIG = dict(hidden_size=128, intermediate_size=512, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
              tie_word_embeddings=False)
SAMPLES, SEQ_LEN = 4, 128
GROUP_DEPTH = 16
GROUP_CONFIG = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                    num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024,
                    tie_word_embeddings=False)
GROUP_SAMPLES, GROUP_SEQ_LEN = 16, 512
BUDGETS = ("one-batch", "quarter-of-model", "quarter-of-free-ram")


def save_model(path: pathlib.Path, depth: int, config: dict[str, Any] = CONFIG) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=depth, **config)).save_pretrained(path)


def _peak_rss_bytes() -> int:
    """VmHWM of this process (bytes)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_bytes() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _proj_collector(model: Any) -> Any:
    """A token-mode Fisher collector on every ``*proj`` layer of ``model``."""
    from moonshot_plugins.core import FisherCollector

    return FisherCollector(
        {n: m for n, m in model.named_modules() if n.endswith("proj")}, matrix=False, token_weights=True
    )


def _start_peak_window() -> int:
    """Free what the allocator holds, reset the RSS high-water mark; the RSS now (bytes)."""
    from moonshot_plugins.core import release_freed_memory

    release_freed_memory()
    rss_before = _rss_bytes()
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    return rss_before


def measure(model_dir: pathlib.Path, mode: str) -> dict[str, Any]:
    """One pass in this process; its memory figures."""
    import torch
    from compressed_tensors.offload import disable_onloading, load_offloaded_model
    from transformers import AutoModelForCausalLM

    from moonshot_plugins.core import module_bytes, run_gradient_pass
    from moonshot_plugins.lm import calibration_loader
    from moonshot_plugins.llmcompressor.causal_lm import CausalLMLosses
    from moonshot_plugins.llmcompressor.gradient_pass import onloaded, run_gradient_pass_by_blocks

    if mode == "blockwise-offloaded":
        offload_dir = tempfile.mkdtemp()
        with load_offloaded_model():
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32, device_map="auto",
                max_memory={"cpu": 10_000}, offload_folder=offload_dir,
            )
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with disable_onloading():  # sizes without onloading anything
        sizes = {id(m): module_bytes(m) for m in model.modules()}
    torch.manual_seed(0)
    loader = calibration_loader(torch.randint(0, CONFIG["vocab_size"], (SAMPLES * SEQ_LEN,)),
                                num_samples=SAMPLES, seq_len=SEQ_LEN)
    layers = list(model.model.layers)
    collector = _proj_collector(model)
    held, peak = [0], [0]

    @contextlib.contextmanager
    def counting(module):
        held[0] += sizes[id(module)]
        peak[0] = max(peak[0], held[0])
        with onloaded(module, torch.device("cpu")):
            yield
        held[0] -= sizes[id(module)]

    rss_before = _start_peak_window()
    start = time.perf_counter()
    if mode == "whole-model":
        run_gradient_pass(model, loader, collector, CausalLMLosses(), checkpoint_modules=layers)
        peak[0] = sizes[id(model)]
    else:
        run_gradient_pass_by_blocks(model, loader, collector, layers, onload=counting)
    return {
        "depth": len(layers),
        "mode": mode,
        "model_bytes": sizes[id(model)],
        "block_bytes": sizes[id(layers[0])],
        "onloaded_peak_bytes": peak[0],
        "rss_before_pass_bytes": rss_before,
        "rss_peak_bytes": _peak_rss_bytes(),
        "seconds": round(time.perf_counter() - start, 2),
    }


def measure_groups(model_dir: pathlib.Path, budget: str) -> dict[str, Any]:
    """One blockwise pass in this process under the group budget ``budget``
    (one of ``BUDGETS``); its figures."""
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    from moonshot_plugins.core import module_bytes
    from moonshot_plugins.core.blockwise_pass import group_budget
    from moonshot_plugins.lm import calibration_loader
    from moonshot_plugins.llmcompressor.gradient_pass import onloaded, run_gradient_pass_by_blocks

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model_bytes = module_bytes(model)
    available = psutil.virtual_memory().available
    group_bytes = {"one-batch": 0, "quarter-of-model": group_budget(model_bytes, available),
                   "quarter-of-free-ram": available // 4}[budget]
    torch.manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (GROUP_SAMPLES * GROUP_SEQ_LEN,))
    loader = calibration_loader(tokens, num_samples=GROUP_SAMPLES, seq_len=GROUP_SEQ_LEN)
    layers = list(model.model.layers)
    collector = _proj_collector(model)
    trips = [0]

    @contextlib.contextmanager
    def counting(module):
        trips[0] += any(module is layer for layer in layers)
        with onloaded(module, torch.device("cpu")):
            yield

    rss_before = _start_peak_window()
    start = time.perf_counter()
    run_gradient_pass_by_blocks(model, loader, collector, layers, onload=counting, group_bytes=group_bytes)
    return {
        "budget": budget,
        "group_bytes": group_bytes,
        "model_bytes": model_bytes,
        # fp32 input of every block, the last output and one gradient, per sample
        "boundary_bytes_per_sample": GROUP_SEQ_LEN * model.config.hidden_size * 4 * (len(layers) + 2),
        "block_trips": trips[0],
        "groups": trips[0] // (2 * len(layers)),
        "rss_before_pass_bytes": rss_before,
        "rss_peak_bytes": _peak_rss_bytes(),
        "seconds": round(time.perf_counter() - start, 2),
    }


def _child(model_dir: pathlib.Path, mode: str) -> dict[str, Any]:
    """``measure`` or ``measure_groups`` of ``mode`` in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.gradient_pass_memory", "--one", str(model_dir), mode],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    row = json.loads(out.strip().splitlines()[-1])
    print(row, flush=True)
    return row


def _groups_result() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = pathlib.Path(tmp) / f"llama-{GROUP_DEPTH}"
        save_model(model_dir, GROUP_DEPTH, GROUP_CONFIG)
        rows = [_child(model_dir, budget) for budget in BUDGETS]
    return {
        "date": datetime.date.today().isoformat(),
        "code": code_version(("moonshot_plugins", "benchmarks/gradient_pass_memory.py")),
        "machine": machine_description() + " (execution device = cpu: block trips are counted, not copied)",
        "command": "python -m benchmarks.gradient_pass_memory --groups",
        "config": GROUP_CONFIG | {"num_hidden_layers": GROUP_DEPTH, "samples": GROUP_SAMPLES,
                                  "seq_len": GROUP_SEQ_LEN, "dtype": "float32"},
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", action="store_true",
                        help="measure the group budgets of the blockwise pass instead of depth")
    parser.add_argument("--output", type=pathlib.Path,
                        help="results file of --groups (default benchmarks/results/<date>-gradient-pass-groups.json)")
    parser.add_argument("--one", nargs=2, metavar=("MODEL_DIR", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        model_dir, mode = pathlib.Path(args.one[0]), args.one[1]
        print(json.dumps(measure_groups(model_dir, mode) if mode in BUDGETS else measure(model_dir, mode)))
        return
    if args.groups:
        result = _groups_result()
        if args.output:
            result["command"] += f" --output {args.output}"
        path = args.output or ROOT / "benchmarks" / "results" / f"{result['date']}-gradient-pass-groups.json"
        write_atomically(path, result)
        print(f"wrote {path}")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in DEPTHS:
            model_dir = pathlib.Path(tmp) / f"llama-{depth}"
            save_model(model_dir, depth)
            rows.extend(_child(model_dir, mode) for mode in MODES)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": "cpu, 2 cores shared (execution device = cpu: onloading is counted, not copied)",
        "config": CONFIG | {"samples": SAMPLES, "seq_len": SEQ_LEN, "dtype": "float32"},
        "rows": rows,
    }
    path = ROOT / "benchmarks" / "results" / f"{result['date']}-gradient-pass-memory.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
