"""What ``mmcli serve`` does, without HTTP: indexes opened once, queries encoded by the model that
made each index, searched, and the hits described with their metadata.

:class:`SearchService` is what the FastAPI app (:mod:`mmcli.serving.app`) calls; it knows nothing of
requests. Queries that arrive together are encoded together and searched together
(:class:`MicroBatcher`): one forward pass of the text tower and one pass of exact search over the
rows answer all of them, which is what keeps an exact 100k-row index fast under concurrent load.
Files are read only when they are rows of a served image index, and only inside the index's root
(:meth:`SearchService.image_file`).
"""

from __future__ import annotations

import functools
import io
import json
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmcli.errors import MmcliError
from mmcli.io import IMAGE_SUFFIXES
from mmcli.retrieval import index as ix
from mmcli.retrieval.query import QueryEncoder
from mmcli.retrieval.search import make_searcher

MAX_K = 1000
"""The most results one query may ask for."""

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
"""The largest image file a client may upload (20 MiB)."""

MAX_UPLOAD_PIXELS = 50_000_000
"""The most pixels an uploaded image may decode to (a decompression bomb is refused before decoding)."""

THUMBNAIL_SIDE = 256
DEDUPLICATE_COSINE = 0.94
"""Hits at least this similar to a better hit are dropped when a client asks for deduplication
(clip-retrieval's threshold for the same option)."""


def check_k(k: int) -> None:
    """Refuse a ``k`` outside 1 … :data:`MAX_K`."""
    if not 1 <= k <= MAX_K:
        raise MmcliError(f"k: {k} is not between 1 and {MAX_K}")


class NotFound(MmcliError):
    """A name or row the service does not hold (HTTP 404)."""


class TooLarge(MmcliError):
    """An upload over :data:`MAX_UPLOAD_BYTES` (HTTP 413)."""


class MicroBatcher:
    """Calls ``process(payloads) -> results`` (one result per payload, in order) from one thread, for
    callers in many threads, batching the payloads that wait together.

    Each caller blocks until its own result comes back. While a batch is processed, new payloads
    queue up and go in the next one (up to ``max_rows`` rows, counted by ``rows``). An exception
    reaches every caller of its batch; the thread lives on.
    """

    def __init__(self, process: Callable[[list], list], *, rows: Callable[[Any], int] = len, max_rows: int = 64):
        self._process, self._rows, self.max_rows = process, rows, max_rows
        self._closed = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mmcli-batch", daemon=True)
        self._thread.start()

    def __call__(self, payload: Any) -> Any:
        return self.submit(payload).result()

    def submit(self, payload: Any) -> Future:
        """Queue ``payload``; the future holds its result (an async caller awaits it without a thread)."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        done: Future = Future()
        self._queue.put((payload, done))
        return done

    def close(self) -> None:
        """Stop the thread once the payloads already queued are processed; later submits are refused."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            jobs, rows, stop = [], 0, False
            job = first
            while True:
                # A caller that gave up (a client that disconnected cancels its future) is dropped;
                # a future marked running can no longer be cancelled, so setting its result is safe.
                if job[1].set_running_or_notify_cancel():
                    jobs.append(job)
                    rows += self._rows(job[0])
                if rows >= self.max_rows:
                    break
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
            if jobs:
                self._answer(jobs)
            if stop:
                return

    def _answer(self, jobs: list) -> None:
        try:
            results = self._process([payload for payload, _ in jobs])
        except BaseException as exc:  # noqa: BLE001 - every waiting caller gets the error
            for _, done in jobs:
                done.set_exception(exc)
            return
        for (_, done), result in zip(jobs, results):
            done.set_result(result)


