"""Tests for mmcli.models.graph.regions: ROI pooling, box geometry, salient and grid regions."""

import pytest
import torch

from mmcli.models.graph.regions import BoxEmbedding, box_geometry, grid_regions, roi_features, salient_regions

# A 4×4 patch grid over a 64-pixel image: each cell is 16×16 pixels; token n is cell (n // 4, n % 4).
IMAGE, CELL = 64, 16


def _tokens(dim: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, dim, generator=torch.Generator().manual_seed(seed))


def test_a_box_on_one_cell_with_one_bin_returns_that_token():
    tokens = _tokens()
    box = torch.tensor([[1 * CELL, 2 * CELL, 2 * CELL, 3 * CELL]], dtype=torch.float32)  # row 2, col 1
    features, mask = roi_features(tokens, [box], IMAGE, output=1)
    torch.testing.assert_close(features[0, 0], tokens[0, 2 * 4 + 1])
    assert mask.tolist() == [[True]]


def test_a_box_on_two_by_two_cells_returns_their_mean():
    tokens = _tokens()
    box = torch.tensor([[0.0, 0.0, 2 * CELL, 2 * CELL]])
    features, _ = roi_features(tokens, [box], IMAGE, output=2)
    torch.testing.assert_close(features[0, 0], tokens[0, [0, 1, 4, 5]].mean(dim=0))


def test_two_bins_on_one_cell_mix_in_neighbours_bilinearly():
    # Bins of half a cell sample at ±¼ cell from the centre: along each axis the cell weighs
    # ¾ and each neighbour ⅛, so the cell itself contributes ¾·¾ and a side neighbour ¾·⅛.
    tokens = torch.zeros(1, 16, 2)
    tokens[0, 1 * 4 + 1, 0] = 1.0  # the boxed cell (1, 1)
    tokens[0, 1 * 4 + 2, 1] = 1.0  # its right-hand neighbour (1, 2)
    box = torch.tensor([[1 * CELL, 1 * CELL, 2 * CELL, 2 * CELL]], dtype=torch.float32)
    features, _ = roi_features(tokens, [box], IMAGE, output=2)
    torch.testing.assert_close(features[0, 0], torch.tensor([0.75 * 0.75, 0.75 * 0.125]))


def test_roi_features_pad_to_the_largest_box_count():
    tokens = torch.cat([_tokens(seed=1), _tokens(seed=2)])
    boxes = [grid_regions(2, IMAGE), torch.zeros(0, 4)]
    features, mask = roi_features(tokens, boxes, IMAGE)
    assert features.shape == (2, 4, 3)
    assert mask.tolist() == [[True] * 4, [False] * 4]
    assert torch.all(features[1] == 0)
    # The top-left quarter of the first image covers cells 0, 1, 4, 5.
    torch.testing.assert_close(features[0, 0], tokens[0, [0, 1, 4, 5]].mean(dim=0))


def test_roi_features_reject_a_cls_token():
    with pytest.raises(ValueError, match="grid"):
        roi_features(torch.zeros(1, 17, 3), [torch.zeros(1, 4)], IMAGE)


def test_box_geometry_and_embedding():
    boxes = torch.tensor([[16.0, 0.0, 48.0, 32.0]])  # on a 64 (high) × 128 (wide) image
    geometry = box_geometry(boxes, (64, 128))
    torch.testing.assert_close(geometry, torch.tensor([[0.125, 0.0, 0.375, 0.5, 0.25, 0.5, 0.125]]))
    embedding = BoxEmbedding(5)
    torch.testing.assert_close(embedding(boxes, (64, 128)), embedding.proj(geometry))


def _two_blobs() -> torch.Tensor:
    """An 8×8 grid of zero tokens with a 2×2 blob at rows 1–2, cols 1–2 and a 1×3 blob at row 5,
    cols 4–6."""
    tokens = torch.zeros(1, 8, 8, 3)
    tokens[0, 1:3, 1:3] = 5.0
    tokens[0, 5, 4:7] = 5.0
    return tokens.reshape(1, 64, 3)


# The blobs' pixel boxes on a 64-pixel image (8-pixel cells): x0 = col·8, y1 = (row + 1)·8, ...
BIG_BLOB, SMALL_BLOB = [8.0, 8.0, 24.0, 24.0], [32.0, 40.0, 56.0, 48.0]


@pytest.mark.parametrize("threshold", ["mean_std", "otsu"])
def test_salient_regions_find_the_two_blobs(threshold):
    # The 4-cell blob has the larger total saliency, so it comes first.
    boxes = salient_regions(_two_blobs(), 2, image_size=64, threshold=threshold)
    assert boxes[0].tolist() == [BIG_BLOB, SMALL_BLOB]


def test_salient_regions_keep_k_and_drop_small_components():
    assert salient_regions(_two_blobs(), 1, image_size=64)[0].tolist() == [BIG_BLOB]
    assert salient_regions(_two_blobs(), 5, image_size=64, min_cells=4)[0].tolist() == [BIG_BLOB]


def test_salient_regions_fall_back_to_the_whole_image():
    boxes = salient_regions(torch.ones(1, 64, 3), 3, image_size=(32, 48))  # 32 high, 48 wide
    assert boxes[0].tolist() == [[0.0, 0.0, 48.0, 32.0]]


def test_grid_regions_tile_the_image():
    boxes = grid_regions(3, (30, 60))
    assert boxes.shape == (9, 4)
    assert boxes[0].tolist() == [0.0, 0.0, 20.0, 10.0]
    assert boxes[5].tolist() == [40.0, 10.0, 60.0, 20.0]  # row 1, col 2
    coverage = torch.zeros(30, 60)
    for x0, y0, x1, y1 in boxes.int().tolist():
        coverage[y0:y1, x0:x1] += 1
    assert torch.all(coverage == 1)  # every pixel in exactly one tile
