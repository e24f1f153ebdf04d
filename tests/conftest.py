"""Shared fixtures: tiny generated data and a small thread budget (the suite runs on 2 cores)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Verified weight checksums are cached per user; the tests (and their subprocesses) keep their own,
# removed when the session ends.
if "MMCLI_CACHE_DIR" not in os.environ:
    os.environ["MMCLI_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmcli-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MMCLI_CACHE_DIR"], ignore_errors=True)

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


def signal_after_steps(monkeypatch, steps: int) -> None:
    """Make the training loop send this process a real SIGINT after its ``steps``-th optimizer step
    (the path a Ctrl-C takes: save, then stop); ``monkeypatch.undo()`` restores the loop."""
    import signal

    from mmcli.training.loop import _Loop

    original = _Loop.step
    calls = {"n": 0}

    def step_then_signal(self, micro, number):
        out = original(self, micro, number)
        calls["n"] += 1
        if calls["n"] == steps:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(_Loop, "step", step_then_signal)


def stopped_at_add(monkeypatch, n: int, run) -> None:
    """Run ``run()`` with :meth:`IndexWriter.add` raising KeyboardInterrupt (a Ctrl-C) at its ``n``-th
    call, check that it stopped, and restore the writer."""
    from mmcli.retrieval import index as ix

    original, calls = ix.IndexWriter.add, {"n": 0}

    def add_then_stop(self, rows, items):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        original(self, rows, items)

    monkeypatch.setattr(ix.IndexWriter, "add", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(ix.IndexWriter, "add", original)


def save_random_run(out: Path, arch: str = "mmcli-nano", seed: int = 0, modules: dict | None = None) -> Path:
    """A run folder holding a randomly initialised ``arch`` (what ``mmcli pretrain`` would save),
    with the extra ``modules`` given (see :mod:`mmcli.models.multimodal`)."""
    import torch

    from mmcli.models import weights as ckpt
    from mmcli.models.encoders import build_dual_encoder
    from mmcli.models.multimodal import MultimodalModel
    from mmcli.spec import ModelSpec

    torch.manual_seed(seed)
    encoder = build_dual_encoder(ModelSpec(arch=arch))
    ckpt.save_open_clip_config(out, encoder.model_config, encoder.preprocess_config)
    model = MultimodalModel(encoder.model, modules)
    ckpt.save_weights(out, model, {"arch": arch, "modules": model.modules_config})
    return out


@pytest.fixture(scope="session")
def coca_run(tmp_path_factory) -> Path:
    """A run folder with a random ``mmcli-nano-coca`` captioner (32 px, 24 text tokens)."""
    return save_random_run(tmp_path_factory.mktemp("coca-run"), "mmcli-nano-coca", modules={"caption": {"image": True}})


@pytest.fixture(scope="session")
def nano_run(tmp_path_factory) -> Path:
    """A run folder with a random ``mmcli-nano`` (32 px, 32-dim embeddings)."""
    return save_random_run(tmp_path_factory.mktemp("nano-run"))
