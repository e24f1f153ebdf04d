"""Confusion-matrix pictures (matplotlib's Agg canvas: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def plot_confusion(matrix: Any, class_names: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """Save ``matrix`` (C×C counts) as a PNG heat map coloured by recall (row-normalised).

    Counts are written in the cells up to 30 classes; the figure grows with C so that the
    (rotated) class names stay readable.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(matrix)
    n = len(class_names)
    if counts.shape != (n, n):
        raise ValueError(f"matrix must be {n}×{n} for {n} class names, got {counts.shape}")
    recall = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.4 * n + 2.0)
    fig = Figure(figsize=(side + 1.0, side))
    FigureCanvasAgg(fig)  # attaches a non-interactive canvas; no global backend is changed
    ax = fig.add_subplot()
    image = ax.imshow(recall, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="recall (row-normalised)")
    fontsize = max(5, min(10, 240 // max(n, 1)))
    ax.set_xticks(range(n), labels=class_names, rotation=60, ha="right", fontsize=fontsize)
    ax.set_yticks(range(n), labels=class_names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        _annotate_counts(ax, counts, recall, fontsize)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def _annotate_counts(ax, counts: np.ndarray, recall: np.ndarray, fontsize: int) -> None:
    for (row, col), count in np.ndenumerate(counts):
        if count:
            colour = "white" if recall[row, col] > 0.5 else "black"  # stays legible on dark cells
            ax.text(col, row, str(count), ha="center", va="center", fontsize=fontsize, color=colour)
