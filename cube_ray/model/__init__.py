"""The student: the 3D Cubic Core (cube.py), adaptive recursion (halting.py), adapters, multi-teacher student.

The names below load on first use (PEP 562): `cube_ray.config` reads the torch-free `model/config.py`, and
importing this package must not pull in torch for it. Ray Train's controller and each Tune trial's driver read
configs but never build a model, and importing torch costs each of those processes ~2 s of CPU."""
import importlib

_HOMES = {"ADAPTERS": "adapters", "Adapter": "adapters", "build_adapter": "adapters",
          "AdapterConfig": "config", "CubeConfig": "config", "LossConfig": "config", "WeightingConfig": "config",
          "Cube": "cube", "cost": "cube", "PonderCube": "halting", "Pondered": "halting",
          "ReferenceCube": "reference", "Student": "student", "FUSION": "student"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
