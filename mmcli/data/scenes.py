"""Read a shapes scene back from its picture: which coloured shapes are where, and their relations.

The reader looks only at pixels. Each pixel is given the nearest colour of :data:`~mmcli.data.shapes.COLORS`
when it is close enough (the light, noisy background never is); the pixels of each colour are split
into 4-connected blobs, blobs too small to be a drawn shape are dropped, each blob is grown to the
pixels around it that are at least half its colour (blurred or compressed edges), and its shape is the
one whose mask, as :func:`~mmcli.data.shapes.shape_mask` draws it at the blob's size, overlaps the blob
best. That comparison carries the geometry that tells the shapes apart: how much of its box a shape
fills (square 1, circle about π/4, triangle and diamond about 1/2) and where its mass lies (a triangle
is narrow on top and wide at the bottom; a diamond is widest in its middle row). Relations come from
:func:`mmcli.data.shapes.relation`, the dataset's own rule.

Used to check what a picture shows (e.g. an image generated from a caption) against what the caption
says, with :func:`scene_record` giving the shape of a JSONL record that
:mod:`mmcli.evaluation.captioning_metrics` consumes. :func:`read_accuracy` measures the reader itself
on a generated dataset.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmcli.data.shapes import COLORS, SHAPES, SIZE_RANGES, Boxed, relation, shape_mask

COLOR_DISTANCE = 90.0
"""Largest RGB (Euclidean) distance at which a pixel still counts as a palette colour (it then goes to
the nearest one: two palette colours are at least 66 apart, yellow–orange).

Dataset shapes are pasted in flat palette colours (no anti-aliasing), at distance 0; the background
(base 225–245 per channel, ±6 gradient, noise σ=3) was measured at least 172 away from every palette
colour (yellow is the nearest), so it never matches. A shape's own edge, half blended with the
background, is about 100 away and is left to :func:`refine_blob`. 90 rather than a tight bound keeps
small shapes of blurred or JPEG-compressed 32 px pictures (measured: with 60, 13 of 200 blurred
scenes lost a shape; with 90, none) while clean pictures read the same."""

MIN_BLOB_FRACTION = 0.25
"""A blob is kept when its area is at least this share of the smallest shape the dataset draws at
that image size (a triangle or diamond of the smallest "small" side: 13 px at 32 px, 50 px at 64 px):
it drops stray pixels and thin fringes of a blended edge, yet keeps a shape whose colour only its
centre holds (a small shape after blur)."""

MIX_DISTANCE = 120.0
"""Largest distance of a pixel from the background–object colour line for it to count as a blend of
the two when a blob's outline is grown (:func:`refine_blob`): JPEG moves colours across edges a lot
(40 lost a tenth of compressed 64 px scenes), while a full pixel of another palette colour lies
farther off or projects under one half; other blobs' cores are excluded anyway."""

EDGE_MARGIN = 2
"""Pixels around a blob's core searched for its half-blended outline: what a light blur or JPEG
ringing moves an edge; no more than :data:`mmcli.data.shapes.GAP`, the space between two objects."""

_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float64)


@dataclass(frozen=True)
class SeenObject(Boxed):
    """A shape read from a picture: its colour, its shape and its tight box ``(x0, y0, x1, y1)``
    (x1/y1 exclusive, like :class:`mmcli.data.shapes.SceneObject`); its centre is the dataset's."""

    color: str
    shape: str
    box: tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------
# pixels to blobs
# --------------------------------------------------------------------------------------------


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An ``(H, W, 3)`` float array of RGB values 0–255 (greyscale is repeated, alpha dropped)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {pixels.shape}")
    return pixels[..., :3]


def color_indices(pixels: np.ndarray, max_distance: float = COLOR_DISTANCE) -> np.ndarray:
    """Per pixel, the index of the nearest palette colour in ``COLORS`` order, or -1 when even the
    nearest is farther than ``max_distance``."""
    distances = np.linalg.norm(pixels[:, :, None, :] - _PALETTE[None, None, :, :], axis=3)
    nearest = distances.argmin(axis=2)
    return np.where(distances.min(axis=2) <= max_distance, nearest, -1)


