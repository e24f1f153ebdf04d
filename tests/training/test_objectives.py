"""MLM, image-conditioned MLM, ITM with hard negatives and MIM: numbers by hand and by statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmcli.data.masking import IGNORE_INDEX
from mmcli.models.heads import MaskedLogits
from mmcli.training.losses import masked_lm_loss
from mmcli.training.objectives import hard_negatives, itm_pairs


def test_hard_negatives_follow_the_renormalised_softmax():
    sim = torch.tensor([[2.0, 1.0, 0.0, 1.0], [0.5, 3.0, 0.5, -1.0]])
    excluded = torch.tensor([[True, False, False, True], [False, True, False, False]])  # row 0: a duplicate at 3
    g = torch.Generator().manual_seed(0)
    draws = 20_000
    counts = torch.zeros(2, 4)
    for _ in range(draws // 100):
        idx, valid = hard_negatives(sim.repeat(100, 1), excluded.repeat(100, 1), g)
        assert valid.all()
        counts[0] += torch.bincount(idx[0::2], minlength=4)
        counts[1] += torch.bincount(idx[1::2], minlength=4)
    # Expected: softmax over the allowed columns only, e.g. row 0 → e^1 / (e^1 + e^0) for column 1.
    expected = torch.tensor([[0, math.e / (math.e + 1), 1 / (math.e + 1), 0], [1 / 3, 0, 1 / 3, 0]])
    expected[1] = torch.tensor([math.exp(0.5), 0, math.exp(0.5), math.exp(-1)]) / (2 * math.exp(0.5) + math.exp(-1))
    freq = counts / draws
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert (counts[excluded] == 0).all()
    assert ((freq - expected).abs() <= 4 * sigma + 1e-9).all(), (freq, expected)


def test_row_without_candidates_is_invalid():
    idx, valid = hard_negatives(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))
    assert valid.tolist() == [False, False] and idx.tolist() == [0, 1]


def test_itm_pairs_layout_and_duplicate_captions():
    texts = torch.tensor([[1, 5, 2], [1, 5, 2], [1, 6, 2]])  # captions 0 and 1 are identical
    outputs = {
        "image_features": F.normalize(torch.randn(3, 4), dim=-1),
        "text_features": F.normalize(torch.randn(3, 4), dim=-1),
        "logit_scale": torch.tensor(10.0),
    }
    images, captions, labels = itm_pairs(outputs, texts, torch.Generator().manual_seed(1))
    assert images[:3].tolist() == [0, 1, 2] and captions[:3].tolist() == [0, 1, 2]
    assert labels[:3].tolist() == [1, 1, 1]
    # Images 0 and 1 can only get caption 2 as a negative; image 2 gets caption 0 or 1.
    assert captions[3:5].tolist() == [2, 2] and captions[5] in (0, 1)
    assert labels[3:].tolist() == [0] * 6
    assert images[3:6].tolist() == [0, 1, 2] and captions[6:].tolist() == [0, 1, 2]
    same = torch.tensor([[1, 5, 2]] * 3)
    _, _, labels = itm_pairs(outputs, same)
    assert labels.tolist() == [1, 1, 1] + [IGNORE_INDEX] * 6


def test_masked_lm_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    got = masked_lm_loss(MaskedLogits(logits, torch.tensor([0, 2])))
    expected = (-math.log(math.e**2 / (math.e**2 + 2)) - math.log(math.e / (2 * math.e + 1))) / 2
    assert abs(float(got) - expected) < 1e-6
    empty = masked_lm_loss(MaskedLogits(torch.zeros(0, 3, requires_grad=True), torch.zeros(0, dtype=torch.long)))
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_random_patch_mask_and_blanking():
    from mmcli.data.masking import blank_patches, random_patch_mask
    from mmcli.training.losses import mim_loss

    mask = random_patch_mask(5, 16, 0.4, torch.Generator().manual_seed(0))
    assert mask.sum(dim=1).tolist() == [6] * 5  # round(0.4 · 16)
    images = torch.ones(1, 3, 4, 4)
    one = torch.tensor([[False, True, False, False]])  # 2×2 grid of 2-pixel patches: top right
    out = blank_patches(images, one, (2, 2))
    assert out[0, :, :2, 2:].abs().sum() == 0 and out.sum() == 3 * 12
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert float(mim_loss(a, b, "cosine")) == pytest.approx(1.0)
    assert float(mim_loss(a, a, "mse")) == pytest.approx(0.0)


@pytest.fixture(scope="module")
def nano_model():
    from mmcli.models.encoders import build_dual_encoder
    from mmcli.models.multimodal import build_multimodal
    from mmcli.spec import (
        ClipObjectiveSpec,
        FusionSpec,
        ItmObjectiveSpec,
        MimObjectiveSpec,
        MlmObjectiveSpec,
        MmlmObjectiveSpec,
        ModelSpec,
    )

    torch.manual_seed(0)
    encoder = build_dual_encoder(ModelSpec(arch="mmcli-nano"))
    objectives = {
        "clip": ClipObjectiveSpec(),
        "mlm": MlmObjectiveSpec(),
        "mmlm": MmlmObjectiveSpec(),
        "itm": ItmObjectiveSpec(),
        "mim": MimObjectiveSpec(),
    }
    model = build_multimodal(encoder.model, objectives, FusionSpec(heads=2, dim=32))
    texts = encoder.tokenizer(["a red circle", "a blue square above a green circle", "a red circle", "a green diamond"])
    return model, objectives, texts


def test_every_objective_starts_at_its_chance_loss(nano_model):
    from mmcli.distributed import World
    from mmcli.training.tasks import Pretrainer

    model, objectives, texts = nano_model
    torch.manual_seed(1)
    losses = Pretrainer(model, objectives, World())({"images": torch.randn(4, 3, 32, 32), "texts": texts})
    value = {k: float(v.detach()) for k, v in losses.items()}
    # Untrained heads guess uniformly: ln(vocabulary) for MLM, ln 2 for ITM.
    assert abs(value["mlm"] - math.log(49409)) < 1.0
    assert abs(value["mmlm"] - math.log(49409)) < 1.0
    assert abs(value["itm"] - math.log(2)) < 0.3
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []  # no idle parameter
    assert model.modules_config["mmlm_proj"] == {"in_dim": 32, "out_dim": 64}


def test_mmlm_reads_the_image_and_mlm_does_not(nano_model):
    model, _, texts = nano_model
    model.eval()
    masked = texts.clone()
    masked[:, 2] = model.mask_token_id  # "a [MASK] circle"
    labels = torch.where(masked == model.mask_token_id, texts, torch.full_like(texts, IGNORE_INDEX))
    tokens = [
        model.encode_image_tokens(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(s)))[1]
        for s in (0, 1)
    ]
    with torch.no_grad():
        a, b = (model.mlm_logits(masked, labels, t).logits for t in tokens)
        text_only = model.mlm_logits(masked, labels).logits
    assert (a - b).abs().max() > 1e-4  # another image, another prediction
    assert torch.equal(text_only, model.mlm_logits(masked, labels).logits)
    assert model.clip.token_embedding.weight is model.mlm_head.decoder_weight  # tied
