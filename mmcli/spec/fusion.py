"""The fusion encoder section and its region–concept graph (``mmcli pretrain`` and ``mmcli fuse``)."""

from __future__ import annotations

from pydantic import Field

from mmcli.spec.base import Section
from mmcli.spec.choices import (
    FUSION_STRATEGIES,
    GRAPH_LAYERS,
    LATE_MODES,
    POOLS,
    REGION_SOURCES,
    TOKENLESS_STRATEGIES,
    literal,
)


class GraphSpec(Section):
    """Region–concept graph reasoning (``mmcli.models.fusion.graph``): image regions and the
    text's key concepts are the two sides of a bipartite graph, a GCN or GAT reasons over it, and
    the region–concept alignment it infers is summarised and concatenated to the other features
    before the prediction head."""

    layer: literal(GRAPH_LAYERS) = "gat"
    """The graph layer: ``gcn`` (graph convolution on the weighted adjacency) or ``gat`` (graph
    attention, steered by the edge weights)."""

    max_iters: int = Field(4, ge=1)
    """At most this many rounds of message passing and edge re-weighting."""

    tol: float = Field(1e-3, ge=0)
    """Stop earlier once the node states change by less than this (relative norm) in a round,
    for every graph of the batch; the rounds run are reported by ``mmcli eval``'s ``alignment``."""

    depth_per_iter: int = Field(1, ge=1)
    """Graph layers per round (their weights are shared across rounds)."""

    heads: int = Field(4, ge=1)
    """GAT heads; the graph width must be divisible by it."""

    top_k: int | None = Field(None, ge=1)
    """Initial edges: ``null`` joins every region to every concept (dense); ``k`` keeps an edge
    when the concept is among the region's ``k`` most similar or the region among the concept's."""

    temperature: float = Field(0.1, gt=0)
    """Edge weight ``exp((cos − 1) / temperature)``: lower is sharper."""

    regions: literal(REGION_SOURCES) = "given"
    """``given``: the boxes that come with the data (the shapes dataset's objects, or
    ``data.boxes``), salient regions for an image without boxes; ``salient``: always found from
    the image's own patch tokens (a fixed grid when nothing stands out); ``grid``: a fixed grid."""

    max_regions: int = Field(4, ge=1)
    """At most this many salient regions per image."""

    grid: int = Field(2, ge=1)
    """The fixed grid is ``grid × grid`` cells."""

    local_features: bool = True
    """Also pool the towers' input embeddings, next to their final states: the image tower's patch
    embeddings inside each box, the text tower's token embeddings over each concept's span. After
    attention every state carries some of its whole image or text (a small object's tokens hold
    its neighbours' colours; "red circle" in a caption holds the caption's other objects); an
    input embedding depends on its own patch or token only. Needs a ViT image tower."""

    align_weight: float = Field(2.0, ge=0)
    """Weight of the weakly supervised alignment loss in ``mmcli fuse``: each region should match
    some concept of its own image's caption better than any concept of the other captions of the
    batch, and each concept some region of its own image better than any region of the other
    images (a symmetric multiple-instance contrastive loss; relation concepts take no part).
    Only caption text is used, never box labels; 0 turns it off."""

    align_temperature: float = Field(0.1, gt=0)
    """Temperature of the alignment loss's softmaxes over the batch's captions and images."""


class FusionSpec(Section):
    """The fusion encoder that joins text and image features (used by ``mmlm``, ``itm``, ``mim``
    and by ``mmcli fuse``)."""

    strategy: literal(FUSION_STRATEGIES) = "cross_attention"
    """``cross_attention``: text tokens attend to the image's patch tokens (Q = text, K = V =
    image), layer after layer; ``early``: one transformer over text and patch tokens together;
    ``late``: a combination of the two pooled embeddings; ``hybrid``: early and late side by side;
    ``graph``: region–concept graph reasoning (``graph``) over the pooled embeddings alone.
    ``late`` and ``graph`` keep no token sequence, so they cannot serve ``mmlm`` or ``mim``."""

    graph: GraphSpec | None = None
    """Region–concept graph reasoning. With ``strategy: graph`` its alignment features join the
    pooled embeddings (default settings when omitted); with another strategy they are
    concatenated to that strategy's fused features (e.g. ``cross_attention`` + ``graph``)."""

    dim: int | None = Field(None, gt=0)
    """Width of the fused features; default: the text tower's width."""

    depth: int = Field(2, ge=1)
    """Number of fusion layers (not used by ``late``)."""

    heads: int = Field(4, ge=1)
    """Attention heads per fusion layer; ``dim`` must be divisible by it (not used by ``late``)."""

    mlp_ratio: float = Field(4.0, gt=0)
    """Hidden width of each layer's feed-forward network, as a multiple of ``dim``."""

    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout inside the fusion layers."""

    late_mode: literal(LATE_MODES) = "gated"
    """How ``late`` (and the late branch of ``hybrid``) combines the pooled embeddings: a linear
    map of their concatenation, their sum, their product, or a learned per-feature gate."""

    pool: literal(POOLS) = "mean"
    """``cross_attention`` only: the pooled output is the mean of the real text tokens or the
    first (start-of-text) token."""

    def has_tokens(self) -> bool:
        """Whether the strategy keeps a fused token sequence (needed by ``mmlm`` and ``mim``)."""
        return self.strategy not in TOKENLESS_STRATEGIES

    def graph_spec(self) -> GraphSpec | None:
        """The graph settings in use: ``graph``, or the defaults for ``strategy: graph``."""
        return self.graph if self.graph is not None or self.strategy != "graph" else GraphSpec()
