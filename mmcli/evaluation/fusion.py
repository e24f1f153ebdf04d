"""Scores of fused models on the shapes dataset: VQA accuracy, ITM accuracy, MLM accuracy.

Pure entry points (a run folder and a JSONL file in, a dict of numbers out) for ``mmcli eval``
and ``mmcli fuse``; predictions are also returned row by row for writing.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcli.data.batches import to_device
from mmcli.data.examples import (
    Example,
    ExampleDataset,
    example_loader,
    matching_examples,
    question_examples,
    read_shapes_jsonl,
)
from mmcli.data.masking import IGNORE_INDEX, mask_tokens
from mmcli.data.shapes import COLORS, SHAPES
from mmcli.data.tokenize import Tokenize
from mmcli.errors import MmcliError
from mmcli.evaluation.metrics import answer_accuracy

DEFAULT_WORD_GROUPS = {"color": list(COLORS), "shape": list(SHAPES)}
"""The words :func:`evaluate_mlm` masks by default: the shapes dataset's colours and shapes."""


def _loader(loaded, examples: list[Example], labels: list[str], batch_size: int, workers: int = 0):
    from mmcli.models.downstream import uses_graph

    dataset = ExampleDataset(
        examples, labels, loaded.preprocess, Tokenize(loaded.tokenizer), concepts=uses_graph(loaded.model)
    )
    return example_loader(dataset, batch_size=batch_size, train=False, seed=0, workers=workers)


