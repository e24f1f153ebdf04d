"""FAISS under a memory budget: the plan's choices computed by hand, an IVF-PQ index that reaches
its recall through exact re-ranking, lists on disk past the budget, the same index from shards,
and mmcli index build."""

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
from mmcli.retrieval.index_plan import block_rows, parse_memory, plan_index

META = {"model": {"ref": "m", "arch": "a", "checksum": "c"}, "modality": "text"}


def test_memory_sizes():
    assert parse_memory("4GB") == 4 << 30 and parse_memory("500M") == 500 << 20 and parse_memory("2g") == 2 << 30
    assert parse_memory("123456") == 123456 and parse_memory("1.5GB") == int(1.5 * (1 << 30))
    with pytest.raises(MmcliError, match="--max-memory lots"):
        parse_memory("lots")


def test_the_plan_follows_the_budget():
    gib = 1 << 30
    assert plan_index(9_999, 512, max_memory=gib).kind == "flat"
    assert plan_index(100_000, 512, max_memory=gib).kind == "ivf"  # 205 MB of vectors fit 0.8 GiB
    plan = plan_index(1_000_000, 512, max_memory=2 * gib)  # 2.05 GB of vectors do not fit 1.6 GiB
    # the largest code that fits: 64 bytes (8 dims a byte, no OPQ); 4000 lists, an HNSW quantizer at 1M rows
    assert (plan.kind, plan.m, plan.opq, plan.nlist) == ("ivfpq", 64, False, 4000)
    assert plan.factory == "IVF4000_HNSW32,PQ64"
    assert plan.index_bytes == 1_000_000 * (64 + 8) + 4000 * 512 * 4 + 256 * 512 * 4
    tight = plan_index(10_000_000, 512, max_memory=400 << 20)  # 64 B codes (720 MB) do not fit: 16 B with OPQ
    assert (tight.m, tight.opq, tight.factory.startswith("OPQ16,")) == (16, True, True)
    # 100M rows: even 16 B codes (2.4 GB) exceed 0.8 GiB, so the 64 B codes go to an on-disk lists file
    huge = plan_index(100_000_000, 512, max_memory=1 << 30)
    assert (huge.kind, huge.m, huge.opq, huge.on_disk) == ("ivfpq", 64, False, True)
    train = (1 << 30) // 4 // (512 * 4)  # a quarter of the budget as float32 rows: 131,072
    nlist = train // 30  # 4·√N = 40,000 lists would get < 30 training points each: 4,369
    resident = nlist * 512 * 4 + 256 * 512 * 4  # centroids and codebooks stay in memory
    assert (huge.train_rows, huge.nlist, huge.index_bytes) == (train, nlist, resident)
    assert huge.shard_rows == (int((1 << 30) * 0.8) - resident) // (64 + 8)  # codes + ids built at a time
    assert huge.disk_bytes == 100_000_000 * (64 + 8)
    with pytest.raises(MmcliError, match="centroids and codebooks"):
        plan_index(100_000_000, 512, max_memory=600_000)  # not even the codebooks fit


@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF64,PQ8", "OPQ4,IVF64,PQ4"])
def test_lists_sized_ahead_hold_what_a_plain_add_makes(rows, factory, monkeypatch):
    import faiss

    trained = faiss.index_factory(32, factory, faiss.METRIC_INNER_PRODUCT)
    trained.train(rows[:5_000])
    sized, plain = faiss.clone_index(trained), faiss.clone_index(trained)
    skip = np.array([3, 700, 19_999])
    a = faiss.extract_index_ivf(sized).invlists
    reserved, size_lists = {}, ann._sized_lists
    buffers = lambda: {n: int(a.get_codes(n) or 0) for n in range(64)}  # noqa: E731 - where each list's codes are

    def sized_lists(*args):
        lists = size_lists(*args)
        reserved.update(buffers())
        return lists

    monkeypatch.setattr(ann, "_sized_lists", sized_lists)
    ann._add_rows(faiss, sized, rows, skip=skip, later=rows[skip])
    assert len(reserved) == 64 and buffers() == reserved  # no list was moved to a larger buffer
    for start in range(0, len(rows), 4_096):  # FAISS's own add, block by block, the same rows in order
        block = rows[start : start + 4_096]
        plain.add(block[~np.isin(np.arange(start, start + len(block)), skip)])
    assert sized.ntotal == plain.ntotal == len(rows) - len(skip)
    b = faiss.extract_index_ivf(plain).invlists
    for list_no in range(64):
        assert a.list_size(list_no) == b.list_size(list_no)
        size = a.list_size(list_no) * a.code_size
        assert (
            faiss.rev_swig_ptr(a.get_codes(list_no), size).tobytes()
            == faiss.rev_swig_ptr(b.get_codes(list_no), size).tobytes()
        )
        ids = [faiss.rev_swig_ptr(x.get_ids(list_no), a.list_size(list_no)).tolist() for x in (a, b)]
        assert ids[0] == ids[1]
    ann._add_later(faiss, sized, rows[skip])  # the held-out rows join after tuning, into the room kept for them
    assert sized.ntotal == len(rows) and buffers() == reserved


