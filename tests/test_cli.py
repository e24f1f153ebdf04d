"""The command line: instant help (no torch), one-line errors with exit 2, debug tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

COMMANDS = [[], ["data"], ["data", "shapes"], ["pretrain"], ["embed"], ["retrieve"], ["fuse"], ["eval"]]


def _run(args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "mmcli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_help_imports_neither_torch_nor_open_clip():
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from mmcli.cli import app\n"
        f"codes = [CliRunner().invoke(app, args + ['--help']).exit_code for args in {COMMANDS!r}]\n"
        "heavy = [m for m in ('torch', 'open_clip', 'torchvision', 'faiss') if m in sys.modules]\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0] * len(COMMANDS)
    assert result["heavy"] == []


def test_missing_spec_is_one_line_exit_2(tmp_path):
    r = _run(["pretrain", str(tmp_path / "missing.yaml")])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"mmcli: error: {tmp_path / 'missing.yaml'}: no such spec file"]


def test_bad_field_names_file_and_field(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("data:\n  train:\n    path: x.tsv\ntrain:\n  steps: 1\n  colour: red\n")
    r = _run(["pretrain", str(spec)])
    assert r.returncode == 2
    assert "s.yaml: train.colour: unknown key" in r.stderr
    assert "Traceback" not in r.stderr


def test_debug_shows_traceback(tmp_path):
    r = _run(["pretrain", str(tmp_path / "missing.yaml")], env={"MMCLI_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_bad_device_is_a_clear_error(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("data:\n  train:\n    path: x.tsv\ntrain:\n  steps: 1\n")
    r = _run(["--device", "tpu", "pretrain", str(spec)])
    assert r.returncode == 2 and "--device: unknown device 'tpu'" in r.stderr


def test_version():
    r = _run(["--version"])
    assert r.returncode == 0 and r.stdout.startswith("mmcli ")
