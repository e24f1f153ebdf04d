"""mmcli serve's REST API (FastAPI's TestClient, in process): results equal retrieve's, an indexed
image and "more like this" find their own row, clip-retrieval's payloads, and the safety rules —
only rows of a served index are read, tokens, upload limits, every refusal a one-line 4xx JSON."""

from __future__ import annotations

import base64
import io
import os
import shutil
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mmcli.commands.embed import run as embed
from mmcli.commands.retrieve import run as retrieve
from mmcli.retrieval import index as ix
from mmcli.serving import service as svc
from mmcli.serving.app import create_app
from mmcli.serving.service import MicroBatcher, SearchService, batched_search, batched_texts


@pytest.fixture(scope="module")
def photos(shapes_dir, tmp_path_factory):
    """24 images with .txt captions, one link to an image outside the folder, one file that is not an image."""
    base = tmp_path_factory.mktemp("serve")
    folder = base / "photos"
    folder.mkdir()
    for n, src in enumerate(sorted((shapes_dir / "images" / "train").iterdir())[:24]):
        shutil.copy(src, folder / f"{n:02d}.png")
        (folder / f"{n:02d}.txt").write_text(f"picture number {n}")
    outside = base / "outside.png"
    shutil.copy(sorted((shapes_dir / "images" / "val").iterdir())[0], outside)
    os.symlink(outside, folder / "zz-link.png")
    return folder


@pytest.fixture(scope="module")
def index_path(photos, nano_run):
    out = str(photos.parent / "emb.npy")
    embed(str(photos), out, model=str(nano_run), workers=0, progress=False)
    return out


@pytest.fixture(scope="module")
def service(index_path):
    served = SearchService.open({"photos": index_path}, device="cpu")
    yield served
    served.close()


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service), raise_server_exceptions=False)


def row_of(index_path, item) -> int:
    return ix.open_index(index_path).items.index(item)


def test_text_search_equals_retrieve(client, index_path):
    got = client.post("/api/search", json={"index": "photos", "text": "a red circle", "k": 6}).json()
    want = retrieve("a red circle", index_path=index_path, k=6)["queries"][0]["results"]
    assert [h["row"] for h in got["results"]] == [h["row"] for h in want]
    np.testing.assert_allclose([h["score"] for h in got["results"]], [h["score"] for h in want], atol=1e-5)
    hit = got["results"][0]
    assert hit["path"] == os.path.join(ix.open_index(index_path).meta["root"], hit["item"])
    assert hit["caption"] == f"picture number {int(hit['item'][:2])}"
    assert hit["thumbnail"] == f"/api/thumbnail/photos/{hit['row']}" and got["count"] == 25


def test_more_like_this_and_an_uploaded_image_find_their_own_row_first(client, photos, index_path):
    row = row_of(index_path, "05.png")
    more = client.post("/api/search", json={"row": row, "k": 3}).json()["results"]
    assert more[0]["row"] == row and more[0]["score"] == pytest.approx(1.0, abs=1e-5)
    with open(photos / "05.png", "rb") as f:
        up = client.post("/api/search/image", files={"file": ("05.png", f, "image/png")}, data={"k": "3"}).json()
    assert up["results"][0]["row"] == row and up["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert up["query"] == {"image": "05.png"}


def test_batch_answers_each_query_as_alone(client):
    queries = [{"text": "a red circle"}, {"row": 3}, {"text": "a blue square"}]
    batch = client.post("/api/search/batch", json={"queries": queries, "k": 4}).json()["answers"]
    for query, answer in zip(queries, batch):
        alone = client.post("/api/search", json={**query, "k": 4}).json()
        assert [h["row"] for h in answer["results"]] == [h["row"] for h in alone["results"]]


def test_threshold_drops_hits_below_it(client):
    every = client.post("/api/search", json={"text": "a red circle", "k": 10}).json()["results"]
    cut = every[4]["score"]
    kept = client.post("/api/search", json={"text": "a red circle", "k": 10, "threshold": cut}).json()["results"]
    assert [h["row"] for h in kept] == [h["row"] for h in every if h["score"] >= cut]


def test_thumbnails_and_images_are_the_rows_files(client, photos, index_path):
    row = row_of(index_path, "07.png")
    image = client.get(f"/api/image/photos/{row}")
    assert image.status_code == 200 and image.content == (photos / "07.png").read_bytes()
    thumb = client.get(f"/api/thumbnail/photos/{row}?size=16")
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 16
    small = client.get(f"/api/thumbnail/photos/{row}")  # a 32-px image is its own thumbnail, lossless
    assert small.headers["content-type"] == "image/png"
    original = np.asarray(Image.open(photos / "07.png").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(small.content))), original)


