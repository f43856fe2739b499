"""Inspect and convert saved sparse checkpoints.

* :func:`check_checkpoint` -- per targeted layer sparsity and whether it is
  exactly N:M (default 2:4), plus the global sparsity, read from the
  safetensors files of a saved checkpoint (sharded or not).
* :func:`export_sparse24_bitmask` -- writes the legacy compressed-tensors
  ``sparse-24-bitmask`` checkpoint (dropped by compressed-tensors > 0.14 and
  vLLM >= 0.19.1) for stacks on vLLM 0.7-0.19.
* :func:`register_cli` -- the ``moonshot check`` and ``moonshot export``
  subcommands.

Which layers are checked. LLM Compressor saves the recipe beside the
checkpoint (``recipe.yaml``); the ``targets``/``ignore`` of its sparsity
modifiers (any modifier with a ``sparsity`` field) select the layers, matched
exactly as LLM Compressor matches them (compressed-tensors' ``re:`` regexes,
exact names, class names such as ``Linear``) against a weightless copy of the
model built from ``config.json``. Without a recipe every 2-D ``Linear`` weight
except embeddings and ``lm_head`` is checked. ``targets``/``ignore`` arguments
override the recipe's.

N:M means: along the input dimension (the last one) every group of M
consecutive weights holds at most N non-zeros -- the layout 2:4 sparse tensor
cores (and vLLM's old 2:4 kernels) need. ``-0.0`` counts as zero.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from moonshot_plugins.atomic import atomic_directory, sigterm_raises

__all__ = [
    "CheckpointError",
    "CheckReport",
    "ExportResult",
    "LayerReport",
    "check_checkpoint",
    "export_sparse24_bitmask",
    "pack_bitmask",
    "register_cli",
    "sparse24_compress",
    "sparse24_decompress",
    "unpack_bitmask",
]

RECIPE_NAME = "recipe.yaml"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_TARGETS: tuple[str, ...] = ("Linear",)
DEFAULT_IGNORE: tuple[str, ...] = ("re:.*lm_head",)
LEGACY_FORMAT = "sparse-24-bitmask"
# the last compressed-tensors release that reads LEGACY_FORMAT
LEGACY_CT_VERSION = "0.14.0"
_LEGACY_PARAMS = ("compressed", "bitmask", "shape")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or converted (message names the file or layer)."""


# --- reports ---------------------------------------------------------------


@dataclasses.dataclass
class LayerReport:
    """One targeted layer of a checkpoint."""

    name: str  # module name, e.g. model.layers.0.mlp.up_proj
    tensor: str  # the checkpoint key holding its weight
    file: str  # safetensors file (relative to the checkpoint) holding it
    shape: list[int]
    dtype: str
    zeros: int
    numel: int
    is_nm: bool
    bad_groups: int = 0  # groups of M with more than N non-zeros
    first_bad: list[int] | None = None  # [row, first column] of the first bad group
    reason: str | None = None  # why it is not N:M, in words

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "sparsity": self.sparsity}


@dataclasses.dataclass
class CheckReport:
    """Result of :func:`check_checkpoint`."""

    path: str
    structure: str
    targets: list[str]
    ignore: list[str]
    targets_source: str  # "recipe", "default" or "arguments" (or a mix, e.g. "recipe+arguments")
    recipe_mask_structures: list[str]  # mask_structure of the recipe's sparsity modifiers
    weight_format: str  # "dense", "sparse-24-bitmask", or the quantization format
    files: list[str]
    layers: list[LayerReport]
    model_zeros: int  # over every floating/integer weight tensor in the checkpoint
    model_numel: int
    layer_source: str = "config"  # "config" (meta model) or "tensor-names" (fallback)

    @property
    def ok(self) -> bool:
        return bool(self.layers) and all(layer.is_nm for layer in self.layers)

    @property
    def failing(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.is_nm]

    @property
    def global_sparsity(self) -> float:
        """Fraction of zeros over all targeted layers together."""
        numel = sum(layer.numel for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / numel if numel else 0.0

    @property
    def model_sparsity(self) -> float:
        """Fraction of zeros over every weight tensor of the checkpoint."""
        return self.model_zeros / self.model_numel if self.model_numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "layers"}
        data.update(
            ok=self.ok,
            global_sparsity=self.global_sparsity,
            model_sparsity=self.model_sparsity,
            failing=[layer.name for layer in self.failing],
            layers=[layer.to_dict() for layer in self.layers],
        )
        return data

    def summary(self) -> str:
        lines = [
            f"{self.path}: {len(self.layers)} targeted layers (targets {self.targets}, "
            f"ignore {self.ignore}; from {self.targets_source}), structure {self.structure}",
        ]
        width = max((len(layer.name) for layer in self.layers), default=10)
        for layer in self.layers:
            status = "ok" if layer.is_nm else f"NOT {self.structure}: {layer.reason}"
            lines.append(f"  {layer.name:<{width}}  {layer.sparsity:7.2%}  {status}")
        lines.append(
            f"global sparsity {self.global_sparsity:.2%} over targeted layers, "
            f"{self.model_sparsity:.2%} over all weights"
        )
        if self.ok:
            lines.append(f"OK: every targeted layer is {self.structure}")
        elif not self.layers:
            lines.append("FAIL: no layer matched the targets")
        else:
            names = ", ".join(layer.name for layer in self.failing)
            lines.append(f"FAIL: {len(self.failing)} targeted layer(s) not {self.structure}: {names}")
        return "\n".join(lines)


