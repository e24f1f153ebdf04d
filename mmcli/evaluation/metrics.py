"""Evaluation metrics as pure functions.

Inputs are numpy arrays or torch tensors (any device; converted by :func:`to_numpy`). Nothing
here imports torch; :func:`linear_probe`, which trains a classifier, imports scikit-learn.

Ties count against the model in retrieval, zero-shot and matching: an item scoring exactly as
much as the right answer is ranked before it, so a model that gives every candidate the same
score gets no credit. (Masked-token accuracy takes the argmax over the vocabulary.)

A figure that any model would get right by construction, or that has nothing to be computed on,
is ``None``, never a number: recall@K with no more than K candidates, top-K accuracy with no more
than K classes, a probe without a training example of some class or without a test example.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ArrayLike = Any  # numpy array, torch tensor or nested sequence


def to_numpy(x: ArrayLike) -> np.ndarray:
    """``x`` as a numpy array; torch tensors are detached and moved to the CPU (bf16 → fp32)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _float_matrix(x: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(to_numpy(x), dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return x


def _labels(x: ArrayLike, n_classes: int, name: str = "labels") -> np.ndarray:
    x = np.asarray(to_numpy(x)).astype(np.int64).reshape(-1)
    if x.size and (x.min() < 0 or x.max() >= n_classes):
        raise ValueError(f"{name} must be in [0, {n_classes}), found {x.min()}..{x.max()}")
    return x


# --------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------


def retrieval_recall(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_to_image: ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 4096,
) -> dict[str, float]:
    """Image→text and text→image recall@K, as in the CLIP paper.

    ``image_emb`` N×D and ``text_emb`` M×D are L2-normalised; ``text_to_image`` (M ints) is
    the image each text describes. A text is a hit at K if its image is among the K images
    most similar to it; an image is a hit at K if ANY of its captions is among its K most
    similar texts (images without a caption are left out). Scores are computed ``chunk``
    rows at a time, never as a full N×M matrix.

    Returns ``{"image_to_text_R@1": .., .., "text_to_image_R@1": .., ..}``. A recall is None
    (not meaningful) with fewer than :data:`MIN_RETRIEVAL_ITEMS` images or texts, and when every
    query would be a hit whatever the embeddings: text→image when ``K`` ≥ the number of images,
    image→text when ``K`` exceeds the number of other images' texts of every captioned image.
    """
    images, texts = _float_matrix(image_emb, "image_emb"), _float_matrix(text_emb, "text_emb")
    owner = _labels(text_to_image, len(images), "text_to_image")
    if len(owner) != len(texts):
        raise ValueError(f"text_to_image has {len(owner)} entries for {len(texts)} texts")
    out: dict[str, float | None] = {f"{d}_R@{k}": None for d in ("image_to_text", "text_to_image") for k in ks}
    if min(len(images), len(texts)) < MIN_RETRIEVAL_ITEMS:
        return out
    own_captions = np.bincount(owner, minlength=len(images))
    most_others = len(texts) - own_captions[own_captions > 0].min()  # other texts an image ranks against
    ranks = {
        "image_to_text": (_image_to_text_ranks(images, texts, owner, chunk), most_others),
        "text_to_image": (_text_to_image_ranks(images, texts, owner, chunk), len(images) - 1),
    }
    for direction, (rank, worst) in ranks.items():
        for k in ks:
            if k <= worst:  # some query could rank its answer k-th or lower: the recall can fail
                out[f"{direction}_R@{k}"] = float(np.mean(rank < k))
    return out


MIN_RETRIEVAL_ITEMS = 2
"""Retrieval needs at least this many images and texts: with one, every query finds it."""


def _text_to_image_ranks(images: np.ndarray, texts: np.ndarray, owner: np.ndarray, chunk: int) -> np.ndarray:
    """For each text: how many other images score at least as high as its own image."""
    ranks = []
    for start in range(0, len(texts), chunk):
        scores = texts[start : start + chunk] @ images.T
        rows, mine = np.arange(len(scores)), owner[start : start + chunk]
        true = scores[rows, mine].copy()
        scores[rows, mine] = -np.inf
        ranks.append(np.count_nonzero(scores >= true[:, None], axis=1))
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def _image_to_text_ranks(images: np.ndarray, texts: np.ndarray, owner: np.ndarray, chunk: int) -> np.ndarray:
    """For each captioned image: how many other images' texts score at least as high as its best caption."""
    ranks = []
    for start in range(0, len(images), chunk):
        scores = images[start : start + chunk] @ texts.T
        captions = np.flatnonzero((owner >= start) & (owner < start + len(scores)))
        rows = owner[captions] - start
        best = np.full(len(scores), -np.inf, np.float32)
        np.maximum.at(best, rows, scores[rows, captions])
        scores[rows, captions] = -np.inf  # an image's own captions never count against it
        has_caption = np.bincount(rows, minlength=len(scores)) > 0
        ranks.append(np.count_nonzero(scores >= best[:, None], axis=1)[has_caption])
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------


def class_scores(scores: ArrayLike | tuple[ArrayLike, ArrayLike]) -> np.ndarray:
    """N×C scores from logits, or from a pair (image_emb N×D, class_emb C×D) by dot product."""
    if isinstance(scores, tuple):
        images, classes = _float_matrix(scores[0], "image_emb"), _float_matrix(scores[1], "class_emb")
        return images @ classes.T
    return _float_matrix(scores, "logits")


def true_class_rank(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """For each row of ``logits`` (N×C): how many other classes score at least as high as ``labels``."""
    true = logits[np.arange(len(logits)), labels]
    return np.count_nonzero(logits >= true[:, None], axis=1) - 1


def zero_shot_accuracy(
    scores: ArrayLike | tuple[ArrayLike, ArrayLike], labels: ArrayLike, n_classes: int
) -> dict[str, float | None]:
    """Top-1, top-5 and mean per-class recall of zero-shot classification.

    ``scores`` are logits N×C, or ``(image_emb N×D, class_emb C×D)`` (class_emb: the text
    embedding of each class prompt); ``labels`` N ints in [0, C). Top-K is None unless there are
    more than K classes (with K classes or fewer every image is a top-K hit), and every figure is
    None without an image. Mean per-class recall averages the top-1 accuracy of each class that
    has test examples, so a large class cannot hide a failing small one.
    """
    logits = class_scores(scores)
    labels = _labels(labels, n_classes)
    if logits.shape != (len(labels), n_classes):
        raise ValueError(f"scores must be {len(labels)}×{n_classes}, got {logits.shape}")
    rank = true_class_rank(logits, labels)
    meaningful = len(labels) > 0 and n_classes > 1
    return {
        "top1": float(np.mean(rank < 1)) if meaningful else None,
        "top5": float(np.mean(rank < 5)) if meaningful and n_classes > 5 else None,
        "mean_per_class_recall": mean_per_class_recall(rank < 1, labels) if meaningful else None,
        "n": len(labels),
    }


def mean_per_class_recall(hits: ArrayLike, labels: ArrayLike) -> float | None:
    """Mean over the classes present in ``labels`` of the fraction of their ``hits`` (bools);
    None without labels."""
    hits, labels = np.asarray(hits, dtype=np.float64), np.asarray(labels)
    present = np.unique(labels)
    return float(np.mean([hits[labels == c].mean() for c in present])) if present.size else None


def confusion_matrix(pred: ArrayLike, labels: ArrayLike, n_classes: int) -> np.ndarray:
    """C×C counts: row = true class, column = predicted class."""
    pred, labels = _labels(pred, n_classes, "pred"), _labels(labels, n_classes)
    if pred.shape != labels.shape:
        raise ValueError(f"{len(pred)} predictions for {len(labels)} labels")
    return np.bincount(labels * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


# --------------------------------------------------------------------------------------------
# linear probe
# --------------------------------------------------------------------------------------------


def sample_shots(labels: ArrayLike, k: int | None, *, seed: int) -> np.ndarray:
    """Sorted indices of ``k`` examples per class (all of a class that has fewer; k=None: all).

    Each class's examples are shuffled once per seed and the first k taken, so with one seed
    the 1-shot set is inside the 2-shot set, and so on.
    """
    labels = np.asarray(to_numpy(labels)).reshape(-1)
    if k is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 2, 11))
"""Inverse regularisation strengths (scikit-learn's ``C``) the probe sweeps: half-decade steps
from 1e-3 to 1e2, as CLIP_benchmark sweeps weight decay over a log grid."""

DEFAULT_C = 1.0
"""``C`` of a probe that has no validation example to choose with (every class has one example):
scikit-learn's default."""

VALIDATION_FRACTION = 0.2
"""Share of each class of a probe's training sample held out to choose ``C``."""


@dataclass(frozen=True)
class ProbeRow:
    """One fitted probe: test top-1, top-5 (None with 5 classes or fewer) and mean per-class
    recall, the chosen ``C`` and its validation accuracy (None when nothing was held out)."""

    acc1: float
    acc5: float | None
    mean_per_class_recall: float
    c: float
    val_acc1: float | None


def linear_probe(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    *,
    n_classes: int,
    shots: Sequence[int | None] = (1, 2, 4, 8, 16, None),
    seed: int = 0,
    c_grid: Sequence[float] = C_GRID,
) -> dict[int | None, ProbeRow | None]:
    """A logistic regression on frozen features, for each few-shot size (CLIP's linear probe).

    ``train_x`` N×D, ``train_y`` N ints, ``test_x`` M×D, ``test_y`` M ints. For each ``k`` in
    ``shots`` the classifier sees :func:`sample_shots` (k per class, seeded; None = all) of the
    features standardised with the mean and std of all of ``train_x``; ``C`` is chosen by
    :func:`choose_c` on a stratified :data:`VALIDATION_FRACTION` of that sample (so a k-shot
    probe uses no label beyond its k per class), then the probe is refitted on the whole sample.

    A row is None (not fitted) without a test example or a second class, when some of the
    ``n_classes`` classes has fewer than ``k`` (for ``None``: fewer than 1) training examples, so
    that a row is never a k-shot figure that is not k-shot (see :func:`short_classes`), and when
    the k-shot sample is the whole training set (:func:`k_shot_is_full`): it would repeat the
    full row.
    """
    x, tx = _float_matrix(train_x, "train_x"), _float_matrix(test_x, "test_x")
    y, ty = _labels(train_y, n_classes, "train_y"), _labels(test_y, n_classes, "test_y")
    results: dict[int | None, ProbeRow | None] = {k: None for k in shots}
    # With one class any classifier is always right: no figure.
    fitted = [
        k
        for k in shots
        if len(ty) and n_classes > 1 and not short_classes(y, n_classes, k) and not (k and k_shot_is_full(y, k))
    ]
    if not fitted:
        return results
    # Statistics of all training features (no labels): a 1-shot sample's own spread would
    # blow up noise dimensions as much as the informative ones.
    mean, std = x.mean(0), np.maximum(x.std(0), 1e-6)
    x, tx = (x - mean) / std, (tx - mean) / std
    for k in fitted:
        chosen = sample_shots(y, k, seed=seed)
        results[k] = _probe(x[chosen], y[chosen], tx, ty, n_classes, seed=seed, c_grid=c_grid)
    return results


def k_shot_is_full(train_y: ArrayLike, k: int) -> bool:
    """Whether every class has at most ``k`` training examples: the k-shot sample is then the
    whole training set and the k-shot row would repeat the full one."""
    counts = np.bincount(np.asarray(to_numpy(train_y), dtype=np.int64).reshape(-1))
    return bool(counts.size) and int(counts.max()) <= k


def short_classes(train_y: ArrayLike, n_classes: int, k: int | None) -> dict[int, int]:
    """``{class: training examples}`` of the classes with fewer than ``k`` (None: fewer than 1)."""
    counts = np.bincount(np.asarray(to_numpy(train_y), dtype=np.int64).reshape(-1), minlength=n_classes)
    need = 1 if k is None else k
    return {c: int(n) for c, n in enumerate(counts) if n < need}


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train, test)`` indices holding out ``round(test_fraction·n_c)`` of each class c,
    at least one and at most ``n_c − 1``: every class keeps a training example (a class the probe
    never saw could not be predicted), and a class of one example is not tested."""
    rng = np.random.default_rng(seed)
    train, test = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(max(1, round(test_fraction * len(members))), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def choose_c(
    x: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, c_grid: Sequence[float]
) -> tuple[float, float]:
    """``(C, validation accuracy)`` of the best probe fitted on ``x`` and scored on ``val_x``.

    Ties go to the ``C`` nearest :data:`DEFAULT_C` (on the log scale): a validation set of a few
    examples often ties every ``C``, and then the ends of the grid (all prior, or no
    regularisation) are the riskiest picks."""
    accs = [float(np.mean(_fit_logistic(x, y, c).predict(val_x) == val_y)) for c in c_grid]
    tied = [i for i, acc in enumerate(accs) if acc == max(accs)]
    best = min(tied, key=lambda i: abs(np.log(c_grid[i] / DEFAULT_C)))
    return float(c_grid[best]), accs[best]


def _probe(
    x: np.ndarray, y: np.ndarray, tx: np.ndarray, ty: np.ndarray, n_classes: int, *, seed: int, c_grid
) -> ProbeRow:
    """Choose ``C`` on a validation split of ``(x, y)``, refit on all of it, score on ``(tx, ty)``."""
    fit, val = stratified_split(y, VALIDATION_FRACTION, seed)
    c, val_acc = choose_c(x[fit], y[fit], x[val], y[val], c_grid) if len(val) else (DEFAULT_C, None)
    model = _fit_logistic(x, y, c)
    hits = model.predict(tx) == ty
    # Every class is in the sample (short_classes), so the probability columns are the classes 0..C-1.
    rank = true_class_rank(model.predict_proba(tx), ty)
    return ProbeRow(
        acc1=float(np.mean(hits)),
        acc5=float(np.mean(rank < 5)) if n_classes > 5 else None,
        mean_per_class_recall=float(mean_per_class_recall(hits, ty)),
        c=c,
        val_acc1=val_acc,
    )


def _fit_logistic(x: np.ndarray, y: np.ndarray, c: float):
    """scikit-learn's multinomial logistic regression (L-BFGS, L2 penalty 1/(2C)·‖W‖²), fitted.

    A fit that stops at ``max_iter`` before converging (weak regularisation on separable
    features) still classifies; its warning would only repeat for every ``C`` of the sweep.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # A few-shot sample has as many classes as examples or nearly: classification all the same.
        warnings.filterwarnings("ignore", "The number of unique classes is greater than 50%", UserWarning)
        return LogisticRegression(C=c, max_iter=1000).fit(x, y)


# --------------------------------------------------------------------------------------------
# answers (VQA, image–text matching)
# --------------------------------------------------------------------------------------------

_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(answer: str) -> str:
    """Lower case, punctuation dropped, articles dropped, number words as digits (VQA style)."""
    words = _PUNCTUATION.sub("", answer.lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def answer_accuracy(rows: list[dict[str, Any]], prior: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    """Accuracy of predicted answers (VQA, or ITM's yes/no), overall and per question type.

    ``rows`` hold ``answer``, ``predicted`` and ``type``; answers are compared after
    :func:`normalize_answer`. With a training ``prior`` (answer counts, overall under ``"*"`` and
    per type; see :func:`mmcli.data.examples.answer_prior`) also the majority-answer baselines: the
    most frequent training answer overall, and the most frequent one per question type.
    """
    by_type: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by_type[r["type"]].append(_same_answer(r["predicted"], r["answer"]))
    hits = [h for v in by_type.values() for h in v]
    report: dict[str, Any] = {
        "accuracy": _mean(hits),
        "n": len(hits),
        "per_type": {t: {"accuracy": _mean(v), "n": len(v)} for t, v in sorted(by_type.items())},
    }
    if prior:
        overall = _most_common(prior["*"])
        per_type = {t: _most_common(prior.get(t) or prior["*"]) for t in by_type}
        report["majority_answer"] = overall
        report["majority_baseline"] = _mean([_same_answer(overall, r["answer"]) for r in rows])
        report["type_majority_baseline"] = _mean([_same_answer(per_type[r["type"]], r["answer"]) for r in rows])
    return report


def _same_answer(predicted: str, answer: str) -> bool:
    return normalize_answer(predicted) == normalize_answer(answer)


def _mean(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None  # nothing scored: no accuracy


def _most_common(counts: dict[str, int]) -> str:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]  # ties: alphabetical
