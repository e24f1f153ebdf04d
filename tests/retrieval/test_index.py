"""Tests for mmcli.retrieval.index: writing, resuming, reading, exact and FAISS search."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mmcli.errors import MmcliError
from mmcli.retrieval import faiss_index as ann
from mmcli.retrieval import index as ix
from mmcli.retrieval import index_plan

META = {
    "model": {"ref": "runs/shapes", "arch": "mmcli-tiny", "checksum": "sha256:abc"},
    "modality": "image",
    "root": "/data/images",
}


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def clustered_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Points around 20 fixed centres, like real embeddings (uniform ones have no neighbours)."""
    centres = np.random.default_rng(1234).standard_normal((20, dim))
    rng = np.random.default_rng(seed)
    rows = centres[rng.integers(20, size=n)] + 0.5 * rng.standard_normal((n, dim))
    rows = rows.astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def write_index(path, rows, *, dtype="float32", meta=META, **kwargs) -> str:
    writer = ix.IndexWriter(str(path), dim=rows.shape[1], dtype=dtype, capacity=len(rows), meta=meta, **kwargs)
    writer.add(rows, [f"img/{i}.jpg" for i in range(len(rows))])
    return writer.finish()


def brute_force(rows: np.ndarray, queries: np.ndarray, k: int):
    """Reference top-k: full score matrix, stable sort (lower id first among ties)."""
    scores = queries.astype(np.float32) @ rows.astype(np.float32).T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


# --------------------------------------------------------------------------------------------
# writing and reading
# --------------------------------------------------------------------------------------------


def test_round_trip_keeps_rows_items_and_sidecar_fields(tmp_path):
    rows = unit_rows(5, 8)
    writer = ix.IndexWriter(str(tmp_path / "emb.npy"), dim=8, capacity=5, meta=META)
    writer.add(rows[:3], ["a.jpg", "b/a.jpg", "c.jpg"])
    writer.skip("broken.jpg", "cannot identify image file")
    writer.add(rows[3:], ["d.jpg", "e.jpg"])
    writer.finish()

    index = ix.open_index(tmp_path / "emb.npy")
    assert len(index) == 5 and index.dim == 8
    np.testing.assert_array_equal(index.embeddings, rows)
    assert not index.embeddings.flags.writeable
    assert index.items == ["a.jpg", "b/a.jpg", "c.jpg", "d.jpg", "e.jpg"]
    meta = index.meta
    assert (meta["format"], meta["version"], meta["modality"], meta["dim"], meta["dtype"], meta["count"]) == (
        "mmcli-index",
        1,
        "image",
        8,
        "float32",
        5,
    )
    assert meta["model"] == META["model"] and meta["root"] == "/data/images" and meta["complete"] is True
    assert meta["skipped"] == [{"item": "broken.jpg", "reason": "cannot identify image file"}]
    assert set(meta["created"]) == {"time", "mmcli", "host"}
    assert sorted(os.listdir(tmp_path)) == ["emb.npy", "emb.npy.json"]


def test_finish_truncates_to_rows_written(tmp_path):
    rows = unit_rows(7, 8)
    writer = ix.IndexWriter(str(tmp_path / "emb.npy"), dim=8, capacity=10, meta=META)
    writer.add(rows, [str(i) for i in range(7)])
    writer.finish()
    # numpy's version-1.0 header is 128 bytes for this shape; then 7 rows × 8 float32.
    assert os.path.getsize(tmp_path / "emb.npy") == 128 + 7 * 8 * 4
    np.testing.assert_array_equal(ix.open_index(tmp_path / "emb.npy").embeddings, rows)


def test_writer_grows_past_its_capacity(tmp_path):
    rows = unit_rows(9, 4)
    writer = ix.IndexWriter(str(tmp_path / "emb.npy"), dim=4, capacity=2, meta=META)
    for start in range(0, 9, 3):
        writer.add(rows[start : start + 3], [str(i) for i in range(start, start + 3)])
    writer.finish()
    np.testing.assert_array_equal(ix.open_index(tmp_path / "emb.npy").embeddings, rows)


