"""Indexes past memory: mmcli's FAISS build under a memory budget against autofaiss, 1M and 10M rows.

For each row count N (``--rows``), in one run:

1. N × 512 clustered unit vectors written as a float16 mmcli index (``emb.npy`` + sidecar, made
   block by block: ~10 GB at 10M), and 1,000 held-out queries from the same distribution.
2. The exact top-10 of every query (``mmcli``'s blockwise exact search): the ground truth.
3. ``mmcli index build emb.npy --max-memory BUDGET`` (its default plan, and ``--kind hnsw`` as
   ``mmcli-hnsw``: a graph over the most precise vectors that fit) and autofaiss's ``build_index`` with
   ``max_index_memory_usage=BUDGET`` (and ``current_memory_available`` twice that: autofaiss
   refuses to build with no room beside the index), each in its own process: build time, peak RSS
   of that process (its own ``VmHWM``), index file size.
4. Each index searched one query at a time (1,000 queries): recall@10 against the ground truth and
   ms/query at the parameters each tool chose, then over a sweep of ``nprobe`` for both, so that
   recall can be compared at equal query time.

autofaiss needs NumPy < 2, so it runs from its own virtual environment (``--autofaiss-python``)::

    python3 -m venv bench-out/autofaiss-venv && bench-out/autofaiss-venv/bin/pip install autofaiss
    .venv/bin/python benchmarks/index_scale.py --rows 1000000 10000000 --budget 2GB

Targets: recall@10 ≥ 0.9 at ≤ 10 ms/query, and mmcli at least as good as autofaiss on recall at
equal query time and memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mmcli.retrieval import index as ix
from mmcli.retrieval.index_plan import parse_memory

DIM, LATENT, CLUSTERS, QUERIES, K = 512, 32, 20_000, 1000, 10
TOOLS = ("mmcli", "mmcli-hnsw", "autofaiss")
KINDS = {"mmcli": "auto", "mmcli-hnsw": "hnsw"}  # mmcli's two builds: its default plan, and a graph by name
META = {"model": {"ref": "synthetic", "arch": "none", "checksum": "none"}, "modality": "image"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--budget", default="2GB", help="memory budget of both builds")
    parser.add_argument("--workdir", default="bench-out/index-scale")
    parser.add_argument("--autofaiss-python", default="bench-out/autofaiss-venv/bin/python")
    parser.add_argument("--sweep", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--reuse-mmcli", action="store_true", help="reuse mmcli's last build (its figures and file)")
    parser.add_argument("--json", metavar="OUT", help="also write every figure here")
    parser.add_argument(
        "--tools", nargs="+", choices=TOOLS, default=list(TOOLS), help="build and measure only these (default: both)"
    )
    return parser.parse_args(argv)


def make_data(folder: Path, rows: int) -> tuple[str, np.ndarray]:
    """The float16 index (reused when complete) and its held-out queries."""
    path = folder / "emb.npy"
    # Embeddings have a low intrinsic dimension: clusters in a 32-d latent space, mapped into 512
    # dimensions, plus a little noise. (Isotropic noise in all 512 dimensions would make every
    # member of a cluster equally near, and recall@10 a lottery among near-ties.)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(CLUSTERS, LATENT)).astype(np.float32)
    lift = rng.normal(size=(LATENT, DIM)).astype(np.float32) / np.sqrt(LATENT)

    def draw(n: int, gen) -> np.ndarray:
        z = centers[gen.integers(0, CLUSTERS, n)] + 0.5 * gen.normal(size=(n, LATENT)).astype(np.float32)
        x = z @ lift + 0.05 * gen.normal(size=(n, DIM)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    if not ix.index_exists(str(path)):
        folder.mkdir(parents=True, exist_ok=True)
        start, block = time.perf_counter(), 100_000
        with ix.IndexWriter(str(path), dim=DIM, dtype="float16", capacity=rows, meta=META, overwrite=True) as w:
            for first in range(0, rows, block):
                n = min(block, rows - first)
                w.add(
                    draw(n, np.random.default_rng(first + 1)).astype(np.float16),
                    [str(i) for i in range(first, first + n)],
                )
        print(f"wrote {rows:,} × {DIM} float16 in {time.perf_counter() - start:.0f} s")
    return str(path), draw(QUERIES, np.random.default_rng(10**9))


def ground_truth(path: str, queries: np.ndarray, folder: Path) -> np.ndarray:
    cached = folder / "truth.npy"
    if cached.exists():
        return np.load(cached)
    start = time.perf_counter()
    ids = ix.search_exact(ix.open_index(path), queries, K)[1]
    np.save(cached, ids)
    print(f"exact top-{K} of {QUERIES} queries in {time.perf_counter() - start:.0f} s")
    return ids


def run_measured(cmd: list[str]) -> tuple[float, str]:
    """Wall seconds and stdout of a child. Each child reports its own peak resident size (VmHWM):
    ``wait4``'s ru_maxrss would also count this process's pages, which a child holds between fork
    and exec (after generating the data and its ground truth, 1.67 GiB at 200k rows)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"{cmd[:3]} failed with {proc.returncode}")
    return time.perf_counter() - start, proc.stdout


