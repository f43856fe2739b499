"""The framework-free core and each adapter import without the other host."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _modules_after_import(module: str) -> set[str]:
    """Top-level names in ``sys.modules`` after importing ``module`` in a fresh interpreter."""
    code = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.splitlines()[-1].split())


def test_core_imports_neither_host():
    loaded = _modules_after_import("moonshot_plugins.core")
    assert "llmcompressor" not in loaded
    assert "torch_pruning" not in loaded


def test_torch_pruning_adapter_does_not_import_llmcompressor():
    loaded = _modules_after_import("moonshot_plugins.torch_pruning")
    assert "torch_pruning" in loaded
    assert "llmcompressor" not in loaded
