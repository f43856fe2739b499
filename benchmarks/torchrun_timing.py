"""Wall time of one MOONSHOT pruning run in 1 process against 2 under torchrun (CPU, gloo).

    nice -n 15 python benchmarks/torchrun_timing.py benchmarks/results/DATE-cpu-torchrun-timing.json

A random Llama (hidden 256, MLP 768, 4 layers, from ``tests/tiny_models.py``)
is pruned to 50% by MoonshotSparseGPTModifier (token mode, auto lam, row
weights) and by MoonshotWandaModifier (2:4, lam 0.5) on 32 windows of 128
tokens, with :mod:`benchmarks.torchrun_prune` in one process and under
``torchrun --nproc-per-node 2``. Recorded per run: oneshot's wall seconds on
each rank (model loading and process start-up excluded) and the wall seconds
of the whole launch. Plumbing timing only: the model is random.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.tiny_models import save_tiny_llama  # noqa: E402

MODEL = dict(hidden_size=256, intermediate_size=768, num_layers=4)
DATA = dict(num_samples=32, seq_len=128)
RUNS = [
    dict(name="sparsegpt_auto", modifier="MoonshotSparseGPTModifier",
         fields=dict(sparsity=0.5, ignore=["re:.*lm_head"], gradient_dtype="float32")),
    dict(name="wanda_2of4", modifier="MoonshotWandaModifier",
         fields=dict(mask_structure="2:4", taylor_weight=0.5, ignore=["re:.*lm_head"],
                     gradient_dtype="float32")),
]


def launch(model_dir: pathlib.Path, runs_path: pathlib.Path, out: pathlib.Path, processes: int) -> float:
    """Run the worker; wall seconds of the whole launch."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(
        [*launcher, str(REPO / "benchmarks" / "torchrun_prune.py"), str(model_dir), str(runs_path), str(out)],
        env=env, check=True, capture_output=True,
    )
    return time.perf_counter() - start


def main(result_path: str) -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        model_dir = save_tiny_llama(tmp / "model", **MODEL)
        runs = [{**DATA, **run} for run in RUNS]
        runs_path = tmp / "runs.json"
        runs_path.write_text(json.dumps(runs))
        for processes in (1, 2):
            out = tmp / f"p{processes}"
            launch_s = launch(model_dir, runs_path, out, processes)
            for run in runs:
                records = [torch.load(out / f"{run['name']}.rank{r}.pt")["record"] for r in range(processes)]
                rows.append({
                    "run": run["name"], "processes": processes,
                    "oneshot_wall_s_per_rank": [round(r["wall_s"], 2) for r in records],
                    "launch_wall_s_both_runs": round(launch_s, 2),
                })
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "model": {"kind": "random LlamaForCausalLM (tests/tiny_models.py)", **MODEL},
        "calibration": DATA,
        "rows": rows,
        "note": (
            "nice -n 15, OMP_NUM_THREADS=1 per process, on a 2-core machine shared with a "
            "long-running benchmark at the same time: absolute seconds and the speed-up are "
            "indicative only. Each process is one thread, so 2 processes may use both cores."
        ),
    }
    pathlib.Path(result_path).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