AUTOFAISS = """
import json, sys
from autofaiss import build_index
folder, index_path, infos, budget, available = sys.argv[1:6]
build_index(embeddings=folder, index_path=index_path, index_infos_path=infos, metric_type="ip",
            max_index_memory_usage=budget, current_memory_available=available, max_index_query_time_ms=10,
            nb_cores=2, verbose=30)
with open("/proc/self/status") as f:
    print(json.dumps({"peak_rss_bytes": next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))}))
"""


def build_both(path: str, folder: Path, args) -> dict:
    figures = {}
    for tool in (t for t in KINDS if t in args.tools):
        source = tool_index(path, tool)
        mine = Path(source).parent / "mmcli-build.json"
        if args.reuse_mmcli and mine.exists():  # the saved FAISS file is still fresh: load_or_build_faiss checks
            figures[tool] = json.loads(mine.read_text())
            continue
        cmd = [sys.executable, "-m", "mmcli", "index", "build", source, "--max-memory", args.budget, "--json"]
        seconds, out = run_measured(cmd + ["--kind", KINDS[tool]])
        built = json.loads(out)
        figures[tool] = {
            "build_s": seconds,
            "peak_rss": built["peak_rss_bytes"],
            "bytes": built["file_bytes"],
            "file": built["faiss"],
            "params": built["params"],
        }
        mine.write_text(json.dumps(figures[tool]))
    cached = folder / "autofaiss-build.json"  # autofaiss's build is reused: mmcli's is what changes
    if "autofaiss" not in args.tools:
        return figures
    if cached.exists():
        figures["autofaiss"] = json.loads(cached.read_text())
        return figures
    af_input = folder / "autofaiss-input"
    af_input.mkdir(exist_ok=True)
    link = af_input / "emb.npy"
    if not link.exists():
        link.symlink_to(Path(path).resolve())
    index_path, infos = folder / "autofaiss.index", folder / "autofaiss.json"
    budget = parse_memory(args.budget)
    seconds, out = run_measured(
        [args.autofaiss_python, "-c", AUTOFAISS, str(af_input), str(index_path), str(infos)]
        + [f"{budget >> 20}M", f"{2 * budget >> 20}M"]  # autofaiss refuses to build with no room beside the index
    )
    if not index_path.exists():
        raise SystemExit(f"autofaiss built no index under {args.budget} (its log above says why)")
    figures["autofaiss"] = {
        "build_s": seconds,
        "peak_rss": json.loads(out.strip().splitlines()[-1])["peak_rss_bytes"],
        "bytes": index_path.stat().st_size,
        "file": str(index_path),
        "params": json.loads(infos.read_text()),
    }
    cached.write_text(json.dumps(figures["autofaiss"]))
    return figures


def tool_index(path: str, tool: str) -> str:
    """Where ``tool`` builds: the index itself, or for a second mmcli kind the same files linked into a
    folder of its own (an index has one FAISS file beside it)."""
    if tool == "mmcli":
        return path
    folder = Path(path).parent / tool
    folder.mkdir(exist_ok=True)
    for name in (Path(path).name, Path(path).name + ".json"):
        if not (folder / name).exists():
            (folder / name).symlink_to(Path(path).with_name(name).resolve())
    return str(folder / Path(path).name)


