"""The training loop: schedule, decay groups, learning on real data, resume, open_clip loading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mmcli.training.loop import cosine_lr, param_groups

SPEC = """
model:
  arch: mmcli-nano
data:
  train:
    path: {data}/train.tsv
  val:
    path: {data}/val.tsv
  batch_size: 16
  workers: 0
train:
  steps: {steps}
  lr: {lr}
  warmup_steps: 2
  log_every: 1
  seed: 0
output:
  dir: {out}
  name: {name}
"""


def write_spec(tmp_path: Path, data: Path, *, steps: int, name: str, lr: float = 2e-3) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SPEC.format(data=data, steps=steps, out=tmp_path / "runs", name=name, lr=lr))
    return path


def test_cosine_schedule_by_hand():
    assert cosine_lr(0, total=10, warmup=2, min_ratio=0.0) == pytest.approx(0.5)
    assert cosine_lr(1, total=10, warmup=2, min_ratio=0.0) == pytest.approx(1.0)
    assert cosine_lr(2, total=10, warmup=2, min_ratio=0.0) == pytest.approx(1.0)
    assert cosine_lr(6, total=10, warmup=2, min_ratio=0.0) == pytest.approx(0.5)  # halfway through the decay
    assert cosine_lr(10, total=10, warmup=2, min_ratio=0.1) == pytest.approx(0.1)


def test_weight_decay_groups():
    from mmcli.models.encoders import build_dual_encoder
    from mmcli.spec import ModelSpec

    model = build_dual_encoder(ModelSpec(arch="mmcli-nano")).model
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {
        "logit_scale",
        "positional_embedding",
        "visual.positional_embedding",
        "visual.class_embedding",
    } <= no_decay_names
    assert "token_embedding.weight" in decay_names and "visual.conv1.weight" in decay_names
    assert not any(n.endswith(".bias") for n in decay_names)
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_pretrain_learns_and_loads_in_open_clip(tmp_path, shapes_dir):
    from mmcli.commands.pretrain import run

    result = run(write_spec(tmp_path, shapes_dir, steps=60, name="learn", lr=1e-3), [], device="cpu")
    run_dir = Path(result["run_dir"])
    rows = [m for m in _metrics(run_dir) if m["kind"] == "train"]
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.3, (first, last)  # it learns, not just runs
    # curves.png is the picture of metrics.jsonl: its loss series are the lines' values
    from mmcli.viz.curves import curve_series

    assert curve_series(_metrics(run_dir))["loss"]["train loss"] == (
        [r["step"] for r in rows],
        [r["loss"] for r in rows],
    )
    assert result["samples_per_s"] == pytest.approx(rows[-1]["samples_per_s"], abs=0.06)  # one definition
    val = result["val"]
    # Held-out pairs: a model that learned nothing scores log(N), the loss of uniform guessing.
    assert val["val_loss"] < math.log(val["val_pairs"]) - 0.5, val
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "curves.png",
        "metrics.jsonl",
        "mmcli.json",
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "spec.yaml",
        "train_state.pt",
    ]

    # The run folder is a plain open_clip model: same embeddings through open_clip alone.
    import open_clip

    from mmcli.models.encoders import build_dual_encoder
    from mmcli.models.multimodal import MultimodalModel
    from mmcli.models.weights import load_weights_into
    from mmcli.spec import ModelSpec

    ref, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run_dir}")
    ours = MultimodalModel(build_dual_encoder(ModelSpec(arch="mmcli-nano")).model)
    load_weights_into(run_dir, ours)
    ref.eval(), ours.eval()
    images = torch.randn(3, 3, 32, 32)
    texts = open_clip.get_tokenizer(f"local-dir:{run_dir}")(["a red circle", "a blue square above a green circle", "x"])
    with torch.no_grad():
        assert torch.equal(ref.encode_image(images), ours.encode_image(images, normalize=False))
        assert torch.equal(ref.encode_text(texts), ours.encode_text(texts, normalize=False))
    # ... and through create_model(arch, pretrained=<file>) once the config is registered.
    open_clip.add_model_config(run_dir / "open_clip_config.json")  # registered under the file's stem
    with open(run_dir / "open_clip_config.json") as f:
        cfg = json.load(f)["model_cfg"]
    assert cfg["vision_cfg"]["image_size"] == 32


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, shapes_dir, monkeypatch):
    from safetensors.torch import load_file

    from mmcli.commands.pretrain import run
    from tests.conftest import signal_after_steps

    full = run(write_spec(tmp_path, shapes_dir, steps=6, name="full"), [], device="cpu")

    signal_after_steps(monkeypatch, 3)
    spec = write_spec(tmp_path, shapes_dir, steps=6, name="split")
    first = run(spec, [], device="cpu")
    assert first["interrupted"] and first["steps"] == 3
    monkeypatch.undo()
    second = run(spec, [], resume=True, device="cpu")
    assert not second["interrupted"] and second["steps"] == 6

    a = load_file(str(Path(full["run_dir"]) / "open_clip_model.safetensors"))
    b = load_file(str(Path(second["run_dir"]) / "open_clip_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [m["step"] for m in _metrics(Path(second["run_dir"])) if m["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_existing_run_needs_resume_or_overwrite(tmp_path, shapes_dir):
    from mmcli.commands.pretrain import run
    from mmcli.errors import MmcliError

    spec = write_spec(tmp_path, shapes_dir, steps=1, name="twice")
    run(spec, [], device="cpu")
    with pytest.raises(MmcliError, match="a run already exists there"):
        run(spec, [], device="cpu")
    with pytest.raises(MmcliError, match="nothing to resume"):
        run(write_spec(tmp_path, shapes_dir, steps=1, name="fresh"), [], resume=True, device="cpu")
