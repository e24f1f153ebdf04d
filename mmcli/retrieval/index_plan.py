"""Which FAISS index to build for N rows of dimension D under a memory budget.

``plan_index`` picks, for ``kind="auto"``:

- ``flat`` below :data:`FLAT_MAX_ROWS` rows (an exact scan of at most a few tens of MB);
- ``ivf`` (IVF-Flat, nlist = 4√N) while a float32 copy of every vector fits the budget;
- ``ivfpq`` (IVF with product-quantised codes of m bytes a vector, Jégou et al. 2011) when it does
  not: the largest m (the least compression) whose codes fit, with an OPQ rotation (Ge et al. 2013)
  when a code has 16 or more dimensions per byte, where it helps recall most. Hits of an IVF-PQ
  search are re-ranked by their exact cosine, read from the memory-mapped ``.npy``, so recall is
  limited by the candidates the codes find, not by the codes' own error;
- ``ivfpq`` with its inverted lists **on disk** when even the smallest codes do not fit: the codes
  (and 8-byte ids) of all rows are written to ``<index>.faiss.ivfdata`` and memory-mapped; memory
  holds the centroids and codebooks, and while building one group of rows' codes at a time
  (:attr:`IndexPlan.shard_rows`).

``hnsw`` is built only when asked for by name: a graph over float32 vectors while they fit beside its
links, else float16 (``SQfp16``), else one byte a dimension (``SQ8``); never on disk. Sizes are FAISS's
own layouts: float32 vectors, 8-byte ids per inverted-list entry, float32 centroids and codebooks.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from mmcli.errors import MmcliError

FLAT_MAX_ROWS = 10_000
"""Below this many rows ``auto`` builds an exact ``IndexFlatIP``: a scan of at most 20 MB (D=512)
that needs no training. Above it IVF wins: at 10k×512 it answered in 0.4-0.6 ms/query against
3-24 ms for the flat scan, at 50k in 0.2 ms against 14-52 ms."""

KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
"""Index kinds ``mmcli index build --kind`` and ``retrieve --faiss`` know."""

HNSW_M = 32
HNSW_QUANTIZER_ROWS = 1_000_000
"""From this many rows the IVF coarse quantizer is an HNSW graph over the centroids."""
LIST_NUMBER_BYTES = 4
"""While an in-memory IVF index is built, every row's list number (int32) is held, so that each
inverted list can be given its exact size before the codes are added (they would otherwise grow by
doubling); the plan leaves room for them beside the index."""
RERANK_FACTOR = 20
"""An IVF-PQ search fetches this many times k candidates and re-ranks them exactly."""

_SQ_TRAIN_ROWS = 65_536  # rows whose per-dimension range trains an 8-bit scalar quantizer
_MIN_SHARD_ROWS = 1_000  # rows whose codes an on-disk build holds at a time, at the least
_BUDGET_SHARE = 0.8  # of the budget for the index; the rest for the process and its blocks of rows (block_rows)
_BLOCK_SHARE = 16  # a block of rows as float32 is at most this fraction of the budget
_MAX_BLOCK_ROWS = 65_536
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30}


@dataclass(frozen=True)
class IndexPlan:
    """What to build: ``kind``, FAISS's ``factory`` string, the IVF ``nlist``, the PQ code bytes
    ``m``, whether an OPQ rotation precedes it, how many rows train it, the estimated resident
    size of the finished index in bytes, and for inverted lists kept on disk (``on_disk``) how many
    rows' codes are built in memory at a time (``shard_rows``) and the size of the lists file."""

    kind: str
    factory: str
    nlist: int | None
    m: int | None
    opq: bool
    train_rows: int
    index_bytes: int
    budget: int
    on_disk: bool = False
    shard_rows: int | None = None
    disk_bytes: int = 0

    @property
    def rerank(self) -> bool:
        """Whether hits are re-ranked exactly (codes that lose information: IVF-PQ)."""
        return self.kind == "ivfpq"

    def describe(self) -> dict:
        """The plan as the FAISS sidecar and the command's output show it."""
        return {
            "kind": self.kind,
            "factory": self.factory,
            "nlist": self.nlist,
            "m": self.m,
            "opq": self.opq,
            "train_rows": self.train_rows,
            "index_bytes": self.index_bytes,
            "max_memory": self.budget,
            "rerank": RERANK_FACTOR if self.rerank else None,
            "on_disk": self.on_disk,
            "disk_bytes": self.disk_bytes,
        }


