"""The image–text evaluation tasks of ``mmcli eval``: zero-shot classification, image↔text
retrieval and the linear probe. Each reads its data, embeds it with a loaded model and returns
CLIP_benchmark-style metrics (names as in CLIP_benchmark, so results can sit side by side).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mmcli.data.images import is_image_file
from mmcli.data.sources import read_records, source_format
from mmcli.errors import MmcliError
from mmcli.evaluation import metrics
from mmcli.evaluation.results import probe_key
from mmcli.spec import LabelledSourceSpec, LinearProbeTaskSpec, RetrievalTaskSpec, SourceSpec, ZeroShotTaskSpec
from mmcli.viz.confusion import plot_confusion

# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def read_labelled(spec: LabelledSourceSpec) -> tuple[list[str], list[str]]:
    """``(image paths, labels)`` of a class-folder tree or a labelled CSV/TSV/JSONL file."""
    path = Path(spec.path).expanduser()
    if spec.format == "folder" or (spec.format == "auto" and path.is_dir()):
        return _class_folders(path)
    source = SourceSpec(
        path=spec.path, format=spec.format, image_key=spec.image_key, text_key=spec.label_key, separator=spec.separator
    )
    records = read_records(source)
    # JSONL falls back to "caption" for a missing key: right for captions, wrong for labels.
    if source_format(source) == "jsonl" and spec.label_key not in records[0].meta:
        raise MmcliError(f"{spec.path}: line 1: no key {spec.label_key!r} (label_key)")
    return [r.image for r in records], [r.text.strip() for r in records]


def _class_folders(root: Path) -> tuple[list[str], list[str]]:
    if not root.is_dir():
        raise MmcliError(f"{root}: no such folder")
    paths, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for image in sorted(p for p in folder.rglob("*") if is_image_file(p) and p.is_file()):
            paths.append(str(image))
            labels.append(folder.name)
    if not paths:
        raise MmcliError(f"{root}: no images in class sub-folders (expected {root}/<class>/<image>)")
    return paths, labels


def read_pairs(spec: RetrievalTaskSpec) -> tuple[list[str], list[str], np.ndarray]:
    """``(unique image paths, texts, text → image index)`` of an image–caption source."""
    source = SourceSpec(
        path=spec.path, format=spec.format, image_key=spec.image_key, text_key=spec.text_key, separator=spec.separator
    )
    images: dict[str, int] = {}
    texts, owner = [], []
    for record in read_records(source):
        owner.append(images.setdefault(record.image, len(images)))
        texts.append(record.text)
    return list(images), texts, np.asarray(owner, dtype=np.int64)


def class_index(labels: list[str], class_names: list[str] | None, where: str) -> tuple[list[str], np.ndarray]:
    """``(class names, label ids)``; names default to the sorted distinct labels."""
    names = list(class_names) if class_names else sorted(set(labels))
    position = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(labels) - set(position))
    if unknown:
        raise MmcliError(f"{where}: labels not in class_names: {', '.join(unknown[:5])}")
    return names, np.asarray([position[label] for label in labels], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------


class EmbedProgress(Protocol):
    """Where :class:`Embedder` reports its batches (the command draws them as a progress bar)."""

    def start(self, what: str, total: int) -> None:
        """A new pass over ``total`` items begins, described as ``what``."""

    def advance(self, n: int) -> None:
        """``n`` more items are embedded (or skipped)."""


class _Silent:
    def start(self, what: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


class Embedder:
    """Image and text embeddings of one loaded model, with the skipped images collected.

    Embeds with :func:`mmcli.retrieval.embedding.embed_images` and ``embed_texts``, which tell
    ``progress`` of each batch.
    """

    def __init__(self, loaded, *, device, batch_size: int, workers: int, progress: EmbedProgress | None = None):
        self.loaded, self.device, self.batch_size, self.workers = loaded, device, batch_size, workers
        self.progress: EmbedProgress = progress or _Silent()
        self.skipped: list[tuple[str, str]] = []

    def images(self, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings of the usable images, mask of the usable ones)``."""
        from mmcli.retrieval.embedding import embed_images

        self.progress.start("embedding images", len(paths))
        emb, ok, bad = embed_images(
            self.loaded,
            paths,
            batch_size=self.batch_size,
            workers=self.workers,
            device=self.device,
            on_batch=self.progress.advance,
        )
        self.skipped += bad
        return emb, ok

    def texts(self, texts: list[str]) -> np.ndarray:
        """Text embeddings, in order."""
        from mmcli.retrieval.embedding import embed_texts

        self.progress.start("embedding texts", len(texts))
        return embed_texts(
            self.loaded, texts, batch_size=self.batch_size, device=self.device, on_batch=self.progress.advance
        )


def zero_shot(
    embedder: Embedder, spec: ZeroShotTaskSpec, *, confusion_png: str, notes: list[str] | None = None
) -> dict[str, Any]:
    """acc1, acc5 (None with 5 classes or fewer), mean per-class recall, and a confusion-matrix
    PNG; with no usable image, or a single class, every figure is None (and noted) and no PNG is
    written."""
    from mmcli.evaluation.zeroshot import class_embeddings, templates_for

    notes = notes if notes is not None else []
    paths, labels = read_labelled(spec)
    names, y = class_index(labels, spec.class_names, spec.path)
    emb, ok = embedder.images(paths)
    out = {"n": int(ok.sum()), "n_classes": len(names), "templates": len(templates_for(spec.templates))}
    out["skipped"] = int((~ok).sum())
    if not ok.any() or len(names) < 2:
        why = "no usable image" if not ok.any() else "a single class (every image would be right)"
        notes.append(f"zero-shot: not scored: {why}")
        return {"acc1": None, "acc5": None, "mean_per_class_recall": None, **out, "confusion_matrix": None}
    weights = class_embeddings(embedder.loaded, names, templates_for(spec.templates), device=embedder.device)
    logits = emb @ weights.T
    scores = metrics.zero_shot_accuracy(logits, y[ok], len(names))
    if scores["top5"] is None:
        notes.append(f"zero-shot acc5: not available with {len(names)} classes (needs more than 5)")
    matrix = metrics.confusion_matrix(logits.argmax(1), y[ok], len(names))
    plot_confusion(matrix, names, confusion_png, title=f"zero-shot confusion ({Path(spec.path).name})")
    return {
        "acc1": scores["top1"],
        "acc5": scores["top5"],
        "mean_per_class_recall": scores["mean_per_class_recall"],
        **out,
        "confusion_matrix": confusion_png,
    }


