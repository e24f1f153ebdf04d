"""Serving load: ``mmcli serve`` under N concurrent text-query clients on loopback (a benchmark, not a test).

Builds (or reuses) a ``--rows`` index in the embedding space of ``--model``: the images of ``--images``
embedded by ``mmcli embed``, copied with seeded Gaussian noise and re-normalised, so that text queries
find real neighbours. Starts ``mmcli serve`` on 127.0.0.1 as a subprocess, once with exact search and
once with ``--faiss``, and drives ``POST /api/search`` (50 shapes captions, k=10) from N client threads,
each with its own keep-alive connection, for ``--seconds`` or ``--queries``, whichever ends first (after
``--warmup`` uncounted queries). Prints queries, p50/p95/p99 latency, queries/s and their ratios to
clip-retrieval's published back end figures for a 100k index (``/knn-service``):

    p50 latency ≤ 50 ms        throughput ≥ 20 queries/s

Beside them, measured in this process in the same run: text encoding alone (the service's encoder, one
text and 16 at once), exact and FAISS search (one query and 16 at once), one query's whole work without
HTTP (encoding, then search) and an HTTP round trip to ``/health``: where a query's time goes. Clients
share the cores with the server, as a front end on the same host would. ``OMP_NUM_THREADS`` (torch) and
``OPENBLAS_NUM_THREADS`` (NumPy) are left as set, and printed. From the repository root::

    .venv/bin/python benchmarks/serve_load.py
    .venv/bin/python benchmarks/serve_load.py --rows 20000 --seconds 3 --clients 1 4 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from mmcli.retrieval import index as ix

# The in-process reference runs as mmcli serve does: torch's threads wait passively (set before torch's import).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TARGET_P50_MS, TARGET_QPS = 50.0, 20.0
HOST = "127.0.0.1"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # torch's pool and NumPy's BLAS pool, left as set
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "diamond")
RELATIONS = ("left of", "right of", "above", "below")


def shapes_captions(count: int = 50) -> list[str]:
    """``count`` captions as the shapes data writes them: every colour × shape, then seeded relations."""
    single, rng = [f"a {c} {s}" for c in COLORS for s in SHAPES], np.random.default_rng(0)
    pairs = [rng.choice(len(single), 2, replace=False) for _ in range(count - len(single))]
    return single + [f"{single[a]} {RELATIONS[(a + b) % len(RELATIONS)]} {single[b]}" for a, b in pairs]


CAPTIONS = shapes_captions()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/shapes", help="run folder whose embedding space the index uses")
    parser.add_argument("--images", default="data/shapes/images/train", help="real images the rows are copies of")
    parser.add_argument("--workdir", default="bench-out/serve-load", help="folder that keeps the indexes between runs")
    parser.add_argument("--rows", type=int, default=100_000, help="index rows")
    parser.add_argument("--noise", type=float, default=0.03, help="std of the noise per dimension of each copy")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="index row type")
    parser.add_argument("--configs", nargs="+", choices=["exact", "faiss"], default=["exact", "faiss"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16], help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="most seconds per configuration × clients")
    parser.add_argument("--queries", type=int, default=400, help="most queries per configuration × clients")
    parser.add_argument("--warmup", type=int, default=20, help="uncounted queries after each server start")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--host", default=HOST, help="server address: loopback only, 127.0.0.1 is the one accepted")
    parser.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for /health")
    parser.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.host != HOST:
        parser.error(f"--host {args.host}: this benchmark only talks to {HOST}")
    return args


def source_index(args: argparse.Namespace) -> ix.Index:
    """``--images`` embedded by ``mmcli embed`` with ``--model`` (made once, redone for another model or folder)."""
    path = os.path.join(args.workdir, "source.npy")
    made = ix.read_sidecar(path) if ix.index_exists(path) else None
    if made is None or (made["model"]["ref"], made["source"]["path"]) != (str(Path(args.model).resolve()), args.images):
        from mmcli.commands.embed import run as embed

        done = embed(args.images, path, model=args.model, overwrite=True, progress=False)
        print(f"embedded {done['count']} images of {args.images} with {args.model} in {done['seconds']:.1f} s")
    return ix.open_index(path)


def load_index(args: argparse.Namespace) -> tuple[str, dict]:
    """The ``--rows`` index of noisy copies of the source rows (reused when its recipe matches)."""
    source = source_index(args)
    path = os.path.abspath(os.path.join(args.workdir, f"emb-{args.dtype}.npy"))
    recipe = {"from": source.meta["created"], "rows": args.rows, "noise": args.noise, "seed": 0}
    if ix.index_exists(path) and ix.read_sidecar(path).get("synthetic") == recipe:
        return path, recipe
    start, block = time.perf_counter(), 10_000
    base, rng = np.asarray(source.embeddings, dtype=np.float32), np.random.default_rng(0)
    meta = {key: source.meta[key] for key in ("model", "modality", "root", "decode", "source")}
    meta["synthetic"] = recipe
    with ix.IndexWriter(path, dim=source.dim, dtype=args.dtype, capacity=args.rows, meta=meta, overwrite=True) as w:
        for first in range(0, args.rows, block):
            ids = np.arange(first, min(first + block, args.rows))
            rows = base[ids % len(base)] + rng.normal(0, args.noise, (len(ids), source.dim)).astype(np.float32)
            rows /= np.linalg.norm(rows, axis=1, keepdims=True)
            w.add(rows.astype(args.dtype), [f"synthetic/{i:06d}.png" for i in ids])
    print(f"wrote {path}: {args.rows:,}×{source.dim} {args.dtype} in {time.perf_counter() - start:.1f} s")
    return path, recipe


def median_ms(run, items) -> float:
    """Median ms of ``run(item)`` over ``items``."""
    times = []
    for item in items:
        start = time.perf_counter()
        run(item)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def reference_costs(path: str, args: argparse.Namespace) -> dict[str, float]:
    """Median ms per query of the server's parts, in this process, through the service's encoder and searchers.

    "encoding, then search" is one query's whole work without HTTP: above the sum of its parts
    when torch's and NumPy's thread pools get in each other's way.
    """
    from mmcli.retrieval.search import make_searcher
    from mmcli.serving.service import SearchService

    service = SearchService.open({"bench": path})
    served = service.get("bench")
    try:
        encode = lambda texts: service.encode_texts(served, texts).result()  # noqa: E731
        vectors = encode(CAPTIONS)
        searchers = {"exact": lambda v: ix.search_exact(served.index, v, args.k)}
        if "faiss" in args.configs:  # also builds the FAISS file the server then loads
            faiss = make_searcher(served.index, use_faiss=True)
            searchers[faiss.describe()["method"]] = lambda v: faiss(v, args.k)
        costs = {
            "text encoding, one text": median_ms(lambda t: encode([t]), CAPTIONS),
            "text encoding, 16 at once": median_ms(encode, [CAPTIONS[i : i + 16] for i in range(0, 48, 16)] * 4) / 16,
        }
        for name, search in searchers.items():
            costs[f"{name} search, one query"] = median_ms(lambda v, s=search: s(v[None]), vectors)
            costs[f"{name} search, 16 at once"] = median_ms(search, [vectors[:16]] * 12) / 16
            costs[f"encoding, then {name} search"] = median_ms(lambda t, s=search: s(encode([t])), CAPTIONS)
    finally:
        service.close()
    return costs


def ask(conn: http.client.HTTPConnection, method: str, url: str, body: dict | None = None) -> tuple[float, dict]:
    """(seconds, JSON answer) of one request on ``conn``; anything but 200 is an error."""
    start = time.perf_counter()
    conn.request(method, url, json.dumps(body) if body else None, {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    seconds = time.perf_counter() - start
    if response.status != 200:
        raise RuntimeError(f"{method} {url} answered {response.status}: {data[:300]!r}")
    return seconds, json.loads(data)


@contextlib.contextmanager
def server(path: str, args: argparse.Namespace, config: str):
    """``mmcli serve`` of ``path`` on 127.0.0.1 until the block ends; yields (port, seconds to /health)."""
    with socket.socket() as s:  # a free port, unless one is given
        s.bind((HOST, args.port))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mmcli", "serve", "--index", f"bench={path}", "--host", HOST, "--port", str(port)]
    log_path = os.path.join(args.workdir, f"serve-{config}.log")
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd + (["--faiss"] if config == "faiss" else []), stdout=log, stderr=log)
        try:
            while True:
                if proc.poll() is not None:
                    sys.exit(f"mmcli serve exited with {proc.returncode}:\n{Path(log_path).read_text()[-2000:]}")
                if time.perf_counter() - start > args.start_timeout:
                    sys.exit(f"mmcli serve: no /health after {args.start_timeout:.0f} s (log: {log_path})")
                probe = http.client.HTTPConnection(HOST, port, timeout=5)
                try:
                    ask(probe, "GET", "/health")
                    break
                except OSError:
                    time.sleep(0.2)
                finally:
                    probe.close()
            yield port, time.perf_counter() - start
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def drive(port: int, clients: int, args: argparse.Namespace) -> dict:
    """Latency and throughput of ``clients`` threads sending text queries back to back."""
    lock, numbers, clock = threading.Lock(), iter(range(args.queries)), {}
    latencies, ends, errors = [], [], []
    gate = threading.Barrier(clients, action=lambda: clock.update(start=time.perf_counter()))

    def client() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        conn.connect()
        gate.wait()
        try:
            while time.perf_counter() < clock["start"] + args.seconds:
                with lock:
                    n = next(numbers, None)
                if n is None:
                    return
                body = {"index": "bench", "text": CAPTIONS[n % len(CAPTIONS)], "k": args.k}
                seconds, answer = ask(conn, "POST", "/api/search", body)
                if len(answer["results"]) != args.k:
                    raise RuntimeError(f"asked for {args.k} results, got {len(answer['results'])}")
                with lock:
                    latencies.append(1000 * seconds)
                    ends.append(time.perf_counter())
        except Exception as exc:  # noqa: BLE001 - reported below, after every client stopped
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    qps = len(latencies) / (max(ends) - clock["start"])
    return {"clients": clients, "queries": len(latencies), "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "qps": qps}


def measure(path: str, config: str, args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Every ``--clients`` load against one server of ``config``; also its start-up and an idle round trip."""
    with server(path, args, config) as (port, ready_s):
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        method = ask(conn, "GET", "/api/indexes")[1][0]["search"]
        for n in range(args.warmup):
            ask(conn, "POST", "/api/search", {"index": "bench", "text": CAPTIONS[n % len(CAPTIONS)], "k": args.k})
        health = statistics.median(1000 * ask(conn, "GET", "/health")[0] for _ in range(50))
        conn.close()
        print(f"mmcli serve ({method}) ready in {ready_s:.1f} s, warmed up with {args.warmup} queries")
        runs = [{"config": config, "method": method, **drive(port, n, args)} for n in args.clients]
    return runs, {"config": config, "method": method, "ready_s": ready_s, "health_ms": health}


