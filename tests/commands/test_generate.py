"""``mmcli fuse`` with ``task: generate``, ``mmcli generate`` and the eval's generation task, end to
end on a random ``mmcli-nano`` base and a tiny generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from mmcli.errors import MmcliError

GENERATOR = {
    "image_size": 16,
    "channels": [16, 32],
    "attention": [False, True],
    "layers_per_block": 1,
    "heads": 2,
    "timesteps": 20,
    "ema_decay": 0.9,
}


def _spec(tmp: Path, base: Path, shapes_dir: Path, **changes) -> Path:
    spec = {
        "base": str(base),
        "task": "generate",
        "data": {
            "train": str(shapes_dir / "train.jsonl"),
            "val": str(shapes_dir / "val.jsonl"),
            "batch_size": 8,
            "workers": 0,
            "val_max": 8,
        },
        "generator": GENERATOR,
        "train": {"steps": 3, "lr": 1e-3, "log_every": 1, "val_every": 2, "seed": 0},
        "output": {"dir": str(tmp), "name": "gen"},
        **changes,
    }
    path = tmp / "fuse-generate.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def generator_run(tmp_path_factory, nano_run, shapes_dir) -> Path:
    from mmcli.commands.fuse import run

    tmp = tmp_path_factory.mktemp("generate")
    result = run(_spec(tmp, nano_run, shapes_dir), [], device="cpu")
    assert result["steps"] == 3 and not result["interrupted"]
    return Path(result["run_dir"])


def test_a_generate_run_keeps_the_base_text_tower_and_logs_the_denoising_loss(generator_run, nano_run):
    import open_clip

    from mmcli.models.loading import load_model

    run, base = load_model(str(generator_run)), load_model(str(nano_run))
    plain = open_clip.create_model(f"local-dir:{generator_run}").eval()  # still a CLIP run folder
    texts = base.tokenizer(["a red circle"])
    with torch.no_grad():
        assert torch.equal(plain.encode_text(texts), base.model.encode_text(texts, normalize=False))
    meta = json.loads((generator_run / "mmcli.json").read_text())
    assert meta["task"] == "generate" and meta["modules"]["generator"]["text_dim"] == 64
    assert meta["modules"]["generator"]["pooled_dim"] == 32
    assert meta["modules"]["generator"]["prediction"] == "v_prediction"
    assert meta["modules"]["generator"]["image_size"] == 16
    for name, p in base.model.clip.state_dict().items():  # frozen: bit-identical to the base
        assert torch.equal(p, run.model.clip.state_dict()[name]), name
    rows = [json.loads(line) for line in (generator_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["denoise"] > 0 for r in train)
    assert [r["step"] for r in val] == [2, 3] and all(r["val_loss"] > 0 and r["val_loss_ema"] > 0 for r in val)
    assert int(run.model.generator.ema_updates) == 3
    # the average moved away from the trained weights' start but is not them
    assert not torch.equal(next(run.model.generator.ema.parameters()), next(run.model.generator.unet.parameters()))


def test_the_task_gives_dropped_captions_the_empty_prompt(nano_run):
    from mmcli.models.generation import generator_config
    from mmcli.models.loading import load_model
    from mmcli.models.multimodal import MultimodalModel
    from mmcli.spec import GeneratorSpec
    from mmcli.training.tasks import GenerationTask

    base = load_model(str(nano_run))
    cfg = generator_config(GeneratorSpec(**GENERATOR), 64, 32)
    model = MultimodalModel(base.model.clip, {"generator": cfg})
    empty = base.tokenizer([""])[0]
    task = GenerationTask(model, empty, seed=0)
    texts = base.tokenizer(["a red circle", "a blue square above a green circle"])
    with torch.no_grad():
        kept = task.condition(texts, torch.tensor([False, False]))
        torch.testing.assert_close(kept.states, model.prompt_states(texts))
        torch.testing.assert_close(kept.pooled, model.encode_text(texts))
        mixed = task.condition(texts, torch.tensor([True, False]))
        torch.testing.assert_close(mixed.states[0], model.prompt_states(empty[None])[0])
        torch.testing.assert_close(mixed.pooled[0], model.encode_text(empty[None])[0])
        torch.testing.assert_close(mixed.states[1], kept.states[1])
    assert not any(p.requires_grad for p in model.clip.parameters())
    trained = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("model.generator.unet.") for n in trained)


def test_each_step_micro_batch_and_rank_draw_their_own_noise(nano_run):
    from mmcli.models.generation import generator_config
    from mmcli.models.loading import load_model
    from mmcli.models.multimodal import MultimodalModel
    from mmcli.spec import GeneratorSpec
    from mmcli.training.tasks import GenerationTask

    base = load_model(str(nano_run))
    model = MultimodalModel(base.model.clip, {"generator": generator_config(GeneratorSpec(**GENERATOR), 64, 32)})
    empty = base.tokenizer([""])[0]

    def first_draw(**kwargs):
        return torch.randn(4, generator=GenerationTask(model, empty, seed=0, **kwargs).draws())

    assert torch.equal(first_draw(), first_draw())
    assert not torch.equal(first_draw(), first_draw(rank=1))
    assert not torch.equal(first_draw(), first_draw(start_step=1))
    task = GenerationTask(model, empty, seed=0)
    task.micro_batch = 1
    assert not torch.equal(first_draw(), torch.randn(4, generator=task.draws()))
    task.after_step()
    assert (task.step, task.micro_batch) == (1, 0)
    assert torch.equal(first_draw(start_step=1), torch.randn(4, generator=task.draws()))


def test_an_interrupted_and_resumed_generate_run_equals_one_trained_straight(
    tmp_path, nano_run, shapes_dir, monkeypatch
):
    """The noise, timesteps and dropped captions come from the seeded global generator, which the
    checkpoint carries: stopped by a real SIGINT after step 2 and resumed, the run ends bit-identical."""
    from mmcli.commands.fuse import run
    from tests.conftest import signal_after_steps

    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    straight = run(_spec(straight_dir, nano_run, shapes_dir), [], device="cpu")

    signal_after_steps(monkeypatch, 2)
    path = _spec(tmp_path, nano_run, shapes_dir)
    first = run(path, [], device="cpu")
    assert first["interrupted"] and first["steps"] == 2
    monkeypatch.undo()
    resumed = run(path, [], resume=True, device="cpu")
    assert not resumed["interrupted"] and resumed["steps"] == 3
    from safetensors.torch import load_file

    a = load_file(str(Path(resumed["run_dir"]) / "mmcli_model.safetensors"))
    b = load_file(str(Path(straight["run_dir"]) / "mmcli_model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("generator.ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"fusion": {"strategy": "late"}}, "fusion: not used by task generate"),
        ({"task": "vqa"}, "generator: only task generate has one"),
        ({"generator": {**GENERATOR, "attention": [True]}}, "generator.attention: 1 entries for 2 levels"),
        ({"generator": {**GENERATOR, "channels": [12, 32]}}, "each must be a multiple of 8"),
    ],
)
def test_bad_generate_specs_are_one_line_errors(tmp_path, nano_run, shapes_dir, changes, message):
    from mmcli.commands.fuse import run

    with pytest.raises(MmcliError, match=message):
        run(_spec(tmp_path, nano_run, shapes_dir, **changes), [], device="cpu")
    assert not (tmp_path / "gen").exists()


def test_fuse_generate_refuses_a_captioning_base_and_eval_only(tmp_path, coca_run, nano_run, shapes_dir):
    from mmcli.commands.fuse import run

    with pytest.raises(MmcliError, match="CoCa captioning run"):
        run(_spec(tmp_path, coca_run, shapes_dir), [], device="cpu")
    with pytest.raises(MmcliError, match="--eval-only: not for task generate"):
        run(_spec(tmp_path, nano_run, shapes_dir), [], eval_only=True, device="cpu")


# -- mmcli generate -----------------------------------------------------------------------------


def _generate(*args):
    from mmcli.cli import app

    return CliRunner().invoke(app, ["--device", "cpu", "generate", *map(str, args)])


def test_generate_writes_pictures_sheet_and_rows(generator_run, tmp_path):
    out = tmp_path / "pictures"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square above a green circle\n")
    r = _generate("--prompts", prompts, "--model", generator_run, "--out", out, "--n", 2, "--steps", 3, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["pictures"] == 4 and summary["settings"]["steps"] == 3
    rows = [json.loads(line) for line in (out / "generated.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["sample"], r["file"]) for r in rows] == [
        (0, 0, "0000-00.png"),
        (0, 1, "0000-01.png"),
        (1, 0, "0001-00.png"),
        (1, 1, "0001-01.png"),
    ]
    assert {r["sampler"] for r in rows} == {"ddim"} and {r["guidance"] for r in rows} == {3.0}
    for row in rows:
        with Image.open(out / row["file"]) as image:
            assert image.size == (16, 16) and image.mode == "RGB"
    with Image.open(out / "sheet.png") as sheet:
        assert sheet.width > 2 * 96
    assert not (tmp_path / "pictures.partial").exists()

    again = tmp_path / "again"
    assert _generate("a red circle", "--model", generator_run, "--out", again, "--n", 2, "--steps", 3).exit_code == 0
    for j in range(2):  # the same seed, prompt and sample: the same picture, whatever the other prompts
        a = np.asarray(Image.open(out / f"0000-0{j}.png"), dtype=int)
        b = np.asarray(Image.open(again / f"0000-0{j}.png"), dtype=int)
        assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", 0], "--steps: 0: at least 1"),
        (["--sampler", "euler"], "--sampler: 'euler' is not one of ddim, dpm, ddpm"),
        (["--guidance", -2], "--guidance: -2.0: a finite number"),
        (["--n", 0], "--n: 0: at least one picture"),
    ],
)
def test_generate_bad_settings_are_one_line_errors(generator_run, tmp_path, args, message):
    r = _generate("a red circle", "--model", generator_run, "--out", tmp_path / "o", *args)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_generate_refuses_what_it_must_not_touch(generator_run, nano_run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("earlier work")
    r = _generate("a red circle", "--model", generator_run, "--out", taken)
    assert r.exit_code == 2 and "a folder that is not empty" in r.output
    assert (taken / "keep.txt").read_text() == "earlier work" and sorted(p.name for p in taken.iterdir()) == [
        "keep.txt"
    ]

    r = _generate("a red circle", "--model", nano_run, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "not a text-to-image run" in r.output

    blank = tmp_path / "blank.txt"
    blank.write_text("a red circle\n\na blue square\n")
    r = _generate("--prompts", blank, "--model", generator_run, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "line 2 is blank" in r.output

    r = _generate("a red circle", "--prompts", blank, "--model", generator_run, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "not both" in r.output

    r = _generate(" ".join(["red"] * 30), "--model", generator_run, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "PROMPT: 32 tokens; the model's text tower reads at most 24" in r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()

    theirs = tmp_path / "mine.partial"  # a folder of that name that mmcli did not write
    theirs.mkdir()
    (theirs / "keep.txt").write_text("earlier work")
    r = _generate("a red circle", "--model", generator_run, "--out", tmp_path / "mine", "--steps", 2)
    assert r.exit_code == 2 and "was not left by mmcli generate" in r.output
    assert (theirs / "keep.txt").read_text() == "earlier work"


def test_an_interrupted_generate_leaves_only_a_partial_folder(generator_run, tmp_path, monkeypatch):
    from mmcli.inference import generation

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mmcli.viz.generation.prompt_sheet", broken)
    out = tmp_path / "o"
    job = generation.GenerateJob(
        ["a red circle"],
        str,
        out,
        model=str(generator_run),
        settings=generation.SampleSettings(steps=2),
        n=1,
        batch_size=4,
        device="cpu",
    )
    with pytest.raises(KeyboardInterrupt):
        job.run()
    assert not out.exists() and (tmp_path / "o.partial" / "0000-00.png").exists()
    monkeypatch.undo()
    r = _generate("a red circle", "--model", generator_run, "--out", out, "--n", 1, "--steps", 2)
    assert r.exit_code == 0, r.output  # the next run replaces the partial folder
    assert sorted(p.name for p in out.iterdir()) == ["0000-00.png", "generated.jsonl", "sheet.png"]


# -- mmcli eval: generation -----------------------------------------------------------------------


def test_eval_generation_scores_real_conditional_and_unconditional_rows(generator_run, shapes_dir, tmp_path):
    from mmcli.commands.evaluate import run

    spec = {
        "model": str(generator_run),
        "generation": {
            "path": str(shapes_dir / "val.jsonl"),
            "prompts": 5,
            "samples": 2,
            "steps": 2,
            "sheet_prompts": 3,
        },
        "output": str(tmp_path / "eval.json"),
    }
    path = tmp_path / "eval-generate.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = run(path, [], device="cpu")
    metrics = result["results"][0]["metrics"]
    assert result["results"][0]["task"] == "text_to_image"
    # The real images are the ceiling: the scene reader reads the dataset's own pictures exactly.
    assert metrics["real.all.exact_scene"] == 1.0 and metrics["real.all.object_f1"] == 1.0
    assert metrics["real.all.pictures"] == 5 and metrics["conditional.all.pictures"] == 10
    assert metrics["unconditional.all.pictures"] == 10
    assert 0 <= metrics["conditional.all.clip_score"] <= 100
    rows = [json.loads(line) for line in (tmp_path / "eval-generated.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows].count("conditional") == 10
    assert (tmp_path / "eval-generated.png").exists()
