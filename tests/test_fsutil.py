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


def test_swap_in_uses_names_of_its_own_and_leaves_nothing_aside(tmp_path):
    from cube_ray.fsutil import temp_dir

    for value in "12":
        tmp = temp_dir(tmp_path / "latest")
        assert tmp.name.startswith(".tmp-latest.") and stat.S_IMODE(tmp.stat().st_mode) == 0o777 & ~umask()
        (tmp / "v").write_text(value)
        swap_in(tmp, tmp_path / "latest")
    assert (tmp_path / "latest" / "v").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_recover_swap_puts_the_copy_aside_back_and_clears_leftovers(tmp_path):
    from cube_ray.fsutil import moved_aside, recover_swap

    for name, value in ((".old-latest.1.aa", "1"), (".old-latest.2.bb", "2")):  # killed between the two renames
        (tmp_path / name).mkdir()
        (tmp_path / name / "v").write_text(value)
        os.utime(tmp_path / name, (int(value), int(value)))
    (tmp_path / ".tmp-latest.3.cc").mkdir()  # killed while copying, or while removing what it moved aside
    assert [p.name for p in moved_aside(tmp_path / "latest")] == [".old-latest.2.bb", ".old-latest.1.aa"]
    assert recover_swap(tmp_path / "latest") and not recover_swap(tmp_path / "latest")
    assert (tmp_path / "latest" / "v").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_a_folder_lock_is_exclusive_and_names_its_holder(tmp_path):
    from cube_ray.fsutil import FolderLocked, folder_lock

    with folder_lock(tmp_path / "run", "training run") as lock:
        assert lock.read_text().split()[0] == str(os.getpid())
        with pytest.raises(FolderLocked, match=rf"^{tmp_path / 'run'} is in use by another training run: process "
                                               rf"{os.getpid()} on "):
            with folder_lock(tmp_path / "run", "training run"):
                pass
        (tmp_path / "run" / "latest").mkdir()
    with folder_lock(tmp_path / "run", "training run"):  # free again; the folder and its lock file stay
        pass
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "latest"]


def test_a_folder_the_lock_made_and_nothing_filled_is_removed(tmp_path):
    from cube_ray.fsutil import folder_lock

    with pytest.raises(ValueError):
        with folder_lock(tmp_path / "exp", "search"):
            raise ValueError("a bad search space, before any work")
    assert list(tmp_path.iterdir()) == []
