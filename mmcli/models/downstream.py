"""Downstream fusion tasks on a pretrained model: VQA as answer classification, image–text matching.

A fuse model is a :class:`MultimodalModel` whose extra modules are a fusion encoder (the base
run's, or a fresh one) and one task head; ``FuseTask`` wraps it for the training loop.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcli.errors import MmcliError
from mmcli.models.multimodal import MultimodalModel, fusion_config

ITM_LABELS = ["no", "yes"]
"""ITM classes in the order of :class:`~mmcli.models.heads.ITMHead`'s logits (1 = matching)."""


def task_labels(model: MultimodalModel, task: str) -> list[str]:
    """The class names of the model's ``task`` head."""
    return model.modules_config["vqa_head"]["answers"] if task == "vqa" else ITM_LABELS


def fuse_modules(base: MultimodalModel, base_ref: str, spec, answers: list[str]) -> dict[str, Any]:
    """The modules config of a fuse run on ``base``: its [MASK] token if any, the base's fusion
    encoder (``spec.fusion`` omitted) or a fresh one, and the task's head."""
    modules: dict[str, Any] = {}
    if "mask_token" in base.modules_config:
        modules["mask_token"] = base.modules_config["mask_token"]
    if spec.fusion is not None:
        modules["fusion"] = fusion_config(spec.fusion, base.clip)
    elif "fusion" in base.modules_config:
        modules["fusion"] = base.modules_config["fusion"]
    else:
        raise MmcliError(f"fusion: the base run {base_ref} has no fusion encoder; give a fusion section")
    dim = modules["fusion"]["dim"]
    if spec.task == "vqa":
        modules["vqa_head"] = {"dim": dim, "answers": answers, "hidden": spec.head_hidden, "dropout": spec.head_dropout}
    else:
        modules["itm_head"] = {"dim": dim}
    return modules


def reused_modules(base: MultimodalModel, spec) -> list[str]:
    """The base modules a fuse run keeps, weights included: its fusion encoder when ``spec.fusion``
    is omitted, and then for ITM its ITM head too (trained on that encoder's features)."""
    if spec.fusion is not None:
        return []
    return ["fusion"] + (["itm_head"] if spec.task == "itm" and hasattr(base, "itm_head") else [])


def build_fuse_model(base: MultimodalModel, modules: dict[str, Any], reuse: list[str]) -> MultimodalModel:
    """A model on ``base``'s dual encoder with ``modules``, copying the weights of ``reuse``."""
    model = MultimodalModel(base.clip, modules)
    for name in reuse:
        getattr(model, name).load_state_dict(getattr(base, name).state_dict())
    return model


def task_outputs(model: MultimodalModel, batch: dict, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, fused)``: the task head's logits [B, classes] and the pooled fused features."""
    inputs = model.encode_pair(batch["images"], batch["texts"], batch.get("boxes"), batch.get("box_mask"))
    fused = model.fusion(inputs)
    head = model.vqa_head if task == "vqa" else model.itm_head
    return head(fused), fused


class FuseTask(nn.Module):
    """The training loop's view of a fuse run: ``forward(batch)`` returns ``{task: loss}``.

    ``frozen`` stops gradients into the dual encoder; the fusion encoder and head always train.
    """

    def __init__(self, model: MultimodalModel, task: str, frozen: bool):
        super().__init__()
        self.model, self.task = model, task
        if frozen:
            model.clip.requires_grad_(False)
        self.find_unused = False

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Cross-entropy of the task head on the batch's labels."""
        logits, _ = task_outputs(self.model, batch, self.task)
        return {self.task: F.cross_entropy(logits.float(), batch["labels"])}
