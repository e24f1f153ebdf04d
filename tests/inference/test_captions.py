"""The captions file of mmcli caption: names, seeds, settings, and the resumable writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmcli.errors import MmcliError
from mmcli.inference.captions import (
    CaptionWriter,
    caption_settings,
    output_path,
    resume_state,
    settings_record,
)
from mmcli.models.captioning import item_seed

JOB = {"model": "sha256:ab", "input": "/data/photos", "decoding": "greedy", "max_tokens": 6}
META = {"model": {"ref": "/runs/coca", "arch": "mmcli-nano-coca", "checksum": "sha256:ab"}}
SETTINGS = {"beams": 3, "top_p": 0.9, "temperature": 1.0, "max_tokens": 30, "min_tokens": 0}


def test_shards_are_named_as_an_index_shards():
    assert output_path("out/captions.jsonl") == "out/captions.jsonl"
    assert output_path("out/captions.jsonl", 1, 4) == "out/captions.rank00001-of-00004.jsonl"
    for bad in ("captions.txt", "captions", ".jsonl"):
        with pytest.raises(MmcliError, match="must end with .jsonl"):
            output_path(bad)


def test_item_seeds_are_the_same_in_every_process_and_differ_between_items_and_seeds():
    # Python's hash() of a string changes with PYTHONHASHSEED; the seeds must not.
    code = "from mmcli.models.captioning import item_seed; print(item_seed(7, 'sub/a.png'))"
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert int(other.stdout) == item_seed(7, "sub/a.png")
    seeds = {item_seed(s, k) for s in (0, 1) for k in ("a.png", "b.png", "sub/a.png")}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"beams": 0}, "--beams 0: must be at least 1"),
        ({"top_p": 0.0}, "--top-p 0.0: must be more than 0 and at most 1"),
        ({"top_p": 1.5}, "--top-p 1.5: must be more than 0 and at most 1"),
        ({"temperature": float("inf")}, "--temperature inf: must be a number more than 0"),
        ({"max_tokens": 0}, "--max-tokens 0: must be at least 1"),
        ({"min_tokens": 31}, "--min-tokens 31: must be between 0 and --max-tokens (30)"),
    ],
)
def test_each_bad_setting_is_named_by_its_option(change, message):
    with pytest.raises(MmcliError) as refused:
        caption_settings("top-p", **{**SETTINGS, **change})
    assert str(refused.value) == message


def test_the_job_records_only_the_settings_that_change_the_captions():
    record = {d: settings_record(caption_settings(d, **SETTINGS), seed=5) for d in ("greedy", "beam", "top-p")}
    assert record["greedy"] == {"decoding": "greedy", "max_tokens": 30, "min_tokens": 0}
    assert record["beam"] == {**record["greedy"], "decoding": "beam", "beams": 3}
    assert record["top-p"] == {**record["greedy"], "decoding": "top-p", "top_p": 0.9, "temperature": 1.0, "seed": 5}


def _write_partial(path, rows: list[dict], tail: str = "", job=JOB) -> None:
    with open(f"{path}.partial.json", "w", encoding="utf-8") as f:
        json.dump({"job": job, "meta": META, "skipped": [{"item": "x.png", "reason": "truncated"}]}, f)
    with open(f"{path}.partial", "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_resume_state_drops_a_torn_last_line_and_refuses_what_it_cannot_trust(tmp_path):
    path = str(tmp_path / "c.jsonl")
    assert resume_state(path) is None
    rows = [{"item": "a.png", "caption": "a cat", "score": -1.5}, {"item": "ü.png", "caption": "b", "score": -2.0}]
    _write_partial(path, rows, tail='{"item": "c.png", "cap')
    state = resume_state(path)
    assert (state.items, state.skipped, state.job, state.meta) == (
        ["a.png", "ü.png"],
        [{"item": "x.png", "reason": "truncated"}],
        JOB,
        META,
    )
    assert state.length == len("".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))

    _write_partial(path, rows[:1], tail="not json\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(MmcliError, match=r"c.jsonl.partial: line 2 is not a caption row; rerun with --overwrite"):
        resume_state(path)
    os.remove(f"{path}.partial.json")  # rows without their job: another program's, or a half-removed run
    with pytest.raises(MmcliError, match=r"c.jsonl.partial: no job description beside it"):
        resume_state(path)
    (tmp_path / "c.jsonl.partial.json").write_text('{"job": 1}')
    with pytest.raises(MmcliError, match=r"c.jsonl.partial.json: not the job description of an mmcli caption run"):
        resume_state(path)


def test_the_writer_continues_the_same_job_and_refuses_another(tmp_path):
    path = str(tmp_path / "c.jsonl")
    _write_partial(path, [{"item": "a.png", "caption": "a", "score": -1.0}], tail='{"item": "b.p')
    before = open(f"{path}.partial", "rb").read()
    with pytest.raises(MmcliError) as refused:
        CaptionWriter(path, job={**JOB, "max_tokens": 8}, meta=META, state=resume_state(path), overwrite=False)
    assert str(refused.value) == (
        f"{path}.partial holds 2 items of another job (max_tokens: 6 there, 8 now); "
        "rerun with --overwrite to discard them and start over, or choose another --out"
    )
    assert open(f"{path}.partial", "rb").read() == before

    writer = CaptionWriter(path, job=JOB, meta=META, state=resume_state(path), overwrite=False)
    writer.add([{"item": "b.png", "caption": "b", "score": -2.0}], [("y.png", "not an image")])
    writer.close()  # an interruption: what was added is on disk
    state = resume_state(path)
    assert state.items == ["a.png", "b.png"]
    assert state.skipped == [{"item": "x.png", "reason": "truncated"}, {"item": "y.png", "reason": "not an image"}]


def test_finish_moves_the_rows_into_place_and_overwrite_keeps_the_old_file_until_then(tmp_path):
    path = str(tmp_path / "c.jsonl")
    (tmp_path / "c.jsonl").write_text("old rows\n")
    (tmp_path / "c.jsonl.meta.json").write_text("{}")
    _write_partial(path, [{"item": "a.png", "caption": "a", "score": -1.0}])
    writer = CaptionWriter(path, job={**JOB, "max_tokens": 8}, meta=META, state=resume_state(path), overwrite=True)
    assert os.path.getsize(f"{path}.partial") == 0  # the other job's rows are discarded
    writer.add([{"item": "b.png", "caption": "b", "score": -2.0}], [])
    assert (tmp_path / "c.jsonl").read_text() == "old rows\n"
    writer.finish()
    assert [json.loads(line)["item"] for line in open(path)] == ["b.png"]
    sidecar = json.loads((tmp_path / "c.jsonl.meta.json").read_text())
    assert (sidecar["format"], sidecar["model"], sidecar["count"], sidecar["skipped"]) == (
        "mmcli-captions",
        META["model"],
        1,
        [],
    )
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "c.jsonl.meta.json"]
