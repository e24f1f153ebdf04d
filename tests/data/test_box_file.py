"""Region boxes from a detector's JSONL output replace a record's object boxes."""

from __future__ import annotations

import json

import pytest

from mmcli.data.examples import apply_box_file
from mmcli.errors import MmcliError


def test_box_file_replaces_listed_records_only(tmp_path):
    path = tmp_path / "boxes.jsonl"
    path.write_text(json.dumps({"id": "a", "boxes": [[1, 2, 3, 4], [5, 6, 7, 8]]}) + "\n\n")
    records = [{"id": "a", "objects": [{"box": [0, 0, 9, 9], "color": "red"}]}, {"id": "b", "objects": []}]
    out = apply_box_file(records, path)
    assert out[0]["objects"] == [{"box": [1, 2, 3, 4]}, {"box": [5, 6, 7, 8]}]
    assert out[1] is records[1]


def test_box_file_errors_name_the_line(tmp_path):
    path = tmp_path / "boxes.jsonl"
    path.write_text(json.dumps({"id": "a", "boxes": [[1, 2, 3]]}) + "\n")
    with pytest.raises(MmcliError, match="line 1: every box needs 4 numbers"):
        apply_box_file([], path)
    path.write_text('{"id": "a"}\n')
    with pytest.raises(MmcliError, match="line 1: expected"):
        apply_box_file([], path)
