"""Tests for mmcli.data.concepts: offline concept extraction and token spans."""

import pytest

from mmcli.data.concepts import Concept, concept_token_spans, extract_concepts

O, A, R = "object", "attribute", "relation"  # noqa: E741 - short names keep the tables below readable

# Each caption with its exact concepts as (text, kind), in order.
CAPTIONS = [
    (
        "a red circle left of a blue square and a green triangle",
        [
            ("red circle", O),
            ("red", A),
            ("left of", R),
            ("blue square", O),
            ("blue", A),
            ("green triangle", O),
            ("green", A),
        ],
    ),
    (
        "a small purple diamond above a large yellow square",
        [
            ("small purple diamond", O),
            ("small", A),
            ("purple", A),
            ("above", R),
            ("large yellow square", O),
            ("large", A),
            ("yellow", A),
        ],
    ),
    (
        "an orange square to the left of a pink circle",
        [("orange square", O), ("orange", A), ("to the left of", R), ("pink circle", O), ("pink", A)],
    ),
    ("what is right of the green circle?", [("right of", R), ("green circle", O), ("green", A)]),
    (
        "a small dog sitting next to a wooden chair",
        [
            ("small dog", O),
            ("small", A),
            ("sitting", R),
            ("next to", R),
            ("wooden chair", O),
            ("wooden", A),
        ],
    ),
    (
        "two cats on top of the old car",
        [("two cats", O), ("two", A), ("on top of", R), ("old car", O), ("old", A)],
    ),
    (
        "a man in a black shirt holding an umbrella",
        [("man", O), ("in", R), ("black shirt", O), ("black", A), ("holding", R), ("umbrella", O)],
    ),
    (
        "the big brown bear is eating fish near the river",
        [
            ("big brown bear", O),
            ("big", A),
            ("brown", A),
            ("eating", R),
            ("fish", O),
            ("near", R),
            ("river", O),
        ],
    ),
    (
        "a tall building in front of a tree",
        [("tall building", O), ("tall", A), ("in front of", R), ("tree", O)],
    ),
    ("people walking quickly on the beach", [("people", O), ("walking", R), ("on", R), ("beach", O)]),
    ("a photo of a yellow taxi", [("yellow taxi", O), ("yellow", A)]),
    ("the sky is blue", [("sky", O), ("blue", A)]),
    ("a tennis ball under the table", [("tennis ball", O), ("under", R), ("table", O)]),
    ("a red, blue ball", [("red", A), ("blue ball", O), ("blue", A)]),
    # Known limit: an adjective outside the lexicon reads as part of a compound noun.
    ("a fluorescent lamp behind the sofa", [("fluorescent lamp", O), ("behind", R), ("sofa", O)]),
]


@pytest.mark.parametrize(("caption", "expected"), CAPTIONS, ids=[c for c, _ in CAPTIONS])
def test_extract_concepts(caption, expected):
    concepts = extract_concepts(caption)
    assert [(c.text, c.kind) for c in concepts] == expected
    assert [c.grounded for c in concepts] == [kind != R for _, kind in expected]  # relations only are not


def test_concepts_carry_word_spans_and_heads():
    assert extract_concepts("Two cats on top of the old car") == [
        Concept("two cats", O, (0, 2), "cats"),
        Concept("two", A, (0, 1), "two"),
        Concept("on top of", R, (2, 5), "top"),
        Concept("old car", O, (6, 8), "car"),
        Concept("old", A, (6, 7), "old"),
    ]


def test_a_relation_phrase_does_not_cross_punctuation():
    # "left, of" is two words separated by a comma, not the relation "left of".
    assert [(c.text, c.kind) for c in extract_concepts("the circle on the left, of course")] == [
        ("circle", O),
        ("on", R),
        ("left", A),
        ("course", O),
    ]


@pytest.fixture(scope="module")
def tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@pytest.mark.parametrize("caption", [c for c, _ in CAPTIONS] + ["The dog's red ball, 12 inches wide!"])
def test_token_spans_decode_to_the_concepts(caption, tokenizer):
    tokens = tokenizer(caption)[0].tolist()
    concepts = extract_concepts(caption)
    spans = concept_token_spans(caption, tokenizer)
    assert len(spans) == len(concepts)
    for concept, (start, end) in zip(concepts, spans):
        # decode() ends every word-final piece with a space, and "'s" and each digit are pieces
        # of their own ("12" decodes as "1 2 "), so compare without spaces.
        assert tokenizer.decode(tokens[start:end]).replace(" ", "") == concept.text.replace(" ", "")


def test_token_spans_count_bpe_pieces_and_the_start_token(tokenizer):
    # [sot] a small dog ...: "small dog" sits at token positions 2 and 3.
    caption = "a small dog sitting next to a wooden chair"
    assert tokenizer.encode("small") == [tokenizer.encoder["small</w>"]]
    assert concept_token_spans(caption, tokenizer)[0] == (2, 4)


def test_token_spans_are_clipped_to_the_context_window(tokenizer):
    # 76 filler words leave room for none of the concept; [eot] takes the last position.
    caption = "the " * 76 + "red circle"
    assert concept_token_spans(caption, tokenizer)[:2] == [(76, 76), (76, 76)]
    short = "the " * 74 + "red circle"  # "red" at 75, "circle" truncated
    assert concept_token_spans(short, tokenizer)[:2] == [(75, 76), (75, 76)]
