"""The shapes dataset: determinism, layout, and that every label agrees with the pixels."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmcli.commands.data import run_shapes
from mmcli.data import shapes
from mmcli.errors import MmcliError

N = 40
SIZE = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    shapes.generate(out, n=N, size=SIZE, seed=3)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def all_records(out: Path) -> list[dict]:
    return [r for split in shapes.SPLITS for r in read_jsonl(out / f"{split}.jsonl")]


def center(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def file_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        shapes.generate(tmp_path / name, n=20, size=48, seed=seed)
    a, b, c = (file_bytes(tmp_path / name) for name in "abc")
    assert len(a) == 20 + 20 + 20 + 48 + 9  # images, 4 tsv + 4 jsonl + meta.json
    assert a == b
    assert a["images/train/train-000000.png"] != c["images/train/train-000000.png"]


def test_counts_files_and_meta(dataset):
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["counts"] == {"train": 40, "val": 20, "test": 20, "classify": 48}
    for split, count in meta["counts"].items():
        assert len(list((dataset / "images" / split).glob("*.png"))) == count
        assert len(read_jsonl(dataset / f"{split}.jsonl")) == count
        lines = (dataset / f"{split}.tsv").read_text().splitlines()
        assert len(lines) == count + 1
    assert (dataset / "train.tsv").read_text().splitlines()[0] == "filepath\ttitle"
    assert (dataset / "classify.tsv").read_text().splitlines()[0] == "filepath\ttitle\tlabel"
    assert len(meta["labels"]) == 24 and len(set(meta["labels"])) == 24
    assert meta["answers"] == sorted(meta["answers"])
    seen = {q["answer"] for r in all_records(dataset) for q in r["questions"]}
    assert seen <= set(meta["answers"])
    assert {"yes", "no", "one", "red", "circle"} <= seen


def test_tsv_rows_match_jsonl_and_images_exist(dataset):
    records = read_jsonl(dataset / "val.jsonl")
    rows = [line.split("\t") for line in (dataset / "val.tsv").read_text().splitlines()[1:]]
    assert rows == [[r["image"], r["caption"]] for r in records]
    with Image.open(dataset / records[0]["image"]) as image:
        assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    assert records[7]["id"] == "val-000007" and records[7]["image"] == "images/val/val-000007.png"


def bpe_single_tokens() -> set[str]:
    """Words of more than one letter that CLIP's BPE vocabulary encodes as one token, read
    without importing open_clip (a single letter is always one token)."""
    package = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
    with gzip.open(package / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    return {"".join(m.split())[: -len("</w>")] for m in merges if m.endswith("</w>")}


def test_captions_follow_the_grammar_and_stay_short(dataset):
    color, shape = "|".join(shapes.COLORS), "|".join(shapes.SHAPES)
    obj = f"a ({color}) ({shape})"
    grammar = re.compile(f"^{obj}(?: (left of|right of|above|below) {obj}(?: and {obj})?)?$")
    single_tokens = bpe_single_tokens()
    for r in all_records(dataset):
        match = grammar.match(r["caption"])
        assert match, r["caption"]
        named = [(g[0], g[1]) for g in re.findall(f"a ({color}) ({shape})", r["caption"])]
        assert named == [(o["color"], o["shape"]) for o in r["objects"]]
        # Every word is one BPE token, so with start/end tokens a caption is <= 12 + 2 tokens.
        words = r["caption"].split()
        assert {w for w in words if len(w) > 1} <= single_tokens and len(words) + 2 < 20


def test_boxes_inside_apart_tight_and_coloured(dataset):
    for r in all_records(dataset):
        pixels = np.asarray(Image.open(dataset / r["image"]).convert("RGB")).astype(int)
        boxes = [o["box"] for o in r["objects"]]
        for o in r["objects"]:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            rgb = np.array(shapes.COLORS[o["color"]])
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            assert np.abs(pixels[cy, cx] - rgb).max() <= 2, (r["id"], o)
            # Tight: the pixels of this colour within one pixel around the box span the box.
            ox, oy = max(x0 - 1, 0), max(y0 - 1, 0)
            window = pixels[oy : y1 + 1, ox : x1 + 1]
            ys, xs = np.nonzero((window == rgb).all(axis=-1))
            assert [xs.min() + ox, ys.min() + oy, xs.max() + ox + 1, ys.max() + oy + 1] == o["box"]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def expected_relation(a, b) -> str:
    (ax, ay), (bx, by) = center(a), center(b)
    dx, dy = ax - bx, ay - by
    if abs(dx) > abs(dy):
        assert abs(dx) >= 1.5 * abs(dy)  # never a near-diagonal pair
        return "left of" if dx < 0 else "right of"
    assert abs(dy) >= 1.5 * abs(dx)
    return "above" if dy < 0 else "below"


def test_relations_agree_with_box_centres(dataset):
    for r in all_records(dataset):
        objects = r["objects"]
        n = len(objects)
        assert len(r["relations"]) == n * (n - 1)
        for rel in r["relations"]:
            a, b = objects[rel["subject"]]["box"], objects[rel["object"]]["box"]
            assert rel["predicate"] == expected_relation(a, b)
        if n >= 2:
            assert f" {expected_relation(objects[0]['box'], objects[1]['box'])} a " in r["caption"]


def check_answer(question: dict, objects: list[dict], relations: list[dict]) -> None:
    q, answer, kind = question["question"], question["answer"], question["type"]
    if kind == "color":
        shape = re.fullmatch(r"what color is the (\w+)\?", q).group(1)
        assert [o["color"] for o in objects if o["shape"] == shape] == [answer]
    elif kind == "shape":
        color = re.fullmatch(r"what shape is the (\w+) object\?", q).group(1)
        assert [o["shape"] for o in objects if o["color"] == color] == [answer]
    elif kind == "count":
        assert answer == ["one", "two", "three"][len(objects) - 1]
    elif kind == "exist":
        color, shape = re.fullmatch(r"is there a (\w+) (\w+)\?", q).groups()
        present = any(o["color"] == color and o["shape"] == shape for o in objects)
        assert answer == ("yes" if present else "no")
    else:
        pattern = r"what is (left of|right of|above|below) the (\w+) (\w+)\?"
        predicate, color, shape = re.fullmatch(pattern, q).groups()
        ref = next(i for i, o in enumerate(objects) if (o["color"], o["shape"]) == (color, shape))
        matching = [x for x in relations if x["object"] == ref and x["predicate"] == predicate]
        subjects = [objects[x["subject"]]["shape"] for x in matching]
        assert subjects == [answer]  # exactly one object stands in that relation


def test_answers_agree_with_objects(dataset):
    kinds = Counter()
    for r in all_records(dataset):
        for question in r["questions"]:
            check_answer(question, r["objects"], r["relations"])
            kinds[question["type"]] += 1
        if len(r["objects"]) == 1:
            assert all(q["type"] != "relation" for q in r["questions"])
    assert set(kinds) == set(shapes.QUESTION_TYPES)


def test_exist_questions_are_one_yes_and_one_no_per_image(dataset):
    for r in all_records(dataset):
        answers = sorted(q["answer"] for q in r["questions"] if q["type"] == "exist")
        assert answers == ["no", "yes"]


def test_classify_split_is_balanced_single_objects(dataset):
    records = read_jsonl(dataset / "classify.jsonl")
    assert Counter(r["label"] for r in records) == {label: 2 for label in shapes.LABELS}
    for r in records:
        (o,) = r["objects"]
        assert r["label"] == f"{o['color']} {o['shape']}"
    rows = [line.split("\t") for line in (dataset / "classify.tsv").read_text().splitlines()[1:]]
    assert [row[2] for row in rows] == [r["label"] for r in records]


def test_sizes_and_object_counts_vary(dataset):
    records = read_jsonl(dataset / "train.jsonl")
    assert {len(r["objects"]) for r in records} == {1, 2, 3}
    sides = {o["size"]: [] for r in records for o in r["objects"]}
    for r in records:
        for o in r["objects"]:
            sides[o["size"]].append(max(o["box"][2] - o["box"][0], o["box"][3] - o["box"][1]))
    assert max(sides["small"]) < min(sides["large"])


def test_interrupted_run_leaves_no_meta_and_rerun_drops_stale_images(tmp_path, monkeypatch):
    shapes.generate(tmp_path, n=30, size=48, seed=0)
    assert len(list((tmp_path / "images" / "train").iterdir())) == 30

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes, "write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shapes.generate(tmp_path, n=30, size=48, seed=0)
    assert not (tmp_path / "meta.json").exists()
    monkeypatch.undo()
    shapes.generate(tmp_path, n=20, size=48, seed=0)
    assert len(list((tmp_path / "images" / "train").iterdir())) == 20
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("n, size, seed", [(0, 64, 0), (10, 16, 0), (10, 64, -1)])
def test_bad_arguments_are_user_errors(tmp_path, n, size, seed):
    with pytest.raises(MmcliError):
        shapes.generate(tmp_path, n=n, size=size, seed=seed)
    assert not (tmp_path / "meta.json").exists()


def test_run_shapes_summary(tmp_path):
    summary = run_shapes(tmp_path / "out", n=20, size=32, seed=1)
    assert summary["counts"] == {"train": 20, "val": 20, "test": 20, "classify": 48}
    assert summary["images"] == 108
    assert Path(summary["meta"]) == tmp_path / "out" / "meta.json"
    assert Path(summary["files"]["train"]["tsv"]).is_file()
    assert summary["seconds"] >= 0


def test_a_folder_of_someone_else_s_files_with_the_dataset_s_names_needs_overwrite(tmp_path):
    theirs = tmp_path / "theirs"
    (theirs / "images" / "train").mkdir(parents=True)
    (theirs / "train.tsv").write_text("filepath\ttitle\nimages/train/train-000005.png\ta photo of mine\n")
    (theirs / "images" / "train" / "train-000005.png").write_bytes(b"my photo")
    (theirs / "notes.txt").write_text("mine\n")
    before = file_bytes(theirs)
    with pytest.raises(MmcliError) as refused:
        shapes.generate(theirs, n=2, size=32, seed=0)
    assert str(refused.value) == (
        f"--out {theirs}: holds 2 file(s) with the dataset's names that mmcli data shapes did not write "
        "(e.g. train.tsv); pass --overwrite to replace them, or choose another folder"
    )
    assert file_bytes(theirs) == before  # nothing deleted, nothing written
    shapes.generate(theirs, n=2, size=32, seed=0, overwrite=True)
    assert (theirs / "meta.json").is_file() and (theirs / "notes.txt").read_text() == "mine\n"
    assert not (theirs / "images" / "train" / "train-000005.png").exists()


def test_a_dataset_mmcli_wrote_is_replaced_and_other_files_are_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    shapes.generate(tmp_path, n=4, size=32, seed=0)  # only new names: no --overwrite needed
    shapes.generate(tmp_path, n=2, size=32, seed=1)  # its own dataset: replaced
    assert json.loads((tmp_path / "meta.json").read_text())["seed"] == 1
    assert len(list((tmp_path / "images" / "train").iterdir())) == 2
    assert (tmp_path / "notes.txt").read_text() == "mine\n"
    assert not (tmp_path / shapes.PARTIAL_MARKER).exists()


def test_out_naming_a_file_is_a_one_line_error_exit_2(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "data.tsv"
    target.write_text("precious\n")
    r = subprocess.run(
        [sys.executable, "-m", "mmcli", "data", "shapes", "--out", str(target), "--n", "1", "--size", "32"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"mmcli: error: --out {target}: is a file, not a folder; name a folder for the dataset"
    ]
    assert target.read_text() == "precious\n"


def test_cli_overwrite_option_reaches_the_generator(tmp_path):
    from typer.testing import CliRunner

    from mmcli.cli import app

    (tmp_path / "meta.json").write_text('{"mine": true}\n')
    refused = CliRunner().invoke(app, ["data", "shapes", "--out", str(tmp_path), "--n", "1", "--size", "32"])
    assert refused.exit_code == 2 and json.loads((tmp_path / "meta.json").read_text()) == {"mine": True}
    done = CliRunner().invoke(
        app, ["data", "shapes", "--out", str(tmp_path), "--n", "1", "--size", "32", "--overwrite"]
    )
    assert done.exit_code == 0 and json.loads((tmp_path / "meta.json").read_text())["counts"]["train"] == 1