def test_rows_go_to_the_list_of_their_nearest_centroid_when_the_quantizer_is_a_graph(rows):
    import faiss

    trained = faiss.index_factory(32, "IVF256_HNSW32,Flat", faiss.METRIC_INNER_PRODUCT)
    trained.train(rows[:10_000])
    ivf = faiss.extract_index_ivf(trained)
    graph = faiss.downcast_index(ivf.quantizer)
    graph.hnsw.efSearch = 1  # a graph searched this shallowly misses many rows' nearest centroid
    centroids = graph.reconstruct_n(0, graph.ntotal)
    nearest = np.argmax(rows @ centroids.T, axis=1)  # brute force, NumPy
    assert (graph.assign(rows, 1).ravel() != nearest).sum() > 100
    assert np.array_equal(ann._list_finder(faiss, ivf).assign(rows, 1).ravel(), nearest)
    built, skip = faiss.clone_index(trained), np.arange(0, len(rows), 97)
    ann._add_rows(faiss, built, rows, skip=skip, later=rows[skip])
    ann._add_later(faiss, built, rows[skip])  # the held-out rows, after tuning, numbered last
    order = np.concatenate([np.setdiff1d(np.arange(len(rows)), skip), skip])  # label → row
    lists = faiss.extract_index_ivf(built).invlists
    for list_no in range(256):
        ids = faiss.rev_swig_ptr(lists.get_ids(list_no), lists.list_size(list_no))
        assert np.array_equal(np.sort(order[ids]), np.flatnonzero(nearest == list_no))


def test_an_hnsw_graph_built_into_reserved_room_holds_what_a_plain_add_makes(rows):
    import faiss

    sized, plain = (faiss.index_factory(32, "HNSW32,SQfp16", faiss.METRIC_INNER_PRODUCT) for _ in range(2))
    ann._reserve_graph(faiss, sized, len(rows))
    where = lambda index: (int(faiss.downcast_index(index.storage).codes.data()), int(index.hnsw.neighbors.data()))  # noqa: E731
    reserved = where(sized)
    ann._add_rows(faiss, sized, rows, skip=np.zeros(0, np.int64))
    assert where(sized) == reserved  # neither the vectors nor the links were moved to a larger buffer
    for start in range(0, len(rows), 4_096):
        plain.add(rows[start : start + 4_096])
    assert sized.ntotal == plain.ntotal == len(rows)
    codes = [faiss.downcast_index(x.storage).codes for x in (sized, plain)]
    assert codes[0].size() == len(rows) * 64  # float16: 2 bytes a dimension
    assert (
        faiss.rev_swig_ptr(codes[0].data(), codes[0].size()).tobytes()
        == faiss.rev_swig_ptr(codes[1].data(), codes[1].size()).tobytes()
    )
    assert sized.hnsw.neighbors.size() == sized.hnsw.offsets.at(len(rows))  # links sized by FAISS, not by the reserve
    assert ix.recall_at_k(sized.search(rows[:200], 10)[1], plain.search(rows[:200], 10)[1]) >= 0.95


def test_a_build_leaves_torch_unloaded(rows, tmp_path):
    # torch's libraries are ~0.45 GiB resident: a build under a memory budget must not pay for them.
    path = write(tmp_path / "emb.npy", rows)  # float16 rows: their exact check widens them
    code = (
        "import sys; from mmcli.retrieval import faiss_index as ann, index as ix; "
        f"fi = ann.build_faiss(ix.open_index({path!r}), kind='ivfpq', max_memory=2_000_000); "
        "assert fi.recall_at_10 >= 0.9, fi.recall_at_10; print(sorted(m for m in sys.modules if m.startswith('torch')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("queries", [1, 100])
def test_exact_search_with_numpy_alone_equals_the_usual_one(rows, tmp_path, queries):
    index = ix.open_index(write(tmp_path / "emb.npy", rows))
    q = clustered(queries, 32, 5)
    scores, ids = ix.search_exact(index, q, 10, chunk_rows=7_000, release=True, numpy_only=True)
    want_scores, want_ids = ix.search_exact(index, q, 10)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)


