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
    index_path: str | None = None,
    folder: str | None = None,
    k: int = 10,
    queries_file: str | None = None,
    image: bool = False,
    use_faiss: bool = False,
    grid: str | None = None,
    overwrite: bool = False,
    model: str | None = None,
    threshold: float | None = None,
    max_memory: str | None = None,
    paths_only: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Top-``k`` items of ``index_path``, or of the images of ``folder`` (:func:`folder_index`), for
    each query (those scoring at least ``threshold``, when given); see the CLI help for the options.
    Image rows carry their absolute ``path``; rows with metadata their ``caption`` and kept columns.

    ``overwrite`` lets a contact sheet replace a file mmcli did not write (see :func:`check_grid_paths`);
    ``paths_only`` (``--paths``) is refused, before any work, for an index whose rows are not image files.
    """
    queries, blank = collect_queries(query, queries_file)
    if (index_path is None) == (folder is None):
        raise MmcliError("give --index INDEX (an index written by embed) or --in FOLDER (a folder of images)")
    notes = [f"--queries {queries_file}: {blank} blank line{'s' * (blank != 1)} skipped"] if blank else []
    refreshed = None
    if folder is not None:
        refreshed = folder_index(folder, model=model, device=device, progress=progress)
        index_path, model = refreshed["index"], None  # the cached index names the model that made it
        notes += refreshed.pop("notes")
    index = ix.open_index(index_path)
    if paths_only and not has_image_files(index):
        raise MmcliError(f"--paths: {index.path} does not hold image files (a {index.meta.get('modality')} index)")
    if grid:
        check_grid_paths(index, [grid_path(grid, n, len(queries)) for n in range(len(queries))], overwrite=overwrite)
    encoder = QueryEncoder(index, model_ref=model, device=device)
    vectors = encoder.encode([(q, image or is_image_query(q)) for q in queries])
    from mmcli.retrieval.index_plan import parse_memory

    search = make_searcher(index, use_faiss, parse_memory(max_memory) if max_memory else None)
    scores, ids = search(vectors, k)
    out = []
    for n, q in enumerate(queries):
        kept = [(float(s), int(i)) for s, i in zip(scores[n], ids[n]) if i >= 0]
        hits = describe_rows(index, [i for s, i in kept if threshold is None or s >= threshold], kept)
        entry = {"query": q, "is_image": image or is_image_query(q), "results": hits}
        if grid:
            entry["grid"] = str(write_grid(index, hits, grid_path(grid, n, len(queries)), title=q))
        out.append(entry)
    return {
        "index": os.path.abspath(index_path),
        "root": index.meta.get("root"),
        "count": len(index),
        "model": index.meta["model"],
        "k": k,
        "threshold": threshold,
        "search": search.describe(),
        "folder": refreshed,
        "notes": notes,
        "queries": out,
    }


def folder_index(folder: str, *, model: str | None, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """The cached index of ``folder``'s images (:mod:`mmcli.retrieval.folder_cache`), embedded on
    first use and brought up to date with ``embed --update`` afterwards; returns where it is and
    what was done (the update's counts), with a note for stderr when anything was embedded.

    The model is ``model``, else the default (:func:`mmcli.models.defaults.default_model`). When no
    file changed, the model is not even loaded: the file signatures decide.
    """
    from mmcli.commands import embed
    from mmcli.models.defaults import default_model
    from mmcli.retrieval import folder_cache
    from mmcli.retrieval.incremental import IncompatibleIndex

    inputs = folder_cache.folder_images(folder)
    root = Path(inputs.root)
    ref = model or default_model()
    target = folder_cache.cached_index_path(root, ref)
    counts = folder_cache.unchanged(target, inputs)
    if counts is not None:
        return {"folder": str(root), "index": str(target), "embedded": 0, "update": counts, "notes": []}
    first = not ix.index_exists(target)
    kwargs = {"model": ref, "modality": "image", "device": device, "progress": progress}
    try:
        result = embed.run(str(root), str(target), update=not first, **kwargs)
    except IncompatibleIndex:  # made by an older mmcli or another decoding: the cache is re-made whole
        result = embed.run(str(root), str(target), overwrite=True, **kwargs)
        first = True
    done = (
        f"{result['count']} images embedded into {target}"
        if first
        else "{new} new, {changed} changed, {deleted} deleted, {unchanged} unchanged".format(**result["update"])
    )
    return {
        "folder": str(root),
        "index": str(target),
        "embedded": result["embedded"],
        "update": result["update"],
        "notes": [f"--in {folder}: {done}" + (f", {len(result['skipped'])} unreadable" if result["skipped"] else "")],
    }


def describe_rows(index: ix.Index, rows: list[int], scored: list[tuple[float, int]] | None = None) -> list[dict]:
    """Result dicts of ``rows`` (best first): rank, score (from ``scored``), row, item, the absolute
    path of an image file, and the caption and kept columns of the index's metadata."""
    score = {i: s for s, i in scored or []}
    files = has_image_files(index)
    metadata = index.metadata.rows(rows) if index.metadata is not None else [{} for _ in rows]
    hits = []
    for rank, (row, meta) in enumerate(zip(rows, metadata), start=1):
        item, meta = index.items[row], dict(meta)
        hit = {"rank": rank, "score": score.get(row), "row": row, "item": item}
        hit["path"] = index.item_path(item) if files else None
        hit["caption"] = meta.pop("caption", None)
        hit["metadata"] = meta
        hits.append(hit)
    return hits


def has_image_files(index: ix.Index) -> bool:
    """Whether the rows of ``index`` are image files (not texts, not members of webdataset shards)."""
    return index.meta.get("modality") == "image" and index.meta.get("source", {}).get("format") != "webdataset"


def run_duplicates(index_path: str, *, threshold: float = 0.95) -> dict[str, Any]:
    """Groups of near-duplicate rows of ``index_path`` (:mod:`mmcli.retrieval.duplicates`)."""
    import time

    from mmcli.retrieval.duplicates import near_duplicates

    index = ix.open_index(index_path)
    start = time.perf_counter()
    groups = near_duplicates(index.embeddings, threshold)
    seconds = time.perf_counter() - start
    described = []
    for group in groups:
        hits = describe_rows(index, group.rows, list(zip(group.scores, group.rows)))
        described.append({"rows": group.rows, "members": hits})
    return {
        "index": os.path.abspath(index_path),
        "root": index.meta.get("root"),
        "count": len(index),
        "threshold": threshold,
        "groups": described,
        "rows_in_groups": sum(len(g.rows) for g in groups),
        "seconds": round(seconds, 3),
    }


def collect_queries(query: str | None, queries_file: str | None) -> tuple[list[str], int]:
    """``[query]``, or the non-blank lines of ``queries_file`` and how many lines were blank (the
    caller reports them: a dropped line must not go unnoticed). Exactly one of the two is given."""
    if query and queries_file:
        raise MmcliError(f"give a QUERY or --queries {queries_file}, not both")
    if not queries_file:
        if not query:
            raise MmcliError("give a QUERY (a text or an image file) or --queries FILE")
        return [query], 0
    path = Path(queries_file)
    if not path.is_file():
        raise MmcliError(f"--queries {queries_file}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise MmcliError(f"--queries {queries_file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    queries = [line.strip() for line in lines if line.strip()]
    if not queries:
        raise MmcliError(f"--queries {queries_file}: no queries (every line is blank)")
    return queries, len(lines) - len(queries)


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

    if not has_image_files(index):
        raise MmcliError(
            f"--grid: {index.path} does not hold image files (a {index.meta.get('modality')} index"
            f"{' of webdataset shards' if index.meta.get('modality') == 'image' else ''})"
        )
    own = {
        os.path.realpath(f + suffix)
        for f in (index.path, *index.files)
        for suffix in ("", ".json", ".parquet", ".faiss", ".faiss.json")
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
