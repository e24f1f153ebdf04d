"""The scene reader: shapes datasets read back from their pictures, hand-drawn scenes, relations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mmcli.data.scenes import (
    SeenObject,
    compare_scene,
    label_components,
    read_accuracy,
    read_scene,
    scene_record,
    scene_relations,
)
from mmcli.data.shapes import COLORS, SceneObject, caption, generate, relations, render, sample_scene, shape_mask
from mmcli.evaluation.captioning_metrics import scene_scores

PLAIN = (235, 235, 235)


@pytest.fixture(scope="module")
def shapes64(tmp_path_factory) -> Path:
    """A small 64 px dataset (50 val and 50 test scenes)."""
    out = tmp_path_factory.mktemp("shapes64")
    generate(out, n=500, size=64, seed=3)
    return out


def _drawn(shape: str, color: str, side: int, x: int, y: int) -> SceneObject:
    """A dataset object pasted with its ``side``×``side`` square at ``(x, y)``."""
    bx0, by0, bx1, by1 = shape_mask(shape, side).getbbox()
    return SceneObject(shape, color, "large", (x + bx0, y + by0, x + bx1, y + by1), (x, y), side)


def _plain(objects: list[SceneObject], size: int = 64) -> Image.Image:
    """``objects`` pasted in their colours on a flat light background, as :func:`render` pastes them."""
    image = Image.new("RGB", (size, size), PLAIN)
    for o in objects:
        image.paste(COLORS[o.color], o.origin, shape_mask(o.shape, o.side))
    return image


@pytest.mark.parametrize("split", ["val", "test"])
def test_reads_32px_dataset_exactly(shapes_dir: Path, split: str):
    # Measured on 2000-image datasets: every val/test/train scene is read exactly at 32 px.
    result = read_accuracy(shapes_dir / f"{split}.jsonl")
    assert result["scenes"] == 20
    assert result["exact"] >= 0.98, result["failures"]
    assert result["missed"] + result["extra"] + result["wrong_shape"] + result["wrong_color"] == 0


@pytest.mark.parametrize("split", ["val", "test"])
def test_reads_64px_dataset_exactly(shapes64: Path, split: str):
    result = read_accuracy(shapes64 / f"{split}.jsonl")
    assert result["exact"] >= 0.98, result["failures"]


def test_reads_blurred_64px_scenes(shapes64: Path):
    # A generated picture is rarely flat: a light blur must not change the reading of 64 px scenes.
    records = [json.loads(line) for line in (shapes64 / "val.jsonl").read_text().splitlines()]
    for record in records:
        with Image.open(shapes64 / record["image"]) as image:
            blurred = image.filter(ImageFilter.GaussianBlur(0.7))
        assert compare_scene(record, scene_record(read_scene(blurred)))["exact"], record["id"]


@pytest.mark.parametrize(
    ("shape", "color"),
    [("square", "red"), ("circle", "blue"), ("triangle", "green"), ("diamond", "yellow")],
)
@pytest.mark.parametrize("side", [6, 10, 20])
def test_one_hand_drawn_shape(shape: str, color: str, side: int):
    drawn = _drawn(shape, color, side, 17, 9)
    assert read_scene(_plain([drawn])) == [SeenObject(color, shape, drawn.box)]


def test_array_input_reads_like_an_image():
    drawn = [_drawn("circle", "purple", 14, 5, 5), _drawn("square", "orange", 12, 40, 44)]
    image = _plain(drawn)
    assert read_scene(np.asarray(image)) == read_scene(image)


def test_empty_backgrounds_read_as_nothing():
    assert read_scene(Image.new("RGB", (64, 64), PLAIN)) == []
    assert read_scene(render(np.random.default_rng(0), 64, [])) == []


def test_relations_match_the_dataset_for_hand_placed_shapes():
    left, right = _drawn("square", "red", 12, 4, 20), _drawn("triangle", "blue", 16, 40, 26)
    seen = read_scene(_plain([right, left]))
    assert [o.name for o in seen] == ["red square", "blue triangle"]  # sorted by x
    assert [o.box for o in seen] == [left.box, right.box]
    assert scene_relations(seen) == relations([left, right])
    assert [r["predicate"] for r in scene_relations(seen)] == ["left of", "right of"]


def test_relations_match_the_dataset_for_sampled_scenes():
    rng = np.random.default_rng(7)
    for _ in range(10):
        objects = sample_scene(rng, 64, 3)
        seen = read_scene(render(rng, 64, objects))
        truth = {"objects": [{"color": o.color, "shape": o.shape, "box": list(o.box)} for o in objects]}
        truth["relations"] = relations(objects)
        assert compare_scene(truth, scene_record(seen))["exact"]


def test_scene_record_feeds_scene_scores():
    objects = [_drawn("circle", "green", 12, 4, 4), _drawn("diamond", "red", 12, 40, 6)]
    record = scene_record(read_scene(_plain(objects)))
    assert set(record) == {"objects", "relations"}
    scores = scene_scores(
        {"a": caption(objects), "b": "a red diamond left of a green circle"}, {"a": record, "b": record}
    )
    assert scores["exact_scene"] == 0.5
    assert scores["object_recall"] == 1.0


def test_compare_scene_counts_each_kind_of_error():
    truth = scene_record([SeenObject("red", "square", (0, 0, 10, 10)), SeenObject("blue", "circle", (30, 0, 40, 10))])
    wrong = scene_record([SeenObject("red", "circle", (0, 0, 10, 10)), SeenObject("green", "circle", (31, 1, 40, 10))])
    assert compare_scene(truth, wrong) == {"exact": False, "missed": 0, "extra": 0, "wrong_shape": 1, "wrong_color": 1}
    extra = scene_record([*(SeenObject(o["color"], o["shape"], tuple(o["box"])) for o in truth["objects"])])
    extra["objects"].append({"color": "yellow", "shape": "square", "box": [0, 40, 8, 48]})
    assert compare_scene(truth, extra)["extra"] == 1
    assert compare_scene(truth, scene_record([]))["missed"] == 2
    assert compare_scene(truth, truth)["exact"]


def test_label_components_four_connected():
    mask = np.array([[1, 1, 0, 1], [0, 0, 0, 1], [1, 0, 1, 1], [0, 1, 0, 0]], dtype=bool)
    labels = label_components(mask)
    assert labels.max() == 4  # the diagonal pixels at the bottom left are separate
    assert (labels == 0).sum() == (~mask).sum()
    assert label_components(np.ones((3, 3), dtype=bool)).tolist() == [[1, 1, 1]] * 3
