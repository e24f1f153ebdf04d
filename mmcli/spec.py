"""Run specs: pydantic models for every section of a spec YAML, and ``load_spec``.

Every field carries a docstring; they are the user's reference (``mmcli spec-doc`` prints them
and the README links here). Unknown keys are rejected everywhere so that a typo never silently
falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmcli.errors import MmcliError


class Section(BaseModel):
    """Base of every spec section: unknown keys are errors, field docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


class ModelSpec(Section):
    """Which dual encoder to build."""

    arch: str = "mmcli-tiny"
    """An ``open_clip.list_models()`` name (``ViT-B-32``), an mmcli preset (``mmcli-tiny``,
    ``mmcli-small``), or a free name when ``config`` is given."""

    config: Optional[dict[str, Any]] = None
    """An inline open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``); registered
    under ``arch`` before the model is built."""

    pretrained: Optional[str] = None
    """Initial weights: a local file (``.safetensors``, or ``.bin``/``.pt`` read with
    ``weights_only=True``), an open_clip tag (``laion2b_s34b_b79k``) or an ``hf-hub:`` id. Tags
    and hub ids need the network; offline, the error says what to download and where."""


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


class SourceSpec(Section):
    """One source of image–text pairs."""

    path: str
    """A CSV/TSV file, a JSONL file, a folder of images with same-name ``.txt`` captions, or
    webdataset shards (``shards/{00000..00009}.tar``, a folder of ``.tar`` files, or one tar).
    Relative image paths inside CSV/TSV/JSONL files are resolved against the file's folder."""

    format: Literal["auto", "csv", "tsv", "jsonl", "folder", "webdataset"] = "auto"
    """How to read ``path``; ``auto`` decides from the suffix (or folder contents)."""

    image_key: str = "filepath"
    """Column (CSV/TSV) or key (JSONL) holding the image path; for webdataset, the image
    extensions tried in order are ``jpg;jpeg;png;webp``."""

    text_key: str = "title"
    """Column (CSV/TSV) or key (JSONL) holding the caption; for webdataset the ``txt`` member."""

    separator: Optional[str] = None
    """Column separator for CSV/TSV; default ``\\t`` for ``.tsv`` and ``,`` for ``.csv``."""

    size: Optional[int] = None
    """Number of samples in a webdataset source (needed for epochs and the progress bar);
    counted from the shards when omitted."""


class DataSpec(Section):
    """Training and validation data, and how it is batched."""

    train: SourceSpec
    """The training pairs."""

    val: Optional[SourceSpec] = None
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


class Objectives(Section):
    """Named, weighted training objectives; the total loss is the weighted sum of those given."""

    clip: Optional[ClipObjectiveSpec] = None
    """Contrastive image–text loss."""

    @model_validator(mode="after")
    def _at_least_one(self) -> "Objectives":
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


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


class TrainSpec(Section):
    """Optimisation and bookkeeping of the training loop."""

    steps: Optional[int] = Field(None, gt=0)
    """Number of optimizer steps; give this or ``epochs``."""

    epochs: Optional[float] = Field(None, gt=0)
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

    grad_clip: Optional[float] = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; ``null`` disables clipping."""

    accumulate: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""

    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast on CUDA, fp32 elsewhere; ``bf16`` also autocasts on CPU."""

    seed: int = 0
    """Seed of every random number generator (data order, initialisation, masking)."""

    log_every: int = Field(10, ge=1)
    """Write a line to ``metrics.jsonl`` every this many steps."""

    val_every: Optional[int] = Field(None, ge=1)
    """Validate every this many steps (and always at the end when ``data.val`` is given)."""

    save_every: Optional[int] = Field(None, ge=1)
    """Save a resumable checkpoint every this many steps (and always at the end)."""

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainSpec":
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

    output: OutputSpec = OutputSpec()
    """The run folder."""

    def run_dir(self) -> Path:
        """The run folder of this spec."""
        return Path(self.output.dir) / self.output.name


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``train.lr=3e-4`` into ``(["train", "lr"], 3e-4)``; the value is parsed as YAML."""
    if "=" not in text:
        raise MmcliError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    key, _, raw = text.partition("=")
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise MmcliError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw spec mapping, creating sections as needed."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise MmcliError(f"--set {text!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MmcliError(f"{path}: no such spec file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise MmcliError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MmcliError(f"{path}: a spec must be a YAML mapping, not {type(data).__name__}")
    return data


def validate(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    """Validate ``data`` as ``model``, turning the first error into one clear line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise MmcliError(f"{source}: {loc}: {msg}{more}") from None


def load_spec(path: str | Path, model: type[BaseModel], overrides: list[str] | None = None) -> Any:
    """Load ``path`` as a spec of type ``model`` with ``--set`` overrides applied."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    return validate(model, data, str(path))


SPEC_KINDS: dict[str, type[BaseModel]] = {"pretrain": PretrainSpec}
"""Spec type by the first word of a spec file's name (``pretrain.yaml``, ``pretrain-small.yaml``)."""


def spec_model_for(path: str | Path) -> type[BaseModel]:
    """The spec type of a file, judged by its name's first word (see :data:`SPEC_KINDS`)."""
    stem = Path(path).stem.split("-")[0].split("_")[0]
    if stem not in SPEC_KINDS:
        raise MmcliError(f"{path}: cannot tell the spec kind from the file name (expected one of {sorted(SPEC_KINDS)})")
    return SPEC_KINDS[stem]
