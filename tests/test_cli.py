"""The command line: instant help (no torch), one-line errors with exit 2, debug tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

COMMANDS = [
    [],
    ["data"],
    ["data", "shapes"],
    ["pretrain"],
    ["embed"],
    ["retrieve"],
    ["serve"],
    ["index"],
    ["index", "build"],
    ["fuse"],
    ["caption"],
    ["generate"],
    ["eval"],
]


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


# --------------------------------------------------------------------------------------------
# every user-facing failure: one line on stderr, exit 2, no traceback
# --------------------------------------------------------------------------------------------


def _one_line_error(r) -> str:
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("mmcli: error: ")
    return lines[0]


def _spec(tmp_path, text: str, name: str = "pretrain.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


PRETRAIN = "data:\n  train:\n    path: {data}\ntrain:\n  steps: 1\noutput:\n  dir: {out}\n"


def _unwritable_folder(tmp_path):
    """A folder this process cannot create anything in (root ignores permission bits)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    import pytest

    probe = "/sys/mmcli-write-probe"
    try:
        os.mkdir(probe)
    except PermissionError:
        return "/sys"
    os.rmdir(probe)
    pytest.skip("no unwritable folder for root on this machine")


def test_read_only_output_folder_is_one_line(tmp_path):
    folder = _unwritable_folder(tmp_path)
    line = _one_line_error(_run(["data", "shapes", "--out", f"{folder}/shapes", "--n", "4", "--size", "32"]))
    assert line.startswith(f"mmcli: error: {folder}/shapes: ")
    assert line.endswith(("permission denied", "operation not permitted", "read-only file system"))


def test_an_output_path_through_a_file_or_onto_a_folder_is_one_line(tmp_path, nano_run, shapes_dir):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    base = ["--device", "cpu", "eval", "--model", str(nano_run), "--retrieval", str(shapes_dir / "val.tsv")]
    line = _one_line_error(_run([*base, "--out", str(tmp_path / "notes.txt" / "eval.json")]))
    assert line.startswith(f"mmcli: error: {tmp_path / 'notes.txt'}")
    (tmp_path / "a-folder").mkdir()
    line = _one_line_error(_run([*base, "--out", str(tmp_path / "a-folder")]))
    assert line == f"mmcli: error: {tmp_path / 'a-folder'}: is a folder, not a file"
    assert [p.name for p in (tmp_path / "a-folder").iterdir()] == []  # no temporary file left


def test_a_pickle_that_weights_only_refuses_is_one_line(tmp_path, shapes_dir):
    weights = tmp_path / "evil.pt"
    code = (
        "import torch\n"
        "class Payload:\n"
        "    def __reduce__(self):\n"
        "        return (print, ('pwned',))\n"
        f"torch.save({{'state_dict': {{}}, 'x': Payload()}}, {str(weights)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    args = ["--device", "cpu", "eval", "--model", f"mmcli-nano:{weights}", "--retrieval", str(shapes_dir / "val.tsv")]
    r = _run([*args, "--out", str(tmp_path / "e.json")])
    line = _one_line_error(r)
    assert line.startswith(f"mmcli: error: model.pretrained: {weights}: refused")
    assert "pwned" not in r.stdout + r.stderr


def test_a_yaml_alias_bomb_in_model_config_is_refused_at_once(tmp_path):
    bomb = ["    a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    bomb += [f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 7)]  # 9**7 values
    text = PRETRAIN.format(data="x.tsv", out=tmp_path) + "model:\n  arch: mine\n  config:\n" + "\n".join(bomb) + "\n"
    spec = _spec(tmp_path, text)
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # where a registration would be written (it must not be)
    r = subprocess.run(
        [sys.executable, "-m", "mmcli", "pretrain", str(spec)], capture_output=True, text=True, timeout=60, env=env
    )
    line = _one_line_error(r)
    assert line.startswith(f"mmcli: error: {spec}: not accepted as a spec: its aliases expand to more than")


def test_a_spec_with_several_mistakes_names_every_one(tmp_path):
    text = PRETRAIN.format(data="x.tsv", out=tmp_path) + "  name: ../escape\n  colour: red\n"
    text = text.replace("  steps: 1\n", "  steps: 1\n  lr: -1\n  warmup_steps: -5\n")
    line = _one_line_error(_run(["pretrain", str(_spec(tmp_path, text))]))
    for part in ("train.lr: Input should be greater than 0", "train.warmup_steps:", "output.colour: unknown key"):
        assert part in line
    assert "more)" not in line


def test_a_non_finite_override_is_one_line_naming_the_field(tmp_path):
    spec = _spec(tmp_path, PRETRAIN.format(data="x.tsv", out=tmp_path))
    line = _one_line_error(_run(["pretrain", str(spec), "--set", "train.lr=.inf"]))
    assert line == f"mmcli: error: {spec}: train.lr: Input should be a finite number"


def test_a_command_url_as_data_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    spec = _spec(tmp_path, PRETRAIN.format(data=json.dumps(f"pipe:touch {marker}"), out=tmp_path))
    line = _one_line_error(_run(["pretrain", str(spec)]))
    assert "data.train.path: 'pipe:touch" in line and "allow_commands: true" in line
    assert not marker.exists()


def test_a_model_arch_that_is_a_path_writes_nothing(tmp_path):
    temp = tmp_path / "t" / "u"  # the temporary folder: even a failing run writes only in tmp_path
    temp.mkdir(parents=True)
    config = "{embed_dim: 8, vision_cfg: {image_size: 32, layers: 1, width: 32, patch_size: 8}, text_cfg: {}}"
    text = PRETRAIN.format(data="x.tsv", out=tmp_path) + f"model:\n  arch: ../../escaped\n  config: {config}\n"
    line = _one_line_error(_run(["pretrain", str(_spec(tmp_path, text))], env={"TMPDIR": str(temp)}))
    assert "model.arch: '../../escaped' is not a model name" in line
    assert list(tmp_path.rglob("escaped*")) == [] and list(temp.iterdir()) == []
