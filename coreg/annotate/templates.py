"""Prompt template sets for the open_clip annotator: each template is one annotator.

``imagenet27`` is the method's default (the 27 "small ImageNet" templates of the reference
code, ``a photo of a {}`` ... ``a photo of a small {}``). open_clip 3.3.0 does not ship that
list, so it is written out here. The two lists open_clip does ship are taken from
``open_clip.zero_shot_metadata`` rather than retyped: ``imagenet80`` (CLIP's 80 ImageNet
templates, ``OPENAI_IMAGENET_TEMPLATES``) and ``simple7`` (``SIMPLE_IMAGENET_TEMPLATES``).
open_clip stores them as one-argument callables; they are turned into ``{}`` strings so
that every template set has the same form and can be written into reports.
"""

from __future__ import annotations

from collections.abc import Sequence

from coreg.errors import CoregError

PLACEHOLDER = "{}"

IMAGENET_TEMPLATES_27 = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)


def _from_open_clip(name: str) -> list[str]:
    from open_clip import zero_shot_metadata

    return [template(PLACEHOLDER) for template in getattr(zero_shot_metadata, name)]


def resolve_templates(templates: str | Sequence[str], field: str = "annotate.models[].templates") -> list[str]:
    """The template strings of a named set or a user list; every template needs exactly one ``{}``."""
    if isinstance(templates, str):
        if templates == "imagenet27":
            return list(IMAGENET_TEMPLATES_27)
        if templates == "imagenet80":
            return _from_open_clip("OPENAI_IMAGENET_TEMPLATES")
        if templates == "simple7":
            return _from_open_clip("SIMPLE_IMAGENET_TEMPLATES")
        raise CoregError(f"{field}: unknown template set {templates!r} (imagenet27, imagenet80, simple7 or a list)")
    result = list(templates)
    if not result:
        raise CoregError(f"{field}: the template list is empty")
    for i, template in enumerate(result):
        if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
            raise CoregError(f"{field}[{i}]: template {template!r} must contain '{{}}' exactly once")
    return result


def fill(template: str, name: str) -> str:
    """Put a class name into a template (``str.replace``, so other braces in the text are harmless)."""
    return template.replace(PLACEHOLDER, name, 1)
