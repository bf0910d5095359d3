"""Teachers: named specs (registry), loading from a package, a local folder or a Hugging Face id, and pooling."""
from cube_ray.teachers.registry import TeacherError, TeacherSpec, get_teacher, load_registry
from cube_ray.teachers.model import Teacher

__all__ = ["Teacher", "TeacherError", "TeacherSpec", "get_teacher", "load_registry"]
