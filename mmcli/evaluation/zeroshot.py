"""Zero-shot classifiers: prompt templates and the class embeddings built from them.

The class embedding is open_clip's: the normalised mean of the normalised text embeddings of
every template filled with the class name (``open_clip.build_zero_shot_classifier``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

SHAPES_TEMPLATES = ("a {}",)
"""The built-in dataset's prompt: its captions read "a red circle left of a blue square", so a
one-object caption is exactly "a red circle"; any other wording is out of its vocabulary."""

Template = str | Callable[[str], str]


def templates_for(name_or_list: str | Sequence[str]) -> list[Template]:
    """The templates named ``shapes``, ``imagenet`` (CLIP's 80) or ``simple``, or the list given."""
    if not isinstance(name_or_list, str):
        return list(name_or_list)
    if name_or_list == "shapes":
        return list(SHAPES_TEMPLATES)
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    named = {"imagenet": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}
    if name_or_list not in named:
        raise ValueError(f"unknown templates {name_or_list!r}: shapes, imagenet, simple or a list")
    return list(named[name_or_list])


def class_embeddings(loaded, class_names: Sequence[str], templates: Sequence[Template], *, device) -> np.ndarray:
    """C×D float32 L2-normalised class embeddings of ``loaded`` (a LoadedModel)."""
    import torch
    from open_clip import build_zero_shot_classifier

    with torch.inference_mode():
        weights = build_zero_shot_classifier(
            loaded.model, loaded.tokenizer, list(class_names), list(templates), num_classes_per_batch=10, device=device
        )
    return weights.T.float().cpu().numpy()
