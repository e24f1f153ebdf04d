"""The files ``mmcli eval`` writes its results to, for mmcli and for other tools.

``json`` is mmcli's own: one JSON list of ``{dataset, model, pretrained, checksum, task,
metrics}`` records. ``clip_benchmark`` is LAION's CLIP_benchmark's: one JSON object per file,
``{dataset, model, pretrained, task, metrics, language}``, in a folder its ``build`` command
(``clip_benchmark build DIR``) reads whole, so mmcli's figures land in the same CSV as
CLIP_benchmark's own runs. Nothing here imports torch or numpy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

RESULT_FORMATS = ("json", "clip_benchmark")
"""What ``mmcli eval --format`` writes: one JSON list, or a folder of CLIP_benchmark result files."""

CLIP_BENCHMARK_METRICS = {
    "zeroshot_classification": ("acc1", "acc5", "mean_per_class_recall"),
    "linear_probe": ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall"),
}
"""The metrics CLIP_benchmark reports for a task (``clip_benchmark/metrics/*.py``); retrieval's
``image_retrieval_recall@K`` and ``text_retrieval_recall@K`` are mmcli's names already. Tasks
CLIP_benchmark does not have keep mmcli's metrics."""

LANGUAGE = "en"
"""CLIP_benchmark's ``language`` field: mmcli's prompt templates are English."""


def probe_key(metric: str, k: int | None) -> str:
    """The results key of one linear-probe figure: ``metric`` for all examples, ``metric_{k}shot``."""
    return metric if k is None else f"{metric}_{k}shot"


def clip_benchmark_records(results: list[dict[str, Any]], shots: list[int | None], seed: int) -> list[dict[str, Any]]:
    """One CLIP_benchmark record per task of ``results`` (mmcli's records), and per shot count of
    the linear probe: CLIP_benchmark runs one ``fewshot_k`` at a time (-1: all examples) and
    writes it beside the figures, with the ``seed``. The probe's regularisation is written as
    ``C`` (scikit-learn's inverse strength), not as CLIP_benchmark's ``weight_decay``, which is
    another parametrisation."""
    records = []
    for entry in results:
        head = {"dataset": entry["dataset"], "model": entry["model"], "pretrained": entry["pretrained"]}
        if entry["task"] == "linear_probe":
            for k in shots:
                figures = {n: entry["metrics"][probe_key(n, k)] for n in CLIP_BENCHMARK_METRICS["linear_probe"]}
                extra = {"C": entry["metrics"][probe_key("lp_C", k)], "fewshot_k": -1 if k is None else k, "seed": seed}
                records.append({**head, "task": "linear_probe", "metrics": {**figures, **extra}, "language": LANGUAGE})
            continue
        names = CLIP_BENCHMARK_METRICS.get(entry["task"])
        metrics = entry["metrics"]
        if entry["task"] == "zeroshot_retrieval":
            names = [n for n in metrics if "_retrieval_recall@" in n]
        kept = {n: metrics[n] for n in names} if names else _scalars(metrics)
        records.append({**head, "task": entry["task"], "metrics": kept, "language": LANGUAGE})
    return records


def clip_benchmark_file_name(record: dict[str, Any]) -> str:
    """CLIP_benchmark's default ``{dataset}_{pretrained}_{model}_{language}_{task}.json`` (plus
    ``_{k}shot`` for a few-shot probe), with characters other than letters, digits, ``.-+@``
    replaced by ``_`` (a run folder's path is the ``pretrained`` of an mmcli model)."""
    parts = [record["dataset"], record["pretrained"], record["model"], record["language"], record["task"]]
    k = record["metrics"].get("fewshot_k", -1) if record["task"] == "linear_probe" else -1
    if k != -1:
        parts.append(f"{k}shot")
    return "_".join(re.sub(r"[^\w.+@-]+", "_", str(p)).strip("_") for p in parts) + ".json"


def write_clip_benchmark(records: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Write each record to its own file in ``folder`` (created); return the paths."""
    from mmcli.io import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for record in records:
        path = folder / clip_benchmark_file_name(record)
        atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
        paths.append(path)
    return paths


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    # A CSV cell holds a number or a string: lists and nested rows stay in mmcli's own JSON.
    return {k: v for k, v in metrics.items() if not isinstance(v, (dict, list, tuple))}
