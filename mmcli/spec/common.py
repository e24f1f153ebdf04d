"""Sections shared by several run kinds: the model, its data sources, training and the run folder."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from mmcli.io import DEFAULT_IMAGE_KEY, DEFAULT_TEXT_KEY
from mmcli.spec.base import Section
from mmcli.spec.choices import PRECISIONS, SOURCE_FORMATS, literal

# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


class ModelSpec(Section):
    """Which dual encoder to build."""

    arch: str = "mmcli-tiny"
    """An ``open_clip.list_models()`` name (``ViT-B-32``), an mmcli preset (``mmcli-tiny``,
    ``mmcli-small``), or a free name when ``config`` is given."""

    config: dict[str, Any] | None = None
    """An inline open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``); registered
    under ``arch`` before the model is built."""

    pretrained: str | None = None
    """Initial weights: a local file (``.safetensors``, or ``.bin``/``.pt`` read with
    ``weights_only=True``), an open_clip tag (``laion2b_s34b_b79k``) or an ``hf-hub:`` id. Tags
    and hub ids need the network; offline, the error says what to download and where."""


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


class FileSourceSpec(Section):
    """Where records of images (and their captions or labels) are read from."""

    path: str
    """A CSV/TSV file, a JSONL file, a folder of images with same-name ``.txt`` captions, or
    webdataset shards (``shards/{00000..00009}.tar``, a folder of ``.tar`` files, or one tar).
    Relative image paths inside CSV/TSV/JSONL files are resolved against the file's folder."""

    format: literal(SOURCE_FORMATS) = "auto"
    """How to read ``path``; ``auto`` decides from the suffix (or folder contents)."""

    image_key: str = DEFAULT_IMAGE_KEY
    """Column (CSV/TSV) or key (JSONL, falling back to ``image``) holding the image path; for
    webdataset, the image extensions tried in order are ``jpg;jpeg;png;webp``."""

    separator: str | None = None
    """Column separator for CSV/TSV; default ``\\t`` for ``.tsv`` and ``,`` for ``.csv``."""


class SourceSpec(FileSourceSpec):
    """One source of image–text pairs."""

    text_key: str = DEFAULT_TEXT_KEY
    """Column (CSV/TSV) or key (JSONL, falling back to ``caption``) holding the caption; for
    webdataset the ``txt`` member."""

    size: int | None = None
    """Number of samples in a webdataset source (needed for epochs and the progress bar);
    counted from the shards when omitted."""


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


class TrainSpec(Section):
    """Optimisation and bookkeeping of the training loop."""

    steps: int | None = Field(None, gt=0)
    """Number of optimizer steps; give this or ``epochs``."""

    epochs: float | None = Field(None, gt=0)
    """Number of passes over the training data (converted to steps)."""

    lr: float = Field(5e-4, gt=0)
    """Peak learning rate of AdamW."""

    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay, applied to weight matrices only (not to biases, norms, embeddings'
    positions, the logit scale)."""

    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""

    eps: float = Field(1e-6, gt=0)
    """AdamW epsilon."""

    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps before the cosine decay."""

    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """The cosine schedule ends at ``lr * min_lr_ratio``."""

    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; ``null`` disables clipping."""

    accumulate: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""

    precision: literal(PRECISIONS) = "auto"
    """``auto``: bf16 autocast on CUDA, fp32 elsewhere; ``bf16`` also autocasts on CPU."""

    seed: int = 0
    """Seed of every random number generator (data order, initialisation, masking)."""

    log_every: int = Field(10, ge=1)
    """Write a line to ``metrics.jsonl`` every this many steps."""

    val_every: int | None = Field(None, ge=1)
    """Validate every this many steps (and always at the end when ``data.val`` is given)."""

    save_every: int | None = Field(None, ge=1)
    """Save a resumable checkpoint every this many steps (and always at the end)."""

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainSpec:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of train.steps and train.epochs")
        return self


class OutputSpec(Section):
    """Where the run folder goes."""

    dir: str = "runs"
    """Parent folder of run folders."""

    name: str = "run"
    """Run folder name: the run is written to ``<dir>/<name>/``."""

    overwrite: bool = False
    """Start over when the run folder already holds a run (otherwise it is an error; use
    ``--resume`` to continue it)."""
