"""``mmcli eval SPEC.yaml`` (or flags): score one model on the tasks the spec names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmcli.errors import MmcliError
from mmcli.evaluation.results import RESULT_FORMATS, clip_benchmark_records, write_clip_benchmark
from mmcli.io import atomic_write_text
from mmcli.spec import EvalSpec, apply_overrides, check_kind, choices, read_yaml, validate


def spec_from(spec_path: Path | None, overrides: list[str], flags: dict[str, Any]) -> EvalSpec:
    """The eval spec of a YAML file and/or flags (flags and ``--set`` win over the file)."""
    data = read_yaml(spec_path) if spec_path is not None else {}
    if spec_path is not None:
        check_kind(spec_path, data, "eval")  # a pretrain or fuse file: name the command to run it with
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
    if not data.get("model"):  # neither the spec, --model nor --set names one: the default, as embed's
        from mmcli.models.defaults import default_model

        data["model"] = default_model()
    return validate(EvalSpec, data, str(spec_path) if spec_path else "eval flags")


def run(
    spec_path: Path | None,
    overrides: list[str],
    *,
    flags: dict[str, Any] | None = None,
    device: str = "auto",
    result_format: str = "json",
    progress: bool = True,
) -> dict[str, Any]:
    """Run every task of the spec; write the results; return them with the notes.

    ``result_format`` ``json`` writes mmcli's JSON list to the spec's ``output``; ``clip_benchmark``
    makes ``output`` a folder of CLIP_benchmark result files, one per task (and per shot count of
    the linear probe), that ``clip_benchmark build`` reads. ``progress`` draws the tasks and the
    embedding batches on stderr (stdout stays the results: ``--json`` is pure JSON)."""
    if result_format not in RESULT_FORMATS:
        raise MmcliError(f"--format {result_format}: choose {' or '.join(RESULT_FORMATS)}")
    spec = spec_from(spec_path, overrides, flags or {})
    from mmcli.distributed import resolve_device
    from mmcli.evaluation.image_text import Embedder
    from mmcli.evaluation.tasks import EVAL_TASKS, EvalContext
    from mmcli.models.loading import load_model

    output = Path(spec.output)
    if result_format == "clip_benchmark" and output.suffix == ".json":
        raise MmcliError(f"--format clip_benchmark writes one file per task: --out {output} must name a folder")
    # A folder of results: the tasks' pictures go inside it, under the JSON list's default name.
    side_files = output / "eval.json" if result_format == "clip_benchmark" else output
    side_files.parent.mkdir(parents=True, exist_ok=True)
    sections = [(name, task, getattr(spec, name)) for name, task in EVAL_TASKS.items()]
    sections = [(name, task, section) for name, task, section in sections if section is not None]
    with _EvalProgress(show=progress, tasks=len(sections)) as bar:
        dev = resolve_device(device)
        loaded = load_model(spec.model, device=dev)
        embedder = Embedder(loaded, device=dev, batch_size=spec.batch_size, workers=spec.workers, progress=bar)
        ctx = EvalContext(loaded=loaded, embedder=embedder, device=dev, batch_size=spec.batch_size, output=side_files)
        dataset = spec.dataset or _dataset_name(spec)
        results = []
        for name, task, section in sections:
            bar.task(name)
            metrics = task.run(ctx, section)
            results.append(
                {
                    "dataset": dataset,
                    "model": loaded.arch,
                    "pretrained": loaded.ref,
                    "checksum": loaded.checksum,
                    "task": task.result_name,
                    "metrics": metrics,
                }
            )
    if embedder.skipped:
        ctx.notes.append(
            f"{len(embedder.skipped)} unreadable images left out, e.g. {embedder.skipped[0][0]} "
            f"({embedder.skipped[0][1]})"
        )
    if result_format == "clip_benchmark":
        probe = spec.linear_probe
        shots, seed = (probe.shots, probe.seed) if probe else ([], 0)
        files = write_clip_benchmark(clip_benchmark_records(results, shots, seed), output)
        ctx.notes.append(f"{len(files)} CLIP_benchmark result files in {output} (clip_benchmark build {output})")
    else:
        atomic_write_text(output, json.dumps(results, indent=2, default=str) + "\n")
    return {
        "json": str(output),
        "format": result_format,
        "results": results,
        "notes": ctx.notes,
        "skipped": [{"item": p, "reason": r} for p, r in embedder.skipped],
    }


class _EvalProgress:
    """Two rich bars on stderr, gone when done: the tasks, and the batches being embedded."""

    def __init__(self, *, show: bool, tasks: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
            disable=not show,
        )
        self.tasks = self.bar.add_task("loading the model", total=tasks)
        self.batches = None
        self.started = False

    def __enter__(self) -> _EvalProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def task(self, name: str) -> None:
        """Task ``name`` begins (the previous one, if any, is done)."""
        if self.started:
            self.bar.advance(self.tasks)
        self.started = True
        self.bar.update(self.tasks, description=f"eval {name}")

    def start(self, what: str, total: int) -> None:
        """A pass of the embedder begins (:class:`mmcli.evaluation.image_text.EmbedProgress`)."""
        if self.batches is None:
            self.batches = self.bar.add_task(what, total=total)
        else:
            self.bar.reset(self.batches, total=total, description=what)

    def advance(self, n: int) -> None:
        """``n`` more items embedded."""
        if self.batches is not None:
            self.bar.advance(self.batches, n)


def _dataset_name(spec: EvalSpec) -> str:
    for task in choices.EVAL_TASKS:
        task_spec = getattr(spec, task)
        if task_spec is not None:
            path = task_spec.train.path if task == "linear_probe" else task_spec.path
            return Path(path).expanduser().resolve().parent.name if Path(path).is_file() else Path(path).name
    raise MmcliError("no task")  # unreachable: EvalSpec requires one


def compare_curves(run_dirs: list[Path], out: str | None, *, unused: list[str] | None = None) -> dict[str, Any]:
    """``mmcli eval --compare RUN…``: the training curves of several run folders in one picture
    (the panels of each run's ``curves.png``, a colour per run), with each run's last values."""
    from mmcli.viz.curves import compare_runs

    if unused:
        raise MmcliError(f"--compare draws run folders' curves; it takes no {', '.join(unused)}")
    if not run_dirs:
        raise MmcliError("--compare: name the run folders to compare, e.g. mmcli eval --compare runs/a runs/b")
    return compare_runs(run_dirs, Path(out) if out else Path("compare.png"))
