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

    loss: Literal["cosine", "mse"] = "cosine"
    """``cosine``: 1 − cosine similarity to the target feature; ``mse``: mean squared error of the
    layer-normalised features."""


class Objectives(Section):
    """Named, weighted training objectives; the total loss is the weighted sum of those given."""

    clip: Optional[ClipObjectiveSpec] = None
    """Contrastive image–text loss."""

    mlm: Optional[MlmObjectiveSpec] = None
    """Text-only masked language modelling."""

    mmlm: Optional[MmlmObjectiveSpec] = None
    """Image-conditioned masked language modelling through the fusion encoder."""

    itm: Optional[ItmObjectiveSpec] = None
    """Image–text matching with hard negatives, on fused features."""

    mim: Optional[MimObjectiveSpec] = None
    """Masked image modelling through the fusion encoder."""

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


class GraphSpec(Section):
    """Region–concept graph reasoning (``mmcli.models.graph_fusion``): image regions and the
    text's key concepts are the two sides of a bipartite graph, a GCN or GAT reasons over it, and
    the region–concept alignment it infers is summarised and concatenated to the other features
    before the prediction head."""

    layer: Literal["gcn", "gat"] = "gat"
    """The graph layer: ``gcn`` (graph convolution on the weighted adjacency) or ``gat`` (graph
    attention, steered by the edge weights)."""

    max_iters: int = Field(4, ge=1)
    """At most this many rounds of message passing and edge re-weighting."""

    tol: float = Field(1e-3, ge=0)
    """Stop earlier once the node states change by less than this (relative norm) in a round,
    for every graph of the batch; the rounds run are reported by ``mmcli eval``'s ``alignment``."""

    depth_per_iter: int = Field(1, ge=1)
    """Graph layers per round (their weights are shared across rounds)."""

    heads: int = Field(4, ge=1)
    """GAT heads; the graph width must be divisible by it."""

    top_k: Optional[int] = Field(None, ge=1)
    """Initial edges: ``null`` joins every region to every concept (dense); ``k`` keeps an edge
    when the concept is among the region's ``k`` most similar or the region among the concept's."""

    temperature: float = Field(0.1, gt=0)
    """Edge weight ``exp((cos − 1) / temperature)``: lower is sharper."""

    regions: Literal["given", "salient", "grid"] = "given"
    """``given``: the boxes that come with the data (the shapes dataset's objects, or
    ``data.boxes``), salient regions for an image without boxes; ``salient``: always found from
    the image's own patch tokens (a fixed grid when nothing stands out); ``grid``: a fixed grid."""

    max_regions: int = Field(4, ge=1)
    """At most this many salient regions per image."""

    grid: int = Field(2, ge=1)
    """The fixed grid is ``grid × grid`` cells."""

    local_features: bool = True
    """Also pool the towers' input embeddings, next to their final states: the image tower's patch
    embeddings inside each box, the text tower's token embeddings over each concept's span. After
    attention every state carries some of its whole image or text (a small object's tokens hold
    its neighbours' colours; "red circle" in a caption holds the caption's other objects); an
    input embedding depends on its own patch or token only. Needs a ViT image tower."""

    align_weight: float = Field(2.0, ge=0)
    """Weight of the weakly supervised alignment loss in ``mmcli fuse``: each region should match
    some concept of its own image's caption better than any concept of the other captions of the
    batch, and each concept some region of its own image better than any region of the other
    images (a symmetric multiple-instance contrastive loss; relation concepts take no part).
    Only caption text is used, never box labels; 0 turns it off."""

    align_temperature: float = Field(0.1, gt=0)
    """Temperature of the alignment loss's softmaxes over the batch's captions and images."""


