"""The registry of ``mmcli eval`` tasks: one entry per section of the eval spec.

Each task reads its own section of the spec and returns its metrics; the command only loops over
:data:`EVAL_TASKS` (in the spec's order) and writes the results. The image–text tasks
(zero-shot, retrieval, linear probe) embed with any model; the fused-model tasks (VQA, ITM, MLM,
region–concept alignment) need a run folder with the task's head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcli import io
from mmcli.errors import MmcliError
from mmcli.evaluation import image_text
from mmcli.spec import choices


@dataclass
class EvalContext:
    """What every task may use: the loaded model, its embedder, and where notes go."""

    loaded: Any
    embedder: image_text.Embedder
    device: Any
    batch_size: int
    output: Path
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EvalTask:
    """One eval task: the name written in the results (CLIP_benchmark's where it has one) and the
    function ``(context, section) -> metrics``."""

    result_name: str
    run: Callable[[EvalContext, Any], dict[str, Any]]


def _zero_shot(ctx: EvalContext, spec) -> dict[str, Any]:
    png = spec.confusion or str(ctx.output.with_name(ctx.output.stem + "-confusion.png"))
    return image_text.zero_shot(ctx.embedder, spec, confusion_png=png, notes=ctx.notes)


def _retrieval(ctx: EvalContext, spec) -> dict[str, Any]:
    return image_text.retrieval(ctx.embedder, spec, notes=ctx.notes)


def _linear_probe(ctx: EvalContext, spec) -> dict[str, Any]:
    return image_text.linear_probe(ctx.embedder, spec, notes=ctx.notes)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics as one level of ``a.b`` keys (lists are dropped: they are rows, not metrics)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        elif not isinstance(value, (list, tuple)):
            out[f"{prefix}{key}"] = value
    return out


def _fused_metrics(raw: dict[str, Any]) -> dict[str, Any]:
    # The fused-model scorers also return what they scored and row-level predictions.
    return flatten({k: v for k, v in raw.items() if k not in ("task", "data", "rows", "predictions")})


def _run_folder(ctx: EvalContext, task: str) -> str:
    ref = ctx.loaded.ref
    if not io.is_run_dir(ref):
        raise MmcliError(f"{task}: model {ref} must be a run folder with the task's head")
    return ref


def _vqa(ctx: EvalContext, spec) -> dict[str, Any]:
    from mmcli.evaluation.fusion import evaluate_vqa

    raw = evaluate_vqa(_run_folder(ctx, "vqa"), spec.path, device=ctx.device, batch_size=ctx.batch_size)
    return _fused_metrics(raw)


def _itm(ctx: EvalContext, spec) -> dict[str, Any]:
    from mmcli.evaluation.fusion import evaluate_itm

    raw = evaluate_itm(_run_folder(ctx, "itm"), spec.path, device=ctx.device, batch_size=ctx.batch_size)
    return _fused_metrics(raw)


def _mlm(ctx: EvalContext, spec) -> dict[str, Any]:
    from mmcli.evaluation.fusion import evaluate_mlm

    raw = evaluate_mlm(
        _run_folder(ctx, "mlm"),
        spec.path,
        image_conditioned=spec.image_conditioned,
        device=ctx.device,
        batch_size=ctx.batch_size,
    )
    return _fused_metrics(raw)


def _alignment(ctx: EvalContext, spec) -> dict[str, Any]:
    from mmcli.evaluation.alignment import evaluate_alignment

    raw = evaluate_alignment(
        _run_folder(ctx, "alignment"), spec.path, regions=spec.regions, device=ctx.device, batch_size=ctx.batch_size
    )
    return _fused_metrics(raw)


def _captioning(ctx: EvalContext, spec) -> dict[str, Any]:
    from mmcli.evaluation.captioning import evaluate_captioning

    predictions = Path(spec.predictions or ctx.output.with_name(ctx.output.stem + "-captions.jsonl"))
    raw = evaluate_captioning(
        ctx.loaded,
        spec,
        device=ctx.device,
        batch_size=ctx.batch_size,
        workers=ctx.embedder.workers,
        predictions_path=predictions,
        notes=ctx.notes,
    )
    sheet = ctx.output.with_name(ctx.output.stem + "-captions.png")
    if raw["examples"]:
        from mmcli.viz.captions import caption_sheet

        caption_sheet(raw["examples"], sheet, title=f"captions of {ctx.loaded.ref}")
    return flatten({k: v for k, v in raw.items() if k != "examples"})


def _generation(ctx: EvalContext, spec) -> dict[str, Any]:
    from mmcli.evaluation.generation import evaluate_generation

    return flatten(
        evaluate_generation(ctx.loaded, spec, device=ctx.device, batch_size=ctx.batch_size, output=ctx.output)
    )


EVAL_TASKS: dict[str, EvalTask] = {
    "zero_shot": EvalTask("zeroshot_classification", _zero_shot),
    "retrieval": EvalTask("zeroshot_retrieval", _retrieval),
    "linear_probe": EvalTask("linear_probe", _linear_probe),
    "vqa": EvalTask("vqa", _vqa),
    "itm": EvalTask("image_text_matching", _itm),
    "mlm": EvalTask("masked_language_modelling", _mlm),
    "alignment": EvalTask("region_concept_alignment", _alignment),
    "captioning": EvalTask("captioning", _captioning),
    "generation": EvalTask("text_to_image", _generation),
}
"""Every eval task by the name of its spec section, in the order they run."""

choices.check_registry("eval tasks", EVAL_TASKS, choices.EVAL_TASKS)
