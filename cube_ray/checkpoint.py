"""The checkpoint folder: everything needed to rebuild, evaluate or resume a student, checked on load.

    <dir>/model.safetensors   the student's weights (and buffers, e.g. centring vectors)
    <dir>/config.yaml         the full config that built it
    <dir>/teachers.yaml       the teacher specs its adapters were trained against
    <dir>/data.json           which data: store, dataset id and split hashes, embedding entry per teacher
    <dir>/state.pt            training state (epoch, step, optimiser, RNG …) as tensors and plain values; optional
    <dir>/checkpoint.json     written last: format version and the sha256 of every file above

A folder is written under a temporary name and renamed into place, so it is complete or absent. Loading checks
every file against checkpoint.json, and any missing, truncated or garbled file is a `CheckpointError` naming it.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from cube_ray.data.manifest import sha256_file
from cube_ray.fsutil import fsync_dir, recover_swap, swap_in
from cube_ray.teachers.registry import TeacherSpec

FORMAT_VERSION = 2
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
                    data: dict, state: dict | None = None) -> Path:
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (tmp / "teachers.yaml").write_text(yaml.safe_dump({n: {k: v for k, v in dataclasses.asdict(s).items() if k != "name"}
                                                       for n, s in teachers.items()}, sort_keys=False))
    (tmp / "data.json").write_text(json.dumps(data, indent=1) + "\n")
    if state is not None:
        torch.save(state, tmp / "state.pt")
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    manifest = {"format": FORMAT_VERSION, "files": {name: sha256_file(tmp / name) for name in files}}
    with open(tmp / "checkpoint.json", "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    swap_in(tmp, path)  # replaces an older checkpoint of the same name
    return path


def load_checkpoint(path: str | Path, with_state: bool = True) -> Checkpoint:
    path = Path(path)
    recover_swap(path)  # a save killed between its two renames left the previous checkpoint aside
    index = path / "checkpoint.json"
    if not index.exists():
        raise CheckpointError(f"{index}: missing; {path} is not a complete cube_ray checkpoint")
    try:
        manifest = json.loads(index.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: corrupt ({e})") from None
    if manifest.get("format") not in READS_FORMATS:
        raise CheckpointError(f"{index}: format {manifest.get('format')!r}, this cube_ray reads formats {READS_FORMATS}")
    for name, digest in files.items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f}: corrupt (sha256 differs from checkpoint.json: truncated or modified)")
    teachers = {n: TeacherSpec(name=n, **fields) for n, fields in yaml.safe_load((path / "teachers.yaml").read_text()).items()}
    state = None
    if with_state and "state.pt" in files:
        try:  # tensors and plain values only: a crafted state.pt cannot run code here
            state = torch.load(io.BytesIO((path / "state.pt").read_bytes()), weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path / 'state.pt'}: refused, it holds more than tensors and plain values (a "
                                  f"checkpoint never runs code; {str(e).splitlines()[0]})") from None
    return Checkpoint(path, load_file(str(path / "model.safetensors")), yaml.safe_load((path / "config.yaml").read_text()),
                      teachers, json.loads((path / "data.json").read_text()), state, manifest["format"])
