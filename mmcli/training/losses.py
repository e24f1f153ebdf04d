"""Every training loss, as a plain function of tensors (objectives and tasks call these).

- :func:`contrastive_loss`: symmetric InfoNCE of CLIP (Radford et al., 2021).
- :func:`masked_lm_loss`: masked language modelling of BERT (Devlin et al., 2019).
- :func:`mim_loss`: masked image modelling (feature prediction, as in BEiT/MaskFeat).
- :func:`alignment_loss`: weakly supervised region–concept alignment, a symmetric
  multiple-instance contrastive loss over the batch's captions and images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of N matched pairs (CLIP).

    With S_ij = scale · cos(v_i, t_j), the loss is
    ``½ [ -1/N Σ_i log softmax_j(S)_ii  +  -1/N Σ_i log softmax_j(Sᵀ)_ii ]``: CLIP's
    text→image term plus its image→text mirror. ``logit_scale`` is the multiplier 1/τ (already
    exponentiated); features are expected L2-normalised.
    """
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def masked_lm_loss(out) -> torch.Tensor:
    """Mean cross-entropy over the selected positions (BERT's Σ_{i∈M} −log P(w_i | w_\\M),
    divided by |M| so the loss does not grow with the batch); 0 when nothing was selected."""
    if out.targets.numel() == 0:
        return out.logits.sum() * 0.0
    return F.cross_entropy(out.logits.float(), out.targets)


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


def alignment_loss(
    region_states: Tensor,
    region_mask: Tensor,
    concept_states: Tensor,
    concept_mask: Tensor,
    temperature: float = 0.1,
    positives: Tensor | None = None,
) -> Tensor:
    """Weakly supervised region–concept alignment: a symmetric multiple-instance contrastive loss.

    Region ``i`` of image ``b`` scores each text ``t`` of the batch by its best concept,
    ``s(b, i, t) = max_j cos(r_bi, c_tj)``, and must score its own text highest (cross-entropy of
    ``softmax_t(s / temperature)``); likewise concept ``j`` of text ``t`` scores each image by its
    best region, ``max_i cos(r_bi, c_tj)``, and must score its own image highest. The two
    directions are averaged, each over its real nodes (regions of images whose text has a
    concept; concepts of texts whose image has a region). The first alone lets every region of an
    image settle on the one concept that tells its text apart; the second makes every concept
    find its region.

    ``positives`` ``[B, B]`` (default: the identity) marks the texts that belong to image ``b``:
    give True for the other images with the very same caption, which are not negatives. Only which
    text belongs to which image is used, never what the regions are. Pass only the concepts a
    region can show in ``concept_mask`` (not relations).

    Apply it to the graph's initial nodes (``GraphFusion.nodes``), not to its output states: after
    message passing a region's state carries its own text's concepts, so it could match that text
    without looking at the image at all.
    """
    regions, concepts = F.normalize(region_states.float(), dim=-1), F.normalize(concept_states.float(), dim=-1)
    sim = torch.einsum("bid,tjd->bitj", regions, concepts) / temperature  # [B, R, T, C]
    positives = torch.eye(len(sim), dtype=torch.bool, device=sim.device) if positives is None else positives
    has_regions, has_concepts = region_mask.any(dim=1), concept_mask.any(dim=1)
    region_to_text = sim.masked_fill(~concept_mask[None, None], float("-inf")).amax(dim=-1)  # [B, R, T]
    concept_to_image = sim.masked_fill(~region_mask[:, :, None, None], float("-inf")).amax(dim=1)  # [B, T, C]
    losses = [
        _multi_positive_nll(
            region_to_text, positives.unsqueeze(1), region_mask & has_concepts.unsqueeze(1), has_concepts
        ),
        _multi_positive_nll(
            concept_to_image.permute(1, 2, 0),
            positives.t().unsqueeze(1),
            concept_mask & has_regions.unsqueeze(1),
            has_regions,
        ),
    ]
    losses = [loss for loss in losses if loss is not None]
    return torch.stack(losses).mean() if losses else region_states.sum() * 0.0


def _multi_positive_nll(scores: Tensor, positives: Tensor, keep: Tensor, candidates: Tensor) -> Tensor | None:
    """``−log Σ_pos softmax(scores)`` averaged over the ``keep`` rows: ``scores`` ``[N, K, M]``
    (node ``k`` of item ``n`` against the ``M`` candidates), ``positives`` ``[N, 1, M]``, only
    ``candidates`` ``[M]`` in the softmax; ``None`` when no row is kept."""
    if not bool(keep.any()):
        return None
    scores = scores.masked_fill(~candidates, float("-inf"))
    positive = scores.masked_fill(~(positives & candidates), float("-inf"))
    nll = scores.logsumexp(dim=-1) - positive.logsumexp(dim=-1)
    return nll[keep].mean()