def retrieval(embedder: Embedder, spec: RetrievalTaskSpec, *, notes: list[str] | None = None) -> dict[str, Any]:
    """Recall@K both ways (CLIP paper: an image is a hit if any of its captions is in its top K).
    A recall that every query would reach (too few images or texts for K) is None, and noted."""
    notes = notes if notes is not None else []
    paths, texts, owner = read_pairs(spec)
    image_emb, ok = embedder.images(paths)
    # Captions of unreadable images are left out: their right answer is not in the gallery.
    new_id = np.cumsum(ok) - 1
    keep = ok[owner]
    kept = [t for t, k in zip(texts, keep) if k]
    text_emb = embedder.texts(kept) if kept else np.zeros((0, image_emb.shape[1]), np.float32)
    recall = metrics.retrieval_recall(image_emb, text_emb, new_id[owner[keep]], ks=spec.ks)
    n_images, n_texts = int(ok.sum()), int(keep.sum())
    out = {}
    for k in spec.ks:
        out[f"image_retrieval_recall@{k}"] = recall[f"text_to_image_R@{k}"]
        out[f"text_retrieval_recall@{k}"] = recall[f"image_to_text_R@{k}"]
    missing = [name for name, value in out.items() if value is None]
    if missing:
        minimum = metrics.MIN_RETRIEVAL_ITEMS
        why = (
            f"needs at least {minimum} usable images and {minimum} captions"
            if min(n_images, n_texts) < minimum
            else "every query would be a hit: K must be below the number of candidates"
        )
        notes.append(f"retrieval with {n_images} images and {n_texts} texts: {', '.join(missing)} not scored ({why})")
    return {**out, "n_images": n_images, "n_texts": n_texts, "skipped": int((~ok).sum())}


def linear_probe(embedder: Embedder, spec: LinearProbeTaskSpec, *, notes: list[str] | None = None) -> dict[str, Any]:
    """Test accuracy of a logistic regression on frozen image embeddings, for each shot count
    (:func:`mmcli.evaluation.metrics.linear_probe`: ``C`` swept on a validation split of each
    sample). Per row: ``lp_acc1``, ``lp_acc5``, ``lp_mean_per_class_recall`` (CLIP_benchmark's
    names) and ``lp_C``, suffixed ``_{k}shot`` for k shots. A row is None (and noted) without a
    test example, when some class has no training example, for k shots when some class has fewer
    than k (it would not be a k-shot figure), and when every class has at most k (it would repeat
    the full row: noted as ``= lp_acc1``)."""
    notes = notes if notes is not None else []
    paths, labels = read_labelled(spec.train)
    names, y = class_index(labels, None, spec.train.path)
    emb, ok = embedder.images(paths)
    x, y = emb, y[ok]
    if spec.test is None:
        train, test = metrics.stratified_split(y, spec.test_fraction, spec.seed)
        tx, ty, x, y = x[test], y[test], x[train], y[train]
    else:
        test_paths, test_labels = read_labelled(spec.test)
        _, test_y = class_index(test_labels, names, spec.test.path)
        tx, test_ok = embedder.images(test_paths)
        ty = test_y[test_ok]
    rows = metrics.linear_probe(x, y, tx, ty, n_classes=len(names), shots=spec.shots, seed=spec.seed)
    out: dict[str, Any] = {}
    for k, row in rows.items():
        out[probe_key("lp_acc1", k)] = row.acc1 if row else None
        out[probe_key("lp_acc5", k)] = row.acc5 if row else None
        out[probe_key("lp_mean_per_class_recall", k)] = row.mean_per_class_recall if row else None
        out[probe_key("lp_C", k)] = row.c if row else None
        if row is None:
            notes.append(f"linear probe {probe_key('lp_acc1', k)}: {_probe_shortfall(y, ty, names, k)}")
    if any(row and row.acc5 is None for row in rows.values()):
        notes.append(f"linear probe lp_acc5: not available with {len(names)} classes (needs more than 5)")
    return {**out, "n_train": int(len(y)), "n_test": int(len(ty)), "n_classes": len(names)}


def _probe_shortfall(y: np.ndarray, ty: np.ndarray, names: list[str], k: int | None) -> str:
    if len(ty) == 0:
        return "not scored (no usable test image)"
    if len(names) < 2:
        return "not scored (a single class: every image would be right)"
    if k is not None and len(y) and metrics.k_shot_is_full(y, k) and not metrics.short_classes(y, len(names), None):
        return f"= lp_acc1 (every class has at most {k} training images: the {k}-shot sample is the full set)"
    short = metrics.short_classes(y, len(names), k)
    listed = ", ".join(f"{names[c]!r} has {n}" for c, n in list(short.items())[:3])
    more = f" and {len(short) - 3} more classes" if len(short) > 3 else ""
    return f"not scored (needs {k or 1} training image{'s' if (k or 1) > 1 else ''} per class; {listed}{more})"
