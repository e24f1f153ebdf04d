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
    spec = {**PRETRAIN, "data": {**PRETRAIN["data"], "train": {"path": str(shapes_dir / "train.tsv")}},
            "output": {"dir": str(tmp), "name": "base"}}
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
    assert sorted(json.loads((base_run / "mmcli.json").read_text())["modules"]) == ["fusion", "itm_head", "mask_token", "mlm_head"]


def test_mlm_and_itm_evaluations_count_what_they_should(base_run, shapes_dir):
    from mmcli.data.shapes import COLORS
    from mmcli.evaluate_fusion import evaluate_itm, evaluate_mlm

    captions = [json.loads(line)["caption"] for line in (shapes_dir / "val.jsonl").read_text().splitlines()]
    colour_words = sum(word in COLORS for c in captions for word in c.split())
    mlm = evaluate_mlm(base_run, shapes_dir / "val.jsonl", image_conditioned=True)
    assert mlm["groups"]["color"]["n"] == colour_words
    assert mlm["overall"]["n"] == mlm["groups"]["color"]["n"] + mlm["groups"]["shape"]["n"]
    assert 0 <= mlm["random"]["accuracy"] <= 1 and mlm["random"]["n"] > 0
    itm = evaluate_itm(base_run, shapes_dir / "val.jsonl")
    assert itm["per_type"]["match"]["n"] == itm["per_type"]["mismatch"]["n"] == len(captions)


def test_mask_words_by_hand():
    from mmcli.evaluate_fusion import mask_words

    inputs, labels = mask_words(torch.tensor([[7, 3, 5, 3, 0]]), [3, 9], mask_id=99)
    assert inputs.tolist() == [[7, 99, 5, 99, 0]]
    assert labels.tolist() == [[-100, 3, -100, 3, -100]]


def test_fuse_vqa_trains_writes_and_reevaluates(base_run, shapes_dir, tmp_path):
    from mmcli.commands.fuse import run
    from mmcli.evaluate_fusion import evaluate_vqa

    spec = _write(tmp_path / "fuse-vqa.yaml", {
        "base": str(base_run), "task": "vqa",
        "data": {"train": str(shapes_dir / "train.jsonl"), "val": str(shapes_dir / "val.jsonl"), "batch_size": 32, "workers": 0},
        "fusion": {"strategy": "early", "depth": 1, "heads": 2}, "encoders": "frozen",
        "train": {"steps": 3, "lr": 1e-3}, "output": {"dir": str(tmp_path), "name": "vqa"},
    })
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

    a, b = load_file(str(base_run / "open_clip_model.safetensors")), load_file(str(run_dir / "open_clip_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = run(spec, [], eval_only=True, device="cpu")
    assert again["report"] == report
    assert evaluate_vqa(run_dir, shapes_dir / "val.jsonl")["accuracy"] == report["accuracy"]


def test_fuse_without_any_fusion_is_a_named_error(tmp_path, shapes_dir):
    from mmcli.commands.fuse import run
    from mmcli.commands.pretrain import run as pretrain

    clip_only = {**PRETRAIN, "objectives": {"clip": {"weight": 1.0}}, "train": {"steps": 1},
                 "data": {**PRETRAIN["data"], "train": {"path": str(shapes_dir / "train.tsv")}},
                 "output": {"dir": str(tmp_path), "name": "clip"}}
    base = pretrain(_write(tmp_path / "pretrain-clip.yaml", clip_only), [], device="cpu")["run_dir"]
    spec = _write(tmp_path / "fuse.yaml", {"base": base, "data": {"train": str(shapes_dir / "train.jsonl")},
                                          "train": {"steps": 1}, "output": {"dir": str(tmp_path), "name": "f"}})
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

    r = subprocess.run([sys.executable, "-m", "mmcli", "fuse", str(tmp_path / "fuse-missing.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"mmcli: error: {tmp_path / 'fuse-missing.yaml'}: no such spec file"]
