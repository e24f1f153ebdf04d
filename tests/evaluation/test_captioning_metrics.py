"""Tests for mmcli.evaluation.captioning_metrics: expected values are worked out by hand in each test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mmcli.data.shapes import SPLITS, parse_caption
from mmcli.evaluation.captioning_metrics import corpus_metrics, normalise_caption, relation_is_true, scene_scores

# --------------------------------------------------------------------------------------------
# COCO metrics
# --------------------------------------------------------------------------------------------

BLEU_PREDICTIONS = {"p": "a red circle left of a blue square", "q": "a green star"}
BLEU_REFERENCES = {
    "p": ["a red circle right of a blue square", "a red circle left of a green square"],
    "q": ["a green triangle above a red circle", "a green triangle below a blue square and a red circle"],
}


def test_normalise_caption():
    assert normalise_caption("  A Red-Circle,  left of\ta BLUE square. ") == "a red circle left of a blue square"
    assert normalise_caption("...") == ""


def test_bleu_matches_the_hand_computed_counts():
    # p (8 words): every word, bigram and trigram is in one reference or the other (counts clipped
    # by the largest count in one reference: "a" twice); of the 5 four-grams "left of a blue" is in
    # neither. Guesses [8, 7, 6, 5], correct [8, 7, 6, 4]; both references have 8 words: r = 8.
    # q (3 words): "a", "green" and "a green" match; "star", "green star", "a green star" do not.
    # Guesses [3, 2, 1, 0], correct [2, 1, 0, 0]; closest reference length to 3 is 7 (not 11).
    # Corpus: guesses [11, 9, 7, 5], correct [10, 8, 6, 4], c = 11 < r = 15: BP = exp(1 - 15/11).
    scores = corpus_metrics(BLEU_PREDICTIONS, BLEU_REFERENCES)
    brevity = math.exp(1 - 15 / 11)
    assert scores["bleu1"] == pytest.approx(brevity * 10 / 11, rel=1e-9)
    assert scores["bleu2"] == pytest.approx(brevity * (10 / 11 * 8 / 9) ** (1 / 2), rel=1e-9)
    assert scores["bleu4"] == pytest.approx(brevity * (10 / 11 * 8 / 9 * 6 / 7 * 4 / 5) ** (1 / 4), rel=1e-9)
    assert scores["images"] == 2


def test_rouge_l_matches_the_hand_computed_lcs():
    predictions = {"p": "a red circle above a blue square", "q": "a green diamond"}
    references = {
        "p": ["a red square", "a red circle above a blue diamond"],
        "q": ["a blue diamond below a green circle"],
    }
    beta2 = 1.2**2

    def f(precision: float, recall: float) -> float:
        return (1 + beta2) * precision * recall / (recall + beta2 * precision)

    # p (7 words): LCS with "a red square" is 3 (P 3/7, R 3/3); with the second reference it is 6,
    # "a red circle above a blue" (P 6/7, R 6/7). pycocoevalcap takes the largest P and the largest R
    # separately: P = 6/7, R = 1.
    # q (3 words) vs 7 words: LCS 2 ("a diamond" or "a green"): P = 2/3, R = 2/7.
    expected = (f(6 / 7, 1.0) + f(2 / 3, 2 / 7)) / 2
    assert corpus_metrics(predictions, references)["rouge_l"] == pytest.approx(expected, rel=1e-12)


CIDER_REFERENCES = {
    "1": ["a red circle left of a blue square"],
    "2": ["a green triangle above a yellow diamond"],
    "3": ["a purple square"],
}


def test_cider_d_of_identical_captions_by_hand_and_against_wrong_ones():
    identical = {key: refs[0] for key, refs in CIDER_REFERENCES.items()}
    # A caption identical to its only reference has cosine 1 for each n-gram order whose idf vector
    # is not zero (and no length penalty), times 10, averaged over n = 1..4. Images 1 and 2 have
    # four-grams with non-zero idf: 10. Image 3 has no four-gram: 10 * 3/4.
    right = corpus_metrics(identical, CIDER_REFERENCES)["cider_d"]
    assert right == pytest.approx((10 + 10 + 7.5) / 3, rel=1e-12)
    swapped = {"1": identical["2"], "2": identical["3"], "3": identical["1"]}
    assert corpus_metrics(swapped, CIDER_REFERENCES)["cider_d"] < 0.5 * right
    # "a" is in every image's references: idf log(3/3) = 0, so it scores nothing.
    assert corpus_metrics({"1": "a", "2": "a a", "3": "a"}, CIDER_REFERENCES)["cider_d"] == 0.0
    # With one image every n-gram is in every image's references: no figure.
    assert corpus_metrics({"3": "a purple square"}, {"3": CIDER_REFERENCES["3"]})["cider_d"] is None


def test_case_and_punctuation_do_not_change_the_scores():
    shouted = {key: text.upper().replace(" of", ", of") + "." for key, text in BLEU_PREDICTIONS.items()}
    references = {key: [r.capitalize() + "!" for r in refs] for key, refs in BLEU_REFERENCES.items()}
    assert corpus_metrics(shouted, references) == corpus_metrics(BLEU_PREDICTIONS, BLEU_REFERENCES)


def test_nothing_is_printed(capsys):
    corpus_metrics(BLEU_PREDICTIONS, BLEU_REFERENCES)
    corpus_metrics({**BLEU_PREDICTIONS, "p": ""}, BLEU_REFERENCES)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("empty", ["", "  ", "?!"])
def test_an_empty_prediction_scores_zero_without_crashing(empty):
    scores = corpus_metrics({**BLEU_PREDICTIONS, "p": empty}, BLEU_REFERENCES)
    # p now adds no guess and length 0 against its closest reference (8): guesses [3, 2, 1, 0],
    # correct [2, 1, 0, 0], c = 3, r = 8 + 7 = 15.
    assert scores["bleu1"] == pytest.approx(math.exp(1 - 15 / 3) * 2 / 3, rel=1e-9)
    alone = corpus_metrics({"q": BLEU_PREDICTIONS["q"]}, {"q": BLEU_REFERENCES["q"]})
    # ROUGE-L is a mean over images and p contributes 0.
    assert scores["rouge_l"] == pytest.approx(alone["rouge_l"] / 2, rel=1e-12)
    assert scores["cider_d"] >= 0.0
    every = corpus_metrics(dict.fromkeys(BLEU_PREDICTIONS, empty), BLEU_REFERENCES)
    assert every["bleu1"] == every["rouge_l"] == every["cider_d"] == 0.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="'q' has no prediction"):
        corpus_metrics({"p": "a red circle"}, BLEU_REFERENCES)
    with pytest.raises(ValueError, match="'x' has no references"):
        corpus_metrics({**BLEU_PREDICTIONS, "x": "a"}, BLEU_REFERENCES)
    with pytest.raises(ValueError, match="one string"):
        corpus_metrics({**BLEU_PREDICTIONS, "p": ["a red circle"]}, BLEU_REFERENCES)
    with pytest.raises(ValueError, match="non-empty list"):
        corpus_metrics(BLEU_PREDICTIONS, {**BLEU_REFERENCES, "p": []})
    with pytest.raises(ValueError, match="no word"):
        corpus_metrics(BLEU_PREDICTIONS, {**BLEU_REFERENCES, "p": ["a red circle", "..."]})
    empty = corpus_metrics({}, {})
    assert empty["images"] == 0 and empty["bleu4"] is None and empty["cider_d"] is None


# --------------------------------------------------------------------------------------------
# scene scores
# --------------------------------------------------------------------------------------------


def scene(names: list[str], relations: list[tuple[int, str | None, int]]) -> dict:
    """A shapes record with the given "colour shape" objects and (subject, predicate, object) relations."""
    objects = [dict(zip(("color", "shape"), name.split())) for name in names]
    return {"objects": objects, "relations": [{"subject": s, "predicate": p, "object": o} for s, p, o in relations]}


# Each case: scene, caption, and what it adds: (hits, named, scene objects) for the object scores;
# relation: right / wrong / not counted (one-object scene); exact or not; states a relation or not.
CASES = {
    "exact": (
        scene(["red circle", "blue square"], [(0, "left of", 1), (1, "right of", 0)]),
        "a red circle left of a blue square",
    ),  # 2, 2, 2; right; exact; stated
    "one colour wrong": (
        scene(
            ["green triangle", "yellow diamond", "red square"],
            [
                (0, "above", 1),
                (1, "below", 0),
                (0, "left of", 2),
                (2, "right of", 0),
                (1, "left of", 2),
                (2, "right of", 1),
            ],
        ),
        "a green triangle above a yellow diamond and a blue square",
    ),  # 2, 3, 3; right; not exact; stated
    "relation wrong": (
        scene(["purple circle", "orange square"], [(0, "left of", 1), (1, "right of", 0)]),
        "a purple circle right of a orange square",
    ),  # 2, 2, 2; wrong; not exact; stated
    "relation object not in scene": (
        scene(["blue circle", "green square"], [(0, "above", 1), (1, "below", 0)]),
        "a red circle above a green square",  # "above" does hold between the scene's objects 0 and 1
    ),  # 1, 2, 2; wrong; not exact; stated
    "unparseable": (
        scene(["yellow triangle", "red diamond"], [(0, "below", 1), (1, "above", 0)]),
        "a yellow triangle and a red diamond",
    ),  # 0, 0, 2; wrong; not exact; not stated
    "one object": (scene(["orange circle"], []), "a orange circle."),  # 1, 1, 1; not counted; exact
    "null predicate": (
        scene(["red square", "blue diamond"], [(0, None, 1), (1, None, 0)]),
        "a red square left of a blue diamond",
    ),  # 2, 2, 2; wrong; not exact; stated
    "relation in a one-object scene": (
        scene(["green diamond"], []),
        "a green diamond left of a red circle",
    ),  # 1, 2, 1; not counted; not exact; stated
    "no relation in a two-object scene": (
        scene(["red circle", "blue square"], [(0, "left of", 1), (1, "right of", 0)]),
        "a blue square",
    ),  # 1, 1, 2; wrong; not exact; not stated
}


def test_scene_scores_on_hand_made_scenes():
    predictions = {key: text for key, (_, text) in CASES.items()}
    scenes = {key: record for key, (record, _) in CASES.items()}
    # hits 2+2+2+1+0+1+2+1+1 = 12, named 2+3+2+2+0+1+2+2+1 = 15, scene objects 2+3+2+2+2+1+2+1+2 = 17.
    # Relation: 7 scenes of two or more objects, right in "exact" and "one colour wrong".
    # Exact: "exact" and "one object" of 9. Stated: 6 (all but unparseable, one object, no relation).
    assert scene_scores(predictions, scenes) == {
        "object_precision": pytest.approx(12 / 15),
        "object_recall": pytest.approx(12 / 17),
        "object_f1": pytest.approx(2 * 12 / (15 + 17)),
        "relation_accuracy": pytest.approx(2 / 7),
        "relations_stated": 6,
        "exact_scene": pytest.approx(2 / 9),
        "unparseable": 1,
        "captions": 9,
    }


def test_each_case_alone():
    expected = {  # key: (precision, recall, relation_accuracy, exact_scene)
        "exact": (1.0, 1.0, 1.0, 1.0),
        "one colour wrong": (2 / 3, 2 / 3, 1.0, 0.0),
        "relation wrong": (1.0, 1.0, 0.0, 0.0),
        "relation object not in scene": (0.5, 0.5, 0.0, 0.0),
        "unparseable": (None, 0.0, 0.0, 0.0),
        "one object": (1.0, 1.0, None, 1.0),
        "null predicate": (1.0, 1.0, 0.0, 0.0),
        "relation in a one-object scene": (0.5, 1.0, None, 0.0),
        "no relation in a two-object scene": (1.0, 0.5, 0.0, 0.0),
    }
    for key, (record, text) in CASES.items():
        scores = scene_scores({key: text}, {key: record})
        found = (
            scores["object_precision"],
            scores["object_recall"],
            scores["relation_accuracy"],
            scores["exact_scene"],
        )
        assert found == pytest.approx(expected[key]), key


def test_an_object_named_twice_is_not_an_exact_scene():
    record = scene(["green diamond"], [])
    parsed = parse_caption("a green diamond left of a green diamond")
    assert parsed is not None and not relation_is_true(parsed, record)
    scores = scene_scores({"x": "a green diamond left of a green diamond"}, {"x": record})
    assert scores["object_precision"] == scores["object_recall"] == 1.0 and scores["exact_scene"] == 0.0


def test_scene_scores_refuses_mismatched_ids_and_gives_none_when_empty():
    with pytest.raises(ValueError, match="'y' has no prediction"):
        scene_scores({}, {"y": scene(["red circle"], [])})
    assert scene_scores({}, {}) == {
        "object_precision": None,
        "object_recall": None,
        "object_f1": None,
        "relation_accuracy": None,
        "relations_stated": 0,
        "exact_scene": None,
        "unparseable": 0,
        "captions": 0,
    }


def test_the_datasets_own_captions_are_perfect(shapes_dir: Path):
    records = [
        json.loads(line) for split in SPLITS for line in (shapes_dir / f"{split}.jsonl").read_text().splitlines()
    ]
    predictions = {r["id"]: r["caption"] for r in records}
    scores = scene_scores(predictions, {r["id"]: r for r in records})
    assert scores["exact_scene"] == scores["object_f1"] == scores["relation_accuracy"] == 1.0
    assert scores["unparseable"] == 0 and scores["captions"] == len(records)
    coco = corpus_metrics(predictions, {r["id"]: [r["caption"]] for r in records})
    assert coco["bleu4"] == pytest.approx(1.0) and coco["rouge_l"] == pytest.approx(1.0)
