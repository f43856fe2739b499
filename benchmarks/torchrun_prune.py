"""Pruning runs of the MOONSHOT modifiers, alone or under ``torchrun``.

    torchrun --nproc-per-node 2 benchmarks/torchrun_prune.py MODEL_DIR RUNS.json OUT_DIR
    python benchmarks/torchrun_prune.py MODEL_DIR RUNS.json OUT_DIR      # one process

On the CPU the process group is initialised here with gloo (LLM Compressor's
``init_dist`` needs an accelerator). Each rank is given its own contiguous
shard of the calibration set, as ``llmcompressor.datasets.get_rank_partition``
bounds it: LLM Compressor 0.14's own split of one dataset passed to every rank
hands every rank the first shard's rows (docs/big-models.md, Under torchrun). Each run of
RUNS.json (a list) is

    {"name": str, "modifier": "MoonshotSparseGPTModifier" | "MoonshotWandaModifier",
     "fields": {...}, "num_samples": int, "seq_len": int,
     "rank_fields": [{...} per rank] (optional, merged over "fields"),
     "rank_num_samples": [int per rank] (optional: shards of these sizes instead),
     "unsharded": true (optional: every rank passes the whole set to oneshot),
     "output_dir": str (optional, passed to oneshot)}

and leaves, per rank, OUT_DIR/NAME.rankR.pt: the pruned Linear weights (or
None) and a record: wall seconds of oneshot, world size, and the error
message if oneshot raised. The calibration samples are fixed random token
windows (seed 0), so every launch sees the same set.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

def calibration_dataset(rows: int, vocab_size: int, seq_len: int):
    """``rows`` windows of ``seq_len`` random token ids (seed 0), as a
    tokenized ``datasets.Dataset`` (what oneshot splits across ranks).

    Exactly the samples used: oneshot's sampler orders rows by length, which
    ties leave in no fixed order, so a longer dataset would let one process
    and several pick different rows."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab_size, (rows, seq_len), generator=generator)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )


def rank_shard(run: dict[str, Any], rank: int, vocab_size: int):
    """This rank's calibration samples (all of them in one process)."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    sizes = run.get("rank_num_samples")
    total = sum(sizes) if sizes else run["num_samples"]
    dataset = calibration_dataset(total, vocab_size, run["seq_len"])
    if sizes:
        start = sum(sizes[:rank])
        return dataset.select(range(start, start + sizes[rank]))
    if run.get("unsharded"):
        return dataset
    start, end = (math.floor(total * r / world_size) for r in (rank, rank + 1))
    return dataset.select(range(start, end))


def prune(model_dir: str, run: dict[str, Any], rank: int) -> dict[str, Any]:
    """One oneshot run; the pruned Linear weights and its record."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    import moonshot_plugins.llmcompressor as plugins

    fields = {**run["fields"], **(run.get("rank_fields") or [{}] * (rank + 1))[rank]}
    modifier = getattr(plugins, run["modifier"])(**fields)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = rank_shard(run, rank, model.config.vocab_size)
    record: dict[str, Any] = {"world_size": dist.get_world_size() if dist.is_initialized() else 1}
    start = time.perf_counter()
    try:
        oneshot(
            model=model,
            recipe=[modifier],
            dataset=dataset,
            num_calibration_samples=len(dataset),
            max_seq_length=run["seq_len"],
            shuffle_calibration_samples=False,
            output_dir=run.get("output_dir"),
        )
    except Exception as exc:  # recorded for the caller, which asserts on it
        record["error"] = f"{type(exc).__name__}: {exc}"
        return {"weights": None, "record": record}
    record["wall_s"] = time.perf_counter() - start
    weights = {
        k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("proj.weight")
    }
    return {"weights": weights, "record": record}


def main(argv: list[str]) -> int:
    model_dir, runs_path, out_dir = argv
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for run in json.loads(pathlib.Path(runs_path).read_text()):
        torch.save(prune(model_dir, run, rank), out / f"{run['name']}.rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
