"""What a run records and reports: metrics.jsonl, curves.png, TensorBoard events, one samples/s,
the last loss after a Ctrl-C, the summary's loss rows. A two-loss toy task keeps the loop fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mmcli.distributed import World
from mmcli.errors import MmcliError
from mmcli.spec import TrainSpec
from mmcli.training import loop
from mmcli.training.run_log import RunLog, scalars, tensorboard_writer
from mmcli.training.tasks import TrainingTask
from mmcli.viz.curves import curve_series, read_metrics


class TwoLosses(TrainingTask):
    """A linear map and two losses, weighted 1 and 0.5."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Linear(2, 1)

    def loss_weights(self) -> dict[str, float]:
        return {"near_zero": 1.0, "near_one": 0.5}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.model(batch["images"])
        return {"near_zero": (out**2).mean(), "near_one": (out - 1).abs().mean()}

    def after_step(self) -> None:
        pass

    def log_values(self) -> dict[str, float]:
        return {}


BATCHES = [{"images": torch.randn(4, 2, generator=torch.Generator().manual_seed(i))} for i in range(3)]


def _train(tmp_path: Path, monkeypatch, **spec) -> loop.TrainResult:
    monkeypatch.setattr(loop._Loop, "save", lambda self, state, flag: None)  # the toy model is no run to save
    validations = iter(range(100))
    return loop.train(
        TwoLosses(),
        loaders=lambda epoch, start: BATCHES[start:],
        batches_per_epoch=len(BATCHES),
        spec=TrainSpec(**{"steps": 6, "lr": 0.05, "log_every": 4, "val_every": 3, **spec}),
        world=World(),
        run_dir=tmp_path,
        meta={},
        validate=lambda model: {"val_loss": 1.0 / (2 + next(validations)), "image_to_text_R@1": 0.5, "val_pairs": 8},
    )


def test_lines_curves_and_one_samples_per_second(tmp_path, monkeypatch):
    draws = []
    monkeypatch.setattr(RunLog, "draw", lambda self, real=RunLog.draw: draws.append(1) or real(self))
    result = _train(tmp_path, monkeypatch)
    lines = read_metrics(tmp_path / "metrics.jsonl")
    train = [x for x in lines if x["kind"] == "train"]
    assert [(x["step"], x["kind"]) for x in lines] == [(3, "val"), (4, "train"), (6, "train"), (6, "val")]
    # curves.png: redrawn at each validation (steps 3 and 6), from the file's lines
    assert (tmp_path / "curves.png").is_file() and len(draws) == 2
    series = curve_series(lines)
    # every number the loop writes beside the losses is known to the picture as not a loss
    assert set(series["loss"]) == {"train near_zero", "train near_one", "train loss", "val_loss"}
    assert series["loss"]["train loss"] == ([4, 6], [x["loss"] for x in train])
    assert series["loss"]["val_loss"] == ([3, 6], [0.5, 1 / 3])
    for x in train:  # the weighted sum is the loss the optimizer minimised
        assert x["loss"] == pytest.approx(x["near_zero"] + 0.5 * x["near_one"], abs=2e-6)
    # one samples/s: samples ÷ seconds of the training steps, the same in the last line and the result
    assert train[-1]["samples"] == 6 * 4
    assert train[-1]["samples_per_s"] == pytest.approx(24 / train[-1]["train_seconds"], rel=1e-3)
    assert result.samples_per_s == pytest.approx(train[-1]["samples_per_s"], abs=0.006)
    assert result.train_seconds == pytest.approx(train[-1]["train_seconds"], abs=1e-6)
    assert result.loss_weights == {"near_zero": 1.0, "near_one": 0.5}


def test_after_a_ctrl_c_the_last_step_is_logged(tmp_path, monkeypatch):
    from tests.conftest import signal_after_steps

    signal_after_steps(monkeypatch, 2)  # log_every is 4: step 2 would not be logged otherwise
    result = _train(tmp_path, monkeypatch, val_every=None)
    assert result.interrupted and result.steps == 2
    assert result.last_metrics["step"] == 2 and result.last_metrics["loss"] > 0
    assert [x["step"] for x in read_metrics(tmp_path / "metrics.jsonl")] == [2]
    assert (tmp_path / "curves.png").is_file()  # drawn at the end of an interrupted run too


def test_tensorboard_events_hold_the_lines_values(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path, monkeypatch, tensorboard=True)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    expected: dict[str, list[tuple[int, float]]] = {}
    for line in read_metrics(tmp_path / "metrics.jsonl"):
        for tag, value in scalars(line).items():
            expected.setdefault(tag, []).append((line["step"], value))
    assert {"train/loss", "train/near_zero", "train/lr", "val/val_loss", "val/image_to_text_R@1"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32 events


def test_without_tensorboard_one_line_names_the_field(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were absent
    with pytest.raises(MmcliError, match=r"^train\.tensorboard: needs the tensorboard package") as caught:
        tensorboard_writer(tmp_path, None)
    assert "\n" not in str(caught.value)


def test_summary_rows_name_each_objective_and_its_weight():
    from mmcli.commands.render import training_rows

    result = {
        "samples_per_s": 22.44,
        "loss_weights": {"clip": 1.0, "mlm": 1.0, "itm": 0.5},
        "train": {"step": 7, "clip": 2.0, "mlm": 3.25, "itm": 0.5, "loss": 5.5, "samples_per_s": 22.44},
    }
    assert training_rows(result) == [
        ("samples/s (training steps)", "22.4"),
        ("train loss (Σ weight × loss, step 7)", "5.5000"),
        ("  clip (weight 1)", "2.0000"),
        ("  mlm (weight 1)", "3.2500"),
        ("  itm (weight 0.5)", "0.5000"),
    ]
    one = {"samples_per_s": 8.0, "loss_weights": {"clip": 1.0}, "train": {"step": 3, "clip": 2.0, "loss": 2.0}}
    assert training_rows(one)[1:] == [("train loss (clip, step 3)", "2.0000")]
    assert training_rows({"samples_per_s": 0.0, "train": {}})[1:] == [("train loss", "-")]


def test_the_validation_row_shows_scores_to_four_decimals():
    record = {
        "step": 6,
        "kind": "val",
        "val_loss": 2.16421,
        "image_to_text_R@1": 0.8,
        "chance_R@1": 0.1,
        "val_pairs": 40,
    }
    assert loop.validation_info(record) == "step 6  val_loss 2.1642  image_to_text_R@1 0.8000"
    assert loop.train_info(25.04, 3e-4, 22.44) == "loss 25.0400  lr 3.00e-04  22.4 samples/s"


def test_throughput_is_samples_over_step_seconds():
    clock = loop.Throughput()
    assert clock.rate == 0.0
    clock.add(32, 2.0)
    clock.add(32, 0.5)  # a fast step does not count more than its share of the time
    assert clock.rate == pytest.approx(64 / 2.5)


def test_scalars_are_the_numbers_of_a_line():
    line = {"step": 4, "kind": "val", "val_loss": 2.5, "note": "x", "ok": True, "bad": float("nan")}
    assert scalars(line) == {"val/val_loss": 2.5}
    assert json.dumps(scalars({"step": 1, "kind": "train", "epoch": 0, "loss": 1})) == '{"train/loss": 1.0}'
