"""Run folders: atomic writes, safetensors weights, resumable training state, reloading.

A run folder holds::

    spec.yaml                    the resolved spec
    open_clip_config.json        {"model_cfg", "preprocess_cfg"}: rebuilds the dual encoder
    open_clip_model.safetensors  the dual encoder's weights (plain open_clip state dict)
    mmcli_model.safetensors      weights of any module beyond the dual encoder (fusion, heads)
    mmcli.json                   what mmcli needs beyond open_clip (extra modules, step, checksum)
    train_state.pt               optimizer, scheduler, step, data position, RNG states
    metrics.jsonl                training and validation metrics, one JSON object a line

Because of the first three files the folder loads in plain open_clip:
``open_clip.create_model("local-dir:runs/NAME")``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file, save_model, load_model

from mmcli.errors import MmcliError

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
EXTRA_WEIGHTS = "mmcli_model.safetensors"
MMCLI_META = "mmcli.json"
TRAIN_STATE = "train_state.pt"
METRICS = "metrics.jsonl"
SPEC = "spec.yaml"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def file_checksum(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def save_weights(run_dir: Path, model: torch.nn.Module, meta: dict[str, Any]) -> str:
    """Save the dual encoder (open_clip layout), extra modules and ``mmcli.json``; return checksum."""
    run_dir = Path(run_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in model.clip.state_dict().items()}
    atomic_write(run_dir / OPEN_CLIP_WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    extras = model.extra_modules()
    if extras:
        holder = torch.nn.ModuleDict(extras)
        # save_model (not save_file) because heads may tie weights to the token embedding.
        atomic_write(run_dir / EXTRA_WEIGHTS, lambda tmp: save_model(holder, str(tmp)))
    checksum = file_checksum(run_dir / OPEN_CLIP_WEIGHTS)
    atomic_write_text(run_dir / MMCLI_META, json.dumps({**meta, "checksum": checksum}, indent=2))
    return checksum


def save_open_clip_config(run_dir: Path, model_cfg: dict, preprocess_cfg: dict) -> None:
    """Write ``open_clip_config.json`` as open_clip's ``local-dir:`` loader expects it."""
    pre = {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess_cfg.items()}
    atomic_write_text(Path(run_dir) / OPEN_CLIP_CONFIG, json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre}, indent=2))


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


def load_weights_into(run_dir: Path, model: torch.nn.Module) -> None:
    """Load a run folder's weights into an already-built :class:`MultimodalModel`."""
    run_dir = Path(run_dir)
    path = run_dir / OPEN_CLIP_WEIGHTS
    if not path.is_file():
        raise MmcliError(f"{path}: missing weights file")
    model.clip.load_state_dict(load_file(str(path)))
    extras = model.extra_modules()
    if extras:
        extra_path = run_dir / EXTRA_WEIGHTS
        if not extra_path.is_file():
            raise MmcliError(f"{extra_path}: missing weights of {', '.join(extras)}")
        load_model(torch.nn.ModuleDict(extras), str(extra_path))


def read_meta(run_dir: Path) -> dict[str, Any]:
    """The run's ``mmcli.json``."""
    path = Path(run_dir) / MMCLI_META
    if not path.is_file():
        raise MmcliError(f"{run_dir}: not an mmcli run folder (no {MMCLI_META})")
    return json.loads(path.read_text(encoding="utf-8"))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (flushed, so an interrupted run keeps every line written)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