def label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of a boolean mask: 0 outside, and one positive label per component.

    Labels spread by repeatedly taking the smallest label among each pixel and its four neighbours,
    until nothing changes (as many rounds as the longest path inside a blob; shapes are compact).
    """
    height, width = mask.shape
    sentinel = height * width + 1
    labels = np.where(mask, np.arange(1, height * width + 1).reshape(height, width), sentinel)
    while True:
        padded = np.pad(labels, 1, constant_values=sentinel)
        neighbours = np.minimum.reduce(
            [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        spread = np.where(mask, neighbours, sentinel)
        if np.array_equal(spread, labels):
            break
        labels = spread
    raw = np.where(mask, labels, 0)
    kept = np.unique(np.concatenate([[0], raw.ravel()]))  # 0 first, so "outside" stays 0
    return np.searchsorted(kept, raw)


def smallest_shape_area(image_size: int) -> int:
    """Pixels of the smallest shape the dataset draws in an ``image_size`` picture."""
    side = max(int(round(image_size * SIZE_RANGES["small"][0])), 1)
    return min(int((np.asarray(shape_mask(shape, side)) > 0).sum()) for shape in SHAPES)


# --------------------------------------------------------------------------------------------
# blob to shape
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _template(shape: str, width: int, height: int) -> np.ndarray:
    """The dataset's mask of ``shape``, cropped to its tight box and stretched to ``width``×``height``
    (nearest neighbour), as a boolean array; cached because it is pure."""
    side = max(width, height)
    mask = shape_mask(shape, side)
    mask = mask.crop(mask.getbbox())
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.NEAREST)
    return np.asarray(mask) > 0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def classify_shape(blob: np.ndarray) -> str:
    """The shape whose dataset mask, drawn at the size of ``blob`` (a boolean array cropped to the
    blob's box), overlaps it best (intersection over union); ties go to the earlier of ``SHAPES``.

    On the dataset's own pictures the right mask matches exactly; on other pictures the overlap
    still ranks by fill ratio and by where the mass lies (see the module docstring)."""
    height, width = blob.shape
    scores = [_iou(blob, _template(shape, width, height)) for shape in SHAPES]
    return SHAPES[int(np.argmax(scores))]


def _box(region: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(region)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _blobs_of_color(indices: np.ndarray, color_index: int, min_area: int) -> list[np.ndarray]:
    """Boolean masks (whole image) of the blobs of one palette colour with at least ``min_area`` pixels."""
    labels = label_components(indices == color_index)
    sizes = np.bincount(labels.ravel())
    return [labels == k for k in range(1, len(sizes)) if sizes[k] >= min_area]


def background_color(pixels: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The median colour of the pixels that match no palette colour (light grey when there are none)."""
    free = pixels[indices < 0]
    return np.median(free, axis=0) if len(free) else np.full(3, 235.0)


def _window(core: np.ndarray, margin: int) -> tuple[slice, slice]:
    x0, y0, x1, y1 = _box(core)
    height, width = core.shape
    return slice(max(y0 - margin, 0), min(y1 + margin, height)), slice(max(x0 - margin, 0), min(x1 + margin, width))


def refine_blob(
    pixels: np.ndarray, core: np.ndarray, others: np.ndarray, color: np.ndarray, background: np.ndarray
) -> np.ndarray:
    """The blob grown from its ``core`` to every nearby pixel that is at least half object colour.

    A pixel on a blurred or compressed edge mixes the object colour with the background; its share of
    object colour (``alpha``) is its projection on the line from ``background`` to ``color``. Pixels
    with ``alpha`` of at least 1/2, close to that line (:data:`MIX_DISTANCE`), not in another blob
    (``others``) and connected to the core join it, so that the shape's outline sits where a picture
    blends half-way, not where the strict colour test (:data:`COLOR_DISTANCE`) erodes it. On the
    dataset's flat-coloured pictures this is the core itself."""
    rows, cols = _window(core, EDGE_MARGIN)
    patch = pixels[rows, cols] - background
    direction = color - background
    alpha = patch @ direction / float(direction @ direction)
    off_line = np.linalg.norm(patch - alpha[..., None] * direction, axis=2)
    candidate = ((alpha >= 0.5) & (off_line <= MIX_DISTANCE) & ~others[rows, cols]) | core[rows, cols]
    labels = label_components(candidate)
    touching = np.unique(labels[core[rows, cols]])
    grown = np.zeros_like(core)
    grown[rows, cols] = np.isin(labels, touching[touching > 0])
    return grown


def read_scene(image: Image.Image | np.ndarray) -> list[SeenObject]:
    """The coloured shapes in ``image`` (a PIL image or an ``(H, W, 3)`` array), sorted by box
    (x, then y), read from the pixels alone (see the module docstring)."""
    pixels = _as_rgb_array(image)
    indices = color_indices(pixels, COLOR_DISTANCE)
    min_area = max(int(np.ceil(MIN_BLOB_FRACTION * smallest_shape_area(max(pixels.shape[:2])))), 1)
    cores = [
        (color, core)
        for color_index, color in enumerate(_PALETTE_NAMES)
        for core in _blobs_of_color(indices, color_index, min_area)
    ]
    background = background_color(pixels, indices)
    every_core = np.logical_or.reduce([core for _, core in cores]) if cores else np.zeros(indices.shape, bool)
    found = []
    for color, core in cores:
        region = refine_blob(pixels, core, every_core & ~core, _PALETTE[_PALETTE_NAMES.index(color)], background)
        x0, y0, x1, y1 = box = _box(region)
        found.append(SeenObject(color, classify_shape(region[y0:y1, x0:x1]), box))
    return sorted(found, key=lambda o: (o.box, o.color, o.shape))


# --------------------------------------------------------------------------------------------
# scene records
# --------------------------------------------------------------------------------------------


def scene_relations(objects: list[SeenObject]) -> list[dict[str, Any]]:
    """Every ordered pair ``(i, j)``, ``i != j``, with the relation of object i to object j by the
    dataset's rule (:func:`mmcli.data.shapes.relation`), as in a JSONL record's ``relations``."""
    return [
        {"subject": i, "predicate": relation(a, b), "object": j}
        for i, a in enumerate(objects)
        for j, b in enumerate(objects)
        if i != j
    ]


def scene_record(objects: list[SeenObject]) -> dict[str, Any]:
    """``{"objects": [{shape, color, box}], "relations": [...]}``: the parts of a shapes JSONL record
    that :func:`mmcli.evaluation.captioning_metrics.scene_scores` and ``relation_is_true`` read."""
    return {
        "objects": [{"shape": o.shape, "color": o.color, "box": list(o.box)} for o in objects],
        "relations": scene_relations(objects),
    }


# --------------------------------------------------------------------------------------------
# measuring the reader
# --------------------------------------------------------------------------------------------


def _pair_relations(record: dict[str, Any]) -> dict[tuple[tuple[str, str], tuple[str, str]], str | None]:
    """A record's relations keyed by the ``(colour, shape)`` of subject and object."""
    names = [(o["color"], o["shape"]) for o in record["objects"]]
    return {(names[r["subject"]], names[r["object"]]): r["predicate"] for r in record["relations"]}


def compare_scene(truth: dict[str, Any], seen: dict[str, Any]) -> dict[str, int | bool]:
    """How a read scene record differs from the true one.

    Objects are matched by position: each true object is paired with the nearest unpaired read object
    (box centres, within the true box's larger side), so a shape read with the wrong colour or shape
    counts as that, not as one missed and one extra. ``exact`` needs the same multiset of
    ``(colour, shape)`` and, for every ordered pair, the same relation."""
    true_objects, seen_objects = truth["objects"], seen["objects"]
    free = list(range(len(seen_objects)))
    counts = {"missed": 0, "extra": 0, "wrong_shape": 0, "wrong_color": 0}
    for t in true_objects:
        j = _nearest(t, [seen_objects[k] for k in free])
        if j is None:
            counts["missed"] += 1
            continue
        s = seen_objects[free.pop(j)]
        counts["wrong_shape"] += s["shape"] != t["shape"]
        counts["wrong_color"] += s["color"] != t["color"]
    counts["extra"] = len(free)
    same_objects = Counter((o["color"], o["shape"]) for o in true_objects) == Counter(
        (o["color"], o["shape"]) for o in seen_objects
    )
    exact = same_objects and _pair_relations(truth) == _pair_relations(seen)
    return {"exact": bool(exact), **counts}


def _center(box: list[int]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _nearest(target: dict[str, Any], candidates: list[dict[str, Any]]) -> int | None:
    """Index of the candidate whose box centre is nearest ``target``'s, if within its larger side."""
    tx, ty = _center(target["box"])
    reach = max(target["box"][2] - target["box"][0], target["box"][3] - target["box"][1])
    best, best_distance = None, float(reach)
    for k, candidate in enumerate(candidates):
        cx, cy = _center(candidate["box"])
        distance = float(np.hypot(cx - tx, cy - ty))
        if distance <= best_distance:
            best, best_distance = k, distance
    return best


def read_accuracy(jsonl_path: str | Path, limit: int | None = None) -> dict[str, Any]:
    """Read every image of a shapes JSONL (paths relative to its folder) and compare with its record.

    Returns ``scenes``, ``exact`` (share read exactly, see :func:`compare_scene`), the summed
    ``missed`` / ``extra`` / ``wrong_shape`` / ``wrong_color`` counts, and ``failures``: the ids of
    the scenes not read exactly. ``limit`` reads only the first records."""
    path = Path(jsonl_path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [json.loads(line) for line in lines[:limit]]
    totals = {"missed": 0, "extra": 0, "wrong_shape": 0, "wrong_color": 0}
    failures = []
    for record in records:
        with Image.open(path.parent / record["image"]) as image:
            seen = scene_record(read_scene(image))
        result = compare_scene(record, seen)
        for key in totals:
            totals[key] += int(result[key])
        if not result["exact"]:
            failures.append(record["id"])
    exact = (len(records) - len(failures)) / len(records) if records else None
    return {"scenes": len(records), "exact": exact, **totals, "failures": failures}
