"""``mmcli eval SPEC.yaml`` (or flags): score one model on the tasks the spec names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from mmcli.errors import MmcliError
from mmcli.spec import EVAL_TASKS, EvalSpec, apply_overrides, read_yaml, validate

TASK_NAMES = {"zero_shot": "zeroshot_classification", "retrieval": "zeroshot_retrieval",
              "linear_probe": "linear_probe", "vqa": "vqa", "itm": "image_text_matching", "mlm": "masked_language_modelling",
              "alignment": "region_concept_alignment"}
"""The ``task`` written in the results, as CLIP_benchmark names its tasks where it has them."""


def spec_from(spec_path: Optional[Path], overrides: list[str], flags: dict[str, Any]) -> EvalSpec:
    """The eval spec of a YAML file and/or flags (flags and ``--set`` win over the file)."""
    data = read_yaml(spec_path) if spec_path is not None else {}
    for key, value in flags.items():
        if value is not None:
            if key in ("zero_shot", "retrieval"):
                data[key] = {**data.get(key, {}), "path": value}
            elif key == "linear_probe":
                data[key] = {**data.get(key, {}), "train": {"path": value}}
            elif key == "templates":
                data.setdefault("zero_shot", {})["templates"] = value.split("|") if "{}" in value else value
            else:
                data[key] = value
    data = apply_overrides(data, overrides)
    return validate(EvalSpec, data, str(spec_path) if spec_path else "eval flags")


def run(spec_path: Optional[Path], overrides: list[str], *, flags: dict[str, Any] | None = None,
        device: str = "auto") -> dict[str, Any]:
    """Run every task of the spec; write the JSON results; return them with the notes."""
    spec = spec_from(spec_path, overrides, flags or {})
    from mmcli.evaluation import image_text as evaluation
    from mmcli.distributed import resolve_device
    from mmcli.models.loading import load_model

    dev = resolve_device(device)
    loaded = load_model(spec.model, device=dev)
    embedder = evaluation.Embedder(loaded, device=dev, batch_size=spec.batch_size, workers=spec.workers)
    output = Path(spec.output)
    dataset = spec.dataset or _dataset_name(spec)
    results, notes = [], []
    for task in EVAL_TASKS:
        task_spec = getattr(spec, task)
        if task_spec is None:
            continue
        if task == "zero_shot":
            png = task_spec.confusion or str(output.with_name(output.stem + "-confusion.png"))
            scores = evaluation.zero_shot(embedder, task_spec, confusion_png=png)
            if scores["acc5"] is None:
                notes.append(f"zero-shot acc5: not available with {scores['n_classes']} classes (needs 5)")
        elif task == "retrieval":
            scores = evaluation.retrieval(embedder, task_spec)
        elif task == "linear_probe":
            scores = evaluation.linear_probe(embedder, task_spec)
        else:
            raw = evaluation.fusion_task(task, spec.model, task_spec.path, device=dev, batch_size=spec.batch_size,
                                         image_conditioned=getattr(task_spec, "image_conditioned", False),
                                         regions=getattr(task_spec, "regions", None))
            scores = flatten({k: v for k, v in raw.items() if k not in ("task", "data", "rows", "predictions")})
        results.append({"dataset": dataset, "model": loaded.arch, "pretrained": loaded.ref,
                        "checksum": loaded.checksum, "task": TASK_NAMES[task], "metrics": scores})
    if embedder.skipped:
        notes.append(f"{len(embedder.skipped)} unreadable images left out, e.g. {embedder.skipped[0][0]} "
                     f"({embedder.skipped[0][1]})")
    _write_json(output, results)
    return {"json": str(output), "results": results, "notes": notes,
            "skipped": [{"item": p, "reason": r} for p, r in embedder.skipped]}


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics as one level of ``a.b`` keys (lists are dropped: they are rows, not metrics)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        elif not isinstance(value, (list, tuple)):
            out[f"{prefix}{key}"] = value
    return out


def _dataset_name(spec: EvalSpec) -> str:
    for task in EVAL_TASKS:
        task_spec = getattr(spec, task)
        if task_spec is not None:
            path = task_spec.train.path if task == "linear_probe" else task_spec.path
            return Path(path).expanduser().resolve().parent.name if Path(path).is_file() else Path(path).name
    raise MmcliError("no task")  # unreachable: EvalSpec requires one


def _write_json(path: Path, results: list[dict]) -> None:
    from mmcli.io import atomic_write_text

    atomic_write_text(path, json.dumps(results, indent=2, default=str) + "\n")
