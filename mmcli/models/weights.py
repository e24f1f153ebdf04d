"""A model's files in a run folder: the dual encoder as plain open_clip safetensors, the modules
beyond it, ``mmcli.json`` and ``open_clip_config.json`` (file names in :mod:`mmcli.io`).

``mmcli.json`` is written last and is the manifest of one saved step: its ``files`` name the
SHA-256 of every file of that step (weights, extra modules, and for a training checkpoint the
training state). Loading verifies the weights against it (:func:`verify_files`), so a swapped,
corrupted or half-written weights file is a clear error, not a silently different model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from mmcli.errors import MmcliError
from mmcli.io import (
    EXTRA_WEIGHTS,
    MMCLI_META,
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS,
    atomic_write,
    atomic_write_text,
    cached_checksum,
    file_checksum,
)


def save_weights(
    run_dir: Path, model: torch.nn.Module, meta: dict[str, Any], other_files: dict[str, str] | None = None
) -> str:
    """Save the dual encoder (open_clip layout) and extra modules, then ``mmcli.json`` naming
    their checksums (and those of ``other_files``, already written); return the dual encoder's."""
    run_dir = Path(run_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in model.clip.state_dict().items()}
    atomic_write(run_dir / OPEN_CLIP_WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    files = {OPEN_CLIP_WEIGHTS: file_checksum(run_dir / OPEN_CLIP_WEIGHTS)}
    extras = model.extra_modules()
    if extras:
        holder = torch.nn.ModuleDict(extras)
        # save_model (not save_file) because heads may tie weights to the token embedding.
        atomic_write(run_dir / EXTRA_WEIGHTS, lambda tmp: save_model(holder, str(tmp)))
        files[EXTRA_WEIGHTS] = file_checksum(run_dir / EXTRA_WEIGHTS)
    files.update(other_files or {})
    checksum = files[OPEN_CLIP_WEIGHTS]
    atomic_write_text(run_dir / MMCLI_META, json.dumps({**meta, "checksum": checksum, "files": files}, indent=2))
    return checksum


def verify_files(run_dir: Path, meta: dict[str, Any], names: tuple[str, ...]) -> None:
    """Check that the files ``names`` of a run folder are those its ``mmcli.json`` describes.

    Runs saved before the manifest named every file are checked on the dual encoder's weights
    (the ``checksum`` they always recorded). Checksums are cached by size and modification time
    (:func:`mmcli.io.cached_checksum`), so an unchanged file is hashed once."""
    run_dir = Path(run_dir)
    files = meta.get("files") or {}
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise MmcliError(f"{Path(run_dir) / MMCLI_META}: 'files' is not a map of file names to checksums")
    expected = dict(files)
    if not expected and meta.get("checksum"):
        expected = {OPEN_CLIP_WEIGHTS: meta["checksum"]}
    for name in names:
        if name not in expected:
            continue
        path = run_dir / name
        if not path.is_file():
            raise MmcliError(f"{path}: missing (the run's {MMCLI_META} names it)")
        if cached_checksum(path) != expected[name]:
            raise MmcliError(
                f"{path}: its checksum differs from the one {MMCLI_META} records for step {meta.get('step', '?')}: "
                "the file was replaced, corrupted or only partly written (an interrupted save?)"
            )


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
    try:
        model.clip.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError) as exc:
        raise MmcliError(f"{path}: not a readable safetensors file ({exc})") from None
    extras = model.extra_modules()
    if extras:
        extra_path = run_dir / EXTRA_WEIGHTS
        if not extra_path.is_file():
            raise MmcliError(f"{extra_path}: missing weights of {', '.join(extras)}")
        try:
            load_model(torch.nn.ModuleDict(extras), str(extra_path))
        except (SafetensorError, OSError) as exc:
            raise MmcliError(f"{extra_path}: not a readable safetensors file ({exc})") from None
