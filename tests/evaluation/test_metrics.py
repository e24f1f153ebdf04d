"""Tests for mmcli.evaluation.metrics: every expected value is worked out by hand or by brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmcli.evaluation import metrics as m
from mmcli.viz.confusion import plot_confusion

# --------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------


def test_retrieval_recall_on_a_hand_computed_example():
    images = np.array([[1.0, 0.0], [0.0, 1.0]])
    texts = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    owner = [0, 0, 1]  # texts 0 and 1 describe image 0, text 2 describes image 1
    # text→image: t0 ranks i0 first; t1 scores i1 (0.8) over i0 (0.6); t2 scores i0 (0.8) over i1 (0.6).
    # image→text: i0's best caption t0 (1.0) is first; i1's caption t2 (0.6) is behind t1 (0.8).
    for chunk in (1, 2, 4096):
        assert m.retrieval_recall(images, texts, owner, ks=(1, 2), chunk=chunk) == {
            "image_to_text_R@1": 0.5,
            "image_to_text_R@2": 1.0,  # i1 ranks against t0 and t1: it could have missed
            "text_to_image_R@1": 1 / 3,
            "text_to_image_R@2": None,  # 2 images: every text finds its image in the top 2
        }


def test_retrieval_recall_matches_a_full_matrix_reference():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((30, 8)).astype(np.float32)
    owner = np.concatenate([np.arange(30), np.arange(25)])  # five images have one caption, the rest two
    texts = images[owner] + rng.standard_normal((55, 8)).astype(np.float32)
    scores = texts @ images.T
    text_rank = np.argsort(-scores, axis=1).argsort(axis=1)[np.arange(55), owner]
    image_rank = np.argsort(-scores.T, axis=1).argsort(axis=1)  # rank of each text for each image
    best = np.array([image_rank[i, owner == i].min() for i in range(30)])
    got = m.retrieval_recall(images, texts, owner, ks=(1, 5), chunk=7)
    for k in (1, 5):
        assert got[f"text_to_image_R@{k}"] == pytest.approx(np.mean(text_rank < k))
        assert got[f"image_to_text_R@{k}"] == pytest.approx(np.mean(best < k))


def test_images_without_captions_are_left_out():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = np.array([[1.0, 0.0], [0.0, 1.0]])
    got = m.retrieval_recall(images, texts, [0, 1], ks=(1,))
    assert got == {"image_to_text_R@1": 1.0, "text_to_image_R@1": 1.0}  # only images 0 and 1 are scored


def test_ties_count_against_the_model():
    same = np.ones((3, 2)) / np.sqrt(2)  # every score equal: no real ranking at all
    got = m.retrieval_recall(same, same, [0, 1, 2], ks=(1, 2, 3))
    assert got == {
        "image_to_text_R@1": 0.0,
        "image_to_text_R@2": 0.0,
        "image_to_text_R@3": None,  # 3 images: the answer is always in the top 3
        "text_to_image_R@1": 0.0,
        "text_to_image_R@2": 0.0,
        "text_to_image_R@3": None,
    }


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------


def test_zero_shot_accuracy_on_a_hand_computed_example():
    logits = np.array([[3, 1, 0], [2, 1, 0], [0, 1, 3], [0, 3, 1]], dtype=float)
    labels = [0, 0, 1, 2]  # rows 0 and 1 are right, rows 2 and 3 wrong
    got = m.zero_shot_accuracy(logits, labels, n_classes=3)
    # per class: class 0 2/2, class 1 0/1, class 2 0/1 → mean 1/3; fewer than 5 classes: no top-5
    assert got == {"top1": 0.5, "top5": None, "mean_per_class_recall": pytest.approx(1 / 3), "n": 4}


def test_zero_shot_top5_and_the_embedding_pair_form():
    classes = np.eye(6)
    images = np.array([[5, 4, 3, 2, 1, 0], [5, 4, 3, 2, 1, 0]], dtype=float)  # scores = the row
    got = m.zero_shot_accuracy((images, classes), [4, 5], n_classes=6)
    assert got["top1"] == 0.0 and got["top5"] == 0.5  # class 4 is 5th, class 5 is 6th
    assert got == m.zero_shot_accuracy(torch.tensor(images @ classes.T), torch.tensor([4, 5]), n_classes=6)


def test_constant_logits_score_zero():
    assert m.zero_shot_accuracy(np.zeros((4, 3)), [0, 1, 2, 0], n_classes=3)["top1"] == 0.0


def test_confusion_matrix_rows_are_true_classes():
    got = m.confusion_matrix([0, 1, 1, 2, 2], [0, 1, 2, 2, 2], n_classes=3)
    np.testing.assert_array_equal(got, [[1, 0, 0], [0, 1, 0], [0, 1, 2]])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        m.confusion_matrix([3], [0], n_classes=3)


def test_plot_confusion_writes_a_png_that_grows_with_the_classes(tmp_path):
    small = plot_confusion(np.eye(3, dtype=int), ["a", "b", "c"], tmp_path / "small.png")
    names = [f"class {i}" for i in range(40)]
    large = plot_confusion(np.eye(40, dtype=int), names, tmp_path / "large.png")
    with Image.open(small) as a, Image.open(large) as b:
        assert a.format == b.format == "PNG" and b.width > 2 * a.width
    with pytest.raises(ValueError, match="2×2"):
        plot_confusion(np.eye(3), ["a", "b"], tmp_path / "bad.png")


# --------------------------------------------------------------------------------------------
# linear probe
# --------------------------------------------------------------------------------------------


def _acc1(rows: dict) -> dict:
    return {k: None if row is None else row.acc1 for k, row in rows.items()}


def test_sample_shots_takes_k_per_class_nested_and_seeded():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    two = m.sample_shots(labels, 2, seed=3)
    assert np.bincount(labels[two]).tolist() == [2, 2, 2]
    assert set(m.sample_shots(labels, 1, seed=3)) < set(two)  # 1-shot ⊂ 2-shot
    assert np.bincount(labels[m.sample_shots(labels, 3, seed=3)]).tolist() == [3, 2, 3]  # class 1 has 2
    np.testing.assert_array_equal(m.sample_shots(labels, 2, seed=3), two)
    np.testing.assert_array_equal(m.sample_shots(labels, None, seed=3), np.arange(9))


def test_linear_probe_is_perfect_on_separable_clusters():
    rng = np.random.default_rng(0)
    centres = 10 * np.eye(3)  # classes 10σ apart along their own axis
    train_y, test_y = rng.integers(3, size=60), rng.integers(3, size=30)
    train_x = centres[train_y] + rng.standard_normal((60, 3))
    test_x = centres[test_y] + rng.standard_normal((30, 3))
    got = m.linear_probe(train_x, train_y, test_x, test_y, n_classes=3, shots=[1, 4, None], seed=0)
    assert _acc1(got) == {1: 1.0, 4: 1.0, None: 1.0}


def test_linear_probe_on_a_known_answer():
    # Trained on x = -1 (class 0) and x = +1 (class 1), any boundary lies in (-1, 1): the test
    # points -2 → 0 and +2 → 1 are right; -3 labelled 1 and +3 labelled 0 are wrong → 0.5.
    train_x, train_y = np.array([[-1.0], [-1.0], [1.0], [1.0]]), np.array([0, 0, 1, 1])
    test_x, test_y = np.array([[-2.0], [2.0], [-3.0], [3.0]]), np.array([0, 1, 1, 0])
    assert _acc1(m.linear_probe(train_x, train_y, test_x, test_y, n_classes=2, shots=[None])) == {None: 0.5}


# --------------------------------------------------------------------------------------------
# answers (VQA, image–text matching)
# --------------------------------------------------------------------------------------------


def test_normalize_answer():
    assert m.normalize_answer("The Cat!") == "cat"
    assert m.normalize_answer("  Three dogs. ") == "3 dogs"


def _rows(pairs, types):
    return [{"predicted": p, "answer": a, "type": t} for (p, a), t in zip(pairs, types)]


def test_answer_accuracy_normalises_answers_overall_and_per_type():
    rows = _rows([("Two", "2"), ("yes", "no"), ("a dog", "dog"), ("red", "blue.")], ["count", "exist", "what", "color"])
    got = m.answer_accuracy(rows)
    assert got["accuracy"] == 0.5 and got["n"] == 4
    assert got["per_type"] == {
        "color": {"accuracy": 0.0, "n": 1},
        "count": {"accuracy": 1.0, "n": 1},
        "exist": {"accuracy": 0.0, "n": 1},
        "what": {"accuracy": 1.0, "n": 1},
    }
    assert "majority_baseline" not in got


def test_answer_accuracy_majority_baselines_from_the_training_prior():
    rows = _rows([("yes", "Yes."), ("no", "no"), ("2", "two")], ["exist", "exist", "count"])
    prior = {"*": {"yes": 3, "no": 3, "2": 1}, "count": {"2": 1}}  # tie overall: alphabetical, "no"
    got = m.answer_accuracy(rows, prior)
    assert got["accuracy"] == 1.0
    assert got["majority_answer"] == "no" and got["majority_baseline"] == round(1 / 3, 4)
    # per type: "exist" has no prior of its own, so the overall "no"; "count" answers "2" = "two"
    assert got["type_majority_baseline"] == round(2 / 3, 4)


def test_to_numpy_converts_bfloat16_tensors():
    got = m.to_numpy(torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
    assert got.dtype == np.float32 and got.tolist() == [1.5, -2.0]


# --------------------------------------------------------------------------------------------
# figures that cannot be trusted are None, never a number (and never a NumPy warning)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning (mean of empty slice, …) fails the test
        yield


def test_retrieval_with_one_image_or_one_text_is_not_scored(no_warnings):
    one = np.array([[1.0, 0.0]])
    assert set(m.retrieval_recall(one, one, [0], ks=(1, 5)).values()) == {None}  # was R@1 = 1.0
    two = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert set(m.retrieval_recall(two, one, [0], ks=(1,)).values()) == {None}  # one text
    assert set(m.retrieval_recall(np.zeros((0, 2)), np.zeros((0, 2)), [], ks=(1,)).values()) == {None}


def test_retrieval_recall_at_k_needs_more_than_k_candidates():
    rng = np.random.default_rng(1)
    images = rng.standard_normal((4, 3))
    texts = np.concatenate([images, images]) + 0.1 * rng.standard_normal((8, 3))
    got = m.retrieval_recall(images, texts, [0, 1, 2, 3] * 2, ks=(1, 3, 4, 6, 7))
    # text→image: 4 images, so R@4 and up hold for any model; image→text: each image ranks
    # against the 6 texts of the others, so R@7 holds for any model, R@6 does not.
    assert [got[f"text_to_image_R@{k}"] is None for k in (1, 3, 4, 6, 7)] == [False, False, True, True, True]
    assert [got[f"image_to_text_R@{k}"] is None for k in (1, 3, 4, 6, 7)] == [False, False, False, False, True]


def test_zero_shot_top_k_needs_more_than_k_classes(no_warnings):
    five = np.array([[0, 0, 0, 0, 1.0]])
    assert m.zero_shot_accuracy(five, [0], n_classes=5)["top5"] is None  # was 1.0: the worst rank is 5th
    one = m.zero_shot_accuracy(np.zeros((3, 1)), [0, 0, 0], n_classes=1)
    assert one == {"top1": None, "top5": None, "mean_per_class_recall": None, "n": 3}  # was top-1 = 1.0
    none = m.zero_shot_accuracy(np.zeros((0, 3)), [], n_classes=3)
    assert none == {"top1": None, "top5": None, "mean_per_class_recall": None, "n": 0}


def test_linear_probe_without_training_or_test_examples_is_not_scored(no_warnings):
    x = np.eye(3)
    empty = np.zeros((0, 3))
    assert m.linear_probe(empty, [], x, [0, 1, 2], n_classes=3, shots=[1, None]) == {1: None, None: None}
    assert m.linear_probe(x, [0, 1, 2], empty, [], n_classes=3, shots=[1, None]) == {1: None, None: None}


def test_a_probe_of_one_class_is_not_scored(no_warnings):
    x = np.array([[0.0], [1.0]])
    assert m.linear_probe(x, [0, 0], x, [0, 0], n_classes=1, shots=[1, None]) == {1: None, None: None}


def test_a_k_shot_row_with_a_short_class_is_not_reported_as_k_shot(no_warnings):
    train_x, train_y = np.array([[-1.0], [-1.1], [-0.9], [1.0]]), np.array([0, 0, 0, 1])
    test_x, test_y = np.array([[-2.0], [2.0]]), np.array([0, 1])
    got = m.linear_probe(train_x, train_y, test_x, test_y, n_classes=2, shots=[1, 2, None])
    assert _acc1(got) == {1: 1.0, 2: None, None: 1.0}  # class 1 has one example: there is no 2-shot probe
    assert m.short_classes(train_y, 2, 2) == {1: 1} and m.short_classes(train_y, 3, None) == {2: 0}
    # a class asked for with no training example at all: no row is a probe of all classes
    assert m.linear_probe(train_x, train_y, test_x, test_y, n_classes=3, shots=[1, None]) == {1: None, None: None}


def _overlapping_classes(n_classes: int = 8, dim: int = 10, per_class: int = 30, seed: int = 0):
    """Gaussian classes whose centres are about as far apart as their spread: no C is perfect."""
    rng = np.random.default_rng(seed)
    centres = 0.7 * rng.standard_normal((n_classes, dim))
    train_y = np.repeat(np.arange(n_classes), per_class)
    test_y = rng.integers(n_classes, size=400)
    noise = rng.standard_normal((len(train_y) + len(test_y), dim))
    train_x = (centres[train_y] + noise[: len(train_y)]).astype(np.float32)
    test_x = (centres[test_y] + noise[len(train_y) :]).astype(np.float32)
    return train_x, train_y, test_x, test_y


def _standardised(train_x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train_x.mean(0), np.maximum(train_x.std(0), 1e-6)  # all training features, as the probe
    return (train_x - mean) / std, (test_x - mean) / std


def test_linear_probe_equals_scikit_learn_called_directly_with_the_chosen_c():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

    train_x, train_y, test_x, test_y = _overlapping_classes()
    rows = m.linear_probe(train_x, train_y, test_x, test_y, n_classes=8, shots=[4, None], seed=1)
    x, tx = _standardised(train_x, test_x)
    for k, row in rows.items():
        chosen = m.sample_shots(train_y, k, seed=1)
        ref = LogisticRegression(C=row.c, max_iter=1000).fit(x[chosen], train_y[chosen])
        pred = ref.predict(tx)
        assert row.acc1 == np.mean(pred == test_y)
        assert row.acc5 == pytest.approx(top_k_accuracy_score(test_y, ref.predict_proba(tx), k=5))
        assert row.mean_per_class_recall == pytest.approx(balanced_accuracy_score(test_y, pred))
    assert 0.3 < rows[None].acc1 < 0.95 and rows[4].acc1 < rows[None].acc1  # overlapping, and more data helps


def test_linear_probe_chooses_the_c_of_the_best_validation_accuracy():
    from sklearn.linear_model import LogisticRegression

    train_x, train_y, test_x, test_y = _overlapping_classes(per_class=20, seed=3)
    row = m.linear_probe(train_x, train_y, test_x, test_y, n_classes=8, shots=[None], seed=2)[None]
    x, _ = _standardised(train_x, test_x)
    fit, val = m.stratified_split(train_y, m.VALIDATION_FRACTION, seed=2)  # the sample is all of train
    assert np.bincount(train_y[val]).tolist() == [4] * 8  # a fifth of each class
    accs = []
    for c in m.C_GRID:
        probe = LogisticRegression(C=c, max_iter=1000).fit(x[fit], train_y[fit])
        accs.append(np.mean(probe.predict(x[val]) == train_y[val]))
    assert len(set(accs)) > 1  # the sweep matters on this problem
    best = max(accs)
    assert row.val_acc1 == best
    tied = [c for c, a in zip(m.C_GRID, accs) if a == best]
    assert row.c == min(tied, key=lambda c: abs(np.log10(c)))  # ties: the C nearest 1 (scikit-learn's default)


def test_a_k_shot_row_that_would_repeat_the_full_row_is_not_fitted(no_warnings):
    train_x, train_y, test_x, test_y = _overlapping_classes(n_classes=3, per_class=3)
    assert m.k_shot_is_full(train_y, 3) and not m.k_shot_is_full(train_y, 2)
    got = m.linear_probe(train_x, train_y, test_x, test_y, n_classes=3, shots=[1, 2, 3, 5, None])
    assert [k for k, row in got.items() if row is None] == [3, 5]  # every class has 3: 3- and 5-shot = full
    one_each = np.array([0, 1, 2])
    got = m.linear_probe(train_x[:3], one_each, test_x, test_y, n_classes=3, shots=[1, None])
    assert got[1] is None and got[None].c == m.DEFAULT_C and got[None].val_acc1 is None  # nothing to validate on


def test_answer_accuracy_of_nothing_is_none():
    got = m.answer_accuracy([], {"*": {"yes": 3}})
    assert got["accuracy"] is None and got["n"] == 0 and got["majority_baseline"] is None
