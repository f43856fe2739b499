import os
import signal

import pytest

from moonshot_plugins.atomic import atomic_directory


def test_success_renames_into_place_with_normal_permissions(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        assert not target.exists()
        (staging / "a.txt").write_text("x")
    assert (target / "a.txt").read_text() == "x"
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "a.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(SystemExit):
        with atomic_directory(target) as staging:
            (staging / "a.txt").write_text("x")
            os.kill(os.getpid(), signal.SIGTERM)
    assert list(tmp_path.iterdir()) == []


def test_existing_target_refused_or_replaced_only_on_success(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(target, replace=True):
            raise RuntimeError("boom")
    assert (target / "old.txt").exists()
    with atomic_directory(target, replace=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