# -- VQA and ITM -------------------------------------------------------------------------------------
@torch.no_grad()
def predict(
    model, loader: Iterable[dict], examples: list[Example], labels: list[str], task: str, device
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Prediction rows (id, question, type, answer, predicted, score) and the pooled fused
    features [N, dim] of ``examples`` (float32, in example order; undecodable images skipped)."""
    from mmcli.models.downstream import task_outputs

    model.eval()
    rows, features = [], []
    for batch in loader:
        logits, fused = task_outputs(model, to_device(batch, device), task)
        probs = logits.float().softmax(dim=-1)
        score, top = probs.max(dim=-1)
        for i, s, t in zip(batch["index"].tolist(), score.tolist(), top.tolist()):
            e = examples[i]
            rows.append(
                {
                    "id": e.id,
                    "question": e.text,
                    "type": e.type,
                    "answer": e.label,
                    "predicted": labels[t],
                    "score": round(s, 6),
                }
            )
        features.append(fused.float().cpu().numpy())
    dim = getattr(model.fusion, "out_dim", 0)
    return rows, np.concatenate(features) if features else np.zeros((0, dim), np.float32)


def _load(run_dir: str | Path, device, needs: tuple[str, ...]):
    from mmcli.models.loading import load_model

    loaded = load_model(str(run_dir), device=device)
    missing = [n for n in needs if not hasattr(loaded.model, n)]
    if missing:
        raise MmcliError(f"{run_dir}: the run has no {', '.join(missing)} (train it with mmcli pretrain/fuse first)")
    return loaded


def evaluate_vqa(run_dir: str | Path, jsonl_path: str | Path, *, device="cpu", batch_size: int = 64) -> dict[str, Any]:
    """VQA accuracy of a fuse run on the questions of a shapes JSONL file, overall and per type,
    with the majority-answer baselines of the run's training answers."""
    from mmcli.models.downstream import task_labels

    loaded = _load(run_dir, device, ("fusion", "vqa_head"))
    examples = question_examples(read_shapes_jsonl(jsonl_path))
    labels = task_labels(loaded.model, "vqa")
    rows, _ = predict(loaded.model, _loader(loaded, examples, labels, batch_size), examples, labels, "vqa", device)
    return {"task": "vqa", "data": str(jsonl_path), **answer_accuracy(rows, loaded.meta.get("answer_prior"))}


def evaluate_itm(
    run_dir: str | Path, jsonl_path: str | Path, *, device="cpu", batch_size: int = 64, seed: int = 0
) -> dict[str, Any]:
    """ITM accuracy of a run with a fusion encoder and an ITM head: each image with its caption
    and with another image's (different) caption, drawn from ``seed``; chance is 0.5."""
    from mmcli.models.downstream import ITM_LABELS

    loaded = _load(run_dir, device, ("fusion", "itm_head"))
    examples = matching_examples(read_shapes_jsonl(jsonl_path), seed)
    rows, _ = predict(
        loaded.model, _loader(loaded, examples, ITM_LABELS, batch_size), examples, ITM_LABELS, "itm", device
    )
    return {"task": "itm", "data": str(jsonl_path), **answer_accuracy(rows)}


def fuse_validator(loader, examples: list[Example], labels: list[str], task: str, device) -> Callable:
    """A validation function for the training loop: task accuracy on held-out examples."""

    def validate(model) -> dict[str, Any]:
        rows, _ = predict(model, loader, examples, labels, task, device)
        model.train()
        return {"val_accuracy": answer_accuracy(rows)["accuracy"], "val_examples": len(rows)}

    return validate


# -- MLM ----------------------------------------------------------------------------------------------
def word_token_ids(tokenizer, words: list[str]) -> list[int]:
    """The token id of each word; a word that is not one token is an error (it could not be
    masked as one prediction)."""
    from mmcli.models.constants import SPECIAL_IDS

    ids = []
    for word in words:
        pieces = [t for t in tokenizer([word])[0].tolist() if t not in SPECIAL_IDS]
        if len(pieces) != 1:
            raise MmcliError(f"word_groups: {word!r} is {len(pieces)} tokens; only single-token words can be masked")
        ids.append(pieces[0])
    return ids


def mask_words(tokens: torch.Tensor, word_ids: list[int], mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace every occurrence of ``word_ids`` by ``mask_id``; labels hold the original ids there
    and ``IGNORE_INDEX`` elsewhere (the format of :func:`mmcli.data.masking.mask_tokens`)."""
    selected = torch.isin(tokens, torch.tensor(word_ids, device=tokens.device))
    return tokens.masked_fill(selected, mask_id), torch.where(selected, tokens, torch.full_like(tokens, IGNORE_INDEX))


@torch.no_grad()
def evaluate_mlm(
    run_dir: str | Path,
    jsonl_path: str | Path,
    *,
    image_conditioned: bool,
    word_groups: dict[str, list[str]] | None = None,
    device="cpu",
    batch_size: int = 64,
    prob: float = 0.15,
    seed: int = 0,
) -> dict[str, Any]:
    """Masked-token top-1 accuracy on the captions of a shapes JSONL file.

    For each word group (default: colours, shapes) every word of the group in a caption is
    masked (the other words stay visible) and predicted; ``overall`` pools the groups. ``random``
    is the standard corruption (``prob`` of the tokens, 80/10/10, seeded). With
    ``image_conditioned`` the masked text reads the image through the fusion encoder (mmlm);
    otherwise the text tower alone predicts (mlm)."""
    from mmcli.models.constants import SPECIAL_IDS

    loaded = _load(run_dir, device, ("mlm_head", "fusion") if image_conditioned else ("mlm_head",))
    model = loaded.model
    groups = {
        name: word_token_ids(loaded.tokenizer, words) for name, words in (word_groups or DEFAULT_WORD_GROUPS).items()
    }
    records = read_shapes_jsonl(jsonl_path)
    examples = [Example(r["id"], r["image"], r["caption"], "", "caption") for r in records]
    generator = torch.Generator().manual_seed(seed)
    counts: dict[str, Counter] = defaultdict(Counter)
    for batch in _loader(loaded, examples, [], batch_size):
        texts = batch["texts"].to(device)
        tokens = model.encode_image_tokens(batch["images"].to(device))[1] if image_conditioned else None
        for name, ids in groups.items():
            _score(counts[name], model.mlm_logits(*mask_words(texts, ids, model.mask_token_id), tokens))
        masked, labels = mask_tokens(
            texts.cpu(),
            mask_id=model.mask_token_id,
            vocab_size=model.mask_token_id,
            special_ids=SPECIAL_IDS,
            prob=prob,
            generator=generator,
        )
        _score(counts["random"], model.mlm_logits(masked.to(device), labels.to(device), tokens))
    result = {name: _rate(counts[name]) for name in groups}
    overall = sum((counts[name] for name in groups), Counter())
    return {
        "image_conditioned": image_conditioned,
        "data": str(jsonl_path),
        "groups": result,
        "overall": _rate(overall),
        "random": {**_rate(counts["random"]), "prob": prob},
    }


def _score(counter: Counter, out) -> None:
    counter["n"] += len(out.targets)
    counter["hits"] += int((out.logits.argmax(dim=-1) == out.targets).sum())


def _rate(counter: Counter) -> dict[str, Any]:
    # None, not 0: nothing was scored, so there is no accuracy to report
    return {"accuracy": round(counter["hits"] / counter["n"], 4) if counter["n"] else None, "n": counter["n"]}