def test_empty_index_opens_and_searches(tmp_path):
    ix.IndexWriter(str(tmp_path / "emb.npy"), dim=4, capacity=0, meta=META).finish()
    index = ix.open_index(tmp_path / "emb.npy")
    scores, ids = ix.search_exact(index, unit_rows(2, 4), 5)
    assert len(index) == 0 and scores.shape == (2, 0) and ids.shape == (2, 0)


def test_add_rejects_rows_that_are_not_unit_length_or_not_matching(tmp_path):
    writer = ix.IndexWriter(str(tmp_path / "emb.npy"), dim=4, capacity=2, meta=META)
    with pytest.raises(ValueError, match="normalised"):
        writer.add(2 * unit_rows(2, 4), ["a", "b"])
    with pytest.raises(ValueError, match="rows"):
        writer.add(unit_rows(2, 4), ["only one item"])


def test_interrupted_run_is_incomplete_then_resumes(tmp_path):
    path, rows = str(tmp_path / "emb.npy"), unit_rows(6, 4)
    items = [f"{i}.jpg" for i in range(6)]
    first = ix.IndexWriter(path, dim=4, capacity=6, meta=META, flush_seconds=0)
    first.add(rows[:4], items[:4])
    first.skip("x.jpg", "truncated")
    del first  # the process dies here

    assert not os.path.exists(path)
    with pytest.raises(MmcliError, match="incomplete"):
        ix.open_index(path)
    state = ix.IndexWriter.resume_state(path)
    assert (state.rows, state.items, state.skipped) == (4, items[:4], [{"item": "x.jpg", "reason": "truncated"}])

    second = ix.IndexWriter(path, dim=4, capacity=6, meta=META)
    assert second.rows_done == 4
    second.add(rows[4:], items[4:])
    second.finish()
    index = ix.open_index(path)
    np.testing.assert_array_equal(index.embeddings, rows)
    assert index.items == items and len(index.meta["skipped"]) == 1
    assert ix.IndexWriter.resume_state(path) is None


def test_rows_not_yet_flushed_are_not_claimed(tmp_path):
    path = str(tmp_path / "emb.npy")
    writer = ix.IndexWriter(path, dim=4, capacity=4, meta=META, flush_seconds=1e9)
    writer.add(unit_rows(2, 4), ["a", "b"])
    assert ix.IndexWriter.resume_state(path) is None
    writer.flush()
    assert ix.IndexWriter.resume_state(path).rows == 2


def test_resume_with_another_model_is_refused(tmp_path):
    path = str(tmp_path / "emb.npy")
    ix.IndexWriter(path, dim=4, capacity=4, meta=META, flush_seconds=0).add(unit_rows(1, 4), ["a"])
    other = {**META, "model": {**META["model"], "checksum": "sha256:def"}}
    with pytest.raises(MmcliError, match=r"another job \(model: .*--overwrite"):
        ix.IndexWriter(path, dim=4, capacity=4, meta=other)
    fresh = ix.IndexWriter(path, dim=4, capacity=4, meta=other, overwrite=True)
    assert fresh.rows_done == 0


def test_existing_index_needs_overwrite(tmp_path):
    path = write_index(tmp_path / "emb.npy", unit_rows(3, 4))
    with pytest.raises(MmcliError, match=r"emb\.npy already exists; pass --update .* or --overwrite"):
        ix.IndexWriter(path, dim=4, capacity=3, meta=META)
    replacement = unit_rows(2, 4, seed=1)
    write_index(path, replacement, overwrite=True)
    np.testing.assert_array_equal(ix.open_index(path).embeddings, replacement)


def test_context_manager_finishes_on_success_and_keeps_progress_on_error(tmp_path):
    ok, failed = str(tmp_path / "ok.npy"), str(tmp_path / "failed.npy")
    with ix.IndexWriter(ok, dim=4, capacity=1, meta=META) as writer:
        writer.add(unit_rows(1, 4), ["a"])
    assert len(ix.open_index(ok)) == 1
    with pytest.raises(KeyboardInterrupt):
        with ix.IndexWriter(failed, dim=4, capacity=2, meta=META, flush_seconds=1e9) as writer:
            writer.add(unit_rows(1, 4), ["a"])
            raise KeyboardInterrupt
    assert not os.path.exists(failed) and ix.IndexWriter.resume_state(failed).rows == 1


