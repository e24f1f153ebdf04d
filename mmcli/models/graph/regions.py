"""Image regions for the region–concept graph: boxes, their features and their geometry.

Region features are pooled as in two-stage detectors (RoIAlign, Mask R-CNN, He et al. 2017),
from the patch grid of a ViT (Dosovitskiy et al., 2021) instead of a CNN feature map.

A ViT's patch tokens form a ``g×g`` grid over the image (row-major, no CLS token). Region
features are pooled from that grid with ``torchvision.ops.roi_align`` for given boxes (from a
detector or a dataset's annotations); without boxes, ``salient_regions`` proposes some from the
tokens themselves and ``grid_regions`` is the fixed fallback.

Boxes are ``(x0, y0, x1, y1)`` in image pixels, ``x1``/``y1`` exclusive. ``image_size`` is an
int for a square image or ``(height, width)``; the patch grid is square unless ``grid_size``
says otherwise.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

ImageSize = int | tuple[int, int]
GEOMETRY_DIM = 7


def roi_features(
    patch_tokens: Tensor,
    boxes: list[Tensor],
    image_size: ImageSize,
    output: int = 2,
    *,
    grid_size: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Region features ``[B, R, D]`` pooled from ``patch_tokens`` ``[B, N, D]``, and their mask
    ``[B, R]`` (``R`` is the largest box count; missing regions are zeros and ``False``).

    ``boxes[b]`` is a ``[R_b, 4]`` tensor for image ``b``. Each box is cut into
    ``output × output`` bins sampled bilinearly (``aligned=True``: a token sits at the centre of
    its cell) and the bins are averaged. When the box covers ``k×k`` whole cells and
    ``output == k``, every bin samples a cell centre and the feature is exactly the mean of those
    tokens; otherwise the bilinear samples mix in neighbouring cells.
    """
    batch, count, dim = patch_tokens.shape
    if len(boxes) != batch:
        raise ValueError(f"got boxes for {len(boxes)} images, but {batch} images of patch tokens")
    rows, cols = _grid_shape(count, grid_size)
    feature_map = patch_tokens.transpose(1, 2).reshape(batch, dim, rows, cols).float()
    rois = _grid_rois(boxes, image_size, (rows, cols), feature_map.device)
    # The boxes are already in grid units (rescaled per axis), hence spatial_scale=1.
    pooled = roi_align(feature_map, rois, output_size=output, spatial_scale=1.0, aligned=True)
    features = pooled.mean(dim=(2, 3)).to(patch_tokens.dtype)
    return _pad_per_image(features, [len(b) for b in boxes], batch)


def box_geometry(boxes: Tensor, image_size: ImageSize) -> Tensor:
    """``[..., 7]`` geometry of ``[..., 4]`` pixel boxes: ``x0, y0, x1, y1`` divided by the
    image width/height, then the normalised width, height and area."""
    height, width = _image_hw(image_size)
    scale = boxes.new_tensor([width, height, width, height])
    corners = boxes / scale
    size = corners[..., 2:] - corners[..., :2]
    area = size[..., :1] * size[..., 1:]
    return torch.cat([corners, size, area], dim=-1)


