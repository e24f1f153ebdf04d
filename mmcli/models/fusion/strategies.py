"""Fusion of text and image features: early, late, hybrid and cross-attention strategies.

Cross-attention is ALBEF's fusion encoder (Li et al., 2021; co-attention as in ViLBERT, Lu et
al. 2019); early fusion is one transformer over both token sequences (single-stream, as
VisualBERT/UNITER); late fusion combines the two pooled CLIP embeddings (gated: a learned
per-feature gate, as in gated multimodal units, Arevalo et al. 2017); hybrid runs early and late
side by side.

Every strategy has one contract: ``forward(inputs: dict[str, Tensor]) -> Tensor[B, out_dim]``,
reading only the keys it needs from

- ``text_tokens``  [B, L, Dt]  per-token text states
- ``text_mask``    [B, L] bool True where the token is real (False = padding)
- ``image_tokens`` [B, N, Di]  patch tokens of the image tower
- ``text_pooled``  [B, Et]     pooled text embedding
- ``image_pooled`` [B, Ei]     pooled image embedding

(``graph``, in :mod:`mmcli.models.fusion.graph`, also reads region boxes and concept spans; the
registry of every strategy is :data:`mmcli.models.fusion.FUSION_STRATEGIES`.)

Strategies that keep a fused text sequence also offer ``forward_tokens(inputs) -> [B, L, dim]``
(for masked language modelling on fused features). Each module has ``out_dim``.
"""

from __future__ import annotations

import torch
from torch import nn

from mmcli.spec.choices import LATE_MODES, POOLS

Inputs = dict[str, torch.Tensor]


