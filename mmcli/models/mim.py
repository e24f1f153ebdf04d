"""Masked image modelling: blank a share of an image's patches and predict their features.

The patches are blanked in pixel space (set to 0, the mean of the normalised input) and the
masked image goes through the image tower again, so no token the fusion encoder reads has seen
the hidden pixels; the targets are the clean image's patch tokens, detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def random_patch_mask(batch: int, patches: int, ratio: float, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [B, N]: exactly ``round(ratio · N)`` (at least 1) random patches per image are True."""
    count = min(patches, max(1, round(ratio * patches)))
    scores = torch.rand(batch, patches, generator=generator, device=generator.device if generator else device)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < count).to(device)


def blank_patches(images: torch.Tensor, mask: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """``images`` [B, C, H, W] with the pixels of the masked patches (``mask`` [B, N], row-major
    over the patch grid) set to 0."""
    batch, _, height, width = images.shape
    rows, cols = height // patch_size[0], width // patch_size[1]
    grid = mask.reshape(batch, 1, rows, cols).to(images.dtype)
    pixels = grid.repeat_interleave(patch_size[0], dim=2).repeat_interleave(patch_size[1], dim=3)
    return images * (1 - pixels)


class MIMHead(nn.Module):
    """Predicts a masked patch's feature: its (masked-image) token reads the fused text tokens
    by cross-attention, then an MLP maps it to the image tower's token width."""

    def __init__(self, image_dim: int, dim: int, heads: int):
        super().__init__()
        self.query_in = nn.Linear(image_dim, dim)
        self.query_norm = nn.LayerNorm(dim)
        self.attend = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, image_dim))

    def forward(self, patch_tokens: torch.Tensor, fused_text: torch.Tensor, text_mask: torch.Tensor,
                patch_mask: torch.Tensor) -> torch.Tensor:
        """Predictions [M, image_dim] for the M True positions of ``patch_mask`` [B, N], row-major."""
        query = self.query_norm(self.query_in(patch_tokens))
        read = self.attend(query, fused_text, fused_text, key_padding_mask=~text_mask, need_weights=False)[0]
        return self.out(query + read)[patch_mask]


def mim_loss(predicted: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """``cosine``: mean of 1 − cos; ``mse``: mean squared error of the layer-normalised features
    (normalising keeps the target's scale from deciding the loss's)."""
    predicted, target = predicted.float(), target.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(predicted, target, dim=-1)).mean()
    if kind == "mse":
        dim = target.shape[-1]
        return F.mse_loss(F.layer_norm(predicted, (dim,)), F.layer_norm(target, (dim,)))
    raise ValueError(f"unknown MIM loss {kind!r}")
