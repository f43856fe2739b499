"""Where a benchmark result came from: the machine, the commit it measured,
and a results file that is never left half-written."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
from importlib import metadata
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "transformers", "llmcompressor", "compressed-tensors")


def machine_description() -> str:
    """The machine as a results file records it: cores, CPU model (with its
    family and model numbers where /proc/cpuinfo gives them: some VMs name
    only the vendor, e.g. "AMD EPYC", over several generations), torch and its
    threads."""
    import torch

    cpu = platform.processor() or platform.machine()
    fields = _first_cpuinfo_fields()
    if "model name" in fields:
        cpu = fields["model name"]
        if "cpu family" in fields and "model" in fields:
            cpu += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{os.cpu_count()} cores {cpu}, torch {torch.__version__}, threads {torch.get_num_threads()}"


def _first_cpuinfo_fields() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block ends at its blank line
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def library_versions(names: tuple[str, ...] = LIBRARIES) -> str:
    """The installed versions of the libraries a run's numbers depend on, e.g.
    "torch 2.14.0, transformers 5.17.0, ..." ("absent" for one not installed):
    the project pins some only to a range, and a run's floats can move with
    them."""
    versions = []
    for name in names:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} absent")
    return ", ".join(versions)


def write_atomically(path: pathlib.Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as JSON to a temporary file beside ``path``, then rename
    it into place, so an interrupted run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(scratch, path)


def code_version(measured: tuple[str, ...] = ("moonshot_plugins", "benchmarks/llm.py",
                                              "benchmarks/llm_run.py")) -> str:
    """The commit the run measured, "+dirty" when the measured code (paths
    relative to the repository root) had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", *measured)
    return commit + ("+dirty" if changed else "")
