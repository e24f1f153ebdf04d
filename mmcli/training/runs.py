"""Setting up a run: its folder (new, replaced or resumed) and its seeds."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mmcli.errors import MmcliError
from mmcli.io import METRICS, MMCLI_META, TRAIN_STATE


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(spec, *, resume: bool, is_main: bool) -> Path:
    """Check the run folder of ``spec`` (a pretrain or fuse spec) against ``--resume`` and
    ``output.overwrite``, and create it."""
    run_dir = spec.run_dir()
    has_run = (run_dir / MMCLI_META).is_file() or (run_dir / METRICS).is_file()
    if resume:
        if not (run_dir / TRAIN_STATE).is_file():
            raise MmcliError(f"{run_dir}: nothing to resume (no {TRAIN_STATE}); run without --resume")
    elif has_run:
        if not spec.output.overwrite:
            raise MmcliError(
                f"{run_dir}: a run already exists there; use --resume to continue it, "
                f"--set output.overwrite=true to start over, or another output.name"
            )
        if is_main:
            shutil.rmtree(run_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir
