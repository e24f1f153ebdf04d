"""Index metadata (emb.npy.parquet): captions of dataset files and of folders' .txt files, kept
columns, returned by retrieve with absolute paths; a metadata file that disagrees is refused."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from mmcli.commands.embed import run as embed
from mmcli.commands.retrieve import run as retrieve
from mmcli.errors import MmcliError
from mmcli.retrieval import index as ix


def test_dataset_file_captions_and_kept_columns_are_stored_per_row(shapes_dir, nano_run, tmp_path):
    out = str(tmp_path / "emb.npy")
    embed(
        str(shapes_dir / "val.jsonl"),
        out,
        model=str(nano_run),
        workers=0,
        progress=False,
        keep_columns=("id", "objects"),
    )
    records = [json.loads(line) for line in (shapes_dir / "val.jsonl").read_text().splitlines()]
    first = {}
    for r in records:
        first.setdefault(os.path.realpath(shapes_dir / r["image"]), r)
    index = ix.open_index(out)
    table = pq.read_table(out + ".parquet").to_pylist()
    assert [row["item"] for row in table] == index.items
    for row in table:
        record = first[os.path.realpath(os.path.join(index.meta["root"], row["item"]))]
        assert row["caption"] == record["caption"] and row["id"] == record["id"]
        assert json.loads(row["objects"]) == record["objects"]
        assert row["size"] == os.path.getsize(os.path.join(index.meta["root"], row["item"]))


def test_retrieve_returns_absolute_paths_captions_and_kept_columns(shapes_dir, nano_run, tmp_path):
    out = str(tmp_path / "emb.npy")
    embed(str(shapes_dir / "val.jsonl"), out, model=str(nano_run), workers=0, progress=False, keep_columns=("id",))
    result = retrieve("a red circle", index_path=out, k=5)
    index = ix.open_index(out)
    assert result["index"] == os.path.abspath(out) and result["root"] == index.meta["root"]
    captions = dict(zip(index.items, index.metadata.column("caption")))
    for hit in result["queries"][0]["results"]:
        assert os.path.isabs(hit["path"]) and os.path.isfile(hit["path"])
        assert hit["path"] == os.path.join(index.meta["root"], hit["item"])
        assert hit["caption"] == captions[hit["item"]] and set(hit["metadata"]) == {"id"}


def test_threshold_keeps_only_hits_at_or_above_it(shapes_dir, nano_run, tmp_path):
    out = str(tmp_path / "emb.npy")
    embed(str(shapes_dir / "images" / "val"), out, model=str(nano_run), workers=0, progress=False)
    every = retrieve("a red circle", index_path=out, k=20)["queries"][0]["results"]
    cut = every[7]["score"]
    kept = retrieve("a red circle", index_path=out, k=20, threshold=cut)["queries"][0]["results"]
    assert [h["row"] for h in kept] == [h["row"] for h in every if h["score"] >= cut]


def test_kept_columns_are_checked_before_anything_is_embedded(shapes_dir, nano_run, tmp_path):
    out = str(tmp_path / "emb.npy")
    with pytest.raises(MmcliError, match="--keep-columns licence: .*val.tsv has no such column"):
        embed(str(shapes_dir / "val.tsv"), out, model=str(nano_run), keep_columns=("licence",), progress=False)
    with pytest.raises(MmcliError, match="--keep-columns: .* is a folder, which has no columns"):
        embed(str(shapes_dir / "images"), out, model=str(nano_run), keep_columns=("url",), progress=False)
    assert not os.listdir(tmp_path)


def test_metadata_of_another_index_is_refused(shapes_dir, nano_run, tmp_path):
    small, big = str(tmp_path / "small.npy"), str(tmp_path / "big.npy")
    embed(str(shapes_dir / "images" / "val"), small, model=str(nano_run), workers=0, progress=False)
    embed(str(shapes_dir / "images" / "test"), big, model=str(nano_run), workers=0, progress=False)
    os.replace(small + ".parquet", big + ".parquet")
    with pytest.raises(MmcliError, match="big.npy.parquet: its items are not those of the index"):
        retrieve("a red circle", index_path=big, k=3)
