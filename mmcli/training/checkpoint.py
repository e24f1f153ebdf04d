"""A training checkpoint: the weights, and what a run needs to resume beyond them (optimizer,
scheduler, progress and RNG states in ``train_state.pt``), saved as one consistent set.

:func:`save_checkpoint` writes the training state, then the weights, each atomically, and
``mmcli.json`` last, naming the step and every file's checksum. A save interrupted at any point
(a kill, a power cut) leaves files that disagree with ``mmcli.json``; :func:`resume_into`
checks them all and refuses such a set with a clear message instead of resuming from weights of
one step and a state of another.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcli.errors import MmcliError
from mmcli.io import (
    EXTRA_WEIGHTS,
    METRICS,
    OPEN_CLIP_WEIGHTS,
    SPEC,
    TRAIN_STATE,
    atomic_write,
    atomic_write_text,
    file_checksum,
    read_meta,
)
from mmcli.models.weights import load_weights_into, save_weights, verify_files


def rng_state() -> dict[str, Any]:
    """Every RNG's state, in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_train_state(run_dir: Path, state: dict[str, Any]) -> str:
    """Save optimizer/scheduler/progress/RNG state atomically; return its checksum."""
    atomic_write(Path(run_dir) / TRAIN_STATE, lambda tmp: torch.save(state, tmp))
    return file_checksum(Path(run_dir) / TRAIN_STATE)


def save_checkpoint(run_dir: Path, model: torch.nn.Module, meta: dict[str, Any], state: dict[str, Any]) -> None:
    """The training state, the weights, then ``mmcli.json`` naming all of them (see the module
    docstring)."""
    digest = save_train_state(run_dir, state)
    save_weights(run_dir, model, meta, other_files={TRAIN_STATE: digest})


def verify_checkpoint(run_dir: Path) -> dict[str, Any]:
    """``mmcli.json`` of a run whose weights and training state are the set it names."""
    meta = read_meta(run_dir)
    if "files" in meta and TRAIN_STATE not in meta["files"]:
        raise MmcliError(f"{run_dir}: the saved model has no training state of its own; nothing to resume")
    verify_files(run_dir, meta, (OPEN_CLIP_WEIGHTS, EXTRA_WEIGHTS, TRAIN_STATE))
    return meta


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop the metric lines logged after ``step`` (a resumed run logs those steps again)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def load_train_state(run_dir: Path) -> dict[str, Any]:
    """Load the training state (``weights_only=True``: plain tensors and containers only)."""
    path = Path(run_dir) / TRAIN_STATE
    if not path.is_file():
        raise MmcliError(f"{path}: no training state to resume from")
    return torch.load(path, map_location="cpu", weights_only=True)


def resume_into(run_dir: Path, model: torch.nn.Module, resume: bool) -> dict[str, Any] | None:
    """With ``resume``, load the run's weights into ``model`` and return its training state."""
    if not resume:
        return None
    verify_checkpoint(run_dir)
    load_weights_into(run_dir, model)
    state = load_train_state(run_dir)
    trim_metrics(run_dir, int(state["progress"]["step"]))
    return state


def save_spec(run_dir: Path, spec: Any) -> None:
    """Write the resolved spec (a pydantic model) as ``spec.yaml``."""
    import yaml

    atomic_write_text(Path(run_dir) / SPEC, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
