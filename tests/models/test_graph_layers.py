"""Tests for mmcli.models.graph.layers: GCN/GAT layers, the bipartite graph and iterative reasoning."""

import math

import pytest
import torch

from mmcli.models.graph.layers import (
    GATLayer,
    GCNLayer,
    GraphOutput,
    RegionConceptGraph,
    alignment_feature_dim,
    alignment_features,
    bipartite_adjacency,
)

# A weighted path 0 –(1)– 1 –(2)– 2, and node features chosen so products are easy by hand.
PATH = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 2.0], [0.0, 2.0, 0.0]]])
FEATURES = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])


def _identity_gcn() -> GCNLayer:
    layer = GCNLayer(2, 2, bias=False, activation=None)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.eye(2))
    return layer


def _gat(att: torch.Tensor, **kwargs) -> GATLayer:
    layer = GATLayer(2, 2, heads=1, bias=False, **kwargs)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.eye(2))
        layer.att.copy_(att)
    return layer


def test_gcn_matches_hand_computed_normalised_propagation():
    # Ã = A + I has degrees 2, 4, 3, so Â_ij = Ã_ij / sqrt(d_i d_j).
    a01, a12 = 1 / math.sqrt(2 * 4), 2 / math.sqrt(4 * 3)
    expected = torch.tensor(
        [
            [1 / 2, a01],  # ½·h0 + a01·h1
            [a01 + a12, 1 / 4 + a12],  # a01·h0 + ¼·h1 + a12·h2
            [1 / 3, a12 + 1 / 3],  # a12·h1 + ⅓·h2
        ]
    )
    out = _identity_gcn()(FEATURES, PATH)
    torch.testing.assert_close(out[0], expected)


def test_gcn_rejects_negative_weights():
    with pytest.raises(ValueError, match="non-negative"):
        _identity_gcn()(FEATURES, -PATH)


def test_gat_with_zero_attention_vector_averages_neighbours_uniformly():
    out, attention = _gat(torch.zeros(1, 4))(FEATURES, PATH)
    third = 1 / 3
    expected_attention = torch.tensor([[0.5, 0.5, 0.0], [third, third, third], [0.0, 0.5, 0.5]])
    torch.testing.assert_close(attention[0, 0], expected_attention)
    torch.testing.assert_close(out[0], torch.tensor([[0.5, 0.5], [2 / 3, 2 / 3], [0.5, 1.0]]))


def test_gat_attention_on_two_nodes_is_the_hand_computed_softmax():
    # a = [a_receiver | a_neighbour] = [1, -3 | 0, 2]; h0 = (1, 0), h1 = (0, 1).
    # Node 0: receiver score 1; neighbours 0 and 1 score 0 and 2 -> logits 1 and 3.
    # Node 1: receiver score -3; logits LeakyReLU(-3) = -0.6 and LeakyReLU(-1) = -0.2.
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    adj = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    _, attention = _gat(torch.tensor([[1.0, -3.0, 0.0, 2.0]]))(x, adj)
    e2 = math.exp(2)
    node1 = math.exp(-0.6) / (math.exp(-0.6) + math.exp(-0.2))
    expected = torch.tensor([[1 / (1 + e2), e2 / (1 + e2)], [node1, 1 - node1]])
    torch.testing.assert_close(attention[0, 0], expected)


def test_gat_edge_weights_multiply_attention():
    # Uniform logits, so the attention is the weights of Ã = A + I renormalised per row.
    _, attention = _gat(torch.zeros(1, 4), use_edge_weights=True)(FEATURES, PATH)
    expected = torch.tensor([[1 / 2, 1 / 2, 0.0], [1 / 4, 1 / 4, 2 / 4], [0.0, 2 / 3, 1 / 3]])
    torch.testing.assert_close(attention[0, 0], expected)


@pytest.mark.parametrize("make", [lambda: GCNLayer(4, 3), lambda: GATLayer(4, 3, heads=2)])
def test_padding_nodes_neither_send_nor_receive(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(1, 3, 4)
    adj = torch.rand(1, 3, 3)
    adj = adj + adj.transpose(1, 2)
    padded_x = torch.cat([x, 100 * torch.randn(1, 2, 4)], dim=1)
    padded_adj = torch.rand(1, 5, 5) * 5  # padding nodes wired to everything
    padded_adj[:, :3, :3] = adj
    mask = torch.tensor([[True, True, True, False, False]])
    plain, padded = layer(x, adj), layer(padded_x, padded_adj, mask)
    plain, padded = (plain[0], padded[0]) if isinstance(plain, tuple) else (plain, padded)
    torch.testing.assert_close(padded[:, :3], plain)
    assert torch.all(padded[:, 3:] == 0)


def test_bipartite_adjacency_weights_and_top_k_union():
    regions = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    concepts = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]]])
    adj, sim = bipartite_adjacency(regions, concepts, top_k=1, temperature=0.5)
    torch.testing.assert_close(sim[0], torch.tensor([[1.0, 0.6, 0.8], [0.0, 0.8, 0.6]]))
    # Region 0 -> concept 0, region 1 -> concept 1, and concept 2's nearest region is 0.
    w = lambda cos: math.exp((cos - 1) / 0.5)  # noqa: E731
    cross = torch.tensor([[w(1.0), 0.0, w(0.8)], [0.0, w(0.8), 0.0]])
    torch.testing.assert_close(adj[0, :2, 2:], cross)
    torch.testing.assert_close(adj[0, 2:, :2], cross.T)
    assert torch.all(adj[0, :2, :2] == 0) and torch.all(adj[0, 2:, 2:] == 0)


