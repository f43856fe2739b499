"""Reading a checkpoint's safetensors files, with errors that name the file."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# tensor name -> (file relative to the checkpoint, shape, dtype name)
Headers = dict[str, tuple[str, list[int], str]]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or converted (message names the file or layer)."""


def weight_files(path: Path) -> tuple[list[str], dict[str, str]]:
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
def open_safetensors(file: Path) -> Iterator[Any]:
    """``safe_open`` on CPU; a missing or corrupt file raises :class:`CheckpointError`."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(os.fspath(file), framework="pt", device="cpu")
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file}: missing safetensors file") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: corrupt safetensors file ({exc})") from exc
    with handle as f:
        yield f


def get_tensor(f: Any, key: str, file: Path) -> torch.Tensor:
    """Tensor ``key`` of the open file ``f`` (read from ``file``); corrupt data raises :class:`CheckpointError`."""
    from safetensors import SafetensorError

    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: corrupt safetensors file, cannot read tensor {key!r} ({exc})") from exc


def read_headers(path: Path, files: Sequence[str]) -> Headers:
    """tensor name -> (file, shape, dtype) for every tensor, reading headers only."""
    tensors: Headers = {}
    for name in files:
        file = path / name
        with open_safetensors(file) as f:
            for key in f.keys():
                try:
                    sl = f.get_slice(key)
                    tensors[key] = (name, list(sl.get_shape()), str(sl.get_dtype()))
                except Exception as exc:  # noqa: BLE001 - any header problem means a bad file
                    raise CheckpointError(f"{file}: corrupt safetensors file, bad entry {key!r} ({exc})") from exc
    return tensors


def weight_bytes(path: Path) -> int:
    """Total size in bytes of the ``*.safetensors`` files in directory ``path``."""
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))