def test_a_second_writer_is_refused_naming_the_file_and_the_holder(tmp_path):
    path = str(tmp_path / "emb.npy")
    first = ix.IndexWriter(path, dim=4, capacity=2, meta=META, flush_seconds=0)
    first.add(unit_rows(1, 4), ["a.jpg"])
    with pytest.raises(MmcliError) as refused:
        ix.IndexWriter(path, dim=4, capacity=2, meta=META, overwrite=True)
    message = str(refused.value)
    assert f"{path} is being written by another process (pid {os.getpid()}, lock {path}.lock)" in message
    assert "\n" not in message
    assert ix.IndexWriter.resume_state(path).items == ["a.jpg"]  # the refused writer discarded nothing
    first.add(unit_rows(1, 4, seed=1), ["b.jpg"])
    first.finish()
    assert ix.open_index(path).items == ["a.jpg", "b.jpg"] and not os.path.exists(path + ".lock")
    write_index(path, unit_rows(2, 4), overwrite=True)  # free again once finished


def test_the_lock_of_a_killed_writer_does_not_block(tmp_path):
    # flock belongs to the open file; the kernel closes it when its process dies, however it dies.
    path = str(tmp_path / "emb.npy")
    code = (
        "import sys, time\n"
        "from mmcli.retrieval import index as ix\n"
        f"w = ix.IndexWriter({path!r}, dim=4, capacity=4, meta={META!r}, flush_seconds=0)\n"
        "w.add(__import__('numpy').eye(4, dtype='float32')[:1], ['held.jpg'])\n"
        "print('locked', flush=True)\n"
        "time.sleep(300)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(MmcliError, match=rf"emb\.npy is being written by another process \(pid {holder.pid},"):
            ix.IndexWriter(path, dim=4, capacity=4, meta=META)
    finally:
        holder.kill()
        holder.wait()
    assert open(path + ".lock").read().strip() == str(holder.pid)  # its file stays, naming the dead holder
    writer = ix.IndexWriter(path, dim=4, capacity=4, meta=META)
    assert writer.rows_done == 1 and writer.items == ["held.jpg"]  # resumes what the dead writer saved
    assert open(path + ".lock").read().strip() == str(os.getpid())
    writer.add(unit_rows(1, 4), ["next.jpg"])
    writer.finish()
    assert ix.open_index(path).items == ["held.jpg", "next.jpg"]


def test_resume_of_another_job_is_refused_and_keeps_the_partial_rows(tmp_path):
    path = str(tmp_path / "emb.npy")
    job = {"input": "/data/x", "format": "folder", "keys": None, "decode": {"draft": [32, 32]}, "model": "sha256:abc"}
    first = ix.IndexWriter(path, dim=4, capacity=4, meta=META, job=job, flush_seconds=0)
    first.add(unit_rows(2, 4), ["a.jpg", "b.jpg"])
    del first  # the process dies here
    partial = open(path + ".partial", "rb").read()
    for key, value in (("input", "/data/y"), ("decode", {"draft": None}), ("model", "sha256:def")):
        with pytest.raises(MmcliError) as refused:
            ix.IndexWriter(path, dim=4, capacity=4, meta=META, job={**job, key: value})
        assert str(refused.value) == (
            f"{path}.partial holds 2 rows of another job ({key}: {job[key]} there, {value} now); "
            "rerun with --overwrite to discard them and start over, or choose another --out"
        )
    with pytest.raises(MmcliError, match=r"another job \(dtype: float32 there, float16 now\)"):
        ix.IndexWriter(path, dim=4, dtype="float16", capacity=4, meta=META, job=job)
    assert open(path + ".partial", "rb").read() == partial and ix.IndexWriter.resume_state(path).rows == 2
    assert ix.IndexWriter(path, dim=4, capacity=4, meta=META, job=dict(job)).rows_done == 2  # the same job resumes


def test_a_partial_file_without_a_job_resumes_only_the_same_root(tmp_path):
    # Progress files of earlier versions recorded no job, but recorded the input's root.
    path = str(tmp_path / "emb.npy")
    ix.IndexWriter(path, dim=4, capacity=4, meta=META, flush_seconds=0).add(unit_rows(1, 4), ["a.jpg"])
    with pytest.raises(MmcliError, match=r"another job \(root: /data/images there, /data/other now\)"):
        ix.IndexWriter(path, dim=4, capacity=4, meta={**META, "root": "/data/other"}, job={"input": "/data/other"})
    assert ix.IndexWriter(path, dim=4, capacity=4, meta=META, job={"input": "/data/images"}).rows_done == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rows_with_nan_or_infinity_are_refused_naming_the_item(tmp_path, bad):
    path = str(tmp_path / "emb.npy")
    rows = unit_rows(3, 4)
    rows[1, 2] = bad
    with pytest.raises(MmcliError) as refused:
        with ix.IndexWriter(path, dim=4, capacity=4, meta=META, flush_seconds=1e9) as writer:
            writer.add(unit_rows(1, 4, seed=1), ["ok.jpg"])
            writer.add(rows, ["a.jpg", "b.jpg", "c.jpg"])
    assert str(refused.value).startswith(f"{path}: the embedding of 'b.jpg' holds NaN or infinity;")
    state = ix.IndexWriter.resume_state(path)  # the rows before the bad batch are kept, none of it
    assert (state.rows, state.items) == (1, ["ok.jpg"])
    assert np.isfinite(np.load(path + ".partial")[:1]).all()


def test_item_paths_stay_inside_the_root(tmp_path):
    path = write_index(tmp_path / "emb.npy", unit_rows(2, 4))
    index = ix.open_index(path)
    assert index.item_path("img/1.jpg") == "/data/images/img/1.jpg"
    assert index.item_path("a..b/./c.jpg") == "/data/images/a..b/c.jpg"
    for item in ("/etc/passwd", "../secret.jpg", "img/../../secret.jpg", "", "//host/x.jpg"):
        with pytest.raises(MmcliError, match=r"emb\.npy\.json: item .* is not a path inside the index root"):
            index.item_path(item)
    rootless = ix.Index(path, index.embeddings, {**index.meta, "root": None}, index.files)
    with pytest.raises(MmcliError, match="field 'root' is None"):
        rootless.item_path("img/1.jpg")


def test_index_files_are_recognised_by_name_and_neighbours(tmp_path):
    path = write_index(tmp_path / "emb.npy", unit_rows(2, 4))
    for name in (path, path + ".json", path + ".partial", path + ".lock", path + ".faiss", "x.npy.partial.json"):
        assert ix.is_index_file(name)
    (tmp_path / "plain.npy").write_bytes(b"")
    assert not ix.is_index_file(tmp_path / "plain.npy") and not ix.is_index_file(tmp_path / "sheet.png")


def _break_sidecar(path, change):
    with open(path + ".json") as f:
        meta = json.load(f)
    change(meta)
    with open(path + ".json", "w") as f:
        json.dump(meta, f)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: os.remove(p), r"index file not found: .*emb\.npy"),
        (lambda p: os.remove(p + ".json"), r"sidecar not found: .*emb\.npy\.json"),
        (lambda p: open(p + ".json", "w").write("{not json"), r"emb\.npy\.json is not valid JSON"),
        (lambda p: _break_sidecar(p, lambda m: m.update(format="other")), r"emb\.npy\.json is not an mmcli index"),
        (lambda p: _break_sidecar(p, lambda m: m.update(count=4)), r"emb\.npy: sidecar says count=4 but the array has"),
        (lambda p: _break_sidecar(p, lambda m: m.update(dim=5)), r"emb\.npy: sidecar says dim=5 but the array has 4"),
        (lambda p: _break_sidecar(p, lambda m: m.pop("model")), r"emb\.npy\.json: field 'model' is missing"),
        (lambda p: _break_sidecar(p, lambda m: m.update(complete=False)), r"emb\.npy\.json: index is incomplete"),
    ],
)
def test_open_errors_name_the_file(tmp_path, damage, message):
    path = write_index(tmp_path / "emb.npy", unit_rows(3, 4))
    damage(path)
    with pytest.raises(MmcliError, match=message):
        ix.open_index(path)


