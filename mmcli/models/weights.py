"""A model's files in a run folder: the dual encoder as plain open_clip safetensors, the modules
beyond it, ``mmcli.json`` and ``open_clip_config.json`` (file names in :mod:`mmcli.io`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from mmcli.errors import MmcliError
from mmcli.io import (
    EXTRA_WEIGHTS,
    MMCLI_META,
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS,
    atomic_write,
    atomic_write_text,
    file_checksum,
)


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
    config = {"model_cfg": model_cfg, "preprocess_cfg": pre}
    atomic_write_text(Path(run_dir) / OPEN_CLIP_CONFIG, json.dumps(config, indent=2))


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
