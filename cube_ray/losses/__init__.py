"""Losses, one per file; every one is an nn.Module with `forward(pred, target, **ctx) -> scalar`."""
from cube_ray.losses.combine import CombinedLoss
from cube_ray.losses.cosine import CosineLoss
from cube_ray.losses.curriculum import competence, curriculum_subset, curriculum_weights, difficulty, step_cap
from cube_ray.losses.diversity import DiversityLoss
from cube_ray.losses.infonce import InfoNCELoss
from cube_ray.losses.mse import MSELoss
from cube_ray.losses.think import ThinkingCost
from cube_ray.losses.triplet import TripletLoss

__all__ = ["CombinedLoss", "CosineLoss", "DiversityLoss", "InfoNCELoss", "MSELoss", "ThinkingCost", "TripletLoss",
           "competence", "curriculum_subset", "curriculum_weights", "difficulty", "step_cap"]