def search_figures(figures: dict, path: str, queries: np.ndarray, truth: np.ndarray, sweep: list[int]) -> None:
    import faiss

    from mmcli.retrieval import faiss_index as ann

    tools = []
    for tool in (t for t in KINDS if t in figures):
        mine = ann.load_or_build_faiss(ix.open_index(tool_index(path, tool)), kind=KINDS[tool])
        assert not mine.built, f"{tool}'s saved index was not reused"
        tools.append((tool, lambda q, mine=mine: ann.search_faiss(mine, q, K)[1], mine.index))
    if "autofaiss" in figures:
        theirs = faiss.read_index(figures["autofaiss"]["file"], faiss.IO_FLAG_MMAP)
        params = figures["autofaiss"]["params"].get("index_param")
        if params:
            faiss.ParameterSpace().set_index_parameters(theirs, params)
        tools.append(("autofaiss", lambda q: theirs.search(q, K)[1], theirs))

    for name, search, index_obj in tools:
        figures[name]["chosen"] = one_at_a_time(search, queries, truth)
        figures[name]["sweep"] = {}
        try:
            ivf = faiss.extract_index_ivf(index_obj)
        except RuntimeError:  # not an IVF index: an HNSW one is swept over its efSearch
            hnsw = faiss.downcast_index(index_obj)
            if hasattr(hnsw, "hnsw"):
                chosen, figures[name]["ef_sweep"] = hnsw.hnsw.efSearch, {}
                for ef in (16, 32, 64, 128, 256, 512, 1024):
                    hnsw.hnsw.efSearch = ef
                    figures[name]["ef_sweep"][ef] = one_at_a_time(search, queries[:300], truth[:300])
                hnsw.hnsw.efSearch = chosen
            continue
        chosen = ivf.nprobe
        for nprobe in sweep:
            ivf.nprobe = nprobe
            figures[name]["sweep"][nprobe] = one_at_a_time(search, queries[:300], truth[:300])
        ivf.nprobe = chosen


def one_at_a_time(search, queries: np.ndarray, truth: np.ndarray) -> dict:
    for q in queries[:20]:
        search(q[None])
    found, start = [], time.perf_counter()
    for q in queries:
        found.append(search(q[None])[0])
    ms = (time.perf_counter() - start) * 1000 / len(queries)
    return {"recall_at_10": ix.recall_at_k(np.stack(found), truth), "ms_per_query": ms}


def report(rows: int, figures: dict, budget: str) -> None:
    gib = 1 << 30
    print(f"\n{rows:,} rows × {DIM} float16, budget {budget}, single queries, k={K}")
    print(f"{'':<10}{'build s':>9}{'peak GiB':>10}{'index GiB':>11}{'recall@10':>11}{'ms/query':>10}  parameters")
    for name in figures:
        f = figures[name]
        params = f["params"].get("factory") or f["params"].get("index_key")
        search = {k: f["params"][k] for k in ("nprobe", "efSearch") if k in f["params"]}
        params = f"{params} {' '.join(f'{k} {v}' for k, v in search.items()) or f['params'].get('index_param', '')}"
        print(
            f"{name:<10}{f['build_s']:9.0f}{f['peak_rss'] / gib:10.2f}{f['bytes'] / gib:11.3f}"
            f"{f['chosen']['recall_at_10']:11.3f}{f['chosen']['ms_per_query']:10.2f}  {params}"
        )
    print("nprobe sweep (300 queries): recall@10 / ms per query (an index without nprobe: -)")
    for nprobe in next(iter(figures.values()))["sweep"]:
        cells = []
        for name in figures:
            f = figures[name]["sweep"].get(nprobe) or figures[name]["sweep"].get(str(nprobe))
            cells.append(f"{name} {f['recall_at_10']:.3f} / {f['ms_per_query']:.2f}" if f else f"{name} -")
        print(f"  nprobe {nprobe:>4}: " + "   ".join(cells))
    for name in figures:
        for ef, f in figures[name].get("ef_sweep", {}).items():
            print(f"  {name} efSearch {ef:>5}: {f['recall_at_10']:.3f} / {f['ms_per_query']:.2f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    everything = {}
    for rows in args.rows:
        folder = Path(args.workdir) / f"{rows}"
        path, queries = make_data(folder, rows)
        truth = ground_truth(path, queries, folder)
        figures = build_both(path, folder, args)
        search_figures(figures, path, queries, truth, args.sweep)
        report(rows, figures, args.budget)
        everything[rows] = figures
        if args.json:
            Path(args.json).write_text(json.dumps(everything, indent=1, default=str))


if __name__ == "__main__":
    main()