def test_an_hnsw_graph_keeps_the_most_precise_vectors_that_fit():
    gib, links = 1 << 30, 1_000_000 * 32 * 2 * 4  # 2·M int32 neighbours a row
    for budget, codes, width in ((4 * gib, "Flat", 4), (2 * gib, "SQfp16", 2), (gib, "SQ8", 1)):
        plan = plan_index(1_000_000, 512, kind="hnsw", max_memory=budget)
        assert (plan.kind, plan.factory) == ("hnsw", f"HNSW32,{codes}")
        assert plan.index_bytes == 1_000_000 * 512 * width + links <= 0.8 * budget
        assert plan.train_rows == (65_536 if codes == "SQ8" else 0)
    with pytest.raises(MmcliError, match="--kind hnsw: an HNSW graph over 1,000,000 rows .* give more memory"):
        plan_index(1_000_000, 512, kind="hnsw", max_memory=gib // 2)  # 0.77 GB of links and bytes > 0.4 GiB


def test_an_hnsw_graph_of_one_byte_codes_under_a_small_budget(rows, tmp_path):
    path = write(tmp_path / "emb.npy", rows)
    budget = 7_500_000  # room 6.0 MB: 5.1 MB of links + 0.6 MB of bytes fit, float16 rows (1.3 MB) do not
    fi = ann.build_faiss(ix.open_index(path), kind="hnsw", path=path + ".faiss", max_memory=budget)
    assert fi.params["factory"] == "HNSW32,SQ8" and fi.recall_at_10 >= 0.95
    queries = clustered(300, 32, 7)
    truth = ix.search_exact(ix.open_index(path), queries, 10)[1]
    assert ix.recall_at_k(ann.search_faiss(fi, queries, 10)[1], truth) >= 0.93
    again = ann.load_or_build_faiss(ix.open_index(path), kind="hnsw")
    assert not again.built and again.params["efSearch"] == fi.params["efSearch"]
    np.testing.assert_array_equal(ann.search_faiss(again, queries, 10)[1], ann.search_faiss(fi, queries, 10)[1])


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Rows (or, with another seed, queries) around the same 200 centres."""
    centers = np.random.default_rng(0).normal(size=(200, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = centers[rng.integers(0, 200, n)] + 0.4 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def rows():
    return clustered(20_000, 32, 0)


def write(path, rows, dtype="float16"):
    with ix.IndexWriter(str(path), dim=rows.shape[1], dtype=dtype, capacity=len(rows), meta=META) as w:
        w.add(rows.astype(dtype), [str(i) for i in range(len(rows))])
    return str(path)


def test_ivfpq_reaches_its_recall_by_exact_re_ranking(rows, tmp_path):
    index = ix.open_index(write(tmp_path / "emb.npy", rows))
    budget = 2 * 1024 * 1024  # 20k × 32 float32 = 2.5 MB does not fit: IVF-PQ
    fi = ann.load_or_build_faiss(index, max_memory=budget)
    assert fi.kind == "ivfpq" and fi.rerank is not None and fi.recall_at_10 >= 0.96
    queries = clustered(200, 32, 1)
    scores, ids = ann.search_faiss(fi, queries, 10)
    exact_scores, exact_ids = ix.search_exact(index, queries, 10)
    assert ix.recall_at_k(ids, exact_ids) >= 0.9
    stored = np.asarray(index.embeddings, dtype=np.float32)
    for q, row_scores, row_ids in zip(queries, scores, ids):  # re-ranked: exact cosines, best first
        found = row_ids >= 0  # the probed lists may hold fewer than k rows: -1, -inf
        np.testing.assert_allclose(row_scores[found], stored[row_ids[found]] @ q, atol=1e-5)
        assert np.all(np.isneginf(row_scores[~found])) and np.all(np.diff(row_scores[found]) <= 1e-6)
    loaded = ann.load_or_build_faiss(index)  # the saved file, memory-mapped, any kind
    assert not loaded.built and loaded.kind == "ivfpq"
    np.testing.assert_array_equal(ann.search_faiss(loaded, queries, 10)[1], ids)


def test_shards_build_the_index_of_their_concatenation(rows, tmp_path):
    base = tmp_path / "emb.npy"
    for rank, part in enumerate((rows[:7_000], rows[7_000:])):
        write(ix.shard_path(str(base), rank, 2), part)
    sharded = ix.open_index(str(base))
    single = ix.open_index(write(tmp_path / "one.npy", rows))
    budget = 2 * 1024 * 1024
    a, b = ann.build_faiss(sharded, max_memory=budget), ann.build_faiss(single, max_memory=budget)
    queries = clustered(50, 32, 2)
    np.testing.assert_array_equal(ann.search_faiss(a, queries, 10)[1], ann.search_faiss(b, queries, 10)[1])


def test_an_index_opened_without_its_items_keeps_none_and_fingerprints_the_same(rows, tmp_path):
    base = tmp_path / "emb.npy"
    for rank, part in enumerate((rows[:7_000], rows[7_000:])):
        write(ix.shard_path(str(base), rank, 2), part)
    full, lean = ix.open_index(str(base)), ix.open_index(str(base), items=False)
    assert len(full.items) == len(rows) and "items" not in lean.meta and len(lean) == len(rows)
    with pytest.raises(ValueError, match="without its items"):
        _ = lean.items
    assert lean.created == full.created == tuple(ix.read_sidecar(f)["created"] for f in full.files)
    unread = ix.Index(full.path, full.embeddings, full.meta, full.files)  # no creation times: the sidecars are read
    assert ann._fingerprint(lean) == ann._fingerprint(full) == ann._fingerprint(unread)


def test_index_build_command_and_retrieve_use_the_same_file(rows, tmp_path):
    from mmcli.commands.index import build

    path = write(tmp_path / "emb.npy", rows)
    result = build(path, max_memory="2MB")
    assert result["kind"] == "ivfpq" and result["recall_at_10"] >= 0.96 and result["file_bytes"] > 0
    assert result["params"]["m"] == 16 and result["params"]["nprobe"] >= 1  # 32 dims, 2 per byte
    fi = ann.load_or_build_faiss(ix.open_index(path))
    assert not fi.built and fi.params == result["params"]


def test_an_on_disk_build_finds_what_the_same_index_in_memory_finds(rows, tmp_path, monkeypatch):
    import dataclasses
    import shutil

    from mmcli.retrieval import index_plan

    path = write(tmp_path / "emb.npy", rows)
    budget = 300 * 1024  # 20k rows' 16 B codes + ids (480 KB) exceed it: lists on disk, in shards
    plan = index_plan.plan_index(len(rows), 32, max_memory=budget)
    assert plan.on_disk and plan.shard_rows < len(rows) // 2  # three shards and the held-out rows' one
    on_disk = ann.load_or_build_faiss(ix.open_index(path), max_memory=budget)
    assert on_disk.params["on_disk"] and os.path.exists(path + ".faiss.ivfdata")
    assert sorted(os.listdir(tmp_path)) == sorted(  # the staging folder and its shards are gone
        ["emb.npy", "emb.npy.json", "emb.npy.faiss", "emb.npy.faiss.ivfdata", "emb.npy.faiss.json"]
    )
    assert len(on_disk) == len(rows)  # the held-out rows joined after tuning

    # The same plan built in memory: same sample, same training, so the same codes and answers.
    monkeypatch.setattr(ann, "plan_index", lambda *a, **k: dataclasses.replace(plan, on_disk=False))
    in_memory = ann.build_faiss(ix.open_index(write(tmp_path / "mem" / "emb.npy", rows)), max_memory=budget)
    monkeypatch.undo()
    assert in_memory.params["nprobe"] == on_disk.params["nprobe"] and in_memory.recall_at_10 == on_disk.recall_at_10
    queries = np.concatenate([clustered(100, 32, 4), rows[on_disk.held_out[:20]]])  # held-out rows found too
    want = ann.search_faiss(in_memory, queries, 10)
    np.testing.assert_array_equal(ann.search_faiss(on_disk, queries, 10)[1], want[1])
    assert np.all(want[1][100:, 0] == on_disk.held_out[:20])

    moved = tmp_path / "moved"  # the lists file is found beside the index wherever the folder goes
    moved.mkdir()
    for name in ("emb.npy", "emb.npy.json", "emb.npy.faiss", "emb.npy.faiss.ivfdata", "emb.npy.faiss.json"):
        shutil.move(tmp_path / name, moved / name)
    loaded = ann.load_or_build_faiss(ix.open_index(str(moved / "emb.npy")))
    assert not loaded.built and loaded.params["on_disk"]
    np.testing.assert_array_equal(ann.search_faiss(loaded, queries, 10)[1], want[1])


def test_index_build_json_stays_clean_of_faiss_progress_lines(rows, tmp_path):
    path = write(tmp_path / "emb.npy", rows)
    cmd = [sys.executable, "-m", "mmcli", "index", "build", path, "--max-memory", "300KB", "--json"]
    ballast = np.ones(600 << 20, np.uint8)  # this process is 600 MB larger when it starts the build
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    del ballast
    built = json.loads(done.stdout)  # FAISS printf()s "resizing …" while merging: not into stdout
    assert built["params"]["on_disk"] and built["recall_at_10"] >= 0.9
    assert 20 << 20 < built["peak_rss_bytes"] < 400 << 20  # the build's own peak, not its parent's pages
    assert built["lists_file"] == path + ".faiss.ivfdata" and built["lists_file_bytes"] == len(rows) * (16 + 8)
    shown = subprocess.run(cmd[:-1], capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "200"})
    assert "lists on disk" in shown.stdout and "emb.npy.faiss.ivfdata" in shown.stdout


@pytest.mark.parametrize("queries", [1, 5, 100])  # up to 64: blocks scored in parallel threads; more: in turn
def test_exact_search_of_float16_rows_equals_numpy_brute_force(rows, tmp_path, queries):
    index = ix.open_index(write(tmp_path / "emb.npy", rows))
    q = clustered(queries, 32, 3)
    scores, ids = ix.search_exact(index, q, 7, chunk_rows=3_000)  # several blocks, a last short one
    full = q @ np.asarray(index.embeddings, dtype=np.float32).T
    want = np.argsort(-full, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(full, want, axis=1), atol=1e-6)


def test_rows_read_by_pread_equal_rows_taken_through_the_memory_map(rows, tmp_path):
    base = tmp_path / "emb.npy"
    for rank, part in enumerate((rows[:7_000], rows[7_000:])):
        write(ix.shard_path(str(base), rank, 2), part)
    sharded, single = ix.open_index(str(base)), ix.open_index(write(tmp_path / "one.npy", rows, "float32"))
    wanted = np.array([19_999, 0, 6_999, 7_000, 12_345, 7_000])  # both shards, their edges, a repeat
    for embeddings in (sharded.embeddings, single.embeddings, np.asarray(single.embeddings)):
        got = ix.read_rows(embeddings, wanted)
        assert got.dtype == embeddings.dtype
        np.testing.assert_array_equal(got, ix.take_rows(embeddings, wanted))


def test_a_build_reads_and_scores_rows_in_blocks_that_follow_the_budget(rows, tmp_path, monkeypatch):
    assert block_rows(2 << 30, 512) == 65_536  # 128 MB of float32 rows: a sixteenth of 2 GiB
    assert block_rows(256 << 20, 512) == 8_192  # 16 MB
    assert block_rows(1 << 30, 32) == 65_536 and block_rows(2 << 20, 32) == 1_024  # never fewer
    read, scored = [], []
    iter_blocks, exact = ann.iter_row_blocks, ann.search_exact

    def iter_row_blocks(embeddings, rows, **kw):
        read.append(rows)
        return iter_blocks(embeddings, rows, **kw)

    def search_exact(*args, chunk_rows, **kw):
        scored.append(chunk_rows)
        return exact(*args, chunk_rows=chunk_rows, **kw)

    monkeypatch.setattr(ann, "iter_row_blocks", iter_row_blocks)
    monkeypatch.setattr(ann, "search_exact", search_exact)
    budget = 3 << 20  # 20k × 32 float32 rows (2.6 MB) exceed 0.8 × 3 MB: IVF-PQ, blocks of 3 MB / 16 / 128 B
    fi = ann.build_faiss(ix.open_index(write(tmp_path / "emb.npy", rows)), max_memory=budget)
    assert fi.kind == "ivfpq" and set(read) == set(scored) == {1_536}
    assert len(read) == 3  # the training sample, then each row's list, then its codes


def test_reranking_many_queries_a_few_at_a_time_orders_each_query_s_candidates_exactly(rows, tmp_path):
    index = ix.open_index(write(tmp_path / "emb.npy", rows))
    rng = np.random.default_rng(3)
    q = ix.query_matrix(clustered(50, 32, 4), 32)  # more than one group of queries re-ranked together
    ids = np.stack([rng.choice(len(rows), 40, replace=False) for _ in range(50)])
    ids[:, -5:] = -1  # slots an approximate search could not fill
    scores, best = ann._rerank(index.embeddings, q, ids, 10)
    stored = np.asarray(index.embeddings, dtype=np.float32)
    for i in range(50):  # NumPy brute force over each query's own candidates, ties to the lower row
        candidates = ids[i][ids[i] >= 0]
        exact = stored[candidates] @ q[i]
        order = np.lexsort((candidates, -exact))[:10]
        assert best[i].tolist() == candidates[order].tolist()
        np.testing.assert_allclose(scores[i], exact[order], atol=1e-6)
