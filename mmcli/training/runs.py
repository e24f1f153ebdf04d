"""Setting up a run: its folder (new, replaced or resumed) and its seeds.

A failed start never touches the previous run. Everything that can be checked (spec, data, base
run) is checked before :func:`run_folder` is entered; with ``output.overwrite`` an existing run
is moved aside (``.<name>.replaced-<pid>`` beside it), not deleted, and is put back if the new
run fails before it has saved a checkpoint of its own. Only a folder that mmcli recognises as a
run folder is ever replaced.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from mmcli.errors import MmcliError
from mmcli.io import METRICS, MMCLI_META, SPEC, TRAIN_STATE, remove_stale_temporaries


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` holds a run mmcli wrote: a readable ``mmcli.json``, or a resolved spec
    beside training metrics (a run stopped before its first checkpoint)."""
    meta = path / MMCLI_META
    if meta.is_file():
        try:
            return isinstance(json.loads(meta.read_text(encoding="utf-8")), dict)
        except (OSError, ValueError):
            return False
    return (path / SPEC).is_file() and (path / METRICS).is_file()


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run has saved something to resume from."""
    return (run_dir / TRAIN_STATE).is_file() and (run_dir / MMCLI_META).is_file()


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is written, a run folder that ``--resume``/``overwrite`` cannot use
    (after finishing a replacement that a killed process left half done, see :func:`recover`)."""
    recover(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise MmcliError(f"{run_dir}: exists and is not a folder; choose another output.name")
    if resume:
        if not has_checkpoint(run_dir):
            raise MmcliError(f"{run_dir}: nothing to resume (no {TRAIN_STATE}); run without --resume")
        return
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    if not is_run_folder(run_dir):
        raise MmcliError(f"{run_dir}: the folder holds files that are not an mmcli run; choose another output.name")
    if not overwrite:
        raise MmcliError(
            f"{run_dir}: a run already exists there; use --resume to continue it, "
            f"--set output.overwrite=true to start over, or another output.name"
        )


def _set_aside(run_dir: Path) -> list[Path]:
    return sorted(run_dir.parent.glob(f".{glob.escape(run_dir.name)}.replaced-*"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(run_dir: Path) -> None:
    """Finish what a process killed while replacing ``run_dir`` left: its new run is kept if it
    saved a checkpoint (the old one, set aside, is removed), else the old run is put back."""
    for aside in _set_aside(run_dir):
        pid = aside.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            raise MmcliError(f"{run_dir}: process {pid} is replacing this run right now")
        if has_checkpoint(run_dir):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            _put_back(run_dir, aside)


def _put_back(run_dir: Path, aside: Path | None) -> None:
    """Remove a new run that saved nothing and move the run it replaced back in its place."""
    if run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
    if run_dir.exists():  # a file we may not delete (an NFS handle, an immutable file): move it all
        os.replace(run_dir, run_dir.with_name(f".{run_dir.name}.failed-{os.getpid()}"))
    if aside is not None:
        os.replace(aside, run_dir)


@contextmanager
def run_folder(run_dir: Path, *, resume: bool, overwrite: bool, is_main: bool) -> Iterator[Path]:
    """The run folder for the block: created, resumed, or replaced (see the module docstring).

    When the block ends (normally, by an exception or by a signal) without the new run having
    saved a checkpoint, the new folder is removed and the run it replaced, if any, is put back; a
    run that saved one stays, resumable, and the old one is removed. Only the main rank checks
    and changes the folder (the others would see its first files as someone else's). A process
    killed meanwhile leaves the old run set aside; the next command on the folder finishes the
    job (:func:`recover`)."""
    run_dir = Path(run_dir)
    aside = None
    if is_main:
        check_run_dir(run_dir, resume=resume, overwrite=overwrite)
        if run_dir.is_dir():
            remove_stale_temporaries(run_dir)
        if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
            aside = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
            os.replace(run_dir, aside)
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield run_dir
    finally:
        if is_main and not resume:
            if not has_checkpoint(run_dir):
                try:
                    _put_back(run_dir, aside)
                except OSError as exc:
                    raise MmcliError(
                        f"{run_dir}: could not put the previous run back ({exc}); it is kept in {aside}"
                    ) from None
            elif aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
