"""The checkpoint folder: everything needed to rebuild, evaluate or resume a student, checked on load.

    <dir>/model.safetensors   the student's weights (and buffers, e.g. centring vectors)
    <dir>/config.yaml         the full config that built it
    <dir>/teachers.yaml       the teacher specs its adapters were trained against
    <dir>/data.json           which data: store, dataset id and split hashes, embedding entry per teacher
    <dir>/state.pt            training state (epoch, step, RNG, history …) as tensors and plain values; optional
    <dir>/optimizer.pt        the optimiser's and the schedule's state, only a run that continues needs (about twice
                              the weights: AdamW's moments); optional, and a search drops it when its trial ends
    <dir>/checkpoint.json     written last: format version and the sha256 of every file above

A folder is written under a temporary name and renamed into place, so it is complete or absent. Loading checks
every file against checkpoint.json, and any missing, truncated or garbled file is a `CheckpointError` naming it.
Loading never renames anything (a reader may run beside a save) and follows a save's swap instead: see
`load_checkpoint`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load as load_safetensors, save_file

from cube_ray.data.manifest import sha256_file
from cube_ray.fsutil import fsync_dir, moved_aside, swap_in, temp_dir
from cube_ray.teachers.registry import TeacherSpec

FORMAT_VERSION = 2
OPTIMISER = "optimizer.pt"
REQUIRED = {"model.safetensors", "config.yaml", "teachers.yaml", "data.json"}
READS_FORMATS = (1, 2)  # format 1 predates the residual student: train/snapshot.py reads it as it was meant


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or incompatible; the message names the file."""


@dataclasses.dataclass
class Checkpoint:
    dir: Path
    weights: dict[str, torch.Tensor]
    config: dict[str, Any]
    teachers: dict[str, TeacherSpec]
    data: dict[str, Any]
    state: dict[str, Any] | None
    format: int = FORMAT_VERSION


def save_checkpoint(path: str | Path, weights: dict[str, torch.Tensor], config: dict, teachers: dict[str, TeacherSpec],
                    data: dict, state: dict | None = None, optimiser: dict | None = None) -> Path:
    """Save a checkpoint folder; `optimiser` (loaded back into `state`) goes to a file of its own, so that a run
    nothing will continue can drop it (drop_optimiser) without rewriting the rest."""
    path = Path(path)
    specs = {n: {k: v for k, v in dataclasses.asdict(s).items() if k != "name"} for n, s in teachers.items()}
    tmp = temp_dir(path)  # a name of its own: another process saving the same checkpoint uses another
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / "teachers.yaml").write_text(yaml.safe_dump(specs, sort_keys=False))
        (tmp / "data.json").write_text(json.dumps(data, indent=1) + "\n")
        if state is not None:
            torch.save(state, tmp / "state.pt")
        if optimiser is not None:
            torch.save(optimiser, tmp / OPTIMISER)
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        _seal(tmp, {name: sha256_file(tmp / name) for name in files}, path)
    except BaseException:  # a full disk, a kill signal: leave no temporary behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _seal(tmp: Path, files: dict[str, str], path: Path) -> None:
    """Write checkpoint.json (last, durably) listing `files` by sha256 into the complete folder `tmp`, and swap it
    in at `path` (replacing an older checkpoint of the same name)."""
    with open(tmp / "checkpoint.json", "w") as f:
        f.write(json.dumps({"format": FORMAT_VERSION, "files": files}, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    swap_in(tmp, path)


class _Vanished(Exception):
    """The folder being read was replaced (and removed) by a save meanwhile: read the new one from the start."""


def load_checkpoint(path: str | Path, with_state: bool = True) -> Checkpoint:
    """The checkpoint at `path`, every file checked against checkpoint.json.

    A reader never renames (putting back a copy a save moved aside would undo the save in flight: `fit`, holding
    the run folder's lock, does that repair). It reads one folder through a directory fd, so every file comes from
    the same save however often `path` is swapped meanwhile; while `path` is absent (a save between its two renames)
    it reads the copy moved aside; if the folder it reads is removed under it, it starts again on the new one."""
    path = Path(path)
    for attempt in range(50):
        try:
            return _read(path, with_state)
        except _Vanished:
            time.sleep(0.002 * attempt)
    raise CheckpointError(f"{path}: replaced by newer saves again and again while being read; try again")


def _read(path: Path, with_state: bool) -> Checkpoint:
    for folder in [path, *moved_aside(path)]:
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        try:
            return _read_folder(fd, folder, path, with_state)
        finally:
            os.close(fd)
    if path.exists() or moved_aside(path):  # swaps went on between looking for `path` and for its copies
        raise _Vanished
    raise CheckpointError(f"{path / 'checkpoint.json'}: missing; {path} is not a complete cube_ray checkpoint")


def _replaced(fd: int, folder: Path) -> bool:
    """Whether the folder open as `fd` is no longer the one at `folder` (removed, or replaced by a newer save)."""
    try:
        return os.stat(folder).st_ino != os.fstat(fd).st_ino
    except FileNotFoundError:
        return True


def _read_folder(fd: int, folder: Path, path: Path, with_state: bool) -> Checkpoint:
    def read(name: str, missing: str) -> bytes:
        try:
            with open(os.open(name, os.O_RDONLY, dir_fd=fd), "rb") as f:
                return f.read()
        except FileNotFoundError:
            if _replaced(fd, folder):
                raise _Vanished from None
            raise CheckpointError(missing) from None

    index = folder / "checkpoint.json"
    raw = read("checkpoint.json", f"{index}: missing; {path} is not a complete cube_ray checkpoint")
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: corrupt ({e})") from None
    if manifest.get("format") not in READS_FORMATS:
        raise CheckpointError(f"{index}: format {manifest.get('format')!r}, this cube_ray reads formats {READS_FORMATS}")
    unlisted = sorted(REQUIRED - set(files))
    if unlisted:
        raise CheckpointError(f"{index}: corrupt (does not list {', '.join(unlisted)})")
    data = {}
    for name, digest in files.items():
        data[name] = read(name, f"{folder / name}: missing from the checkpoint")
        if hashlib.sha256(data[name]).hexdigest() != digest:
            raise CheckpointError(f"{folder / name}: corrupt (sha256 differs from checkpoint.json: truncated or "
                                  "modified)")
    teachers = {n: TeacherSpec(name=n, **fields) for n, fields in yaml.safe_load(data["teachers.yaml"]).items()}
    state = None
    for name in ("state.pt", OPTIMISER) if with_state else ():
        if name not in files:
            continue
        try:  # tensors and plain values only: a crafted state.pt cannot run code here
            part = torch.load(io.BytesIO(data[name]), weights_only=True, map_location="cpu")  # a GPU run's too
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{folder / name}: refused, it holds more than tensors and plain values (a "
                                  f"checkpoint never runs code; {str(e).splitlines()[0]})") from None
        state = {**(state or {}), **part}
    return Checkpoint(path, load_safetensors(data["model.safetensors"]), yaml.safe_load(data["config.yaml"]), teachers,
                      json.loads(data["data.json"]), state, manifest["format"])


def drop_optimiser(path: str | Path) -> bool:
    """Remove the optimiser's state (OPTIMISER) from the checkpoint folder `path`, of a run nothing will continue;
    whether there was one. The other files stay as they are (hard links in a new folder, swapped in whole), and
    checkpoint.json lists what is left, so the folder still loads for evaluation, inference or --init-from."""
    path = Path(path)
    files = json.loads((path / "checkpoint.json").read_text())["files"]
    if OPTIMISER not in files:
        return False
    tmp = temp_dir(path)
    try:
        kept = {name: digest for name, digest in files.items() if name != OPTIMISER}
        for name in kept:
            os.link(path / name, tmp / name)
        _seal(tmp, kept, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True
