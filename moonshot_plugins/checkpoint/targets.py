"""Which layers of a saved checkpoint are targeted, and which tensor holds each weight.

The ``targets``/``ignore`` of the sparsity modifiers in the ``recipe.yaml``
LLM Compressor saves beside the checkpoint select the layers (arguments
override them; without a recipe: ``Linear`` minus ``lm_head``). They are
matched as LLM Compressor matches them, against a weightless model built from
``config.json``, or, for an architecture transformers cannot build, against
module names guessed from the tensor names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from moonshot_plugins.checkpoint.bitmask import LEGACY_PARAMS
from moonshot_plugins.checkpoint.safetensors_io import CheckpointError, Headers
from moonshot_plugins.core.mask_structure import UNSTRUCTURED

RECIPE_NAME = "recipe.yaml"
DEFAULT_TARGETS: tuple[str, ...] = ("Linear",)
DEFAULT_IGNORE: tuple[str, ...] = ("re:.*lm_head",)


@dataclasses.dataclass
class TargetChoice:
    """The targets/ignore a check uses, and where they came from."""

    targets: list[str]
    ignore: list[str]
    source: str  # "recipe", "default" or "arguments" (or a mix, e.g. "recipe+arguments")
    recipe_mask_structures: list[str]  # mask_structure of the recipe's sparsity modifiers


def choose_targets(
    path: Path, targets: Sequence[str] | str | None, ignore: Sequence[str] | str | None
) -> TargetChoice:
    """``targets``/``ignore`` where given, else those of the recipe in ``path`` (else the defaults)."""
    modifiers = _read_recipe(path)
    if modifiers:
        recipe_targets = sorted({t for mod in modifiers for t in _as_list(mod.get("targets") or list(DEFAULT_TARGETS))})
        recipe_ignore = sorted({i for mod in modifiers for i in _as_list(mod.get("ignore"))})
        structures = [str(mod.get("mask_structure", UNSTRUCTURED)) for mod in modifiers]
    else:
        recipe_targets, recipe_ignore, structures = list(DEFAULT_TARGETS), list(DEFAULT_IGNORE), []
    sources = []
    if targets is None or ignore is None:
        sources.append("recipe" if modifiers else "default")
    if targets is not None or ignore is not None:
        sources.append("arguments")
    return TargetChoice(
        targets=_as_list(targets) if targets is not None else recipe_targets,
        ignore=_as_list(ignore) if ignore is not None else recipe_ignore,
        source="+".join(sources),
        recipe_mask_structures=structures,
    )


def _read_recipe(path: Path) -> list[dict[str, Any]] | None:
    """The sparsity modifiers (dicts with targets/ignore/mask_structure) of ``path/recipe.yaml``."""
    recipe = path / RECIPE_NAME
    if not recipe.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(recipe.read_text())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{recipe}: unreadable recipe ({exc})") from exc
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, str) and key.endswith("Modifier") and isinstance(value, dict) and "sparsity" in value:
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(data)
    return found


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _meta_model(path: Path) -> torch.nn.Module | None:
    """A weightless model from ``config.json`` (for class-name matching), or None."""
    if not (path / "config.json").is_file():
        return None
    import logging

    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    try:
        config = AutoConfig.from_pretrained(path)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        for auto in (AutoModelForCausalLM, AutoModel):
            try:
                with torch.device("meta"):
                    return auto.from_config(config)
            except Exception:  # noqa: BLE001 - unknown architecture: fall back to tensor names
                continue
        return None
    except Exception:  # noqa: BLE001
        return None
    finally:
        logging.disable(logging.NOTSET)
        transformers.logging.set_verbosity(previous)


class _Pseudo(torch.nn.Module):
    """Stands in for a module when only tensor names are known (class name guessed)."""


def _pseudo_modules(tensors: Headers) -> list[tuple[str, torch.nn.Module]]:
    out = []
    for key, (_, shape, _) in tensors.items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        name = key[: -len(".weight")]
        is_embedding = bool(re.search(r"(^|\.)(embed\w*|wte|wpe|word_embeddings)$", name))
        cls = type("Embedding" if is_embedding else "Linear", (_Pseudo,), {})
        out.append((name, cls()))
    return out


def _matches(name: str, module: torch.nn.Module, targets: Iterable[str]) -> bool:
    from compressed_tensors.utils import match_targets

    return bool(match_targets(name, module, list(targets)))


def _matched_modules(
    path: Path, tensors: Headers, targets: list[str], ignore: list[str]
) -> tuple[list[tuple[str, torch.nn.Module]], dict[str | None, str | None], str]:
    """Matched (name, module) pairs, tied output -> input embedding names, and how modules were found."""
    from compressed_tensors.utils import match_named_modules

    model = _meta_model(path)
    if model is None:
        named = [
            (name, module)
            for name, module in _pseudo_modules(tensors)
            if _matches(name, module, targets) and not _matches(name, module, ignore)
        ]
        return named, {}, "tensor-names"
    named = list(match_named_modules(model, targets, ignore))
    tied = {}
    tie = getattr(model.config, "tie_word_embeddings", False)
    if tie and model.get_input_embeddings() is not None and model.get_output_embeddings() is not None:
        names = {id(m): n for n, m in model.named_modules()}
        tied[names.get(id(model.get_output_embeddings()))] = names.get(id(model.get_input_embeddings()))
    return named, tied, "config"


def select_layers(
    path: Path, tensors: Headers, targets: list[str], ignore: list[str]
) -> tuple[list[tuple[str, str]], str]:
    """[(module name, checkpoint key of its weight)], and how modules were found.

    A targeted module whose weight is absent is kept with its expected key
    (the check reports it missing); container modules without a weight of
    their own are dropped.
    """
    named, tied, source = _matched_modules(path, tensors, targets, ignore)
    selected = []
    for name, module in named:
        if isinstance(module, torch.nn.Embedding) or type(module).__name__ == "Embedding":
            continue  # never pruned: LLM Compressor's pruning modifiers skip embeddings too
        key = f"{name}.weight"
        if key not in tensors and all(f"{name}.{p}" in tensors for p in LEGACY_PARAMS):
            key = f"{name}.compressed"
        if key not in tensors and tied.get(name) and f"{tied[name]}.weight" in tensors:
            key = f"{tied[name]}.weight"  # tied output embedding: its weight is stored once
        if key not in tensors and not any(k.startswith(f"{name}.") for k in tensors):
            if list(module.parameters(recurse=False)) or isinstance(module, _Pseudo):
                selected.append((name, key))  # the check reports it missing
            continue
        if key not in tensors and f"{name}.weight_packed" not in tensors:
            continue  # a container module with no weight of its own
        selected.append((name, key))
    return selected, source
