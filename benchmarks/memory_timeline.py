"""Resident memory over time: a host against MOONSHOT at its defaults.

    python -m benchmarks.memory_timeline --host wanda --sparsity 2:4

The cost pairs report one number per run, the peak RSS. This shows where it
falls and what it is made of. For the host and for MOONSHOT at its defaults
(the benchmark's SmolLM2-135M, Austen draw 0, 32 x 512 calibration tokens),
each pruned in its own process, it samples ``/proc/self/status`` every 0.2 s:

* ``RssAnon``: memory the process allocated (activations, statistics, and
  the pages of the weights it has written, copied from the file);
* ``RssFile``: file-backed pages, chiefly the weights, which
  ``from_pretrained`` maps from ``model.safetensors`` instead of copying, and
  the code of the libraries. They are clean: the kernel can drop them under
  memory pressure and read them back.

It marks MOONSHOT's gradient pass and records the MiB of the per-layer
statistics the pass hands to the host (``statistics_mib``: the Fisher, the
token weights, ...), held until each layer is pruned, and, at the pass's
end and the run's end, the resident MiB of the weights file's mapping. Results: JSON with
every sample; ``--plot`` draws both timelines. Times stretch when anything
else runs; the memory does not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import subprocess
import sys
from typing import Any

from benchmarks.provenance import code_version, machine_description, write_atomically

ROOT = pathlib.Path(__file__).resolve().parents[1]
INTERVAL_S = 0.2


def mapping_mib(suffix: str) -> int:
    """Resident MiB of the mappings of files whose path ends with ``suffix``
    (smaps ``Rss``: clean file pages and the pages copied on write)."""
    total, inside = 0, False
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if not line[:1].isupper():  # a mapping's header: address range, ..., path
            inside = len(head) > 5 and head[5].endswith(suffix)
        elif inside and head[0] == "Rss:":
            total += int(head[1]) // 1024
    return total


def measure(run: dict[str, Any]) -> dict[str, Any]:
    """Prune as ``run`` says (a run of ``benchmarks.llm``) and sample its memory."""
    import torch
    from transformers import AutoModelForCausalLM

    import moonshot_plugins.llmcompressor.gradient_pass as gradient_pass
    import moonshot_plugins.llmcompressor.mixin as mixin
    from benchmarks.llm import PROTOCOL_SETTINGS
    from benchmarks.llm_run import ResidentMemorySampler, prune, run_data

    torch.manual_seed(0)
    model_dir, loader, _ = run_data(PROTOCOL_SETTINGS, run)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    marks: dict[str, Any] = {}
    pass_blocks, collect = gradient_pass.run_gradient_pass_by_blocks, mixin.collect_layer_statistics

    def marked_pass(*args: Any, **kwargs: Any) -> int:
        marks["pass_start_s"] = sampler.now()
        used = pass_blocks(*args, **kwargs)
        marks.update(pass_end_s=sampler.now(), weights_file_mib_at_pass_end=mapping_mib("model.safetensors"))
        return used

    def measured_statistics(*args: Any, **kwargs: Any) -> tuple[dict, int]:
        statistics, used = collect(*args, **kwargs)
        marks["statistics_mib"] = round(sum(_tensor_bytes(vars(r)) for r in statistics.values()) / 2**20, 1)
        return statistics, used

    gradient_pass.run_gradient_pass_by_blocks = marked_pass  # this child process only
    mixin.collect_layer_statistics = measured_statistics
    with ResidentMemorySampler(INTERVAL_S) as sampler:
        prune(model, run, loader)
    marks["weights_file_mib_at_end"] = mapping_mib("model.safetensors")
    peak = max(sampler.samples, key=lambda s: s[1] + s[2])
    return {**run, **marks, "peak_rss_mib": peak[1] + peak[2], "at_peak": {"s": peak[0], "anon_mib": peak[1],
            "file_mib": peak[2]}, "peak_anonymous_mib": sampler.peak_anonymous_mib,
            "samples": sampler.samples}


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (a tensor, or a dict, list or tuple of them)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def plot(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    """Total and anonymous RSS over time, one panel per run, the pass shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.4), sharey=True)
    for ax, row in zip(axes, rows):
        seconds, anon, file = zip(*row["samples"])
        ax.plot(seconds, [a + f for a, f in zip(anon, file)], label="RSS (anonymous + file-backed)")
        ax.plot(seconds, anon, "--", label="anonymous")
        if "pass_start_s" in row:
            ax.axvspan(row["pass_start_s"], row["pass_end_s"], alpha=0.15, color="grey", label="gradient pass")
        ax.set_title(f"{row['method']} {row['host']} {row['sparsity']}: peak {row['peak_rss_mib']} MiB")
        ax.set_xlabel("seconds into pruning")
    axes[0].set_ylabel("MiB")
    axes[-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", choices=("sparsegpt", "wanda"), default="wanda")
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--output", type=pathlib.Path, help="default benchmarks/results/<date>-memory-timeline-<host>.json")
    parser.add_argument("--plot", type=pathlib.Path, help="also draw the timelines to this PNG")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a run's JSON, measured in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    from benchmarks.llm import _moonshot, _run
    from benchmarks.report import default_settings

    source = {"calib_source": "austen", "draw": 0}
    runs = [{**_run("host", args.sparsity, args.host), **source},
            {**_moonshot(args.sparsity, args.host, default_settings(args.host, args.sparsity)[0]), **source}]
    rows = []
    for run in runs:
        out = subprocess.run([sys.executable, "-m", "benchmarks.memory_timeline", "--one", json.dumps(run)],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print({k: v for k, v in rows[-1].items() if k != "samples"}, flush=True)
    date = datetime.date.today().isoformat()
    command = f"python -m benchmarks.memory_timeline --host {args.host} --sparsity {args.sparsity}"
    command += "".join(f" --{k} {v}" for k, v in (("output", args.output), ("plot", args.plot)) if v)
    path = args.output or ROOT / "benchmarks" / "results" / f"{date}-memory-timeline-{args.host}.json"
    write_atomically(path, {"date": date, "code": code_version(("moonshot_plugins", "benchmarks")),
                            "machine": machine_description(), "command": command,
                            "interval_s": INTERVAL_S, "rows": rows})
    if args.plot:
        plot(rows, args.plot)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
