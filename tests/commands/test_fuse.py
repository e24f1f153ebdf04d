"""Multimodal pretraining run folders, ``mmcli fuse`` and the fusion evaluations, end to end (nano)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmcli.errors import MmcliError

PRETRAIN = {
    "model": {"arch": "mmcli-nano"},
    "data": {"batch_size": 16, "workers": 0},
    "objectives": {"clip": {"weight": 1.0}, "mlm": {"weight": 1.0}, "mmlm": {"weight": 1.0}, "itm": {"weight": 1.0}},
    "fusion": {"strategy": "cross_attention", "depth": 1, "heads": 2},
    "train": {"steps": 3, "lr": 1e-3, "log_every": 1},
}


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, shapes_dir) -> Path:
    from mmcli.commands.pretrain import run

    tmp = tmp_path_factory.mktemp("mm")
    spec = {
        **PRETRAIN,
        "data": {**PRETRAIN["data"], "train": {"path": str(shapes_dir / "train.tsv")}},
        "output": {"dir": str(tmp), "name": "base"},
    }
    return Path(run(_write(tmp / "pretrain-mm.yaml", spec), [], device="cpu")["run_dir"])


def test_masked_run_loads_in_plain_open_clip(base_run):
    import open_clip

    from mmcli.models.loading import load_model

    cfg = json.loads((base_run / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert (cfg["vocab_size"], cfg["pool_type"], cfg["eos_id"]) == (49409, "eos", 49407)
    ref = open_clip.create_model(f"local-dir:{base_run}").eval()
    ours = load_model(str(base_run)).model
    texts = open_clip.get_tokenizer(f"local-dir:{base_run}")(["a red circle", "a blue square above a green circle"])
    with torch.no_grad():
        assert torch.equal(ref.encode_text(texts), ours.encode_text(texts, normalize=False))
    assert sorted(json.loads((base_run / "mmcli.json").read_text())["modules"]) == [
        "fusion",
        "itm_head",
        "mask_token",
        "mlm_head",
    ]


def test_mlm_and_itm_evaluations_count_what_they_should(base_run, shapes_dir):
    from mmcli.data.shapes import COLORS
    from mmcli.evaluation.fusion import evaluate_itm, evaluate_mlm

    captions = [json.loads(line)["caption"] for line in (shapes_dir / "val.jsonl").read_text().splitlines()]
    colour_words = sum(word in COLORS for c in captions for word in c.split())
    mlm = evaluate_mlm(base_run, shapes_dir / "val.jsonl", image_conditioned=True)
    assert mlm["groups"]["color"]["n"] == colour_words
    assert mlm["overall"]["n"] == mlm["groups"]["color"]["n"] + mlm["groups"]["shape"]["n"]
    assert 0 <= mlm["random"]["accuracy"] <= 1 and mlm["random"]["n"] > 0
    itm = evaluate_itm(base_run, shapes_dir / "val.jsonl")
    assert itm["per_type"]["match"]["n"] == itm["per_type"]["mismatch"]["n"] == len(captions)


def test_mask_words_by_hand():
    from mmcli.evaluation.fusion import mask_words

    inputs, labels = mask_words(torch.tensor([[7, 3, 5, 3, 0]]), [3, 9], mask_id=99)
    assert inputs.tolist() == [[7, 99, 5, 99, 0]]
    assert labels.tolist() == [[-100, 3, -100, 3, -100]]


def test_fuse_vqa_trains_writes_and_reevaluates(base_run, shapes_dir, tmp_path):
    from mmcli.commands.fuse import run
    from mmcli.evaluation.fusion import evaluate_vqa

    spec = _write(
        tmp_path / "fuse-vqa.yaml",
        {
            "base": str(base_run),
            "task": "vqa",
            "data": {
                "train": str(shapes_dir / "train.jsonl"),
                "val": str(shapes_dir / "val.jsonl"),
                "batch_size": 32,
                "workers": 0,
            },
            "fusion": {"strategy": "early", "depth": 1, "heads": 2},
            "encoders": "frozen",
            "train": {"steps": 3, "lr": 1e-3},
            "output": {"dir": str(tmp_path), "name": "vqa"},
        },
    )
    result = run(spec, [], device="cpu")
    run_dir = Path(result["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    questions = sum(len(json.loads(line)["questions"]) for line in (shapes_dir / "val.jsonl").read_text().splitlines())
    assert len(rows) == questions and set(rows[0]) == {"id", "question", "type", "answer", "predicted", "score"}
    report = result["report"]
    assert report["accuracy"] == round(np.mean([r["answer"] == r["predicted"] for r in rows]), 4)
    answers = [r["answer"] for r in rows]
    assert report["majority_baseline"] == round(answers.count(report["majority_answer"]) / len(rows), 4)
    features = np.load(run_dir / "fused.npy")
    sidecar = json.loads((run_dir / "fused.npy.json").read_text())
    assert features.shape == (len(rows), 64) and np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    assert sidecar["items"] == [r["id"] for r in rows] and sidecar["modality"] == "fused"
    # Frozen encoders: the fuse run's dual encoder is the base's, bit for bit.
    from safetensors.torch import load_file

    a, b = (
        load_file(str(base_run / "open_clip_model.safetensors")),
        load_file(str(run_dir / "open_clip_model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = run(spec, [], eval_only=True, device="cpu")
    assert again["report"] == report
    assert evaluate_vqa(run_dir, shapes_dir / "val.jsonl")["accuracy"] == report["accuracy"]


def test_fuse_without_any_fusion_is_a_named_error(tmp_path, shapes_dir):
    from mmcli.commands.fuse import run
    from mmcli.commands.pretrain import run as pretrain

    clip_only = {
        **PRETRAIN,
        "objectives": {"clip": {"weight": 1.0}},
        "train": {"steps": 1},
        "data": {**PRETRAIN["data"], "train": {"path": str(shapes_dir / "train.tsv")}},
        "output": {"dir": str(tmp_path), "name": "clip"},
    }
    base = pretrain(_write(tmp_path / "pretrain-clip.yaml", clip_only), [], device="cpu")["run_dir"]
    spec = _write(
        tmp_path / "fuse.yaml",
        {
            "base": base,
            "data": {"train": str(shapes_dir / "train.jsonl")},
            "train": {"steps": 1},
            "output": {"dir": str(tmp_path), "name": "f"},
        },
    )
    with pytest.raises(MmcliError, match="fusion: the base run .* has no fusion encoder"):
        run(spec, [], device="cpu")


def test_spec_requires_a_fusion_for_fused_objectives(tmp_path):
    from mmcli.spec import PretrainSpec, load_spec

    base = "data:\n  train:\n    path: x.tsv\ntrain:\n  steps: 1\nobjectives:\n  itm: {}\n"
    path = tmp_path / "pretrain-x.yaml"
    path.write_text(base)
    with pytest.raises(MmcliError, match="fusion: missing; objectives itm need it"):
        load_spec(path, PretrainSpec)
    path.write_text(base.replace("itm", "mmlm") + "fusion:\n  strategy: late\n")
    with pytest.raises(MmcliError, match="fusion.strategy: late keeps no token sequence"):
        load_spec(path, PretrainSpec)


def test_cli_fuse_error_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "mmcli", "fuse", str(tmp_path / "fuse-missing.yaml")], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"mmcli: error: {tmp_path / 'fuse-missing.yaml'}: no such spec file"]


def test_fuse_graph_trains_explains_and_eval_reports_alignment(base_run, shapes_dir, tmp_path):
    from PIL import Image

    from mmcli.commands.evaluate import run as evaluate
    from mmcli.commands.fuse import run
    from mmcli.viz.explain import BOX_COLOURS

    spec = _write(
        tmp_path / "fuse-graph.yaml",
        {
            "base": str(base_run),
            "task": "vqa",
            "data": {
                "train": str(shapes_dir / "train.jsonl"),
                "val": str(shapes_dir / "val.jsonl"),
                "batch_size": 16,
                "workers": 0,
            },
            "fusion": {"strategy": "graph", "graph": {"layer": "gcn", "max_iters": 3, "align_weight": 0.5}},
            "encoders": "frozen",
            "train": {"steps": 2, "lr": 1e-3, "log_every": 1},
            "output": {"dir": str(tmp_path), "name": "graph"},
        },
    )
    result = run(spec, [], device="cpu", explain=tmp_path / "explain")
    run_dir = Path(result["run_dir"])
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in logged if r["kind"] == "train"]
    # The total is the VQA loss plus half the alignment loss.
    assert all(r["loss"] == pytest.approx(r["vqa"] + 0.5 * r["align"], abs=1e-5) for r in train_rows)
    records = [json.loads(line) for line in (shapes_dir / "val.jsonl").read_text().splitlines()]
    pictures = result["explain"]["pictures"]
    assert len(pictures) == 6 and Path(pictures[0]).name == Path(records[0]["image"]).stem + ".png"
    picture = Image.open(pictures[0]).convert("RGB")
    assert picture.width == 6 * records[0]["width"] and picture.height > 6 * records[0]["height"]
    x0, y0, x1, y1 = records[0]["objects"][0]["box"]  # given boxes: region 0 is object 0
    assert picture.getpixel((3 * (x0 + x1), 6 * y1 - 1)) == BOX_COLOURS[0]  # bottom edge: labels go above

    eval_spec = _write(
        tmp_path / "eval.yaml",
        {
            "model": str(run_dir),
            "vqa": {"path": str(shapes_dir / "val.jsonl")},
            "alignment": {"path": str(shapes_dir / "val.jsonl")},
            "output": str(tmp_path / "eval.json"),
            "workers": 0,
        },
    )
    results = evaluate(eval_spec, [], device="cpu")["results"]
    assert results[0]["task"] == "vqa" and results[0]["metrics"]["accuracy"] == result["report"]["accuracy"]
    scores = results[1]["metrics"]
    objects = sum(len(r["objects"]) for r in records)
    assert scores["n_objects"] == objects and scores["objects_with_region"] == 1.0
    assert 0 <= scores["accuracy"] <= 1 and 1 <= scores["iterations"] <= 3
    grid = evaluate(eval_spec, ["alignment.regions=grid"], device="cpu")["results"][1]["metrics"]
    assert grid["regions"] == "grid" and grid["n_objects"] == objects and grid["objects_with_region"] < 1.0


def test_graph_reasoning_is_not_a_pretraining_strategy(tmp_path):
    from mmcli.spec import FusionSpec, PretrainSpec, load_spec

    assert FusionSpec(strategy="graph").graph_spec().layer == "gat"
    assert FusionSpec(strategy="cross_attention").graph_spec() is None
    path = _write(
        tmp_path / "pretrain-g.yaml",
        {
            "data": {"train": {"path": "x.tsv"}},
            "train": {"steps": 1},
            "objectives": {"itm": {}},
            "fusion": {"strategy": "graph"},
        },
    )
    with pytest.raises(MmcliError, match="fusion.graph: region–concept graph reasoning is trained by mmcli fuse"):
        load_spec(path, PretrainSpec)


def test_fuse_refuses_a_captioning_base(coca_run, shapes_dir, tmp_path):
    from mmcli.commands.fuse import run
    from mmcli.errors import MmcliError

    spec = _write(
        tmp_path / "fuse-coca.yaml",
        {
            "base": str(coca_run),
            "task": "vqa",
            "data": {"train": str(shapes_dir / "train.jsonl"), "batch_size": 8, "workers": 0},
            "fusion": {"strategy": "early", "depth": 1, "heads": 2},
            "train": {"steps": 1},
            "output": {"dir": str(tmp_path / "runs"), "name": "vqa"},
        },
    )
    with pytest.raises(MmcliError, match="is a CoCa captioning run; fusion reads a CLIP text tower"):
        run(spec, [], device="cpu")
    assert not (tmp_path / "runs" / "vqa").exists()
