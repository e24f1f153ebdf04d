"""``mmcli retrieve QUERY --index emb.npy``: search an index with texts or images.

A text query against a run folder goes through :mod:`mmcli.models.fast_text` (plain torch, no
open_clip or torchvision import), so a one-off query from the shell starts about as fast as
``import torch``; image queries, and models that are not run folders, load the full model.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from mmcli.retrieval import faiss_index as ann
from mmcli.retrieval import index as ix
from mmcli.errors import MmcliError

# The suffixes of mmcli.data.images.IMAGE_EXTENSIONS, repeated so that detecting an image query
# does not import PIL on the text path.
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def run(
    query: Optional[str],
    *,
    index_path: str,
    k: int = 10,
    queries_file: Optional[str] = None,
    image: bool = False,
    use_faiss: bool = False,
    grid: Optional[str] = None,
    model: Optional[str] = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Top-``k`` items of ``index_path`` for each query; see the CLI help for the options."""
    queries = collect_queries(query, queries_file)
    index = ix.open_index(index_path)
    encoder = QueryEncoder(index, model_ref=model, device=device)
    vectors = encoder.encode([(q, image or is_image_query(q)) for q in queries])
    search = _searcher(index, use_faiss)
    scores, ids = search(vectors, k)
    out = []
    for n, q in enumerate(queries):
        hits = [{"rank": r + 1, "score": float(s), "row": int(i), "item": index.items[int(i)]}
                for r, (s, i) in enumerate(zip(scores[n], ids[n])) if i >= 0]
        entry = {"query": q, "is_image": image or is_image_query(q), "results": hits}
        if grid:
            entry["grid"] = str(write_grid(index, hits, grid_path(grid, n, len(queries)), title=q))
        out.append(entry)
    return {"index": index_path, "count": len(index), "model": index.meta["model"], "k": k,
            "search": search.describe(), "queries": out}


def collect_queries(query: Optional[str], queries_file: Optional[str]) -> list[str]:
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


def is_image_query(query: str) -> bool:
    """Whether ``query`` names an existing image file (by its suffix, any letter case)."""
    return query.lower().endswith(_IMAGE_SUFFIXES) and os.path.isfile(query)


def grid_path(grid: str, n: int, total: int) -> Path:
    """``grid`` for a single query; ``out-001.png``, ``out-002.png``, … for several."""
    path = Path(grid)
    return path if total == 1 else path.with_name(f"{path.stem}-{n + 1:03d}{path.suffix or '.png'}")


def write_grid(index: ix.Index, hits: list[dict], out: Path, *, title: str) -> Path:
    """A contact sheet of the hits' images (the index must hold image files)."""
    from mmcli.viz.grid import contact_sheet

    if index.meta.get("modality") != "image" or index.meta.get("source", {}).get("format") == "webdataset":
        raise MmcliError(f"--grid: {index.path} does not hold image files (a {index.meta.get('modality')} index"
                         f"{' of webdataset shards' if index.meta.get('modality') == 'image' else ''})")
    root = index.meta.get("root") or ""
    paths = [os.path.join(root, hit["item"]) for hit in hits]
    return contact_sheet(paths, [hit["score"] for hit in hits], out, title=title)


# --------------------------------------------------------------------------------------------
# query encoding
# --------------------------------------------------------------------------------------------