# --------------------------------------------------------------------------------------------
# shards
# --------------------------------------------------------------------------------------------


def test_shard_names():
    assert ix.shard_path("out/emb.npy", 1, 4) == "out/emb.rank00001-of-00004.npy"


def test_shards_read_as_one_index_in_rank_order(tmp_path):
    base, rows = str(tmp_path / "emb.npy"), unit_rows(10, 4)
    for rank, (start, stop) in enumerate([(0, 6), (6, 10)]):
        writer = ix.IndexWriter(ix.shard_path(base, rank, 2), dim=4, capacity=stop - start, meta=META)
        writer.add(rows[start:stop], [f"{i}.jpg" for i in range(start, stop)])
        writer.finish()

    index = ix.open_index(base)
    assert len(index) == 10 and index.items == [f"{i}.jpg" for i in range(10)]
    assert index.meta["shards"] == ["emb.rank00000-of-00002.npy", "emb.rank00001-of-00002.npy"]
    np.testing.assert_array_equal(np.asarray(index.embeddings), rows)
    np.testing.assert_array_equal(index.embeddings[4:8], rows[4:8])
    np.testing.assert_array_equal(index.embeddings[[9, 0, 5]], rows[[9, 0, 5]])
    np.testing.assert_array_equal(index.embeddings[-1], rows[-1])
    queries = unit_rows(3, 4, seed=5)
    _, ids = ix.search_exact(index, queries, 4, chunk_rows=3)
    np.testing.assert_array_equal(ids, brute_force(rows, queries, 4)[1])


