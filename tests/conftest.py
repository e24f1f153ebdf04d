"""Shared fixtures: tiny generated data and a small thread budget (the suite runs on 2 cores)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _threads():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """A small shapes dataset shared by the tests that need real images."""
    from mmcli.data.shapes import generate

    out = tmp_path_factory.mktemp("shapes")
    generate(out, n=96, size=32, seed=0)
    return out