class FusionSpec(Section):
    """The fusion encoder that joins text and image features (used by ``mmlm``, ``itm``, ``mim``
    and by ``mmcli fuse``)."""

    strategy: Literal["early", "late", "hybrid", "cross_attention", "graph"] = "cross_attention"
    """``cross_attention``: text tokens attend to the image's patch tokens (Q = text, K = V =
    image), layer after layer; ``early``: one transformer over text and patch tokens together;
    ``late``: a combination of the two pooled embeddings; ``hybrid``: early and late side by side;
    ``graph``: region–concept graph reasoning (``graph``) over the pooled embeddings alone.
    ``late`` and ``graph`` keep no token sequence, so they cannot serve ``mmlm`` or ``mim``."""

    graph: Optional[GraphSpec] = None
    """Region–concept graph reasoning. With ``strategy: graph`` its alignment features join the
    pooled embeddings (default settings when omitted); with another strategy they are
    concatenated to that strategy's fused features (e.g. ``cross_attention`` + ``graph``)."""

    dim: Optional[int] = Field(None, gt=0)
    """Width of the fused features; default: the text tower's width."""

    depth: int = Field(2, ge=1)
    """Number of fusion layers (not used by ``late``)."""

    heads: int = Field(4, ge=1)
    """Attention heads per fusion layer; ``dim`` must be divisible by it (not used by ``late``)."""

    mlp_ratio: float = Field(4.0, gt=0)
    """Hidden width of each layer's feed-forward network, as a multiple of ``dim``."""

    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout inside the fusion layers."""

    late_mode: Literal["concat", "sum", "product", "gated"] = "gated"
    """How ``late`` (and the late branch of ``hybrid``) combines the pooled embeddings: a linear
    map of their concatenation, their sum, their product, or a learned per-feature gate."""

    pool: Literal["mean", "first"] = "mean"
    """``cross_attention`` only: the pooled output is the mean of the real text tokens or the
    first (start-of-text) token."""

    def has_tokens(self) -> bool:
        """Whether the strategy keeps a fused token sequence (needed by ``mmlm`` and ``mim``)."""
        return self.strategy not in ("late", "graph")

    def graph_spec(self) -> Optional[GraphSpec]:
        """The graph settings in use: ``graph``, or the defaults for ``strategy: graph``."""
        return self.graph if self.graph is not None or self.strategy != "graph" else GraphSpec()


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

    fusion: Optional[FusionSpec] = None
    """The fusion encoder; required by the ``mmlm``, ``itm`` and ``mim`` objectives."""

    output: OutputSpec = OutputSpec()
    """The run folder."""

    @model_validator(mode="after")
    def _fusion_when_needed(self) -> "PretrainSpec":
        enabled = self.objectives.enabled()
        needing = [name for name in ("mmlm", "itm", "mim") if name in enabled]
        if needing and self.fusion is None:
            raise ValueError(f"fusion: missing; objectives {', '.join(needing)} need it")
        if self.fusion is not None and self.fusion.graph_spec() is not None:
            # Pretraining batches carry no boxes or concept spans for the graph to read.
            raise ValueError("fusion.graph: region–concept graph reasoning is trained by mmcli fuse, not pretrain")
        tokens = [name for name in ("mmlm", "mim") if name in enabled]
        if tokens and not self.fusion.has_tokens():
            raise ValueError(f"fusion.strategy: {self.fusion.strategy} keeps no token sequence, "
                             f"which {', '.join(tokens)} need")
        return self

    def run_dir(self) -> Path:
        """The run folder of this spec."""
        return Path(self.output.dir) / self.output.name


class FuseDataSpec(Section):
    """Questions (VQA) or captions (ITM) of the built-in dataset's JSONL files, and batching."""

    train: str
    """A shapes JSONL file (``data/shapes/train.jsonl``): records with ``image``, ``caption``,
    ``objects`` (boxes) and ``questions`` (``question``, ``answer``, ``type``). The VQA answer
    vocabulary is the set of answers of these training questions."""

    val: Optional[str] = None
    """A shapes JSONL file to evaluate on (and to write predictions and fused features for)."""

    batch_size: int = Field(64, gt=0)
    """Global batch size, split evenly across ranks."""

    workers: int = Field(2, ge=0)
    """DataLoader worker processes per rank."""

    val_max: int = Field(100_000, gt=0)
    """At most this many validation examples (questions or image–caption pairs) are scored."""

    boxes: Optional[str] = None
    """A JSONL file of region boxes that replace the records' object boxes (e.g. a detector's
    output): one line per image, ``{"id": <record id>, "boxes": [[x0, y0, x1, y1], ...]}`` in the
    image's pixels; images it does not list keep their own boxes."""