def _project(in_dim: int, out_dim: int) -> nn.Module:
    """A linear map to the fusion width, or nothing when the widths already agree."""
    return nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim)


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real (``mask`` True) positions of each sequence: [B, L, D] → [B, D]."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class CrossAttentionLayer(nn.Module):
    """Text self-attention, then text→image cross-attention, then a feed-forward network.

    Each sub-block is pre-LayerNorm with a residual connection. The cross-attention is the
    multi-head attention of the Transformer (Vaswani et al., 2017) as ALBEF and ViLBERT use it for
    fusion: Q from the text tokens, K and V from the image tokens,
    A = softmax(QKᵀ/√d) per head (d = dim / heads), O = AV, the heads concatenated and
    projected by the out-projection. ``nn.MultiheadAttention`` computes exactly that.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_norm = nn.LayerNorm(dim)
        self.image_norm = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.ffn = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(
        self,
        text: torch.Tensor,
        image: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        *,
        need_weights: bool = False,
        average_weights: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fuse ``text`` [B, L, dim] with ``image`` [B, N, dim]; ``text_mask`` [B, L] True = real.

        Returns ``(text, weights)`` like ``nn.MultiheadAttention``: the updated text tokens and,
        with ``need_weights``, the cross-attention weights over the image tokens, [B, L, N]
        averaged over heads or [B, heads, L, N] per head (``average_weights=False``); else None.
        """
        text = text + self.self_attend(text, text_mask)
        attended, weights = self.cross_attend(text, image, need_weights=need_weights, average_weights=average_weights)
        text = text + attended
        return text + self.ffn(self.ffn_norm(text)), weights

    def self_attend(self, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        """Residual branch of the text self-attention; padding keys are ignored."""
        padding = None if text_mask is None else ~text_mask
        normed = self.self_norm(text)
        return self.self_attn(normed, normed, normed, key_padding_mask=padding, need_weights=False)[0]

    def cross_attend(
        self,
        text: torch.Tensor,
        image: torch.Tensor,
        *,
        need_weights: bool = False,
        average_weights: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Residual branch of the cross-attention (Q = text, K = V = image) and its weights."""
        query, image = self.cross_norm(text), self.image_norm(image)
        return self.cross_attn(query, image, image, need_weights=need_weights, average_attn_weights=average_weights)


class CrossAttentionFusion(nn.Module):
    """A stack of :class:`CrossAttentionLayer` in which text tokens read the image tokens.

    Text tokens (``text_dim``) and image tokens (``image_dim``) are projected to ``dim`` when
    their widths differ. The pooled output is the mean over real text tokens (``pool="mean"``)
    or the first (start-of-text) token (``pool="first"``).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        image_dim: int,
        text_dim: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        pool: str = "mean",
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.text_in = _project(text_dim, dim)
        self.image_in = _project(image_dim, dim)
        self.layers = nn.ModuleList(CrossAttentionLayer(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pool = pool
        self.out_dim = dim

    def forward(self, inputs: Inputs) -> torch.Tensor:
        """Pooled fused features [B, dim]."""
        tokens = self.forward_tokens(inputs)
        return tokens[:, 0] if self.pool == "first" else _masked_mean(tokens, inputs["text_mask"])

    def forward_tokens(self, inputs: Inputs) -> torch.Tensor:
        """The fused text sequence [B, L, dim] (padding positions included, not meaningful)."""
        return self._run(inputs, need_weights=False)[0]

    def cross_attention_weights(self, inputs: Inputs, average_weights: bool = True) -> list[torch.Tensor]:
        """Each layer's attention over the image tokens: [B, L, N], or [B, heads, L, N] per head."""
        return self._run(inputs, need_weights=True, average_weights=average_weights)[1]

    def _run(self, inputs: Inputs, **weight_options: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The normalised fused text sequence and each layer's weights (None unless asked)."""
        text, image = self.text_in(inputs["text_tokens"]), self.image_in(inputs["image_tokens"])
        all_weights = []
        for layer in self.layers:
            text, weights = layer(text, image, inputs["text_mask"], **weight_options)
            all_weights.append(weights)
        return self.norm(text), all_weights


class EarlyFusion(nn.Module):
    """One transformer encoder over [fusion token; text tokens; image tokens].

    Both token sequences are projected to ``dim`` and tagged with a learned modality-type
    embedding (text or image) so attention can tell them apart; positions are already encoded
    by the towers that made the tokens. The pooled output is the state
    of a learned fusion token prepended to the sequence (BERT's [CLS] role).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        image_dim: int,
        text_dim: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.text_in = _project(text_dim, dim)
        self.image_in = _project(image_dim, dim)
        self.modality = nn.Embedding(2, dim)  # 0 = text, 1 = image
        self.fusion_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, int(dim * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # Nested tensors are off: they only apply to post-norm layers and would warn about it.
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.out_dim = dim

    def forward(self, inputs: Inputs) -> torch.Tensor:
        """The fusion token's state [B, dim]."""
        return self._encode(inputs)[:, 0]

    def forward_tokens(self, inputs: Inputs) -> torch.Tensor:
        """The fused states at the text positions [B, L, dim]."""
        length = inputs["text_tokens"].shape[1]
        return self._encode(inputs)[:, 1 : 1 + length]

    def _encode(self, inputs: Inputs) -> torch.Tensor:
        """The encoded sequence [B, 1 + L + N, dim]."""
        text = self.text_in(inputs["text_tokens"]) + self.modality.weight[0]
        image = self.image_in(inputs["image_tokens"]) + self.modality.weight[1]
        batch = text.shape[0]
        sequence = torch.cat([self.fusion_token.expand(batch, -1, -1), text, image], dim=1)
        fusion_real = text.new_ones(batch, 1, dtype=torch.bool)
        image_real = text.new_ones(batch, image.shape[1], dtype=torch.bool)
        real = torch.cat([fusion_real, inputs["text_mask"], image_real], dim=1)
        return self.encoder(sequence, src_key_padding_mask=~real)


class LateFusion(nn.Module):
    """Combine the two pooled embeddings after each is projected to ``dim``.

    ``mode``: ``concat`` (a linear map of [t; v]), ``sum`` (t + v), ``product`` (t ⊙ v) or
    ``gated`` (g ⊙ t + (1 − g) ⊙ v with g = sigmoid(W[t; v] + b), one gate per feature).
    """

    def __init__(self, dim: int, text_pooled_dim: int, image_pooled_dim: int, mode: str = "concat"):
        super().__init__()
        if mode not in LATE_MODES:
            choices = ", ".join(LATE_MODES)
            raise ValueError(f"late fusion mode must be one of {choices}; got {mode!r}")
        self.text_proj = nn.Linear(text_pooled_dim, dim)
        self.image_proj = nn.Linear(image_pooled_dim, dim)
        self.mix = nn.Linear(2 * dim, dim) if mode in ("concat", "gated") else None
        self.mode = mode
        self.out_dim = dim

    def forward(self, inputs: Inputs) -> torch.Tensor:
        """Fused pooled features [B, dim]."""
        text, image = self.text_proj(inputs["text_pooled"]), self.image_proj(inputs["image_pooled"])
        if self.mode == "sum":
            return text + image
        if self.mode == "product":
            return text * image
        mixed = self.mix(torch.cat([text, image], dim=-1))
        if self.mode == "concat":
            return mixed
        gate = torch.sigmoid(mixed)
        return gate * text + (1 - gate) * image


class HybridFusion(nn.Module):
    """Early and late fusion side by side, their outputs concatenated and projected to ``dim``.

    ``late_mode`` is the :class:`LateFusion` mode of the late branch.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        image_dim: int,
        text_dim: int,
        text_pooled_dim: int,
        image_pooled_dim: int,
        late_mode: str = "gated",
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.early = EarlyFusion(dim, depth, heads, image_dim, text_dim, mlp_ratio, dropout)
        self.late = LateFusion(dim, text_pooled_dim, image_pooled_dim, late_mode)
        self.combine = nn.Linear(2 * dim, dim)
        self.out_dim = dim

    def forward(self, inputs: Inputs) -> torch.Tensor:
        """Fused features [B, dim]."""
        return self.combine(torch.cat([self.early(inputs), self.late(inputs)], dim=-1))

    def forward_tokens(self, inputs: Inputs) -> torch.Tensor:
        """The early branch's fused text sequence [B, L, dim]."""
        return self.early.forward_tokens(inputs)
