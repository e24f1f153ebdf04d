"""Where a run's numbers go: ``metrics.jsonl`` (always), TensorBoard events (``train.tensorboard``)
and ``curves.png``, the picture of the file, redrawn at each validation and at the end.

Only the main rank writes. The picture is drawn from the file, not from numbers kept in memory, so
it shows exactly what the file holds, the steps of earlier sessions of a resumed run included.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mmcli import io
from mmcli.errors import MmcliError

TENSORBOARD_DIR = "tensorboard"
"""Sub-folder of the run folder that holds the TensorBoard event files."""

NOT_SCALARS = ("step", "kind", "epoch")
"""Fields of a metrics line that are not series of their own (TensorBoard's step is ``step``)."""


def tensorboard_writer(log_dir: Path, purge_step: int | None):
    """A TensorBoard ``SummaryWriter`` (torch's); events of an earlier session at or after
    ``purge_step`` are hidden, as ``metrics.jsonl`` drops its lines after a resumed step."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MmcliError(
            "train.tensorboard: needs the tensorboard package (pip install 'mmcli[tensorboard]'), "
            "or set train.tensorboard=false"
        ) from None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of a metrics line: ``<kind>/<field>`` for each finite number."""
    kind = record.get("kind", "train")
    return {
        f"{kind}/{key}": float(value)
        for key, value in record.items()
        if key not in NOT_SCALARS
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


class RunLog:
    """The run folder's record of training: one call per metrics line, one per picture."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, resumed_at: int | None) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            purge = resumed_at + 1 if resumed_at is not None else None
            self.writer = tensorboard_writer(self.run_dir / TENSORBOARD_DIR, purge)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` (and to the TensorBoard events)."""
        if not self.enabled:
            return
        io.append_jsonl(self.run_dir / io.METRICS, record)
        if self.writer is not None:
            for tag, value in scalars(record).items():
                self.writer.add_scalar(tag, value, global_step=int(record["step"]))
            self.writer.flush()  # a reader (TensorBoard itself) sees each line as the file does

    def draw(self) -> None:
        """Redraw ``curves.png`` from ``metrics.jsonl``."""
        if not self.enabled or not (self.run_dir / io.METRICS).is_file():
            return
        from mmcli.viz.curves import curve_series, draw_curves, read_metrics

        curves = curve_series(read_metrics(self.run_dir / io.METRICS))
        if curves:
            draw_curves({self.run_dir.name: curves}, self.run_dir / io.CURVES, title=self.run_dir.name)

    def close(self) -> None:
        """Close the TensorBoard writer (its last events are flushed)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
