"""Training curves: the panels of a run's ``metrics.jsonl`` drawn as ``curves.png``, and several
runs side by side (``mmcli eval --compare``).

The series come from the lines the training loop writes (``kind: train`` and ``kind: val``), so
the picture shows exactly the numbers of the file: :func:`curve_series` is the whole mapping from
lines to points, and the drawing only lays them out. matplotlib is imported when a picture is
drawn (Agg canvas, no display, no global backend changed), never when this module is imported.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mmcli.errors import MmcliError
from mmcli.io import METRICS, atomic_write

Series = tuple[list[int], list[float]]
"""Steps and values of one line of a panel."""

Curves = dict[str, dict[str, Series]]
"""Panel title → series label → points."""

LOSS, VALIDATION, LR, GRAD_NORM = "loss", "validation", "learning rate", "gradient norm (before clipping)"
PANELS = (LOSS, VALIDATION, LR, GRAD_NORM)
"""The panels, in reading order (left to right, top to bottom)."""

TRAIN_BOOKKEEPING = frozenset(
    {"step", "epoch", "lr", "grad_norm", "samples_per_s", "samples", "train_seconds", "skipped", "logit_scale"}
)
"""Numbers of a train line that are not losses: the loop's own fields and the tasks' ``log_values``
(CLIP's logit scale). Every other number of a train line is a loss (``loss``, the weighted sum, and
one per objective); ``tests/training`` checks this against what the loop writes."""

VAL_COUNTS = frozenset({"step", "val_pairs", "val_examples", "val_images"})
"""Numbers of a val line that are sizes of the held-out set, not scores."""

TOTAL_LOSS = "loss"
"""The weighted sum of the objectives' losses (the number the optimizer minimises)."""


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``metrics.jsonl`` file (a line cut short by a kill is left out)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def curve_series(records: Iterable[Mapping[str, Any]]) -> Curves:
    """The points of each panel: train losses (total and per objective) and validation losses in
    ``loss``; validation scores in ``validation``; ``lr`` and ``grad_norm`` in theirs. Lines are
    taken in file order; a panel or series with no point is left out."""
    curves: Curves = {panel: {} for panel in PANELS}

    def add(panel: str, label: str, step: int, value: float) -> None:
        steps, values = curves[panel].setdefault(label, ([], []))
        steps.append(step)
        values.append(float(value))

    for record in records:
        step, kind = record.get("step"), record.get("kind")
        if not _number(step):
            continue
        for key, value in record.items():
            if not _number(value):
                continue
            if kind == "train" and key not in TRAIN_BOOKKEEPING:
                add(LOSS, f"train {key}", step, value)
            elif kind == "train" and key == "lr":
                add(LR, key, step, value)
            elif kind == "train" and key == "grad_norm":
                add(GRAD_NORM, key, step, value)
            elif kind == "val" and key.startswith("val_loss"):
                add(LOSS, key, step, value)
            elif kind == "val" and key not in VAL_COUNTS:
                add(VALIDATION, key, step, value)
    return {panel: series for panel, series in curves.items() if series}


def run_curves(run_dir: str | Path) -> Curves:
    """The panels of a run folder's ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise MmcliError(f"{run_dir}: no {METRICS} (not a training run folder, or it has not logged a step yet)")
    return curve_series(read_metrics(path))


def draw_curves(runs: Mapping[str, Curves], path: str | Path, *, title: str = "") -> Path:
    """Write the panels of one or more runs as a PNG at ``path`` (atomically: a reader never sees
    half a picture, and a run redraws it while someone looks at it).

    One run: a colour per series. Several runs: a colour per run and a line style per series, so
    the same quantity of two runs shares a style and differs by colour."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    present = [p for p in PANELS if any(p in c for c in runs.values())]
    if not present:
        raise MmcliError(f"{', '.join(runs) or 'no run'}: nothing logged yet to draw")
    columns = 2 if len(present) > 1 else 1
    rows = -(-len(present) // columns)
    fig = Figure(figsize=(6.4 * columns, 3.6 * rows + (0.5 if title else 0.0)), layout="constrained")
    FigureCanvasAgg(fig)
    colours = _colours(len(runs))
    for i, panel in enumerate(present):
        ax = fig.add_subplot(rows, columns, i + 1)
        _draw_panel(ax, panel, runs, colours)
    if title:
        fig.suptitle(title, fontsize=11)
    if len(runs) > 1:
        _run_legend(fig, runs, colours)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return Path(path)


def _colours(n: int) -> list[str]:
    # Tableau's ten colours are told apart in print and by most colour-blind readers.
    palette = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "olive", "cyan")]
    return [palette[i % len(palette)] for i in range(max(n, 1))]