def report(args: argparse.Namespace, costs: dict, runs: list[dict], servers: list[dict]) -> None:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = ", ".join(f"{name}={os.environ.get(name, 'unset')}" for name in THREAD_VARIABLES)
    print(f"\n{args.rows:,} rows {args.dtype}, k={args.k}, {os.cpu_count()} CPUs ({usable} usable), {threads}")
    alone, batched = (1000 / costs[f"text encoding, {n}"] for n in ("one text", "16 at once"))
    print(
        f"\nreference, median ms per query (encoding alone bounds the server at {alone:.0f} q/s one text at a "
        f"time, {batched:.0f} q/s when concurrent texts are encoded together, as the server does)"
    )
    lines = {**costs, **{f"HTTP GET /health, {s['method']} server": s["health_ms"] for s in servers}}
    for label, ms in lines.items():
        print(f"  {label:<36}{ms:8.2f}")
    head = ("search", "clients", "queries", "p50 ms", "p95 ms", "p99 ms", "q/s", "p50/50ms", "q/s / 20")
    print(f"\n{head[0]:<12}" + "".join(f"{h:>9}" for h in head[1:]) + "  target")
    for r in runs:
        ratios = (r["p50_ms"] / TARGET_P50_MS, r["qps"] / TARGET_QPS)
        figures = (r["p50_ms"], r["p95_ms"], r["p99_ms"], r["qps"], *ratios)
        verdict = "PASS" if ratios[0] <= 1 <= ratios[1] else "FAIL"
        print(f"{r['method']:<12}{r['clients']:>9}{r['queries']:>9}" + "".join(f"{f:>9.2f}" for f in figures), verdict)
    print(f"target: p50 ≤ {TARGET_P50_MS:.0f} ms and ≥ {TARGET_QPS:.0f} q/s (clip-retrieval's back end, 100k rows);")
    print(f"each row: at most {args.queries} queries or {args.seconds:g} s, client threads in this process, loopback")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the server is stopped on a kill too
    os.makedirs(args.workdir, exist_ok=True)
    path, recipe = load_index(args)
    costs = reference_costs(path, args)
    measured = [measure(path, config, args) for config in args.configs]
    runs, servers = [r for runs, _ in measured for r in runs], [s for _, s in measured]
    report(args, costs, runs, servers)
    if args.json:
        machine = {"cpus": os.cpu_count(), **{name: os.environ.get(name) for name in THREAD_VARIABLES}}
        out = {"args": vars(args), "machine": machine, "index": {"path": path, **recipe}, "reference_ms": costs}
        out |= {"target": {"p50_ms": TARGET_P50_MS, "qps": TARGET_QPS}, "servers": servers, "runs": runs}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
