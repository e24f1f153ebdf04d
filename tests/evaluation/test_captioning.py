"""The ``captioning`` task of ``mmcli eval``: captions as the decoder writes them, scores as the
metric functions compute them on those captions, the scene score on the shapes JSONL."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmcli.commands.evaluate import run as evaluate
from mmcli.errors import MmcliError
from mmcli.evaluation.captioning import read_references
from mmcli.evaluation.captioning_metrics import corpus_metrics, scene_scores
from mmcli.models.captioning import CaptionDecoder, DecodeSettings, item_seed
from mmcli.models.loading import load_model
from mmcli.spec import CaptioningTaskSpec


def test_references_group_the_captions_of_an_image(shapes_dir, tmp_path):
    rows = [json.loads(line) for line in (shapes_dir / "test.jsonl").read_text().splitlines()][:3]
    extra = dict(rows[0], caption="another caption")
    path = tmp_path / "refs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, extra]))
    for r in rows:  # the JSONL names images relative to its own folder
        (tmp_path / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / r["image"]).write_bytes((shapes_dir / r["image"]).read_bytes())
    paths, references, scenes = read_references(CaptioningTaskSpec(path=str(path)))
    assert len(paths) == 3 and references[paths[0]] == [rows[0]["caption"], "another caption"]
    assert scenes[paths[1]]["objects"] == rows[1]["objects"]
    _, _, no_scenes = read_references(CaptioningTaskSpec(path=str(shapes_dir / "test.tsv")))
    assert no_scenes == {}


def test_item_seed_is_stable_and_distinct():
    assert item_seed(0, "a.png") == item_seed(0, "a.png") != item_seed(1, "a.png") != item_seed(0, "b.png")
    assert 0 <= item_seed(7, "x") < 2**63


def test_eval_captioning_scores_the_decoders_captions(coca_run, shapes_dir, tmp_path):
    out = tmp_path / "eval.json"
    result = evaluate(
        None,
        [f"captioning.path={shapes_dir / 'test.jsonl'}", "captioning.max_tokens=6", "captioning.examples=3"],
        flags={"model": str(coca_run), "output": str(out), "workers": 0, "batch_size": 7},
        device="cpu",
    )
    (record,) = [r for r in result["results"] if r["task"] == "captioning"]
    metrics = record["metrics"]
    rows = [json.loads(line) for line in (tmp_path / "eval-captions.jsonl").read_text().splitlines()]
    paths, references, scenes = read_references(CaptioningTaskSpec(path=str(shapes_dir / "test.jsonl")))
    n = len(paths)
    assert [r["image"] for r in rows] == paths and n == 20

    # the captions are the decoder's own, image by image
    loaded = load_model(str(coca_run))
    decoder = CaptionDecoder.of(loaded.model)
    for row in rows[:4]:
        pixels = loaded.preprocess(Image.open(row["image"]).convert("RGB"))[None]
        (caption,) = decoder.decode(pixels, DecodeSettings(max_tokens=6))
        assert row["caption"] == loaded.tokenizer.decode(list(caption.tokens)).strip()
        assert row["score"] == pytest.approx(caption.score, abs=1e-3)

    # the figures are those of the metric functions on those captions
    predicted = {r["image"]: r["caption"] for r in rows}
    expected = corpus_metrics(predicted, references)
    for key in ("bleu1", "bleu4", "rouge_l", "cider_d"):
        assert metrics[key] == pytest.approx(expected[key])
    scene = scene_scores(predicted, scenes)
    assert metrics["scene.exact_scene"] == scene["exact_scene"] and metrics["scene.captions"] == n
    # a random model writes no parseable caption: every one is counted, none is right
    assert metrics["scene.unparseable"] == n and metrics["scene.exact_scene"] == 0.0
    assert (tmp_path / "eval-captions.png").stat().st_size > 0
    assert json.loads(out.read_text())[0]["metrics"]["bleu4"] == metrics["bleu4"]


def test_eval_captioning_refuses_a_model_without_decoder(nano_run, shapes_dir, tmp_path):
    with pytest.raises(MmcliError, match="no caption decoder"):
        evaluate(
            None,
            [f"captioning.path={shapes_dir / 'test.jsonl'}"],
            flags={"model": str(nano_run), "output": str(tmp_path / "e.json"), "workers": 0},
            device="cpu",
        )


def test_eval_captioning_refuses_too_long_captions(coca_run, shapes_dir, tmp_path):
    with pytest.raises(MmcliError, match="max_tokens"):
        evaluate(
            None,
            [f"captioning.path={shapes_dir / 'test.jsonl'}", "captioning.max_tokens=40"],
            flags={"model": str(coca_run), "output": str(tmp_path / "e.json"), "workers": 0},
            device="cpu",
        )


def test_language_model_baseline_captions_do_not_depend_on_the_image(tmp_path, shapes_dir):
    from tests.conftest import save_random_run

    run = save_random_run(tmp_path / "blind", "mmcli-nano-coca", modules={"caption": {"image": False}})
    loaded = load_model(str(run))
    assert loaded.model.caption_blind
    images = torch.randn(3, 3, 32, 32)
    captions = CaptionDecoder.of(loaded.model).decode(images, DecodeSettings(max_tokens=4))
    assert captions[0] == captions[1] == captions[2]


def test_an_unreadable_image_is_left_out_of_every_score(coca_run, shapes_dir, tmp_path):
    import shutil

    data = tmp_path / "shapes"
    shutil.copytree(shapes_dir, data)
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    (data / rows[0]["image"]).write_bytes(b"not a png")
    result = evaluate(
        None,
        [f"captioning.path={data / 'test.jsonl'}", "captioning.max_tokens=4"],
        flags={"model": str(coca_run), "output": str(tmp_path / "e.json"), "workers": 0},
        device="cpu",
    )
    metrics = result["results"][0]["metrics"]
    assert metrics["skipped"] == 1 and metrics["images"] == len(rows) - 1
    assert metrics["scene.captions"] == len(rows) - 1
    assert any("1 unreadable images left out" in note for note in result["notes"])
