"""Greedy generations of vLLM (in its own venv) and transformers on the same prompt token ids.

:func:`compare_greedy` loads a checkpoint in vLLM (in the :data:`VLLM_VENV`,
in a child process) and in transformers (here) and compares their greedy
generations token by token.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from integration_tests.venvs import VLLM_VENV, ensure_venv, run_child

__all__ = ["DEFAULT_PROMPTS", "compare_greedy", "teacher_forced_agreement", "transformers_greedy", "vllm_greedy"]

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
    result = run_child(python, "vllm_greedy.py", payload, timeout=timeout, env=env)
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
