"""``mmcli data``: dataset utilities (the built-in shapes dataset)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def run_shapes(
    out: str | Path, n: int = 2000, size: int = 64, seed: int = 0, *, overwrite: bool = False
) -> dict[str, Any]:
    """Write the built-in shapes dataset to ``out``; return its summary (counts, paths, seconds).

    Files of the dataset's names that mmcli did not write are replaced only with ``overwrite``.

    Prints nothing: the CLI formats the summary (a table, or JSON with ``--json``).
    """
    from mmcli.data.shapes import generate  # keeps ``mmcli --help`` free of numpy/PIL imports

    start = time.perf_counter()
    summary = generate(Path(out), n=n, size=size, seed=seed, overwrite=overwrite)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary
