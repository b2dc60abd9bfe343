"""Quantization recipes: how a graph is quantized. One module per `method` plus one line here.

`quantize.variants` in params.yaml maps a variant name to a recipe's settings (discriminated by `method`);
`variant_settings()` builds that union from this registry, so a new recipe needs no other edit.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from tasks.core.registry import Registry
from tasks.recipes.base import Recipe, RecipeSettings

RECIPES: Registry[Recipe] = Registry(
    "quantization method",
    {
        "none": "tasks.recipes.none:RECIPE",
        "ort_static": "tasks.recipes.ort_static:RECIPE",
        "ort_qnn": "tasks.recipes.ort_qnn:RECIPE",
        "aimet_qnn": "tasks.recipes.aimet_qnn:RECIPE",
        "aimet_import": "tasks.recipes.aimet_import:RECIPE",
        "auto_mixed": "tasks.recipes.auto_mixed:RECIPE",
        "ort_dynamic": "tasks.recipes.ort_dynamic:RECIPE",
        "nncf_ptq": "tasks.recipes.nncf_ptq:RECIPE",
        "nncf_weights": "tasks.recipes.nncf_weights:RECIPE",
    },
)


def variant_settings():
    """The settings type of a `quantize.variants` entry: every registered recipe's settings, by `method`."""
    classes = tuple(recipe.settings for recipe in RECIPES.all().values())
    return Annotated[Union[classes], Field(discriminator="method")]  # noqa: UP007 (a runtime tuple of classes)


def recipe_for(settings: RecipeSettings) -> Recipe:
    return RECIPES.get(settings.method)
