"""Graph fusion: output shape, region-order invariance, span pooling, the alignment loss by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mmcli.models.fusion import build_fusion
from mmcli.models.fusion.graph import GraphFusion, pad_boxes, span_means
from mmcli.models.graph.layers import alignment_feature_dim
from mmcli.training.losses import alignment_loss

GRAPH = {"layer": "gat", "heads": 2, "max_iters": 3, "tol": 0.0, "regions": "given", "grid": 2}


def _fusion(inner=None, **graph) -> GraphFusion:
    torch.manual_seed(0)
    return GraphFusion(
        dim=8,
        image_dim=6,
        text_dim=5,
        text_pooled_dim=4,
        image_pooled_dim=3,
        image_size=32,
        graph={**GRAPH, **graph},
        inner=inner,
    ).eval()


def _inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    boxes = torch.tensor(
        [[[0, 0, 16, 16], [16, 0, 32, 16], [8, 16, 24, 32]], [[0, 0, 32, 32], [0, 0, 0, 0], [0, 0, 0, 0]]],
        dtype=torch.float32,
    )
    return {
        "image_tokens": torch.randn(2, 16, 6),  # a 4×4 patch grid
        "text_tokens": torch.randn(2, 7, 5),
        "text_mask": torch.ones(2, 7, dtype=torch.bool),
        "text_pooled": torch.randn(2, 4),
        "image_pooled": torch.randn(2, 3),
        "boxes": boxes,
        "box_mask": torch.tensor([[True, True, True], [True, False, False]]),
        "concept_spans": torch.tensor([[[1, 3], [3, 4]], [[1, 2], [0, 0]]]),
        "concept_mask": torch.tensor([[True, True], [True, False]]),
    }


def test_output_shape_and_width_of_the_combined_features():
    fusion = _fusion()
    assert fusion(_inputs()).shape == (2, 8)
    # The pooled embeddings (4 + 3) and the alignment summary feed the projection.
    assert fusion.combine[0].in_features == 4 + 3 + alignment_feature_dim(8)
    inner = {"strategy": "cross_attention", "dim": 8, "depth": 1, "heads": 2, "image_dim": 6, "text_dim": 5}
    with_attention = _fusion(build_fusion(**inner))
    assert with_attention(_inputs()).shape == (2, 8)
    assert with_attention.combine[0].in_features == 8 + alignment_feature_dim(8)
    assert with_attention.forward_tokens(_inputs()).shape == (2, 7, 8)


@pytest.mark.parametrize("layer", ["gcn", "gat"])
def test_permuting_a_samples_regions_leaves_its_prediction_unchanged(layer):
    fusion = _fusion(layer=layer)
    head = torch.nn.Linear(8, 3)
    inputs = _inputs()
    permuted = dict(inputs, boxes=inputs["boxes"].clone())
    permuted["boxes"][0] = inputs["boxes"][0][[2, 0, 1]]
    with torch.no_grad():
        before, after = head(fusion(inputs)), head(fusion(permuted))
        alignment = fusion.reason(inputs).alignment[0]
        alignment_after = fusion.reason(permuted).alignment[0]
    assert torch.allclose(before, after, atol=1e-5)
    # The regions' own alignment rows move with them.
    assert torch.allclose(alignment_after, alignment[[2, 0, 1]], atol=1e-5)


def test_region_modes():
    fusion = _fusion()
    inputs = _inputs()
    given, mask = fusion.region_boxes(inputs)
    assert torch.equal(given[0], inputs["boxes"][0]) and mask.tolist() == [[True, True, True], [True, False, False]]
    grid, grid_mask = fusion.region_boxes(inputs, "grid")
    assert grid_mask.all() and grid[1].tolist() == [[0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 16, 32], [16, 16, 32, 32]]
    # An image without boxes gets automatic regions instead.
    no_boxes = dict(inputs, box_mask=torch.tensor([[True, True, True], [False, False, False]]))
    boxes, mask = fusion.region_boxes(no_boxes)
    assert mask[1].sum() >= 1 and not torch.equal(boxes[1][0], torch.zeros(4))


def test_span_means_by_hand():
    states = torch.arange(12.0).view(1, 4, 3)  # token t holds [3t, 3t+1, 3t+2]
    means, mask = span_means(states, torch.tensor([[[1, 3], [2, 2], [3, 9]]]), torch.tensor([[True, True, True]]))
    assert means[0, 0].tolist() == [4.5, 5.5, 6.5]  # tokens 1 and 2
    assert mask.tolist() == [[True, False, True]]  # an empty span is no concept
    assert means[0, 2].tolist() == [9.0, 10.0, 11.0]  # clipped to the text's last token


def test_pad_boxes():
    boxes, mask = pad_boxes([torch.ones(2, 4), torch.ones(0, 4)])
    assert boxes.shape == (2, 2, 4) and mask.tolist() == [[True, True], [False, False]]


def test_alignment_loss_by_hand():
    regions = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])  # one region per image
    concepts = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [5.0, 5.0]]])
    concept_mask = torch.tensor([[True, False], [True, False]])  # text 0: [1, 0]; text 1: [0, 1]
    one_region = torch.ones(2, 1, dtype=torch.bool)
    loss = alignment_loss(regions, one_region, concepts, concept_mask, temperature=0.1)
    s = 1 / math.sqrt(2)
    # Regions → texts: image 0's region scores its own text 1 and the other 0; image 1's both 1/√2.
    region_side = (math.log(1 + math.exp(-10.0)) + math.log(2.0)) / 2
    # Concepts → images: text 0's concept scores image 0 1 and image 1 1/√2; text 1's 0 and 1/√2.
    concept_side = (math.log(1 + math.exp((s - 1) * 10)) + math.log(1 + math.exp(-s * 10))) / 2
    assert loss.item() == pytest.approx((region_side + concept_side) / 2, rel=1e-5)
    # A text without concepts takes no part: image 1's region drops out, and text 1 from the
    # softmax; text 0's concept still scores image 0 against image 1.
    no_text = torch.tensor([[True, False], [False, False]])
    alone = alignment_loss(regions, one_region, concepts, no_text, temperature=0.1)
    assert alone.item() == pytest.approx((0.0 + math.log(1 + math.exp((s - 1) * 10))) / 2, abs=1e-6)


def test_alignment_loss_same_caption_is_no_negative():
    # Two images with the very same caption: with positives saying so, the loss cannot tell them
    # apart and must not try (each direction's positive mass is the whole softmax over two).
    regions = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    concepts = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    mask = torch.ones(2, 1, dtype=torch.bool)
    both = torch.ones(2, 2, dtype=torch.bool)
    assert alignment_loss(regions, mask, concepts, mask, positives=both).item() == pytest.approx(0.0, abs=1e-6)
    # Without it, image 1's region is pushed from its own text (cos 0) towards the twin (cos 0):
    # log 2 for that region; concept 1 prefers image 0 (cos 1) to its own (cos 0).
    plain = alignment_loss(regions, mask, concepts, mask, temperature=0.1).item()
    region_side = (math.log(2.0) + math.log(2.0)) / 2
    concept_side = (math.log(1 + math.exp(-10.0)) + math.log(1 + math.exp(10.0))) / 2
    assert plain == pytest.approx((region_side + concept_side) / 2, rel=1e-5)


def test_local_features_add_the_pooled_input_embeddings():
    from mmcli.models.graph.regions import roi_features

    fusion = _fusion(local_features=True)
    inputs = dict(_inputs(), image_patches=torch.randn(2, 16, 6), text_embeddings=torch.randn(2, 7, 5))
    regions, mask, concepts, concept_mask = fusion.nodes(inputs)
    boxes = [b[m] for b, m in zip(inputs["boxes"], inputs["box_mask"])]
    tokens = roi_features(inputs["image_tokens"], boxes, 32)[0]
    patches = roi_features(inputs["image_patches"], boxes, 32)[0]
    expected = (
        fusion.region_in(tokens) + fusion.local_in(patches) + fusion.box_embedding(inputs["boxes"], 32)
    ) * mask.unsqueeze(-1)
    torch.testing.assert_close(regions, expected)
    # Concept 0 of text 0 spans tokens 1–2: its states' mean and its embeddings' mean.
    states, words = inputs["text_tokens"][0, 1:3].mean(0), inputs["text_embeddings"][0, 1:3].mean(0)
    torch.testing.assert_close(concepts[0, 0], fusion.concept_in(states) + fusion.concept_local_in(words))
    assert concept_mask.tolist() == inputs["concept_mask"].tolist()
    # The box covering the top-left 2×2 cells does not see a patch embedding outside it.
    changed = dict(inputs, image_patches=inputs["image_patches"].clone())
    changed["image_patches"][0, 15] += 100.0  # the bottom-right cell
    torch.testing.assert_close(fusion.nodes(changed)[0][0, 0], regions[0, 0])
    plain = _fusion()  # off: the final states alone
    assert plain.local_in is None and plain.concept_local_in is None


def test_encode_image_levels_returns_the_patchify_output_of_the_same_pass():
    from mmcli.models.encoders import build_dual_encoder
    from mmcli.models.multimodal import MultimodalModel
    from mmcli.spec import ModelSpec

    torch.manual_seed(0)
    model = MultimodalModel(build_dual_encoder(ModelSpec(arch="mmcli-nano")).model).eval()
    size = model.clip.visual.image_size
    images = torch.randn(2, 3, *((size, size) if isinstance(size, int) else size))
    with torch.no_grad():
        pooled, tokens, patches = model.encode_image_levels(images)
        reference_pooled, reference_tokens = model.encode_image_tokens(images)
        conv = model.clip.visual.conv1(images)
    torch.testing.assert_close(pooled, reference_pooled)
    torch.testing.assert_close(tokens, reference_tokens)
    torch.testing.assert_close(patches, conv.flatten(2).transpose(1, 2))
    assert patches.shape == tokens.shape
    assert not model.clip.visual.conv1._forward_hooks  # the hook is gone again
