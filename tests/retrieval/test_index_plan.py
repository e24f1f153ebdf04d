"""FAISS under a memory budget: the plan's choices computed by hand, an IVF-PQ index that reaches
its recall through exact re-ranking, the same index from shards, and mmcli index build."""

from __future__ import annotations

import numpy as np
import pytest

from mmcli.errors import MmcliError
from mmcli.retrieval import faiss_index as ann
from mmcli.retrieval import index as ix
from mmcli.retrieval.index_plan import parse_memory, plan_index

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
    with pytest.raises(MmcliError, match="even the smallest IVF-PQ codes"):
        plan_index(100_000_000, 512, max_memory=1 << 30)


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


def test_index_build_command_and_retrieve_use_the_same_file(rows, tmp_path):
    from mmcli.commands.index import build

    path = write(tmp_path / "emb.npy", rows)
    result = build(path, max_memory="2MB")
    assert result["kind"] == "ivfpq" and result["recall_at_10"] >= 0.96 and result["file_bytes"] > 0
    assert result["params"]["m"] == 16 and result["params"]["nprobe"] >= 1  # 32 dims, 2 per byte
    fi = ann.load_or_build_faiss(ix.open_index(path))
    assert not fi.built and fi.params == result["params"]


@pytest.mark.parametrize("queries", [1, 5, 100])  # up to 64: blocks scored in parallel threads; more: in turn
def test_exact_search_of_float16_rows_equals_numpy_brute_force(rows, tmp_path, queries):
    index = ix.open_index(write(tmp_path / "emb.npy", rows))
    q = clustered(queries, 32, 3)
    scores, ids = ix.search_exact(index, q, 7, chunk_rows=3_000)  # several blocks, a last short one
    full = q @ np.asarray(index.embeddings, dtype=np.float32).T
    want = np.argsort(-full, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(full, want, axis=1), atol=1e-6)
