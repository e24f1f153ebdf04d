"""Visual–linguistic relationship inference on a bipartite graph of regions and concepts.

Image regions and text concepts are the two sides of a graph whose edges start from their
cosine similarity (``bipartite_adjacency``). ``RegionConceptGraph`` then alternates message
passing (GCN, Kipf & Welling 2017, or GAT, Veličković et al. 2018) with re-weighting the edges
from the new node states, until the states stop changing or an iteration budget runs out; the
final edge weights are the region–concept alignment, and ``alignment_features`` summarises it
for a prediction head.

Graphs are batched as dense tensors: node features ``[B, V, D]``, a weighted adjacency
``[B, V, V]`` and a node mask ``[B, V]`` (``False`` for padding). The layers are written in plain
torch rather than taken from torch_geometric: on graphs of a few dozen nodes they are a couple of
matrix products, and the dense form batches padding naturally without a heavy dependency.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Activation = Callable[[Tensor], Tensor] | None


def normalized_adjacency(adj: Tensor, node_mask: Tensor) -> Tensor:
    """``D̃^{-1/2} Ã D̃^{-1/2}`` with ``Ã = A + I`` over the real nodes; padding rows and
    columns are zero, so padding nodes neither send nor receive messages."""
    real = node_mask.to(adj.dtype)
    with_loops = adj * real.unsqueeze(-1) * real.unsqueeze(-2) + torch.diag_embed(real)
    degree = with_loops.sum(dim=-1)
    scale = torch.where(degree > 0, degree.clamp_min(1e-12).rsqrt(), torch.zeros_like(degree))
    return scale.unsqueeze(-1) * with_loops * scale.unsqueeze(-2)


class GCNLayer(nn.Module):
    """Graph convolution (Kipf & Welling): ``H' = σ(D̃^{-1/2} Ã D̃^{-1/2} H W + b)`` on a
    weighted adjacency with non-negative weights and self-loops ``Ã = A + I``."""

    def __init__(self, in_dim: int, out_dim: int, *, bias: bool = True, activation: Activation = F.relu) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_dim)) if bias else None
        self.activation = activation

    def forward(self, x: Tensor, adj: Tensor, node_mask: Tensor | None = None) -> Tensor:
        """New node states ``[B, V, out_dim]`` (zeros on padding nodes)."""
        node_mask = _full_mask(x) if node_mask is None else node_mask
        if bool((adj < 0).any()):
            raise ValueError("GCN edge weights must be non-negative")
        out = normalized_adjacency(adj, node_mask) @ self.linear(x)
        return _finish(out, self.bias, self.activation, node_mask)


class GATLayer(nn.Module):
    """Graph attention (Veličković et al.): for a receiving node ``i`` and a neighbour ``j``,
    ``e_ij = LeakyReLU(aᵀ[W h_i ‖ W h_j])``, softmax over ``j`` among the edges
    (``adj > 0``) and a self-loop, ``h'_i = Σ_j α_ij W h_j`` per head; heads are concatenated or
    averaged.

    With ``use_edge_weights`` the attention is also multiplied by the edge weight of ``Ã = A + I``
    and renormalised over the neighbours (done as ``softmax(e_ij + log w_ij)``), so that edge
    weights re-estimated between iterations steer the messages, not only the edge set.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        heads: int = 1,
        *,
        concat: bool = True,
        negative_slope: float = 0.2,
        use_edge_weights: bool = False,
        bias: bool = True,
        activation: Activation = None,
    ) -> None:
        super().__init__()
        self.heads, self.out_dim, self.concat = heads, out_dim, concat
        self.negative_slope = negative_slope
        self.use_edge_weights = use_edge_weights
        self.activation = activation
        self.linear = nn.Linear(in_dim, heads * out_dim, bias=False)
        # Per head, the first half scores the receiving node, the second half the neighbour.
        self.att = nn.Parameter(torch.empty(heads, 2 * out_dim))
        nn.init.xavier_uniform_(self.att)
        self.bias = nn.Parameter(torch.zeros(heads * out_dim if concat else out_dim)) if bias else None

    def forward(self, x: Tensor, adj: Tensor, node_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """New node states ``[B, V, heads·out_dim]`` (concat) or ``[B, V, out_dim]`` (mean), and
        the attention ``[B, heads, V, V]`` (row ``i``: how node ``i`` weighs its neighbours)."""
        batch, count, _ = x.shape
        node_mask = _full_mask(x) if node_mask is None else node_mask
        h = self.linear(x).view(batch, count, self.heads, self.out_dim).transpose(1, 2)  # [B,H,V,C]
        receiver = (h * self.att[None, :, None, : self.out_dim]).sum(-1)
        sender = (h * self.att[None, :, None, self.out_dim :]).sum(-1)
        logits = F.leaky_relu(receiver.unsqueeze(-1) + sender.unsqueeze(-2), self.negative_slope)
        attention = self._attention(logits, adj, node_mask)
        out = attention @ h
        out = out.transpose(1, 2).reshape(batch, count, -1) if self.concat else out.mean(dim=1)
        return _finish(out, self.bias, self.activation, node_mask), attention

    def _attention(self, logits: Tensor, adj: Tensor, node_mask: Tensor) -> Tensor:
        """Softmax of ``logits`` over each node's edges; zero rows for padding nodes."""
        weights = adj + torch.eye(adj.shape[-1], dtype=adj.dtype, device=adj.device)
        pair = node_mask.unsqueeze(-1) & node_mask.unsqueeze(-2)
        # Every node keeps its self-loop so that no softmax row is empty (padding included).
        edges = ((weights > 0) & pair) | torch.eye(adj.shape[-1], dtype=torch.bool, device=adj.device)
        if self.use_edge_weights:
            # log of 1 off the edges keeps the gradient finite where the weight is 0.
            logits = logits + torch.where(edges, weights, torch.ones_like(weights)).log().unsqueeze(1)
        attention = logits.masked_fill(~edges.unsqueeze(1), float("-inf")).softmax(dim=-1)
        return attention * node_mask[:, None, :, None].to(attention.dtype)


def bipartite_adjacency(
    region_feats: Tensor,
    concept_feats: Tensor,
    region_mask: Tensor | None = None,
    concept_mask: Tensor | None = None,
    *,
    top_k: int | None = None,
    temperature: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """The initial region–concept graph: adjacency ``[B, R+C, R+C]`` (regions first) and the
    cosine similarity ``[B, R, C]`` (zero where either node is padding).

    An edge joins a region and a concept only (none inside a side); its weight is
    ``exp((cos − 1) / temperature)`` in ``(0, 1]``: one symmetric weight per edge, 1 for
    identical directions, and normalising a region's weights over its concepts gives exactly the
    softmax of ``cos / temperature``. With ``top_k`` an edge is kept when the concept is among
    the region's ``top_k`` most similar concepts or the region among the concept's ``top_k``
    most similar regions; otherwise the graph is complete between the sides.
    """
    region_mask = _full_mask(region_feats) if region_mask is None else region_mask
    concept_mask = _full_mask(concept_feats) if concept_mask is None else concept_mask
    pair = region_mask.unsqueeze(-1) & concept_mask.unsqueeze(-2)
    sim = _cosine(region_feats, concept_feats) * pair
    keep = pair if top_k is None else _top_k_union(sim, pair, top_k)
    return _bipartite(_edge_weights(sim, keep, temperature)), sim


@dataclass
class GraphOutput:
    """What ``RegionConceptGraph`` infers for a batch of graphs.

    ``alignment[b, i, j]`` is the final weight of the edge region ``i`` – concept ``j``
    normalised over the grounded concepts of row ``i`` (zero for padding, missing edges and
    concepts no single region can show, such as relations: they pass messages but are not a
    region's alignment). ``grounded_mask`` marks the real, grounded concepts.
    ``iterations`` counts the message-passing rounds run; ``converged`` says whether every graph
    met the tolerance before the budget ran out.
    """

    region_states: Tensor  # [B, R, D]
    concept_states: Tensor  # [B, C, D]
    alignment: Tensor  # [B, R, C]
    iterations: int
    converged: bool
    region_mask: Tensor  # [B, R]
    concept_mask: Tensor  # [B, C]
    grounded_mask: Tensor  # [B, C]


class RegionConceptGraph(nn.Module):
    """Iterative reasoning over the region–concept graph.

    Each iteration runs ``depth_per_iter`` GNN layers (weights shared across iterations; each
    layer is residual and followed by LayerNorm), then re-weights the edges from the new states
    with the rule of ``bipartite_adjacency`` restricted to the initial edges. It stops when
    ``‖H_t − H_{t−1}‖ / ‖H_{t−1}‖ < tol`` for every graph of the batch, or after ``max_iters``.
    Region and concept features must already live in one ``dim``-wide space (e.g. CLIP's).
    """

    def __init__(
        self,
        dim: int,
        layer: Literal["gcn", "gat"] = "gcn",
        *,
        depth_per_iter: int = 1,
        max_iters: int = 5,
        tol: float = 1e-3,
        heads: int = 4,
        top_k: int | None = None,
        temperature: float = 0.1,
    ) -> None:
        super().__init__()
        if layer not in ("gcn", "gat"):
            raise ValueError(f"layer must be 'gcn' or 'gat', got {layer!r}")
        if layer == "gat" and dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if max_iters < 1 or depth_per_iter < 1:
            raise ValueError("max_iters and depth_per_iter must be at least 1")
        self.dim, self.max_iters, self.tol = dim, max_iters, tol
        self.top_k, self.temperature = top_k, temperature
        self.layers = nn.ModuleList(_make_layer(layer, dim, heads) for _ in range(depth_per_iter))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth_per_iter))

    @property
    def feature_dim(self) -> int:
        """Width of ``alignment_features`` for this graph's outputs."""
        return alignment_feature_dim(self.dim)

    def forward(
        self,
        region_feats: Tensor,
        concept_feats: Tensor,
        region_mask: Tensor | None = None,
        concept_mask: Tensor | None = None,
        concept_grounded: Tensor | None = None,
    ) -> GraphOutput:
        """Reason over regions ``[B, R, dim]`` and concepts ``[B, C, dim]`` (masks ``[B, R]``,
        ``[B, C]``, ``True`` for real nodes). ``concept_grounded`` ``[B, C]`` marks the concepts
        a single region can show (default: all); the others take part in message passing only."""
        region_mask = _full_mask(region_feats) if region_mask is None else region_mask
        concept_mask = _full_mask(concept_feats) if concept_mask is None else concept_mask
        grounded = concept_mask if concept_grounded is None else concept_mask & concept_grounded
        regions = region_feats.shape[1]
        adj, _ = bipartite_adjacency(
            region_feats,
            concept_feats,
            region_mask,
            concept_mask,
            top_k=self.top_k,
            temperature=self.temperature,
        )
        node_mask = torch.cat([region_mask, concept_mask], dim=1)
        states = torch.cat([region_feats, concept_feats], dim=1) * node_mask.unsqueeze(-1)
        states, cross, iterations, converged = self._iterate(states, adj, node_mask, regions)
        return GraphOutput(
            region_states=states[:, :regions],
            concept_states=states[:, regions:],
            alignment=_normalise_rows(cross * grounded.unsqueeze(1)),
            iterations=iterations,
            converged=converged,
            region_mask=region_mask,
            concept_mask=concept_mask,
            grounded_mask=grounded,
        )

    def _iterate(
        self, states: Tensor, adj: Tensor, node_mask: Tensor, regions: int
    ) -> tuple[Tensor, Tensor, int, bool]:
        """Alternate message passing and edge re-weighting until the states settle; returns the
        states, the final region–concept weights, the rounds run and whether they converged."""
        keep = adj[:, :regions, regions:] > 0  # the edge set stays fixed; only weights move
        for iteration in range(1, self.max_iters + 1):
            updated = self._step(states, adj, node_mask)
            change = _relative_change(updated, states)
            states = updated
            sim = _cosine(states[:, :regions], states[:, regions:])
            cross = _edge_weights(sim, keep, self.temperature)
            adj = _bipartite(cross)
            if bool((change < self.tol).all()):
                return states, cross, iteration, True
        return states, cross, self.max_iters, False

    def _step(self, states: Tensor, adj: Tensor, node_mask: Tensor) -> Tensor:
        """One iteration of message passing: residual GNN layers with LayerNorm."""
        for layer, norm in zip(self.layers, self.norms):
            out = layer(states, adj, node_mask)
            out = out[0] if isinstance(out, tuple) else out
            states = norm(states + out) * node_mask.unsqueeze(-1)
        return states