class FuseSpec(Section):
    """A ``mmcli fuse`` run: a fusion head trained (or applied) on top of a pretrained run."""

    base: str
    """The pretrained run folder (``runs/shapes-mm``) whose encoders (and fusion encoder, when it
    has one and ``fusion`` is omitted) start this run."""

    task: Literal["vqa", "itm"] = "vqa"
    """``vqa``: answer classification over the training answers; ``itm``: whether a caption
    matches an image (each image with its caption and with another image's caption)."""

    data: FuseDataSpec
    """Training and validation data."""

    fusion: Optional[FusionSpec] = None
    """A fresh fusion encoder; omitted: the base run's pretrained one."""

    encoders: Literal["frozen", "finetune"] = "finetune"
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


SPEC_KINDS: dict[str, type[BaseModel]] = {"pretrain": PretrainSpec, "fuse": FuseSpec}
"""Spec type by the first word of a spec file's name (``pretrain.yaml``, ``pretrain-small.yaml``)."""


def spec_model_for(path: str | Path) -> type[BaseModel]:
    """The spec type of a file, judged by its name's first word (see :data:`SPEC_KINDS`)."""
    stem = Path(path).stem.split("-")[0].split("_")[0]
    if stem not in SPEC_KINDS:
        raise MmcliError(f"{path}: cannot tell the spec kind from the file name (expected one of {sorted(SPEC_KINDS)})")
    return SPEC_KINDS[stem]


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------


class LabelledSourceSpec(Section):
    """Labelled images: a class-folder tree (``root/<class>/…/image``) or a CSV/TSV/JSONL file."""

    path: str
    """A folder whose sub-folders are the classes (images anywhere below them), or a CSV/TSV/JSONL
    file with an image column and a label column; relative image paths are resolved against the
    file's folder."""

    format: Literal["auto", "folder", "csv", "tsv", "jsonl"] = "auto"
    """How to read ``path``; ``auto`` decides from the suffix (a folder is a class-folder tree)."""

    image_key: str = "filepath"
    """Column (CSV/TSV) or key (JSONL) holding the image path (JSONL falls back to ``image``)."""

    label_key: str = "label"
    """Column or key holding the class name."""

    separator: Optional[str] = None
    """Column separator for CSV/TSV; default ``\\t`` for ``.tsv`` and ``,`` for ``.csv``."""


class ZeroShotTaskSpec(LabelledSourceSpec):
    """Zero-shot classification: each image gets the class whose prompt embedding (the mean of
    its templates' text embeddings) is most similar to the image embedding."""

    class_names: Optional[list[str]] = None
    """The classes, in order; default: the sorted distinct labels of the data. The label of every
    image must be one of them."""

    templates: str | list[str] = "imagenet"
    """Prompt templates with ``{}`` for the class name: ``shapes`` (``a {}``, the caption style of
    the built-in dataset), ``imagenet`` (the 80 templates of the CLIP paper), ``simple`` (the
    short list of CLIP's notebook), or a list of strings such as ``["a photo of a {}."]``."""

    confusion: Optional[str] = None
    """Where to write the confusion-matrix PNG; default ``<output stem>-confusion.png``."""

    @model_validator(mode="after")
    def _templates_usable(self) -> "ZeroShotTaskSpec":
        t = self.templates
        if isinstance(t, str):
            if t not in ("shapes", "imagenet", "simple"):
                raise ValueError(f"templates: {t!r} is not shapes, imagenet, simple or a list of strings")
        elif not isinstance(t, list) or not t or not all(isinstance(s, str) and "{}" in s for s in t):
            raise ValueError("templates: a list of strings must be non-empty and each must contain {}")
        return self


class RetrievalTaskSpec(Section):
    """Image↔text retrieval recall@K on image–caption pairs (several captions per image allowed)."""

    path: str
    """A CSV/TSV/JSONL file or a folder of captioned images, as a pretraining source."""

    format: Literal["auto", "csv", "tsv", "jsonl", "folder"] = "auto"
    """How to read ``path``; ``auto`` decides from the suffix."""

    image_key: str = "filepath"
    """Column or key of the image path."""

    text_key: str = "title"
    """Column or key of the caption (JSONL falls back to ``caption``)."""

    separator: Optional[str] = None
    """Column separator for CSV/TSV."""

    ks: list[int] = [1, 5, 10]
    """The K of recall@K."""


