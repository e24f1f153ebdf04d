"""The built-in synthetic dataset: coloured shapes with captions, questions and class labels.

Every image is drawn from its own random generator, derived from ``(seed, split, index)``, so
one image never depends on another: the same seed gives byte-identical files, and any image can
be regenerated alone. Scenes hold 1–3 non-overlapping shapes whose centres are far enough apart
on one axis that "left of" / "right of" / "above" / "below" is never a judgement call.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmcli.errors import MmcliError
from mmcli.io import DEFAULT_IMAGE_KEY, DEFAULT_TEXT_KEY, atomic_write_text

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 135, 35),
}
SHAPES = ("circle", "square", "triangle", "diamond")
RELATIONS = ("left of", "right of", "above", "below")
QUESTION_TYPES = ("color", "shape", "count", "exist", "relation")
NUMBER_WORDS = ("one", "two", "three")
LABELS = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)
SPLITS = ("train", "val", "test", "classify")

# Side of a shape's drawing square as a fraction of the image side, per size label.
SIZE_RANGES = {"small": (0.16, 0.22), "large": (0.28, 0.36)}
MIN_IMAGE_SIZE = 32
# The dominant axis of a centre offset must be this many times the other one, so that a
# relation is never stated for a near-diagonal pair.
AXIS_RATIO = 1.5
GAP = 2  # pixels kept free between the boxes of two objects
GENERATOR = "mmcli data shapes"
PARTIAL_MARKER = "meta.partial.json"
"""Written first and removed last by :func:`generate`: an unfinished dataset is still known as ours."""
_META_FIELDS = {"version", "seed", "size", "counts", "colors", "shapes", "relations", "question_types", "answers"}
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
_MAX_TRIES = 200


class Boxed:
    """What a shape with a ``color``, a ``shape`` and a tight ``box`` (x0, y0, x1, y1; x1/y1
    exclusive) offers, whether drawn (:class:`SceneObject`) or read from a picture
    (:class:`mmcli.data.scenes.SeenObject`): one centre, hence one relation rule for both."""

    color: str
    shape: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the box in pixels."""
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def name(self) -> str:
        """``"red circle"``: the colour and shape, which identify an object within its image."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class SceneObject(Boxed):
    """One drawn shape: its attributes, its tight box ``(x0, y0, x1, y1)`` (x1/y1 exclusive),
    and where its ``side``×``side`` drawing square was pasted (``origin``)."""

    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]
    origin: tuple[int, int]
    side: int


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


def relation(subject: Boxed, obj: Boxed) -> str | None:
    """The spatial relation of ``subject`` to ``obj`` from the dominant axis of their centre
    offset (image y grows downwards), or ``None`` when neither axis clearly dominates."""
    (sx, sy), (ox, oy) = subject.center, obj.center
    dx, dy = sx - ox, sy - oy
    if abs(dx) >= AXIS_RATIO * abs(dy):
        return "left of" if dx < 0 else "right of"
    if abs(dy) >= AXIS_RATIO * abs(dx):
        return "above" if dy < 0 else "below"
    return None


def _boxes_apart(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


@lru_cache(maxsize=1024)
def shape_mask(shape: str, side: int) -> Image.Image:
    """A ``side``×``side`` mode-L mask of ``shape`` (255 inside); cached because it is pure."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    last = side - 1
    if shape == "circle":
        draw.ellipse((0, 0, last, last), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, last, last), fill=255)
    elif shape == "triangle":
        draw.polygon([(last / 2, 0), (last, last), (0, last)], fill=255)
    elif shape == "diamond":
        draw.polygon([(last / 2, 0), (last, last / 2), (last / 2, last), (0, last / 2)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _placed(color: str, shape: str, size_label: str, side: int, x: int, y: int) -> SceneObject:
    bx0, by0, bx1, by1 = shape_mask(shape, side).getbbox()
    return SceneObject(shape, color, size_label, (x + bx0, y + by0, x + bx1, y + by1), (x, y), side)


def _fits(candidate: SceneObject, placed: list[SceneObject]) -> bool:
    for other in placed:
        if not _boxes_apart(candidate.box, other.box) or relation(candidate, other) is None:
            return False
    return True


def _sample_side(rng: np.random.Generator, size_label: str, image_size: int) -> int:
    low, high = SIZE_RANGES[size_label]
    return int(round(image_size * rng.uniform(low, high)))


def _try_place(
    rng: np.random.Generator, image_size: int, pairs: list[tuple[str, str]], sizes: list[str]
) -> list[SceneObject] | None:
    placed: list[SceneObject] = []
    for (color, shape), size_label in zip(pairs, sizes):
        side = _sample_side(rng, size_label, image_size)
        for _ in range(_MAX_TRIES):
            x = int(rng.integers(1, image_size - side))
            y = int(rng.integers(1, image_size - side))
            candidate = _placed(color, shape, size_label, side, x, y)
            if _fits(candidate, placed):
                placed.append(candidate)
                break
        else:
            return None
    return placed


def sample_scene(
    rng: np.random.Generator, image_size: int, n_objects: int, pairs: list[tuple[str, str]] | None = None
) -> list[SceneObject]:
    """Place ``n_objects`` shapes with distinct (colour, shape) pairs (random unless ``pairs``
    is given), sizes drawn per object, boxes apart and every pairwise relation unambiguous."""
    combos = [(c, s) for c in COLORS for s in SHAPES]
    if pairs is None:
        pairs = [combos[k] for k in rng.choice(len(combos), size=n_objects, replace=False)]
    while True:  # a crowded draw is redrawn whole; with <= 3 objects this ends within a few tries
        sizes = [("small", "large")[int(rng.integers(2))] for _ in pairs]
        placed = _try_place(rng, image_size, pairs, sizes)
        if placed is not None:
            return placed


# --------------------------------------------------------------------------------------------
# language
# --------------------------------------------------------------------------------------------


def caption(objects: list[SceneObject]) -> str:
    """The canonical caption: ``a red circle left of a blue square and a green triangle``.

    The article is always "a" (never "an orange") so that it cannot give away a masked colour.
    """
    text = f"a {objects[0].name}"
    if len(objects) >= 2:
        text += f" {relation(objects[0], objects[1])} a {objects[1].name}"
    for extra in objects[2:]:
        text += f" and a {extra.name}"
    return text


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption of :func:`caption`'s grammar says: the ``(colour, shape)`` of each object in
    caption order, and the relation it states of ``objects[0]`` to ``objects[1]`` (``None`` for one
    object)."""

    objects: tuple[tuple[str, str], ...]
    relation: str | None


def _read_object(words: list[str], at: int) -> tuple[str, str] | None:
    """``a {colour} {shape}`` at ``words[at:at + 3]``, or ``None``."""
    if words[at : at + 1] != ["a"] or len(words) < at + 3:
        return None
    color, shape = words[at + 1], words[at + 2]
    return (color, shape) if color in COLORS and shape in SHAPES else None


def _read_relation(words: list[str], at: int) -> str | None:
    """The relation (one or more words) that starts at ``words[at]``, or ``None``."""
    for predicate in RELATIONS:
        wanted = predicate.split()
        if words[at : at + len(wanted)] == wanted:
            return predicate
    return None


def parse_caption(text: str) -> ParsedCaption | None:
    """Read a caption of :func:`caption`'s grammar back into its objects and relation.

    Accepted: ``a {colour} {shape}``, then optionally ``{relation} a {colour} {shape}``, then any
    number of `` and a {colour} {shape}``, with words from :data:`COLORS`, :data:`SHAPES` and
    :data:`RELATIONS`. Case, surrounding and repeated whitespace and one trailing period are
    tolerated; anything else (an unknown word, a missing relation between the first two objects,
    a relation anywhere else, an empty text) gives ``None``. Used to score generated captions
    against the scenes they describe (:mod:`mmcli.evaluation.captioning_metrics`).
    """
    text = text.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    words = text.split()
    first = _read_object(words, 0)
    if first is None:
        return None
    if len(words) == 3:
        return ParsedCaption((first,), None)
    predicate = _read_relation(words, 3)
    if predicate is None:
        return None
    at = 3 + len(predicate.split())
    objects = [first]
    while True:
        found = _read_object(words, at)
        if found is None:
            return None
        objects.append(found)
        at += 3
        if at == len(words):
            return ParsedCaption(tuple(objects), predicate)
        if words[at] != "and":
            return None
        at += 1


def relations(objects: list[SceneObject]) -> list[dict[str, Any]]:
    """Every ordered pair ``(i, j)``, ``i != j``, with the relation of object i to object j."""
    return [
        {"subject": i, "predicate": relation(a, b), "object": j}
        for i, a in enumerate(objects)
        for j, b in enumerate(objects)
        if i != j
    ]


def _unique_by(objects: list[SceneObject], attribute: str) -> list[SceneObject]:
    values = [getattr(o, attribute) for o in objects]
    return [o for o in objects if values.count(getattr(o, attribute)) == 1]


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _negative_pair(rng: np.random.Generator, objects: list[SceneObject]) -> tuple[str, str]:
    """An absent (colour, shape) pair, preferably sharing one attribute with a present object so
    that answering needs the binding of colour to shape, not just one word."""
    present = {(o.color, o.shape) for o in objects}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    colors, shapes = {o.color for o in objects}, {o.shape for o in objects}
    near = [(c, s) for c, s in absent if c in colors or s in shapes]
    return _pick(rng, near or absent)


def _relation_question(rng: np.random.Generator, objects: list[SceneObject]) -> dict | None:
    """ "what is left of the blue square?" for a (reference, relation) with exactly one answer."""
    candidates = []
    for j, ref in enumerate(objects):
        for predicate in RELATIONS:
            subjects = [o for i, o in enumerate(objects) if i != j and relation(o, ref) == predicate]
            if len(subjects) == 1:
                candidates.append((ref, predicate, subjects[0]))
    if not candidates:
        return None
    ref, predicate, subject = _pick(rng, candidates)
    return _question(f"what is {predicate} the {ref.name}?", subject.shape, "relation")


def _question(text: str, answer: str, kind: str) -> dict[str, str]:
    return {"question": text, "answer": answer, "type": kind}


def questions(rng: np.random.Generator, objects: list[SceneObject]) -> list[dict[str, str]]:
    """Questions with one-word answers: at most one of each type, and for ``exist`` one
    positive and one negative so that "yes" and "no" are balanced."""
    out = []
    by_shape, by_color = _unique_by(objects, "shape"), _unique_by(objects, "color")
    if by_shape:
        o = _pick(rng, by_shape)
        out.append(_question(f"what color is the {o.shape}?", o.color, "color"))
    if by_color:
        o = _pick(rng, by_color)
        out.append(_question(f"what shape is the {o.color} object?", o.shape, "shape"))
    out.append(_question("how many shapes are there?", NUMBER_WORDS[len(objects) - 1], "count"))
    present = _pick(rng, objects)
    out.append(_question(f"is there a {present.name}?", "yes", "exist"))
    color, shape = _negative_pair(rng, objects)
    out.append(_question(f"is there a {color} {shape}?", "no", "exist"))
    if len(objects) >= 2:
        asked = _relation_question(rng, objects)
        if asked is not None:
            out.append(asked)
    return out


def answer_vocabulary() -> list[str]:
    """Every answer a question can have, sorted."""
    return sorted({*COLORS, *SHAPES, *NUMBER_WORDS, "yes", "no"})


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------


def background(rng: np.random.Generator, image_size: int) -> Image.Image:
    """A light, lightly textured background: a tinted base, a soft linear gradient and
    low-amplitude noise, so that models cannot rely on a perfectly flat canvas."""
    base = rng.uniform(225, 245, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-1.0, 1.0, image_size)
    gradient = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    noise = rng.normal(0.0, 3.0, size=(image_size, image_size, 3))
    pixels = base + 6.0 * gradient[..., None] + noise
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def render(rng: np.random.Generator, image_size: int, objects: list[SceneObject]) -> Image.Image:
    """Draw ``objects`` on a fresh background, in flat colours (no anti-aliasing)."""
    image = background(rng, image_size)
    for o in objects:
        image.paste(COLORS[o.color], o.origin, shape_mask(o.shape, o.side))
    return image


# --------------------------------------------------------------------------------------------
# records and files
# --------------------------------------------------------------------------------------------


def split_sizes(n: int) -> dict[str, int]:
    """Number of images per split for ``n`` training images."""
    held_out = max(n // 10, 20)
    return {"train": n, "val": held_out, "test": held_out, "classify": max(n // 10, len(LABELS) * 2)}


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image, independent of every other image."""
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def make_example(seed: int, split: str, index: int, image_size: int) -> tuple[dict[str, Any], Image.Image]:
    """The JSONL record and the image of ``split`` image number ``index``."""
    rng = image_rng(seed, split, index)
    label = None
    if split == "classify":
        # Cycling through the labels keeps the classes balanced to within one image.
        label = LABELS[index % len(LABELS)]
        color, shape = label.split(" ")
        objects = sample_scene(rng, image_size, 1, pairs=[(color, shape)])
    else:
        objects = sample_scene(rng, image_size, int(rng.integers(1, 4)))
    image = render(rng, image_size, objects)
    name = f"{split}-{index:06d}"
    record = {
        "id": name,
        "split": split,
        "image": f"images/{split}/{name}.png",
        "width": image_size,
        "height": image_size,
        "caption": caption(objects),
        "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "box": list(o.box)} for o in objects],
        "relations": relations(objects),
        "questions": questions(rng, objects),
    }
    if label is not None:
        record["label"] = label
    return record, image


def _write_text(path: Path, lines: Iterable[str]) -> None:
    """Write one line each, through :func:`mmcli.io.atomic_write_text`."""
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _remove_stale_images(folder: Path, split: str, count: int) -> None:
    # A previous, larger run may have left images past the new count; only our own names go.
    for path in folder.glob(f"{split}-*.png"):
        stem = path.stem[len(split) + 1 :]
        if stem.isdigit() and int(stem) >= count:
            path.unlink()


def write_split(out: Path, split: str, count: int, seed: int, image_size: int) -> None:
    """Write the images, ``{split}.jsonl`` and ``{split}.tsv`` of one split."""
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_images(folder, split, count)
    records = []
    for index in range(count):
        record, image = make_example(seed, split, index, image_size)
        image.save(out / record["image"], format="PNG", compress_level=1)
        records.append(record)
    _write_text(out / f"{split}.jsonl", (json.dumps(r, separators=(",", ":")) for r in records))
    header = f"{DEFAULT_IMAGE_KEY}\t{DEFAULT_TEXT_KEY}" + ("\tlabel" if split == "classify" else "")
    rows = ("\t".join([r["image"], r["caption"]] + ([r["label"]] if split == "classify" else [])) for r in records)
    _write_text(out / f"{split}.tsv", [header, *rows])


def _split_files(out: Path, split: str) -> dict[str, str]:
    return {"tsv": str(out / f"{split}.tsv"), "jsonl": str(out / f"{split}.jsonl")}


def check_arguments(n: int, size: int, seed: int) -> None:
    """Raise :class:`MmcliError` for arguments the generator cannot honour."""
    if n < 1:
        raise MmcliError(f"--n {n}: the number of training images must be at least 1")
    if size < MIN_IMAGE_SIZE:
        raise MmcliError(f"--size {size}: images must be at least {MIN_IMAGE_SIZE} pixels wide")
    if seed < 0:
        raise MmcliError(f"--seed {seed}: the seed must be >= 0")


def _dataset_files(out: Path) -> list[Path]:
    """The files in ``out`` that :func:`generate` would replace or delete (every name it writes)."""
    found = [p for p in (out / "meta.json", out / PARTIAL_MARKER) if p.exists()]
    for split in SPLITS:
        found += [p for p in (out / f"{split}.tsv", out / f"{split}.jsonl") if p.exists()]
        found += sorted(
            p for p in (out / "images" / split).glob(f"{split}-*.png") if p.stem[len(split) + 1 :].isdigit()
        )
    return found


def written_by_shapes(out: Path) -> bool:
    """Whether ``out`` holds a shapes dataset this module wrote: a ``meta.json`` of its fields, or
    the marker an unfinished run leaves (:data:`PARTIAL_MARKER`)."""
    for name, wanted in (("meta.json", _META_FIELDS), (PARTIAL_MARKER, {"generator"})):
        try:
            found = json.loads((out / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(found, dict) and wanted <= set(found) and found.get("generator", GENERATOR) == GENERATOR:
            return True
    return False


def check_output(out: Path, *, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, or that holds files of the dataset's names this module did
    not write (unless ``overwrite``): generating would replace or delete them."""
    if out.exists() and not out.is_dir():
        raise MmcliError(f"--out {out}: is a file, not a folder; name a folder for the dataset")
    if overwrite or not out.is_dir() or written_by_shapes(out):
        return
    clashes = _dataset_files(out)
    if clashes:
        raise MmcliError(
            f"--out {out}: holds {len(clashes)} file(s) with the dataset's names that mmcli data shapes did not "
            f"write (e.g. {clashes[0].relative_to(out)}); pass --overwrite to replace them, or choose another folder"
        )


def generate(out: Path, n: int = 2000, size: int = 64, seed: int = 0, *, overwrite: bool = False) -> dict[str, Any]:
    """Write the shapes dataset under ``out`` and return a summary (paths and counts).

    A folder holding files of the dataset's names that this module did not write is refused
    unless ``overwrite`` (:func:`check_output`); a dataset it wrote, finished or not, is replaced.
    ``meta.json`` is removed first and written last: its presence marks a complete dataset; in
    between, :data:`PARTIAL_MARKER` marks the folder as this module's.
    """
    check_arguments(n, size, seed)
    out = Path(out)
    check_output(out, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    _write_text(out / PARTIAL_MARKER, [json.dumps({"generator": GENERATOR, "seed": seed, "size": size, "n": n})])
    meta_path.unlink(missing_ok=True)
    counts = split_sizes(n)
    for split, count in counts.items():
        write_split(out, split, count, seed, size)
    meta = {
        "version": 1,
        "seed": seed,
        "size": size,
        "counts": counts,
        "colors": list(COLORS),
        "shapes": list(SHAPES),
        "relations": list(RELATIONS),
        "question_types": list(QUESTION_TYPES),
        "answers": answer_vocabulary(),
        "labels": list(LABELS),
    }
    _write_text(meta_path, [json.dumps(meta, indent=2)])
    (out / PARTIAL_MARKER).unlink()
    return {
        "out": str(out),
        "counts": counts,
        "images": sum(counts.values()),
        "meta": str(meta_path),
        "files": {split: _split_files(out, split) for split in counts},
    }
