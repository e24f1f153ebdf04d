"""Files that must never be seen half-written, the names of a run folder's files, and the file
formats every stage shares (no torch, no numpy: the CLI imports it).

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
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmcli.errors import MmcliError

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
EXTRA_WEIGHTS = "mmcli_model.safetensors"
MMCLI_META = "mmcli.json"
TRAIN_STATE = "train_state.pt"
METRICS = "metrics.jsonl"
SPEC = "spec.yaml"

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""Suffixes of the image files mmcli reads (compared in lower case)."""

TEXT_SUFFIXES = (".txt",)
"""Suffixes of a text file of one query or caption per line."""

WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
"""The image members of a webdataset sample, tried in this order (img2dataset's layout)."""

WEBDATASET_TEXT_KEY = "txt"
"""The caption member of a webdataset sample."""

SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".tar": "webdataset"}
"""The source format a data file's suffix implies (``format: auto``)."""

DEFAULT_IMAGE_KEY = "filepath"
"""Image column of a CSV/TSV/JSONL source (open_clip's default)."""

DEFAULT_TEXT_KEY = "title"
"""Caption column of a CSV/TSV/JSONL source (open_clip's default)."""


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A reader sees the old file or the new one, never part of one; when ``write`` (or the rename)
    fails the temporary file is removed and ``path`` is untouched. The new file gets the
    permissions of a normally created one (0666 less the umask), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        fd = -1
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False))


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line (flushed, so an interrupted run keeps every line written)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def file_checksum(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def is_run_dir(ref: str | os.PathLike) -> bool:
    """True when ``ref`` is a folder written by ``mmcli pretrain``/``fuse``."""
    return (Path(ref) / MMCLI_META).is_file()


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``mmcli.json``."""
    path = Path(run_dir) / MMCLI_META
    if not path.is_file():
        raise MmcliError(f"{run_dir}: not an mmcli run folder (no {MMCLI_META})")
    return json.loads(path.read_text(encoding="utf-8"))
