"""Downstream examples from shapes JSONL: questions, matching pairs, answer vocabulary, boxes."""

from __future__ import annotations

import json

import pytest
import torch

from mmcli.data.concepts import extract_concepts
from mmcli.data.examples import (
    ExampleDataset,
    answer_prior,
    answer_vocabulary,
    collate_examples,
    matching_examples,
    question_examples,
    read_shapes_jsonl,
)
from mmcli.data.masking import IGNORE_INDEX
from mmcli.errors import MmcliError

RECORDS = [
    {
        "id": "a",
        "image": "img/a.png",
        "caption": "a red circle",
        "objects": [{"box": [1, 2, 5, 6]}],
        "questions": [
            {"question": "what color is the circle?", "answer": "red", "type": "color"},
            {"question": "is there a red circle?", "answer": "yes", "type": "exist"},
        ],
    },
    {
        "id": "b",
        "image": "img/b.png",
        "caption": "a blue square left of a red circle",
        "objects": [{"box": [0, 0, 4, 4]}, {"box": [10, 10, 14, 14]}],
        "questions": [
            {"question": "is there a green circle?", "answer": "no", "type": "exist"},
            {"question": "is there a blue square?", "answer": "yes", "type": "exist"},
        ],
    },
    {"id": "c", "image": "img/c.png", "caption": "a red circle", "objects": [], "questions": []},
]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return path


def test_questions_vocabulary_and_prior(jsonl):
    records = read_shapes_jsonl(jsonl)
    assert records[0]["image"] == str(jsonl.parent / "img/a.png")  # resolved against the file
    examples = question_examples(records)
    assert [e.id for e in examples] == ["a-q0", "a-q1", "b-q0", "b-q1"]
    assert examples[2].boxes == ((0, 0, 4, 4), (10, 10, 14, 14))
    assert answer_vocabulary(examples) == ["no", "red", "yes"]
    assert answer_prior(examples) == {
        "*": {"red": 1, "yes": 2, "no": 1},
        "color": {"red": 1},
        "exist": {"yes": 2, "no": 1},
    }


def test_matching_pairs_never_reuse_the_same_caption(jsonl):
    records = read_shapes_jsonl(jsonl)
    pairs = matching_examples(records, seed=0)
    assert [e.label for e in pairs] == ["yes", "no"] * 3
    for pos, neg in zip(pairs[0::2], pairs[1::2]):
        assert neg.image == pos.image and neg.text != pos.text
    # "a red circle" has one other caption to pair with; the pairs are a function of the seed.
    assert pairs[1].text == pairs[5].text == "a blue square left of a red circle"
    assert [e.text for e in matching_examples(records, seed=0)] == [e.text for e in pairs]


def test_collate_pads_boxes_and_maps_unknown_answers(jsonl, tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    for name in "abc":
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / f"{name}.png")
    examples = question_examples(read_shapes_jsonl(jsonl))
    dataset = ExampleDataset(
        examples, ["yes", "no"], lambda im: torch.zeros(3, 8, 8), lambda t: torch.tensor([1, 2, 0])
    )
    batch = collate_examples([dataset[0], dataset[2]])
    assert batch["labels"].tolist() == [IGNORE_INDEX, 1]  # "red" is not a class here; "no" is 1
    assert batch["boxes"].shape == (2, 2, 4)
    assert batch["box_mask"].tolist() == [[True, False], [True, True]]
    assert batch["boxes"][0].tolist() == [[1, 2, 5, 6], [0, 0, 0, 0]]


def test_collate_marks_relation_concepts_as_not_grounded(jsonl, tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    for name in "abc":
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / f"{name}.png")
    records = read_shapes_jsonl(jsonl)
    examples = question_examples(records)
    dataset = ExampleDataset(
        examples, ["yes", "no"], lambda im: torch.zeros(3, 8, 8), lambda t: torch.tensor([1, 2, 0]), concepts=True
    )
    batch = collate_examples([dataset[0], dataset[2]])
    for row, example in enumerate([examples[0], examples[2]]):
        for key, text in (("concept_grounded", example.text), ("caption_concept_grounded", example.caption)):
            kinds = [c.kind for c in extract_concepts(text)]
            flags = batch[key][row].tolist()
            assert flags[: len(kinds)] == [kind != "relation" for kind in kinds]
            assert not any(flags[len(kinds) :])  # padding
    assert batch["concept_grounded"].shape == batch["concept_mask"].shape
    assert batch["caption_concept_grounded"].shape == batch["caption_concept_mask"].shape


def test_not_a_shapes_file_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"image": "a.png"}\n')
    with pytest.raises(MmcliError, match=r"x.jsonl: line 1: missing id, caption"):
        read_shapes_jsonl(path)


def test_example_loader_never_yields_an_empty_batch_and_carries_the_skips(jsonl, tmp_path):
    from PIL import Image

    from mmcli.data.examples import example_loader

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "b.png")
    (tmp_path / "img" / "a.png").write_bytes(b"not a png")  # a's two questions cannot be decoded
    examples = question_examples(read_shapes_jsonl(jsonl))
    dataset = ExampleDataset(examples, ["yes", "no"], lambda im: torch.zeros(3, 8, 8), lambda t: torch.tensor([1, 0]))
    batches = list(example_loader(dataset, batch_size=2, train=False, seed=0))
    assert [b["index"].tolist() for b in batches] == [[2, 3]]  # b's questions; a's batch is dropped
    assert batches[0]["skipped"] == 2 and batches[0]["batches"] == 2
    assert batches[0]["labels"].tolist() == [1, 0]
