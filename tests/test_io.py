"""Atomic writes: all or nothing, no temporary file left, permissions of a normally created file."""

from __future__ import annotations

import os
import stat

import pytest

from mmcli.io import atomic_write, atomic_write_json, atomic_write_text


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_text(path, "old")

    def broken(tmp):
        tmp.write_text("half of the new conte")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path):
    def interrupted(tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "weights.safetensors", interrupted)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_permissions_follow_the_umask_like_a_plain_open(tmp_path, umask, mask):
    umask(mask)
    atomic_write_text(tmp_path / "atomic.txt", "x")
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    mode = stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode) == 0o666 & ~mask


def test_json_round_trip_and_parent_folders_created(tmp_path):
    path = tmp_path / "a" / "b" / "sidecar.json"
    atomic_write_json(path, {"item": "é", "n": 1}, indent=None)
    assert path.read_text(encoding="utf-8") == '{"item": "é", "n": 1}'
