"""Composing methods: recipes of prune / quantize / recursify steps, validated up front."""

from . import cli  # noqa: F401  (registers `effml compress`)
from .api import compress, run_steps
from .recipe import RecipeError, Step, read_recipe
from .rules import RULES, Issue
from .validate import model_history, validate_recipe

__all__ = ["RULES", "Issue", "RecipeError", "Step", "compress", "model_history", "read_recipe", "run_steps",
           "validate_recipe"]
