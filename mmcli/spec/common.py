"""Sections shared by several run kinds: the model, its data sources, training and the run folder."""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import urlparse

from braceexpand import braceexpand
from pydantic import Field, field_validator, model_validator

from mmcli.io import DEFAULT_IMAGE_KEY, DEFAULT_TEXT_KEY
from mmcli.spec.base import Section
from mmcli.spec.choices import PRECISIONS, SOURCE_FORMATS, literal

# --------------------------------------------------------------------------------------------
# names and URLs
# --------------------------------------------------------------------------------------------

ARCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""A model name: letters, digits, ``.``, ``_``, ``-`` (the file stem open_clip registers it under)."""

ARCH_REFERENCE_PREFIXES = ("hf-hub:", "local-dir:")
"""References that open_clip resolves itself (a hub id, a folder), allowed in ``model.arch``."""


def check_arch_name(name: str) -> str:
    """``name`` if it is a plain model name (see :data:`ARCH_NAME`, no ``..``), else ValueError."""
    if not ARCH_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{name[:80]!r} is not a model name: use letters, digits, '-', '_' and '.' (no '/', no '..')")
    return name


def first_non_finite(value: Any, where: str = "") -> str | None:
    """The ``.key[index]`` path of the first infinite or NaN float inside nested dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found = first_non_finite(child, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]")
        if found is not None:
            return found
    return None


def url_scheme(url: str) -> str:
    """The scheme webdataset's ``gopen`` dispatches ``url`` on (``urlparse``; ``""`` for a path)."""
    try:
        return urlparse(url).scheme
    except ValueError:  # e.g. an unbalanced "[" in a host part: not a URL gopen could open
        return ""


def command_url(path: str) -> str | None:
    """The first URL of ``path`` (brace patterns expanded) that webdataset's ``gopen`` would open by
    running a program, or None. Only plain paths and ``file:`` URLs are opened as files; every other
    scheme goes to a handler that runs ``sh``, ``curl``, ``gsutil``, ``ais``… (or fails)."""
    if ":" not in path:  # no scheme in any expansion: the fast path for ordinary files
        return None
    for url in braceexpand(path) if "{" in path else (path,):
        if url_scheme(url) not in ("", "file"):
            return url
    return None


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


class ModelSpec(Section):
    """Which dual encoder to build."""

    arch: str = "mmcli-tiny"
    """An ``open_clip.list_models()`` name (``ViT-B-32``), an mmcli preset (``mmcli-tiny``,
    ``mmcli-small``), an ``hf-hub:`` id, or a free name when ``config`` is given. A name is letters,
    digits, ``-``, ``_`` and ``.`` (never a path: no ``/``, no ``..``); only ``hf-hub:`` and
    ``local-dir:`` references, without ``config``, hold more."""

    config: dict[str, Any] | None = None
    """An inline open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``); registered
    under ``arch`` before the model is built."""

    @model_validator(mode="after")
    def _arch_is_a_name(self) -> ModelSpec:
        if self.config is not None or not self.arch.startswith(ARCH_REFERENCE_PREFIXES):
            try:
                check_arch_name(self.arch)
            except ValueError as exc:
                raise ValueError(f"arch: {exc}") from None
        if self.config is not None:
            where = first_non_finite(self.config)
            if where is not None:
                raise ValueError(f"config{where}: must be a finite number (not infinity or NaN)")
        return self

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

    allow_commands: bool = False
    """Let a webdataset ``path`` be a URL that webdataset opens by running a program: ``pipe:CMD``
    (a shell command), ``http(s)``/``sftp``/``ftps``/``scp`` (``curl``), ``gs`` (``gsutil``),
    ``ais``, ``hf``, ``htgs``, or any other ``scheme:`` (``s3`` through ``USE_AIS_FOR``). Off by
    default, so a spec can name only local files; set it only for a spec you wrote or trust."""

    @model_validator(mode="after")
    def _no_commands_unless_allowed(self) -> SourceSpec:
        # csv/tsv/jsonl/folder paths are opened as files; webdataset (and auto) paths go to gopen.
        if not self.allow_commands and self.format in ("auto", "webdataset"):
            url = command_url(self.path)
            if url is not None:
                raise ValueError(
                    f"path: {url[:80]!r} is a URL that webdataset opens by running a program "
                    f"(scheme {url_scheme(url)!r}); set allow_commands: true on this source to allow it "
                    "(a local file with ':' in its name: write it as ./NAME)"
                )
        return self


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

    tensorboard: bool = False
    """Also write the lines of ``metrics.jsonl`` as TensorBoard events in ``<run>/tensorboard/``
    (``tensorboard --logdir runs``); needs the ``tensorboard`` package (``pip install
    'mmcli[tensorboard]'``). ``curves.png`` is drawn either way."""

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
    """Run folder name: the run is written to ``<dir>/<name>/``. One plain path component: not
    blank, no leading or trailing spaces, no ``/`` or ``\\``, not starting with a dot (so never
    ``.`` or ``..``)."""

    overwrite: bool = False
    """Start over when the run folder already holds a run (otherwise it is an error; use
    ``--resume`` to continue it). The old run is moved aside until the new one has saved a
    checkpoint, and put back if the new one fails before; a folder that is not an mmcli run is
    never replaced."""

    @field_validator("name")
    @classmethod
    def _one_component(cls, name: str) -> str:
        if not name.strip() or name != name.strip() or name.startswith(".") or any(c in name for c in "/\\\0"):
            raise ValueError(
                f"{name!r} is not a plain folder name (one path component, not blank, not starting with a dot)"
            )
        return name
