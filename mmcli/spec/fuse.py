"""The ``mmcli fuse`` spec: :class:`FuseDataSpec` and :class:`FuseSpec`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from mmcli.spec.base import Section
from mmcli.spec.choices import ENCODER_MODES, FUSE_TASKS, literal
from mmcli.spec.common import OutputSpec, TrainSpec
from mmcli.spec.fusion import FusionSpec


class FuseDataSpec(Section):
    """Questions (VQA) or captions (ITM) of the built-in dataset's JSONL files, and batching."""

    train: str
    """A shapes JSONL file (``data/shapes/train.jsonl``): records with ``image``, ``caption``,
    ``objects`` (boxes) and ``questions`` (``question``, ``answer``, ``type``). The VQA answer
    vocabulary is the set of answers of these training questions."""

    val: str | None = None
    """A shapes JSONL file to evaluate on (and to write predictions and fused features for)."""

    batch_size: int = Field(64, gt=0)
    """Global batch size, split evenly across ranks."""

    workers: int = Field(2, ge=0)
    """DataLoader worker processes per rank."""

    val_max: int = Field(100_000, gt=0)
    """At most this many validation examples (questions or image–caption pairs) are scored."""

    boxes: str | None = None
    """A JSONL file of region boxes that replace the records' object boxes (e.g. a detector's
    output): one line per image, ``{"id": <record id>, "boxes": [[x0, y0, x1, y1], ...]}`` in the
    image's pixels; images it does not list keep their own boxes."""


class FuseSpec(Section):
    """A ``mmcli fuse`` run: a fusion head trained (or applied) on top of a pretrained run."""

    base: str
    """The pretrained run folder (``runs/shapes-mm``) whose encoders (and fusion encoder, when it
    has one and ``fusion`` is omitted) start this run."""

    task: literal(FUSE_TASKS) = "vqa"
    """``vqa``: answer classification over the training answers; ``itm``: whether a caption
    matches an image (each image with its caption and with another image's caption)."""

    data: FuseDataSpec
    """Training and validation data."""

    fusion: FusionSpec | None = None
    """A fresh fusion encoder; omitted: the base run's pretrained one."""

    encoders: literal(ENCODER_MODES) = "finetune"
    """``frozen``: the image and text towers keep the base run's weights and only the fusion
    encoder and head train; ``finetune``: they train too."""

    head_hidden: int = Field(512, gt=0)
    """Hidden width of the VQA answer classifier."""

    head_dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout before the VQA classifier's last layer."""

    train: TrainSpec
    """Optimisation."""

    output: OutputSpec = OutputSpec(name="fuse")
    """The run folder (a full run folder: it loads like a pretraining run, with its head)."""

    def run_dir(self) -> Path:
        """The run folder of this spec."""
        return Path(self.output.dir) / self.output.name
