"""Teachers: named specs (registry), loading from a package, a local folder or a Hugging Face id (`model.Teacher`),
and pooling. Only the torch-free registry is imported here: drivers read specs without loading a model."""
from cube_ray.teachers.registry import TeacherError, TeacherSpec, get_teacher, load_registry

__all__ = ["TeacherError", "TeacherSpec", "get_teacher", "load_registry"]
