"""MLMHead (tying, labelled positions only), ITMHead and ClassifierHead."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmcli.data.masking import IGNORE_INDEX
from mmcli.models.heads import ClassifierHead, ITMHead, MLMHead

WIDTH, VOCAB = 8, 50


@pytest.fixture
def embedding() -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(VOCAB, WIDTH)


def labelled(batch: int = 3, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    hidden = torch.randn(batch, length, WIDTH)
    labels = torch.full((batch, length), IGNORE_INDEX)
    labels[0, 1], labels[1, 4], labels[2, 0], labels[2, 5] = 7, 12, 0, 49
    return hidden, labels


def test_tied_decoder_is_the_embedding_weight(embedding):
    head = MLMHead(WIDTH, VOCAB, tied_embedding=embedding)
    assert head.decoder_weight is embedding.weight
    assert head.decoder_weight.data_ptr() == embedding.weight.data_ptr()
    # Held by reference only: saved and optimised once, with the text tower.
    assert all(p is not embedding.weight for p in head.parameters())
    assert set(head.state_dict()) == {
        "bias",
        "transform.0.weight",
        "transform.0.bias",
        "transform.2.weight",
        "transform.2.bias",
    }


def test_tied_weight_gets_gradient_from_lookup_and_decoder(embedding):
    head = MLMHead(WIDTH, VOCAB, tied_embedding=embedding)
    tokens = torch.tensor([[3, 7, 7, 20]])
    labels = torch.tensor([[IGNORE_INDEX, 7, IGNORE_INDEX, 20]])

    def lookup_loss():
        return embedding(tokens).pow(2).sum()

    def decoder_loss():
        out = head(torch.randn(1, 4, WIDTH, generator=torch.Generator().manual_seed(2)), labels)
        return F.cross_entropy(out.logits, out.targets)

    grads = []
    for losses in ((lookup_loss,), (decoder_loss,), (lookup_loss, decoder_loss)):
        embedding.weight.grad = None
        sum(loss() for loss in losses).backward()
        grads.append(embedding.weight.grad.clone())
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    assert torch.allclose(grads[2], grads[0] + grads[1], atol=1e-6)


def test_logits_only_at_labelled_positions_equal_the_full_computation(embedding):
    head = MLMHead(WIDTH, VOCAB, tied_embedding=embedding)
    nn.init.normal_(head.bias)
    hidden, labels = labelled()
    out = head(hidden, labels)
    full = head.transform(hidden) @ embedding.weight.T + head.bias  # naive B×L×V
    picked = labels != IGNORE_INDEX
    assert out.logits.shape == (4, VOCAB)
    assert torch.allclose(out.logits, full[picked], atol=1e-6)
    assert out.targets.tolist() == [7, 12, 0, 49]


def test_untied_head_owns_a_decoder(embedding):
    head = MLMHead(WIDTH, VOCAB)
    assert head.decoder_weight is head.weight and head.weight.shape == (VOCAB, WIDTH)
    hidden, labels = labelled()
    out = head(hidden, labels)
    expected = head.transform(hidden[labels != IGNORE_INDEX]) @ head.weight.T + head.bias
    assert torch.allclose(out.logits, expected, atol=1e-6)


def test_a_mismatched_embedding_is_refused(embedding):
    with pytest.raises(ValueError, match=r"\(51, 8\)"):
        MLMHead(WIDTH, VOCAB + 1, tied_embedding=embedding)


def test_itm_and_classifier_heads_are_the_documented_maps():
    torch.manual_seed(3)
    fused = torch.randn(5, 16)
    itm = ITMHead(16)
    assert torch.allclose(itm(fused), fused @ itm.classify.weight.T + itm.classify.bias)

    classifier = ClassifierHead(16, n_classes=7, hidden=12).eval()
    first, _, norm, _, last = classifier.classify
    hidden = F.layer_norm(F.gelu(fused @ first.weight.T + first.bias), (12,), norm.weight, norm.bias)
    assert torch.allclose(classifier(fused), hidden @ last.weight.T + last.bias, atol=1e-6)
    assert classifier(fused).shape == (5, 7)
