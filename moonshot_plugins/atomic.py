"""Directories that appear whole or not at all.

Every writer of an output or cache directory (pruned checkpoints, exports,
asset caches) builds it in a hidden staging directory beside the target (same
filesystem, so the final rename is atomic) and renames it into place only when
everything succeeded. A failure, Ctrl-C or SIGTERM removes the staging
directory; only SIGKILL can leave a hidden ``.NAME.partial-*`` behind, never a
half-written ``NAME``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory", "sigterm_raises"]


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so cleanup runs (as it does for Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``target`` on success.

    :param target: the directory to create
    :param replace: replace an existing ``target`` (only once the new one is
        complete); otherwise an existing ``target`` is an error
    :raises FileExistsError: ``target`` exists (before or after the build) and
        ``replace`` is False
    """
    target = Path(target)
    if target.exists() and not replace:
        raise FileExistsError(f"output directory {target} already exists; choose a new path or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's private 0700 would otherwise stick to the output
    try:
        with sigterm_raises():
            yield staging
        if target.exists():
            if not replace:
                raise FileExistsError(
                    f"output directory {target} appeared while it was being written; not overwriting it"
                )
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / target.name)
            os.rename(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
