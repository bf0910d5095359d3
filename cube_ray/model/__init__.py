"""The student: the 3D Cubic Core (cube.py), adaptive recursion (halting.py), adapters, multi-teacher student."""
from cube_ray.model.adapters import ADAPTERS, Adapter, build_adapter
from cube_ray.model.config import AdapterConfig, CubeConfig, LossConfig, WeightingConfig
from cube_ray.model.cube import Cube, cost
from cube_ray.model.halting import PonderCube, Pondered
from cube_ray.model.reference import ReferenceCube
from cube_ray.model.student import Student

__all__ = ["ADAPTERS", "Adapter", "AdapterConfig", "Cube", "CubeConfig", "LossConfig", "PonderCube", "Pondered",
           "ReferenceCube", "Student", "WeightingConfig", "build_adapter", "cost"]
