"""Per targeted layer sparsity and N:M check of a saved checkpoint.

N:M means: along the input dimension (the last one) every group of M
consecutive weights holds at most N non-zeros -- the layout 2:4 sparse tensor
cores (and vLLM's old 2:4 kernels) need. ``-0.0`` counts as zero.

Every weight tensor is also checked for NaN/inf: a checkpoint holding one
fails the check whatever its sparsity.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moonshot_plugins.checkpoint.bitmask import LEGACY_FORMAT, sparse24_decompress
from moonshot_plugins.checkpoint.safetensors_io import (
    CheckpointError,
    Headers,
    get_tensor,
    open_safetensors,
    read_headers,
    weight_files,
)
from moonshot_plugins.checkpoint.targets import choose_targets, select_layers
from moonshot_plugins.core.finite import describe_non_finite
from moonshot_plugins.core.mask_structure import parse_mask_structure

READABLE_FORMATS = ("dense", LEGACY_FORMAT, "int-quantized", "float-quantized", "naive-quantized")
# tensors that describe a weight rather than hold one: not counted in the model's sparsity
_AUXILIARY_SUFFIXES = (".bitmask", ".shape", "_scale", "_zero_point", "_g_idx")


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
    non_finite: str | None = None  # e.g. "2 NaN and 0 inf values", None when finite

    @property
    def ok(self) -> bool:
        """N:M and finite."""
        return self.is_nm and self.non_finite is None

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
    # every tensor of the checkpoint holding NaN/inf (targeted or not) -> "N NaN and M inf values"
    non_finite_tensors: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.layers) and all(layer.ok for layer in self.layers) and not self.non_finite_tensors

    @property
    def failing(self) -> list[LayerReport]:
        """Targeted layers that are not N:M or hold NaN/inf."""
        return [layer for layer in self.layers if not layer.ok]

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
            if layer.non_finite:
                status += f"; holds {layer.non_finite}"
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
            not_nm = [layer.name for layer in self.layers if not layer.is_nm]
            if not_nm:
                lines.append(f"FAIL: {len(not_nm)} targeted layer(s) not {self.structure}: {', '.join(not_nm)}")
        if self.non_finite_tensors:
            found = ", ".join(f"{key} ({what})" for key, what in self.non_finite_tensors.items())
            lines.append(f"FAIL: {len(self.non_finite_tensors)} tensor(s) hold NaN/inf: {found}")
        return "\n".join(lines)


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

    Raises ValueError for a ``structure`` that is not N:M with 0 < N < M, and
    :class:`CheckpointError` for a missing or corrupt safetensors file
    (naming it), a targeted layer without a weight, or a weight format it
    cannot read; a layer that is not N:M is *reported*
    (``report.ok is False``, ``report.failing``), not raised.
    """
    path = Path(path)
    n, m = parse_mask_structure(structure, allow_unstructured=False)
    files, _ = weight_files(path)
    tensors = read_headers(path, files)
    weight_format = _readable_weight_format(path)
    choice = choose_targets(path, targets, ignore)
    selected, layer_source = select_layers(path, tensors, choice.targets, choice.ignore)
    layers, model_zeros, model_numel, non_finite = _measure(
        path, files, _keys_by_file(path, selected, tensors), n, m
    )
    order = {name: i for i, (name, _) in enumerate(selected)}
    layers.sort(key=lambda layer: order[layer.name])
    return CheckReport(
        path=os.fspath(path),
        structure=f"{n}:{m}",
        targets=choice.targets,
        ignore=choice.ignore,
        targets_source=choice.source,
        recipe_mask_structures=choice.recipe_mask_structures,
        weight_format=weight_format,
        files=files,
        layers=layers,
        model_zeros=model_zeros,
        model_numel=model_numel,
        layer_source=layer_source,
        non_finite_tensors=non_finite,
    )


