"""``mmcli eval SPEC.yaml`` (or flags): score one model on the tasks the spec names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmcli.errors import MmcliError
from mmcli.io import atomic_write_text
from mmcli.spec import EvalSpec, apply_overrides, choices, read_yaml, validate


def spec_from(spec_path: Path | None, overrides: list[str], flags: dict[str, Any]) -> EvalSpec:
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


def run(
    spec_path: Path | None, overrides: list[str], *, flags: dict[str, Any] | None = None, device: str = "auto"
) -> dict[str, Any]:
    """Run every task of the spec; write the JSON results; return them with the notes."""
    spec = spec_from(spec_path, overrides, flags or {})
    from mmcli.distributed import resolve_device
    from mmcli.evaluation.image_text import Embedder
    from mmcli.evaluation.tasks import EVAL_TASKS, EvalContext
    from mmcli.models.loading import load_model

    dev = resolve_device(device)
    loaded = load_model(spec.model, device=dev)
    embedder = Embedder(loaded, device=dev, batch_size=spec.batch_size, workers=spec.workers)
    ctx = EvalContext(
        loaded=loaded, embedder=embedder, device=dev, batch_size=spec.batch_size, output=Path(spec.output)
    )
    dataset = spec.dataset or _dataset_name(spec)
    results = []
    for name, task in EVAL_TASKS.items():
        section = getattr(spec, name)
        if section is not None:
            results.append(
                {
                    "dataset": dataset,
                    "model": loaded.arch,
                    "pretrained": loaded.ref,
                    "checksum": loaded.checksum,
                    "task": task.result_name,
                    "metrics": task.run(ctx, section),
                }
            )
    if embedder.skipped:
        ctx.notes.append(
            f"{len(embedder.skipped)} unreadable images left out, e.g. {embedder.skipped[0][0]} "
            f"({embedder.skipped[0][1]})"
        )
    atomic_write_text(ctx.output, json.dumps(results, indent=2, default=str) + "\n")
    return {
        "json": str(ctx.output),
        "results": results,
        "notes": ctx.notes,
        "skipped": [{"item": p, "reason": r} for p, r in embedder.skipped],
    }


def _dataset_name(spec: EvalSpec) -> str:
    for task in choices.EVAL_TASKS:
        task_spec = getattr(spec, task)
        if task_spec is not None:
            path = task_spec.train.path if task == "linear_probe" else task_spec.path
            return Path(path).expanduser().resolve().parent.name if Path(path).is_file() else Path(path).name
    raise MmcliError("no task")  # unreachable: EvalSpec requires one
