"""Validation during training: contrastive loss and image↔text recall@1 on held-out pairs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from mmcli.training.losses import contrastive_loss


def caption_groups(tokens: torch.Tensor) -> torch.Tensor:
    """An id per distinct caption: rows of ``tokens`` [N, L] that are equal share an id."""
    _, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    return inverse


def recall_at_1(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_id: torch.Tensor) -> dict[str, float]:
    """Image→text and text→image recall@1 of N matched pairs, duplicates counted as hits.

    Several images may share a caption (``a red circle``); retrieving any pair with the same
    caption is correct, so a hit is judged by ``caption_id`` rather than by row index. The
    chance level returned with it is the mean, over pairs, of the share of rows with that caption.
    """
    sim = image_emb @ text_emb.T
    i2t = caption_id[sim.argmax(dim=1)] == caption_id
    t2i = caption_id[sim.argmax(dim=0)] == caption_id
    counts = torch.bincount(caption_id).float()
    return {
        "image_to_text_R@1": float(i2t.float().mean()),
        "text_to_image_R@1": float(t2i.float().mean()),
        "chance_R@1": float((counts[caption_id] / len(caption_id)).mean()),
    }


def contrastive_validator(loader: Iterable[dict], device: torch.device) -> Callable[[torch.nn.Module], dict[str, Any]]:
    """A function that embeds the validation pairs with a model and scores them."""

    def validate(model: torch.nn.Module) -> dict[str, Any]:
        images, texts, tokens, losses = [], [], [], []
        for batch in loader:
            out = model(batch["images"].to(device), batch["texts"].to(device))
            losses.append(float(contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"])))
            images.append(out["image_features"].float().cpu())
            texts.append(out["text_features"].float().cpu())
            tokens.append(batch["texts"])
        if not images:
            return {}
        scores = recall_at_1(torch.cat(images), torch.cat(texts), caption_groups(torch.cat(tokens)))
        return {
            "val_loss": round(sum(losses) / len(losses), 6),
            **{k: round(v, 4) for k, v in scores.items()},
            "val_pairs": sum(len(t) for t in tokens),
        }

    return validate