def _style(panel: str, label: str, points: int) -> dict[str, Any]:
    """Emphasis that means the same in every picture: the weighted total bold, validation losses
    dashed, chance dotted grey, a dot on each validation (they are few) and on a lone point."""
    dots = {"marker": "o", "markersize": 3.5} if panel == VALIDATION or points == 1 else {}
    if label == f"train {TOTAL_LOSS}":
        return {"linewidth": 2.2, **dots}
    if label.startswith("chance"):
        return {"linestyle": ":", "color": "0.45", "linewidth": 1.2}
    if label.startswith("val_loss"):
        return {"linestyle": "--", "marker": "o", "markersize": 3.5}
    return {"linewidth": 1.3, **dots}


def _order(label: str) -> int:
    # The number the optimizer minimises first, then the objectives, then validation.
    return 0 if label == f"train {TOTAL_LOSS}" else 2 if label.startswith("val_loss") else 1


def _draw_panel(ax, panel: str, runs: Mapping[str, Curves], colours: list[str]) -> None:
    compare = len(runs) > 1
    labels = [label for label in _labels(panel, runs) if not compare or _compared(panel, label)]
    for colour, curves in zip(colours, runs.values()):
        for label in labels:
            if label not in curves.get(panel, {}):
                continue
            steps, values = curves[panel][label]
            style = _style(panel, label, len(steps))
            if compare:
                style = {**style, "color": colour, "linestyle": _compare_style(label, labels)}
            ax.plot(steps, values, label=_legend_label(label), **style)
    values = [v for line in ax.get_lines() for v in line.get_ydata()]
    if panel in (LOSS, GRAD_NORM) and min(values) > 0 and max(values) / min(values) > 10:
        _log_scale(ax)  # a weighted sum of several losses next to one of them spans decades
    if panel in (LR, VALIDATION):
        from matplotlib.ticker import FuncFormatter

        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))  # no offset text above the axis
    if panel == VALIDATION and all(0 <= v <= 1 for v in values):
        ax.set_ylim(bottom=0)  # recall and accuracy: the distance from zero is the point
    ax.set_title(panel, fontsize=10, loc="left")
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    if len(labels) > 1:
        handles = _style_handles(panel, labels) if compare else None
        ax.legend(handles=handles, fontsize=7.5, frameon=False, ncols=2 if len(labels) > 4 else 1)


def _labels(panel: str, runs: Mapping[str, Curves]) -> list[str]:
    return sorted(dict.fromkeys(label for c in runs.values() for label in c.get(panel, {})), key=_order)


def _compared(panel: str, label: str) -> bool:
    """Whether a series is drawn when runs are compared: not the per-objective losses, which differ
    from run to run (each run's own ``curves.png`` has them, the table their last values)."""
    return panel != LOSS or _order(label) != 1


COMPARE_STYLES = ("-", "-.", (0, (5, 1.5)), (0, (3, 1, 1, 1, 1, 1)))
"""Line styles of the series of a compared panel (a colour per run); chance keeps its dots and
validation losses their dashes."""


def _compare_style(label: str, labels: list[str]) -> Any:
    if label.startswith("chance"):
        return ":"
    if label.startswith("val_loss"):
        return "--"
    plain = [x for x in labels if not x.startswith(("chance", "val_loss"))]
    return COMPARE_STYLES[plain.index(label) % len(COMPARE_STYLES)]


def _legend_label(label: str) -> str:
    if label == f"train {TOTAL_LOSS}":
        return "train loss (weighted sum)"
    return label.replace("_", " ")


def _log_scale(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    # Decades alone (10⁰, 10¹) say little about a loss: ticks at 1, 2, 5 × each decade, plain numbers.
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _style_handles(panel: str, labels: list[str]) -> list[Any]:
    from matplotlib.lines import Line2D

    return [
        Line2D(
            [],
            [],
            color="0.2",
            linestyle=_compare_style(label, labels),
            linewidth=_style(panel, label, 2).get("linewidth", 1.3),
            label=_legend_label(label),
        )
        for label in labels
    ]


def _run_legend(fig, runs: Mapping[str, Curves], colours: list[str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, linewidth=2.5, label=name) for c, name in zip(colours, runs)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(runs), 4), fontsize=8.5, frameon=False)


def compare_runs(run_dirs: Iterable[str | Path], out: str | Path) -> dict[str, Any]:
    """Draw several runs' panels in one picture (``mmcli eval --compare``); each run is named by
    its folder (with its parent when two share a name)."""
    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 1:
        raise MmcliError("--compare: name at least one run folder")
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):
        names = [str(Path(d.parent.name) / d.name) for d in dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in dirs]
    runs = {name: run_curves(d) for name, d in zip(names, dirs)}
    path = draw_curves(runs, out, title=" vs ".join(names))
    return {
        "out": str(path),
        "runs": [{"name": name, "run_dir": str(d), **final_values(runs[name])} for name, d in zip(names, dirs)],
    }


def final_values(curves: Curves) -> dict[str, Any]:
    """The last step of a run's curves and the last value of each series of its loss and
    validation panels (what a comparison table shows beside the picture)."""
    last = {label: values[-1] for panel in (LOSS, VALIDATION) for label, (_, values) in curves.get(panel, {}).items()}
    steps = [s for series in curves.values() for steps, _ in series.values() for s in steps]
    return {"steps": max(steps, default=0), "last": last}
