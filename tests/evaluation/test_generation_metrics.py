"""The generation verdicts: a picture's read scene against its prompt, counted by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmcli.evaluation.generation import distinct_captions, picture_verdict, verdict_scores


def _scene(*objects, relations=()):
    """A read scene record: objects as (colour, shape, box); relations as (subject, predicate, object)."""
    return {
        "objects": [{"color": c, "shape": s, "box": list(b)} for c, s, b in objects],
        "relations": [{"subject": a, "predicate": p, "object": b} for a, p, b in relations],
    }


RED_LEFT_OF_BLUE = _scene(
    ("red", "circle", (2, 10, 8, 16)),
    ("blue", "square", (20, 10, 26, 16)),
    relations=[(0, "left of", 1), (1, "right of", 0)],
)


def test_exactly_the_prompt():
    v = picture_verdict("a red circle left of a blue square", RED_LEFT_OF_BLUE)
    assert v == {"named": 2, "drawn": 2, "hits": 2, "relation": True, "exact": True}


def test_the_right_objects_in_the_wrong_places():
    v = picture_verdict("a red circle right of a blue square", RED_LEFT_OF_BLUE)
    assert v == {"named": 2, "drawn": 2, "hits": 2, "relation": False, "exact": False}


def test_an_extra_object_and_a_duplicate_are_not_exact():
    extra = _scene(("red", "circle", (2, 2, 8, 8)), ("green", "triangle", (20, 20, 26, 26)))
    assert picture_verdict("a red circle", extra) == {
        "named": 1,
        "drawn": 2,
        "hits": 1,
        "relation": None,
        "exact": False,
    }
    twice = _scene(("red", "circle", (2, 2, 8, 8)), ("red", "circle", (20, 20, 26, 26)))
    v = picture_verdict("a red circle", twice)
    assert (v["hits"], v["drawn"], v["exact"]) == (1, 2, False)  # a multiset: one hit, one extra


def test_a_wrong_colour_and_an_empty_picture():
    assert picture_verdict("a red circle", _scene(("blue", "circle", (2, 2, 8, 8))))["hits"] == 0
    v = picture_verdict("a red circle left of a blue square", _scene())
    assert v == {"named": 2, "drawn": 0, "hits": 0, "relation": False, "exact": False}


def test_a_prompt_outside_the_grammar_is_refused():
    with pytest.raises(ValueError, match="not a caption of the shapes grammar"):
        picture_verdict("a photo of a dog", RED_LEFT_OF_BLUE)


def test_corpus_scores_by_hand():
    verdicts = [
        {"named": 2, "drawn": 2, "hits": 2, "relation": True, "exact": True},
        {"named": 2, "drawn": 3, "hits": 1, "relation": False, "exact": False},
        {"named": 1, "drawn": 0, "hits": 0, "relation": None, "exact": False},
    ]
    s = verdict_scores(verdicts)
    assert s["object_precision"] == pytest.approx(3 / 5)
    assert s["object_recall"] == pytest.approx(3 / 5)
    assert s["object_f1"] == pytest.approx(6 / 10)
    assert s["relation_accuracy"] == pytest.approx(1 / 2) and s["relation_prompts"] == 2
    assert s["exact_scene"] == pytest.approx(1 / 3) and s["pictures"] == 3
    empty = verdict_scores([])
    assert empty["exact_scene"] is None and empty["object_f1"] is None


def test_distinct_captions_keep_file_order_and_first_image():
    records = [
        {"caption": "a red circle", "image": "/a.png"},
        {"caption": "a blue square", "image": "/b.png"},
        {"caption": "a red circle", "image": "/c.png"},
    ]
    captions, first = distinct_captions(records)
    assert captions == ["a red circle", "a blue square"] and first["a red circle"] == "/a.png"


def test_clip_scores_match_numpy(monkeypatch):
    from types import SimpleNamespace

    from mmcli.evaluation.generation import clip_scores

    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 8)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    captions = rng.normal(size=(4, 8)).astype(np.float32)
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    model = SimpleNamespace(encode_image=lambda batch: batch)
    loaded = SimpleNamespace(model=model, preprocess=lambda row: torch.from_numpy(row))
    rows = [0, 1, 2, 3, 0]
    got = clip_scores(loaded, list(images), rows, torch.from_numpy(captions), "cpu")
    cos = images @ captions.T
    np.testing.assert_allclose(got["clip_score"], 100 * np.maximum(cos[np.arange(5), rows], 0), rtol=1e-5)
    assert got["prompt_r1"] == [float(cos[i].argmax() == rows[i]) for i in range(5)]
