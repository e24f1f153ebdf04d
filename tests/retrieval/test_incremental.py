"""embed --update: unchanged rows copied bit for bit, new and changed files embedded, deleted ones
dropped, the result equal to a full re-embed, and an interrupted update never costs the old index."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest

from mmcli.commands.embed import run as embed
from mmcli.errors import MmcliError
from mmcli.retrieval import index as ix
from tests.conftest import stopped_at_add


@pytest.fixture
def photos(shapes_dir, tmp_path):
    """A folder of 20 real images, some captioned by a same-name .txt file."""
    out = tmp_path / "photos"
    out.mkdir()
    for n, src in enumerate(sorted((shapes_dir / "images" / "train").iterdir())[:20]):
        shutil.copy2(src, out / f"{n:03d}.png")
        if n % 3 == 0:
            (out / f"{n:03d}.txt").write_text(f"caption {n}\n")
    return out


def embed_into(folder, out, nano_run, **kwargs):
    return embed(str(folder), str(out), model=str(nano_run), workers=0, progress=False, batch_size=4, **kwargs)


def rows_by_item(path) -> dict[str, np.ndarray]:
    index = ix.open_index(str(path))
    return {item: np.array(index.embeddings[n]) for n, item in enumerate(index.items)}


def change_files(photos, shapes_dir) -> None:
    """Two new files, one changed in place (another image's bytes), one deleted."""
    val = sorted((shapes_dir / "images" / "val").iterdir())
    shutil.copy(val[0], photos / "new-a.png")
    shutil.copy(val[1], photos / "new-b.png")
    shutil.copy(val[2], photos / "005.png")
    os.utime(photos / "005.png", ns=(1, 1))  # an unmistakable change of the recorded signature
    (photos / "007.png").unlink()


def test_update_embeds_only_new_and_changed_files_and_equals_a_full_re_embed(photos, shapes_dir, nano_run, tmp_path):
    out = tmp_path / "emb.npy"
    embed_into(photos, out, nano_run)
    before = rows_by_item(out)
    change_files(photos, shapes_dir)
    result = embed_into(photos, out, nano_run, update=True)
    assert result["update"] == {"unchanged": 18, "new": 2, "changed": 1, "deleted": 1}
    assert result["embedded"] == 3 and result["count"] == 21
    after = rows_by_item(out)
    for item in set(before) - {"005.png", "007.png"}:
        assert after[item].tobytes() == before[item].tobytes()  # copied, not re-embedded
    assert "007.png" not in after and {"new-a.png", "new-b.png"} <= set(after)
    assert not np.allclose(after["005.png"], before["005.png"], atol=1e-3)
    full = tmp_path / "full.npy"
    embed_into(photos, full, nano_run)
    assert ix.open_index(str(full)).items == ix.open_index(str(out)).items  # same rows, same order
    np.testing.assert_allclose(np.load(out), np.load(full), atol=1e-6)
    again = embed_into(photos, out, nano_run, update=True)
    assert again["embedded"] == 0 and again["update"]["unchanged"] == 21


def test_metadata_follows_the_rows_through_an_update(photos, shapes_dir, nano_run, tmp_path):
    out = tmp_path / "emb.npy"
    embed_into(photos, out, nano_run)
    change_files(photos, shapes_dir)
    embed_into(photos, out, nano_run, update=True)
    index = ix.open_index(str(out))
    captions = index.metadata.column("caption")
    for item, caption in zip(index.items, captions):
        txt = photos / item.replace(".png", ".txt")
        assert caption == (txt.read_text().strip() if txt.exists() else None)
    sizes, mtimes = index.metadata.column("size"), index.metadata.column("mtime_ns")
    for item, size, mtime in zip(index.items, sizes, mtimes):
        st = os.stat(photos / item)
        assert (size, mtime) == (st.st_size, st.st_mtime_ns)
    assert index.meta["metadata"]["columns"] == ["item", "caption", "size", "mtime_ns"]


def test_an_interrupted_update_keeps_the_old_index_and_resumes(photos, shapes_dir, nano_run, tmp_path, monkeypatch):
    out = tmp_path / "emb.npy"
    embed_into(photos, out, nano_run)
    old_rows, old_side = np.load(out), (tmp_path / "emb.npy.json").read_bytes()
    change_files(photos, shapes_dir)
    stopped_at_add(monkeypatch, 2, lambda: embed_into(photos, out, nano_run, update=True))
    assert np.load(out).tobytes() == old_rows.tobytes()  # the old index, whole and readable
    assert (tmp_path / "emb.npy.json").read_bytes() == old_side
    assert len(ix.open_index(str(out))) == 20
    result = embed_into(photos, out, nano_run, update=True)
    assert result["resumed_from"] > 0 and result["count"] == 21
    full = tmp_path / "full.npy"
    embed_into(photos, full, nano_run)
    np.testing.assert_allclose(np.load(out), np.load(full), atol=1e-6)


def test_a_faiss_file_of_the_old_index_is_rebuilt_after_an_update(photos, shapes_dir, nano_run, tmp_path):
    from mmcli.retrieval import faiss_index as ann

    out = tmp_path / "emb.npy"
    embed_into(photos, out, nano_run)
    first = ann.load_or_build_faiss(ix.open_index(str(out)))
    assert ann.load_or_build_faiss(ix.open_index(str(out))).built is False
    change_files(photos, shapes_dir)
    embed_into(photos, out, nano_run, update=True)
    rebuilt = ann.load_or_build_faiss(ix.open_index(str(out)))
    assert first.built and rebuilt.built and len(rebuilt) == 21


def test_text_index_update_keeps_the_texts_it_has(nano_run, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("a red circle\na blue square\n")
    out = tmp_path / "t.npy"
    embed(str(texts), str(out), model=str(nano_run), progress=False)
    before = rows_by_item(out)
    texts.write_text("a blue square\na green star\n")
    result = embed(str(texts), str(out), update=True, progress=False)
    assert result["update"] == {"unchanged": 1, "new": 1, "changed": 0, "deleted": 1}
    assert rows_by_item(out)["a blue square"].tobytes() == before["a blue square"].tobytes()


def test_update_refusals_are_one_line_and_change_nothing(photos, nano_run, tmp_path):
    out = tmp_path / "emb.npy"
    embed_into(photos, out, nano_run)
    rows = np.load(out).tobytes()
    with pytest.raises(MmcliError, match="another dtype"):
        embed_into(photos, out, nano_run, update=True, dtype="float16")
    with pytest.raises(MmcliError, match="choose one"):
        embed_into(photos, out, nano_run, update=True, overwrite=True)
    assert np.load(out).tobytes() == rows and not os.path.exists(str(out) + ".partial")


def test_update_without_an_index_embeds_everything(photos, nano_run, tmp_path):
    result = embed_into(photos, tmp_path / "emb.npy", nano_run, update=True)
    assert result["update"] is None and result["count"] == 20


def test_a_ctrl_c_during_the_swap_waits_for_it_to_end(photos, shapes_dir, nano_run, tmp_path, monkeypatch):
    import signal

    out = tmp_path / "emb.npy"
    embed_into(photos, out, nano_run)
    change_files(photos, shapes_dir)
    original, calls = os.replace, {"n": 0}

    def replace_then_interrupt(src, dst):
        if str(src).endswith(".npy.partial"):  # the rows' rename: the old sidecar is gone, the new one not in
            calls["n"] += 1
            os.kill(os.getpid(), signal.SIGINT)  # process-wide, as a Ctrl-C: any thread may receive it
        original(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own Ctrl-C, whatever ran before
    try:
        with pytest.raises(KeyboardInterrupt):
            embed_into(photos, out, nano_run, update=True)
            time.sleep(2)  # a signal that reached another thread is raised in this one at its next check
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(os, "replace", original)
    assert calls["n"] == 1
    index = ix.open_index(str(out))  # complete: the interrupt was delivered after the swap
    assert len(index) == 21 and len(index.metadata) == 21
    assert not os.path.exists(str(out) + ".partial.json") and not os.path.exists(str(out) + ".partial")


def test_a_fresh_partial_never_pairs_with_an_old_progress_file(tmp_path):
    out = str(tmp_path / "emb.npy")
    rows = np.eye(4, dtype=np.float32)[:2]
    meta = {"model": {"ref": "m", "arch": "a", "checksum": "c"}, "modality": "text"}
    with ix.IndexWriter(out, dim=4, capacity=2, meta=meta) as w:
        w.add(rows, ["x", "y"])
    stale = {"rows": 6, "dim": 4, "dtype": "float32", "meta": meta, "job": None, "items": list("abcdef"), "skipped": []}
    with open(out + ".partial.json", "w") as f:
        json.dump(stale, f)
    w = ix.IndexWriter(out, dim=4, capacity=2, meta=meta, replace=True)
    assert not os.path.exists(out + ".partial.json") and w.rows_done == 0
    w.add(rows[::-1], ["y", "x"])
    w.finish()
    assert ix.open_index(out).items == ["y", "x"]


def test_a_resumed_run_keeps_the_signatures_the_interrupted_run_saw(photos, nano_run, tmp_path, monkeypatch):
    out = tmp_path / "emb.npy"
    stopped_at_add(monkeypatch, 2, lambda: embed_into(photos, out, nano_run))
    first = photos / "000.png"  # embedded by the interrupted run, then changed before the resume
    seen = os.stat(first).st_mtime_ns
    os.utime(first, ns=(seen + 10**9, seen + 10**9))
    embed_into(photos, out, nano_run)
    index = ix.open_index(str(out))
    assert index.metadata.column("mtime_ns")[index.items.index("000.png")] == seen
    result = embed_into(photos, out, nano_run, update=True)
    assert result["update"]["changed"] == 1 and result["embedded"] == 1


def test_a_new_text_listed_twice_is_embedded_twice(nano_run, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("a red circle\n")
    out = tmp_path / "t.npy"
    embed(str(texts), str(out), model=str(nano_run), progress=False)
    texts.write_text("a blue square\na red circle\na blue square\n")
    result = embed(str(texts), str(out), update=True, progress=False)
    index = ix.open_index(str(out))
    assert result["count"] == 3 and index.items == ["a blue square", "a red circle", "a blue square"]
    assert index.embeddings[0].tobytes() == index.embeddings[2].tobytes()