class BoxEmbedding(nn.Module):
    """A linear map of ``box_geometry`` to ``dim``, added to region features so that the graph
    knows where each region is (ROI pooling alone keeps no position)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(GEOMETRY_DIM, dim)

    def forward(self, boxes: Tensor, image_size: ImageSize) -> Tensor:
        """``[..., dim]`` embedding of ``[..., 4]`` pixel boxes."""
        return self.proj(box_geometry(boxes, image_size))


def salient_regions(
    patch_tokens: Tensor,
    k: int,
    *,
    image_size: ImageSize,
    min_cells: int = 1,
    threshold: Literal["mean_std", "otsu"] = "mean_std",
    grid_size: tuple[int, int] | None = None,
) -> list[Tensor]:
    """Up to ``k`` boxes per image ``[≤k, 4]`` (pixels) around salient groups of patches.

    A patch's saliency is the distance of its token from the image's mean token: background
    patches resemble each other and the mean, objects stand out (feature saliency, no detector).
    Patches above ``threshold`` (``"mean_std"``: mean + one standard deviation of the image's
    saliencies; ``"otsu"``: the split that maximises the between-class variance) are grouped
    into 4-connected components; components smaller than ``min_cells`` are dropped and the
    ``k`` with the largest total saliency are kept, most salient first. An image with no
    salient patch gets one box over the whole image.
    """
    if threshold not in ("mean_std", "otsu"):
        raise ValueError(f"threshold must be 'mean_std' or 'otsu', got {threshold!r}")
    rows, cols = _grid_shape(patch_tokens.shape[1], grid_size)
    cell = _cell_size(image_size, (rows, cols))
    tokens = patch_tokens.float()
    saliency = (tokens - tokens.mean(dim=1, keepdim=True)).norm(dim=-1)
    boxes = []
    for scores in saliency:
        if threshold == "otsu":
            cut = _otsu_threshold(scores)
        else:
            cut = scores.mean() + scores.std(unbiased=False)
        found = _component_boxes(scores.view(rows, cols), cut, k, min_cells, cell)
        if not found:
            height, width = _image_hw(image_size)
            found = [(0.0, 0.0, float(width), float(height))]
        boxes.append(torch.tensor(found, dtype=torch.float32, device=patch_tokens.device))
    return boxes


def grid_regions(grid: int, image_size: ImageSize) -> Tensor:
    """``[grid², 4]`` boxes tiling the image in a ``grid × grid`` layout, row-major."""
    height, width = _image_hw(image_size)
    xs = torch.linspace(0, width, grid + 1)
    ys = torch.linspace(0, height, grid + 1)
    y0, x0 = torch.meshgrid(ys[:-1], xs[:-1], indexing="ij")
    y1, x1 = torch.meshgrid(ys[1:], xs[1:], indexing="ij")
    return torch.stack([x0, y0, x1, y1], dim=-1).reshape(-1, 4)


def _image_hw(image_size: ImageSize) -> tuple[int, int]:
    """``(height, width)`` of an int or ``(height, width)`` image size."""
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def _grid_shape(count: int, grid_size: tuple[int, int] | None) -> tuple[int, int]:
    """``(rows, cols)`` of the patch grid holding ``count`` tokens."""
    if grid_size is not None:
        rows, cols = grid_size
    else:
        rows = cols = math.isqrt(count)
    if rows * cols != count:
        raise ValueError(
            f"{count} patch tokens do not form a {rows}×{cols} grid (drop the CLS token, or pass grid_size)"
        )
    return rows, cols


def _cell_size(image_size: ImageSize, grid: tuple[int, int]) -> tuple[float, float]:
    """``(cell_height, cell_width)`` in pixels."""
    height, width = _image_hw(image_size)
    return height / grid[0], width / grid[1]


def _grid_rois(boxes: list[Tensor], image_size: ImageSize, grid: tuple[int, int], device: torch.device) -> Tensor:
    """``[K, 5]`` rows ``(image index, x0, y0, x1, y1)`` in grid-cell units, as roi_align wants."""
    cell_h, cell_w = _cell_size(image_size, grid)
    scale = torch.tensor([cell_w, cell_h, cell_w, cell_h], device=device)
    rows = []
    for index, image_boxes in enumerate(boxes):
        image_index = torch.full((len(image_boxes), 1), float(index), device=device)
        rows.append(torch.cat([image_index, image_boxes.to(device, torch.float32) / scale], dim=1))
    return torch.cat(rows) if rows else torch.zeros(0, 5, device=device)


def _pad_per_image(features: Tensor, counts: list[int], batch: int) -> tuple[Tensor, Tensor]:
    """Scatter ``[K, D]`` features (image by image) into ``[B, max count, D]`` with a mask."""
    most = max(counts, default=0)
    counts_tensor = torch.tensor(counts, device=features.device)
    mask = torch.arange(most, device=features.device) < counts_tensor[:, None]
    padded = features.new_zeros(batch, most, features.shape[-1])
    padded[mask] = features  # boolean indexing walks image by image, box by box
    return padded, mask


def _otsu_threshold(values: Tensor) -> Tensor:
    """The value splitting ``values`` into two classes of maximal between-class variance;
    values strictly above it form the upper class."""
    ordered = values.sort().values
    n = ordered.numel()
    if n < 2:
        return ordered.max()
    lower_count = torch.arange(1, n, dtype=ordered.dtype, device=ordered.device)
    cumulative = ordered.cumsum(0)
    lower_mean = cumulative[:-1] / lower_count
    upper_mean = (cumulative[-1] - cumulative[:-1]) / (n - lower_count)
    between = lower_count * (n - lower_count) * (lower_mean - upper_mean) ** 2
    return ordered[between.argmax()]


def _component_boxes(
    grid: Tensor, cut: Tensor, k: int, min_cells: int, cell: tuple[float, float]
) -> list[tuple[float, float, float, float]]:
    """Pixel boxes of the ``k`` most salient components of ``grid > cut`` with ``min_cells``."""
    scores = grid.tolist()
    components = [c for c in _components((grid > cut).tolist()) if len(c) >= min_cells]
    components.sort(key=lambda cells: -sum(scores[r][c] for r, c in cells))
    return [_bounding_box(cells, cell) for cells in components[:k]]


def _components(mask: list[list[bool]]) -> list[list[tuple[int, int]]]:
    """The 4-connected components of the ``True`` cells of a grid, as lists of ``(row, col)``.

    A plain breadth-first search: the grid has at most a few thousand cells.
    """
    rows, cols = len(mask), len(mask[0])
    seen = [[False] * cols for _ in range(rows)]
    components = []
    for row in range(rows):
        for col in range(cols):
            if mask[row][col] and not seen[row][col]:
                seen[row][col] = True
                components.append(_flood(mask, seen, row, col))
    return components


def _flood(mask: list[list[bool]], seen: list[list[bool]], row: int, col: int) -> list[tuple[int, int]]:
    """The cells reachable from ``(row, col)`` through 4-neighbours set in ``mask``."""
    cells, queue = [], deque([(row, col)])
    while queue:
        r, c = queue.popleft()
        cells.append((r, c))
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < len(mask) and 0 <= nc < len(mask[0]) and mask[nr][nc] and not seen[nr][nc]:
                seen[nr][nc] = True
                queue.append((nr, nc))
    return cells


def _bounding_box(cells: list[tuple[int, int]], cell: tuple[float, float]) -> tuple[float, float, float, float]:
    """Pixel box ``(x0, y0, x1, y1)`` around grid ``cells`` of size ``cell`` = (height, width)."""
    rows = [r for r, _ in cells]
    cols = [c for _, c in cells]
    cell_h, cell_w = cell
    return (min(cols) * cell_w, min(rows) * cell_h, (max(cols) + 1) * cell_w, (max(rows) + 1) * cell_h)
