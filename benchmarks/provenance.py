"""Where a benchmark result came from: the machine, the commit it measured,
and a results file that is never left half-written."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]


def machine_description() -> str:
    """The machine as a results file records it: cores, CPU model, torch and its threads."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores {cpu}, torch {torch.__version__}, threads {torch.get_num_threads()}"


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
