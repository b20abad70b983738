"""Recipes: one JSON file that fixes a whole run (model → calibration → quantization → export → profile)."""

from toolchain.recipe.model import Recipe, load_recipe, parse_recipe

__all__ = ["Recipe", "load_recipe", "parse_recipe"]
