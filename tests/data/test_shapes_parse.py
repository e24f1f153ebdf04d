"""Reading shapes captions back: every generated caption round-trips, malformed ones give None."""

from __future__ import annotations

from collections import Counter

import pytest

from mmcli.data import shapes
from mmcli.data.shapes import ParsedCaption, parse_caption

SCENES = 300
SIZE = 32


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return [shapes.make_example(0, "train", i, SIZE)[0] for i in range(SCENES)]


def test_every_generated_caption_round_trips(records):
    assert Counter(len(r["objects"]) for r in records).keys() == {1, 2, 3}
    for r in records:
        parsed = parse_caption(r["caption"])
        assert parsed is not None, r["caption"]
        assert parsed.objects == tuple((o["color"], o["shape"]) for o in r["objects"])
        expected = next((x["predicate"] for x in r["relations"] if (x["subject"], x["object"]) == (0, 1)), None)
        assert parsed.relation == expected, r["caption"]


def test_round_trip_through_caption_itself():
    rng = shapes.image_rng(7, "val", 0)
    for n in (1, 2, 3):
        objects = shapes.sample_scene(rng, 64, n)
        parsed = parse_caption(shapes.caption(objects))
        assert parsed.objects == tuple((o.color, o.shape) for o in objects)
        assert parsed.relation == (shapes.relation(objects[0], objects[1]) if n >= 2 else None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a red circle", ParsedCaption((("red", "circle"),), None)),
        ("  A Red   Circle.  ", ParsedCaption((("red", "circle"),), None)),
        ("a red circle\tabove a blue square.", ParsedCaption((("red", "circle"), ("blue", "square")), "above")),
        (
            "a red circle below a blue square and a green diamond and a purple triangle",
            ParsedCaption(
                (("red", "circle"), ("blue", "square"), ("green", "diamond"), ("purple", "triangle")), "below"
            ),
        ),
    ],
)
def test_tolerated_variants_and_more_than_three_objects(text, expected):
    assert parse_caption(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        ".",
        "a red",
        "a red circle..",
        "red circle",  # no article
        "an orange circle",  # the grammar's article is always "a"
        "the red circle",
        "a pink circle",  # unknown colour
        "a red star",  # unknown shape
        "a circle red",
        "a red circle and a blue square",  # no relation between the first two objects
        "a red circle left a blue square",  # half a relation
        "a red circle next to a blue square",  # unknown relation
        "a red circle left of",
        "a red circle left of a blue square and",
        "a red circle left of a blue square and and a green diamond",
        "a red circle left of a blue square left of a green diamond",  # relation at the wrong place
        "a red circle left of a blue square and left of a green diamond",
        "a red circle left of a blue square a green diamond",  # no "and"
        "left of a red circle",
        "a red circle, left of a blue square",  # punctuation other than one final period
        "a red circle left of a blue square extra",
    ],
)
def test_malformed_captions_give_none(text):
    assert parse_caption(text) is None
