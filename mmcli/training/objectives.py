"""Pretraining objectives: each turns the model's outputs (and the batch) into one loss tensor.

An objective is a plain function ``(model, outputs, batch, spec, world) -> Tensor`` registered in
``OBJECTIVES`` under the name used in the spec's ``objectives:`` section (the spec offers exactly
these names); :class:`~mmcli.training.tasks.Pretrainer` runs the enabled ones and the loop sums
them with their weights. The losses themselves are in :mod:`mmcli.training.losses`. The
objectives: CLIP's contrastive loss, BERT's MLM on the text tower, ALBEF's image-conditioned MLM
and image–text matching with hard negatives, and masked image modelling through the fusion
encoder, and CoCa's captioning loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcli.data.masking import IGNORE_INDEX, blank_patches, mask_tokens, random_patch_mask
from mmcli.distributed import World, gather_no_grad, gather_with_grad
from mmcli.models.captioning import caption_loss
from mmcli.models.constants import SPECIAL_IDS
from mmcli.spec import choices
from mmcli.training.losses import contrastive_loss, masked_lm_loss, mim_loss


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


def mask_text(model: nn.Module, texts: torch.Tensor, prob: float, generator: torch.Generator | None = None):
    """``(inputs, labels)`` of :func:`mmcli.data.masking.mask_tokens` with the model's [MASK] id;
    random replacements come from the tokenizer's vocabulary (never [MASK] or a special id)."""
    return mask_tokens(
        texts,
        mask_id=model.mask_token_id,
        vocab_size=model.mask_token_id,
        special_ids=SPECIAL_IDS,
        prob=prob,
        generator=generator,
    )


def mlm_objective(model: nn.Module, outputs: dict, batch: dict, spec: Any, world: World) -> torch.Tensor:
    """Text-only MLM: the bidirectional text tower and the tied MLM head."""
    masked, labels = mask_text(model, batch["texts"], spec.prob)
    return masked_lm_loss(model.mlm_logits(masked, labels))


def mmlm_objective(model: nn.Module, outputs: dict, batch: dict, spec: Any, world: World) -> torch.Tensor:
    """Image-conditioned MLM (ALBEF): masked text states read the patch tokens in the fusion
    encoder, then the MLM head predicts the masked tokens."""
    masked, labels = mask_text(model, batch["texts"], spec.prob)
    return masked_lm_loss(model.mlm_logits(masked, labels, outputs["image_tokens"]))


def hard_negatives(similarity: torch.Tensor, excluded: torch.Tensor, generator: torch.Generator | None = None):
    """For each row i, a column j drawn with probability ∝ softmax_j(similarity[i]) among the
    columns not ``excluded`` [N, N] (the positive and every duplicate of it).

    Returns ``(index [N], valid [N])``; a row with no allowed column gets ``valid`` False (and
    its own index, to be ignored)."""
    weights = similarity.float().softmax(dim=1).masked_fill(excluded, 0.0)
    valid = weights.sum(dim=1) > 0
    # multinomial refuses an all-zero row; such a row draws anything and is then pointed at itself.
    weights = torch.where(valid[:, None], weights, torch.ones_like(weights))
    index = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    rows = torch.arange(len(weights), device=weights.device) % weights.shape[1]
    return torch.where(valid, index, rows), valid


def itm_pairs(outputs: dict, texts: torch.Tensor, generator: torch.Generator | None = None):
    """ALBEF's ITM batch: ``(image_index, text_index, labels)`` of 3N pairs — the N positives,
    each image with a hard negative text, each text with a hard negative image. Negatives whose
    row had no allowed candidate are labelled ``IGNORE_INDEX``."""
    with torch.no_grad():
        sim = outputs["logit_scale"] * outputs["image_features"] @ outputs["text_features"].T
        same = (texts[:, None, :] == texts[None, :, :]).all(dim=-1)  # identical captions
        neg_text, text_ok = hard_negatives(sim, same, generator)
        neg_image, image_ok = hard_negatives(sim.T, same, generator)
    n = len(texts)
    rows = torch.arange(n, device=texts.device)
    ones, zeros = torch.ones_like(rows), torch.zeros_like(rows)
    labels = torch.cat([ones, zeros.masked_fill(~text_ok, IGNORE_INDEX), zeros.masked_fill(~image_ok, IGNORE_INDEX)])
    return torch.cat([rows, rows, neg_image]), torch.cat([rows, neg_text, rows]), labels


def _shared_text_states(model: nn.Module, outputs: dict, texts: torch.Tensor) -> torch.Tensor:
    # ITM and MIM both read the unmasked captions' states: computed once per step.
    if "text_states" not in outputs:
        outputs["text_states"] = model.text_states(texts)
    return outputs["text_states"]


def itm_objective(model: nn.Module, outputs: dict, batch: dict, spec: Any, world: World) -> torch.Tensor:
    """Image–text matching on fused pooled features with in-batch hard negatives (ALBEF)."""
    texts = batch["texts"]
    images, captions, labels = itm_pairs(outputs, texts)
    states = _shared_text_states(model, outputs, texts)
    inputs = model.fusion_inputs(
        _take(texts, captions),
        _take(states, captions),
        image_tokens=_take(outputs.get("image_tokens"), images),
        image_pooled=_take(outputs["image_features"], images),
        text_pooled=_take(outputs["text_features"], captions),
    )
    return F.cross_entropy(model.itm_head(model.fusion(inputs)).float(), labels)


def _take(tensor: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    # index_select, not tensor[index]: the backward of advanced indexing with repeated indices
    # (every row here is taken several times) accumulates in a thread-dependent order on CPU, so
    # two runs of the same spec ended with different weights; index_select's backward does not.
    return None if tensor is None else tensor.index_select(0, index)


def mim_objective(model: nn.Module, outputs: dict, batch: dict, spec: Any, world: World) -> torch.Tensor:
    """Masked image modelling: predict the clean patch tokens (detached) at blanked patches from
    the masked image's tokens and the text, through the fusion encoder."""
    images, texts, target = batch["images"], batch["texts"], outputs["image_tokens"].detach()
    mask = random_patch_mask(len(images), target.shape[1], spec.ratio, device=images.device)
    _, tokens = model.encode_image_tokens(blank_patches(images, mask, model.clip.visual.patch_size))
    inputs = model.fusion_inputs(texts, _shared_text_states(model, outputs, texts), image_tokens=tokens)
    fused = model.fusion.forward_tokens(inputs)
    predicted = model.mim_head(tokens, fused, inputs["text_mask"], mask)
    return mim_loss(predicted, target[mask], spec.loss)


def caption_objective(model: nn.Module, outputs: dict, batch: dict, spec: Any, world: World) -> torch.Tensor:
    """CoCa's captioning loss: next-token cross-entropy of each caption given its image, through
    the text decoder (teacher forcing, padding ignored)."""
    return caption_loss(
        model.clip.text_decoder,
        outputs["caption_image_tokens"],
        outputs["caption_text_states"],
        batch["texts"],
        label_smoothing=spec.label_smoothing,
    )


Objective = Callable[[nn.Module, dict, dict, Any, World], torch.Tensor]
OBJECTIVES: dict[str, Objective] = {
    "clip": clip_objective,
    "mlm": mlm_objective,
    "mmlm": mmlm_objective,
    "itm": itm_objective,
    "mim": mim_objective,
    "caption": caption_objective,
}

choices.check_registry("objectives", OBJECTIVES, choices.OBJECTIVES)
