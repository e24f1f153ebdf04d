"""Downstream fusion tasks on a pretrained model: VQA as answer classification, image–text matching.

A fuse model is a :class:`MultimodalModel` whose extra modules are a fusion encoder (the base
run's, or a fresh one) and one task head; :class:`~mmcli.training.tasks.FuseTask` trains it.
"""

from __future__ import annotations

from typing import Any

import torch

from mmcli.errors import MmcliError
from mmcli.models.constants import OPEN_CLIP_PAD_ID
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


REGION_KEYS = ("boxes", "box_mask", "concept_spans", "concept_mask", "concept_grounded")
"""Batch keys passed on to the fusion inputs for strategies that reason over regions and concepts."""


def uses_graph(model: MultimodalModel) -> bool:
    """Whether the model's fusion reasons over regions and concepts (its batches need concept spans)."""
    return model.modules_config.get("fusion", {}).get("strategy") == "graph"


def pair_inputs(model: MultimodalModel, batch: dict) -> dict:
    """The fusion inputs of a batch of examples (regions and concepts included when present)."""
    return model.encode_pair(batch["images"], batch["texts"], **{k: batch[k] for k in REGION_KEYS if k in batch})


def task_outputs(model: MultimodalModel, batch: dict, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, fused)``: the task head's logits [B, classes] and the pooled fused features."""
    fused = model.fusion(pair_inputs(model, batch))
    head = model.vqa_head if task == "vqa" else model.itm_head
    return head(fused), fused


def caption_inputs(model: MultimodalModel, inputs: dict, batch: dict) -> dict:
    """Fusion inputs of the batch's images with their own captions (and the captions' concepts)."""
    captions = batch["captions"]
    own = {
        "text_tokens": model.text_states(captions),
        "text_mask": captions != OPEN_CLIP_PAD_ID,
        "concept_spans": batch["caption_spans"],
        "concept_mask": batch["caption_concept_mask"],
        "concept_grounded": batch["caption_concept_grounded"],
    }
    if model.needs_local_features:
        own["text_embeddings"] = model.token_embeddings(captions)
    return {**inputs, **own}


def caption_graph(model: MultimodalModel, inputs: dict, batch: dict, regions: str | None = None):
    """The graph fusion's reasoning over the batch's images and their own captions' concepts."""
    return model.fusion.reason(caption_inputs(model, inputs, batch), regions)
