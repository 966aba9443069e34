"""Per-tensor type policies: data files `recipes/*.yaml` and the code that applies them."""

from __future__ import annotations

from qatgguf.recipes.recipe import Recipe, Rule, TensorChoice, available_recipes, load_recipe

__all__ = ["Recipe", "Rule", "TensorChoice", "available_recipes", "load_recipe"]