class LinearProbeTaskSpec(Section):
    """A logistic regression on frozen image embeddings, trained on all training examples and on
    k examples per class (few-shot); reports test accuracy for each."""

    train: LabelledSourceSpec
    """The labelled training images."""

    test: Optional[LabelledSourceSpec] = None
    """The labelled test images; omitted: a stratified ``test_fraction`` of ``train`` is held out."""

    test_fraction: float = Field(0.5, gt=0, lt=1)
    """Share of each class of ``train`` held out for testing when ``test`` is omitted."""

    shots: list[Optional[int]] = [1, 2, 4, 8, 16, None]
    """Examples per class for each probe; ``null`` means all training examples."""

    seed: int = 0
    """Seed of the held-out split and of the few-shot samples."""


class FusionEvalTaskSpec(Section):
    """A fused-model task on a shapes JSONL file (needs a run folder with the matching head)."""

    path: str
    """A shapes JSONL file (``data/shapes/val.jsonl``)."""


class AlignmentEvalTaskSpec(FusionEvalTaskSpec):
    """Region–concept alignment accuracy of a run with a graph fusion: for each object of an
    image, whether the concept of the image's caption best aligned with the object's region
    names its own colour and/or shape (the box labels are used only to score)."""

    regions: Optional[Literal["given", "salient", "grid"]] = None
    """The regions to reason over; default: the run's own setting. With automatic regions an
    object is scored through the region overlapping its box most (IoU ≥ 0.3; else a miss)."""


class MlmEvalTaskSpec(FusionEvalTaskSpec):
    """Masked-token accuracy on the colour and shape words of shapes captions."""

    image_conditioned: bool = False
    """Predict through the fusion encoder with the image (``mmlm``), not from the text alone."""


class EvalSpec(Section):
    """A ``mmcli eval`` run: the tasks to score one model on."""

    model: str
    """A run folder (``runs/shapes``) or ``ARCH:PRETRAINED``."""

    dataset: Optional[str] = None
    """The dataset name written in the results; default: the folder name of the first task's data."""

    zero_shot: Optional[ZeroShotTaskSpec] = None
    """Zero-shot classification: top-1, top-5, mean per-class recall, confusion matrix."""

    retrieval: Optional[RetrievalTaskSpec] = None
    """Image→text and text→image recall@K."""

    linear_probe: Optional[LinearProbeTaskSpec] = None
    """Linear-probe accuracy on frozen image embeddings, full and few-shot."""

    vqa: Optional[FusionEvalTaskSpec] = None
    """VQA accuracy of a ``mmcli fuse`` VQA run (``mmcli.evaluate_fusion``)."""

    itm: Optional[FusionEvalTaskSpec] = None
    """Image–text matching accuracy of a run with an ITM head."""

    mlm: Optional[MlmEvalTaskSpec] = None
    """Masked-token accuracy of a run with an MLM head."""

    alignment: Optional[AlignmentEvalTaskSpec] = None
    """Region–concept alignment accuracy of a run with a graph fusion."""

    output: str = "eval.json"
    """The results file: a JSON list of ``{dataset, model, pretrained, task, metrics}`` records,
    shaped like CLIP_benchmark's."""

    batch_size: int = Field(64, gt=0)
    """Images or texts per forward pass."""

    workers: int = Field(2, ge=0)
    """DataLoader processes decoding images."""

    @model_validator(mode="after")
    def _some_task(self) -> "EvalSpec":
        if not any(getattr(self, t) is not None for t in EVAL_TASKS):
            raise ValueError(f"give at least one task ({', '.join(EVAL_TASKS)})")
        return self


EVAL_TASKS = ("zero_shot", "retrieval", "linear_probe", "vqa", "itm", "mlm", "alignment")
"""The task sections of :class:`EvalSpec`, in the order they run."""

SPEC_KINDS["eval"] = EvalSpec