def alignment_feature_dim(dim: int) -> int:
    """Width of ``alignment_features`` for node states of width ``dim``."""
    return 2 * dim + 3


def alignment_features(out: GraphOutput) -> Tensor:
    """A fixed-size summary ``[B, 2·D + 3]`` of a ``GraphOutput``, to concatenate to the
    pooled image and text features before a prediction head.

    Layout: ``[regions (D), concepts (D), region_grounding, concept_grounding, weakest_concept]``.
    A region's grounding is its largest alignment weight (how decisively it picks a concept); a
    concept's is the largest weight any region gives it. ``regions``/``concepts`` are the states
    averaged with those groundings as weights; the three scalars are the mean region grounding,
    the mean concept grounding and the smallest concept grounding (a caption naming something
    the image lacks has a poorly grounded concept). Padding nodes and concepts that are not
    grounded (relations) are ignored in the concept statistics; an empty side gives zeros.
    """
    region_grounding = _grounding(out.alignment, dim=2) * out.region_mask
    concept_grounding = _grounding(out.alignment, dim=1) * out.grounded_mask
    stats = [
        _masked_mean(region_grounding, out.region_mask),
        _masked_mean(concept_grounding, out.grounded_mask),
        _masked_min(concept_grounding, out.grounded_mask),
    ]
    pooled = [
        _weighted_mean(out.region_states, region_grounding),
        _weighted_mean(out.concept_states, concept_grounding),
    ]
    return torch.cat([*pooled, torch.stack(stats, dim=-1)], dim=-1)