def test_missing_or_mixed_shards_are_errors(tmp_path):
    base = str(tmp_path / "emb.npy")
    write_index(ix.shard_path(base, 1, 2), unit_rows(2, 4))
    with pytest.raises(MmcliError, match=r"not found: .*emb\.rank00000-of-00002\.npy"):
        ix.open_index(base)
    write_index(ix.shard_path(base, 0, 2), unit_rows(2, 4))
    write_index(base, unit_rows(2, 4), overwrite=True)  # a single-process run replaces the shard set
    assert len(ix.open_index(base)) == 2 and not os.path.exists(ix.shard_path(base, 0, 2))
    with pytest.raises(MmcliError, match="already exists; pass --overwrite"):
        ix.IndexWriter(ix.shard_path(base, 0, 2), dim=4, capacity=2, meta=META)


def test_shards_of_different_models_are_not_one_index(tmp_path):
    base = str(tmp_path / "emb.npy")
    other = {**META, "model": {**META["model"], "checksum": "sha256:def"}}
    write_index(ix.shard_path(base, 0, 2), unit_rows(2, 4))
    write_index(ix.shard_path(base, 1, 2), unit_rows(2, 4), meta=other)
    with pytest.raises(MmcliError, match=r"emb\.rank00001-of-00002\.npy: model differs from .*rank00000"):
        ix.open_index(base)


def test_reading_an_index_imports_neither_torch_nor_faiss():
    code = "import sys, mmcli.retrieval.index; print(sorted({'torch', 'faiss'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------
# exact search
# --------------------------------------------------------------------------------------------


def test_search_exact_on_a_hand_computed_example():
    rows = np.array([[1, 0], [0, 1], [np.sqrt(0.5), np.sqrt(0.5)]], dtype=np.float32)
    scores, ids = ix.search_exact(rows, np.array([[1.0, 0.0]]), 3)
    np.testing.assert_array_equal(ids, [[0, 2, 1]])
    np.testing.assert_allclose(scores, [[1.0, np.sqrt(0.5), 0.0]], atol=1e-7)
    assert scores.dtype == np.float32 and ids.dtype == np.int64


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 10_000])
def test_search_exact_matches_brute_force_for_any_chunk_size(chunk_rows):
    rows, queries = unit_rows(300, 16), unit_rows(9, 16, seed=1)
    scores, ids = ix.search_exact(rows, queries, 10, chunk_rows=chunk_rows)
    ref_scores, ref_ids = brute_force(rows, queries, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)


def test_ties_go_to_the_lower_id_across_and_within_chunks():
    base = unit_rows(1, 8)[0]
    rows = np.tile(base, (20, 1))  # twenty identical rows: every score ties
    rows[[3, 11]] = -base
    _, ids = ix.search_exact(rows, base[None], 5, chunk_rows=6)
    np.testing.assert_array_equal(ids, [[0, 1, 2, 4, 5]])