def test_only_files_inside_the_index_folder_are_ever_read(client, index_path):
    link = row_of(index_path, "zz-link.png")  # an indexed row whose file is a link leading outside
    assert client.get(f"/api/image/photos/{link}").status_code == 404
    assert client.get(f"/api/thumbnail/photos/{link}").status_code == 404
    for url in (
        "/api/image/photos/..%2F..%2Fetc%2Fpasswd",
        "/api/image/photos/../../etc/passwd",
        "/api/image/photos//etc/passwd",
        "/api/image/photos/-1",
        "/api/image/photos/25",
        "/api/image/other/0",
    ):
        response = client.get(url)
        assert 400 <= response.status_code < 500, url
        assert "root:" not in response.text


def test_an_edited_sidecar_cannot_point_the_server_at_other_files(photos, nano_run, tmp_path):
    out = str(tmp_path / "emb.npy")
    embed(str(photos), out, model=str(nano_run), workers=0, progress=False)
    import json

    side = json.loads(open(out + ".json").read())
    side["items"][0], side["items"][1] = "/etc/passwd", "../../../etc/passwd"
    open(out + ".json", "w").write(json.dumps(side))
    os.remove(out + ".parquet")
    service = SearchService.open({"x": out}, device="cpu", warm=False)
    client = TestClient(create_app(service), raise_server_exceptions=False)
    for row in (0, 1):
        response = client.get(f"/api/image/x/{row}")
        assert response.status_code in (400, 404) and "root:" not in response.text
    service.close()


