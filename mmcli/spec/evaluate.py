"""The ``mmcli eval`` spec: the task sections, :class:`EvalSpec` and :data:`EVAL_TASKS`."""

from __future__ import annotations

from pydantic import Field, model_validator

from mmcli.spec.base import Section
from mmcli.spec.choices import DECODINGS, EVAL_TASKS, REGION_SOURCES, SAMPLERS, check_registry, literal
from mmcli.spec.common import FileSourceSpec, SourceSpec

# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------


def _map_style(source: FileSourceSpec) -> FileSourceSpec:
    if source.format == "webdataset":
        raise ValueError("format: an evaluation reads every record; webdataset shards are not supported here")
    return source


class LabelledSourceSpec(FileSourceSpec):
    """Labelled images: a class-folder tree (``root/<class>/…/image``) or a CSV/TSV/JSONL file."""

    path: str
    """A folder whose sub-folders are the classes (images anywhere below them; ``format: auto``
    reads a folder so), or a CSV/TSV/JSONL file with an image column and a label column; relative
    image paths are resolved against the file's folder."""

    label_key: str = "label"
    """Column or key holding the class name."""

    @model_validator(mode="after")
    def _not_streamed(self):
        return _map_style(self)


class ZeroShotTaskSpec(LabelledSourceSpec):
    """Zero-shot classification: each image gets the class whose prompt embedding (the mean of
    its templates' text embeddings) is most similar to the image embedding."""

    class_names: list[str] | None = None
    """The classes, in order; default: the sorted distinct labels of the data. The label of every
    image must be one of them."""

    templates: str | list[str] = "imagenet"
    """Prompt templates with ``{}`` for the class name: ``shapes`` (``a {}``, the caption style of
    the built-in dataset), ``imagenet`` (the 80 templates of the CLIP paper), ``simple`` (the
    short list of CLIP's notebook), or a list of strings such as ``["a photo of a {}."]``."""

    confusion: str | None = None
    """Where to write the confusion-matrix PNG; default ``<output stem>-confusion.png``."""

    @model_validator(mode="after")
    def _templates_usable(self) -> ZeroShotTaskSpec:
        t = self.templates
        if isinstance(t, str):
            if t not in ("shapes", "imagenet", "simple"):
                raise ValueError(f"templates: {t!r} is not shapes, imagenet, simple or a list of strings")
        elif not isinstance(t, list) or not t or not all(isinstance(s, str) and "{}" in s for s in t):
            raise ValueError("templates: a list of strings must be non-empty and each must contain {}")
        return self


class RetrievalTaskSpec(SourceSpec):
    """Image↔text retrieval recall@K on image–caption pairs (several captions per image allowed),
    read from a source as in pretraining (CSV/TSV/JSONL file or a folder of captioned images)."""

    ks: list[int] = [1, 5, 10]
    """The K of recall@K."""

    @model_validator(mode="after")
    def _not_streamed(self):
        return _map_style(self)