def parse_memory(text: str) -> int:
    """``"4GB"``, ``"500M"``, ``"2g"``, ``"123456"`` → bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?b?)\s*", str(text).lower())
    if match is None or float(match[1]) <= 0:
        raise MmcliError(f"--max-memory {text}: give a size such as 500MB, 4GB or 2G")
    return int(float(match[1]) * _UNITS[match[2]])


def default_budget() -> int:
    """Half of this machine's memory: the budget when none is given."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def block_rows(budget: int, dim: int) -> int:
    """Rows a build reads, widens, adds or scores at a time: 65,536, or fewer where that many as
    float32 would be more than a sixteenth of the budget (2 GB: 65,536 rows of 512 dimensions, 128 MB;
    256 MB: 8,192 rows). The exact check scores a block per core, the add holds one float32 block
    and the float16 pages it came from, so blocks stay within the fifth of the budget the index does
    not get."""
    return max(1_024, min(_MAX_BLOCK_ROWS, budget // _BLOCK_SHARE // (dim * 4)))


def ivf_lists(count: int) -> int:
    """4·√N lists (FAISS's guideline), capped so every list gets ≥ 39 training points."""
    return max(1, min(int(4 * math.sqrt(count)), count // 39))


def plan_index(count: int, dim: int, *, kind: str = "auto", max_memory: int | None = None) -> IndexPlan:
    """The index to build for ``count`` rows of ``dim`` under ``max_memory`` bytes (see the module)."""
    if kind not in KINDS:
        raise MmcliError(f"--kind {kind}: choose one of {', '.join(KINDS)}")
    budget = max_memory or default_budget()
    room = int(budget * _BUDGET_SHARE)
    nlist = ivf_lists(count)
    flat_bytes = count * dim * 4
    ivf_bytes = flat_bytes + count * 8 + nlist * dim * 4
    if kind == "auto":
        kind = "flat" if count < FLAT_MAX_ROWS else "ivf" if ivf_bytes + count * LIST_NUMBER_BYTES <= room else "ivfpq"
    if kind == "flat":
        return IndexPlan("flat", "Flat", None, None, False, 0, flat_bytes, budget)
    if kind == "hnsw":
        return _plan_hnsw(count, dim, budget, room)
    train = _train_rows(count, nlist, dim, budget)
    nlist = min(nlist, max(1, train // 30))  # every list gets ≥ 30 training points
    if kind == "ivf":
        return IndexPlan("ivf", f"{_ivf(nlist, count)},Flat", nlist, None, False, train, ivf_bytes, budget)
    return _plan_pq(count, dim, nlist, train, budget, room)


def _plan_pq(count: int, dim: int, nlist: int, train: int, budget: int, room: int) -> IndexPlan:
    fixed = nlist * dim * 4 + 256 * dim * 4  # coarse centroids, PQ codebooks
    for m in _code_sizes(dim):
        opq = dim // m >= 16
        size = count * (m + 8) + fixed + (dim * dim * 4 if opq else 0)
        if size + count * LIST_NUMBER_BYTES <= room:
            factory = (f"OPQ{m}," if opq else "") + f"{_ivf(nlist, count)},PQ{m}"
            return IndexPlan("ivfpq", factory, nlist, m, opq, train, size, budget)
    return _plan_on_disk(count, dim, nlist, train, budget, room, fixed)


def _plan_on_disk(count: int, dim: int, nlist: int, train: int, budget: int, room: int, fixed: int) -> IndexPlan:
    """IVF-PQ with the most accurate codes, kept in an on-disk inverted-lists file: memory holds the
    centroids and codebooks, and while building the codes of ``shard_rows`` rows at a time."""
    m = _code_sizes(dim)[0]
    opq = dim // m >= 16
    resident = fixed + (dim * dim * 4 if opq else 0)
    shard_rows = (room - resident) // (m + 8)
    if shard_rows < _MIN_SHARD_ROWS:
        raise MmcliError(
            f"--max-memory {_human(budget)}: the centroids and codebooks of {count:,} rows alone need about "
            f"{_human(int((resident + _MIN_SHARD_ROWS * (m + 8)) / _BUDGET_SHARE))}; give more memory"
        )
    factory = (f"OPQ{m}," if opq else "") + f"{_ivf(nlist, count)},PQ{m}"
    return IndexPlan("ivfpq", factory, nlist, m, opq, train, resident, budget, True, shard_rows, count * (m + 8))


def _plan_hnsw(count: int, dim: int, budget: int, room: int) -> IndexPlan:
    """An HNSW graph over the most precise vectors that fit beside its links: float32, float16, or
    one byte a dimension (a scalar quantizer trained on a sample). The whole graph is in memory."""
    links = count * HNSW_M * 2 * 4  # the bottom layer's 2·M int32 neighbours a row (upper layers add ~1/M)
    for codes, width in (("Flat", 4), ("SQfp16", 2), ("SQ8", 1)):
        size = count * dim * width + links
        if size <= room:
            train = min(count, _SQ_TRAIN_ROWS) if codes == "SQ8" else 0
            return IndexPlan("hnsw", f"HNSW{HNSW_M},{codes}", None, None, False, train, size, budget)
    raise MmcliError(
        f"--kind hnsw: an HNSW graph over {count:,} rows keeps its links and at least one byte a dimension in "
        f"memory, about {_human(int((count * dim + links) / _BUDGET_SHARE))}; give more memory, or build "
        "--kind auto (IVF-PQ, inverted lists on disk if need be)"
    )


def _code_sizes(dim: int) -> list[int]:
    """PQ code bytes to try, largest (most accurate) first: divisors of ``dim`` from dim/2 down to dim/32."""
    sizes = [dim // d for d in (2, 4, 8, 16, 32) if dim % d == 0 and dim // d >= 4]
    return [m for m in sizes if m <= 96] or [min(sizes or [dim])]


def _train_rows(count: int, nlist: int, dim: int, budget: int) -> int:
    # 30 points per list (FAISS warns below 39; k-means cost grows with it), at most a quarter of the
    # budget as float32: training IVF-PQ holds the sample and its residuals to the centroids (another
    # copy); both are freed before the codes are added.
    return max(1, min(count, 30 * nlist, budget // 4 // (dim * 4)))


def _ivf(nlist: int, count: int) -> str:
    """The coarse quantizer: exact over the centroids, or an HNSW graph of them past a million rows,
    which finds one query's lists without scanning thousands of centroids. (A build assigns its rows
    by an exact search all the same: for a block of rows that is a matrix product, and faster.)"""
    return f"IVF{nlist}_HNSW32" if count >= HNSW_QUANTIZER_ROWS else f"IVF{nlist}"


def _human(size: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
