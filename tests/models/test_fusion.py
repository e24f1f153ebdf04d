"""Fusion strategies: cross-attention maths, padding, shapes, gating, use of the image."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmcli.models.fusion import FUSION_STRATEGIES, build_fusion
from mmcli.models.fusion.strategies import CrossAttentionFusion, CrossAttentionLayer, LateFusion
from mmcli.spec import FusionSpec, choices

B, L, N, DT, DI, ET, EI, DIM, HEADS = 3, 5, 4, 12, 10, 6, 7, 16, 2
OPTIONS = {
    "early": dict(dim=DIM, depth=2, heads=HEADS, image_dim=DI, text_dim=DT),
    "late": dict(dim=DIM, text_pooled_dim=ET, image_pooled_dim=EI, mode="concat"),
    "hybrid": dict(dim=DIM, depth=2, heads=HEADS, image_dim=DI, text_dim=DT, text_pooled_dim=ET, image_pooled_dim=EI),
    "cross_attention": dict(dim=DIM, depth=2, heads=HEADS, image_dim=DI, text_dim=DT),
}
TOKEN_STRATEGIES = ("early", "hybrid", "cross_attention")


def make_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 1])
    return {
        "text_tokens": torch.randn(B, L, DT, generator=g),
        "text_mask": torch.arange(L) < lengths[:, None],
        "image_tokens": torch.randn(B, N, DI, generator=g),
        "text_pooled": torch.randn(B, ET, generator=g),
        "image_pooled": torch.randn(B, EI, generator=g),
    }


def build(strategy: str) -> nn.Module:
    torch.manual_seed(0)
    return build_fusion(strategy, **OPTIONS[strategy]).eval()


def hand_cross_attention(layer: CrossAttentionLayer, text, image):
    """Scaled dot-product attention (Vaswani et al., 2017) per head: A = softmax(QKᵀ/√d), O = AV;
    heads concatenated, projected."""
    attn = layer.cross_attn
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    q = layer.cross_norm(text) @ w_q.T + b_q
    k = layer.image_norm(image) @ w_k.T + b_k
    v = layer.image_norm(image) @ w_v.T + b_v
    d = DIM // HEADS
    outputs, weights = [], []
    for h in range(HEADS):
        part = slice(h * d, (h + 1) * d)
        a = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(d), dim=-1)
        outputs.append(a @ v[..., part])
        weights.append(a)
    out = torch.cat(outputs, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias
    return out, torch.stack(weights, dim=1)


def test_cross_attention_is_the_source_formula_and_multihead_attention():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(DIM, HEADS).eval()
    text, image = torch.randn(B, L, DIM), torch.randn(B, N, DIM)
    with torch.no_grad():
        out, per_head = layer.cross_attend(text, image, need_weights=True, average_weights=False)
        expected, expected_weights = hand_cross_attention(layer, text, image)
        reference = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        reference.load_state_dict(layer.cross_attn.state_dict())
        kv = layer.image_norm(image)
        by_reference = reference(layer.cross_norm(text), kv, kv, need_weights=False)[0]
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out, by_reference, atol=1e-6)
    assert torch.allclose(per_head, expected_weights, atol=1e-6)
    assert per_head.shape == (B, HEADS, L, N)
    assert torch.allclose(per_head.sum(dim=-1), torch.ones(B, HEADS, L), atol=1e-6)


def test_layer_returns_head_averaged_weights_over_image_tokens():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(DIM, HEADS).eval()
    text, image = torch.randn(B, L, DIM), torch.randn(B, N, DIM)
    with torch.no_grad():
        _, averaged = layer(text, image, need_weights=True)
        _, per_head = layer(text, image, need_weights=True, average_weights=False)
        _, none = layer(text, image)
    assert averaged.shape == (B, L, N) and none is None
    assert torch.allclose(averaged, per_head.mean(dim=1), atol=1e-6)
    assert torch.allclose(averaged.sum(dim=-1), torch.ones(B, L), atol=1e-6)


def test_fusion_exposes_each_layers_weights():
    fusion = build("cross_attention")
    with torch.no_grad():
        weights = fusion.cross_attention_weights(make_inputs())
    assert len(weights) == 2 and all(w.shape == (B, L, N) for w in weights)


@pytest.mark.parametrize("strategy", sorted(OPTIONS))
def test_every_strategy_returns_batch_by_dim(strategy):
    fusion = build(strategy)
    with torch.no_grad():
        out = fusion(make_inputs())
    assert out.shape == (B, DIM) and fusion.out_dim == DIM
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("strategy", TOKEN_STRATEGIES)
def test_token_strategies_return_the_fused_text_sequence(strategy):
    with torch.no_grad():
        assert build(strategy).forward_tokens(make_inputs()).shape == (B, L, DIM)


@pytest.mark.parametrize("strategy", TOKEN_STRATEGIES)
def test_padding_text_tokens_do_not_affect_real_tokens(strategy):
    fusion, inputs = build(strategy), make_inputs()
    noisy = dict(inputs)
    noisy["text_tokens"] = torch.where(inputs["text_mask"][..., None], inputs["text_tokens"], 100.0)
    real = inputs["text_mask"]
    with torch.no_grad():
        clean_tokens, noisy_tokens = fusion.forward_tokens(inputs), fusion.forward_tokens(noisy)
        assert torch.allclose(clean_tokens[real], noisy_tokens[real], atol=1e-5)
        assert torch.allclose(fusion(inputs), fusion(noisy), atol=1e-5)
        # The caption with 3 real tokens gives the same states with its padding cut off.
        trimmed = {key: value[1:2] for key, value in inputs.items()}
        for key in ("text_tokens", "text_mask"):
            trimmed[key] = trimmed[key][:, :3]
        assert torch.allclose(fusion.forward_tokens(trimmed)[0], clean_tokens[1, :3], atol=1e-5)


@pytest.mark.parametrize("strategy", sorted(OPTIONS))
def test_fused_output_depends_on_the_image(strategy):
    fusion, inputs = build(strategy), make_inputs()
    other = dict(inputs)
    other["image_tokens"] = inputs["image_tokens"].roll(1, dims=0)
    other["image_pooled"] = inputs["image_pooled"].roll(1, dims=0)
    with torch.no_grad():
        change = (fusion(inputs) - fusion(other)).abs().amax(dim=-1)
    assert (change > 1e-3).all()


def test_cross_attention_pooling_is_the_mean_of_real_tokens_or_the_first():
    inputs = make_inputs()
    with torch.no_grad():
        mean_fusion = build("cross_attention")
        tokens = mean_fusion.forward_tokens(inputs)
        lengths = inputs["text_mask"].sum(dim=1).tolist()
        expected = torch.stack([tokens[i, :n].mean(dim=0) for i, n in enumerate(lengths)])
        assert torch.allclose(mean_fusion(inputs), expected, atol=1e-6)
        torch.manual_seed(0)
        first_fusion = CrossAttentionFusion(pool="first", **OPTIONS["cross_attention"]).eval()
        assert torch.allclose(first_fusion(inputs), first_fusion.forward_tokens(inputs)[:, 0])


@pytest.mark.parametrize("bias, side", [(100.0, "text"), (-100.0, "image")])
def test_gated_late_fusion_with_a_saturated_gate_returns_one_projection(bias, side):
    torch.manual_seed(0)
    fusion, inputs = LateFusion(DIM, ET, EI, mode="gated"), make_inputs()
    with torch.no_grad():
        fusion.mix.weight.zero_()
        fusion.mix.bias.fill_(bias)  # sigmoid(±100) is 1 or 0 in float32
        projection = (
            fusion.text_proj(inputs["text_pooled"]) if side == "text" else fusion.image_proj(inputs["image_pooled"])
        )
        assert torch.allclose(fusion(inputs), projection, atol=1e-6)


@pytest.mark.parametrize("mode", ["sum", "product", "concat"])
def test_late_fusion_modes_combine_the_projections(mode):
    torch.manual_seed(0)
    fusion, inputs = LateFusion(DIM, ET, EI, mode=mode), make_inputs()
    with torch.no_grad():
        t, v = fusion.text_proj(inputs["text_pooled"]), fusion.image_proj(inputs["image_pooled"])
        expected = {
            "sum": lambda: t + v,
            "product": lambda: t * v,
            "concat": lambda: torch.cat([t, v], -1) @ fusion.mix.weight.T + fusion.mix.bias,
        }[mode]()
        assert torch.allclose(fusion(inputs), expected, atol=1e-6)


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="early, late, hybrid, cross_attention"):
        build_fusion("middle", dim=DIM)
    with pytest.raises(ValueError, match="concat, sum, product, gated"):
        LateFusion(DIM, ET, EI, mode="max")


def test_the_registry_implements_exactly_the_strategies_the_spec_offers():
    offered = FusionSpec.model_fields["strategy"].annotation.__args__
    assert tuple(FUSION_STRATEGIES) == choices.FUSION_STRATEGIES == offered
    assert set(OPTIONS) | {"graph"} == set(FUSION_STRATEGIES)
