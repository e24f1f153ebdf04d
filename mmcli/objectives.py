"""Training objectives: each turns the model's outputs (and the batch) into one loss tensor.

An objective is a plain function ``(model, outputs, batch, spec, world) -> Tensor`` registered in
``OBJECTIVES`` under the name used in the spec's ``objectives:`` section; ``Pretrainer`` runs the
enabled ones and the loop sums them with their weights. New objectives plug in here without
touching the loop.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmcli.distributed import World, gather_no_grad, gather_with_grad

MAX_LOGIT_SCALE = math.log(100.0)
"""The learnable temperature's logit scale is clamped at 100 (as in CLIP)."""


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of N matched pairs (CLIP).

    With S_ij = scale · cos(v_i, t_j), the loss is
    ``½ [ -1/N Σ_i log softmax_j(S)_ii  +  -1/N Σ_i log softmax_j(Sᵀ)_ii ]``: the source document's
    text→image term plus its image→text mirror. ``logit_scale`` is the multiplier 1/τ (already
    exponentiated); features are expected L2-normalised.
    """
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clip_objective(model: nn.Module, outputs: dict, batch: dict, spec: Any, world: World) -> torch.Tensor:
    """InfoNCE with negatives from every rank (gathered with gradients unless disabled)."""
    gather = gather_with_grad if spec.gather_with_grad else gather_no_grad
    image = gather(outputs["image_features"], world)
    text = gather(outputs["text_features"], world)
    if not spec.gather_with_grad and world.distributed:
        # Keep this rank's own slice differentiable, as open_clip does without gather-with-grad.
        n, r = outputs["image_features"].shape[0], world.rank
        image = torch.cat([image[: r * n], outputs["image_features"], image[(r + 1) * n :]])
        text = torch.cat([text[: r * n], outputs["text_features"], text[(r + 1) * n :]])
    return contrastive_loss(image, text, outputs["logit_scale"])


Objective = Callable[[nn.Module, dict, dict, Any, World], torch.Tensor]
OBJECTIVES: dict[str, Objective] = {"clip": clip_objective}


class Pretrainer(nn.Module):
    """The model plus its enabled objectives; ``forward(batch)`` returns the named losses.

    Wrapping this one module in DDP keeps every objective's computation inside DDP's forward.
    """

    def __init__(self, model: nn.Module, objectives: dict[str, Any], world: World):
        super().__init__()
        unknown = set(objectives) - set(OBJECTIVES)
        if unknown:
            raise ValueError(f"no implementation for objectives {sorted(unknown)}")
        self.model = model
        self.specs = dict(objectives)
        self.world = world

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        outputs = self.model(batch["images"], batch["texts"])
        return {name: OBJECTIVES[name](self.model, outputs, batch, spec, self.world) for name, spec in self.specs.items()}
