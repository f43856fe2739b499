"""Host vs MOONSHOT pruning cost at a real model size (random weights).

    python -m benchmarks.gpu_timing --shape llama-3.2-1b --samples 128 --seq-len 2048

Random-initialised weights are enough for cost: the work per layer depends on
shapes only. Each method runs in its own child process (wall seconds of the
``oneshot`` call, peak accelerator memory, peak RSS). The methods are each
host, MOONSHOT at the modifier's defaults, and the README's opt-in 2:4 path;
each MOONSHOT run is paired with its host's run of the same repeat
(``--methods`` picks and orders them; keep a host before its MOONSHOT runs so
a drifting machine affects both alike). The results file
(``benchmarks/results/<date>-timing-<device>.json`` unless ``--output``) is
rewritten after each method, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.provenance import code_version, write_atomically
from moonshot_plugins.cli import MODIFIER_DEFAULT

ROOT = pathlib.Path(__file__).resolve().parents[1]

SHAPES = {
    # Llama-3.2-1B's published configuration
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0),
    # SmolLM2-135M's configuration
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}

# (label, host, taylor_weight, further modifier fields): each host, MOONSHOT at
# the modifier's defaults, and the README's opt-in 2:4 path for that host
METHODS = [
    ("sparsegpt", "sparsegpt", None, {}),
    ("moonshot-sparsegpt", "sparsegpt", MODIFIER_DEFAULT, {}),
    ("wanda", "wanda", None, {}),
    ("moonshot-wanda", "wanda", MODIFIER_DEFAULT, {}),
    ("moonshot-wanda-resolve", "wanda", 0.5, {"weight_update": "resolve"}),
    ("moonshot-sparsegpt-admm-fast", "sparsegpt", MODIFIER_DEFAULT,
     {"weight_update": "admm", "dampening_frac": 0.1, "admm_rho": 0.3, "resolve_max_iters": 25,
      "fisher_samples": 16}),
]
METHOD_LABELS = [m[0] for m in METHODS]


def _save_model(shape: str, path: pathlib.Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import make_tiny_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)  # oneshot wants a processor on disk


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from moonshot_plugins.cli import make_modifier
    from moonshot_plugins.lm import calibration_loader, run_oneshot

    label, host, taylor_weight, fields = next(m for m in METHODS if m[0] == args.one)
    torch.manual_seed(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    ids = torch.randint(0, vocab, (args.samples * args.seq_len,))
    loader = calibration_loader(ids, args.samples, args.seq_len)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    recipe = [make_modifier(host, {"sparsity": 0.5, "mask_structure": "2:4"}, taylor_weight, **fields)]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    run_oneshot(model, recipe, loader, shuffle_calibration_samples=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "method": label, "host": host, "taylor_weight": taylor_weight, "fields": fields,
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_accelerator_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def _run_child(args: argparse.Namespace, model_dir: pathlib.Path, label: str) -> dict[str, Any]:
    """One method in its own process, so peak memory is its own."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_timing", "--shape", args.shape,
           "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--model-dir", str(model_dir), "--one", label]
    # stderr is inherited so progress bars and errors show as they happen
    out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"failed: {label} (exit status {out.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def _add_ratios(results: list[dict[str, Any]]) -> None:
    """Each run's time and peak memory over its host's run of the same repeat, in place."""
    for r in results:
        base = next((b for b in results if b["method"] == r["host"] and b["repeat"] == r["repeat"]), None)
        if base is None:
            continue
        r["seconds_vs_host"] = r["seconds"] / base["seconds"]
        r["rss_vs_host"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        if r["peak_accelerator_mb"]:
            r["accelerator_mb_vs_host"] = r["peak_accelerator_mb"] / base["peak_accelerator_mb"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_timing")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--methods", nargs="+", choices=METHOD_LABELS, default=METHOD_LABELS,
                        help="in this order; each MOONSHOT method is paired with its host's run")
    parser.add_argument("--output", type=pathlib.Path, default=None)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--one", choices=METHOD_LABELS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    output = args.output or ROOT / "benchmarks" / "results" / f"{datetime.date.today()}-timing-{device.replace(' ', '-')}.json"
    doc = {
        "command": "python -m benchmarks.gpu_timing " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": f"{device}, torch {torch.__version__}", "date": str(datetime.date.today()),
        "code": code_version(), "shape": args.shape, "samples": args.samples, "seq_len": args.seq_len,
        "weights": "random-initialised (cost depends on shapes only)", "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = pathlib.Path(tmp) / "model"
        _save_model(args.shape, model_dir)
        for repeat in range(args.repeats):
            for label in args.methods:
                doc["results"].append({**_run_child(args, model_dir, label), "repeat": repeat})
                _add_ratios(doc["results"])
                write_atomically(output, doc)  # after each method: a cut run keeps what it measured
                print(doc["results"][-1], flush=True)
    print(f"{'method':30} {'seconds':>9} {'x host':>7} {'peak GPU MB':>12} {'x host':>7}")
    for r in doc["results"]:
        print(f"{r['method']:30} {r['seconds']:9.1f} {r.get('seconds_vs_host', float('nan')):7.2f} "
              f"{r['peak_accelerator_mb'] or 0:12.0f} {r.get('accelerator_mb_vs_host', float('nan')):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