def test_refusals_are_one_line_json_4xx(client, monkeypatch):
    cases = [
        (client.post("/api/search", json={"text": "a", "row": 1}), 422, "exactly one of text, row, vector"),
        (client.post("/api/search", json={"text": "a", "k": 0}), 422, "k:"),
        (client.post("/api/search", json={"text": "a", "index": "nope"}), 404, "no index named 'nope'"),
        (client.post("/api/search", json={"row": 99}), 404, "rows 0 to 24"),
        (client.post("/api/search", json={"vector": [1.0, 2.0]}), 400, "expected 32 numbers"),
        (client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"}), 422, ""),
        (client.post("/api/search/image", files={"file": ("x.png", b"not an image", "image/png")}), 400, "x.png"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, response.text
        detail = response.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and words in detail
    monkeypatch.setattr(svc, "MAX_UPLOAD_BYTES", 100)
    big = client.post("/api/search/image", files={"file": ("big.png", b"x" * 1000, "image/png")})
    assert big.status_code == 413


def test_an_unexpected_error_is_a_500_without_a_traceback(client, service, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(service, "hits", broken)
    response = client.post("/api/search", json={"text": "a red circle"})
    assert response.status_code == 500 and "secret" not in response.text and "Traceback" not in response.text


def test_a_token_guards_every_data_endpoint(service):
    client = TestClient(create_app(service, token="s3cret"), raise_server_exceptions=False)
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    for method, url, body in [
        ("get", "/api/indexes", None),
        ("post", "/api/search", {"text": "a"}),
        ("get", "/api/image/photos/0", None),
        ("get", "/indices-list", None),
        ("post", "/knn-service", {"text": "a"}),
    ]:
        refused = getattr(client, method)(url, **({"json": body} if body else {}))
        assert refused.status_code == 401, url
        wrong = getattr(client, method)(
            url, headers={"Authorization": "Bearer nope"}, **({"json": body} if body else {})
        )
        assert wrong.status_code == 401, url
        ok = getattr(client, method)(
            url, headers={"Authorization": "Bearer s3cret"}, **({"json": body} if body else {})
        )
        assert ok.status_code == 200, url
    assert client.get("/api/thumbnail/photos/0?token=s3cret").status_code == 200


def test_clip_retrieval_payloads(client, photos, index_path):
    assert client.get("/indices-list").json() == ["photos"]
    # ClipClient's request, as it sends it: JSON text without a content type
    body = {
        "text": "a red circle",
        "image": None,
        "image_url": None,
        "embedding_input": None,
        "deduplicate": False,
        "use_safety_model": True,
        "use_violence_detector": True,
        "indice_name": "photos",
        "use_mclip": False,
        "aesthetic_score": 9,
        "aesthetic_weight": 0.5,
        "modality": "image",
        "num_images": 5,
        "num_result_ids": 5,
    }
    import json

    hits = client.post("/knn-service", content=json.dumps(body)).json()
    ours = client.post("/api/search", json={"text": "a red circle", "k": 5}).json()["results"]
    assert [h["id"] for h in hits] == [h["row"] for h in ours]
    assert [h["similarity"] for h in hits] == [h["score"] for h in ours]
    assert hits[0]["caption"] == ours[0]["caption"] and hits[0]["url"].endswith(f"/api/image/photos/{hits[0]['id']}")
    image = base64.b64encode((photos / "03.png").read_bytes()).decode()
    by_image = client.post("/knn-service", content=json.dumps({**body, "text": None, "image": image})).json()
    assert by_image[0]["id"] == row_of(index_path, "03.png")
    vector = ix.open_index(index_path).embeddings[4].tolist()
    by_vector = client.post("/knn-service", content=json.dumps({**body, "text": None, "embedding_input": vector}))
    assert by_vector.json()[0]["id"] == 4
    url = client.post("/knn-service", content=json.dumps({**body, "text": None, "image_url": "http://x/y.png"}))
    assert url.status_code == 400 and "fetches nothing" in url.json()["detail"]
    wrong = client.post("/knn-service", content=json.dumps({**body, "modality": "text"}))
    assert wrong.status_code == 400 and "holds image embeddings" in wrong.json()["detail"]
    meta = client.post("/metadata", content=json.dumps({"ids": [2, 0], "indice_name": "photos"})).json()
    assert [m["id"] for m in meta] == [2, 0] and meta[0]["metadata"]["caption"] == "picture number 2"


def test_deduplicate_drops_hits_nearly_equal_to_a_better_one(client, photos, index_path):
    import json

    body = {"text": "a red circle", "modality": "image", "num_images": 25, "indice_name": "photos"}
    every = client.post("/knn-service", content=json.dumps(body)).json()
    kept = client.post("/knn-service", content=json.dumps({**body, "deduplicate": True})).json()
    emb = ix.open_index(index_path).embeddings
    expected = []
    for hit in every:  # NumPy reference of the same rule
        if all(float(emb[hit["id"]] @ emb[k]) < svc.DEDUPLICATE_COSINE for k in expected):
            expected.append(hit["id"])
    assert [h["id"] for h in kept] == expected and len(expected) < len(every)


def test_the_batcher_answers_concurrent_queries_as_single_searches():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(500, 8)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    sizes = []

    def search(q, k):
        sizes.append(len(q))
        return ix.search_exact(rows, q, k)

    batcher = MicroBatcher(batched_search(search), rows=lambda payload: len(payload[0]))
    queries = rows[rng.integers(0, 500, 40)] + 0.1
    results = [None] * 40
    threads = [
        threading.Thread(target=lambda n=n: results.__setitem__(n, batcher((queries[n : n + 1], 1 + n % 7))))
        for n in range(40)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    for n in range(40):
        scores, ids = ix.search_exact(rows, queries[n : n + 1], 1 + n % 7)
        np.testing.assert_array_equal(results[n][1], ids)
        np.testing.assert_allclose(results[n][0], scores, atol=1e-6)
    assert sum(sizes) == 40


def test_texts_encoded_together_equal_texts_encoded_alone(service):
    served = service.get(None)
    texts = ["a red circle", "a blue square left of a green triangle", "a yellow diamond"]
    together = batched_texts(lambda t: served.encoder.encode([(x, False) for x in t]))([texts[:1], texts[1:]])
    alone = [served.encoder.encode([(t, False)]) for t in texts]
    np.testing.assert_allclose(np.concatenate(together), np.concatenate(alone), atol=1e-5)
    assert [len(rows) for rows in together] == [1, 2]


def test_an_error_reaches_every_caller_of_its_batch_and_the_batcher_lives_on():
    calls = []

    def process(payloads):
        calls.append(payloads)
        if "bad" in payloads:
            raise ValueError("bad payload")
        return [p.upper() for p in payloads]

    batcher = MicroBatcher(process)
    with pytest.raises(ValueError, match="bad payload"):
        batcher("bad")
    assert batcher("ok") == "OK"
    batcher.close()


def test_a_caller_that_gave_up_does_not_stop_the_batcher():
    import time

    batcher = MicroBatcher(lambda payloads: (time.sleep(0.2), payloads)[1], rows=lambda p: 1)
    first = batcher.submit("slow")  # being processed
    time.sleep(0.05)
    abandoned = batcher.submit("abandoned")  # queued behind it, then cancelled (a client went away)
    assert abandoned.cancel()
    assert first.result(timeout=5) == "slow" and batcher("next") == "next"
    batcher.close()


def test_a_rebound_host_and_another_sites_page_are_refused(service):
    app = create_app(service, allowed_hosts=["127.0.0.1", "localhost", "::1"])
    client = TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False)
    assert client.get("/api/indexes").status_code == 200
    assert client.get("http://localhost:8000/api/indexes").status_code == 200
    assert client.get("http://[::1]:8000/api/indexes").status_code == 200
    rebound = client.get("/api/image/photos/0", headers={"Host": "attacker.example:8000"})
    assert rebound.status_code == 400 and "not a name of this server" in rebound.json()["detail"]
    same_site = client.post("/api/search", json={"text": "a"}, headers={"Origin": "http://127.0.0.1:8000"})
    assert same_site.status_code == 200
    other_site = client.post("/knn-service", content=b'{"text": "a"}', headers={"Origin": "http://evil.example"})
    assert other_site.status_code == 403


def test_a_body_without_a_length_is_cut_at_the_limit_and_the_token_comes_first(service, monkeypatch):
    from mmcli.serving import app as app_module

    monkeypatch.setattr(app_module, "MAX_BODY_BYTES", 10_000)
    client = TestClient(create_app(service), raise_server_exceptions=False)

    def chunks(total: int):
        yield b'{"text": "'
        for _ in range(total // 1000):
            yield b"a" * 1000
        yield b'"}'

    cut = client.post("/api/search", content=chunks(50_000), headers={"content-type": "application/json"})
    assert cut.status_code == 413 and "limited" in cut.json()["detail"]
    assert client.post("/api/search", content=chunks(2_000), headers={"content-type": "application/json"}).is_success
    read: list[int] = []

    def counted(total: int):
        for chunk in chunks(total):
            read.append(len(chunk))
            yield chunk

    guarded = TestClient(create_app(service, token="s3cret"), raise_server_exceptions=False)
    refused = guarded.post("/api/search", content=counted(50_000), headers={"content-type": "application/json"})
    assert refused.status_code == 401 and sum(read) < 50_000  # refused before the body was read


def test_knn_deduplicates_num_result_ids_candidates_then_keeps_num_images(client):
    import json

    body = {"text": "a red circle", "modality": "image", "indice_name": "photos"}
    every = client.post("/knn-service", content=json.dumps({**body, "num_images": 25})).json()
    deduplicated = client.post("/knn-service", content=json.dumps({**body, "num_images": 25, "deduplicate": True}))
    kept = [h["id"] for h in deduplicated.json()]
    five = client.post(
        "/knn-service", content=json.dumps({**body, "num_images": 5, "num_result_ids": 25, "deduplicate": True})
    ).json()
    assert [h["id"] for h in five] == kept[:5] and len(every) == 25