def _make_layer(layer: str, dim: int, heads: int) -> nn.Module:
    """A ``dim → dim`` GCN layer, or a GAT layer whose concatenated heads add up to ``dim``."""
    if layer == "gcn":
        return GCNLayer(dim, dim)
    return GATLayer(dim, dim // heads, heads, concat=True, use_edge_weights=True, activation=F.elu)


def _full_mask(x: Tensor) -> Tensor:
    """An all-real node mask ``[B, V]`` for features ``[B, V, D]``."""
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


def _finish(out: Tensor, bias: Tensor | None, activation: Activation, node_mask: Tensor) -> Tensor:
    """Add the bias, apply the activation, zero the padding nodes."""
    out = out + bias if bias is not None else out
    out = activation(out) if activation is not None else out
    return out * node_mask.unsqueeze(-1).to(out.dtype)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise cosine similarity ``[B, R, C]`` of ``[B, R, D]`` and ``[B, C, D]``."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)


def _edge_weights(sim: Tensor, keep: Tensor, temperature: float) -> Tensor:
    """``exp((sim − 1) / temperature)`` on the kept edges, zero elsewhere.

    Kept edges are floored at the smallest positive float: at a low temperature the weight can
    underflow, and ``adj > 0`` must keep meaning "is an edge".
    """
    weights = torch.exp((sim - 1) / temperature).clamp_min(torch.finfo(sim.dtype).tiny)
    return weights * keep.to(sim.dtype)


def _top_k_union(sim: Tensor, pair: Tensor, k: int) -> Tensor:
    """Edges to each region's ``k`` nearest concepts or each concept's ``k`` nearest regions."""
    scores = sim.masked_fill(~pair, float("-inf"))
    keep = torch.zeros_like(pair)
    for dim in (2, 1):
        if scores.shape[dim] == 0:
            continue
        nearest = scores.topk(min(k, scores.shape[dim]), dim=dim).indices
        keep = keep | torch.zeros_like(pair).scatter(dim, nearest, True)
    return keep & pair  # k may exceed the real nodes of a side; padding never becomes an edge


def _bipartite(cross: Tensor) -> Tensor:
    """Symmetric ``[B, R+C, R+C]`` adjacency from region–concept weights ``[B, R, C]``."""
    batch, regions, concepts = cross.shape
    top = torch.cat([cross.new_zeros(batch, regions, regions), cross], dim=2)
    bottom = torch.cat([cross.transpose(1, 2), cross.new_zeros(batch, concepts, concepts)], dim=2)
    return torch.cat([top, bottom], dim=1)


@torch.no_grad()
def _relative_change(new: Tensor, old: Tensor) -> Tensor:
    """``‖new − old‖ / ‖old‖`` per graph ``[B]`` (padding states are zero in both)."""
    return (new - old).flatten(1).norm(dim=1) / old.flatten(1).norm(dim=1).clamp_min(1e-12)


def _normalise_rows(cross: Tensor) -> Tensor:
    """Region–concept weights divided by their row sums (all-zero rows stay zero)."""
    return cross / cross.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(cross.dtype).tiny)


def _grounding(alignment: Tensor, dim: int) -> Tensor:
    """Largest alignment weight along ``dim``; a zero is appended first (weights are
    non-negative), so that an empty side gives zeros instead of an error."""
    return F.pad(alignment, (0, 1) if dim == 2 else (0, 0, 0, 1)).amax(dim=dim)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` ``[B, N]`` over ``mask``; zero for an empty mask."""
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)


def _masked_min(values: Tensor, mask: Tensor) -> Tensor:
    """Minimum of ``values`` ``[B, N]`` over ``mask``; zero for an empty mask."""
    smallest = F.pad(values.masked_fill(~mask, float("inf")), (0, 1), value=float("inf")).amin(dim=1)
    return smallest.nan_to_num(posinf=0.0)


def _weighted_mean(states: Tensor, weights: Tensor) -> Tensor:
    """``Σ w_i s_i / Σ w_i`` over nodes, ``[B, D]``; zero when all weights are zero."""
    total = weights.sum(dim=1, keepdim=True)
    total = torch.where(total > 0, total, torch.ones_like(total))
    return (weights.unsqueeze(-1) * states).sum(dim=1) / total
