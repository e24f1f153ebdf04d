"""What a run needs to resume beyond its weights: optimizer, scheduler, progress and RNG states
(``train_state.pt``), and the resolved spec (``spec.yaml``)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcli.errors import MmcliError
from mmcli.io import SPEC, TRAIN_STATE, atomic_write, atomic_write_text
from mmcli.models.weights import load_weights_into


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


def save_train_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Save optimizer/scheduler/progress/RNG state atomically."""
    atomic_write(Path(run_dir) / TRAIN_STATE, lambda tmp: torch.save(state, tmp))


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
    load_weights_into(run_dir, model)
    return load_train_state(run_dir)


def save_spec(run_dir: Path, spec: Any) -> None:
    """Write the resolved spec (a pydantic model) as ``spec.yaml``."""
    import yaml

    atomic_write_text(Path(run_dir) / SPEC, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
