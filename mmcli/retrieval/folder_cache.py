"""``mmcli retrieve QUERY --in photos/``: the index of a folder, kept in the user's cache.

Each (folder, model) pair has its own index under ``<cache>/folders/<hash>/emb.npy``, where
``<cache>`` is mmcli's cache folder (:func:`mmcli.io.checksum_cache_dir`: ``$MMCLI_CACHE_DIR``,
else ``$XDG_CACHE_HOME/mmcli``, else ``~/.cache/mmcli``) and ``<hash>`` is taken from the folder's
real path and the model's identity (a run folder's real path and weights checksum, or the
reference). Kept outside the folder, so read-only folders (a mounted share, a camera card) can be
searched and nothing is added to the user's photos. ``folder.json`` beside it names both, so a
stale cache can be found and removed by hand.

The first search embeds the folder (``mmcli embed``); later ones bring the index up to date with
``embed --update`` (:mod:`mmcli.retrieval.incremental`). When nothing changed, :func:`unchanged`
says so from file signatures alone, without loading the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from mmcli import io
from mmcli.errors import MmcliError
from mmcli.retrieval import index as ix

if TYPE_CHECKING:
    from mmcli.retrieval.embedding import Inputs

INDEX_NAME = "emb.npy"
DESCRIPTION = "folder.json"


def folders_dir() -> Path:
    """Where folder indexes are kept: ``<mmcli cache>/folders``."""
    return io.checksum_cache_dir() / "folders"


def model_identity(ref: str) -> str:
    """What names the model in the cache key: a run folder's real path and the weights checksum of
    its ``mmcli.json`` (a run trained again in place gets a new index), else ``ref`` itself."""
    if not io.is_run_dir(ref):
        return ref
    try:
        checksum = json.loads((Path(ref) / io.MMCLI_META).read_text(encoding="utf-8")).get("checksum")
    except (OSError, ValueError) as exc:
        raise MmcliError(f"{Path(ref) / io.MMCLI_META}: unreadable ({exc})") from None
    return f"{os.path.realpath(ref)}@{checksum}"


def cached_index_path(folder: str | os.PathLike, model_ref: str) -> Path:
    """The index of ``folder`` embedded by ``model_ref`` (it may not exist yet); writes ``folder.json``
    beside it the first time."""
    root = os.path.realpath(folder)
    model = model_identity(model_ref)
    digest = hashlib.sha256(f"{root}\n{model}".encode()).hexdigest()[:24]
    where = folders_dir() / digest
    if not (where / DESCRIPTION).is_file():
        where.mkdir(parents=True, exist_ok=True)
        io.atomic_write_json(where / DESCRIPTION, {"folder": root, "model": model_ref})
    return where / INDEX_NAME


def folder_images(folder: str) -> Inputs:
    """The images of ``folder`` (as ``mmcli embed`` lists them), if it is a folder holding image
    files, not webdataset shards; else one line naming it."""
    from mmcli.retrieval.embedding import input_format, resolve_inputs

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise MmcliError(f"--in {folder}: no such folder")
    fmt = input_format(str(path))
    if fmt != "folder":
        raise MmcliError(f"--in {folder}: holds {fmt} shards, not image files; index them with mmcli embed")
    return resolve_inputs(str(path), "image")


def unchanged(index_path: Path, inputs: Inputs) -> dict[str, int] | None:
    """The update's counts when the complete index at ``index_path`` already holds every image of
    ``inputs`` as it is now (same files, sizes and modification times), else None: an update is due.

    A file the index skipped as unreadable counts as new, so it is tried again by the update.
    """
    from mmcli.retrieval.incremental import item_stats, plan_update

    if not ix.index_exists(index_path) or ix.IndexWriter.resume_state(index_path) is not None:
        return None
    old = ix.open_index(index_path)
    plan = plan_update(old, inputs.items, item_stats(inputs.items, "image"), "image")
    if plan.new or plan.changed or plan.deleted:
        return None
    return plan.summary()
