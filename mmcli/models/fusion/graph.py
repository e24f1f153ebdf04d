"""Graph fusion: region–concept reasoning (``mmcli.models.graph.layers``) as a fusion strategy.

``GraphFusion`` follows the fusion contract (``forward(inputs) -> [B, dim]``) and reads, besides
the usual keys (see ``mmcli.models.fusion.strategies``):

- ``image_patches`` [B, N, Di]       the image tower's patch embeddings (with ``local_features``)
- ``text_embeddings`` [B, L, Dt]     the text tower's token embeddings (with ``local_features``)
- ``boxes``         [B, R, 4] float  region boxes in pixels of the model's input image
- ``box_mask``      [B, R] bool      True for a real box
- ``concept_spans`` [B, C, 2] long   token positions ``(start, end)`` of the text's key concepts
- ``concept_mask``  [B, C] bool      True for a real concept
- ``concept_grounded`` [B, C] bool    optional: True for a concept one region can show (not a
  relation); relations pass messages but take no part in the alignment or its loss

Regions come from the given boxes, or are found from the patch tokens (``salient_regions``, a
fixed grid as the fallback); a region's feature is its ROI-pooled patch tokens (and, with
``local_features``, its ROI-pooled patch embeddings: two levels, as detectors pool several
levels of a feature pyramid) plus an embedding of its box. A concept's feature is the mean of
the text tower's token states over its span (with ``local_features``, plus the mean of its
token embeddings: after attention "red circle" in a caption also carries the caption's other
objects). The graph's alignment features are concatenated to the pooled embeddings
(``strategy: graph``) or to another strategy's fused features (``inner``) and projected to
``dim``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmcli.models.graph.layers import GraphOutput, RegionConceptGraph, alignment_feature_dim, alignment_features
from mmcli.models.graph.regions import BoxEmbedding, grid_regions, roi_features, salient_regions

Inputs = dict[str, Tensor]
GRAPH_OPTIONS = ("layer", "max_iters", "tol", "depth_per_iter", "heads", "top_k", "temperature")
"""Keys of a graph config that go to :class:`~mmcli.models.graph.layers.RegionConceptGraph`."""


class GraphFusion(nn.Module):
    """Region–concept graph reasoning whose alignment features join the other fused features.

    ``graph`` holds the :class:`~mmcli.spec.GraphSpec` fields; ``inner`` is another fusion
    strategy's module, built by the caller (``None``: the pooled text and image embeddings stand
    in for it). ``image_size`` is the model's input size, in which ``boxes`` are expressed.
    """

    def __init__(
        self,
        dim: int,
        image_dim: int,
        text_dim: int,
        text_pooled_dim: int,
        image_pooled_dim: int,
        image_size: int | list[int],
        graph: dict[str, Any],
        inner: nn.Module | None = None,
    ):
        super().__init__()

        self.settings = dict(graph)
        self.image_size = image_size if isinstance(image_size, int) else tuple(image_size)
        self.region_in = nn.Linear(image_dim, dim)
        local = bool(graph.get("local_features"))  # absent in runs saved before the option existed
        # Patch embeddings are raw convolution outputs: normalise them before the projection.
        self.local_in = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, dim)) if local else None
        self.box_embedding = BoxEmbedding(dim)
        self.concept_in = nn.Linear(text_dim, dim)
        self.concept_local_in = nn.Linear(text_dim, dim) if local else None
        self.reasoner = RegionConceptGraph(dim, **{k: graph[k] for k in GRAPH_OPTIONS if k in graph})
        self.inner = inner
        base_dim = self.inner.out_dim if self.inner is not None else text_pooled_dim + image_pooled_dim
        self.combine = nn.Sequential(nn.Linear(base_dim + alignment_feature_dim(dim), dim), nn.LayerNorm(dim))
        self.out_dim = dim

    @property
    def align_weight(self) -> float:
        """Weight of the weakly supervised alignment loss (0 when off)."""
        return float(self.settings.get("align_weight", 0.0))

    @property
    def align_temperature(self) -> float:
        """Temperature of the alignment loss."""
        return float(self.settings.get("align_temperature", 0.1))

    def forward(self, inputs: Inputs) -> Tensor:
        """Fused features [B, dim]: the other features and the graph's alignment features."""
        base = (
            self.inner(inputs)
            if self.inner is not None
            else torch.cat([inputs["text_pooled"], inputs["image_pooled"]], dim=-1)
        )
        return self.combine(torch.cat([base, alignment_features(self.reason(inputs))], dim=-1))

    def forward_tokens(self, inputs: Inputs) -> Tensor:
        """The inner strategy's fused text sequence [B, L, dim] (graph reasoning keeps none)."""
        if self.inner is None or not hasattr(self.inner, "forward_tokens"):
            raise ValueError("graph fusion without a token-level inner strategy keeps no token sequence")
        return self.inner.forward_tokens(inputs)

    def reason(self, inputs: Inputs, regions: str | None = None) -> GraphOutput:
        """Run the graph on the inputs' regions and concepts (``regions`` overrides the mode)."""
        region_feats, region_mask, concept_feats, concept_mask = self.nodes(inputs, regions)
        grounded = inputs.get("concept_grounded")
        return self.reasoner(region_feats, concept_feats, region_mask, concept_mask, grounded)

    def nodes(self, inputs: Inputs, regions: str | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The graph's initial nodes: region features [B, R, dim] and mask, concept features
        [B, C, dim] and mask."""
        boxes, box_mask = self.region_boxes(inputs, regions)
        per_image = [b[m] for b, m in zip(boxes, box_mask)]
        pooled, _ = roi_features(inputs["image_tokens"], per_image, self.image_size)
        region_feats = self.region_in(pooled) + self.box_embedding(boxes.to(pooled.dtype), self.image_size)
        if self.local_in is not None:
            patches, _ = roi_features(inputs["image_patches"], per_image, self.image_size)
            region_feats = region_feats + self.local_in(patches)
        spans, concept_mask = inputs["concept_spans"], inputs["concept_mask"]
        concepts, concept_mask = span_means(inputs["text_tokens"], spans, concept_mask)
        concept_feats = self.concept_in(concepts)
        if self.concept_local_in is not None:
            words, _ = span_means(inputs["text_embeddings"], spans, concept_mask)
            concept_feats = concept_feats + self.concept_local_in(words)
        return region_feats * box_mask.unsqueeze(-1), box_mask, concept_feats, concept_mask

    def region_boxes(self, inputs: Inputs, regions: str | None = None) -> tuple[Tensor, Tensor]:
        """The regions reasoned over: boxes [B, R, 4] (pixels, zero-padded) and their mask [B, R]."""
        mode = regions or self.settings.get("regions", "given")
        tokens = inputs["image_tokens"]
        if mode == "grid":
            per_image = [grid_regions(self.settings.get("grid", 2), self.image_size)] * len(tokens)
        elif mode == "given" and "boxes" in inputs and bool(inputs["box_mask"].any(dim=1).all()):
            per_image = [b[m] for b, m in zip(inputs["boxes"], inputs["box_mask"])]
        else:  # some image (or all) has no boxes: find regions for those
            found = self._automatic(tokens.detach())
            given = inputs.get("boxes") if mode == "given" else None
            per_image = (
                found
                if given is None
                else [b[m] if bool(m.any()) else f for b, m, f in zip(given, inputs["box_mask"], found)]
            )
        return pad_boxes([b.to(tokens.device, torch.float32) for b in per_image])

    def _automatic(self, tokens: Tensor) -> list[Tensor]:
        """Salient regions per image; the fixed grid where nothing stands out (salient_regions
        then returns the whole image, which says nothing about where things are)."""
        found = salient_regions(tokens, self.settings.get("max_regions", 4), image_size=self.image_size)
        grid = grid_regions(self.settings.get("grid", 2), self.image_size).to(tokens.device)
        height, width = (self.image_size, self.image_size) if isinstance(self.image_size, int) else self.image_size
        whole = torch.tensor([[0.0, 0.0, float(width), float(height)]], device=tokens.device)
        return [grid if len(b) == 1 and torch.equal(b, whole) else b for b in found]


def span_means(states: Tensor, spans: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean token state over each span: ``[B, C, D]`` from states ``[B, L, D]`` and spans
    ``[B, C, 2]`` (end exclusive); the mask drops padding and spans that are empty or lie past
    the text (a truncated concept)."""
    positions = torch.arange(states.shape[1], device=states.device)
    inside = (positions >= spans[..., :1]) & (positions < spans[..., 1:]) & mask.unsqueeze(-1)  # [B, C, L]
    counts = inside.sum(dim=-1)
    means = inside.to(states.dtype) @ states / counts.clamp_min(1).unsqueeze(-1).to(states.dtype)
    return means, counts > 0


def pad_boxes(boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``[B, R, 4]`` zero-padded boxes and their ``[B, R]`` mask from per-image ``[R_b, 4]``."""
    most = max((len(b) for b in boxes), default=0)
    device = boxes[0].device if boxes else torch.device("cpu")
    padded = torch.zeros(len(boxes), most, 4, device=device)
    mask = torch.zeros(len(boxes), most, dtype=torch.bool, device=device)
    for row, b in enumerate(boxes):
        padded[row, : len(b)], mask[row, : len(b)] = b, True
    return padded, mask
