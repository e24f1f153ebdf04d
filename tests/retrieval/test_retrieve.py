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
    (tmp_path / "q.txt").write_text("\n".join(texts[1:]) + "\n")
    result = retrieve(texts[0], index_path=image_index, k=7, queries_file=str(tmp_path / "q.txt"))
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
