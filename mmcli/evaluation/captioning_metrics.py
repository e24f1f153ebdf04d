"""Captioning metrics as pure functions: the COCO caption metrics, and scene scores for the shapes dataset.

:func:`corpus_metrics` gives BLEU-1..4 (Papineni et al. 2002), ROUGE-L (Lin 2004) and CIDEr-D
(Vedantam et al. 2015) through pycocoevalcap, the COCO caption evaluation code, on captions
normalised by :func:`normalise_caption`. :func:`scene_scores` reads each generated caption with
the shapes grammar (:func:`mmcli.data.shapes.parse_caption`) and checks what it says against the
scene: which objects it names and whether the relation it states is true.

As in :mod:`mmcli.evaluation.metrics`, a figure that has nothing to be computed on, or that any
model would get by construction, is ``None``, never a number.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

from mmcli.data.shapes import ParsedCaption, parse_caption

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_caption(text: str) -> str:
    """``text`` lowercased, each ASCII punctuation mark replaced by a space, whitespace collapsed.

    This is the tokenizer the COCO metrics see here: words are what ``str.split`` gives after it.
    pycocoevalcap's own ``PTBTokenizer`` runs Stanford CoreNLP in Java, which mmcli does not
    require; it also lowercases and drops punctuation, so on plain captions the two agree.
    """
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def _check_ids(predictions: Mapping[str, Any], truth: Mapping[str, Any], name: str) -> None:
    """Raise ``ValueError`` naming the first id found in only one of ``predictions`` and ``truth``."""
    for key in predictions:
        if key not in truth:
            raise ValueError(f"prediction {key!r} has no {name}")
    for key in truth:
        if key not in predictions:
            raise ValueError(f"{name} {key!r} has no prediction")


def _normalised_inputs(
    predictions: Mapping[str, str], references: Mapping[str, list[str]]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """pycocoevalcap's ``(gts, res)``: normalised references and one-element prediction lists, in the
    same id order; raises ``ValueError`` for a malformed entry."""
    _check_ids(predictions, references, "references")
    gts, res = {}, {}
    for key, prediction in predictions.items():
        if not isinstance(prediction, str):
            raise ValueError(f"prediction {key!r} must be one string, got {type(prediction).__name__}")
        refs = references[key]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references {key!r} must be a non-empty list of strings")
        gts[key] = [normalise_caption(r) for r in refs]
        if not all(gts[key]):
            raise ValueError(f"references {key!r} hold a caption with no word")
        res[key] = [normalise_caption(prediction)]
    return gts, res


def corpus_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float | int | None]:
    """BLEU-1..4, ROUGE-L and CIDEr-D of one caption per image against its reference captions.

    Both are keyed by image id, with the same ids; captions pass through :func:`normalise_caption`
    first. Returns ``bleu1``..``bleu4``, ``rouge_l``, ``cider_d`` and ``images`` (their count).
    What pycocoevalcap 1.2 computes (read in its source):

    - BLEU (``Bleu(4)``, ``option="closest"``): corpus-level, n-gram counts clipped by their largest
      count in one reference and summed over images, brevity penalty ``exp(1 - r/c)`` when the
      summed hypothesis length ``c`` is below ``r``, the sum of each image's closest reference
      length. A zero n-gram count gives a tiny number (1e-15 over the guesses), not 0. Called with
      ``verbose=0``, as it prints its counts otherwise.
    - ROUGE-L (``Rouge()``): per image ``F = (1 + b²)PR / (R + b²P)`` with ``b = 1.2``, ``P`` and
      ``R`` the largest LCS precision and the largest LCS recall over the references (each maximised
      alone), averaged over images.
    - CIDEr-D (``Cider()``; its ``CiderScorer`` is the CIDEr-D variant): TF-IDF vectors of 1..4-grams,
      with counts clipped to the reference's (``min(hyp, ref) * ref``), a Gaussian length penalty
      ``exp(-d²/2σ²)`` with ``σ = 6``, cosine averaged over n and references, times 10. The idf is
      computed over the references of the evaluated images, so an n-gram in every image's
      references (here ``a``) weighs nothing, and with one image everything does: the score
      would be 0 for any caption, so ``cider_d`` is ``None`` for fewer than two images. (The
      length it penalises is counted in bigrams, i.e. words minus one, by the source.)

    An empty prediction (or one that normalises to nothing) is scored as it is: pycocoevalcap 1.2
    does not assert on it. BLEU counts it as length 0 with no matches, ROUGE-L splits it into one
    empty token that matches no reference word (score 0), CIDEr-D gives it a zero vector (score 0).
    Reference captions must hold a word. With no image every figure is ``None``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _normalised_inputs(predictions, references)
    if not gts:
        return {**dict.fromkeys(("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider_d")), "images": 0}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider = Cider().compute_score(gts, res)[0] if len(gts) >= 2 else None
    return {
        **{f"bleu{n}": float(score) for n, score in enumerate(bleu, start=1)},
        "rouge_l": float(rouge),
        "cider_d": None if cider is None else float(cider),
        "images": len(gts),
    }


