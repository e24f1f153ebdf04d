"""retrieve --duplicates: the groups equal the connected components of the brute-force N×N
cosine matrix thresholded, computed here with NumPy and a plain graph search."""

from __future__ import annotations

import numpy as np
import pytest

from mmcli.errors import MmcliError
from mmcli.retrieval import index as ix
from mmcli.retrieval.duplicates import near_duplicates


def planted(n: int = 300, dim: int = 16, seed: int = 0) -> np.ndarray:
    """Random unit rows with near copies of some planted (chains included: a copy of a copy)."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n, dim)).astype(np.float32)
    for src, dst in [(3, 40), (40, 41), (7, 250), (100, 101), (100, 299), (5, 6)]:
        rows[dst] = rows[src] + rng.normal(scale=0.05, size=dim)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def brute_force_groups(rows: np.ndarray, threshold: float) -> list[list[int]]:
    linked = rows @ rows.T >= threshold
    seen, groups = set(), []
    for start in range(len(rows)):
        if start in seen:
            continue
        stack, group = [start], set()
        while stack:
            x = stack.pop()
            if x not in group:
                group.add(x)
                stack.extend(np.flatnonzero(linked[x]).tolist())
        seen |= group
        if len(group) > 1:
            groups.append(sorted(group))
    return groups


@pytest.mark.parametrize("threshold", [0.95, 0.99, 0.6])
def test_groups_equal_brute_force_components(threshold):
    rows = planted()
    found = near_duplicates(rows, threshold, block=64)  # many blocks: pairs across block edges count
    assert [g.rows for g in found] == brute_force_groups(rows, threshold)
    for group in found:
        np.testing.assert_allclose(group.scores, rows[group.rows] @ rows[group.rows[0]], atol=1e-5)


def test_shards_are_searched_as_one_index():
    rows = planted()
    found = near_duplicates(ix.RowConcat([rows[:130], rows[130:]]), 0.95, block=50)
    assert [g.rows for g in found] == brute_force_groups(rows, 0.95)


def test_a_threshold_that_links_everything_is_refused():
    with pytest.raises(MmcliError, match="raise the threshold"):
        near_duplicates(planted(), -1.0)
