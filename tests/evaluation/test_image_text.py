"""mmcli eval: data readers, templates, and the end-to-end chain shapes → pretrain → embed →
retrieve → eval, with every eval figure recomputed by NumPy brute force from embed's output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from mmcli.commands.embed import run as embed
from mmcli.commands.evaluate import run as evaluate
from mmcli.commands.retrieve import run as retrieve
from mmcli.errors import MmcliError
from mmcli.evaluation.image_text import class_index, read_labelled
from mmcli.evaluation.metrics import stratified_split
from mmcli.spec import LabelledSourceSpec

CLASSES = ["blue square", "green triangle", "red circle"]


def test_stratified_split_holds_out_a_share_of_each_class():
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    train, test = stratified_split(labels, 0.5, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(7))
    # class 0: 2 of 4 held out; class 1: 1 of 2; class 2 (one image): kept to train, not tested
    # (held out, the probe could never predict it).
    assert np.bincount(labels[test], minlength=3).tolist() == [2, 1, 0]
    assert np.bincount(labels[train], minlength=3).tolist() == [2, 1, 1]


@pytest.fixture(scope="module")
def class_tree(shapes_dir, tmp_path_factory):
    """Three class folders of the shapes classify images (nested one level for one class)."""
    root = tmp_path_factory.mktemp("tree")
    rows = [json.loads(line) for line in (shapes_dir / "classify.jsonl").read_text().splitlines()]
    for row in rows:
        if row["label"] in CLASSES:
            folder = root / row["label"] / ("nested" if row["label"] == "red circle" else "")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{row['id']}.png").write_bytes((shapes_dir / row["image"]).read_bytes())
    return root


def test_class_folders_and_labelled_files_read_alike(class_tree, shapes_dir):
    paths, labels = read_labelled(LabelledSourceSpec(path=str(class_tree)))
    assert sorted(set(labels)) == CLASSES and len(paths) == 6  # 48 images / 24 classes × 3 classes
    tsv_paths, tsv_labels = read_labelled(LabelledSourceSpec(path=str(shapes_dir / "classify.tsv")))
    jsonl_paths, jsonl_labels = read_labelled(
        LabelledSourceSpec(path=str(shapes_dir / "classify.jsonl"), image_key="image")
    )
    assert (tsv_paths, tsv_labels) == (jsonl_paths, jsonl_labels) and len(set(tsv_labels)) == 24
    with pytest.raises(MmcliError, match="no key 'colour'"):
        read_labelled(LabelledSourceSpec(path=str(shapes_dir / "classify.jsonl"), label_key="colour"))
    with pytest.raises(MmcliError, match="labels not in class_names: red circle"):
        class_index(labels, ["blue square", "green triangle"], "tree")


def test_class_embedding_is_the_normalised_mean_of_the_template_embeddings(nano_run):
    from mmcli.evaluation.zeroshot import class_embeddings
    from mmcli.models.loading import load_model

    loaded = load_model(str(nano_run))
    templates = ["a {}", "a photo of a {}."]
    weights = class_embeddings(loaded, CLASSES, templates, device="cpu")
    with torch.no_grad():
        for c, name in enumerate(CLASSES):
            emb = loaded.model.encode_text(loaded.tokenizer([t.format(name) for t in templates]), normalize=True)
            mean = emb.mean(0).numpy()
            np.testing.assert_allclose(weights[c], mean / np.linalg.norm(mean), atol=1e-5)


# --------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(shapes_dir, tmp_path_factory):
    from mmcli.commands.pretrain import run as pretrain

    folder = tmp_path_factory.mktemp("e2e")
    spec = {
        "model": {"arch": "mmcli-nano"},
        "data": {"train": {"path": str(shapes_dir / "train.tsv")}, "batch_size": 32, "workers": 0},
        "train": {"steps": 6, "lr": 1e-3, "log_every": 3},
        "output": {"dir": str(folder), "name": "run"},
    }
    (folder / "pretrain.yaml").write_text(yaml.safe_dump(spec))
    pretrain(folder / "pretrain.yaml", [], device="cpu")
    return folder / "run"


def ranks_of_true(scores: np.ndarray, true: np.ndarray) -> np.ndarray:
    """How many candidates score at least as high as the true one (ties count against)."""
    own = scores[np.arange(len(scores)), true]
    return (scores >= own[:, None]).sum(1) - 1


def test_shapes_pretrain_embed_retrieve_eval(trained_run, shapes_dir, tmp_path):
    run = str(trained_run)
    classify, test = shapes_dir / "classify.tsv", shapes_dir / "test.tsv"
    embed(str(classify), str(tmp_path / "classify.npy"), model=run, workers=0, progress=False)
    embed(str(test), str(tmp_path / "test.npy"), model=run, workers=0, progress=False)
    embed(str(test), str(tmp_path / "captions.npy"), model=run, modality="text", progress=False)
    names = sorted({line.split("\t")[2] for line in classify.read_text().splitlines()[1:]})
    (tmp_path / "prompts.txt").write_text("\n".join(f"a {n}" for n in names) + "\n")
    embed(str(tmp_path / "prompts.txt"), str(tmp_path / "prompts.npy"), model=run, progress=False)

    images = np.load(tmp_path / "classify.npy")
    prompts = np.load(tmp_path / "prompts.npy")
    top = retrieve("a red circle", index_path=str(tmp_path / "classify.npy"), k=5)["queries"][0]["results"]
    assert [h["row"] for h in top] == np.argsort(-(images @ prompts[names.index("red circle")]), kind="stable")[
        :5
    ].tolist()

    spec = {
        "model": run,
        "zero_shot": {"path": str(classify), "templates": "shapes"},
        "retrieval": {"path": str(test)},
        "linear_probe": {"train": {"path": str(classify)}, "shots": [1, None]},
        "output": str(tmp_path / "eval.json"),
        "workers": 0,
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec))
    result = evaluate(tmp_path / "eval.yaml", [], device="cpu")
    by_task = {r["task"]: r["metrics"] for r in json.loads((tmp_path / "eval.json").read_text())}
    assert by_task == {r["task"]: r["metrics"] for r in result["results"]}

    labels = np.array([names.index(line.split("\t")[2]) for line in classify.read_text().splitlines()[1:]])
    rank = ranks_of_true(images @ prompts.T, labels)
    zs = by_task["zeroshot_classification"]
    assert zs["acc1"] == pytest.approx(np.mean(rank == 0))
    assert zs["acc5"] == pytest.approx(np.mean(rank < 5))
    per_class = [np.mean(rank[labels == c] == 0) for c in range(len(names))]
    assert zs["mean_per_class_recall"] == pytest.approx(np.mean(per_class))
    assert (tmp_path / "eval-confusion.png").stat().st_size > 0

    gallery, captions = np.load(tmp_path / "test.npy"), np.load(tmp_path / "captions.npy")
    diagonal = np.arange(len(gallery))  # test.tsv: one caption per image, in the same order
    for k in (1, 5, 10):
        t2i = np.mean(ranks_of_true(captions @ gallery.T, diagonal) < k)
        i2t = np.mean(ranks_of_true(gallery @ captions.T, diagonal) < k)
        assert by_task["zeroshot_retrieval"][f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert by_task["zeroshot_retrieval"][f"text_retrieval_recall@{k}"] == pytest.approx(i2t)

    lp = by_task["linear_probe"]
    figures = {
        f"{name}{suffix}"
        for name in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "lp_C")
        for suffix in ("", "_1shot")
    }
    assert set(lp) == figures | {"n_train", "n_test", "n_classes"}
    assert (lp["n_train"], lp["n_test"], lp["n_classes"]) == (24, 24, 24)  # two per class: one held out
    assert all(0 <= lp[k] <= 1 for k in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall"))
    assert lp["lp_C"] == 1.0  # one training image per class: nothing to validate C on, scikit-learn's default
    assert lp["lp_acc1_1shot"] is None  # the 1-shot sample is the whole training set: marked, not repeated
    assert any(
        n.startswith("linear probe lp_acc1_1shot: = lp_acc1 (every class has at most 1") for n in result["notes"]
    )


def test_eval_from_flags_reports_top5_unavailable_under_five_classes(trained_run, class_tree, tmp_path):
    out = tmp_path / "r.json"
    from typer.testing import CliRunner

    from mmcli.cli import app

    r = CliRunner().invoke(
        app,
        [
            "--device",
            "cpu",
            "eval",
            "--model",
            str(trained_run),
            "--zero-shot",
            str(class_tree),
            "--templates",
            "a {}|a picture of a {}",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout)
    (record,) = json.loads(out.read_text())
    assert set(record) == {"dataset", "model", "pretrained", "checksum", "task", "metrics"}
    assert record["task"] == "zeroshot_classification" and record["dataset"] == class_tree.name
    assert record["metrics"]["acc5"] is None and record["metrics"]["n_classes"] == 3
    assert record["metrics"]["templates"] == 2
    assert printed["notes"] == ["zero-shot acc5: not available with 3 classes (needs more than 5)"]


def test_fused_tasks_need_a_run_with_their_head(nano_run, shapes_dir, tmp_path):
    pytest.importorskip("mmcli.evaluation.fusion")
    spec = tmp_path / "eval.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"model": str(nano_run), "itm": {"path": str(shapes_dir / "val.jsonl")}, "output": str(tmp_path / "e.json")}
        )
    )
    with pytest.raises(MmcliError, match="has no fusion"):
        evaluate(spec, [], device="cpu")


def test_shipped_eval_spec_validates():
    from mmcli.spec import SPEC_KINDS, load_spec, spec_model_for

    path = "examples/shapes/eval.yaml"
    assert spec_model_for(path) is SPEC_KINDS["eval"]
    spec = load_spec(path, SPEC_KINDS["eval"])
    assert spec.zero_shot.templates == "shapes" and spec.retrieval is not None and spec.linear_probe is not None


# --------------------------------------------------------------------------------------------
# too little usable data: no figure that any model would get, no NumPy warning
# --------------------------------------------------------------------------------------------


def _run_eval(tmp_path, model, **tasks):
    import warnings

    spec = tmp_path / "eval.yaml"
    spec.write_text(yaml.safe_dump({"model": str(model), "output": str(tmp_path / "e.json"), "workers": 0, **tasks}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(spec, [], device="cpu")
    numeric = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert numeric == [], [str(w.message) for w in numeric]
    return {r["task"]: r["metrics"] for r in json.loads((tmp_path / "e.json").read_text())}, result["notes"]


def test_retrieval_on_one_usable_image_reports_no_recall(nano_run, shapes_dir, tmp_path):
    rows = (shapes_dir / "test.tsv").read_text().splitlines()
    header, good = rows[0], rows[1].split("\t")
    image_col = header.split("\t").index("filepath")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = [header, "\t".join(good[:image_col] + [str(shapes_dir / good[image_col])] + good[image_col + 1 :])]
    for i in range(3):
        bad = list(good)
        bad[image_col] = str(tmp_path / "broken.png") if i else str(tmp_path / "missing.png")
        lines.append("\t".join(bad))
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    metrics, notes = _run_eval(tmp_path, nano_run, retrieval={"path": str(tmp_path / "pairs.tsv")})
    scores = metrics["zeroshot_retrieval"]
    assert (scores["n_images"], scores["n_texts"]) == (1, 1)
    recalls = {k: v for k, v in scores.items() if "recall@" in k}
    assert len(recalls) == 6 and set(recalls.values()) == {None}  # was 1.0 for every K
    assert any("needs at least 2 usable images and 2 captions" in n for n in notes)


def test_linear_probe_without_training_examples_is_not_scored(nano_run, class_tree, tmp_path):
    train = tmp_path / "train"
    for name in CLASSES:
        (train / name).mkdir(parents=True)
        (train / name / "x.png").write_bytes(b"not a png")  # every training image unreadable
    probe = {"train": {"path": str(train)}, "test": {"path": str(class_tree)}, "shots": [1, None]}
    metrics, notes = _run_eval(tmp_path, nano_run, linear_probe=probe)
    lp = metrics["linear_probe"]
    assert lp["lp_acc1"] is None and lp["lp_acc1_1shot"] is None  # was 0.0, with NumPy warnings
    assert lp["n_train"] == 0 and lp["n_test"] == 6
    assert any("lp_acc1: not scored (needs 1 training image per class; 'blue square' has 0" in n for n in notes)


def test_linear_probe_marks_a_k_shot_row_that_is_not_k_shot(nano_run, class_tree, tmp_path):
    # Two images per class: one is held out, one trains; a 2-shot probe would be a 1-shot probe.
    probe = {"train": {"path": str(class_tree)}, "shots": [1, 2, None]}
    metrics, notes = _run_eval(tmp_path, nano_run, linear_probe=probe)
    lp = metrics["linear_probe"]
    assert lp["lp_acc1_2shot"] is None and lp["lp_acc1_1shot"] is None and lp["lp_acc1"] is not None
    # every class has one training image: the 1- and 2-shot samples are the full training set
    assert any(n.startswith("linear probe lp_acc1_2shot: = lp_acc1 (every class has at most 2") for n in notes)
    assert any(n.startswith("linear probe lp_acc1_1shot: = lp_acc1 (every class has at most 1") for n in notes)


def test_linear_probe_does_not_report_a_k_shot_row_with_a_short_class(nano_run, class_tree, tmp_path):
    # Two extra images of one class: it has 3 training images, the others 1 — no 2-shot probe exists.
    extra = tmp_path / "train"
    for folder in class_tree.rglob("*"):
        if folder.is_file():
            target = extra / folder.relative_to(class_tree)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(folder.read_bytes())
    image = next((extra / "blue square").glob("*.png"))
    for copy in ("copy1.png", "copy2.png"):
        (extra / "blue square" / copy).write_bytes(image.read_bytes())
    probe = {"train": {"path": str(extra)}, "shots": [2, None], "test_fraction": 0.3}
    metrics, notes = _run_eval(tmp_path, nano_run, linear_probe=probe)
    assert metrics["linear_probe"]["lp_acc1_2shot"] is None
    assert any(n.startswith("linear probe lp_acc1_2shot: not scored (needs 2 training images per class") for n in notes)


def test_zero_shot_with_five_classes_reports_no_top5(nano_run, shapes_dir, tmp_path):
    rows = (shapes_dir / "classify.tsv").read_text().splitlines()
    labels = sorted({r.split("\t")[2] for r in rows[1:]})[:5]
    kept = [rows[0]] + [str(shapes_dir / r) for r in rows[1:] if r.split("\t")[2] in labels]
    (tmp_path / "five.tsv").write_text("\n".join(kept) + "\n")
    metrics, notes = _run_eval(
        tmp_path, nano_run, zero_shot={"path": str(tmp_path / "five.tsv"), "templates": "shapes"}
    )
    scores = metrics["zeroshot_classification"]
    assert scores["n_classes"] == 5 and scores["acc5"] is None  # every image is a top-5 hit with 5 classes
    assert notes == ["zero-shot acc5: not available with 5 classes (needs more than 5)"]