def batched_search(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]) -> Callable[[list], list]:
    """``search(vectors, k)`` over payloads ``(vectors, k)`` at once: the rows of every payload are
    searched together with the largest ``k`` asked, and each payload's cut to its own ``k`` (the
    top-``k`` of a top-``K`` list is the top-``k``). One pass of exact search over the rows answers
    all of them."""

    def process(payloads: list[tuple[np.ndarray, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        scores, ids = search(np.concatenate([v for v, _ in payloads]), max(k for _, k in payloads))
        out, start = [], 0
        for vectors, k in payloads:
            end = start + len(vectors)
            out.append((scores[start:end, :k], ids[start:end, :k]))
            start = end
        return out

    return process


def batched_texts(encode: Callable[[list[str]], np.ndarray]) -> Callable[[list], list]:
    """``encode(texts)`` over payloads (lists of texts) at once: one forward pass for all of them."""

    def process(payloads: list[list[str]]) -> list[np.ndarray]:
        rows = encode([t for texts in payloads for t in texts])
        out, start = [], 0
        for texts in payloads:
            out.append(rows[start : start + len(texts)])
            start += len(texts)
        return out

    return process


@dataclass
class ServedIndex:
    """One index as served: its name, the index, how it is searched and how queries are encoded."""

    name: str
    index: ix.Index
    encoder: QueryEncoder
    texts: MicroBatcher
    """Encodes the texts of concurrent queries in one forward pass (shared by indexes of one model)."""
    searcher: MicroBatcher
    """Searches concurrent queries in one pass (:func:`batched_search`)."""
    method: dict[str, Any]

    def search(self, vectors: np.ndarray, k: int) -> Future:
        """Top-``k`` ``(scores, ids)`` of ``vectors`` (a future), batched with concurrent queries."""
        return self.searcher.submit((np.ascontiguousarray(vectors, dtype=np.float32), k))

    @property
    def has_images(self) -> bool:
        """Whether rows are image files the service may show (not texts, not webdataset members)."""
        meta = self.index.meta
        return meta.get("modality") == "image" and meta.get("source", {}).get("format") != "webdataset"

    def describe(self) -> dict[str, Any]:
        """The index as ``/api/indexes`` lists it."""
        return {
            "name": self.name,
            "count": len(self.index),
            "modality": self.index.meta["modality"],
            "dim": self.index.dim,
            "model": self.index.meta["model"].get("ref"),
            "search": self.method["method"],
            "images": self.has_images,
            "columns": self.index.metadata.columns if self.index.metadata is not None else ["item"],
        }


class SearchService:
    """The indexes of one ``mmcli serve``, by name; see the module docstring."""

    def __init__(self, served: dict[str, ServedIndex], *, encode_lock: threading.Lock | None = None):
        if not served:
            raise MmcliError("serve: give at least one --index")
        self.served = served
        self._encode_lock = encode_lock or threading.Lock()  # the lock the text batchers take, for images too

    @classmethod
    def open(
        cls, indexes: dict[str, str], *, device: str = "auto", use_faiss: bool = False, warm: bool = True
    ) -> SearchService:
        """Open ``indexes`` (name → ``.npy``), check each model against its index, load each model once."""
        encoders: dict[tuple, tuple[QueryEncoder, MicroBatcher]] = {}
        lock = threading.Lock()  # torch already uses every core: one encoding at a time, texts or image
        served = {}
        for name, path in indexes.items():
            index = ix.open_index(path)
            _ = index.metadata  # read now: an update replacing the files later must not mix old rows, new metadata
            model = index.meta["model"]
            key = (model.get("ref"), model.get("checksum"), json.dumps(index.meta.get("decode")), index.dim)
            if key not in encoders:
                encoder = QueryEncoder(index, model_ref=None, device=device)
                if warm:
                    encoder.warm_up()
                encoders[key] = encoder, MicroBatcher(batched_texts(_locked_text_encoder(encoder, lock)))
            encoder, texts = encoders[key]
            searcher = make_searcher(index, use_faiss)
            batcher = MicroBatcher(batched_search(searcher), rows=lambda payload: len(payload[0]))
            served[name] = ServedIndex(name, index, encoder, texts, batcher, searcher.describe())
        return cls(served, encode_lock=lock)

    def close(self) -> None:
        """Stop the batching threads."""
        for served in self.served.values():
            served.searcher.close()
        for texts in {id(s.texts): s.texts for s in self.served.values()}.values():
            texts.close()

    # ----------------------------------------------------------------------------------------------
    # lookup
    # ----------------------------------------------------------------------------------------------

    def get(self, name: str | None) -> ServedIndex:
        """The index called ``name`` (the first one served when ``None``)."""
        if name is None:
            return next(iter(self.served.values()))
        if name not in self.served:
            raise NotFound(f"no index named {name!r}; served: {', '.join(self.served)}")
        return self.served[name]

    def check_row(self, served: ServedIndex, row: int) -> int:
        """``row`` if it is a row of ``served``, else :class:`NotFound`."""
        if not 0 <= row < len(served.index):
            raise NotFound(f"index {served.name!r} has rows 0 to {len(served.index) - 1}, not {row}")
        return row

    # ----------------------------------------------------------------------------------------------
    # queries
    # ----------------------------------------------------------------------------------------------

    def encode_texts(self, served: ServedIndex, texts: Sequence[str]) -> Future:
        """Texts as rows of ``served``'s embedding space (a future), batched with concurrent queries."""
        if any(not t.strip() for t in texts):
            raise MmcliError("text: a query text is empty")
        return served.texts.submit(list(texts))

    def encode_image(self, served: ServedIndex, data: bytes, *, name: str) -> np.ndarray:
        """An uploaded image (its bytes) as one row of ``served``'s embedding space."""
        if len(data) > MAX_UPLOAD_BYTES:
            raise TooLarge(f"{name}: over {MAX_UPLOAD_BYTES} bytes; uploads are limited to that")
        with self._encode_lock:
            row = served.encoder.encode_image(data, name=name, max_pixels=MAX_UPLOAD_PIXELS)
        return row[None, :].astype(np.float32)

    def row_vectors(self, served: ServedIndex, rows: Sequence[int]) -> np.ndarray:
        """The stored rows ``rows`` of ``served`` as queries ("more like this")."""
        for row in rows:
            self.check_row(served, row)
        return ix.take_rows(served.index.embeddings, list(rows)).astype(np.float32)

    def check_vectors(self, served: ServedIndex, vectors: Sequence[Sequence[float]]) -> np.ndarray:
        """Client-given embeddings, L2-normalised; wrong length or non-finite values are refused."""
        array = np.asarray(vectors, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != served.index.dim:
            raise MmcliError(f"vector: expected {served.index.dim} numbers, got shape {list(array.shape)}")
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        if not np.isfinite(array).all() or (norms == 0).any():
            raise MmcliError("vector: holds NaN, infinity or only zeros")
        return array / norms

    def search(
        self,
        served: ServedIndex,
        vectors: np.ndarray,
        *,
        k: int,
        threshold: float | None = None,
        deduplicate: bool = False,
    ) -> list[list[dict[str, Any]]]:
        """The hits of each query row (waiting for the search: see :meth:`hits` for the parts)."""
        check_k(k)
        scores, ids = served.search(vectors, k).result()
        return self.hits(served, scores, ids, threshold=threshold, deduplicate=deduplicate)

    def hits(
        self,
        served: ServedIndex,
        scores: np.ndarray,
        ids: np.ndarray,
        *,
        threshold: float | None = None,
        deduplicate: bool = False,
    ) -> list[list[dict[str, Any]]]:
        """The hits of each query row of a search: rank, row, score, item, absolute path, caption,
        metadata; those scoring under ``threshold`` dropped, near copies of better hits too when
        ``deduplicate``."""
        out = []
        for row_scores, row_ids in zip(scores, ids):
            keep = [(float(s), int(i)) for s, i in zip(row_scores, row_ids) if i >= 0]
            if threshold is not None:
                keep = [(s, i) for s, i in keep if s >= threshold]
            if deduplicate:
                keep = _deduplicated(served.index.embeddings, keep)
            out.append(self.describe_hits(served, keep))
        return out

    def describe_hits(self, served: ServedIndex, hits: list[tuple[float, int]]) -> list[dict[str, Any]]:
        """``(score, row)`` pairs as result dicts, best first."""
        index = served.index
        rows = [i for _, i in hits]
        metadata = index.metadata.rows(rows) if index.metadata is not None and rows else [{} for _ in rows]
        results = []
        for rank, ((score, row), meta) in enumerate(zip(hits, metadata), start=1):
            item = index.items[row]
            meta = dict(meta)
            results.append(
                {
                    "rank": rank,
                    "row": row,
                    "score": round(score, 6),
                    "item": item,
                    "path": index.item_path(item) if served.has_images else None,
                    "caption": meta.pop("caption", None),
                    "metadata": meta,
                }
            )
        return results

    # ----------------------------------------------------------------------------------------------
    # files
    # ----------------------------------------------------------------------------------------------

    def image_file(self, served: ServedIndex, row: int) -> str:
        """The image file of ``row``, read only if it is an image file whose real path lies inside
        the index's root: an item is never a way to reach any other file (``..``, absolute items,
        links leading out of the root and non-image names are refused)."""
        if not served.has_images:
            raise NotFound(f"index {served.name!r} holds {served.index.meta['modality']}s, not image files")
        item = served.index.items[self.check_row(served, row)]
        path = served.index.item_path(item)  # refuses absolute items and '..'
        root = os.path.realpath(served.index.meta["root"])
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root or not real.lower().endswith(IMAGE_SUFFIXES):
            raise NotFound(f"row {row} of {served.name!r}: {item} leads outside the index's folder; not served")
        if not os.path.isfile(real):
            raise NotFound(f"row {row} of {served.name!r}: {item} no longer exists")
        return real

    def thumbnail(self, served: ServedIndex, row: int, side: int = THUMBNAIL_SIDE) -> tuple[bytes, str]:
        """The row's image with its longer side at most ``side`` pixels, and its media type: a JPEG,
        or a PNG of the image itself when it is no larger (JPEG would only blur it). Cached."""
        path = self.image_file(served, row)
        stat = os.stat(path)
        return _thumbnail(path, stat.st_size, stat.st_mtime_ns, side)


def _locked_text_encoder(encoder: QueryEncoder, lock: threading.Lock) -> Callable[[list[str]], np.ndarray]:
    def encode(texts: list[str]) -> np.ndarray:
        with lock:
            return encoder.encode([(t, False) for t in texts])

    return encode


@functools.lru_cache(maxsize=2048)
def _thumbnail(path: str, size: int, mtime_ns: int, side: int) -> tuple[bytes, str]:
    # size and mtime are part of the key so that a changed file is not served from the cache.
    from mmcli.data.images import BadImage, load_image

    try:
        image = load_image(path, draft=(side, side))
    except BadImage as exc:
        raise NotFound(f"{os.path.basename(path)}: cannot be shown ({exc.reason})") from None
    out = io.BytesIO()
    if max(image.size) <= side:
        image.save(out, format="PNG")
        return out.getvalue(), "image/png"
    image.thumbnail((side, side))
    image.save(out, format="JPEG", quality=85)
    return out.getvalue(), "image/jpeg"


def _deduplicated(embeddings: ix.Embeddings, hits: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """``hits`` without those at least :data:`DEDUPLICATE_COSINE` similar to a better-ranked kept hit."""
    if len(hits) < 2:
        return hits
    vectors = ix.take_rows(embeddings, [i for _, i in hits]).astype(np.float32)
    similar = vectors @ vectors.T
    kept: list[int] = []
    for n in range(len(hits)):
        if all(similar[n, m] < DEDUPLICATE_COSINE for m in kept):
            kept.append(n)
    return [hits[n] for n in kept]