def _weight_format(path: Path) -> str:
    """How ``path``'s weights are stored: "dense", a sparsity format, or the quantization format."""
    config_path = path / "config.json"
    if not config_path.is_file():
        return "dense"
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: unreadable config ({exc})") from exc
    qconfig = config.get("quantization_config") or config.get("compression_config")
    if not isinstance(qconfig, dict):
        return "dense"
    sparsity = qconfig.get("sparsity_config") or {}
    if sparsity.get("format") and sparsity["format"] != "dense":
        return str(sparsity["format"])
    if qconfig.get("config_groups"):
        return str(qconfig.get("format") or "quantized")
    return "dense"


def _readable_weight_format(path: Path) -> str:
    """:func:`_weight_format`, raising :class:`CheckpointError` for one ``check`` cannot read."""
    weight_format = _weight_format(path)
    if weight_format not in READABLE_FORMATS:
        raise CheckpointError(
            f"{path / 'config.json'}: weights stored as {weight_format!r}, which `check` cannot read "
            "(supported: dense, sparse-24-bitmask, int-/float-/naive-quantized)"
        )
    return weight_format


def _keys_by_file(path: Path, selected: list[tuple[str, str]], tensors: Headers) -> dict[str, dict[str, str]]:
    """file -> {weight key: module name} of the selected layers; a missing weight raises."""
    by_file: dict[str, dict[str, str]] = {}
    for name, key in selected:
        if key not in tensors:
            raise CheckpointError(
                f"{path}: targeted layer {name} has no weight in the checkpoint (expected tensor {key!r})"
            )
        by_file.setdefault(tensors[key][0], {})[key] = name
    return by_file


def _measure(
    path: Path, files: list[str], by_file: dict[str, dict[str, str]], n: int, m: int
) -> tuple[list[LayerReport], int, int, dict[str, str]]:
    """Reports of the targeted layers (file order), zeros / elements over every
    weight tensor, and every tensor holding NaN/inf with what it holds."""
    layers: list[LayerReport] = []
    non_finite: dict[str, str] = {}
    model_zeros = model_numel = 0
    for file_name in files:
        file = path / file_name
        wanted = by_file.get(file_name, {})
        with open_safetensors(file) as f:
            for key in f.keys():
                if key.endswith(_AUXILIARY_SUFFIXES):
                    continue
                if key in wanted or key.endswith(".compressed"):
                    weight = _load_dense(f, file, key)
                else:
                    weight = get_tensor(f, key, file)
                zeros = int((~_nonzero(weight)).sum())
                model_zeros += zeros
                model_numel += weight.numel()
                found = describe_non_finite(weight)
                if found is not None:
                    non_finite[key] = found
                if key in wanted:
                    report = _layer_report(wanted[key], key, file_name, weight, zeros, n, m)
                    report.non_finite = found
                    layers.append(report)
    return layers, model_zeros, model_numel, non_finite


def _layer_report(name: str, key: str, file_name: str, weight: torch.Tensor, zeros: int, n: int, m: int) -> LayerReport:
    is_nm, bad, first_bad, reason = _nm_stats(weight, n, m)
    return LayerReport(
        name=name,
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


def _load_dense(f: Any, file: Path, key: str) -> torch.Tensor:
    """The weight stored under ``key`` as a tensor whose zeros are the pruned weights."""
    if key.endswith(".compressed"):
        prefix = key[: -len(".compressed")]
        return sparse24_decompress(
            get_tensor(f, key, file),
            get_tensor(f, f"{prefix}.bitmask", file),
            get_tensor(f, f"{prefix}.shape", file),
        )
    weight = get_tensor(f, key, file)
    zp_key = key[: -len(".weight")] + ".weight_zero_point" if key.endswith(".weight") else None
    if zp_key is not None and zp_key in f.keys():
        zero_point = get_tensor(f, zp_key, file)
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
    """(is N:M, groups over N, [row, column] of the first such group, why not N:M in words)."""
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
