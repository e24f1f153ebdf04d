"""The command line: instant help (no torch), one-line errors with exit 2, debug tracebacks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    (tmp_path / "x.tsv").write_text("filepath\ttitle\n")  # the data is checked first, before torch
    spec = tmp_path / "s.yaml"
    spec.write_text(f"data:\n  train:\n    path: {tmp_path / 'x.tsv'}\ntrain:\n  steps: 1\n")
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


# --------------------------------------------------------------------------------------------
# help that reads right
# --------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _help(args: list[str]) -> str:
    from typer.testing import CliRunner

    from mmcli.cli import app

    result = CliRunner().invoke(app, args, env={"COLUMNS": "100", "TERMINAL_WIDTH": "100"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a) or "mmcli" for a in COMMANDS])
def test_help_names_values_not_python_types_and_h_is_help(args):
    text = _help([*args, "--help"])
    assert re.findall(r"<(?:bool|str|int|float|path|list\[)[^>]*>", text) == []
    assert re.findall(r"\{[a-z_]+\}", text) == []  # Typer's {spec} for a required argument
    assert re.search(r"--help\s+-h\s+Show this message and exit", text)
    assert _help([*args, "-h"]) == text


def test_flags_take_no_value_and_options_show_a_metavar():
    text = _help(["pretrain", "--help"])
    assert "Usage: mmcli pretrain [OPTIONS] SPEC" in text
    assert re.search(r"--resume\s+Continue the run", text)
    assert re.search(r"--json\s+Print machine-readable JSON", text)
    assert re.search(r"--set\s+KEY=VALUE\s+Override a spec field, e\.g\. --set train\.lr=3e-4", text)
    assert re.search(r"--device\s+DEVICE\s+auto", text)
    text = _help(["retrieve", "--help"])
    assert "Usage: mmcli retrieve [OPTIONS] [QUERY]" in text
    for option, metavar in [("--index", "PATH"), ("--k", r"N \[x>=1\]"), ("--threshold", "NUMBER"), ("--image", "")]:
        assert re.search(rf"{option}\s+{metavar}", text), option
    assert "--install-completion" in _help(["--help"])


def test_required_options_and_arguments_are_marked():
    import typer

    from mmcli.cli import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        if name in ("data", "index"):
            continue
        text = _help([name, "--help"])
        for param in command.params:
            if param.required:
                label = param.opts[0] if param.param_type_name == "option" else param.name.upper()
                rows = [line for line in text.splitlines() if line.startswith("│")]
                row = next(line for line in rows if re.search(rf"\s{label}\s", line))
                assert re.match(r"^│ \*", row), (name, label, row)


def test_each_set_example_is_one_its_command_accepts():
    from mmcli.cli import SET_EXAMPLES
    from mmcli.spec import load_spec_of_kind

    shipped = {"pretrain": "pretrain.yaml", "fuse": "fuse-vqa.yaml", "eval": "eval.yaml"}
    for command, example in SET_EXAMPLES.items():
        assert f"--set {example}" in " ".join(_help([command, "--help"]).split())
        spec = load_spec_of_kind(REPO / "examples" / "shapes" / shipped[command], command, [example])
        keys, _, value = example.partition("=")
        node = spec
        for key in keys.split("."):
            node = getattr(node, key)
        assert node == type(node)(value)  # "3e-4" is a string to YAML 1.1, a float to the spec


def test_device_is_accepted_after_the_command_too(tmp_path):
    (tmp_path / "x.tsv").write_text("filepath\ttitle\n")
    spec = _spec(tmp_path, PRETRAIN.format(data=tmp_path / "x.tsv", out=tmp_path))
    for args in (["--device", "tpu", "pretrain", str(spec)], ["pretrain", str(spec), "--device", "tpu"]):
        assert "--device: unknown device 'tpu'" in _one_line_error(_run(args))


# --------------------------------------------------------------------------------------------
# clear messages for the common mistakes
# --------------------------------------------------------------------------------------------


def test_a_spec_of_another_kind_names_the_command_to_run_it_with():
    line = _one_line_error(_run(["pretrain", "examples/shapes/fuse-vqa.yaml"], cwd=REPO))
    assert line == "mmcli: error: examples/shapes/fuse-vqa.yaml is a fuse spec: run it with mmcli fuse"
    line = _one_line_error(_run(["fuse", "examples/shapes/eval.yaml"], cwd=REPO))
    assert line == "mmcli: error: examples/shapes/eval.yaml is an eval spec: run it with mmcli eval"


def test_a_command_alone_shows_its_help():
    for command in ("eval", "pretrain", "embed"):
        r = _run([command])
        assert r.stdout.lstrip().startswith(f"Usage: mmcli {command} [OPTIONS]")
        assert r.stderr == "" and "Field required" not in r.stdout


def test_a_misspelt_arch_or_data_path_is_reported_before_torch_is_imported(tmp_path):
    data = tmp_path / "x.tsv"
    data.write_text("filepath\ttitle\n")
    arch = _spec(tmp_path, PRETRAIN.format(data=data, out=tmp_path) + "model:\n  arch: mmcli-tni\n", "pretrain-a.yaml")
    path = _spec(tmp_path, PRETRAIN.format(data=tmp_path / "y.tsv", out=tmp_path), "pretrain-b.yaml")
    code = (
        "import sys\n"
        "from mmcli.commands.pretrain import run\n"
        "from mmcli.errors import MmcliError\n"
        f"for spec in {[str(arch), str(path)]!r}:\n"
        "    try:\n"
        "        run(spec, [])\n"
        "    except MmcliError as exc:\n"
        "        print(exc)\n"
        "print('torch' in sys.modules, 'open_clip' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[0].startswith("model.arch: unknown architecture 'mmcli-tni'; use an open_clip.list_models() name")
    assert lines[1] == f"{tmp_path / 'y.tsv'}: no such file or folder"
    assert lines[2] == "False False"
    assert _one_line_error(_run(["pretrain", str(arch)])) == f"mmcli: error: {lines[0]}"
