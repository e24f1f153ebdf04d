"""Alignment accuracy on hand-made cases: what names an object, region matching, hits, chance."""

from __future__ import annotations

import pytest
import torch

from mmcli.evaluation.alignment import alignment_hits, chance_rate, match_regions, names_object


@pytest.mark.parametrize(
    "concept, expected",
    [
        ("red circle", True),
        ("red", True),
        ("circle", True),
        ("small red circle", True),
        ("blue circle", False),
        ("red square", False),
        ("blue", False),
        ("left of", False),
        ("shapes", False),
    ],
)
def test_names_object(concept, expected):
    assert names_object(concept, "red", "circle") is expected


def test_match_regions_by_iou():
    objects = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]])
    regions = torch.tensor([[20, 20, 30, 40], [0, 0, 10, 10], [40, 40, 52, 52]])
    # Object 1 overlaps region 0 with IoU 100/200 = 0.5; object 2 overlaps region 2 with
    # 4/(100 + 144 - 4) = 1/60 < 0.3: no region.
    assert match_regions(objects, regions) == [1, 0, None]
    assert match_regions(objects, torch.zeros(0, 4)) == [None, None, None]


def test_alignment_hits_and_accuracy_by_hand():
    concepts = ["red circle", "red", "left of", "blue square", "blue"]
    alignment = torch.tensor(
        [
            [0.6, 0.2, 0.1, 0.05, 0.05],  # region 0 → "red circle"
            [0.1, 0.1, 0.5, 0.2, 0.1],  # region 1 → "left of": no colour or shape
            [0.1, 0.1, 0.1, 0.2, 0.5],  # region 2 → "blue"
        ]
    )
    objects = [("red", "circle"), ("blue", "square"), ("blue", "square"), ("red", "circle")]
    hits = alignment_hits(alignment, concepts, objects, [0, 1, 2, None])
    assert hits == [True, False, True, False]  # accuracy 2 / 4
    assert alignment_hits(alignment, concepts, [("blue", "square")], [0]) == [False]


def test_chance_rate():
    concepts = ["red circle", "red", "left of", "blue square", "blue"]
    assert chance_rate(concepts, "red", "circle") == pytest.approx(2 / 5)
    assert chance_rate([], "red", "circle") == 0.0
