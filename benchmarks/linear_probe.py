"""The linear probe of ``mmcli eval``, old against new, on the same features and samples in one run.

    old          the previous probe: full-batch L-BFGS in torch (200 iterations, float64) on
                 cross-entropy + 1e-3/2·‖W‖², one fixed weight decay for every dataset and shot count
    default C    scikit-learn's LogisticRegression at its default C = 1, no sweep
    new          ``mmcli.evaluation.metrics.linear_probe``: scikit-learn's LogisticRegression, C
                 chosen over a log grid on a validation fifth of each sample, refitted on the sample

Times are CPU seconds of this process (``time.process_time``; run with ``OMP_NUM_THREADS=1`` for
one thread each), so that a busy machine does not charge the others' work to a probe. Every
probe sees the same standardised features and the same k-per-class samples
(``metrics.sample_shots``). Two sets:

    hard         synthetic: 20 Gaussian classes whose centres differ in 16 of 256 dimensions,
                 overlapping (the other 240 are noise), 30 training examples per class
    shapes       the image embeddings of a trained run on a labelled file (``--run``, ``--data``:
                 the classify split of ``mmcli data shapes``), half of each class held out as
                 ``mmcli eval``'s linear probe does

Example (figures in docs/evaluation.md)::

    .venv/bin/python benchmarks/linear_probe.py --run runs/shapes --data data/shapes/classify.tsv
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from mmcli.evaluation import metrics


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a trained run folder (or ARCH:PRETRAINED) for the shapes set")
    parser.add_argument("--data", help="labelled images (class folders or CSV/TSV/JSONL) for the shapes set")
    parser.add_argument("--shots", default="1,2,4,8,all", help="comma-separated shot counts; all = every example")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sets", default="hard,shapes", help="which sets to run (shapes needs --run and --data)")
    return parser.parse_args(argv)


def hard_set(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """20 overlapping Gaussian classes: centres in 16 of 256 dimensions, 30 train / 100 test each."""
    rng = np.random.default_rng(seed)
    n_classes, dim, informative = 20, 256, 16
    centres = np.zeros((n_classes, dim))
    centres[:, :informative] = 0.6 * rng.standard_normal((n_classes, informative))
    train_y, test_y = np.repeat(np.arange(n_classes), 30), np.repeat(np.arange(n_classes), 100)
    train_x = centres[train_y] + rng.standard_normal((len(train_y), dim))
    test_x = centres[test_y] + rng.standard_normal((len(test_y), dim))
    return train_x.astype(np.float32), train_y, test_x.astype(np.float32), test_y


def shapes_set(run: str, data: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Image embeddings of ``data`` by ``run``, split as ``mmcli eval``'s probe (half held out)."""
    from mmcli.distributed import resolve_device
    from mmcli.evaluation.image_text import Embedder, class_index, read_labelled
    from mmcli.models.loading import load_model
    from mmcli.spec import LabelledSourceSpec

    device = resolve_device("auto")
    embedder = Embedder(load_model(run, device=device), device=device, batch_size=128, workers=2)
    paths, labels = read_labelled(LabelledSourceSpec(path=data))
    _, y = class_index(labels, None, data)
    x, ok = embedder.images(paths)
    y = y[ok]
    train, test = metrics.stratified_split(y, 0.5, seed)
    return x[train], y[train], x[test], y[test]


def old_fit(x: np.ndarray, y: np.ndarray, n_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """The previous ``metrics._fit_logistic`` (steps=200, weight_decay=1e-3), unchanged."""
    import torch

    features, targets = torch.from_numpy(x).double(), torch.from_numpy(y)
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(features @ weight + bias, targets)
        loss = loss + 0.5 * 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)

    def predict(test: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return (torch.from_numpy(test).double() @ weight + bias).argmax(1).numpy()

    return predict


def compare(name: str, data, shots: list[int | None], seed: int) -> None:
    """Print accuracy and seconds of the three probes for each shot count of one set."""
    import torch  # noqa: F401  imported before any timing, as in ``mmcli eval`` (the model needs it)
    from sklearn.linear_model import LogisticRegression

    train_x, train_y, test_x, test_y = data
    n_classes = int(train_y.max()) + 1
    mean, std = train_x.mean(0), np.maximum(train_x.std(0), 1e-6)
    x, tx = (train_x - mean) / std, (test_x - mean) / std

    def accuracy(predict: Callable[[np.ndarray], np.ndarray]) -> float:
        return float(np.mean(predict(tx) == test_y))

    old_fit(x[:2].astype(np.float64), np.array([0, 1]), 2)  # torch's first-call set-up, outside the timings
    counts = np.bincount(train_y, minlength=n_classes)
    print(
        f"\n{name}: {n_classes} classes, {len(train_y)} train ({counts.min()}–{counts.max()} per class), "
        f"{len(test_y)} test, {train_x.shape[1]} dims"
    )
    print(
        f"{'shots':>6} {'old acc':>8} {'C=1 acc':>8} {'new acc':>8} {'new C':>7} "
        f"{'old s':>7} {'C=1 s':>7} {'new s':>7} {'old/new CPU':>12}"
    )
    for k in shots:
        label = "all" if k is None else str(k)
        if metrics.short_classes(train_y, n_classes, k) or (k is not None and metrics.k_shot_is_full(train_y, k)):
            print(f"{label:>6}  (skipped: not a distinct {label}-shot sample of every class)")
            continue
        chosen = metrics.sample_shots(train_y, k, seed=seed)
        start = time.process_time()
        old_acc = accuracy(old_fit(x[chosen].astype(np.float64), train_y[chosen], n_classes))
        old_s, start = time.process_time() - start, time.process_time()
        default_acc = accuracy(LogisticRegression(max_iter=1000).fit(x[chosen], train_y[chosen]).predict)
        default_s, start = time.process_time() - start, time.process_time()
        row = metrics.linear_probe(train_x, train_y, test_x, test_y, n_classes=n_classes, shots=[k], seed=seed)[k]
        new_s = time.process_time() - start
        print(
            f"{label:>6} {old_acc:8.3f} {default_acc:8.3f} {row.acc1:8.3f} {row.c:7.3g} "
            f"{old_s:7.2f} {default_s:7.2f} {new_s:7.2f} {old_s / new_s:11.2f}×"
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    shots = [None if s == "all" else int(s) for s in args.shots.split(",")]
    sets = args.sets.split(",")
    if "hard" in sets:
        compare("hard (synthetic)", hard_set(args.seed), shots, args.seed)
    if "shapes" in sets and args.run and args.data:
        compare(f"shapes ({args.data})", shapes_set(args.run, args.data, args.seed), shots, args.seed)


if __name__ == "__main__":
    main()
