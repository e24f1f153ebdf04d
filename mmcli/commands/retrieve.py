"""``mmcli retrieve QUERY --index emb.npy``: search an index with texts or images
(query encoding in :mod:`mmcli.retrieval.query`, search in :mod:`mmcli.retrieval.search`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmcli.errors import MmcliError
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
    model: str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Top-``k`` items of ``index_path`` for each query; see the CLI help for the options."""
    queries = collect_queries(query, queries_file)
    index = ix.open_index(index_path)
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


def write_grid(index: ix.Index, hits: list[dict], out: Path, *, title: str) -> Path:
    """A contact sheet of the hits' images (the index must hold image files)."""
    from mmcli.viz.grid import contact_sheet

    if index.meta.get("modality") != "image" or index.meta.get("source", {}).get("format") == "webdataset":
        raise MmcliError(
            f"--grid: {index.path} does not hold image files (a {index.meta.get('modality')} index"
            f"{' of webdataset shards' if index.meta.get('modality') == 'image' else ''})"
        )
    root = index.meta.get("root") or ""
    paths = [os.path.join(root, hit["item"]) for hit in hits]
    return contact_sheet(paths, [hit["score"] for hit in hits], out, title=title)
