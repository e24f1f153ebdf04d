"""``mmcli retrieve QUERY --index emb.npy``: search an index with texts or images
(query encoding in :mod:`mmcli.retrieval.query`, search in :mod:`mmcli.retrieval.search`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmcli.errors import MmcliError
from mmcli.io import is_run_dir
from mmcli.retrieval import index as ix
from mmcli.retrieval.query import QueryEncoder, is_image_query
from mmcli.retrieval.search import make_searcher


def run(
    query: str | None,
    *,
    index_path: str,
    k: int = 10,
    queries_file: str | None = None,
    image: bool = False,
    use_faiss: bool = False,
    grid: str | None = None,
    overwrite: bool = False,
    model: str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Top-``k`` items of ``index_path`` for each query; see the CLI help for the options.

    ``overwrite`` lets a contact sheet replace a file mmcli did not write (see :func:`check_grid_paths`).
    """
    queries = collect_queries(query, queries_file)
    index = ix.open_index(index_path)
    if grid:
        check_grid_paths(index, [grid_path(grid, n, len(queries)) for n in range(len(queries))], overwrite=overwrite)
    encoder = QueryEncoder(index, model_ref=model, device=device)
    vectors = encoder.encode([(q, image or is_image_query(q)) for q in queries])
    search = make_searcher(index, use_faiss)
    scores, ids = search(vectors, k)
    out = []
    for n, q in enumerate(queries):
        hits = [
            {"rank": r + 1, "score": float(s), "row": int(i), "item": index.items[int(i)]}
            for r, (s, i) in enumerate(zip(scores[n], ids[n]))
            if i >= 0
        ]
        entry = {"query": q, "is_image": image or is_image_query(q), "results": hits}
        if grid:
            entry["grid"] = str(write_grid(index, hits, grid_path(grid, n, len(queries)), title=q))
        out.append(entry)
    return {
        "index": index_path,
        "count": len(index),
        "model": index.meta["model"],
        "k": k,
        "search": search.describe(),
        "queries": out,
    }


def collect_queries(query: str | None, queries_file: str | None) -> list[str]:
    """``query`` followed by the non-blank lines of ``queries_file``; at least one."""
    queries = [query] if query else []
    if queries_file:
        path = Path(queries_file)
        if not path.is_file():
            raise MmcliError(f"--queries {queries_file}: no such file")
        queries += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not queries:
        raise MmcliError("give a QUERY (a text or an image file) or --queries FILE")
    return queries


def grid_path(grid: str, n: int, total: int) -> Path:
    """``grid`` for a single query; ``out-001.png``, ``out-002.png``, … for several."""
    path = Path(grid)
    return path if total == 1 else path.with_name(f"{path.stem}-{n + 1:03d}{path.suffix or '.png'}")


def check_grid_paths(index: ix.Index, paths: list[Path], *, overwrite: bool) -> None:
    """Refuse, before anything is written, a contact sheet that would replace a file it must not.

    Never, even with ``overwrite``: a folder, a file of an index (:func:`~mmcli.retrieval.index.is_index_file`,
    or one of ``index``'s own files under any name or link), or a file of a run folder. A contact
    sheet mmcli wrote (:func:`~mmcli.viz.grid.is_contact_sheet`) may be replaced; any other
    existing file only with ``overwrite``.
    """
    from mmcli.viz.grid import is_contact_sheet

    if index.meta.get("modality") != "image" or index.meta.get("source", {}).get("format") == "webdataset":
        raise MmcliError(
            f"--grid: {index.path} does not hold image files (a {index.meta.get('modality')} index"
            f"{' of webdataset shards' if index.meta.get('modality') == 'image' else ''})"
        )
    own = {
        os.path.realpath(f + suffix)
        for f in (index.path, *index.files)
        for suffix in ("", ".json", ".faiss", ".faiss.json")
    }
    for path in paths:
        if not os.path.lexists(path):
            continue
        real = os.path.realpath(path)
        if os.path.isdir(real):
            raise MmcliError(f"--grid {path}: is a folder; name the PNG file to write")
        if real in own or ix.is_index_file(path) or ix.is_index_file(real):
            raise MmcliError(f"--grid {path}: is a file of an index; choose another file name")
        run_dir = next(
            (d for d in (os.path.dirname(os.path.abspath(path)), os.path.dirname(real)) if is_run_dir(d)), None
        )
        if run_dir is not None and not is_contact_sheet(real):
            raise MmcliError(f"--grid {path}: is a file of the run folder {run_dir}; choose another file name")
        if not overwrite and not is_contact_sheet(real):
            raise MmcliError(
                f"--grid {path}: exists and is not a contact sheet mmcli wrote; pass --overwrite to replace it"
            )


def write_grid(index: ix.Index, hits: list[dict], out: Path, *, title: str) -> Path:
    """A contact sheet of the hits' images (the index must hold image files: :func:`check_grid_paths`),
    each read from inside the index's root (:meth:`~mmcli.retrieval.index.Index.item_path`)."""
    from mmcli.viz.grid import contact_sheet

    paths = [index.item_path(hit["item"]) for hit in hits]
    return contact_sheet(paths, [hit["score"] for hit in hits], out, title=title)
