"""The multimodal model: an open_clip dual encoder plus the optional modules later stages add."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmcli.objectives import MAX_LOGIT_SCALE


class MultimodalModel(nn.Module):
    """An open_clip ``CLIP`` (``self.clip``) whose forward returns a dict of outputs.

    Like open_clip's own models the output is a dict, so objectives take what they need by name.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    @classmethod
    def from_modules(cls, clip: nn.Module, modules: dict) -> "MultimodalModel":
        """Rebuild a model with the extra modules a run folder's ``mmcli.json`` lists."""
        if modules:
            raise ValueError(f"unknown extra modules {sorted(modules)}")
        return cls(clip)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pooled image embeddings [B, D]."""
        return self.clip.encode_image(images, normalize=normalize)

    def encode_text(self, texts: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pooled text embeddings [B, D]."""
        return self.clip.encode_text(texts, normalize=normalize)

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        """``image_features`` and ``text_features`` (L2-normalised) and ``logit_scale`` (1/τ, ≤ 100)."""
        return {
            "image_features": F.normalize(self.clip.encode_image(images), dim=-1),
            "text_features": F.normalize(self.clip.encode_text(texts), dim=-1),
            "logit_scale": self.clip.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp(),
        }

    def extra_modules(self) -> dict[str, nn.Module]:
        """Modules beyond the dual encoder (saved to ``mmcli_model.safetensors``)."""
        return {name: m for name, m in self.named_children() if name != "clip"}