# --- reading checkpoints ---------------------------------------------------


def parse_structure(structure: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(structure))
    if not match:
        raise ValueError(f"structure must look like 'N:M' (e.g. '2:4'), got {structure!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"structure N:M needs 0 < N < M, got {structure!r}")
    return n, m


def _weight_files(path: Path) -> tuple[list[str], dict[str, str]]:
    """The checkpoint's safetensors files and a tensor-name -> file map from its index (if any)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    index_path = path / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: unreadable safetensors index ({exc})") from exc
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (path / name).is_file():
                raise CheckpointError(f"{path / name}: missing safetensors file (listed in {index_path.name})")
        return files, dict(weight_map)
    if (path / SINGLE_NAME).is_file():
        return [SINGLE_NAME], {}
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path / SINGLE_NAME}: missing safetensors file (no *.safetensors in {path})")
    return files, {}


@contextlib.contextmanager
def _open_safetensors(file: Path) -> Iterator[Any]:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(os.fspath(file), framework="pt", device="cpu")
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file}: missing safetensors file") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: corrupt safetensors file ({exc})") from exc
    with handle as f:
        yield f


def _get_tensor(f: Any, key: str, file: Path) -> torch.Tensor:
    from safetensors import SafetensorError

    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: corrupt safetensors file, cannot read tensor {key!r} ({exc})") from exc


def _read_headers(path: Path, files: Sequence[str]) -> dict[str, tuple[str, list[int], str]]:
    """tensor name -> (file, shape, dtype) for every tensor, reading headers only."""
    tensors: dict[str, tuple[str, list[int], str]] = {}
    for name in files:
        file = path / name
        with _open_safetensors(file) as f:
            for key in f.keys():
                try:
                    sl = f.get_slice(key)
                    tensors[key] = (name, list(sl.get_shape()), str(sl.get_dtype()))
                except Exception as exc:  # noqa: BLE001 - any header problem means a bad file
                    raise CheckpointError(f"{file}: corrupt safetensors file, bad entry {key!r} ({exc})") from exc
    return tensors


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
                    found.append({"modifier": key, **value})
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


def _pseudo_modules(tensors: dict[str, tuple[str, list[int], str]]) -> list[tuple[str, torch.nn.Module]]:
    out = []
    for key, (_, shape, _) in tensors.items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        name = key[: -len(".weight")]
        is_embedding = bool(re.search(r"(^|\.)(embed\w*|wte|wpe|word_embeddings)$", name))
        cls = type("Embedding" if is_embedding else "Linear", (_Pseudo,), {})
        out.append((name, cls()))
    return out


def _select_layers(
    path: Path,
    tensors: dict[str, tuple[str, list[int], str]],
    targets: list[str],
    ignore: list[str],
) -> tuple[list[tuple[str, str]], str]:
    """[(module name, checkpoint key of its weight)], and how modules were found."""
    from compressed_tensors.utils import match_named_modules

    model = _meta_model(path)
    if model is not None:
        named = list(match_named_modules(model, targets, ignore))
        source = "config"
        tied = {}
        tie = getattr(model.config, "tie_word_embeddings", False)
        if tie and model.get_input_embeddings() is not None and model.get_output_embeddings() is not None:
            names = {id(m): n for n, m in model.named_modules()}
            tied[names.get(id(model.get_output_embeddings()))] = names.get(id(model.get_input_embeddings()))
    else:
        named = [
            (name, module)
            for name, module in _pseudo_modules(tensors)
            if _matches(name, module, targets) and not _matches(name, module, ignore)
        ]
        source = "tensor-names"
        tied = {}
    selected = []
    for name, module in named:
        if isinstance(module, torch.nn.Embedding) or type(module).__name__ == "Embedding":
            continue  # never pruned: LLM Compressor's pruning modifiers skip embeddings too
        key = f"{name}.weight"
        if key not in tensors and all(f"{name}.{p}" in tensors for p in _LEGACY_PARAMS):
            key = f"{name}.compressed"
        if key not in tensors and tied.get(name) and f"{tied[name]}.weight" in tensors:
            key = f"{tied[name]}.weight"  # tied output embedding: its weight is stored once
        if key not in tensors and not any(k.startswith(f"{name}.") for k in tensors):
            if list(module.parameters(recurse=False)) or isinstance(module, _Pseudo):
                selected.append((name, key))  # reported as missing below
            continue
        if key not in tensors and f"{name}.weight_packed" not in tensors:
            continue  # a container module with no weight of its own
        selected.append((name, key))
    return selected, source


def _matches(name: str, module: torch.nn.Module, targets: Iterable[str]) -> bool:
    from compressed_tensors.utils import match_targets

    return bool(match_targets(name, module, list(targets)))


def _load_dense(f: Any, file: Path, key: str, weight_format: str) -> torch.Tensor:
    """The weight stored under ``key`` as a tensor whose zeros are the pruned weights."""
    if key.endswith(".compressed"):
        prefix = key[: -len(".compressed")]
        return sparse24_decompress(
            _get_tensor(f, key, file),
            _get_tensor(f, f"{prefix}.bitmask", file),
            _get_tensor(f, f"{prefix}.shape", file),
        )
    weight = _get_tensor(f, key, file)
    zp_key = key[: -len(".weight")] + ".weight_zero_point" if key.endswith(".weight") else None
    if zp_key is not None and zp_key in f.keys():
        zero_point = _get_tensor(f, zp_key, file)
        if torch.any(zero_point != 0):
            # asymmetric quantization: a pruned weight is stored as its zero point
            return weight.to(torch.int32) - zero_point.to(torch.int32).reshape(
                zero_point.shape + (1,) * (weight.dim() - zero_point.dim())
            )
    return weight


def _nonzero(weight: torch.Tensor) -> torch.Tensor:
    if weight.dtype.is_floating_point and weight.element_size() == 1:
        weight = weight.to(torch.float32)  # fp8: comparisons are not implemented for it on every build
    return weight != 0


def _nm_stats(weight: torch.Tensor, n: int, m: int) -> tuple[bool, int, list[int] | None, str | None]:
    if weight.dim() != 2:
        return False, 0, None, f"weight is {weight.dim()}-D, N:M applies to 2-D weights"
    rows, cols = weight.shape
    if cols % m:
        return False, 0, None, f"input dimension {cols} is not a multiple of {m}"
    counts = _nonzero(weight).reshape(rows, cols // m, m).sum(-1)
    bad = counts > n
    bad_groups = int(bad.sum())
    if not bad_groups:
        return True, 0, None, None
    row, group = (int(i) for i in bad.nonzero()[0])
    worst = int(counts.max())
    reason = (
        f"{bad_groups} of {counts.numel()} groups of {m} have more than {n} non-zeros "
        f"(first at row {row}, columns {group * m}-{group * m + m - 1}; up to {worst} non-zeros)"
    )
    return False, bad_groups, [row, group * m], reason


def _weight_format(path: Path) -> tuple[str, dict[str, Any] | None]:
    config_path = path / "config.json"
    if not config_path.is_file():
        return "dense", None
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: unreadable config ({exc})") from exc
    qconfig = config.get("quantization_config") or config.get("compression_config")
    if not isinstance(qconfig, dict):
        return "dense", None
    sparsity = qconfig.get("sparsity_config") or {}
    if sparsity.get("format") and sparsity["format"] != "dense":
        return str(sparsity["format"]), qconfig
    if qconfig.get("config_groups"):
        return str(qconfig.get("format") or "quantized"), qconfig
    return "dense", qconfig


def check_checkpoint(
    path: str | os.PathLike[str],
    structure: str = "2:4",
    targets: Sequence[str] | str | None = None,
    ignore: Sequence[str] | str | None = None,
) -> CheckReport:
    """Per-layer sparsity and N:M check of the checkpoint in directory ``path``.

    ``targets``/``ignore`` (compressed-tensors target strings) override those
    of the recipe saved beside the checkpoint; without a recipe the defaults
    are ``["Linear"]`` / ``["re:.*lm_head"]`` (embeddings are never
    targeted). Reads one tensor at a time, so memory stays at the largest
    tensor.

    Raises :class:`CheckpointError` for a missing or corrupt safetensors file
    (naming it), a targeted layer without a weight, or a weight format it
    cannot read; a layer that is not N:M is *reported*
    (``report.ok is False``, ``report.failing``), not raised.
    """
    path = Path(path)
    n, m = parse_structure(structure)
    files, _ = _weight_files(path)
    tensors = _read_headers(path, files)
    weight_format, _ = _weight_format(path)
    if weight_format not in ("dense", LEGACY_FORMAT, "int-quantized", "float-quantized", "naive-quantized"):
        raise CheckpointError(
            f"{path / 'config.json'}: weights stored as {weight_format!r}, which `check` cannot read "
            "(supported: dense, sparse-24-bitmask, int-/float-/naive-quantized)"
        )

    modifiers = _read_recipe(path)
    sources = []
    if modifiers:
        recipe_targets = sorted({t for mod in modifiers for t in _as_list(mod.get("targets") or list(DEFAULT_TARGETS))})
        recipe_ignore = sorted({i for mod in modifiers for i in _as_list(mod.get("ignore"))})
        structures = [str(mod.get("mask_structure", "0:0")) for mod in modifiers]
    else:
        recipe_targets, recipe_ignore, structures = list(DEFAULT_TARGETS), list(DEFAULT_IGNORE), []
    final_targets = _as_list(targets) if targets is not None else recipe_targets
    final_ignore = _as_list(ignore) if ignore is not None else recipe_ignore
    if targets is None or ignore is None:
        sources.append("recipe" if modifiers else "default")
    if targets is not None or ignore is not None:
        sources.append("arguments")

    selected, layer_source = _select_layers(path, tensors, final_targets, final_ignore)

    layers: list[LayerReport] = []
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, key in selected:
        if key not in tensors:
            raise CheckpointError(
                f"{path}: targeted layer {name} has no weight in the checkpoint (expected tensor {key!r})"
            )
        by_file.setdefault(tensors[key][0], []).append((name, key))
    skip_keys = {k for k in tensors if k.endswith((".bitmask", ".shape", "_scale", "_zero_point", "_g_idx"))}
    model_zeros = model_numel = 0
    for file_name in files:
        file = path / file_name
        wanted = dict((key, name) for name, key in by_file.get(file_name, []))
        with _open_safetensors(file) as f:
            for key in f.keys():
                if key in skip_keys:
                    continue
                if key in wanted or key.endswith(".compressed"):
                    weight = _load_dense(f, file, key, weight_format)
                else:
                    weight = _get_tensor(f, key, file)
                zeros = int((~_nonzero(weight)).sum())
                model_zeros += zeros
                model_numel += weight.numel()
                if key in wanted:
                    is_nm, bad, first_bad, reason = _nm_stats(weight, n, m)
                    layers.append(
                        LayerReport(
                            name=wanted[key],
                            tensor=key,
                            file=file_name,
                            shape=list(weight.shape),
                            dtype=str(weight.dtype).replace("torch.", ""),
                            zeros=zeros,
                            numel=weight.numel(),
                            is_nm=is_nm,
                            bad_groups=bad,
                            first_bad=first_bad,
                            reason=reason,
                        )
                    )
    order = {name: i for i, (name, _) in enumerate(selected)}
    layers.sort(key=lambda layer: order[layer.name])
    return CheckReport(
        path=os.fspath(path),
        structure=f"{n}:{m}",
        targets=final_targets,
        ignore=final_ignore,
        targets_source="+".join(sources),
        recipe_mask_structures=structures,
        weight_format=weight_format,
        files=files,
        layers=layers,
        model_zeros=model_zeros,
        model_numel=model_numel,
        layer_source=layer_source,
    )


# --- sparse-24-bitmask packing ----------------------------------------------


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a 2-D bool mask into uint8 rows, 8 columns per byte, first column in the lowest bit."""
    if mask.dim() != 2:
        raise ValueError(f"bitmask packing needs a 2-D mask, got shape {tuple(mask.shape)}")
    rows, cols = mask.shape
    padded_cols = -(-cols // 8) * 8
    bits = torch.zeros(rows, padded_cols, dtype=torch.uint8)
    bits[:, :cols] = mask.to(torch.uint8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (bits.reshape(rows, padded_cols // 8, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_bitmask` for a dense ``shape`` (rows, cols)."""
    rows, cols = (int(s) for s in shape)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    bits = (packed.to(torch.uint8).unsqueeze(-1) & weights) != 0
    return bits.reshape(rows, -1)[:, :cols]


def _bits_nonzero(weight: torch.Tensor) -> torch.Tensor:
    """True where the stored bit pattern is not all zeros (so -0.0 counts as a value to keep)."""
    int_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    return weight.contiguous().view(int_type) != 0


def sparse24_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Compress a 2-D weight that is 2:4 along its last dimension.

    Returns ``{"compressed": values (rows, cols/2), "bitmask": uint8
    (rows, ceil(cols/8)), "shape": int64 (2, 1)}`` -- the tensors the legacy
    ``sparse-24-bitmask`` format stores per layer. Every group of four keeps
    exactly two entries: its non-zeros first, then its leading zeros, in
    column order, so decompression restores the weight bit for bit.
    """
    if weight.dim() != 2:
        raise ValueError(f"sparse-24-bitmask needs a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"sparse-24-bitmask needs the input dimension to be a multiple of 4, got {cols}")
    weight = weight.contiguous()
    groups = _bits_nonzero(weight).reshape(rows, cols // 4, 4)
    if bool((groups.sum(-1) > 2).any()):
        raise ValueError("weight is not 2:4 (a group of four has more than two non-zeros)")
    # stable sort puts non-zeros (key 0) before zeros (key 1), each in column order
    order = torch.argsort((~groups).to(torch.int8), dim=-1, stable=True)[..., :2]
    keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
    keep.scatter_(-1, order, True)
    keep = keep.reshape(rows, cols)
    values = weight[keep].reshape(rows, cols // 2)  # row-major: column order within each row
    return {
        "compressed": values,
        "bitmask": pack_bitmask(keep),
        "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1),
    }


def sparse24_decompress(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Dense weight from the three tensors of :func:`sparse24_compress`."""
    dims = [int(s) for s in (shape.flatten().tolist() if isinstance(shape, torch.Tensor) else shape)]
    mask = unpack_bitmask(bitmask, dims)
    dense = torch.zeros(dims, dtype=compressed.dtype)
    dense[mask] = compressed.flatten()
    return dense


# --- export ------------------------------------------------------------------


@dataclasses.dataclass
class ExportResult:
    output: str
    layers_compressed: int
    global_sparsity: float
    source_bytes: int
    output_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _dir_weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def export_sparse24_bitmask(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    targets: Sequence[str] | str | None = None,
    ignore: Sequence[str] | str | None = None,
) -> ExportResult:
    """Write ``src`` (a dense 2:4 checkpoint) to ``dst`` in the legacy ``sparse-24-bitmask`` format.

    Each targeted layer's ``weight`` becomes ``compressed`` (the two kept
    values of every group of four), ``bitmask`` (their positions, packed
    bits) and ``shape``; other tensors are copied unchanged, shard by shard
    (the index is rewritten). ``config.json`` gains a compressed-tensors
    ``quantization_config`` whose ``sparsity_config`` names the format,
    structure 2:4, the global sparsity (zeros over all weights) and the
    targets/ignore the layers were selected with. Every other file
    (tokenizer, recipe, generation config) is copied.

    The output is assembled in a temporary directory beside ``dst`` and
    renamed into place at the end, so a failure or interruption leaves no
    ``dst``. Raises :class:`CheckpointError` if ``dst`` exists, a file is
    missing or corrupt, the checkpoint is quantized or already compressed,
    or a targeted layer is not 2:4 (naming it).
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if dst.exists() or dst.is_symlink():
        raise CheckpointError(f"{dst}: output directory already exists; choose a new path or remove it")
    report = check_checkpoint(src, "2:4", targets=targets, ignore=ignore)
    if report.weight_format != "dense":
        raise CheckpointError(
            f"{src / 'config.json'}: weights are stored as {report.weight_format!r}; "
            f"{LEGACY_FORMAT} export needs an unquantized checkpoint stored dense"
        )
    if not report.layers:
        raise CheckpointError(f"{src}: no layer matches targets {report.targets} (ignore {report.ignore})")
    if not report.ok:
        bad = report.failing[0]
        raise CheckpointError(
            f"{src / bad.file}: targeted layer {bad.name} is not 2:4 ({bad.reason})"
            + (f"; {len(report.failing) - 1} more layer(s) are not 2:4" if len(report.failing) > 1 else "")
        )
    compress_keys = {layer.tensor: layer for layer in report.layers}
    files, weight_map = _weight_files(src)

    with atomic_directory(dst) as tmp:
        new_map: dict[str, str] = {}
        for file_name in files:
            file = src / file_name
            out: dict[str, torch.Tensor] = {}
            with _open_safetensors(file) as f:
                metadata = f.metadata() or {}
                for key in f.keys():
                    tensor = _get_tensor(f, key, file)
                    if key in compress_keys:
                        prefix = key[: -len(".weight")]
                        for param, value in sparse24_compress(tensor).items():
                            out[f"{prefix}.{param}"] = value
                    else:
                        out[key] = tensor
            save_file(out, os.fspath(tmp / file_name), metadata={**metadata, "format": "pt"})
            new_map.update({key: file_name for key in out})
            del out
        if weight_map:
            index = json.loads((src / INDEX_NAME).read_text())
            index["weight_map"] = dict(sorted(new_map.items()))
            index.setdefault("metadata", {})["total_size"] = _dir_weight_bytes(tmp)
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))

        skip = {INDEX_NAME, "config.json", *files}
        for item in sorted(src.iterdir()):
            if item.name in skip:
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)

        config_path = src / "config.json"
        try:
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path}: unreadable config ({exc})") from exc
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "version": LEGACY_CT_VERSION,
            "sparsity_config": {
                "format": LEGACY_FORMAT,
                "sparsity_structure": "2:4",
                "global_sparsity": report.model_sparsity,
                "targets": list(report.targets),
                "ignore": list(report.ignore),
                "registry_requires_subclass": False,
            },
            "transform_config": {},
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return ExportResult(
        output=os.fspath(dst),
        layers_compressed=len(compress_keys),
        global_sparsity=report.model_sparsity,
        source_bytes=_dir_weight_bytes(src),
        output_bytes=_dir_weight_bytes(dst),
    )


# --- command line ------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        report = check_checkpoint(args.checkpoint, args.structure, targets=args.targets, ignore=args.ignore)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
    if not report.ok:
        if not report.layers:
            print(f"error: no layer matched targets {report.targets} (ignore {report.ignore})", file=sys.stderr)
        for layer in report.failing:
            print(f"error: layer {layer.name} ({layer.file}) is not {report.structure}: {layer.reason}",
                  file=sys.stderr)
        return 1
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        with sigterm_raises():
            result = export_sparse24_bitmask(args.checkpoint, args.output, targets=args.targets, ignore=args.ignore)
    except (CheckpointError, ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.output} ({LEGACY_FORMAT}): {result.layers_compressed} layers compressed, "
        f"global sparsity {result.global_sparsity:.2%}, weights {result.source_bytes / 1e6:.1f} MB -> "
        f"{result.output_bytes / 1e6:.1f} MB"
    )
    return 0


def _add_target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--targets", action="append", metavar="TARGET",
        help="layers to check (repeatable; class name, exact name or re:REGEX); default: the recipe's, else Linear",
    )
    parser.add_argument(
        "--ignore", action="append", metavar="TARGET",
        help="layers to skip (repeatable); default: the recipe's, else re:.*lm_head",
    )


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``check`` and ``export`` to an argparse subparsers object (``func`` returns the exit code)."""
    check = subparsers.add_parser(
        "check",
        help="per-layer sparsity and N:M check of a saved checkpoint",
        description="Report per targeted layer its sparsity and whether it is exactly N:M, plus the global "
        "sparsity. Exit 0 if every targeted layer is N:M, 1 if one is not (named on stderr), 2 on bad input.",
    )
    check.add_argument("checkpoint", help="checkpoint directory (safetensors, sharded or not)")
    check.add_argument("--structure", default="2:4", help="N:M pattern (default 2:4)")
    _add_target_args(check)
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=_cmd_check)

    export = subparsers.add_parser(
        "export",
        help="convert a dense 2:4 checkpoint to the legacy sparse-24-bitmask format",
        description=f"Write the legacy compressed-tensors {LEGACY_FORMAT} checkpoint (for vLLM 0.7-0.19 / "
        f"compressed-tensors <= {LEGACY_CT_VERSION}). OUTPUT must not exist; it appears only when complete.",
    )
    export.add_argument("--format", required=True, choices=[LEGACY_FORMAT], help="output format")
    export.add_argument("checkpoint", help="dense 2:4 checkpoint directory")
    export.add_argument("output", help="new directory to create")
    _add_target_args(export)
    export.set_defaults(func=_cmd_export)
