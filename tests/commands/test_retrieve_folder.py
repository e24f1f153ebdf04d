"""retrieve --in FOLDER: embedded into the user's cache on first use, updated with embed --update
afterwards (only what changed is embedded), searched; --paths prints paths only; and the retrieve
items of issue 15 (QUERY with --queries, blank lines, the FAISS build message)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmcli.commands.retrieve import run as retrieve
from mmcli.errors import MmcliError
from mmcli.io import IMAGE_SUFFIXES


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    out = tmp_path / "cache"
    monkeypatch.setenv("MMCLI_CACHE_DIR", str(out))
    return out


@pytest.fixture
def photos(shapes_dir, tmp_path) -> Path:
    """A folder of 6 real images (read-only, as a mounted share may be)."""
    out = tmp_path / "photos"
    out.mkdir()
    for n, src in enumerate(sorted((shapes_dir / "images" / "train").iterdir())[:6]):
        shutil.copy2(src, out / f"{n:03d}.png")
    return out


def search(query, photos, nano_run, **kwargs):
    return retrieve(query, folder=str(photos), model=str(nano_run), k=3, progress=False, **kwargs)


def test_first_search_builds_the_cache_then_an_added_image_alone_is_embedded_and_found(
    photos, nano_run, cache, shapes_dir, monkeypatch
):
    os.chmod(photos, 0o555)  # nothing is written beside the photos (as root this restricts nothing:
    # the index lying under the cache folder is what is checked then)
    try:
        first = search("a red circle", photos, nano_run)
        index = Path(first["index"])
        assert index.parent.parent == cache / "folders" and index.is_file()
        assert first["folder"]["update"] is None and first["folder"]["embedded"] == 6 and first["count"] == 6
        assert json.loads((index.parent / "folder.json").read_text())["folder"] == str(photos.resolve())
        os.chmod(photos, 0o755)
        new = photos / "new.png"
        shutil.copy(sorted((shapes_dir / "images" / "val").iterdir())[0], new)
        os.chmod(photos, 0o555)
        second = search(str(new), photos, nano_run)
    finally:
        os.chmod(photos, 0o755)
    assert second["index"] == first["index"]
    assert second["folder"]["update"] == {"unchanged": 6, "new": 1, "changed": 0, "deleted": 0}
    assert second["folder"]["embedded"] == 1 and second["count"] == 7
    top = second["queries"][0]["results"][0]
    assert top["item"] == "new.png" and top["path"] == str(new.resolve()) and top["score"] == pytest.approx(1, abs=1e-5)

    from mmcli.commands import embed

    monkeypatch.setattr(embed, "run", lambda *a, **k: pytest.fail("re-embedded an unchanged folder"))
    third = search("a red circle", photos, nano_run)
    assert third["folder"] == {
        "folder": str(photos.resolve()),
        "index": first["index"],
        "embedded": 0,
        "update": {"unchanged": 7, "new": 0, "changed": 0, "deleted": 0},
    }


def test_a_cache_that_cannot_be_updated_is_embedded_again_whole(photos, nano_run, cache, shapes_dir):
    first = search("a red circle", photos, nano_run)
    sidecar = Path(first["index"] + ".json")
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "decode": {"draft": None if meta["decode"]["draft"] else [9, 9]}}))
    shutil.copy(sorted((shapes_dir / "images" / "val").iterdir())[0], photos / "new.png")
    second = search("a red circle", photos, nano_run)
    assert second["folder"]["update"] is None and second["folder"]["embedded"] == 7
    assert json.loads(sidecar.read_text())["decode"] == meta["decode"]


def test_another_model_gets_its_own_cache(photos, nano_run, cache, tmp_path):
    from tests.conftest import save_random_run

    other = save_random_run(tmp_path / "other-run", seed=1)
    a = search("a red circle", photos, nano_run)
    b = search("a red circle", photos, other)
    assert a["index"] != b["index"] and b["folder"]["embedded"] == 6


def cli(*args, env_cache: Path):
    env = {**os.environ, "MMCLI_CACHE_DIR": str(env_cache)}
    return subprocess.run(
        [sys.executable, "-m", "mmcli", "retrieve", *map(str, args)], capture_output=True, text=True, env=env
    )


def test_paths_prints_exactly_the_hits_paths(photos, nano_run, cache):
    expected = [h["path"] for h in search("a red circle", photos, nano_run)["queries"][0]["results"]]
    r = cli("a red circle", "--in", photos, "--model", nano_run, "--k", 3, "--paths", env_cache=cache)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == expected and len(expected) == 3
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in expected)


def test_a_folder_without_images_is_one_line(tmp_path, nano_run, cache):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pictures here\n")
    r = cli("a cat", "--in", empty, "--model", nano_run, env_cache=cache)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"mmcli: error: {empty.resolve()}: no image files found (looked for {', '.join(IMAGE_SUFFIXES)})"
    ]


def test_in_and_index_together_or_neither_is_refused(photos, nano_run, cache):
    with pytest.raises(MmcliError, match="give --index INDEX .* or --in FOLDER"):
        retrieve("a cat", index_path="x.npy", folder=str(photos))
    with pytest.raises(MmcliError, match="give --index INDEX .* or --in FOLDER"):
        retrieve("a cat")


def test_a_query_with_a_queries_file_is_refused(tmp_path):
    queries = tmp_path / "q.txt"
    queries.write_text("a cat\n")
    with pytest.raises(MmcliError, match=f"give a QUERY or --queries {queries}, not both"):
        retrieve("a dog", index_path="x.npy", queries_file=str(queries))


def test_blank_lines_of_a_queries_file_are_counted_and_reported(photos, nano_run, cache, tmp_path):
    queries = tmp_path / "q.txt"
    queries.write_text("a red circle\n\n   \na blue square\n")
    result = search(None, photos, nano_run, queries_file=str(queries))
    assert [q["query"] for q in result["queries"]] == ["a red circle", "a blue square"]
    assert f"--queries {queries}: 2 blank lines skipped" in result["notes"]
    r = cli("--queries", queries, "--in", photos, "--model", nano_run, "--k", 3, "--paths", env_cache=cache)
    assert r.returncode == 0 and f"--queries {queries}: 2 blank lines skipped" in r.stderr.splitlines()
    assert r.stdout.splitlines() == [h["path"] for q in result["queries"] for h in q["results"]]


def test_embed_of_a_text_file_reports_its_blank_lines(nano_run, tmp_path):
    from mmcli.commands.embed import run as embed

    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\n\na blue square\n\t\n")
    result = embed(str(texts), str(tmp_path / "t.npy"), model=str(nano_run), progress=False)
    assert result["count"] == 2 and result["blank_lines_skipped"] == 2
    assert result["notes"] == [f"{texts}: 2 blank lines skipped (no text to embed)"]


def test_faiss_build_message_prints_parameters_only_when_there_are_any(capsys):
    from mmcli.commands.render import render_retrieve, report_faiss_build

    search = {"method": "faiss flat", "built": True, "path": "e.npy.faiss", "build_seconds": 0.1, "recall_at_10": 1.0}
    report_faiss_build({"search": {**search, "params": {}}})
    report_faiss_build({"search": {**search, "method": "faiss ivf", "params": {"nlist": 64, "nprobe": 8}}})
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "built a faiss flat index e.npy.faiss in 0.1 s; the index's build check: recall@10 against exact search 1.000",
        "built a faiss ivf index e.npy.faiss in 0.1 s (nlist=64, nprobe=8); "
        "the index's build check: recall@10 against exact search 1.000",
    ]
    render_retrieve({"queries": [], "count": 9, "search": {**search, "params": {}}, "k": 5})
    assert "build check: recall@10" in capsys.readouterr().out