def test_bipartite_adjacency_never_links_padding():
    regions, concepts = torch.randn(1, 3, 4), torch.randn(1, 2, 4)
    region_mask = torch.tensor([[True, True, False]])
    adj, sim = bipartite_adjacency(regions, concepts, region_mask, top_k=5)
    assert torch.all(adj[0, 2] == 0) and torch.all(adj[0, :, 2] == 0) and torch.all(sim[0, 2] == 0)
    assert torch.all(adj[0, :2, 3:] > 0)  # k beyond the real nodes keeps every real edge


def _inputs(regions=3, concepts=4, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    region_feats = torch.randn(1, regions, dim, generator=generator)
    return region_feats, torch.randn(1, concepts, dim, generator=generator)


@pytest.mark.parametrize("layer", ["gcn", "gat"])
def test_permuting_nodes_permutes_the_outputs(layer):
    torch.manual_seed(0)
    graph = RegionConceptGraph(8, layer, heads=2, max_iters=3, tol=0.0, top_k=2)
    regions, concepts = _inputs()
    region_order, concept_order = torch.tensor([2, 0, 1]), torch.tensor([3, 1, 0, 2])
    out = graph(regions, concepts)
    shuffled = graph(regions[:, region_order], concepts[:, concept_order])
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # noqa: E731
    close(shuffled.region_states, out.region_states[:, region_order])
    close(shuffled.concept_states, out.concept_states[:, concept_order])
    close(shuffled.alignment, out.alignment[:, region_order][:, :, concept_order])


@pytest.mark.parametrize("layer", ["gcn", "gat"])
def test_padding_does_not_change_the_real_graph(layer):
    torch.manual_seed(0)
    graph = RegionConceptGraph(8, layer, heads=2, max_iters=3, tol=0.0)
    regions, concepts = _inputs(2, 3)
    padded_regions = torch.cat([regions, torch.randn(1, 2, 8)], dim=1)
    padded_concepts = torch.cat([concepts, torch.randn(1, 1, 8)], dim=1)
    region_mask = torch.tensor([[True, True, False, False]])
    concept_mask = torch.tensor([[True, True, True, False]])
    out = graph(regions, concepts)
    padded = graph(padded_regions, padded_concepts, region_mask, concept_mask)
    torch.testing.assert_close(padded.region_states[:, :2], out.region_states, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.concept_states[:, :3], out.concept_states, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.alignment[:, :2, :3], out.alignment, atol=1e-5, rtol=0)
    assert torch.all(padded.alignment[:, 2:] == 0) and torch.all(padded.alignment[:, :, 3:] == 0)


def test_alignment_is_the_softmax_of_final_state_similarities():
    graph = RegionConceptGraph(8, "gcn", max_iters=2, temperature=0.2)
    out = graph(*_inputs())
    regions = torch.nn.functional.normalize(out.region_states, dim=-1)
    concepts = torch.nn.functional.normalize(out.concept_states, dim=-1)
    expected = (regions @ concepts.transpose(1, 2) / 0.2).softmax(dim=-1)
    torch.testing.assert_close(out.alignment, expected)
    torch.testing.assert_close(out.alignment.sum(-1), torch.ones(1, 3))


def test_relations_pass_messages_but_are_no_regions_alignment():
    torch.manual_seed(0)
    graph = RegionConceptGraph(8, "gat", heads=2, max_iters=2, temperature=0.2)
    regions, concepts = _inputs()
    grounded = torch.tensor([[True, False, True, True]])  # concept 1 is a relation
    out = graph(regions, concepts, concept_grounded=grounded)
    plain = graph(regions, concepts)
    # Same message passing: the relation still sends and receives along its edges ...
    torch.testing.assert_close(out.region_states, plain.region_states)
    # ... but the alignment is the softmax over the grounded concepts only.
    r = torch.nn.functional.normalize(out.region_states, dim=-1)
    c = torch.nn.functional.normalize(out.concept_states[:, [0, 2, 3]], dim=-1)
    expected = (r @ c.transpose(1, 2) / 0.2).softmax(dim=-1)
    assert torch.all(out.alignment[:, :, 1] == 0)
    torch.testing.assert_close(out.alignment[:, :, [0, 2, 3]], expected)
    assert out.grounded_mask.tolist() == grounded.tolist()


@pytest.mark.parametrize("layer", ["gcn", "gat"])
def test_iteration_stops_once_states_stop_changing(layer):
    graph = RegionConceptGraph(8, layer, heads=2, max_iters=5, tol=1e-4)
    with torch.no_grad():
        for parameter in graph.layers.parameters():
            parameter.zero_()  # the layers output zero: only LayerNorm acts, on normalised input
    regions, concepts = (torch.nn.functional.layer_norm(x, (8,)) for x in _inputs())
    out = graph(regions, concepts)
    assert (out.iterations, out.converged) == (1, True)
    graph.tol = 0.0
    out = graph(regions, concepts)
    assert (out.iterations, out.converged) == (5, False)


def test_alignment_features_hand_computed():
    out = GraphOutput(
        region_states=torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]]),
        concept_states=torch.tensor([[[2.0, 0.0], [0.0, 2.0]]]),
        alignment=torch.tensor([[[0.75, 0.25], [0.5, 0.5], [0.0, 0.0]]]),
        iterations=1,
        converged=True,
        region_mask=torch.tensor([[True, True, False]]),
        concept_mask=torch.tensor([[True, True]]),
        grounded_mask=torch.tensor([[True, True]]),
    )
    # Region groundings 0.75, 0.5; concept groundings max(0.75, 0.5), max(0.25, 0.5).
    regions = [0.75 / 1.25, 0.5 / 1.25]
    concepts = [2 * 0.75 / 1.25, 2 * 0.5 / 1.25]
    expected = torch.tensor([[*regions, *concepts, 0.625, 0.625, 0.5]])
    features = alignment_features(out)
    torch.testing.assert_close(features, expected)
    assert features.shape[1] == alignment_feature_dim(2)