def test_k_larger_than_the_index_returns_every_row():
    rows, queries = unit_rows(4, 8), unit_rows(2, 8, seed=1)
    scores, ids = ix.search_exact(rows, queries, 10, chunk_rows=3)
    assert ids.shape == (2, 4)
    np.testing.assert_array_equal(ids, brute_force(rows, queries, 4)[1])


def test_float16_index_is_scored_in_float32(tmp_path):
    rows = unit_rows(50, 16)
    path = write_index(tmp_path / "emb.npy", rows.astype(np.float16), dtype="float16")
    index = ix.open_index(path)
    assert index.embeddings.dtype == np.float16 and index.meta["dtype"] == "float16"
    queries = unit_rows(4, 16, seed=3)
    scores, ids = ix.search_exact(index, queries, 5, chunk_rows=16)
    ref_scores, ref_ids = brute_force(rows.astype(np.float16), queries, 5)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)


def test_rough_float16_scores_stay_within_the_margin_the_filter_assumes():
    from mmcli.retrieval.index import search

    q = unit_rows(1, 512, seed=1)
    rows = q + unit_rows(20_000, 512)  # scores near 0.7: a query's neighbours, where errors are largest
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)
    exact = (q @ rows.astype(np.float32).T)[0]
    assert np.abs(search._rough_scores(q, rows)[0] - exact).max() <= search._ROUGH_MARGIN / 2
    # The bound needs torch to sum in float32: a running sum kept in float16 drifts past it.
    running, q16 = np.zeros(len(rows), np.float16), q[0].astype(np.float16)
    for d in range(512):
        running = (running + rows[:, d] * q16[d]).astype(np.float16)
    assert np.abs(running.astype(np.float32) - exact).max() > search._ROUGH_MARGIN / 2


def test_any_rough_error_within_the_bound_leaves_the_answer_exact(tmp_path, monkeypatch):
    # The worst case the bound allows: every true top-10 row's rough score just under half the
    # margin too low, every other row's just under half too high.
    from mmcli.retrieval.index import search

    rows = clustered_rows(3_000, 64).astype(np.float16)
    queries = rows[[5, 500, 2_500]].astype(np.float32)
    exact = queries @ rows.astype(np.float32).T
    top = brute_force(rows, queries, 10)[1]
    skew = np.full_like(exact, 0.49 * 2.0**-8)
    np.put_along_axis(skew, top, -0.49 * 2.0**-8, axis=1)
    tenth = np.take_along_axis(exact, top[:, -1:], axis=1)
    assert ((exact < tenth) & (exact > tenth - 0.98 * 2.0**-8)).any()  # rows the skew lifts past a true hit
    monkeypatch.setattr(search, "_rough_scores", lambda q, block: q @ block.astype(np.float32).T + skew)
    path = write_index(tmp_path / "emb.npy", rows, dtype="float16")
    _, ids = ix.search_exact(ix.open_index(path), queries, 10, chunk_rows=100_000)
    np.testing.assert_array_equal(ids, top)


def test_rows_that_tie_in_float16_are_ranked_by_their_float32_scores(tmp_path):
    # 40 rows within 1e-4 of each other in score: their float16 scores tie in blocks of ~5e-4, so
    # only the exact re-scoring can order them; the answer must be brute force's, ties to lower ids.
    base = unit_rows(1, 512)[0]
    nudge = unit_rows(40, 512, seed=2) * 0.01
    near = base + nudge
    rows = np.concatenate([unit_rows(200, 512, seed=3), near / np.linalg.norm(near, axis=1, keepdims=True)])
    rows = np.concatenate([rows, rows[-3:]]).astype(np.float16)  # exact duplicates tie in float32 too
    path = write_index(tmp_path / "emb.npy", rows, dtype="float16")
    scores, ids = ix.search_exact(ix.open_index(path), base[None], 12, chunk_rows=64)
    ref_scores, ref_ids = brute_force(rows, base[None], 12)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)
    rough = np.sort((rows.astype(np.float32) @ base).astype(np.float16))[::-1]
    assert len(set(rough[:12])) < 12  # the rough scores really do tie


