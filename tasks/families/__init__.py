"""Model families: what a model is (load, export wrapper, samples, evaluation formats, pruning, graph facts).

One module per family plus one line here; `family.name` in params.yaml picks one.
"""

from typing import Annotated, Union

from pydantic import Field

from tasks.core.registry import Registry

FAMILIES = Registry(
    "model family",
    {
        "sentence_encoder": "tasks.families.sentence_encoder:FAMILY",
        "text_classifier": "tasks.families.text_classifier:FAMILY",
        "image_classifier": "tasks.families.image_classifier:FAMILY",
    },
)


def family_settings():
    """The type of params.yaml's `family` section: every registered family's settings, by `name`."""
    classes = tuple(family.settings for family in FAMILIES.all().values())
    return Annotated[Union[classes], Field(discriminator="name")]  # noqa: UP007 (a runtime tuple of classes)
