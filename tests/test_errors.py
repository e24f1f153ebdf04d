"""The one error formatter: user mistakes, OS errors about the user's paths and invalid specs
become one line on stderr and exit code 2; anything else keeps its traceback."""

from __future__ import annotations

import errno
import os

import pytest

from mmcli.errors import MmcliError, reported_errors


def _reported(exc: BaseException, capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as info:
        with reported_errors():
            raise exc
    return info.value.code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    "exc, line",
    [
        (PermissionError(errno.EACCES, "Permission denied", "/data/runs/x"), "/data/runs/x: permission denied"),
        (PermissionError(errno.EPERM, "Operation not permitted", "/sys/x"), "/sys/x: operation not permitted"),
        (
            OSError(errno.EROFS, "Read-only file system", "/mnt/ro/eval.json"),
            "/mnt/ro/eval.json: read-only file system",
        ),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/no/dir/e.json"), "/no/dir/e.json: no such"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f.yaml/i.npy"), "/f.yaml/i.npy: a part of this path"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/tmp/x.tmp", None, "/data/out"), "/data/out: is a folder"),
        (OSError(errno.ENOSPC, "No space left on device", "/big/x"), "/big/x: no space left on device"),
        # io.atomic_write's temporary file beside the target is named as its target
        (
            PermissionError(errno.EACCES, "Permission denied", "/ro/.eval.json.ab_12xyz.tmp"),
            "/ro/eval.json: permission",
        ),
    ],
)
def test_os_errors_about_a_path_are_one_line_naming_it(capsys, exc, line):
    code, err = _reported(exc, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"mmcli: error: {line}")


def test_a_file_in_the_way_of_a_folder_is_named(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    code, err = _reported(FileExistsError(errno.EEXIST, "File exists", str(tmp_path / "f")), capsys)
    assert code == 2 and err == [f"mmcli: error: {tmp_path / 'f'}: is a file, not a folder"]


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.EIO, "Input/output error", "/dev/sda"),  # the machine's fault, not a path given
        FileNotFoundError("a message without a path"),
        OSError("no errno at all"),
        ValueError("a bug"),
    ],
)
def test_other_errors_keep_their_traceback(exc):
    with pytest.raises(type(exc)):
        with reported_errors():
            raise exc


def test_a_validation_error_names_every_field(capsys):
    from pydantic import ValidationError

    from mmcli.spec import SourceSpec

    with pytest.raises(ValidationError) as info:
        SourceSpec(path="x.tsv", size="many", format="zip")
    code, err = _reported(info.value, capsys)
    assert code == 2 and len(err) == 1
    assert "size: Input should be a valid integer" in err[0] and "format: Input should be 'auto'" in err[0]
    with pytest.raises(ValidationError) as info:
        SourceSpec(path="pipe:rm -rf x")
    code, err = _reported(info.value, capsys)
    assert code == 2 and err[0].startswith("mmcli: error: path: 'pipe:rm -rf x' is a URL")


def test_debug_re_raises(monkeypatch):
    monkeypatch.setenv("MMCLI_DEBUG", "1")
    for exc in (MmcliError("x"), PermissionError(errno.EACCES, "Permission denied", "/x")):
        with pytest.raises(type(exc)):
            with reported_errors():
                raise exc
    assert os.environ["MMCLI_DEBUG"] == "1"
