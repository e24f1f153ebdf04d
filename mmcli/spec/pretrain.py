"""The ``mmcli pretrain`` spec: its data and objectives sections, and :class:`PretrainSpec`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from mmcli.spec.base import Section
from mmcli.spec.choices import (
    CAPTION_PARTNERS,
    FUSION_OBJECTIVES,
    MIM_LOSSES,
    OBJECTIVES,
    TOKEN_OBJECTIVES,
    check_registry,
    literal,
)
from mmcli.spec.common import ModelSpec, OutputSpec, SourceSpec, TrainSpec
from mmcli.spec.fusion import FusionSpec

# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


class DataSpec(Section):
    """Training and validation data, and how it is batched."""

    train: SourceSpec
    """The training pairs."""

    val: SourceSpec | None = None
    """Validation pairs for periodic loss and image↔text recall@1."""

    batch_size: int = Field(64, gt=0)
    """Global batch size per optimizer micro-step, split evenly across ranks."""

    workers: int = Field(2, ge=0)
    """DataLoader worker processes per rank (0 decodes in the main process)."""

    max_image_pixels: int = Field(89_478_485, gt=0)
    """Images with more pixels than this are skipped as oversized (decompression-bomb guard)."""

    shuffle_buffer: int = Field(1000, ge=1)
    """Shuffle buffer size for webdataset sources."""

    val_max: int = Field(1000, gt=0)
    """At most this many validation pairs are used for loss and recall."""


# --------------------------------------------------------------------------------------------
# objectives
# --------------------------------------------------------------------------------------------


class ClipObjectiveSpec(Section):
    """Symmetric InfoNCE over the batch (CLIP)."""

    weight: float = Field(1.0, ge=0)
    """Multiplier of this loss in the total."""

    gather_with_grad: bool = True
    """With several ranks, gather features from all ranks with gradients (global negatives)."""


class MlmObjectiveSpec(Section):
    """Text-only masked language modelling: the text tower read bidirectionally, a tied MLM head."""

    weight: float = Field(1.0, ge=0)
    """Multiplier of this loss in the total."""

    prob: float = Field(0.15, gt=0, le=1)
    """Share of each caption's tokens selected for prediction (of those: 80% [MASK], 10% a random
    token, 10% unchanged)."""


class MmlmObjectiveSpec(Section):
    """Image-conditioned MLM: masked text states read the image's patch tokens through the fusion
    encoder before the (shared, tied) MLM head predicts the masked tokens. Needs ``fusion``."""

    weight: float = Field(1.0, ge=0)
    """Multiplier of this loss in the total."""

    prob: float = Field(0.15, gt=0, le=1)
    """Share of each caption's tokens selected for prediction (80/10/10 as in ``mlm``)."""


class ItmObjectiveSpec(Section):
    """Image–text matching on fused features: each pair plus one hard negative text per image and
    one hard negative image per text, sampled in proportion to the softmax of the contrastive
    similarities (texts identical to the positive caption are never negatives). Needs ``fusion``."""

    weight: float = Field(1.0, ge=0)
    """Multiplier of this loss in the total."""


class MimObjectiveSpec(Section):
    """Masked image modelling: a share of the image's patches is blanked, the masked image goes
    through the image tower and the fusion encoder with the text, and a small head predicts the
    clean image's (detached) patch features at the masked places. Needs ``fusion``."""

    weight: float = Field(1.0, ge=0)
    """Multiplier of this loss in the total."""

    ratio: float = Field(0.4, gt=0, lt=1)
    """Share of the patches masked in each image."""

    loss: literal(MIM_LOSSES) = "cosine"
    """``cosine``: 1 − cosine similarity to the target feature; ``mse``: mean squared error of the
    layer-normalised features."""


class CaptionObjectiveSpec(Section):
    """Captioning as CoCa trains it: a text decoder reads the caption's text-tower states with
    causal self-attention and the image's attention-pooled tokens with cross-attention, and
    predicts each next token (cross-entropy; padding is never a label). Needs a CoCa
    architecture (``mmcli-tiny-coca``, …, or an open_clip ``coca_*`` model); combines with
    ``clip`` only."""

    weight: float = Field(1.0, ge=0)
    """Multiplier of this loss in the total (CoCa weighs it 2 against the contrastive loss's 1)."""

    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Label smoothing of the cross-entropy (0: none)."""

    image: bool = True
    """``false`` trains a language-model baseline: the decoder reads zeros instead of the image
    (and decodes that way later), so it learns what captions look like, never what a picture shows."""


class Objectives(Section):
    """Named, weighted training objectives; the total loss is the weighted sum of those given."""

    clip: ClipObjectiveSpec | None = None
    """Contrastive image–text loss."""

    mlm: MlmObjectiveSpec | None = None
    """Text-only masked language modelling."""

    mmlm: MmlmObjectiveSpec | None = None
    """Image-conditioned masked language modelling through the fusion encoder."""

    itm: ItmObjectiveSpec | None = None
    """Image–text matching with hard negatives, on fused features."""

    mim: MimObjectiveSpec | None = None
    """Masked image modelling through the fusion encoder."""

    caption: CaptionObjectiveSpec | None = None
    """Captioning through a CoCa text decoder."""

    @model_validator(mode="after")
    def _at_least_one(self) -> Objectives:
        if not self.enabled():
            raise ValueError("at least one objective must be given")
        return self

    def enabled(self) -> dict[str, Any]:
        """The objectives that are set and have a non-zero weight, by name."""
        out = {}
        for name in type(self).model_fields:
            spec = getattr(self, name)
            if spec is not None and spec.weight > 0:
                out[name] = spec
        return out


check_registry("objectives", Objectives.model_fields, OBJECTIVES)


class PretrainSpec(Section):
    """A ``mmcli pretrain`` run."""

    model: ModelSpec = ModelSpec()
    """The dual encoder."""

    data: DataSpec
    """Training (and validation) data."""

    objectives: Objectives = Objectives(clip=ClipObjectiveSpec())
    """Weighted objectives."""

    train: TrainSpec
    """Optimisation."""

    fusion: FusionSpec | None = None
    """The fusion encoder; required by the ``mmlm``, ``itm`` and ``mim`` objectives."""

    output: OutputSpec = OutputSpec()
    """The run folder."""

    @model_validator(mode="after")
    def _fusion_when_needed(self) -> PretrainSpec:
        enabled = self.objectives.enabled()
        needing = [name for name in FUSION_OBJECTIVES if name in enabled]
        if needing and self.fusion is None:
            raise ValueError(f"fusion: missing; objectives {', '.join(needing)} need it")
        if self.fusion is not None and self.fusion.graph_spec() is not None:
            # Pretraining batches carry no boxes or concept spans for the graph to read.
            raise ValueError("fusion.graph: region–concept graph reasoning is trained by mmcli fuse, not pretrain")
        if "caption" in enabled:
            others = sorted(set(enabled) - {"caption", *CAPTION_PARTNERS})
            if others:
                raise ValueError(
                    f"objectives.caption: combines with {', '.join(CAPTION_PARTNERS)} only, not {', '.join(others)} "
                    "(a CoCa text tower feeds neither the MLM head nor a fusion encoder)"
                )
        tokens = [name for name in TOKEN_OBJECTIVES if name in enabled]
        if tokens and not self.fusion.has_tokens():
            raise ValueError(
                f"fusion.strategy: {self.fusion.strategy} keeps no token sequence, which {', '.join(tokens)} need"
            )
        return self

    def run_dir(self) -> Path:
        """The run folder of this spec."""
        return Path(self.output.dir) / self.output.name
