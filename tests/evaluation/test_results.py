"""``mmcli eval --format clip_benchmark``: the folder that CLIP_benchmark's own ``build`` command
reads into its CSV, checked by running that command's code on it.

CLIP_benchmark's ``cli.py`` imports torch, its dataset builders and model loaders at its top
level; its ``build`` (``main_build``) needs only ``json``, ``os`` and ``csv``. So that one function
is taken from the installed package's ``cli.py`` with ``ast`` and run as it is (install with
``pip install --no-deps clip_benchmark``); without the package the test is skipped and says so.
"""

from __future__ import annotations

import argparse
import ast
import csv
import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.errors import MmcliError
from mmcli.evaluation.results import clip_benchmark_file_name, clip_benchmark_records


def load_clip_benchmark_build():
    """``clip_benchmark.cli.main_build`` of the installed package, without its module's imports."""
    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip_benchmark is not installed (pip install --no-deps clip_benchmark): its build not run")
    source = (Path(spec.submodule_search_locations[0]) / "cli.py").read_text()
    (function,) = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "main_build"]
    namespace = {"csv": csv, "json": json, "os": __import__("os")}
    exec(compile(ast.Module(body=[function], type_ignores=[]), "clip_benchmark/cli.py", "exec"), namespace)
    return namespace["main_build"]


def _build_rows(folder: Path, csv_path: Path) -> list[dict[str, str]]:
    load_clip_benchmark_build()(argparse.Namespace(files=[str(folder)], output=str(csv_path)))
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _cell(value) -> str:
    return "" if value is None else str(value)  # csv.DictWriter writes None as an empty cell


def test_clip_benchmark_build_reads_mmcli_eval_results(nano_run, shapes_dir, tmp_path):
    out = tmp_path / "results"
    args = ["--device", "cpu", "eval", "--model", str(nano_run), "--zero-shot", str(shapes_dir / "classify.tsv")]
    args += ["--retrieval", str(shapes_dir / "test.tsv"), "--linear-probe", str(shapes_dir / "classify.tsv")]
    args += ["--set", "workers=0", "--set", "linear_probe.shots=[1,null]", "--set", "dataset=shapes"]
    r = CliRunner().invoke(app, [*args, "--format", "clip_benchmark", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout)  # the progress bars went to stderr: stdout is the JSON alone
    results = {e["task"]: e["metrics"] for e in printed["results"]}
    assert sorted(p.name for p in out.glob("*.json")) == sorted(
        clip_benchmark_file_name(rec) for rec in clip_benchmark_records(printed["results"], [1, None], 0)
    )

    rows = _build_rows(out, tmp_path / "benchmark.csv")
    assert len(rows) == 4  # zero-shot, retrieval, and the probe with all examples and with 1 shot
    for row in rows:
        assert (row["dataset"], row["model"], row["pretrained"]) == ("shapes", "mmcli-nano", str(nano_run))
        assert row["model_fullname"] == f"mmcli-nano {nano_run}" and row["language"] == "en"
    by_task = {(r["task"], r.get("fewshot_k", "")): r for r in rows}
    zs = by_task[("zeroshot_classification", "")]
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert zs[name] == _cell(results["zeroshot_classification"][name])
    ret = by_task[("zeroshot_retrieval", "")]
    for k in (1, 5, 10):
        for name in (f"image_retrieval_recall@{k}", f"text_retrieval_recall@{k}"):
            assert ret[name] == _cell(results["zeroshot_retrieval"][name])
    probe = results["linear_probe"]
    full, one = by_task[("linear_probe", "-1")], by_task[("linear_probe", "1")]
    for name in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall"):
        assert full[name] == _cell(probe[name]) and one[name] == _cell(probe[f"{name}_1shot"])
    assert full["C"] == _cell(probe["lp_C"]) and full["seed"] == "0"
    assert float(full["lp_acc1"]) == probe["lp_acc1"] and 0 <= probe["lp_acc1"] <= 1  # a number, not n/a
    # one image per class trains: the 1-shot row would repeat the full one, so it is marked, not fitted
    assert one["lp_acc1"] == "" and any("lp_acc1_1shot: = lp_acc1" in n for n in printed["notes"])


def test_records_keep_clip_benchmarks_names_and_one_probe_row_per_shot():
    head = {"dataset": "d", "model": "m", "pretrained": "runs/x", "checksum": "c"}
    results = [
        {
            **head,
            "task": "zeroshot_classification",
            "metrics": {"acc1": 0.5, "acc5": None, "n": 3, "mean_per_class_recall": 0.5},
        },
        {**head, "task": "linear_probe", "metrics": {"lp_acc1": 0.7, "lp_acc5": 0.9, "lp_mean_per_class_recall": 0.6}},
        {**head, "task": "vqa", "metrics": {"accuracy": 0.4, "per_type.colour.n": 2}},
    ]
    results[1]["metrics"] |= {"lp_C": 1.0, "lp_acc1_2shot": 0.3, "lp_acc5_2shot": None}
    results[1]["metrics"] |= {"lp_mean_per_class_recall_2shot": 0.3, "lp_C_2shot": 0.1}
    records = clip_benchmark_records(results, [2, None], seed=4)
    assert [r["metrics"] for r in records] == [
        {"acc1": 0.5, "acc5": None, "mean_per_class_recall": 0.5},
        {"lp_acc1": 0.3, "lp_acc5": None, "lp_mean_per_class_recall": 0.3, "C": 0.1, "fewshot_k": 2, "seed": 4},
        {"lp_acc1": 0.7, "lp_acc5": 0.9, "lp_mean_per_class_recall": 0.6, "C": 1.0, "fewshot_k": -1, "seed": 4},
        {"accuracy": 0.4, "per_type.colour.n": 2},
    ]
    assert [clip_benchmark_file_name(r) for r in records] == [
        "d_runs_x_m_en_zeroshot_classification.json",
        "d_runs_x_m_en_linear_probe_2shot.json",
        "d_runs_x_m_en_linear_probe.json",
        "d_runs_x_m_en_vqa.json",
    ]


def test_clip_benchmark_format_needs_a_folder(nano_run, shapes_dir, tmp_path):
    from mmcli.commands.evaluate import run

    flags = {"model": str(nano_run), "zero_shot": str(shapes_dir / "classify.tsv"), "output": str(tmp_path / "e.json")}
    with pytest.raises(MmcliError, match="must name a folder"):
        run(None, [], flags=flags, device="cpu", result_format="clip_benchmark")
    with pytest.raises(MmcliError, match="choose json or clip_benchmark"):
        run(None, [], flags=flags, device="cpu", result_format="csv")
