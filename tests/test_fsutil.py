"""Atomic writes: whole or absent, durable, with the modes the user's umask gives (a shared store stays readable)."""
import os
import stat

import pytest

from cube_ray.fsutil import atomic_write_text, swap_in


def umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def test_an_atomic_write_leaves_one_whole_file_with_the_umask_mode(tmp_path):
    path = tmp_path / "search.yaml"
    atomic_write_text(path, "a: 1\n")
    atomic_write_text(path, "a: 2\n")
    assert path.read_text() == "a: 2\n" and [p.name for p in tmp_path.iterdir()] == ["search.yaml"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask()  # not mkstemp's 0600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from cube_ray.fsutil import atomic_path

    path = tmp_path / "report.json"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_swap_in_replaces_a_folder_whole(tmp_path):
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "v").write_text("1")
    (tmp_path / ".tmp-latest").mkdir()
    (tmp_path / ".tmp-latest" / "v").write_text("2")
    swap_in(tmp_path / ".tmp-latest", tmp_path / "latest")
    assert (tmp_path / "latest" / "v").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["latest"]
