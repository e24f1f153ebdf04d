"""mmcli retrieve: exact search equals NumPy brute force, FAISS reaches its recall, the model
check, image queries, contact sheets and the light start-up path of text queries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmcli.commands.embed import run as embed
from mmcli.commands.retrieve import run as retrieve
from mmcli.errors import MmcliError
from mmcli.retrieval import faiss_index as ann
from mmcli.retrieval import index as ix
from mmcli.viz.grid import sheet_size
from tests.conftest import save_random_run


@pytest.fixture(scope="module")
def image_index(shapes_dir, nano_run, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("index") / "emb.npy")
    embed(str(shapes_dir / "images"), out, model=str(nano_run), workers=0, progress=False)
    return out


def text_embedding(run_dir, texts: list[str]) -> np.ndarray:
    """The reference: open_clip's model and tokenizer for the run folder."""
    import open_clip

    model = open_clip.create_model(f"local-dir:{run_dir}").eval()
    with torch.no_grad():
        return model.encode_text(open_clip.get_tokenizer(f"local-dir:{run_dir}")(texts), normalize=True).numpy()


def brute_force(index_path: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    emb = np.load(index_path).astype(np.float32)
    scores = queries @ emb.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def test_text_queries_equal_numpy_brute_force(image_index, nano_run, tmp_path):
    texts = ["a red circle", "a blue square left of a green triangle"]
    (tmp_path / "q.txt").write_text("\n".join(texts) + "\n")
    result = retrieve(None, index_path=image_index, k=7, queries_file=str(tmp_path / "q.txt"))
    scores, ids = brute_force(image_index, text_embedding(nano_run, texts), 7)
    items = ix.open_index(image_index).items
    for n, query in enumerate(result["queries"]):
        assert query["query"] == texts[n] and not query["is_image"]
        assert [h["row"] for h in query["results"]] == ids[n].tolist()
        assert [h["item"] for h in query["results"]] == [items[i] for i in ids[n]]
        np.testing.assert_allclose([h["score"] for h in query["results"]], scores[n], atol=1e-5)
    assert result["search"] == {"method": "exact"}


def test_an_indexed_image_finds_itself_first(image_index, shapes_dir):
    query = str(shapes_dir / "images" / "test" / "test-000003.png")
    top = retrieve(query, index_path=image_index, k=3)["queries"][0]
    assert top["is_image"] and top["results"][0]["item"] == "test/test-000003.png"
    assert top["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three JPEGs of 120×100: over twice the model's 32 px input, so embed decodes them in draft
    mode at half scale, where a full-size decode resamples from other pixels."""
    root = tmp_path_factory.mktemp("photos")
    for n in range(3):
        small = np.random.default_rng(n).integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(small).resize((120, 100), Image.Resampling.BILINEAR).save(root / f"p{n}.jpg", quality=90)
    return root


@pytest.mark.parametrize("draft", [True, False])
def test_an_indexed_jpeg_queried_by_itself_scores_one(photos, nano_run, tmp_path, draft):
    out = str(tmp_path / "emb.npy")
    embed(str(photos), out, model=str(nano_run), workers=0, draft=draft, progress=False)
    for name in ("p0.jpg", "p1.jpg", "p2.jpg"):
        top = retrieve(str(photos / name), index_path=out, k=3)["queries"][0]["results"][0]
        assert top["item"] == name and top["score"] >= 0.99999
    assert ix.open_index(out).meta["decode"] == {"draft": [32, 32] if draft else None}


def test_draft_decoding_changes_the_rows_and_old_sidecars_are_read_as_their_embed_decoded(photos, nano_run, tmp_path):
    draft, full = str(tmp_path / "draft.npy"), str(tmp_path / "full.npy")
    embed(str(photos), draft, model=str(nano_run), workers=0, progress=False)
    embed(str(photos), full, model=str(nano_run), workers=0, draft=False, progress=False)
    across = np.sum(np.load(draft) * np.load(full), axis=1)
    assert across.max() < 0.99999  # the decode settings matter: the test above could fail
    # Sidecars written before the ``decode`` field: ``draft_decode``, or nothing (draft was the default).
    for path, legacy in ((draft, {}), (draft, {"draft_decode": True}), (full, {"draft_decode": False})):
        meta = json.loads(open(path + ".json").read())
        meta.pop("decode", None)
        meta.update(legacy)
        with open(path + ".json", "w") as f:
            json.dump(meta, f)
        top = retrieve(str(photos / "p1.jpg"), index_path=path, k=1)["queries"][0]["results"][0]
        assert top["item"] == "p1.jpg" and top["score"] >= 0.99999


def test_faiss_search_reaches_its_stated_recall(image_index, nano_run, tmp_path):
    # A flat FAISS index below FLAT_MAX_ROWS: the same neighbours as exact search.
    local = str(tmp_path / "emb.npy")
    shutil.copy(image_index, local)
    shutil.copy(image_index + ".json", local + ".json")
    texts = ["a red circle", "a green square", "a purple diamond above a blue triangle"]
    (tmp_path / "q.txt").write_text("\n".join(texts) + "\n")
    result = retrieve(None, index_path=local, k=10, queries_file=str(tmp_path / "q.txt"), use_faiss=True)
    assert result["search"]["method"] == "faiss flat" and os.path.exists(local + ".faiss")
    found = np.array([[h["row"] for h in q["results"]] for q in result["queries"]])
    exact = brute_force(local, text_embedding(nano_run, texts), 10)[1]
    assert ix.recall_at_k(found, exact) >= ann.RECALL_TARGET
    again = retrieve(texts[0], index_path=local, k=10, use_faiss=True)
    assert again["search"]["built"] is False  # reused, not rebuilt


def test_another_model_is_a_clear_error(image_index, tmp_path):
    other = save_random_run(tmp_path / "other", seed=1)
    with pytest.raises(MmcliError, match="differs from .* recorded in .*emb.npy.json"):
        retrieve("a red circle", index_path=image_index, model=str(other))


def test_a_wider_model_is_a_clear_error(image_index, tmp_path):
    wide = save_random_run(tmp_path / "tiny", arch="mmcli-tiny")
    meta = json.loads(open(image_index + ".json").read())
    meta["model"]["checksum"] = json.loads((wide / "mmcli.json").read_text())["checksum"]
    local = tmp_path / "emb.npy"
    shutil.copy(image_index, local)
    (tmp_path / "emb.npy.json").write_text(json.dumps(meta))
    with pytest.raises(MmcliError, match="embeds in 128 dimensions but .* has 32"):
        retrieve("a red circle", index_path=str(local), model=str(wide))


def test_grid_is_a_contact_sheet_of_the_top_k(image_index, tmp_path):
    out = tmp_path / "grid.png"
    result = retrieve("a red circle", index_path=image_index, k=7, grid=str(out))
    assert result["queries"][0]["grid"] == str(out)
    with Image.open(out) as sheet:
        assert sheet.size == sheet_size(7)


@pytest.fixture
def photo_index(photos, nano_run, tmp_path) -> str:
    (tmp_path / "index").mkdir()
    out = str(tmp_path / "index" / "emb.npy")
    embed(str(photos), out, model=str(nano_run), workers=0, progress=False)
    return out


def test_grid_never_replaces_an_index_or_run_folder_file(photo_index, nano_run, tmp_path):
    run = shutil.copytree(nano_run, tmp_path / "run")
    (run / "spec.yaml").write_text("model: {arch: mmcli-nano}\n")
    (tmp_path / "index" / "emb.npy.faiss").write_bytes(b"a FAISS index")
    protected = [
        photo_index,
        photo_index + ".json",
        photo_index + ".faiss",
        str(run / "mmcli.json"),
        str(run / "spec.yaml"),
    ]
    before = {path: open(path, "rb").read() for path in protected}
    for path in protected:
        for options in ({}, {"overwrite": True}):
            with pytest.raises(MmcliError, match=r"--grid .*: is a file of (an index|the run folder)"):
                retrieve("a red circle", index_path=photo_index, k=2, grid=path, **options)
    os.symlink(photo_index, tmp_path / "link.png")  # under another name, through a link
    with pytest.raises(MmcliError, match="is a file of an index"):
        retrieve("a red circle", index_path=photo_index, k=2, grid=str(tmp_path / "link.png"), overwrite=True)
    assert {path: open(path, "rb").read() for path in protected} == before
    assert len(ix.open_index(photo_index)) == 3


def test_grid_replaces_its_own_sheets_and_other_files_only_with_overwrite(photo_index, photos, tmp_path):
    mine = tmp_path / "mine.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(mine)
    with pytest.raises(MmcliError, match=r"--grid .*mine\.png: exists and is not a contact sheet mmcli wrote; pass"):
        retrieve("a red circle", index_path=photo_index, k=2, grid=str(mine))
    with Image.open(mine) as kept:
        assert kept.size == (8, 8)
    from mmcli.viz.grid import is_contact_sheet

    retrieve("a red circle", index_path=photo_index, k=2, grid=str(mine), overwrite=True)
    assert is_contact_sheet(mine)
    retrieve("a blue square", index_path=photo_index, k=3, grid=str(mine))  # a sheet of ours: replaced
    with Image.open(mine) as sheet:
        assert sheet.size == sheet_size(3)
    # Several queries write several sheets: every one is checked before any is written.
    (tmp_path / "q.txt").write_text("one\ntwo\n")
    (tmp_path / "many-002.png").write_bytes(b"someone else's")
    with pytest.raises(MmcliError, match="many-002.png: exists"):
        retrieve(None, index_path=photo_index, queries_file=str(tmp_path / "q.txt"), grid=str(tmp_path / "many.png"))
    assert not (tmp_path / "many-001.png").exists() and (tmp_path / "many-002.png").read_bytes() == b"someone else's"
    assert not is_contact_sheet(photos / "p0.jpg")


@pytest.mark.parametrize("item", ["../outside.jpg", "sub/../../outside.jpg", "/etc/hostname"])
def test_grid_refuses_sidecar_items_outside_the_index_root(photo_index, tmp_path, item):
    Image.new("RGB", (40, 40), (9, 9, 9)).save(tmp_path / "index" / ".." / "outside.jpg")
    meta = json.loads(open(photo_index + ".json").read())
    meta["items"] = [item if n == 0 else it for n, it in enumerate(meta["items"])]
    with open(photo_index + ".json", "w") as f:
        json.dump(meta, f)
    os.remove(photo_index + ".parquet")  # else its items, no longer the sidecar's, are refused first
    out = tmp_path / "grid.png"
    with pytest.raises(MmcliError, match=r"emb\.npy\.json: item .* is not a path inside the index root"):
        retrieve("a red circle", index_path=photo_index, k=3, grid=str(out))
    assert not out.exists()


def test_cli_refuses_to_overwrite_an_index_with_a_grid_in_one_line(photo_index):
    for overwrite in ([], ["--overwrite"]):
        r = subprocess.run(
            [sys.executable, "-m", "mmcli", "retrieve", "x", "--index", photo_index, "--grid", photo_index, *overwrite],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2
        assert r.stderr.strip().splitlines() == [
            f"mmcli: error: --grid {photo_index}: is a file of an index; choose another file name"
        ]
        assert len(ix.open_index(photo_index)) == 3


def test_faiss_builds_for_an_index_of_fewer_than_ten_rows(photo_index):
    # Too small to hold rows back for tuning: a flat index, no tuning queries.
    result = retrieve("a red circle", index_path=photo_index, k=3, use_faiss=True)
    assert result["search"]["method"] == "faiss flat" and os.path.exists(photo_index + ".faiss")
    exact = retrieve("a red circle", index_path=photo_index, k=3)
    assert [h["row"] for h in result["queries"][0]["results"]] == [h["row"] for h in exact["queries"][0]["results"]]


def test_text_query_imports_neither_open_clip_nor_torchvision(image_index):
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from mmcli.cli import app\n"
        f"r = CliRunner().invoke(app, ['retrieve', 'a red circle', '--index', {image_index!r}, '--k', '3', '--json'])\n"
        "heavy = [m for m in ('open_clip', 'torchvision', 'timm', 'faiss') if m in sys.modules]\n"
        "print(json.dumps({'code': r.exit_code, 'heavy': heavy, 'out': json.loads(r.stdout)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and result["heavy"] == []
    assert [h["rank"] for h in result["out"]["queries"][0]["results"]] == [1, 2, 3]


def test_cli_errors_are_one_line_exit_2(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "mmcli", "retrieve", "x", "--index", str(tmp_path / "none.npy")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"mmcli: error: index file not found: {tmp_path / 'none.npy'}"]


def test_a_query_that_names_a_missing_image_is_an_error_not_a_text(tmp_path):
    from mmcli.retrieval.query import is_image_query

    photo = tmp_path / "cat.JPG"
    photo.write_bytes(b"")
    assert is_image_query(str(photo))
    assert not is_image_query("a photo of cat.jpg") and not is_image_query("a red circle")
    for query in ("cat.jpg", str(tmp_path / "cta.jpg"), "my photos/cat.png"):
        with pytest.raises(MmcliError) as err:
            is_image_query(query)
        name = query.rsplit("/", 1)[-1]
        assert str(err.value) == (
            f"{query}: no such image file (a query ending in an image suffix is read as a path; "
            f"words around it, e.g. 'a photo of {name}', make it a text)"
        )
