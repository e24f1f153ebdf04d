"""Explanation pictures: size, where the boxes are drawn, and which concepts label a region."""

from __future__ import annotations

import torch
from PIL import Image

from mmcli.viz.explain import BOX_COLOURS, LINE, best_concepts, draw_explanation, file_boxes

GREY = (200, 200, 200)


def test_draw_explanation_upscales_and_draws_boxes_where_they_are():
    image = Image.new("RGB", (16, 16), GREY)
    boxes = [(2, 8, 10, 14), (11, 1, 15, 5)]
    picture = draw_explanation(image, boxes, [[("red circle", 0.9)], [("blue", 0.6)]], "a red circle", scale=6)
    assert picture.width == 96 and picture.height > 96  # the caption strip is below the image
    # Box 0 spans x 12..59, y 48..83 in the upscaled picture: its left edge is drawn there...
    assert picture.getpixel((12, 70)) == BOX_COLOURS[0]
    assert picture.getpixel((12 + LINE - 1, 70)) == BOX_COLOURS[0]
    # ...its inside and the image outside it keep their pixels.
    assert picture.getpixel((30, 70)) == GREY and picture.getpixel((5, 70)) == GREY
    assert picture.getpixel((90 - 1, 20)) == BOX_COLOURS[1]  # box 1's right edge, x = 15·6 − 1
    assert picture.getpixel((95, picture.height - 1)) == (255, 255, 255)  # the strip, clear of text


def test_best_concepts_ranks_by_weight():
    alignment = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]])
    assert best_concepts(alignment, ["red", "circle", "left of"]) == [
        [("circle", 0.7), ("left of", 0.2)],
        [("red", 0.5), ("circle", 0.25)],
    ]
    assert best_concepts(alignment, []) == [[], []]
    # A relation has weight 0 in every row: it is never listed, even when fewer remain.
    relation = torch.tensor([[0.8, 0.2, 0.0], [0.0, 1.0, 0.0]])
    assert best_concepts(relation, ["red", "circle", "left of"], top=3) == [
        [("red", 0.8), ("circle", 0.2)],
        [("circle", 1.0)],
    ]


def test_file_boxes_undo_resize_and_centre_crop():
    from mmcli.data.examples import input_boxes

    boxes = ((30, 0, 60, 10),)
    # A 100×50 image resized to height 50 (scale 1) and cropped to 50×50 loses 25 px on the left.
    assert input_boxes(boxes, (100, 50), (50, 50)) == ((5.0, 0.0, 35.0, 10.0),)
    assert input_boxes(((10, 20, 30, 40),), (64, 64), (32, 32)) == ((5.0, 10.0, 15.0, 20.0),)
    assert file_boxes(torch.tensor([[5.0, 0.0, 35.0, 10.0]]), (100, 50), (50, 50)) == [(30.0, 0.0, 60.0, 10.0)]
