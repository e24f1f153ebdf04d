"""clip-retrieval's own ClipClient against a running ``mmcli serve`` (uvicorn on a local port).

clip-retrieval's package imports Flask, torch-side tools and more at its top level; its client
module needs only ``requests``, so it is loaded from the installed package's folder by itself
(``.ci/run`` installs the package with ``--no-deps``). Without the package the test is skipped and
says so; ``tests/serving/test_app.py`` checks the same payloads without it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from mmcli.commands.embed import run as embed
from mmcli.retrieval import index as ix
from tests.serving.conftest import serving


def load_clip_client():
    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-retrieval is not installed (pip install --no-deps clip-retrieval): ClipClient not run")
    pytest.importorskip("requests", reason="ClipClient needs requests")
    path = Path(spec.submodule_search_locations[0]) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(shapes_dir, nano_run, tmp_path_factory):
    from mmcli.serving.app import create_app
    from mmcli.serving.service import SearchService

    out = str(tmp_path_factory.mktemp("clip-client") / "emb.npy")
    embed(str(shapes_dir / "val.jsonl"), out, model=str(nano_run), workers=0, progress=False)
    service = SearchService.open({"shapes": out}, device="cpu")
    with serving(create_app(service)) as url:
        yield url, out
    service.close()


def test_clip_client_queries_mmcli_serve_unchanged(server, shapes_dir, monkeypatch):
    clip_client = load_clip_client()
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    url, index_path = server
    index = ix.open_index(index_path)
    client = clip_client.ClipClient(url=url + "/knn-service", indice_name="shapes", num_images=5, deduplicate=False)
    hits = client.query(text="a red circle")
    from mmcli.commands.retrieve import run as retrieve

    want = retrieve("a red circle", index_path=index_path, k=5)["queries"][0]["results"]
    assert [h["id"] for h in hits] == [h["row"] for h in want]
    assert [h["similarity"] for h in hits] == pytest.approx([h["score"] for h in want], abs=1e-5)
    captions = dict(zip(index.items, index.metadata.column("caption")))
    assert [h["caption"] for h in hits] == [captions[index.items[h["id"]]] for h in hits]
    assert all(h["url"].startswith(url + "/api/image/shapes/") for h in hits)
    own = index.items[0]
    by_image = client.query(image=os.path.join(index.meta["root"], own))
    assert by_image[0]["id"] == 0 and by_image[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    by_vector = client.query(embedding_input=index.embeddings[3].tolist())
    assert by_vector[0]["id"] == 3
