"""Pretraining with the ``caption`` objective: the spec's rules, a run that learns to caption, and
a run folder that open_clip loads as a CoCa model whose own ``generate`` writes our captions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from mmcli.errors import MmcliError
from mmcli.spec import PretrainSpec

SPEC = """
model: {{arch: {arch}}}
data:
  train: {{path: {data}/train.tsv}}
  val: {{path: {data}/val.tsv}}
  batch_size: 16
  workers: 0
objectives:
  clip: {{weight: 1.0}}
  caption: {{weight: 2.0, image: {image}}}
train: {{steps: {steps}, lr: 2.0e-3, warmup_steps: 2, log_every: 1, val_every: {steps}, seed: 0}}
output: {{dir: {out}, name: {name}}}
"""


def write_spec(tmp_path: Path, data: Path, *, steps: int, name: str, arch="mmcli-nano-coca", image="true") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SPEC.format(data=data, steps=steps, out=tmp_path / "runs", name=name, arch=arch, image=image))
    return path


def _spec(**objectives) -> dict:
    return {"data": {"train": {"path": "x.tsv"}}, "train": {"steps": 1}, "objectives": objectives}


def test_caption_combines_with_clip_only():
    spec = PretrainSpec.model_validate(_spec(clip={}, caption={"weight": 2.0, "label_smoothing": 0.1}))
    assert set(spec.objectives.enabled()) == {"clip", "caption"} and spec.objectives.caption.image
    with pytest.raises(ValidationError, match="objectives.caption: combines with clip only, not mlm"):
        PretrainSpec.model_validate(_spec(clip={}, caption={}, mlm={}))
    with pytest.raises(ValidationError, match="label_smoothing"):
        PretrainSpec.model_validate(_spec(caption={"label_smoothing": 1.0}))


def test_caption_on_a_model_without_decoder_is_one_line(tmp_path, shapes_dir):
    from mmcli.commands.pretrain import run

    spec = write_spec(tmp_path, shapes_dir, steps=1, name="no-decoder", arch="mmcli-nano")
    with pytest.raises(MmcliError, match="objectives.caption: model.arch has no caption decoder; use a CoCa"):
        run(spec, [], device="cpu")
    assert not (tmp_path / "runs" / "no-decoder").exists()  # nothing written


@pytest.mark.slow
def test_caption_pretraining_learns_and_open_clip_generate_agrees(tmp_path, shapes_dir):
    import open_clip

    from mmcli.commands.pretrain import run
    from mmcli.models.captioning import CaptionDecoder, DecodeSettings
    from mmcli.models.loading import load_model

    result = run(write_spec(tmp_path, shapes_dir, steps=80, name="coca"), [], device="cpu")
    run_dir = Path(result["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert {"clip", "caption"} <= set(train[0])
    first, last = sum(r["caption"] for r in train[:3]) / 3, sum(r["caption"] for r in train[-3:]) / 3
    # a uniform guess over open_clip's 49408 tokens costs log(49408) ≈ 10.8 nats a token
    assert last < 3.0 < first, (first, last)
    assert json.loads((run_dir / "mmcli.json").read_text())["modules"] == {"caption": {"image": True}}

    # plain open_clip builds the run folder as a CoCa model with the same weights ...
    reference, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run_dir}")
    reference.eval()
    assert type(reference).__name__ == "CoCa"
    loaded = load_model(str(run_dir))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, loaded.model.clip.state_dict()[name]), name
    # ... whose own generate() gives our greedy captions
    pytest.importorskip("transformers")
    from PIL import Image

    images = sorted((shapes_dir / "images" / "test").glob("*.png"))[:6]
    pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images])
    ours = CaptionDecoder.of(loaded.model).decode(pixels, DecodeSettings(max_tokens=12))
    with torch.no_grad():
        generated = reference.generate(pixels, generation_type="top_k", top_k=1, seq_len=14, min_seq_len=1)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{run_dir}")
    for caption, row in zip(ours, generated.tolist()):
        text = open_clip.decode(torch.tensor(row)).replace("<start_of_text>", "").split("<end_of_text>")[0]
        assert tokenizer.decode(list(caption.tokens)).strip() == text.strip()
    # and what it learned is caption-shaped: words of the dataset
    assert all(tokenizer.decode(list(c.tokens)).startswith("a ") for c in ours)


@pytest.mark.slow
def test_language_model_baseline_trains_blind(tmp_path, shapes_dir):
    from mmcli.commands.pretrain import run
    from mmcli.models.loading import load_model

    result = run(write_spec(tmp_path, shapes_dir, steps=3, name="blind", image="false"), [], device="cpu")
    loaded = load_model(result["run_dir"])
    assert loaded.model.caption_blind
    with torch.no_grad():
        out = loaded.model(torch.randn(2, 3, 32, 32), loaded.tokenizer(["a red circle", "a blue square"]))
    assert torch.count_nonzero(out["caption_image_tokens"]) == 0