class QueryEncoder:
    """Encodes queries with the index's model, after checking that it is the same model.

    For a run folder the check compares checksums recorded at save time (``mmcli.json``) with
    the sidecar's: hashing the weights on every query would cost more than the search.
    """

    def __init__(self, index: ix.Index, *, model_ref: Optional[str], device: str):
        self.index, self.device = index, device
        self.expected = index.meta["model"]
        self.ref = model_ref or self.expected.get("ref")
        self.run_dir = Path(self.ref) if (Path(self.ref) / "mmcli.json").is_file() else None
        self._fast = self._full = None
        if self.run_dir is not None:
            self._check_checksum(_run_checksum(self.run_dir), where=str(self.run_dir / "mmcli.json"))
        elif Path(self.ref).is_dir() or (Path(self.ref).is_absolute() and not Path(self.ref).exists()):
            raise MmcliError(f"{ix.sidecar_path(index.path)}: the model {self.ref} is not an mmcli run folder "
                             "(moved or deleted?); pass --model with the run folder that made the index")

    def encode(self, queries: list[tuple[str, bool]]):
        """L2-normalised float32 rows, one per ``(query, is_image)``."""
        import numpy as np

        texts = [q for q, is_image in queries if not is_image]
        rows: dict[int, Any] = {}
        if texts:
            encoded = self._encode_texts(texts)
            for n, row in zip([n for n, (_, im) in enumerate(queries) if not im], encoded):
                rows[n] = row
        for n, (q, is_image) in enumerate(queries):
            if is_image:
                rows[n] = self._encode_image(q)
        out = np.stack([rows[n] for n in range(len(queries))]).astype(np.float32)
        if out.shape[1] != self.index.dim:
            raise MmcliError(f"{self.ref}: the model embeds in {out.shape[1]} dimensions but {self.index.path} "
                             f"has {self.index.dim}")
        return out

    def _encode_texts(self, texts: list[str]):
        if self.run_dir is not None:
            from mmcli.models.fast_text import text_encoder_for

            fast = self._fast = self._fast or text_encoder_for(self.run_dir)
            if fast is not None:
                return fast(texts).numpy()
        import torch

        loaded = self._loaded()
        with torch.inference_mode():
            emb = loaded.model.encode_text(loaded.tokenizer(texts).to(self._torch_device()), normalize=True)
        return emb.float().cpu().numpy()

    def _encode_image(self, path: str):
        import torch

        from mmcli.data.images import BadImage, load_image

        if not os.path.isfile(path):
            raise MmcliError(f"{path}: no such image file")
        loaded = self._loaded()
        try:
            pixels = loaded.preprocess(load_image(path))
        except BadImage as exc:
            raise MmcliError(f"{path}: cannot use this image as a query ({exc.reason})") from None
        with torch.inference_mode():
            emb = loaded.model.encode_image(pixels[None].to(self._torch_device()), normalize=True)
        return emb[0].float().cpu().numpy()

    def _loaded(self):
        if self._full is None:
            from mmcli.models.loading import load_model

            self._full = load_model(self.ref, device=self._torch_device())
            if self.run_dir is None:
                self._check_checksum(self._full.checksum, where=self.ref)
        return self._full

    def _torch_device(self):
        from mmcli.distributed import resolve_device

        return resolve_device(self.device)

    def _check_checksum(self, found: Optional[str], *, where: str) -> None:
        wanted = self.expected.get("checksum")
        if found != wanted:
            raise MmcliError(f"{where}: model checksum {_short(found)} differs from {_short(wanted)} recorded in "
                             f"{ix.sidecar_path(self.index.path)}; the index was made with another model "
                             "(re-run embed, or pass --model with the run that made it)")


def _run_checksum(run_dir: Path) -> Optional[str]:
    try:
        return json.loads((run_dir / "mmcli.json").read_text(encoding="utf-8")).get("checksum")
    except (OSError, ValueError) as exc:
        raise MmcliError(f"{run_dir / 'mmcli.json'}: unreadable ({exc})") from None


def _short(checksum: Optional[str]) -> str:
    return "none" if not checksum else checksum[:19] + "…"


# --------------------------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------------------------


class _Exact:
    def __init__(self, index: ix.Index):
        self.index = index

    def __call__(self, queries, k: int):
        return ix.search_exact(self.index, queries, k)

    def describe(self) -> dict[str, Any]:
        return {"method": "exact"}


class _Faiss:
    def __init__(self, index: ix.Index):
        self.fi = ann.load_or_build_faiss(index)
        if self.fi.built:  # the recall check is news only when the index was just built
            print(f"built a FAISS {self.fi.kind} index {self.fi.path} in {self.fi.build_seconds:.1f} s "
                  f"({self.fi.params}); recall@10 against exact search: {self.fi.recall_at_10:.3f}",
                  file=sys.stderr)

    def __call__(self, queries, k: int):
        return ann.search_faiss(self.fi, queries, k)

    def describe(self) -> dict[str, Any]:
        return {"method": f"faiss {self.fi.kind}", "params": self.fi.params, "recall_at_10": self.fi.recall_at_10,
                "built": self.fi.built, "path": self.fi.path}


def _searcher(index: ix.Index, use_faiss: bool):
    """Exact search, or FAISS when asked or above :data:`mmcli.retrieval.faiss_index.FAISS_AUTO_THRESHOLD` rows."""
    if use_faiss or len(index) > ann.FAISS_AUTO_THRESHOLD:
        return _Faiss(index)
    return _Exact(index)
