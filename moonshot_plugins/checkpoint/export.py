"""Convert a dense 2:4 checkpoint to the legacy compressed-tensors ``sparse-24-bitmask`` format.

compressed-tensors > 0.14 and vLLM >= 0.19.1 dropped the format; stacks on
vLLM 0.7-0.19 read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moonshot_plugins.atomic import atomic_directory
from moonshot_plugins.checkpoint.bitmask import LEGACY_CT_VERSION, LEGACY_FORMAT, sparse24_compress
from moonshot_plugins.checkpoint.check import CheckReport, check_checkpoint
from moonshot_plugins.checkpoint.safetensors_io import (
    INDEX_NAME,
    CheckpointError,
    get_tensor,
    open_safetensors,
    weight_bytes,
    weight_files,
)


@dataclasses.dataclass
class ExportResult:
    output: str
    layers_compressed: int
    global_sparsity: float
    source_bytes: int
    output_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    src, dst = Path(src), Path(dst)
    report = _exportable_report(src, dst, targets, ignore)
    compress_keys = {layer.tensor for layer in report.layers}
    files, weight_map = weight_files(src)
    with atomic_directory(dst) as tmp:
        new_map: dict[str, str] = {}
        for file_name in files:
            new_map.update(dict.fromkeys(_write_shard(src / file_name, tmp / file_name, compress_keys), file_name))
        if weight_map:
            _write_index(src / INDEX_NAME, tmp, new_map)
        _copy_other_files(src, tmp, skip={INDEX_NAME, "config.json", *files})
        _write_legacy_config(src / "config.json", tmp / "config.json", report)
    return ExportResult(
        output=os.fspath(dst),
        layers_compressed=len(compress_keys),
        global_sparsity=report.model_sparsity,
        source_bytes=weight_bytes(src),
        output_bytes=weight_bytes(dst),
    )


def _exportable_report(
    src: Path, dst: Path, targets: Sequence[str] | str | None, ignore: Sequence[str] | str | None
) -> CheckReport:
    """The 2:4 check of ``src``; raises unless ``dst`` is new and every targeted layer is dense-stored 2:4."""
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
    if report.non_finite_tensors:
        key, found = next(iter(report.non_finite_tensors.items()))
        raise CheckpointError(f"{src}: tensor {key} holds {found}; refusing to export non-finite weights")
    if not report.ok:
        bad = report.failing[0]
        raise CheckpointError(
            f"{src / bad.file}: targeted layer {bad.name} is not 2:4 ({bad.reason})"
            + (f"; {len(report.failing) - 1} more layer(s) are not 2:4" if len(report.failing) > 1 else "")
        )
    return report


def _write_shard(source: Path, target: Path, compress_keys: set[str]) -> list[str]:
    """Copy one safetensors file, the weights under ``compress_keys`` compressed; return its keys."""
    from safetensors.torch import save_file

    out = {}
    with open_safetensors(source) as f:
        metadata = f.metadata() or {}
        for key in f.keys():
            tensor = get_tensor(f, key, source)
            if key in compress_keys:
                prefix = key[: -len(".weight")]
                for param, value in sparse24_compress(tensor).items():
                    out[f"{prefix}.{param}"] = value
            else:
                out[key] = tensor
    save_file(out, os.fspath(target), metadata={**metadata, "format": "pt"})
    return list(out)


def _write_index(source_index: Path, tmp: Path, weight_map: dict[str, str]) -> None:
    """``source_index`` with the new weight map and total size, written into ``tmp``."""
    index = json.loads(source_index.read_text())
    index["weight_map"] = dict(sorted(weight_map.items()))
    index.setdefault("metadata", {})["total_size"] = weight_bytes(tmp)
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))


def _copy_other_files(src: Path, tmp: Path, skip: set[str]) -> None:
    """Copy every file and folder of ``src`` not named in ``skip`` (tokenizer, recipe, ...)."""
    for item in sorted(src.iterdir()):
        if item.name in skip:
            continue
        if item.is_dir():
            shutil.copytree(item, tmp / item.name)
        else:
            shutil.copy2(item, tmp / item.name)


def _write_legacy_config(source: Path, target: Path, report: CheckReport) -> None:
    """``source`` config (if any) with the compressed-tensors ``quantization_config`` of LEGACY_FORMAT."""
    try:
        config = json.loads(source.read_text()) if source.is_file() else {}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{source}: unreadable config ({exc})") from exc
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
    target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
