"""Retrieval latency: exact and FAISS search on a synthetic N×D index (a benchmark, not a test).

Builds a random L2-normalised float32 index with its sidecar through ``IndexWriter`` (kept in
``--workdir`` for the next run, else in a temporary folder), then prints ms/query for exact
search (a batch of queries, and one query at a time), the FAISS build time, kind and recall@10
against exact search, and PASS/FAIL against the targets:

    exact search   ≤ 100 ms/query (batch)
    FAISS search   ≤ 5 ms/query (one query at a time) at recall@10 ≥ 0.95

Rows are drawn around ``--clusters`` centres, as real embeddings are; ``--data uniform``
draws them uniformly on the sphere, where nearest neighbours barely exist and any approximate
index needs far more work. Examples::

    nice python tests/bench/retrieve_latency.py --rows 200000
    nice python tests/bench/retrieve_latency.py --workdir /tmp/mmcli-bench --kinds hnsw,ivf
    nice python tests/bench/retrieve_latency.py --cli-cmd "mmcli retrieve 'a red circle' --index emb.npy"
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial

import numpy as np

from mmcli.retrieval import faiss_index as ann
from mmcli.retrieval import index as ix

EXACT_TARGET_MS = 100.0
FAISS_TARGET_MS = 5.0
META = {
    "model": {"ref": "synthetic", "arch": "none", "checksum": "sha256:none"},
    "modality": "image",
    "root": "synthetic",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="index rows N")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension D")
    parser.add_argument("--queries", type=int, default=100, help="queries per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is shown)")
    parser.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    parser.add_argument("--clusters", type=int, default=1000, help="centres of the clustered data")
    parser.add_argument("--kinds", default="auto", help="FAISS kinds to build, comma-separated (auto, flat, hnsw, ivf)")
    parser.add_argument("--workdir", help="folder that keeps the index between runs (default: a temporary one)")
    parser.add_argument("--cli-cmd", help="a command line to time cold, against python -c 'import torch'")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


class Synthetic:
    """Unit vectors around fixed random centres (or uniform on the sphere)."""

    def __init__(self, dim: int, clusters: int, uniform: bool) -> None:
        centres = np.random.default_rng(0).standard_normal((clusters, dim)).astype(np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        self.dim, self.uniform = dim, uniform

    def rows(self, count: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal((count, self.dim), dtype=np.float32)
        if not self.uniform:  # centre + noise of the same norm: cosine to the centre ≈ 0.7
            noise = self.centres[rng.integers(len(self.centres), size=count)] + noise / np.sqrt(self.dim)
        return noise / np.linalg.norm(noise, axis=1, keepdims=True)


def make_index(path: str, args: argparse.Namespace, data: Synthetic) -> ix.Index:
    """The index at ``path``, written unless one of the same size and data is already there."""
    if ix.index_exists(path):
        index = ix.open_index(path)
        if (len(index), index.dim, index.meta.get("synthetic")) == (args.rows, args.dim, args.data):
            return index
    start, block = time.perf_counter(), 65_536
    meta = {**META, "synthetic": args.data}
    with ix.IndexWriter(path, dim=args.dim, capacity=args.rows, meta=meta, overwrite=True) as writer:
        for first in range(0, args.rows, block):
            count = min(block, args.rows - first)
            writer.add(data.rows(count, seed=1 + first), [f"row{i}" for i in range(first, first + count)])
    print(f"wrote {path}: {args.rows}×{args.dim} float32 in {time.perf_counter() - start:.1f} s")
    return ix.open_index(path)


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


def median_seconds(run, repeats: int) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_query_ms(search, queries: np.ndarray, repeats: int) -> tuple[float, float]:
    """(ms/query for the whole batch at once, ms/query one query at a time)."""
    batch = median_seconds(lambda: search(queries), repeats) / len(queries)
    singles = queries[: min(len(queries), 10)]
    single = median_seconds(lambda: [search(q[None]) for q in singles], repeats) / len(singles)
    return 1000 * batch, 1000 * single


def measure_exact(index: ix.Index, queries: np.ndarray, repeats: int) -> dict:
    batch, single = per_query_ms(lambda q: ix.search_exact(index, q, 10), queries, repeats)
    return {"method": "exact", "batch_ms": batch, "single_ms": single, "recall": 1.0}


def measure_faiss(
    index: ix.Index, kind: str, queries: np.ndarray, exact_ids: np.ndarray, workdir: str, repeats: int
) -> dict:
    path = os.path.join(workdir, f"emb.{kind}.faiss")
    fi = ann.load_or_build_faiss(index, kind=kind, path=path)
    batch, single = per_query_ms(lambda q: ann.search_faiss(fi, q, 10), queries, repeats)
    recall = ix.recall_at_k(ann.search_faiss(fi, queries, 10)[1], exact_ids)
    build = f"built in {fi.build_seconds:.1f} s" if fi.built else "reused"
    print(f"faiss {kind} -> {fi.kind} {fi.params}: {build}, held-out recall@10 at build {fi.recall_at_10:.3f}")
    return {"method": f"faiss {fi.kind}", "batch_ms": batch, "single_ms": single, "recall": recall}


# --------------------------------------------------------------------------------------------
# cold CLI (hook)
# --------------------------------------------------------------------------------------------


COLD_CLI_TARGET = 2.0
"""A cold ``mmcli retrieve`` with a text query may take at most this many times ``import torch``."""


def cold_cli(cmd: str, repeats: int) -> None:
    """COLD-CLI HOOK: time ``cmd`` as a fresh process against ``python -c "import torch"``.

    A command that imports torch at start-up cannot be faster than the second line; a text
    query needs torch (the start-up-light text tower) but neither open_clip nor torchvision,
    so it should stay within :data:`COLD_CLI_TARGET` × the bare import. Each command runs once
    untimed first, so that both are timed with the files in the page cache ("cold" means a
    new interpreter, not a cold disk).
    """
    baseline = [sys.executable, "-c", "import torch"]
    seconds = {}
    for label, argv in (("cli", shlex.split(cmd)), ("import torch", baseline)):
        subprocess.run(argv, check=True, capture_output=True)
        seconds[label] = median_seconds(partial(subprocess.run, argv, check=True, capture_output=True), repeats)
        print(f"cold {label:<14} {1000 * seconds[label]:8.0f} ms   ({' '.join(argv)})")
    ratio = seconds["cli"] / seconds["import torch"]
    print(
        f"cold cli / import torch {ratio:6.2f}×   {'PASS' if ratio <= COLD_CLI_TARGET else 'FAIL'} "
        f"(target ≤ {COLD_CLI_TARGET:.0f}×)"
    )


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\n{args.rows:,}×{args.dim} float32, {args.data} data, {args.queries} queries, "
        f"{os.cpu_count()} CPUs, median of {args.repeats}"
    )
    print(f"{'method':<14}{'batch ms/q':>12}{'single ms/q':>13}{'recall@10':>11}  target")
    for r in results:
        if r["method"] == "exact":
            ok = r["batch_ms"] <= EXACT_TARGET_MS
            target = f"batch ≤ {EXACT_TARGET_MS:.0f} ms/q"
        else:
            ok = r["single_ms"] <= FAISS_TARGET_MS and r["recall"] >= ann.RECALL_TARGET
            target = f"single ≤ {FAISS_TARGET_MS:.0f} ms/q at recall ≥ {ann.RECALL_TARGET}"
        print(
            f"{r['method']:<14}{r['batch_ms']:>12.2f}{r['single_ms']:>13.2f}{r['recall']:>11.3f}  "
            f"{'PASS' if ok else 'FAIL'} ({target})"
        )


def run(args: argparse.Namespace, workdir: str) -> None:
    data = Synthetic(args.dim, args.clusters, uniform=args.data == "uniform")
    index = make_index(os.path.join(workdir, "emb.npy"), args, data)
    queries = data.rows(args.queries, seed=0)  # seed 0 is never used for index rows
    results = [measure_exact(index, queries, args.repeats)]
    exact_ids = ix.search_exact(index, queries, 10)[1]
    for kind in args.kinds.split(","):
        results.append(measure_faiss(index, kind.strip(), queries, exact_ids, workdir, args.repeats))
    print_table(results, args)
    if args.cli_cmd:
        cold_cli(args.cli_cmd, args.repeats)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="mmcli-bench-") as workdir:
            run(args, workdir)


if __name__ == "__main__":
    main()