def test_alignment_features_ignore_concepts_that_are_not_grounded():
    # The hand case above with a third concept, a relation: no region's alignment names it, and
    # it must not become the weakest concept (its grounding would be 0).
    out = GraphOutput(
        region_states=torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]),
        concept_states=torch.tensor([[[2.0, 0.0], [0.0, 2.0], [7.0, 7.0]]]),
        alignment=torch.tensor([[[0.75, 0.25, 0.0], [0.5, 0.5, 0.0]]]),
        iterations=1,
        converged=True,
        region_mask=torch.tensor([[True, True]]),
        concept_mask=torch.tensor([[True, True, True]]),
        grounded_mask=torch.tensor([[True, True, False]]),
    )
    expected = torch.tensor([[0.75 / 1.25, 0.5 / 1.25, 2 * 0.75 / 1.25, 2 * 0.5 / 1.25, 0.625, 0.625, 0.5]])
    torch.testing.assert_close(alignment_features(out), expected)


def test_alignment_features_of_an_empty_side_are_zero():
    graph = RegionConceptGraph(4, "gcn", max_iters=1)
    out = graph(torch.randn(2, 3, 4), torch.zeros(2, 0, 4))
    torch.testing.assert_close(alignment_features(out), torch.zeros(2, graph.feature_dim))


def _edge_index(adj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    index = adj.nonzero().T
    return index, adj[index[0], index[1]]


def test_gcn_matches_torch_geometric():
    geometric = pytest.importorskip("torch_geometric.nn")
    torch.manual_seed(0)
    x, adj = torch.randn(5, 4), torch.rand(5, 5) * (torch.rand(5, 5) > 0.4)
    adj = (adj + adj.T).fill_diagonal_(0)
    reference = geometric.GCNConv(4, 3)
    ours = GCNLayer(4, 3, activation=None)
    with torch.no_grad():
        ours.linear.weight.copy_(reference.lin.weight)
        ours.bias.copy_(reference.bias)
    index, weight = _edge_index(adj)
    expected = reference(x, index, weight)
    torch.testing.assert_close(ours(x[None], adj[None])[0], expected, atol=1e-5, rtol=1e-4)


def test_gat_matches_torch_geometric():
    geometric = pytest.importorskip("torch_geometric.nn")
    torch.manual_seed(0)
    x, adj = torch.randn(5, 4), (torch.rand(5, 5) > 0.5).float()
    adj = ((adj + adj.T) > 0).float().fill_diagonal_(0)
    reference = geometric.GATConv(4, 3, heads=2)
    ours = GATLayer(4, 3, heads=2)
    linear = getattr(reference, "lin", None) or reference.lin_src
    with torch.no_grad():
        ours.linear.weight.copy_(linear.weight)
        ours.att.copy_(torch.cat([reference.att_dst[0], reference.att_src[0]], dim=-1))
        ours.bias.copy_(reference.bias)
    index, _ = _edge_index(adj)
    expected, (loop_index, alpha) = reference(x, index, return_attention_weights=True)
    out, attention = ours(x[None], adj[None])
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-4)
    # torch_geometric sends along edge (source, target); our row is the receiver.
    ours_alpha = attention[0][:, loop_index[1], loop_index[0]].T
    torch.testing.assert_close(ours_alpha, alpha, atol=1e-5, rtol=1e-4)
