"""mask_tokens: selection share, the 80/10/10 split, specials, labels, determinism."""

from __future__ import annotations

import pytest
import torch

from mmcli.data.masking import IGNORE_INDEX, mask_tokens

PAD, SOT, EOT, VOCAB, MASK = 0, 49406, 49407, 49408, 49408
SPECIALS = {PAD, SOT, EOT}


def captions(batch: int, length: int, seed: int) -> torch.Tensor:
    """Rows laid out like open_clip's tokenizer output: SOT, 7–14 words, EOT, padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, length, dtype=torch.long)
    words = torch.randint(7, length - 1, (batch,), generator=g)
    for row, n in enumerate(words.tolist()):
        tokens[row, 0] = SOT
        tokens[row, 1 : 1 + n] = torch.randint(1, SOT, (n,), generator=g)
        tokens[row, 1 + n] = EOT
    return tokens


def corrupt(tokens: torch.Tensor, seed: int = 0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    options = dict(mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS)
    options.update(kwargs)
    return mask_tokens(tokens, generator=torch.Generator().manual_seed(seed), **options)


@pytest.fixture(scope="module")
def big() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = captions(20_000, 16, seed=1)
    inputs, labels = corrupt(tokens)
    return tokens, inputs, labels


def test_selection_share_and_split_match_the_source(big):
    tokens, inputs, labels = big
    maskable = ~torch.isin(tokens, torch.tensor(sorted(SPECIALS)))
    selected = labels != IGNORE_INDEX
    assert maskable.sum() >= 200_000
    assert selected.sum() / maskable.sum() == pytest.approx(0.15, abs=0.005)

    n = selected.sum()
    masked = (inputs == MASK) & selected
    unchanged = (inputs == tokens) & selected
    # A random pick equal to the original counts as unchanged; at 1/49k that is far below 0.01.
    randomised = selected & ~masked & ~unchanged
    assert masked.sum() / n == pytest.approx(0.80, abs=0.01)
    assert randomised.sum() / n == pytest.approx(0.10, abs=0.01)
    assert unchanged.sum() / n == pytest.approx(0.10, abs=0.01)


def test_specials_are_never_selected_nor_drawn(big):
    tokens, inputs, labels = big
    special = torch.isin(tokens, torch.tensor(sorted(SPECIALS)))
    assert (labels[special] == IGNORE_INDEX).all()
    assert torch.equal(inputs[special], tokens[special])
    changed = (inputs != tokens) & (inputs != MASK)
    assert not torch.isin(inputs[changed], torch.tensor(sorted(SPECIALS))).any()
    assert inputs[changed].max() < VOCAB


def test_labels_hold_the_original_ids_and_ignore_index_elsewhere(big):
    tokens, inputs, labels = big
    selected = labels != IGNORE_INDEX
    assert torch.equal(labels[selected], tokens[selected])
    assert torch.equal(inputs[~selected], tokens[~selected])


def test_every_sequence_gets_its_exact_count_and_at_least_one():
    # 3 words at 15% → 0.45 expected → rounded up to the minimum of one; 20 words → 3.
    short = torch.tensor([[SOT, 5, 6, 7, EOT] + [PAD] * 17])
    long = torch.tensor([[SOT] + list(range(1, 21)) + [EOT]])
    for seed in range(20):
        assert (corrupt(short, seed)[1] != IGNORE_INDEX).sum() == 1
        assert (corrupt(long, seed)[1] != IGNORE_INDEX).sum() == 3


def test_a_caption_without_words_selects_nothing():
    tokens = torch.tensor([[SOT, EOT, PAD, PAD], [SOT, 9, EOT, PAD]])
    inputs, labels = corrupt(tokens)
    assert (labels[0] == IGNORE_INDEX).all()
    assert labels[1].tolist() == [IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX]


def test_random_replacements_are_uniform_over_ordinary_tokens():
    # Vocabulary of 10 with specials {0, 8, 9} and [MASK] = 1: the 6 ids 2..7 remain.
    tokens = torch.full((8000, 40), 5)
    inputs, labels = corrupt(tokens, mask_id=1, vocab_size=10, special_ids={0, 8, 9}, prob=1.0)
    drawn = inputs[(inputs != 1) & (inputs != 5)]
    counts = torch.bincount(drawn, minlength=10).float() / drawn.numel()
    # 5 is an allowed draw too but cannot be told from "unchanged"; the other five share 5/6.
    assert counts[[0, 1, 8, 9]].sum() == 0
    assert counts[[2, 3, 4, 6, 7]] == pytest.approx(torch.full((5,), 0.2), abs=0.01)


def test_a_seeded_generator_gives_the_same_corruption():
    tokens = captions(64, 16, seed=3)
    first, second, other = corrupt(tokens, seed=7), corrupt(tokens, seed=7), corrupt(tokens, seed=8)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


def test_special_ids_may_be_a_tensor_and_input_is_untouched():
    tokens = captions(8, 16, seed=4)
    before = tokens.clone()
    from_set = corrupt(tokens)
    from_tensor = corrupt(tokens, special_ids=torch.tensor([PAD, SOT, EOT]))
    assert torch.equal(from_set[0], from_tensor[0]) and torch.equal(from_set[1], from_tensor[1])
    assert torch.equal(tokens, before)