# --------------------------------------------------------------------------------------------
# scene scores (shapes dataset)
# --------------------------------------------------------------------------------------------


def _scene_objects(scene: dict) -> list[tuple[str, str]]:
    return [(o["color"], o["shape"]) for o in scene["objects"]]


def relation_is_true(parsed: ParsedCaption, scene: dict) -> bool:
    """Whether ``parsed`` states a relation of ``objects[0]`` to ``objects[1]`` that holds in
    ``scene`` (a shapes JSONL record): both objects are in the scene, distinct, and the scene's
    ``relations`` entry for that ordered pair has that predicate (a ``null`` predicate holds none)."""
    if parsed.relation is None:
        return False
    present = _scene_objects(scene)
    first, second = parsed.objects[0], parsed.objects[1]
    if first not in present or second not in present or first == second:
        return False
    subject, obj = present.index(first), present.index(second)
    return any(
        r["subject"] == subject and r["object"] == obj and r["predicate"] == parsed.relation for r in scene["relations"]
    )


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def scene_scores(predictions: dict[str, str], scenes: dict[str, dict]) -> dict[str, float | int | None]:
    """How well generated captions describe their shapes scenes, read with the dataset's grammar.

    ``scenes[id]`` is a shapes JSONL record (``objects`` with ``color`` and ``shape``; ``relations``
    with ``subject``, ``predicate``, ``object`` for every ordered pair); the ids must be those of
    ``predictions``. Each caption is read by :func:`mmcli.data.shapes.parse_caption`; one that does
    not parse is ``unparseable``. A (colour, shape) pair identifies an object within a shapes image.

    - ``object_precision`` / ``object_recall`` / ``object_f1``: micro-averaged over the corpus on sets
      of (colour, shape) pairs — the caption's set (an object named twice counts once) against the
      scene's. An unparseable caption predicts nothing and misses all its scene's objects.
    - ``relation_accuracy``: over the captions of scenes with at least two objects, the share that
      parse and state a relation that is true in the scene (:func:`relation_is_true`). An
      unparseable caption, a caption naming one object (no relation), and a false relation are all
      wrong; a relation stated for a one-object scene is never counted. ``relations_stated``: how
      many captions, over all scenes, parse and state a relation.
    - ``exact_scene``: the share of captions that parse, name each scene object exactly once and
      nothing else, and, if they state a relation, state a true one (for a scene of two or more
      objects the grammar always states one).
    - ``unparseable`` and ``captions``: counts.

    A ratio with an empty denominator (no caption, nothing predicted, no scene of two objects) is
    ``None``; ``object_f1`` is ``2·hits / (predicted + scene objects)``, which is 0 when nothing is
    predicted.
    """
    _check_ids(predictions, scenes, "scene")
    hits = predicted = present = 0
    relation_scenes = relations_right = relations_stated = exact = unparseable = 0
    for key, text in predictions.items():
        scene = scenes[key]
        truth = set(_scene_objects(scene))
        parsed = parse_caption(text)
        present += len(truth)
        multi = len(scene["objects"]) >= 2
        relation_scenes += multi
        if parsed is None:
            unparseable += 1
            continue
        named = set(parsed.objects)
        hits += len(named & truth)
        predicted += len(named)
        true_relation = relation_is_true(parsed, scene)
        relations_stated += parsed.relation is not None
        relations_right += multi and true_relation
        once_each = named == truth and len(parsed.objects) == len(named)
        exact += once_each and (parsed.relation is None or true_relation)
    return {
        "object_precision": _ratio(hits, predicted),
        "object_recall": _ratio(hits, present),
        # 2PR / (P + R) written with counts, so that it is 0, not undefined, when nothing is predicted.
        "object_f1": _ratio(2 * hits, predicted + present),
        "relation_accuracy": _ratio(relations_right, relation_scenes),
        "relations_stated": relations_stated,
        "exact_scene": _ratio(exact, len(predictions)),
        "unparseable": unparseable,
        "captions": len(predictions),
    }