class CaptioningTaskSpec(SourceSpec):
    """Captioning of a CoCa run on image–caption data (several captions per image are several
    references), read from a source as in pretraining: BLEU-1…4, ROUGE-L and CIDEr-D
    (pycocoevalcap; METEOR and SPICE need Java and are left out), and on a shapes JSONL the scene
    score that reads each caption with the dataset's grammar. Every caption goes to
    ``predictions``."""

    decoding: literal(DECODINGS) = "greedy"
    """How each next token is picked (as ``mmcli caption --decoding``)."""

    beams: int = Field(3, ge=1)
    """Hypotheses per image for beam search."""

    top_p: float = Field(0.9, gt=0, le=1)
    """Nucleus size for top-p sampling."""

    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (top-p)."""

    max_tokens: int = Field(30, ge=1)
    """At most this many tokens per caption."""

    min_tokens: int = Field(0, ge=0)
    """No end of caption before this many tokens."""

    seed: int = 0
    """Seed of top-p sampling (per image, so results do not depend on the batch size)."""

    examples: int = Field(8, ge=0)
    """Captions kept in the results (and drawn beside their images) as examples."""

    predictions: str | None = None
    """Where every caption is written (JSONL); default: beside the results, ``<output>-captions.jsonl``."""

    @model_validator(mode="after")
    def _not_streamed(self):
        return _map_style(self)


class GenerationTaskSpec(Section):
    """Text-to-image generation of a ``task: generate`` run, scored on the captions of a shapes
    JSONL split: each prompt's pictures are read by the scene reader (object precision / recall /
    F1 over (colour, shape), relation accuracy, exact scene) and scored by the run's own dual
    encoder (CLIP score, prompt R@1 among all the split's captions), beside the same scores of the
    real images (the ceiling) and of unconditional samples (guidance 0, the floor), on all prompts
    and on the single-object ones."""

    path: str
    """A shapes JSONL split (``data/shapes-32/val.jsonl``): its captions are the prompts, its
    images the real row."""

    prompts: int | None = Field(200, ge=1)
    """The first this many distinct captions of the file are the prompts; ``null``: all of them."""

    samples: int = Field(4, ge=1)
    """Pictures per prompt."""

    sampler: literal(SAMPLERS) = "ddim"
    """As ``mmcli generate --sampler``."""

    steps: int = Field(25, ge=1)
    """Denoising steps (``ddpm`` uses the training schedule's timesteps whatever this says)."""

    guidance: float = Field(3.0, ge=0)
    """Classifier-free guidance scale of the conditional row (0: unconditional, 1: no guidance)."""

    unconditional: bool = True
    """Also score pictures drawn without the prompt (guidance 0): the floor."""

    seed: int = 0
    """Seed of the pictures (per prompt and sample, as ``mmcli generate``)."""

    sheet_prompts: int = Field(8, ge=0)
    """Prompts drawn in the picture ``<output>-generated.png`` (each: the real image, then its samples)."""


class LinearProbeTaskSpec(Section):
    """A logistic regression on frozen image embeddings, trained on all training examples and on
    k examples per class (few-shot); reports test accuracy for each."""

    train: LabelledSourceSpec
    """The labelled training images."""

    test: LabelledSourceSpec | None = None
    """The labelled test images; omitted: a stratified ``test_fraction`` of ``train`` is held out."""

    test_fraction: float = Field(0.5, gt=0, lt=1)
    """Share of each class of ``train`` held out for testing when ``test`` is omitted."""

    shots: list[int | None] = [1, 2, 4, 8, 16, None]
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

    regions: literal(REGION_SOURCES) | None = None
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

    dataset: str | None = None
    """The dataset name written in the results; default: the folder name of the first task's data."""

    zero_shot: ZeroShotTaskSpec | None = None
    """Zero-shot classification: top-1, top-5, mean per-class recall, confusion matrix."""

    retrieval: RetrievalTaskSpec | None = None
    """Image→text and text→image recall@K."""

    linear_probe: LinearProbeTaskSpec | None = None
    """Linear-probe accuracy on frozen image embeddings, full and few-shot."""

    vqa: FusionEvalTaskSpec | None = None
    """VQA accuracy of a ``mmcli fuse`` VQA run (``mmcli.evaluation.fusion``)."""

    itm: FusionEvalTaskSpec | None = None
    """Image–text matching accuracy of a run with an ITM head."""

    mlm: MlmEvalTaskSpec | None = None
    """Masked-token accuracy of a run with an MLM head."""

    alignment: AlignmentEvalTaskSpec | None = None
    """Region–concept alignment accuracy of a run with a graph fusion."""

    captioning: CaptioningTaskSpec | None = None
    """Caption metrics (BLEU, ROUGE-L, CIDEr-D; the scene score on shapes) of a CoCa run."""

    generation: GenerationTaskSpec | None = None
    """Faithfulness of a text-to-image run's pictures (scene reader, CLIP score, prompt R@1)."""

    output: str = "eval.json"
    """The results file: a JSON list of ``{dataset, model, pretrained, task, metrics}`` records,
    shaped like CLIP_benchmark's."""

    batch_size: int = Field(64, gt=0)
    """Images or texts per forward pass."""

    workers: int = Field(2, ge=0)
    """DataLoader processes decoding images."""

    @model_validator(mode="after")
    def _some_task(self) -> EvalSpec:
        if not any(getattr(self, t) is not None for t in EVAL_TASKS):
            raise ValueError(f"give at least one task ({', '.join(EVAL_TASKS)})")
        return self


check_registry("eval tasks", [f for f in EvalSpec.model_fields if f in EVAL_TASKS], EVAL_TASKS)