def test_a_block_of_near_ties_is_scored_whole(tmp_path, monkeypatch):
    from mmcli.retrieval.index import search

    monkeypatch.setattr(search, "_MAX_CANDIDATES", 5)
    rows = np.tile(unit_rows(1, 16), (30, 1)).astype(np.float16)  # every row ties
    path = write_index(tmp_path / "emb.npy", rows, dtype="float16")
    _, ids = ix.search_exact(ix.open_index(path), unit_rows(2, 16, seed=1), 4, chunk_rows=10)
    np.testing.assert_array_equal(ids, [[0, 1, 2, 3]] * 2)


def test_no_queries_give_empty_results():
    scores, ids = ix.search_exact(unit_rows(3, 8), np.zeros((0, 8), np.float32), 2)
    assert scores.shape == ids.shape == (0, 2)


def test_queries_of_the_wrong_width_are_refused():
    with pytest.raises(ValueError, match="Q×8"):
        ix.search_exact(unit_rows(3, 8), unit_rows(1, 4), 1)


def test_recall_at_k_counts_shared_ids():
    assert ix.recall_at_k(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 9], [7, 8, 9]])) == pytest.approx(2 / 6)


# --------------------------------------------------------------------------------------------
# FAISS
# --------------------------------------------------------------------------------------------


def test_kind_and_list_count_follow_the_documented_thresholds():
    assert ann.choose_faiss_kind(ann.FLAT_MAX_ROWS - 1) == "flat"
    assert ann.choose_faiss_kind(ann.FLAT_MAX_ROWS) == ann.choose_faiss_kind(1_000_000, 512, 8 << 30) == "ivf"
    assert index_plan.ivf_lists(1_000_000) == 4000  # 4·√N
    assert index_plan.ivf_lists(10_000) == 256  # capped at N/39 training points per list


def test_faiss_labels_map_back_to_rows_when_rows_were_held_out():
    # 7 rows, rows 2 and 5 added last: labels 0..4 are rows 0, 1, 3, 4, 6; labels 5, 6 rows 2, 5
    labels = np.array([[0, 1, 2, 3, 4, 5, 6, -1]])
    np.testing.assert_array_equal(ann._label_rows(labels, np.array([2, 5]), 7), [[0, 1, 3, 4, 6, 2, 5, -1]])


def test_flat_faiss_returns_the_exact_neighbours(tmp_path):
    rows, queries = unit_rows(500, 16), unit_rows(5, 16, seed=2)
    fi = ann.build_faiss(ix.open_index(write_index(tmp_path / "emb.npy", rows)), kind="flat")
    scores, ids = ann.search_faiss(fi, queries, 7)
    ref_scores, ref_ids = brute_force(rows, queries, 7)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
    assert fi.recall_at_10 == 1.0
    # Rows held out while tuning are added back under their own ids.
    np.testing.assert_array_equal(ann.search_faiss(fi, rows, 1)[1][:, 0], np.arange(500))


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_are_tuned_to_the_recall_target(tmp_path, kind):
    rows = clustered_rows(3000, 32)
    index = ix.open_index(write_index(tmp_path / "emb.npy", rows))
    fi = ann.build_faiss(index, kind=kind)
    assert fi.recall_at_10 >= 0.96 and len(fi) == 3000 and set(fi.params) & {"efSearch", "nprobe"}
    queries = clustered_rows(200, 32, seed=9)  # new points from the same distribution
    _, ids = ann.search_faiss(fi, queries, 10)
    assert ix.recall_at_k(ids, brute_force(rows, queries, 10)[1]) >= 0.93


def test_saved_faiss_index_is_reused_until_the_index_changes(tmp_path):
    path = write_index(tmp_path / "emb.npy", unit_rows(200, 8))
    first = ann.load_or_build_faiss(ix.open_index(path), kind="flat")
    assert first.built and os.path.exists(path + ".faiss") and os.path.exists(path + ".faiss.json")
    again = ann.load_or_build_faiss(ix.open_index(path), kind="flat")
    assert not again.built and len(again) == 200 and again.recall_at_10 == 1.0

    write_index(path, unit_rows(200, 8, seed=1), overwrite=True)  # same shape, new rows
    assert ann.load_or_build_faiss(ix.open_index(path), kind="flat").built
    assert ann.load_or_build_faiss(ix.open_index(path), kind="hnsw").built  # another kind asked
