"""Prediction heads on top of text or fused features: MLM (BERT, Devlin et al. 2019, with the
decoder tied to the token embedding), image–text matching (ALBEF, Li et al. 2021), answer classes
(VQA as classification over the training answers, Antol et al. 2015) and the masked-image
feature predictor (as BEiT/MaskFeat predict features of masked patches)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmcli.data.masking import IGNORE_INDEX


class MaskedLogits(NamedTuple):
    """Vocabulary logits at the labelled positions only, and the ids to predict there."""

    logits: torch.Tensor
    """[M, V], one row per position whose label is not ``IGNORE_INDEX``, in row-major order."""
    targets: torch.Tensor
    """[M], the original token ids at those positions."""


class MLMHead(nn.Module):
    """BERT's MLM head: Linear + GELU + LayerNorm, then a vocabulary decoder with its own bias.

    With ``tied_embedding`` the decoder's weight *is* that embedding's weight: a separate
    V×width matrix (49k rows for open_clip) would double the text tower's parameters, and tying
    is standard BERT practice that also helps when data are small. The embedding is held by
    reference, not registered here, so it is saved and optimised once, with the text tower it
    belongs to; keep the head next to that tower (same device) and tie it after
    :func:`mmcli.models.text.add_mask_token`, which replaces the embedding.
    """

    def __init__(self, width: int, vocab_size: int, tied_embedding: nn.Embedding | None = None):
        super().__init__()
        if tied_embedding is not None:
            _check_tied_shape(tied_embedding, width, vocab_size)
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        # A tuple keeps nn.Module from registering the embedding as a submodule of this head.
        self._tied = (tied_embedding,) if tied_embedding is not None else None
        own = None if tied_embedding is not None else nn.Parameter(torch.empty(vocab_size, width))
        self.register_parameter("weight", own)
        if own is not None:
            nn.init.normal_(own, std=0.02)  # BERT's initialiser range, as open_clip uses for embeddings

    @property
    def decoder_weight(self) -> torch.Tensor:
        """The [V, width] decoder matrix (the tied embedding's weight when tied)."""
        return self._tied[0].weight if self._tied is not None else self.weight

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> MaskedLogits:
        """Logits for ``hidden`` [B, L, width] at the positions where ``labels`` [B, L] is set.

        Only those M positions are decoded, so memory is M×V instead of B×L×V; the loss is
        ``F.cross_entropy(out.logits, out.targets)``.
        """
        picked = labels != IGNORE_INDEX
        states = self.transform(hidden[picked])
        return MaskedLogits(F.linear(states, self.decoder_weight, self.bias), labels[picked])


def _check_tied_shape(embedding: nn.Embedding, width: int, vocab_size: int) -> None:
    """Raise if the embedding cannot serve as a [vocab_size, width] decoder."""
    if embedding.weight.shape != (vocab_size, width):
        raise ValueError(
            f"tied embedding is {tuple(embedding.weight.shape)}, the MLM head needs "
            f"({vocab_size}, {width}) (vocab_size, width)"
        )


class ITMHead(nn.Module):
    """Image–text matching: two logits (index 0 = not matching, 1 = matching) from a fused vector."""

    def __init__(self, dim: int):
        super().__init__()
        self.classify = nn.Linear(dim, 2)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        """[B, dim] → [B, 2] logits."""
        return self.classify(fused)


class ClassifierHead(nn.Module):
    """Answer classification (VQA as a choice among ``n_classes`` answers): an MLP on a fused vector.

    Linear → GELU → LayerNorm → dropout → Linear, the two-layer classifier of ViLBERT/LXMERT.
    """

    def __init__(self, dim: int, n_classes: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.classify = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.LayerNorm(hidden),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        """[B, dim] → [B, n_classes] logits."""
        return self.classify(fused)


class MIMHead(nn.Module):
    """Predicts a masked patch's feature: its (masked-image) token reads the fused text tokens
    by cross-attention, then an MLP maps it to the image tower's token width."""

    def __init__(self, image_dim: int, dim: int, heads: int):
        super().__init__()
        self.query_in = nn.Linear(image_dim, dim)
        self.query_norm = nn.LayerNorm(dim)
        self.attend = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, image_dim))

    def forward(
        self, patch_tokens: torch.Tensor, fused_text: torch.Tensor, text_mask: torch.Tensor, patch_mask: torch.Tensor
    ) -> torch.Tensor:
        """Predictions [M, image_dim] for the M True positions of ``patch_mask`` [B, N], row-major."""
        query = self.query_norm(self.query_in(patch_tokens))
        read = self.attend(query, fused_text, fused_text, key_padding_mask=~text_mask, need_weights=False)[0]
        return self.out(query + read)[patch_mask]
