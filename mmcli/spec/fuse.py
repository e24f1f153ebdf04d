"""The ``mmcli fuse`` spec: :class:`FuseDataSpec` and :class:`FuseSpec`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from mmcli.spec.base import Section
from mmcli.spec.choices import BETA_SCHEDULES, ENCODER_MODES, FUSE_TASKS, GENERATOR_PRESETS, PREDICTIONS, literal
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


class GeneratorSpec(Section):
    """The text-to-image generator of a ``task: generate`` run: a diffusers UNet denoising pixels,
    reading the base run's frozen text tower through cross-attention."""

    preset: literal(GENERATOR_PRESETS) = "cpu"
    """Network size: ``cpu`` (32 px, channels 64/128/128, ~7 M parameters) or ``gpu`` (64 px,
    128/256/256/256, two layers per level); the fields below override it."""

    image_size: int | None = Field(None, ge=8, multiple_of=8)
    """Side of the generated square images in pixels; training images of another size are resized."""

    channels: list[int] | None = Field(None, min_length=2)
    """Channels of each UNet level (each a multiple of 8; the image halves between levels)."""

    attention: list[bool] | None = None
    """Per level, whether it has self- and cross-attention blocks (one entry per ``channels``)."""

    layers_per_block: int | None = Field(None, ge=1)
    """Residual blocks per UNet level."""

    heads: int = Field(4, ge=1)
    """Attention heads of the UNet's transformer blocks."""

    text_dropout: float = Field(0.1, ge=0, lt=1)
    """Share of training samples whose caption is replaced by the empty prompt, so that sampling
    can use classifier-free guidance."""

    ema_decay: float | None = Field(0.999, gt=0, lt=1)
    """Decay of the moving average of the weights used for sampling; ``null``: sample with the
    trained weights (the average is warmed up as ``(1 + n) / (10 + n)`` over its first updates)."""

    timesteps: int = Field(1000, ge=10)
    """Training noise levels (DDPM's T)."""

    prediction: literal(PREDICTIONS) = "v_prediction"
    """What the UNet predicts: ``v_prediction`` (the velocity √ᾱ·ε − √(1−ᾱ)·x₀, Salimans & Ho 2022;
    well-behaved at the noisiest timesteps, where a few-step sampler starts) or ``epsilon`` (the noise)."""

    pooled: bool = True
    """Also feed the pooled prompt embedding (the text tower's output) into the timestep embedding,
    as Imagen does, beside the token states the cross-attention reads."""

    beta_schedule: literal(BETA_SCHEDULES) = "squaredcos_cap_v2"
    """Noise schedule: ``squaredcos_cap_v2`` (cosine, Nichol & Dhariwal 2021), ``linear`` (Ho et al. 2020)."""

    @model_validator(mode="after")
    def _levels(self) -> GeneratorSpec:
        if self.channels is not None and any(c % 8 for c in self.channels):
            raise ValueError(f"channels: {self.channels}: each must be a multiple of 8 (group normalisation)")
        return self


class FuseSpec(Section):
    """A ``mmcli fuse`` run: a fusion head trained (or applied) on top of a pretrained run."""

    base: str
    """The pretrained run folder (``runs/shapes-mm``) whose encoders (and fusion encoder, when it
    has one and ``fusion`` is omitted) start this run."""

    task: literal(FUSE_TASKS) = "vqa"
    """``vqa``: answer classification over the training answers; ``itm``: whether a caption
    matches an image (each image with its caption and with another image's caption);
    ``generate``: a text-to-image generator conditioned on the base's frozen text tower."""

    data: FuseDataSpec
    """Training and validation data."""

    fusion: FusionSpec | None = None
    """A fresh fusion encoder; omitted: the base run's pretrained one."""

    encoders: literal(ENCODER_MODES) = "finetune"
    """``frozen``: the image and text towers keep the base run's weights and only the fusion
    encoder and head train; ``finetune``: they train too."""

    generator: GeneratorSpec | None = None
    """The generator of ``task: generate`` (defaults: the ``cpu`` preset)."""

    head_hidden: int = Field(512, gt=0)
    """Hidden width of the VQA answer classifier."""

    head_dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout before the VQA classifier's last layer."""

    train: TrainSpec
    """Optimisation."""

    output: OutputSpec = OutputSpec(name="fuse")
    """The run folder (a full run folder: it loads like a pretraining run, with its head)."""

    @model_validator(mode="after")
    def _task_sections(self) -> FuseSpec:
        if self.task == "generate":
            if self.fusion is not None:
                raise ValueError("fusion: not used by task generate (the generator reads the text tower itself)")
            if self.data.boxes is not None:
                raise ValueError("data.boxes: not used by task generate")
            if self.generator is None:
                self.generator = GeneratorSpec()
        elif self.generator is not None:
            raise ValueError(f"generator: only task generate has one (this spec's task is {self.task})")
        return self

    def run_dir(self) -> Path:
        """The run folder of this spec."""
        return Path(self.output.dir) / self.output.name
