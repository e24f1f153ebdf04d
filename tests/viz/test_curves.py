"""Tests for mmcli.viz.curves: the series of metrics.jsonl lines, by hand; the pictures."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mmcli.errors import MmcliError
from mmcli.viz import curves

LINES = [
    {"step": 2, "kind": "train", "epoch": 0, "clip": 3.5, "mlm": 9.0, "loss": 8.0, "grad_norm": 4.0, "lr": 1e-3,
     "samples_per_s": 50.0, "train_seconds": 1.0, "samples": 64, "skipped": 0, "logit_scale": 14.3},
    {"step": 4, "kind": "train", "epoch": 0, "clip": 3.0, "mlm": 7.0, "loss": 6.5, "grad_norm": 2.0, "lr": 5e-4,
     "samples_per_s": 60.0, "train_seconds": 2.0, "samples": 128, "skipped": 0, "logit_scale": 14.2},
    {"step": 4, "kind": "val", "val_loss": 2.5, "image_to_text_R@1": 0.25, "text_to_image_R@1": 0.5,
     "chance_R@1": 0.125, "val_pairs": 40},
]  # fmt: skip


def test_series_are_the_lines_values_by_hand():
    got = curves.curve_series(LINES)
    assert got == {
        "loss": {
            "train clip": ([2, 4], [3.5, 3.0]),
            "train mlm": ([2, 4], [9.0, 7.0]),
            "train loss": ([2, 4], [8.0, 6.5]),
            "val_loss": ([4], [2.5]),
        },
        "validation": {
            "image_to_text_R@1": ([4], [0.25]),
            "text_to_image_R@1": ([4], [0.5]),
            "chance_R@1": ([4], [0.125]),
        },
        "learning rate": {"lr": ([2, 4], [1e-3, 5e-4])},
        "gradient norm (before clipping)": {"grad_norm": ([2, 4], [4.0, 2.0])},
    }
    # bookkeeping (samples, seconds, logit scale) and the held-out set's size are no curve of their own
    assert not any(key in str(got) for key in ("samples", "seconds", "logit", "val_pairs"))


def test_a_line_cut_short_by_a_kill_is_left_out(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in LINES[:2]) + '{"step": 6, "kind": "tr')
    assert curves.read_metrics(path) == LINES[:2]


def test_the_picture_is_a_png_with_a_panel_per_quantity(tmp_path):
    out = curves.draw_curves({"run": curves.curve_series(LINES)}, tmp_path / "curves.png", title="run")
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] > 300
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary file left beside it


def test_compare_draws_several_runs_and_reports_their_last_values(tmp_path):
    for name, scale in (("a", 1.0), ("b", 0.5)):
        (tmp_path / name).mkdir()
        lines = [{**line, **({"loss": line["loss"] * scale} if "loss" in line else {})} for line in LINES]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = curves.compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "compare.png")
    assert [r["name"] for r in result["runs"]] == ["a", "b"]
    assert [r["last"]["train loss"] for r in result["runs"]] == [6.5, 3.25]
    assert result["runs"][0]["steps"] == 4 and result["runs"][0]["last"]["image_to_text_R@1"] == 0.25
    assert Image.open(result["out"]).format == "PNG"


def test_compare_refuses_a_folder_without_metrics(tmp_path):
    with pytest.raises(MmcliError, match="no metrics.jsonl"):
        curves.compare_runs([tmp_path], tmp_path / "compare.png")


def test_eval_compare_on_the_command_line_draws_without_torch(tmp_path):
    import subprocess
    import sys

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in LINES))
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from mmcli.cli import app\n"
        "r = CliRunner().invoke(app, ['eval', '--compare', *sys.argv[1:], '--json'])\n"
        "print(json.dumps({'code': r.exit_code, 'out': r.stdout, 'torch': 'torch' in sys.modules}))\n"
    )
    args = [str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab.png")]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0 and not report["torch"], report
    assert json.loads(report["out"])["out"] == str(tmp_path / "ab.png") and (tmp_path / "ab.png").is_file()


def test_eval_takes_several_paths_only_with_compare(tmp_path):
    from typer.testing import CliRunner

    from mmcli.cli import app

    r = CliRunner().invoke(app, ["eval", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")])
    assert r.exit_code == 2 and "several paths only with --compare" in r.stderr
    r = CliRunner().invoke(app, ["eval", "--compare", str(tmp_path), "--retrieval", "x.tsv"])
    assert r.exit_code == 2 and "it takes no --retrieval" in r.stderr
