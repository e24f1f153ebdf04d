"""Query encoding for search: texts and images embedded with the model that made an index, after
checking it is that model.

A text query against a run folder goes through :mod:`mmcli.models.fast_text` (plain torch, no
open_clip or torchvision import), so a one-off query from the shell starts about as fast as
``import torch``; image queries, and models that are not run folders, load the full model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mmcli.errors import MmcliError
from mmcli.io import IMAGE_SUFFIXES, MMCLI_META
from mmcli.retrieval import index as ix


def is_image_query(query: str) -> bool:
    """Whether ``query`` names an image file: it ends in an image suffix (any letter case) and is
    one word or holds a path separator (``cat.jpg``, ``my photos/cat.jpg``; ``a photo of cat.jpg``
    is a text). Such a query that names no file is an error, not a text search for the file name:
    a typo in a path would otherwise return confident results for the wrong query."""
    one_word = not any(c.isspace() for c in query)
    looks_like_path = query.lower().endswith(IMAGE_SUFFIXES) and (one_word or "/" in query or os.sep in query)
    if looks_like_path and not os.path.isfile(query):
        raise MmcliError(
            f"{query}: no such image file (a query ending in an image suffix is read as a path; "
            f"words around it, e.g. 'a photo of {os.path.basename(query)}', make it a text)"
        )
    return looks_like_path


class QueryEncoder:
    """Encodes queries with the index's model, after checking that it is the same model.

    For a run folder the check compares checksums recorded at save time (``mmcli.json``) with
    the sidecar's: hashing the weights on every query would cost more than the search.
    """

    def __init__(self, index: ix.Index, *, model_ref: str | None, device: str):
        self.index, self.device = index, device
        self.expected = index.meta["model"]
        self.ref = model_ref or self.expected.get("ref")
        self.run_dir = Path(self.ref) if (Path(self.ref) / MMCLI_META).is_file() else None
        self._fast = self._full = None
        if self.run_dir is not None:
            self._check_checksum(_run_checksum(self.run_dir), where=str(self.run_dir / MMCLI_META))
        elif Path(self.ref).is_dir() or (Path(self.ref).is_absolute() and not Path(self.ref).exists()):
            raise MmcliError(
                f"{ix.sidecar_path(index.path)}: the model {self.ref} is not an mmcli run folder "
                "(moved or deleted?); pass --model with the run folder that made the index"
            )

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
            raise MmcliError(
                f"{self.ref}: the model embeds in {out.shape[1]} dimensions but {self.index.path} has {self.index.dim}"
            )
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
        if not os.path.isfile(path):
            raise MmcliError(f"{path}: no such image file")
        return self.encode_image(path, name=path)

    def encode_image(self, source: str | bytes, *, name: str, max_pixels: int | None = None):
        """One image (a file or its bytes, called ``name`` in errors) as an L2-normalised float32 row.

        Decoded as embed decoded the index's images (the sidecar's ``decode``: JPEG draft mode or
        not), then encoded by embed's own function: an indexed image finds itself with score 1.
        """
        from mmcli.data.images import DEFAULT_MAX_PIXELS, BadImage
        from mmcli.retrieval.embedding import embed_image_file, recorded_draft

        loaded = self._loaded()
        draft = recorded_draft(self.index.meta, loaded.preprocess, where=ix.sidecar_path(self.index.path))
        try:
            return embed_image_file(
                loaded, source, draft=draft, device=self._torch_device(), max_pixels=max_pixels or DEFAULT_MAX_PIXELS
            )
        except BadImage as exc:
            raise MmcliError(f"{name}: cannot use this image as a query ({exc.reason})") from None

    def warm_up(self) -> None:
        """Load what text and image queries need now, not on the first query."""
        self._encode_texts(["warm up"])
        self._loaded()

    def _loaded(self):
        if self._full is None:
            from mmcli.models.defaults import use_cached_default
            from mmcli.models.loading import load_model

            use_cached_default(self.ref)  # the default model's cached weights are read with no request
            self._full = load_model(self.ref, device=self._torch_device())
            if self.run_dir is None:
                self._check_checksum(self._full.checksum, where=self.ref)
        return self._full

    def _torch_device(self):
        from mmcli.distributed import resolve_device

        return resolve_device(self.device)

    def _check_checksum(self, found: str | None, *, where: str) -> None:
        wanted = self.expected.get("checksum")
        if found != wanted:
            raise MmcliError(
                f"{where}: model checksum {_short(found)} differs from {_short(wanted)} recorded in "
                f"{ix.sidecar_path(self.index.path)}; the index was made with another model "
                "(re-run embed, or pass --model with the run that made it)"
            )


def _run_checksum(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / MMCLI_META).read_text(encoding="utf-8")).get("checksum")
    except (OSError, ValueError) as exc:
        raise MmcliError(f"{run_dir / MMCLI_META}: unreadable ({exc})") from None


def _short(checksum: str | None) -> str:
    return "none" if not checksum else checksum[:19] + "…"
