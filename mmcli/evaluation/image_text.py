"""The image–text evaluation tasks of ``mmcli eval``: zero-shot classification, image↔text
retrieval and the linear probe. Each reads its data, embeds it with a loaded model and returns
CLIP_benchmark-style metrics (names as in CLIP_benchmark, so results can sit side by side).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmcli.data.images import is_image_file
from mmcli.data.sources import read_records, source_format
from mmcli.errors import MmcliError
from mmcli.evaluation import metrics
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


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train, test)`` indices holding out ``round(test_fraction·n_c)`` of each class c
    (at least one, and at least one left for training when the class has two or more)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(max(1, round(test_fraction * len(members))), max(len(members) - 1, 1))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# --------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------


class Embedder:
    """Image and text embeddings of one loaded model, with the skipped images collected."""

    def __init__(self, loaded, *, device, batch_size: int, workers: int):
        self.loaded, self.device, self.batch_size, self.workers = loaded, device, batch_size, workers
        self.skipped: list[tuple[str, str]] = []

    def images(self, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings of the usable images, mask of the usable ones)``."""
        from mmcli.retrieval.embedding import embed_images

        emb, ok, bad = embed_images(
            self.loaded, paths, batch_size=self.batch_size, workers=self.workers, device=self.device
        )
        self.skipped += bad
        return emb, ok

    def texts(self, texts: list[str]) -> np.ndarray:
        """Text embeddings, in order."""
        from mmcli.retrieval.embedding import embed_texts

        return embed_texts(self.loaded, texts, batch_size=self.batch_size, device=self.device)


def zero_shot(embedder: Embedder, spec: ZeroShotTaskSpec, *, confusion_png: str) -> dict[str, Any]:
    """acc1, acc5 (None under 5 classes), mean per-class recall, and a confusion-matrix PNG."""
    from mmcli.evaluation.zeroshot import class_embeddings, templates_for

    paths, labels = read_labelled(spec)
    names, y = class_index(labels, spec.class_names, spec.path)
    emb, ok = embedder.images(paths)
    weights = class_embeddings(embedder.loaded, names, templates_for(spec.templates), device=embedder.device)
    logits = emb @ weights.T
    scores = metrics.zero_shot_accuracy(logits, y[ok], len(names))
    matrix = metrics.confusion_matrix(logits.argmax(1), y[ok], len(names))
    plot_confusion(matrix, names, confusion_png, title=f"zero-shot confusion ({Path(spec.path).name})")
    return {
        "acc1": scores["top1"],
        "acc5": scores["top5"],
        "mean_per_class_recall": scores["mean_per_class_recall"],
        "n": int(ok.sum()),
        "n_classes": len(names),
        "templates": len(templates_for(spec.templates)),
        "skipped": int((~ok).sum()),
        "confusion_matrix": confusion_png,
    }


def retrieval(embedder: Embedder, spec: RetrievalTaskSpec) -> dict[str, Any]:
    """Recall@K both ways (CLIP paper: an image is a hit if any of its captions is in its top K)."""
    paths, texts, owner = read_pairs(spec)
    image_emb, ok = embedder.images(paths)
    # Captions of unreadable images are left out: their right answer is not in the gallery.
    new_id = np.cumsum(ok) - 1
    keep = ok[owner]
    text_emb = embedder.texts([t for t, k in zip(texts, keep) if k])
    recall = metrics.retrieval_recall(image_emb, text_emb, new_id[owner[keep]], ks=spec.ks)
    out = {}
    for k in spec.ks:
        out[f"image_retrieval_recall@{k}"] = recall[f"text_to_image_R@{k}"]
        out[f"text_retrieval_recall@{k}"] = recall[f"image_to_text_R@{k}"]
    return {**out, "n_images": int(ok.sum()), "n_texts": int(keep.sum()), "skipped": int((~ok).sum())}


def linear_probe(embedder: Embedder, spec: LinearProbeTaskSpec) -> dict[str, Any]:
    """Test accuracy of a logistic regression on frozen image embeddings, for each shot count."""
    paths, labels = read_labelled(spec.train)
    names, y = class_index(labels, None, spec.train.path)
    emb, ok = embedder.images(paths)
    x, y = emb, y[ok]
    if spec.test is None:
        train, test = stratified_split(y, spec.test_fraction, spec.seed)
        tx, ty, x, y = x[test], y[test], x[train], y[train]
    else:
        test_paths, test_labels = read_labelled(spec.test)
        _, test_y = class_index(test_labels, names, spec.test.path)
        tx, test_ok = embedder.images(test_paths)
        ty = test_y[test_ok]
    accs = metrics.linear_probe(x, y, tx, ty, n_classes=len(names), shots=spec.shots, seed=spec.seed)
    out = {("lp_acc1" if k is None else f"lp_acc1_{k}shot"): acc for k, acc in accs.items()}
    return {**out, "n_train": int(len(y)), "n_test": int(len(ty)), "n_classes": len(names)}
